"""Tensor- and expert-parallel parity (docs/distributed.md): two ranks started by
`mlx.launch -n 2 --backend ring` on this machine, each loading its shard, against
the same checkpoint loaded whole in the same process (`helpers/dist_worker.py`).

Float32 families: dense K=V (31B-like), PLE + KV sharing (E2B-like), MoE (26B-like),
each with its MTP drafter; quantized: Q4_0 and SFP8 of a dense and an MoE model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from gemma4_mlx.api import load
from gemma4_mlx.convert.core import convert
from gemma4_mlx.demo import DEMO_MODEL

from helpers import unified
from helpers.checkpoints import build_hf, write_char_tokenizer
from helpers.live_server import free_port, http, live_server

FLOAT = ("dense", "e2b_like", "moe", "unified")
QUANT = ("dense_q4_0", "dense_sfp8", "moe_q4_0", "moe_sfp8")
STACKED = ("moe_stacked", "moe_q4_0_stacked")  # stacked shards (the default) on the GPU branches too
TOL = 1e-4
LAUNCH = Path(sys.executable).parent / "mlx.launch"


def launch(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port())]
    cmd += ["--python", sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def results(checkpoints, drafters, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    specs = {
        n: {"model": str(checkpoints[n].path), "drafter": str(drafters[n].path), "seed": i}
        for i, n in enumerate(FLOAT)
        if n in checkpoints
    }
    # Quantized row-sharded products need each rank's inputs on whole groups of 32:
    # MLP widths of 128 / 64 (the float families' 96 splits into 48).
    for name, fam, extra in (
        ("dense", "dense", {"intermediate_size": 128}),
        ("moe", "moe", {"intermediate_size": 64, "moe_intermediate_size": 64}),
    ):
        src = root / name
        build_hf(fam, seed=7, **extra).save_pretrained(src)
        for q in ("q4_0", "sfp8"):
            convert(src, root / f"{name}_{q}", q, progress=False)
            specs[f"{name}_{q}"] = {"model": str(root / f"{name}_{q}"), "seed": 3}
    specs["moe_stacked"] = dict(specs["moe"], stacked=True)
    specs["moe_q4_0_stacked"] = dict(specs["moe_q4_0"], stacked=True)
    # The 12B unified model (its embedders stay whole on every rank) and its drafter.
    unified.build_hf(seed=4).save_pretrained(root / "unified")
    unified.hf_drafter(seed=5).save_pretrained(root / "unified_d")
    specs["unified"] = {"model": str(root / "unified"), "drafter": str(root / "unified_d"), "seed": 4}
    specs["_chat"] = True
    (root / "specs.json").write_text(json.dumps(specs))
    out = root / "out.json"
    r = launch([str(Path(__file__).parent / "helpers" / "dist_worker.py"), str(root / "specs.json"), str(out)])
    assert r.returncode == 0 and out.exists(), r.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_ranks_draw_alike_after_seed_alike(results):
    """Unseeded sampling and random request seeds draw the same numbers on every rank."""
    assert results["_size"] == 2
    first, second = results["_draws"]
    assert first == second and len(set(first)) == len(first)


@pytest.mark.parametrize("name", FLOAT + QUANT + STACKED)
def test_logits_match_the_whole_model(results, name):
    r = results[name]
    assert r["vocab"] == (300 if name == "unified" else 256)  # every rank sees the whole vocabulary
    assert r["whole"] < TOL, "one forward over the prompt"
    assert r["steps"] < TOL, "chunked prefill, then decode steps past the window"
    assert r["stacked"]  # every rank stacks its shard's q/k/v and gate/up (the loader's default)


@pytest.mark.parametrize("name", FLOAT + QUANT + STACKED)
def test_greedy_and_batched_rows_match(results, name):
    r = results[name]
    assert r["greedy_sharded"] == r["greedy_whole"]
    assert r["batch_sharded"] == r["batch_whole"]


@pytest.mark.parametrize("name", FLOAT + STACKED[:1])
def test_speculative_greedy_equals_plain_sharded(results, name):
    r = results[name]
    assert r["spec_sharded"] == r["plain_sharded"]
    assert r["auto_sharded"] == r["plain_sharded"]  # the ranks' own draft-length choices differed
    assert r["drafter_bytes_sharded"] < r["drafter_bytes_whole"]  # its attention follows the target's heads


def test_chat_followers_keep_step_with_rank_0(results):
    """LeaderChat / FollowerChat (chat --distributed): turns, a tool result, a turn
    stopped after two events, a reset — the same texts as one process."""
    r = results["_chat"]
    assert r["sharded"] == r["whole"]
    assert all(r["whole"])


@pytest.mark.parametrize("name", FLOAT + QUANT)
def test_each_rank_holds_about_half(results, name):
    """Sharded: attention, MLPs, experts, the tied table; whole: norms, router, PLE parts."""
    r = results[name]
    assert 0.45 * r["bytes_whole"] < r["bytes_sharded"] < 0.65 * r["bytes_whole"]


# -- faults: ranks started as mlx.launch starts them (MLX_RANK, MLX_HOSTFILE), so each
# can be given its own arguments or killed ------------------------------------------


def start_two(
    tmp_path: Path, models: list, extra: list[str], command: str = "generate", env: dict | None = None
) -> list[subprocess.Popen]:
    port = free_port()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    cli = Path(sys.executable).parent / "gemma4-mlx"
    procs = []
    for rank, model in enumerate(models):
        env_r = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), MLX_WORLD_SIZE="2", **(env or {}))
        cmd = [str(cli), command, "--model", str(model), "--distributed", "--backend", "ring", *extra]
        procs.append(subprocess.Popen(cmd, env=env_r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.fixture(scope="module")
def endless(checkpoints, tmp_path_factory) -> Path:
    """The dense tiny model with a tokenizer, whose end-of-turn token never wins
    (its table row is zero, so its logit is 0 while the best of 255 others is not)."""
    path = tmp_path_factory.mktemp("endless") / "m"
    hf = build_hf("dense", seed=11)
    with torch.no_grad():
        hf.model.language_model.embed_tokens.weight[1] = 0
    hf.save_pretrained(path)
    write_char_tokenizer(path)
    return path


def rank_pid(rank: int, marker: str) -> int | None:
    """The pid of the `gemma4-mlx` process of `rank` whose command line has `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if marker in cmd and "gemma4-mlx" in cmd and f"MLX_RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_a_killed_rank_stops_the_other_with_one_line(endless):
    """Started by mlx.launch, as users start it: rank 1 is killed mid-generation; rank 0
    ends within seconds with one line (the launcher's SIGTERM, or MLX's lost-peer
    error, whichever comes first) and the launch exits non-zero."""
    args = ["--", str(Path(sys.executable).parent / "gemma4-mlx"), "generate", "--model", str(endless)]
    args += ["--raw", "--prompt", "abc", "-n", "1000000", "--draft-model", "none", "--distributed"]
    cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()), "--python", sys.executable]
    launch = subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert launch.stdout.read(8)  # generating
        victim = rank_pid(1, str(endless))
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        out, _ = launch.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        launch.kill()
    lines = [x for x in out.splitlines() if x.startswith("error: rank 0:")]
    said = lines[0] if lines else ""
    assert "lost the connection to another rank" in said or "another rank exited" in said, out[-2000:]
    assert "Traceback" not in out
    assert elapsed < 10


@pytest.mark.parametrize("fault", ["frozen", "killed"])
def test_without_the_launcher_the_heartbeat_stops_the_other_rank(endless, tmp_path, fault):
    """Ranks started by hand (no launcher to stop them): rank 1 is frozen (SIGSTOP: a
    hung machine or a pulled cable, no socket closes) or killed; rank 0 ends with one
    line instead of waiting in a collective forever."""
    args = ["--raw", "--prompt", "abc", "-n", "1000000", "--draft-model", "none"]
    r0, r1 = start_two(tmp_path, [endless, endless], args, env={"GEMMA4_MLX_HEARTBEAT_S": "3"})
    try:
        assert r0.stdout.read(8)  # generating
        os.kill(r1.pid, signal.SIGSTOP if fault == "frozen" else signal.SIGKILL)
        t0 = time.monotonic()
        _, err = r0.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        for p in (r0, r1):
            p.kill()
    said = [x for x in err.splitlines() if x.startswith("error: rank 0: ")]  # MLX's own notes around it
    assert said and "Traceback" not in err, err[-2000:]
    if fault == "frozen":
        assert said[-1].endswith("another rank has been silent for 3 s (a frozen machine or a dropped link); stopping")
    else:
        assert "lost the connection to another rank" in said[-1] or "another rank exited" in said[-1], said
    assert r0.returncode == 1 and elapsed < 15


def test_a_rank_with_another_model_is_refused(checkpoints, tmp_path):
    procs = start_two(tmp_path, [checkpoints["dense"].path, checkpoints["moe"].path], ["--prompt", "x", "-n", "2"])
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 1
        assert "rank 1 was started with a different model or quantization than rank 0" in err, err[-2000:]


# -- serve --distributed: rank 0 serves HTTP, rank 1 follows its scheduler ------------

QUESTIONS = ["What is the capital of France?", "What is 2 plus 3?", "What is the capital of Italy?", "Hello!"]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def ask_all(base: str) -> list:
    """Concurrent requests: greedy, seeded sampling, a JSON schema, log-probabilities."""
    client = OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)  # a desync hangs

    def ask(job):
        q, extra = job
        r = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": q}], max_tokens=32, **extra
        )
        c = r.choices[0]
        lp = None if c.logprobs is None else [round(t.logprob, 3) for t in c.logprobs.content]
        return c.message.content, lp

    jobs = [(q, {"temperature": 0.0}) for q in QUESTIONS]
    jobs += [(q, {"temperature": 2.0, "seed": 7}) for q in QUESTIONS[:2]]  # hot: seeds matter
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    jobs.append((QUESTIONS[0], {"response_format": schema, "temperature": 0.0}))
    jobs.append((QUESTIONS[1], {"logprobs": True, "top_logprobs": 2, "temperature": 0.0}))
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(ask, jobs))


def test_serve_distributed_answers_as_one_process(tmp_path):
    port = free_port()
    r0, r1 = start_two(tmp_path, ["demo", "demo"], ["--port", str(port), "--max-batch", "4"], "serve")
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if http("GET", base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and r0.poll() is None, r0.stderr.read() if r0.poll() else "no start"
            time.sleep(0.5)
        sharded = ask_all(base)
        r0.send_signal(signal.SIGINT)  # rank 0 shuts down and tells rank 1
        r0.wait(timeout=60)
        r1.wait(timeout=60)
    finally:
        for p in (r0, r1):
            p.kill()
    assert r1.returncode == 0, r1.stderr.read()[-2000:]
    model, tokenizer = load(str(DEMO_MODEL))
    with live_server(model, tokenizer, model_name="demo", max_batch=4) as (base, _):
        alone = ask_all(base)
    assert sharded == alone
    assert sharded[6][0].startswith('{"') and sharded[7][1]  # constrained; log-probabilities came
