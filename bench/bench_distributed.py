"""Gemma 4 split over several processes (issue #18, docs/distributed.md): what crosses
the link, what each rank holds, what one collective costs here, tokens/s at N = 1 vs 2,
and a projection for two Macs over Thunderbolt 5.

    python bench/bench_distributed.py [--quick] [--out FILE]

1. Traffic per token, accounted from the real shapes (presets) at N = 2 and 4: the
   collectives of one decoded token (embedding rows, per layer the attention all_sum and
   the MLP all_sum — on MoE layers one stacked all_sum of the dense and expert partial
   sums — and the vocabulary gather of the logits) and of one prefill token (the same
   without the logits, which a prefill computes for its last position only).  A ring
   all_sum of M bytes sends 2 (N-1)/N * M per rank; the gather (N-1)/N * V * 4.
2. Per-rank resident weights for every variant at N = 2 (and 4) in BF16 / SFP8 / Q4_0,
   accounted like bench_memory.py (the policy's format per tensor, the codecs' layouts)
   with each tensor divided by the pieces `Model.shard` cuts it in.
3. Measured on this machine, two ranks on the local ring (`mlx.launch -n 2 --backend
   ring`): the latency of one all_sum of each message size; a real-shape 2-layer 31B
   (bf16, written to bench/_work) loaded per rank: its MLX active memory against the
   accounted per-rank bytes; decode tokens/s (float32) at N = 1 (one process) and
   N = 2.  Two ranks share this machine's 2 cores and its memory bus, so N = 2 here
   measures the overhead of splitting, not the gain of a second machine.
4. Projection for two Macs over Thunderbolt 5: per-token time = per-rank weight bytes
   / memory bandwidth + collectives * latency + bytes sent / link bandwidth, from
   published link figures (docs/distributed.md §8 lists them and their sources).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_memory as bm  # noqa: E402  (a sibling script, not a package)

import gemma4_mlx  # noqa: E402, F401  (OpenBLAS before mlx.core)

# isort: split

import mlx.core as mx  # noqa: E402

from gemma4_mlx.checkpoint.shards import shard_fraction  # noqa: E402
from gemma4_mlx.models.parallel import Shard  # noqa: E402
from gemma4_mlx.models.text import Model  # noqa: E402

GB = 1e9
VARIANTS = ("e2b", "e4b", "12b", "26b-a4b", "31b")
RECIPES = ("bf16", "sfp8", "q4_0", "q4")  # q4: MLX affine 4-bit, groups of 64 (mlx-community's usual)
WORK = HERE / "_work" / "distributed"
# Published link figures (docs/distributed.md §8): JACCL (RDMA over Thunderbolt 5)
# 5-9 us per operation and 50-60 Gb/s; the TCP ring ~300 us per operation.
LINKS = {"TB5 JACCL (RDMA)": (8e-6, 6.25e9), "TB5 ring (TCP)": (300e-6, 6.25e9)}
# Memory bandwidth of some Macs (Apple's published figures, GB/s).
MACS = {"M4 Pro (273 GB/s)": 273e9, "M4 Max (546 GB/s)": 546e9, "M3 Ultra (819 GB/s)": 819e9}


# -- 1. traffic -----------------------------------------------------------------------


def traffic(cfg, N: int, act_bytes: int = 2) -> dict:
    """Collectives and bytes of one decoded token and of one prefill token."""
    H, V = cfg.hidden_size, cfg.vocab_size
    msgs = [H * act_bytes]  # the vocabulary-sharded embedding rows
    for _ in cfg.layers:
        msgs.append(H * act_bytes)  # attention: o_proj's partial sums
        msgs.append((2 if cfg.enable_moe_block else 1) * H * act_bytes)  # MLP (+ experts, stacked)
    ring = 2 * (N - 1) / N
    gather = (N - 1) / N * V * 4  # float32 logits, every rank's slice to every other
    prefill_sent = ring * sum(msgs)
    return {
        "collectives": len(msgs) + 1,
        "message_bytes": sum(msgs) + V * 4,
        "decode_sent": prefill_sent + gather,
        "prefill_sent": prefill_sent,
        "largest": max(msgs),
    }


# -- 2. per-rank memory ---------------------------------------------------------------


def per_rank(variant: str, N: int, recipe: str) -> tuple[int | None, int]:
    """(resident bytes of one rank, of the whole model) after `convert(recipe)`; None
    for the rank when the loader refuses the split (`misaligned`)."""
    cfg = bm.text_config(bm.config_dict(variant))
    plan = Model(cfg).shard(Shard(None, 0, N))  # lazy: nothing allocated, no collective
    whole = bm.account(cfg, recipe)["resident"]
    if misaligned(cfg, plan, recipe):
        return None, whole
    return bm.account(cfg, recipe, parts=shard_fraction(plan))["resident"], whole


def misaligned(cfg, plan, recipe: str) -> str | None:
    """The first tensor cut by input columns whose piece is not whole quantization
    groups (the loader refuses such a split: docs/distributed.md §5), or None."""
    from gemma4_mlx.convert.policy import Policy, classify

    policy = Policy(recipe)
    for key, shape in bm.lazy_params(cfg):
        module = key.rpartition(".")[0]
        sl = plan.get(module)
        if sl is None or sl.axis != -1 or not key.endswith(".weight") or classify(module) == "other":
            continue
        fmt = policy.for_tensor(module, shape[-1])[0]
        if fmt.quantized and (shape[-1] // sl.parts) % fmt.group_size:
            return f"{module}: {shape[-1] // sl.parts} inputs per rank, groups of {fmt.group_size}"
    return None


# -- 3. measured (ranks) ----------------------------------------------------------------


def time_all_sum(nbytes: int, group, reps: int) -> float:
    x = mx.ones((max(1, nbytes // 4),), mx.float32)
    mx.eval(mx.distributed.all_sum(x, group=group))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=group))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_rate(model, steps: int) -> float:
    """Greedy decode tokens/s after a 16-token prompt (float32)."""
    from gemma4_mlx.runtime.generate import decode_step, prefill

    cache = model.make_cache()
    logits = prefill(model, mx.array([list(range(3, 19))]), cache)
    tok = mx.argmax(logits, axis=-1)
    mx.eval(tok)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = mx.argmax(decode_step(model, tok, cache), axis=-1)
        mx.eval(tok)
    return steps / (time.perf_counter() - t0)


def rank_job(args) -> None:
    """Run inside `mlx.launch`: collective latencies, then the 2-layer model."""
    from mlx.utils import tree_flatten

    from gemma4_mlx.checkpoint.load import load_model

    group = mx.distributed.init()
    sizes = json.loads(args.sizes)
    out = {"latency": {str(n): time_all_sum(n, group, args.reps) for n in sizes}}
    if args.model:
        mx.clear_cache()
        base = mx.get_active_memory()
        model, _ = load_model(args.model, group=group)  # stored bf16, as users load it
        mx.eval(model.parameters())
        out["active"] = mx.get_active_memory() - base
        out["param_bytes"] = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        del model
        mx.clear_cache()
        model, _ = load_model(args.model, "float32", group=group)
        out["tok_s"] = decode_rate(model, args.steps)
    every = mx.distributed.all_gather(mx.array([out.get("active", 0)], mx.int64), group=group)
    out["active_by_rank"] = [int(v) for v in every.tolist()]
    if group.rank() == 0:
        Path(args.result).write_text(json.dumps(out))


def launch_ranks(sizes: list[int], model: Path | None, reps: int, steps: int) -> dict:
    result = WORK / "ranks.json"
    cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend", "ring"]
    cmd += ["--python", sys.executable, __file__, "--rank-job", "--sizes", json.dumps(sizes)]
    cmd += ["--reps", str(reps), "--steps", str(steps), "--result", str(result)]
    if model is not None:
        cmd += ["--model", str(model)]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


def two_layer_31b() -> Path:
    folder = WORK / "31b-2layer"
    if not (folder / "config.json").exists():
        print(f"  writing a real-shape 2-layer 31B (bf16) to {folder} ...", flush=True)
        bm.child_build(str(folder), bm.config_dict("31b", layers=2))
    return folder


# -- report -----------------------------------------------------------------------------


def report(args) -> list[str]:
    lines = ["# bench_distributed: Gemma 4 over mx.distributed (issue #18)", ""]
    say = lines.append
    say("## 1. Traffic per token (accounted, bf16 activations, float32 logits)")
    say(f"{'variant':8} {'N':>2} {'collectives':>11} {'decode sent/rank':>17} {'prefill sent/rank':>18}")
    for v in VARIANTS:
        cfg = bm.text_config(bm.config_dict(v))
        for N in (2, 4):
            t = traffic(cfg, N)
            sent = f"{t['decode_sent'] / 1e6:>14.2f} MB {t['prefill_sent'] / 1e3:>15.1f} KB"
            say(f"{v:8} {N:>2} {t['collectives']:>11} {sent}")
    say("")
    say("## 2. Resident weights per rank (accounted; whole model in brackets), GB")
    say("   refused: a tensor cut by input columns would split quantization groups (the loader refuses it)")
    say(f"{'variant':8} {'N':>2} " + " ".join(f"{r:>18}" for r in RECIPES))
    for v in VARIANTS:
        for N in (2, 4):
            cells = []
            for r in RECIPES:
                rank, whole = per_rank(v, N, r)
                cells.append(
                    f"{'refused':>7} [{whole / GB:6.2f}]" if rank is None else f"{rank / GB:7.2f} [{whole / GB:6.2f}]"
                )
            say(f"{v:8} {N:>2} " + " ".join(f"{c:>18}" for c in cells))
    say("")
    cfg31 = bm.text_config(bm.config_dict("31b"))
    t31 = traffic(cfg31, 2)
    sizes = sorted({cfg31.hidden_size * 4, t31["largest"], 512 * cfg31.hidden_size * 2})
    model = None if args.quick else two_layer_31b()
    say("## 3. Measured here: two ranks on the local ring (2 cores shared)")
    ranks = launch_ranks(sizes, model, reps=20 if args.quick else 200, steps=4 if args.quick else 16)
    for n in sizes:
        say(f"all_sum of {n / 1e3:9.1f} KB: {ranks['latency'][str(n)] * 1e6:9.1f} us (median)")
    local = statistics.median(ranks["latency"][str(n)] for n in sizes[:2])
    if model is not None:
        acc, _ = per_rank_of(model, 2)
        say(
            f"2-layer 31B, bf16, per rank: MLX active {ranks['active_by_rank']} bytes, "
            f"parameters {ranks['param_bytes']}, accounted {acc}"
        )
        from gemma4_mlx.checkpoint.load import load_model

        whole, _ = load_model(model, "float32")
        one = decode_rate(whole, 16)
        del whole
        say(
            f"decode tokens/s, float32, 2-layer 31B: N=1 {one:.2f}, N=2 {ranks['tok_s']:.2f} "
            f"(ratio {ranks['tok_s'] / one:.2f}x; both ranks on this machine's 2 cores)"
        )
    say("")
    say("## 4. Projection: 31B and 26B-A4B, two Macs over Thunderbolt 5 (decode, batch 1)")
    for v in ("31b", "26b-a4b"):
        cfg = bm.text_config(bm.config_dict(v))
        t = traffic(cfg, 2)
        for r in ("bf16", "q4_0"):
            rank, whole = per_rank(v, 2, r)
            active = rank if v == "31b" else _active_moe(v, r, 2)
            one = whole if v == "31b" else _active_moe(v, r, 1)
            for mac, bw in MACS.items():
                for link, (lat, link_bw) in LINKS.items():
                    t1 = one / bw
                    t2 = active / bw + t["collectives"] * lat + t["decode_sent"] / link_bw
                    say(f"{v:8} {r:5} {mac:20} {link:18}: N=1 {1 / t1:6.1f} tok/s, N=2 {1 / t2:6.1f} tok/s")
    say(f"(local loopback all_sum of a decode message here: {local * 1e6:.0f} us)")
    return lines


def per_rank_of(folder: Path, N: int) -> tuple[int, int]:
    from gemma4_mlx.config import read_config

    cfg = read_config(folder).text
    plan = Model(cfg).shard(Shard(None, 0, N))
    return bm.account(cfg, "bf16", parts=shard_fraction(plan))["resident"], bm.account(cfg, "bf16")["resident"]


def _active_moe(variant: str, recipe: str, N: int) -> int:
    """Bytes one MoE decode step reads per rank: everything it holds but the experts,
    plus top-k / E of its experts (routed experts spread over the ranks on average;
    the busiest rank of a step reads more)."""
    cfg = bm.text_config(bm.config_dict(variant))
    split = shard_fraction(Model(cfg).shard(Shard(None, 0, N)) if N > 1 else {})
    held = bm.account(cfg, recipe, parts=split)["resident"]
    # only the experts: every other tensor divided away
    experts = bm.account(cfg, recipe, parts=lambda k: split(k) if ".experts." in k else 1 << 62)["resident"]
    return int(held - experts + experts * cfg.top_k_experts / cfg.num_experts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="no 2-layer 31B: traffic, memory, latencies only")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rank-job", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=200, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=16, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_job:
        rank_job(args)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    lines = report(args)
    load = os.getloadavg()
    lines.append(f"machine: {os.cpu_count()} cores, load average at the end {load[0]:.2f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
