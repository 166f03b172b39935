"""`gemma4-mlx serve` vs `mlx_lm.server`: aggregate throughput and time to first token
under concurrent clients, same weights, same machine, same BLAS.

Each server runs alone as a subprocess on a random float32 checkpoint (bench_text's
E2B- and MoE-shaped ones, with a 262,144-word tokenizer so that every word is one
token), with OpenBLAS preloaded for both (`import gemma4_mlx` first).  Clients are
the real `openai` client, closed loop: C workers each send R streaming
/v1/completions requests one after another, every prompt different (no prefix cache
hits for anyone).  Reported per cell: aggregate completion tokens/s over the wall
time, p50/p95 time to first token (all requests, and "steady": each client's
requests after its first, i.e. past the start-up burst in which every client
arrives at once), and the check of issue #13's target: steady p95 TTFT <= 2 x
(unloaded TTFT + one decode round at that load).

The demo model and its trained MTP drafter (real acceptance) show what the drafter
adds; the random checkpoints' drafter would accept nothing, so they run without one.

With --rounds N every server runs N times, interleaved, and each cell keeps its best
run: on this 2-core machine a run's speed can drift by up to 1.7x for tens of
seconds at a time (docs/serving.md §8), which one run per server cannot tell from a
difference between the servers.

    make bench-serve      # or: python bench/bench_serve.py [--quick] [--rounds N] [--concurrency 1 4 8 16] [--out FILE]

--spread S gives each request its own max_tokens, drawn from max_tokens x [1 - S, 1 + S]
(the same draws for every server).  With equal lengths every client's next request
arrives in the same round as the others' (the closed loop keeps the start-up burst
going); with spread lengths they arrive apart, as a real load's do.

--sampled sends Gemma's recommended sampling (temperature 1, top-k 64, top-p 0.95)
with every request, to both servers, instead of greedy decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import gemma4_mlx  # noqa: F401  (OpenBLAS first, for the version line)

# isort: split
import mlx.core as mx
import openai
from bench_text import SHAPES, build_checkpoint
from report import Report

from gemma4_mlx.demo import DEMO_DRAFTER, DEMO_MODEL

QUICK = dict(hidden_size=256, intermediate_size=512, vocab_size=32768, vocab_size_per_layer_input=32768)
MLX_LM = "import gemma4_mlx, sys; from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"
# ours with every prompt prefilled alone (no grouped prefill): the A/B of --solo-prefill
OURS_SOLO = (
    "import gemma4_mlx.batching.prefill as p; p.fits = lambda *a: False; "
    "from gemma4_mlx.cli import app; app(prog_name='gemma4-mlx')"
)


def word_tokenizer(folder: Path, vocab: int) -> None:
    """A WordLevel tokenizer: id i is the word w<i> (0-3 are pad / eos / bos / unk)."""
    words = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, vocab)}
    tok = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": i,
                "content": s,
                "special": True,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
            }
            for s, i in list(words.items())[:4]
        ],
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server subprocess, up until `stop()`."""

    def __init__(self, kind: str, folder: Path, drafter: str | None, max_batch: int, solo: bool = False):
        self.port = free_port()
        if kind == "ours":
            cmd = [
                sys.executable,
                *(["-c", OURS_SOLO] if solo else ["-m", "gemma4_mlx"]),
                "serve",
                "--model",
                str(folder),
                "--port",
                str(self.port),
                "--draft-model",
                drafter or "none",
                "--max-batch",
                str(max_batch),
                "--max-queue",
                "256",
            ]
        else:
            cmd = [
                sys.executable,
                "-c",
                MLX_LM,
                "--model",
                str(folder),
                "--port",
                str(self.port),
                "--decode-concurrency",
                str(max_batch),
                "--prompt-concurrency",
                str(max_batch),
            ]
        # The log goes to a file, not a pipe: nobody reads a pipe while the clients
        # run, and a server blocks (or drops connections) once 64 KB of log fill it.
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-serve-{kind}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{kind} server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def gauges(self) -> dict[str, float]:
        """Our scheduler's counters from /metrics (decode rounds, peak batch, peak group)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        names = ("gemma4_decode_rounds", "gemma4_batch_rows_peak", "gemma4_prefill_group_peak")
        return {n: float(line.split()[1]) for line in lines for n in names if line.startswith(n + " ")}

    def tail(self) -> str:
        """The end of the server's log (its file is kept: the path is in the text)."""
        self.log.flush()
        return f"{self.log.name}: " + Path(self.log.name).read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
        os.unlink(self.log.name)


def prompt_text(rng: random.Random, n: int, vocab: int) -> str:
    """n tokens; the BOS spelled out, so that both servers feed the same ids (ours
    adds a missing BOS to raw prompts, mlx_lm.server's tokenizer call would not)."""
    return "<bos> " + " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(n - 1))


# --sampled: Gemma's recommended settings, sent by every request to both servers
SAMPLED = dict(temperature=1.0, top_p=0.95, extra_body={"top_k": 64})
GREEDY = dict(temperature=0)


async def one(client, model: str, prompt: str, max_tokens: int, sampling: dict) -> tuple[float, int, str]:
    """(seconds to the first text, completion tokens, text) of one streamed request."""
    t0 = time.perf_counter()
    first, text, usage = None, "", None
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        **sampling,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter() - t0
            text += chunk.choices[0].text
        if getattr(chunk, "usage", None):
            usage = chunk.usage.completion_tokens
    return first or time.perf_counter() - t0, usage or len(text.split()), text


async def load(url: str, model: str, C: int, per_worker: int, jobs: list[tuple[str, int]], sampling: dict):
    """jobs: (prompt, max_tokens) pairs, the same list for every server."""
    queue = list(jobs[: C * per_worker])
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=1800) as client:

        async def worker():
            out = []
            while queue:
                out.append((*await one(client, model, *queue.pop(), sampling), bool(out)))
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker() for _ in range(C))) for r in rs]
        return time.perf_counter() - t0, results


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def run_server(kind, folder, name, drafter, args, jobs, log, solo=False) -> dict:
    server = Server(kind, folder, drafter, max(args.concurrency), solo)
    model = "default_model" if kind == "mlx_lm" else str(folder)
    try:
        sampling = SAMPLED if args.sampled else GREEDY
        asyncio.run(load(server.url, model, 1, 1, [(jobs[-1][0], 4)], sampling))  # warm-up
        cells = {}
        for C in args.concurrency:
            before = server.gauges() if kind == "ours" else {}
            wall, res = asyncio.run(load(server.url, model, C, args.requests, jobs, sampling))
            after = server.gauges() if kind == "ours" else {}
            ttft = [r[0] for r in res]
            steady = [r[0] for r in res if r[3]] or ttft  # each client's later requests: past the start burst
            tokens = sum(r[1] for r in res)
            cells[C] = dict(
                tps=tokens / wall,
                p50=statistics.median(ttft),
                p95=percentile(ttft, 0.95),
                steady=percentile(steady, 0.95),
                texts=[r[2] for r in res],
                n=len(res),
                rounds=(after["gemma4_decode_rounds"] - before["gemma4_decode_rounds"]) / wall if after else None,
                peak=after.get("gemma4_batch_rows_peak"),
                group=after.get("gemma4_prefill_group_peak"),
            )
        return cells
    except openai.APIConnectionError as e:  # the server dropped a client: say what it logged
        raise RuntimeError(f"{kind} server on {name}: {e}; its log: {server.tail()}") from e
    finally:
        server.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes, short prompts (smoke test, < 3 min)")
    ap.add_argument("--shapes", nargs="*", default=["e2b-shaped", "moe-shaped", "demo"])
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--spread",
        type=float,
        default=0.0,
        help="each request's max_tokens drawn from max_tokens x [1 - S, 1 + S] (seeded, the same for every server): "
        "requests end at different rounds, so the later ones arrive spread out, not in bursts",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="interleaved rounds of every server; each cell keeps its best (this machine's speed drifts "
        "by up to 1.7x for tens of seconds at a time)",
    )
    ap.add_argument("--solo-prefill", action="store_true", help="also run ours with every prompt prefilled alone (A/B)")
    ap.add_argument("--sampled", action="store_true", help="temperature 1, top-k 64, top-p 0.95 (Gemma's), not greedy")
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.prompt_tokens, args.max_tokens = [1, 8], 32, 16
    if not 0 <= args.spread < 1:
        ap.error(f"--spread {args.spread}: expected 0 <= S < 1")
    log = Report(args.out)
    log(
        f"backend {mx.default_device()}, BLAS {gemma4_mlx._blas.describe()} for both servers, "
        f"float32; load: {os.getloadavg()[0]:.2f} (1-min load average at start)"
    )
    log(
        f"closed loop: C clients x {args.requests} streamed /v1/completions each, prompts of "
        f"{args.prompt_tokens} tokens (all different), max_tokens {args.max_tokens}"
        + (f" x [{1 - args.spread:g}, {1 + args.spread:g}] (--spread)" if args.spread else "")
        + ", "
        f"{'sampled: temperature 1, top-k 64, top-p 0.95' if args.sampled else 'greedy'}\n"
    )
    log(
        f"{'model':<11} {'server':<16} {'C':>3} | {'tok/s':>7} {'x mlx_lm':>8} | {'TTFT p50':>8} {'p95':>6} "
        f"{'steady':>6} | steady p95 <= 2 (TTFT1 + round) | rounds/s, peak batch, peak prefill group (ours)"
    )
    for name in args.shapes:
        if name == "demo":
            folder, vocab, variants = DEMO_MODEL, None, [("ours", None), ("ours+drafter", str(DEMO_DRAFTER))]
        else:
            spec = dict(SHAPES[name], **(QUICK if args.quick else {}))
            folder = build_checkpoint(name + ("-quick" if args.quick else ""), spec)
            vocab = spec["vocab_size"]
            word_tokenizer(folder, vocab)
            variants = [("ours", None)]
        if args.solo_prefill:
            variants.append(("ours-solo", None))
        rng = random.Random(0)
        n = max(args.concurrency) * args.requests + 1
        if vocab is None:  # the demo model's own tokenizer: English-ish words (BOS spelled out as above)
            prompts = [
                "<bos>" + f"Question {i}: what is the capital of country number {i}? " * (args.prompt_tokens // 16)
                for i in range(n)
            ]
        else:
            prompts = [prompt_text(rng, args.prompt_tokens, vocab) for _ in range(n)]
        spread = random.Random(1)
        lengths = [round(args.max_tokens * (1 + args.spread * (2 * spread.random() - 1))) for _ in range(n)]
        jobs = list(zip(prompts, [max(1, m) for m in lengths]))
        results: dict = {}
        for _ in range(args.rounds):  # interleaved: each round runs every server once
            runs = {"mlx_lm": run_server("mlx_lm", folder, name, None, args, jobs, log)}
            for label, drafter in variants:
                runs[label] = run_server("ours", folder, name, drafter, args, jobs, log, label == "ours-solo")
            for label, cells in runs.items():  # per server and C, the round with the best throughput
                best = results.setdefault(label, {})
                for C, c in cells.items():
                    if C not in best or c["tps"] > best[C]["tps"]:
                        best[C] = c
        base = results["mlx_lm"]
        for label, cells in results.items():
            for C, c in cells.items():
                round_s = C / c["tps"]
                ok = c["steady"] <= 2 * (cells[1]["p50"] + round_s) if 1 in cells else None
                log(
                    f"{name:<11} {label:<16} {C:>3} | {c['tps']:>7.1f} {c['tps'] / base[C]['tps']:>8.2f} | "
                    f"{c['p50']:>8.3f} {c['p95']:>6.3f} {c['steady']:>6.3f} | {str(ok):<5}"
                    + ("" if c["rounds"] is None else f" | {c['rounds']:.1f}, {c['peak']:.0f}, {c['group']:.0f}")
                )
        if 1 in base and 1 in results["ours"] and not args.sampled:  # greedy texts, at concurrency 1 only
            # Ours keeps a raw completion's leading space (as OpenAI's does: prompt
            # "Hello", text " world"); mlx_lm.server drops it.  The rest must match.
            ours = [t[1:] if t.startswith(" ") else t for t in results["ours"][1]["texts"]]
            same = ours == [t for t in base[1]["texts"]]
            log(f"{name}: greedy texts at C = 1 identical between the servers: {same}\n")


if __name__ == "__main__":
    main()
