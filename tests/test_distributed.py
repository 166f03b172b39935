"""Tensor- and expert-parallel parity (docs/distributed.md): two ranks started by
`mlx.launch -n 2 --backend ring` on this machine, each loading its shard, against
the same checkpoint loaded whole in the same process (`helpers/dist_worker.py`).

Float32 families: dense K=V (31B-like), PLE + KV sharing (E2B-like), MoE (26B-like),
each with its MTP drafter; quantized: Q4_0 and SFP8 of a dense and an MoE model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_mlx.convert.core import convert

from helpers.checkpoints import build_hf
from helpers.live_server import free_port

FLOAT = ("dense", "e2b_like", "moe")
QUANT = ("dense_q4_0", "dense_sfp8", "moe_q4_0", "moe_sfp8")
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
        n: {"model": str(checkpoints[n].path), "drafter": str(drafters[n].path), "seed": i} for i, n in enumerate(FLOAT)
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
    (root / "specs.json").write_text(json.dumps(specs))
    out = root / "out.json"
    r = launch([str(Path(__file__).parent / "helpers" / "dist_worker.py"), str(root / "specs.json"), str(out)])
    assert r.returncode == 0 and out.exists(), r.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_ranks(results):
    assert results["_size"] == 2


@pytest.mark.parametrize("name", FLOAT + QUANT)
def test_logits_match_the_whole_model(results, name):
    r = results[name]
    assert r["vocab"] == 256  # every rank sees the whole vocabulary
    assert r["whole"] < TOL, "one forward over the prompt"
    assert r["steps"] < TOL, "chunked prefill, then decode steps past the window"


@pytest.mark.parametrize("name", FLOAT + QUANT)
def test_greedy_and_batched_rows_match(results, name):
    r = results[name]
    assert r["greedy_sharded"] == r["greedy_whole"]
    assert r["batch_sharded"] == r["batch_whole"]


@pytest.mark.parametrize("name", FLOAT)
def test_speculative_greedy_equals_plain_sharded(results, name):
    r = results[name]
    assert r["spec_sharded"] == r["plain_sharded"]
    assert r["drafter_bytes_sharded"] < r["drafter_bytes_whole"]  # its attention follows the target's heads


@pytest.mark.parametrize("name", FLOAT + QUANT)
def test_each_rank_holds_about_half(results, name):
    """Sharded: attention, MLPs, experts, the tied table; whole: norms, router, PLE parts."""
    r = results[name]
    assert 0.45 * r["bytes_whole"] < r["bytes_sharded"] < 0.65 * r["bytes_whole"]
