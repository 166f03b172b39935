"""Resident (MLX active) memory of an E2B-sized bf16 model, PLE table mapped vs loaded.

Writes the text decoder of the E2B preset with random bf16 weights, shard by
shard, to bench/_work/e2b-bf16 (~9 GB; skipped with < 30 GB free disk), then for
`map_ple` on and off reports MLX active memory after load (parameters evaluated)
and after a short prefill plus one decode step, next to Google's published
E2B BF16 figure (which also counts the vision/audio towers: spec quantization.md §10).

    python bench/bench_memory.py [--keep]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
from pathlib import Path

import gemma4_mlx  # noqa: F401  (OpenBLAS first)
import mlx.core as mx
from mlx.utils import tree_flatten

from gemma4_mlx.models.ple_table import MappedTable
from gemma4_mlx.models.text import Model
from gemma4_mlx.presets import preset

FOLDER = Path(__file__).parent / "_work" / "e2b-bf16"
SHARD_BYTES = 2 << 30
GOOGLE_E2B_BF16_GIB = 9.6  # weights only, towers included, in GiB (spec §10)
GiB = 2 ** 30


def build_checkpoint(folder: Path) -> None:
    """Random bf16 weights, written one shard at a time so RAM never holds the model."""
    if (folder / "model.safetensors.index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    cfg = preset("e2b")
    shapes = [(k, v.shape) for k, v in tree_flatten(Model(cfg).parameters())]  # lazy: no allocation
    mx.random.seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if not shard:
            return
        name = f"model-{n:05d}.safetensors"
        mx.eval(shard)
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
        print(f"  wrote {name} ({size / GiB:.2f} GiB)", flush=True)
        shard, size, n = {}, 0, n + 1
        gc.collect()

    for key, shape in shapes:
        if key.endswith(("norm.weight", "layer_scalar")):
            v = (0.8 + 0.4 * mx.random.uniform(shape=shape)).astype(mx.bfloat16)
        else:  # bits drawn directly in bf16: no float32 copy of the 4.7 GB PLE table
            v = mx.random.normal(shape, dtype=mx.bfloat16) * mx.array(0.02, mx.bfloat16)
        nbytes = v.size * 2
        if size and size + nbytes > SHARD_BYTES:
            flush()
        shard[key], size = v, size + nbytes
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    text = dict(cfg.to_dict(), model_type="gemma4_text")
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": text}))


def measure(folder: Path, map_ple: bool) -> dict:
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    model, _ = gemma4_mlx.load(folder, map_ple=map_ple)
    mx.eval(model.parameters())
    loaded = mx.get_active_memory() - base
    table = model.model.embed_tokens_per_layer
    cache = model.make_cache()
    mx.reset_peak_memory()
    logits = model(mx.array([[2, 818, 5279, 529, 7001, 236764, 506, 1902]]), cache)
    nxt = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(model(nxt, cache))  # cache writes feed this step's attention, so they are evaluated too
    out = {"map_ple": map_ple, "params_gib": loaded / GiB,
           "after_decode_gib": (mx.get_active_memory() - base) / GiB,
           "peak_gib": (mx.get_peak_memory() - base) / GiB,
           "mapped_table_gib": table.nbytes / GiB if isinstance(table, MappedTable) else 0.0}
    del model, cache, logits, nxt, table
    gc.collect()
    mx.clear_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the ~9 GB checkpoint afterwards")
    args = ap.parse_args()
    free = shutil.disk_usage(FOLDER.parent if FOLDER.parent.exists() else Path(__file__).parent).free
    if not (FOLDER / "model.safetensors.index.json").exists() and free < 30 * 10 ** 9:
        print(f"skipped: {free / 1e9:.1f} GB free disk, need 30 GB")
        sys.exit(0)
    print(f"building {FOLDER} ...", flush=True)
    build_checkpoint(FOLDER)
    disk = sum(f.stat().st_size for f in FOLDER.glob("*.safetensors"))
    print(f"checkpoint: {disk / GiB:.2f} GiB of bf16 text-decoder weights "
          f"(Google's E2B BF16, towers included: {GOOGLE_E2B_BF16_GIB} GB)")
    rows = [measure(FOLDER, m) for m in (False, True)]
    print(f"{'map_ple':>8} {'after load':>11} {'+1 decode':>10} {'decode peak':>12} {'mapped':>8}  (GiB, MLX active)")
    for r in rows:
        print(f"{str(r['map_ple']):>8} {r['params_gib']:11.2f} {r['after_decode_gib']:10.2f} "
              f"{r['peak_gib']:12.2f} {r['mapped_table_gib']:8.2f}")
    print(f"saved by mapping: {rows[0]['params_gib'] - rows[1]['params_gib']:.2f} GiB; "
          f"Google E2B BF16 (weights only, with towers): {GOOGLE_E2B_BF16_GIB} GB")
    if not args.keep:
        shutil.rmtree(FOLDER)


if __name__ == "__main__":
    main()
