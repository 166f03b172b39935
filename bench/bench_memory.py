"""Resident memory of every released Gemma 4 variant in BF16, SFP8 and Q4_0 (issue #3).

For each variant a real-shape checkpoint with random bf16 weights is written in
the hub's layout (`gemma4` wrapper config, `model.language_model.*` keys, fused
`experts.gate_up_proj`), shard by shard (HF-style 5 GB shards), so RAM never holds
the model.  Only the **text decoder** is written: vision/audio towers are not
written to these sources (the towers are lazily mapped and not resident in
text use), while Google's published table counts them (docs/quantization.md §10); the towers' share is printed next
to it (docs/multimodal.md §1, docs/text-decoder.md §7.3).

E2B, E4B (measured): the full-depth source (~9.3 / ~15 GB) is converted with
`gemma4_mlx.convert.convert` to each format (bf16 too: that is the BF16
conversion), each conversion in a child process whose peak RSS is its own
`VmHWM` (/proc/self/status, the mm's high-water mark; not ru_maxrss, which after
a vfork+exec starts from the parent's high-water mark).  Then, in a fresh child,
the converted model is loaded as users load it (`gemma4_mlx.load`, default
`map_ple=True`: the PLE table stays memory-mapped, not resident), its
parameters evaluated, and MLX active memory is read after load and after a
4-token prefill plus one decode step, with the process RSS.  Each converted
folder is deleted after measuring; the source at the end (unless --keep).

12B, 26B-A4B, 31B (accounted + a measured depth-reduced check): their bf16 sources
(24 / 50 / 61 GB) do not fit next to their outputs on a 65 GB disk, or their BF16
forms do not fit in 24 GB of RAM.  The 12B's source is a `gemma4_unified` checkpoint
of its text decoder (its embedders are the "towers" column; Google published no
figure for it: docs/unified.md §8).  Their resident bytes are
*accounted*: the lazily built `Model` (MLX allocates nothing) gives every
tensor's shape; `convert.policy.Policy(recipe).for_tensor` gives its format, and
the codecs' stored layouts give its bytes:
  float          2 bytes (bf16 source; bf16 recipe)
  affine b-bit   b/8 + 2 * 2/g bytes per weight (scales and biases in the source
                 dtype, bf16): the 8-bit g64 token embedding = 8.5 bits
  q4_0           1/2 + 2/32 bytes per weight (one fp16 d per 32; biases -8d are
                 derived per product, not stored) = 4.5 bits
  sfp8 (mxfp8)   1 + 1/32 bytes per weight (E8M0 scale per 32) + a 4-byte fp32
                 tensor scale = 8.25 bits
The accounting must match the measured E2B/E4B numbers to within 1% (checked
and printed).  Then a depth-reduced copy of 26B-A4B and 31B (2 decoder layers:
one sliding, one full; real hidden, head, expert and vocabulary shapes) is
built, converted to q4_0 and measured the same way, and compared with the
accounting of that reduced model.

    python bench/bench_memory.py [--variants e2b e4b 26b-a4b 31b] [--formats bf16 sfp8 q4_0]
                                 [--reduced-layers 2] [--reduced-formats q4_0] [--keep] [--out FILE]

Took 37 min on 2 CPU cores (E2B ~11 min, of which 3 min writing the random source;
E4B ~21 min, 7.5 min writing; each depth-reduced model ~3 min) and needs ~35 GB of free
disk at the peak (E4B source + its BF16 conversion); a step that would not fit is skipped
with a message.  Work folders: bench/_work/memory/ (removed unless --keep).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GB, GiB = 10**9, 2**30
WORK = Path(__file__).parent / "_work" / "memory"
SHARD_BYTES = 5 * GB  # transformers' customary max_shard_size="5GB"
VARIANTS = ("e2b", "e4b", "12b", "26b-a4b", "31b")
FORMATS = ("bf16", "sfp8", "q4_0")
MEASURED = ("e2b", "e4b")  # full depth fits on this disk and in RAM
# Google's published weights-only table (docs/quantization.md §10), as printed: "GB"
GOOGLE = {"e2b": (9.6, 4.6, 3.2), "e4b": (15.0, 7.5, 5.0), "26b-a4b": (48.0, 25.0, 15.6), "31b": (58.3, 30.4, 17.4)}
# (none published for the 12B, released later: docs/unified.md §2 has its parameter counts)
# Parameters Google counts and our text-only checkpoints do not: vision (+ audio)
# towers and their embedders.  E2B/E4B: published total minus text total
# (docs/text-decoder.md §7.2-§7.3); 26B/31B: large vision tower 569.55 M (docs/multimodal.md §1)
# plus embed_vision (1152 x text hidden).
TOWERS = {
    "e2b": 5_104_297_504 - 4_628_569_344,
    "e4b": 7_941_100_832 - 7_463_013_376,
    "12b": 49_922_304 + 2_457_600,  # no towers: the vision and audio embedders (docs/unified.md §2)
    "26b-a4b": 569_550_000 + 1152 * 2816,
    "31b": 569_550_000 + 1152 * 5376,
}
PROMPT = [2, 818, 5279, 529]  # 4-token prefill, then one decode step


NOTES = """\
notes
- measured: MLX active memory (mx.get_active_memory) of a fresh process after gemma4_mlx.load(folder)
  (default map_ple=True) and mx.eval(model.parameters()); "+1 decode" = after a 4-token prefill and one
  decode step (adds the KV cache and small per-layer state).  Conversion peak RSS = VmHWM of the
  converting child process; in parentheses, above its baseline after imports (interpreter, MLX, numpy).
- accounted: exact stored bytes of every tensor of the lazily built model under the converter's policy
  (Policy.for_tensor) and the codecs' layouts: bf16 2 B; affine 8-bit g64 (token embedding) 8.5 bits with
  bf16 scales+biases; Q4_0 4.5 bits (fp16 d per 32; biases -8d derived per product, not resident); SFP8 =
  mxfp8 8.25 bits + one fp32 tensor scale.  The accounting check above compares it with the measured
  full-depth E2B/E4B and depth-reduced 26B-A4B/31B models.  26B-A4B and 31B full-depth rows are accounted
  only: their bf16 sources (50 / 61 GB) do not fit next to their outputs on this disk and their BF16/SFP8
  forms do not fit in 24 GB of RAM.
- ours = text decoder only.  Google's table counts the vision (+ audio) towers too: "towers" = their
  parameters (E2B/E4B: published total minus text total, docs/text-decoder.md §7.2-§7.3; 26B/31B: large vision
  tower 569.55 M + embed_vision, docs/multimodal.md §1; 12B: its vision and audio embedders, 52.38 M,
  docs/unified.md §2; Google published no 12B figure) at bf16, which is what our policy would keep them in
  (docs/quantization.md §6); "all" = resident + mapped PLE + towers, i.e. every weight Google counts.  See
  docs/quantization.md §10, which argues Google's figures are really GiB (BF16 column = total params x 2 bytes / 2^30):
  res/G reads them as printed (GB), all/G as GiB.
- policy (default, keep_high_precision=True) in every recipe: PLE table bf16 and memory-mapped (not
  resident: "mapped PLE", paged in row by row); PLE projections/gates and the MoE router bf16; norms and
  scalars bf16; token embedding (= tied head) 8-bit affine g64 in the SFP8 and Q4_0 recipes.  Google's
  E2B/E4B Q4_0 figures imply a ~4-bit PLE table; ours keeps it bf16 but off the resident set.
- q4_0* (accounted): a QAT source (Google's "qat-q4_0-unquantized" releases), whose token embedding also
  lies on the Q4_0 lattice: the q4_0 recipe then stores it as Q4_0, losslessly (4.5 instead of 8.5 bits;
  convert/core.py `_encode`, tests/test_convert.py::test_qat_embedding_stored_as_q4_0).  Off the lattice
  the embedding keeps the 8-bit rule (the q4_0 rows above, random weights).
- The towers: `gemma4-mlx convert` now converts them too, bf16 in every recipe; `gemma4_mlx.load` maps
  them lazily, so they become resident only when the first image / clip is encoded.
- Q4_0 from random (non-QAT) weights takes the converter's ptq-ggml path: fp16 scales.  A QAT source whose
  recovered d are not exact in fp16 would get fp32 scales (+0.5 bit/weight on those tensors).
- sources: random bf16 in the hub layout (model.language_model.*, fused experts.gate_up_proj), 5 GB shards
  (transformers' customary max_shard_size).  The converter holds about one output shard plus one
  tensor's working set, so its peak follows the shard size, not the model size.  A quantized tensor's
  working set is up to ~2.5x its bf16 size (the finiteness check and the chunked 8-bit quantize hold
  full-size temporaries): the 31B token embedding (262144 x 5376, 2.8 GB bf16) alone peaks at ~7 GB.
- depth-reduced models: layers = sliding..., full (the real shapes of both layer types), everything else
  as the preset: vocabulary, hidden, heads, experts.
"""


# -- configs and the hub layout ---------------------------------------------------


def config_dict(variant: str, layers: int | None = None) -> dict:
    """The preset's text config; `layers`: depth-reduced copy (sliding..., full).  The
    12B's carries `_unified` (its source is written as a `gemma4_unified` checkpoint)."""
    from gemma4_mlx.config import FULL, SLIDING
    from gemma4_mlx.presets import PRESETS, UNIFIED_PRESETS

    d = dict(PRESETS[variant]) if variant in PRESETS else dict(UNIFIED_PRESETS[variant], _unified=True)
    if layers:
        d.update(num_hidden_layers=layers, layer_types=[SLIDING] * (layers - 1) + [FULL], num_kv_shared_layers=0)
    return d


def text_config(d: dict):
    from gemma4_mlx.config import TextConfig

    return TextConfig.from_dict(dict(d), source="bench config")


def lazy_params(cfg) -> list[tuple[str, tuple]]:
    """(our module-tree key, shape) of every parameter: Model() is lazy, nothing allocated."""
    from mlx.utils import tree_flatten

    from gemma4_mlx.models.text import Model

    return [(k, tuple(v.shape)) for k, v in tree_flatten(Model(cfg).parameters())]


def hub_layout(cfg) -> list[tuple[str, tuple]]:
    """The tensors of a hub (`Gemma4ForConditionalGeneration`) text decoder: our keys
    under `model.language_model.`, experts fused as gate_up_proj [E, 2I, H] and
    down_proj [E, H, I] (docs/text-decoder.md §8.3; `loader.sanitize` undoes both)."""
    out = []
    for k, shape in lazy_params(cfg):
        hk = "model.language_model." + k[len("model.") :] if k.startswith("model.") else k
        if ".experts." in k:
            if k.endswith("experts.gate_proj.weight"):
                E, inner, H = shape
                out.append((hk.replace("gate_proj.weight", "gate_up_proj"), (E, 2 * inner, H)))
            elif k.endswith("experts.down_proj.weight"):
                out.append((hk[: -len(".weight")], shape))
            continue  # up_proj: inside gate_up_proj
        out.append((hk, shape))
    return out


# -- accounting ---------------------------------------------------------------------


def account(cfg, recipe: str, map_ple: bool = True, qat: bool = False, parts=None) -> dict:
    """Bytes each tensor is stored (= resident) in after `convert(..., recipe)`, from
    the policy and the codecs' layouts; the PLE table counts as mapped, not resident.
    qat: the source is a QAT checkpoint whose token embedding lies on the Q4_0
    lattice, which the q4_0 recipe then stores as Q4_0 (convert/core.py `_encode`).
    parts: key -> in how many pieces one rank of a sharded load holds it
    (`checkpoint.shards.shard_fraction`, bench/bench_distributed.py)."""
    from gemma4_mlx.convert.policy import RECIPES, Policy, classify

    policy = Policy(recipe)
    out = {"resident": 0, "mapped": 0, "params": 0, "by_kind": {}}
    for key, shape in lazy_params(cfg):
        n = math.prod(shape)
        module, _, leaf = key.rpartition(".")
        cls = classify(module) if leaf == "weight" else "other"
        fmt = policy.for_class("other") if cls == "other" else policy.for_tensor(module, shape[-1])[0]
        if qat and policy.qat_embedding(cls) and shape[-1] % 32 == 0:
            fmt = RECIPES["q4_0"]
        if not fmt.quantized:
            kind, nbytes = "float", 2 * n  # bf16 source kept, or the bf16 recipe
        elif fmt.kind == "affine":
            kind, nbytes = f"affine{fmt.bits}g{fmt.group_size}", n * fmt.bits // 8 + 2 * 2 * (n // fmt.group_size)
        elif fmt.kind == "q4_0":
            kind, nbytes = "q4_0", n // 2 + 2 * (n // 32)
        elif fmt.kind == "sfp8":
            kind, nbytes = "sfp8", n + n // 32 + 4
        elif fmt.kind in ("mxfp4", "nvfp4"):
            kind, nbytes = fmt.kind, n // 2 + n // fmt.group_size
        else:
            raise ValueError(f"no layout for {fmt.kind}")
        if parts is not None:
            nbytes //= parts(key)
        out["params"] += n
        if map_ple and cls == "ple_table" and not fmt.quantized:
            out["mapped"] += nbytes
            kind = "mapped"
        else:
            out["resident"] += nbytes
        out["by_kind"][kind] = out["by_kind"].get(kind, 0) + nbytes
    return out


# -- child processes ----------------------------------------------------------------


def _status() -> dict:
    """VmRSS / VmHWM of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, val = line.split(":")
            out[name] = int(val.split()[0]) * 1024
    return out


def lattice_table(shape, rows_per_chunk: int = 8192):
    """A bf16 table on the Q4_0 lattice, as a QAT checkpoint's: per 32-block a scale d
    with 5 significant bits (so d * (q - 8) is exact in bf16) and codes q in 0..15 with
    one q = 0 (the signed extremum -8d the lattice recovery keys on)."""
    import mlx.core as mx

    R, K = shape
    parts = []
    for a in range(0, R, rows_per_chunk):
        r = min(rows_per_chunk, R - a)
        q = mx.random.randint(1, 16, (r, K // 32, 32))
        q = mx.concatenate([mx.zeros((r, K // 32, 1), q.dtype), q[..., 1:]], axis=-1)
        e = mx.random.randint(-10, -6, (r, K // 32, 1)).astype(mx.float32)
        m = mx.random.randint(0, 16, (r, K // 32, 1)).astype(mx.float32)
        d = (1 + m / 16) * mx.power(2.0, e)
        part = (d * (q.astype(mx.float32) - 8)).reshape(r, K).astype(mx.bfloat16)
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts)


def child_build(folder: str, cfg_dict: dict) -> dict:
    """Random bf16 weights in the hub layout, one shard at a time."""
    import mlx.core as mx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = text_config(cfg_dict)
    tensors = hub_layout(cfg)
    mx.random.seed(0)
    weight_map, shard, size, n, names = {}, {}, 0, 0, []
    total = sum(2 * math.prod(s) for _, s in tensors)
    t0 = time.perf_counter()

    def flush():
        nonlocal shard, size, n
        if not shard:
            return
        name = f"model-{n + 1:05d}.safetensors"
        mx.eval(shard)
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        names.append(name)
        print(f"    wrote {name} ({size / GB:.2f} GB, {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        shard, size, n = {}, 0, n + 1
        gc.collect()
        mx.clear_cache()

    for key, shape in tensors:
        if cfg_dict.get("_qat_embedding") and key.endswith("embed_tokens.weight"):
            v = lattice_table(shape)
        elif key.endswith(("norm.weight", "layer_scalar", "scale")):
            v = (0.8 + 0.4 * mx.random.uniform(shape=shape)).astype(mx.bfloat16)
        else:  # drawn directly in bf16: no float32 copy of a 4.7 GB table
            v = mx.random.normal(shape, dtype=mx.bfloat16) * mx.array(0.02, mx.bfloat16)
        nbytes = 2 * math.prod(shape)
        if size and size + nbytes > SHARD_BYTES:
            flush()
        shard[key], size = v, size + nbytes
    flush()
    # hub naming: model-0000i-of-0000N.safetensors
    n_files = len(names)
    final = {old: f"model-{i + 1:05d}-of-{n_files:05d}.safetensors" for i, old in enumerate(names)}
    for old, new in final.items():
        (folder / old).rename(folder / new)
    weight_map = {k: final[v] for k, v in weight_map.items()}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    kind = "gemma4_unified" if cfg_dict.get("_unified") else "gemma4"  # text only: no vision/audio_config
    text = dict(cfg.to_dict(), model_type=f"{kind}_text")
    arch = "Gemma4UnifiedForConditionalGeneration" if cfg_dict.get("_unified") else "Gemma4ForConditionalGeneration"
    (folder / "config.json").write_text(
        json.dumps({"model_type": kind, "architectures": [arch], "text_config": text, "dtype": "bfloat16"})
    )
    return {
        "bytes": total,
        "shards": n_files,
        "seconds": time.perf_counter() - t0,
        "largest_shard": max((folder / f).stat().st_size for f in final.values()),
        **_status(),
    }


def child_convert(src: str, dst: str, recipe: str) -> dict:
    import mlx.core as mx

    from gemma4_mlx.convert import convert

    limit = os.environ.get("BENCH_MLX_CACHE_LIMIT_GB")  # --convert-cache-limit (diagnostic)
    if limit:
        mx.set_cache_limit(int(float(limit) * GB))

    base = _status()["VmRSS"]  # interpreter + MLX + numpy, before any weight is read
    t0 = time.perf_counter()
    r = convert(src, dst, recipe, force=True, progress=False)
    secs = time.perf_counter() - t0
    st = _status()
    out_files = list(Path(dst).glob("*.safetensors"))
    return {
        "seconds": secs,
        "base_rss": base,
        "peak_rss": st["VmHWM"],
        "end_rss": st["VmRSS"],
        "report_peak_rss": r.peak_rss,
        "peak_mlx": r.peak_mlx,
        "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out,
        "largest_shard_in": r.largest_shard,
        "largest_shard_out": max(f.stat().st_size for f in out_files),
        "shards_out": len(out_files),
        "provenance": sorted({e.get("provenance", "float") for e in r.tensors.values()}),
        "scale_dtypes": sorted({e["scale_dtype"] for e in r.tensors.values() if "scale_dtype" in e}),
    }


def child_measure(folder: str) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import gemma4_mlx
    from gemma4_mlx.models.ple_table import MappedTable

    base_rss = _status()["VmRSS"]
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    model, _ = gemma4_mlx.load(folder)  # default map_ple=True
    mx.eval(model.parameters())
    t_load = time.perf_counter() - t0
    loaded = mx.get_active_memory() - base
    rss_loaded = _status()["VmRSS"]
    tensor_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    table = getattr(model.model, "embed_tokens_per_layer", None)
    mapped = table.nbytes if isinstance(table, MappedTable) else 0
    cache = model.make_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    logits = model(mx.array([[t % model.config.vocab_size for t in PROMPT]]), cache)
    nxt = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(model(nxt, cache))  # cache writes feed this step's attention: evaluated too
    t_step = time.perf_counter() - t0
    st = _status()
    return {
        "loaded": loaded,
        "tensor_bytes": tensor_bytes,
        "mapped": mapped,
        "after_decode": mx.get_active_memory() - base,
        "decode_peak": mx.get_peak_memory() - base,
        "base_rss": base_rss,
        "rss_loaded": rss_loaded,
        "rss_end": st["VmRSS"],
        "peak_rss": st["VmHWM"],
        "load_s": t_load,
        "step_s": t_step,
    }


CHILDREN = {"build": child_build, "convert": child_convert, "measure": child_measure}


def run_child(kind: str, *args) -> dict:
    """Run `kind` in a fresh interpreter; its stderr passes through, its result is
    the JSON on its last stdout line."""
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, __file__, "_child", kind, json.dumps(args)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if p.returncode:
        raise RuntimeError(f"child {kind} {args[:1]} exited with {p.returncode}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


# -- orchestration --------------------------------------------------------------------


class Tee:
    def __init__(self):
        self.lines = []

    def __call__(self, *parts, **kw):
        s = " ".join(str(p) for p in parts)
        print(s, flush=True, **kw)
        self.lines.extend(s.splitlines() or [""])


say = Tee()


def free_disk() -> int:
    return shutil.disk_usage(WORK).free


def fits(need: int, what: str) -> bool:
    free = free_disk()
    if free < need + 3 * GB:
        say(f"  SKIPPED {what}: {free / GB:.1f} GB free disk, need {need / GB:.1f} GB + 3 GB margin")
        return False
    return True


def gb(x):
    return "-" if x is None else f"{x / GB:.2f}"


def gib(x):
    return "-" if x is None else f"{x / GiB:.2f}"


def run_variant(name: str, cfg_dict: dict, formats, rows: list, checks: list, keep: bool) -> None:
    """Build, convert to each format, measure; append table rows and accounting checks."""
    cfg = text_config(cfg_dict)
    qat = bool(cfg_dict.get("_qat_embedding"))
    src = WORK / f"{name}{'-qat' if qat else ''}-src"
    src_bytes = sum(2 * math.prod(s) for _, s in hub_layout(cfg))
    if not (src / "model.safetensors.index.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        need = src_bytes + max(account(cfg, f, map_ple=False)["resident"] for f in formats)
        if not fits(need, f"{name}: source ({src_bytes / GB:.1f} GB) + largest output"):
            return
        say(f"  building {name} source: {src_bytes / GB:.2f} GB bf16 in 5 GB shards ...")
        b = run_child("build", str(src), cfg_dict)
        say(f"  built {b['shards']} shards in {b['seconds']:.0f} s (largest shard {gb(b['largest_shard'])} GB)")
    for f in formats:
        acc = account(cfg, f, qat=qat)
        dst = WORK / f"{name}-{f}"
        shutil.rmtree(dst, ignore_errors=True)
        if not fits(acc["resident"] + acc["mapped"], f"{name} {f} conversion"):
            continue
        say(f"  {name} -> {f}: converting ...")
        c = run_child("convert", str(src), str(dst), f)
        say(
            f"    converted in {c['seconds']:.0f} s; peak RSS {gb(c['peak_rss'])} GB "
            f"(baseline after imports {gb(c['base_rss'])} GB, ru_maxrss {gb(c['report_peak_rss'])} GB), "
            f"MLX peak {gb(c['peak_mlx'])} GB; largest shard in {gb(c['largest_shard_in'])} GB, "
            f"out {gb(c['largest_shard_out'])} GB; written {gb(c['bytes_out'])} GB; "
            f"provenance {c['provenance']} scales {c['scale_dtypes']}"
        )
        say(f"  {name} {f}: loading in a fresh process ...")
        m = run_child("measure", str(dst))
        say(
            f"    loaded in {m['load_s']:.0f} s: MLX active {gb(m['loaded'])} GB (tensor nbytes "
            f"{gb(m['tensor_bytes'])} GB, accounted {gb(acc['resident'])} GB), mapped PLE {gb(m['mapped'])} GB; "
            f"after prefill+1 decode {gb(m['after_decode'])} GB ({m['step_s']:.1f} s); "
            f"RSS after load {gb(m['rss_loaded'])} GB, peak {gb(m['peak_rss'])} GB"
        )
        written = c["bytes_out"]
        checks.append(
            (
                name,
                f + ("*" if qat else ""),
                acc["resident"],
                m["loaded"],
                m["tensor_bytes"],
                acc["resident"] + acc["mapped"],
                written,
                acc["mapped"],
                m["mapped"],
            )
        )
        rows.append(
            dict(
                variant=name,
                fmt=f + ("*" if qat else ""),
                kind="measured",
                resident=m["loaded"],
                decode=m["after_decode"],
                mapped=m["mapped"],
                conv_peak=c["peak_rss"],
                conv_base=c["base_rss"],
                conv_s=c["seconds"],
                acc=acc["resident"],
            )
        )
        shutil.rmtree(dst, ignore_errors=True)
    if not keep:
        shutil.rmtree(src, ignore_errors=True)


def table(rows: list[dict]) -> list[str]:
    """The variant x format table.  rows: variant, fmt, kind, resident, decode, mapped,
    conv_peak, conv_base, conv_s (bytes / seconds; None where not measured)."""
    out = [
        "GB = 10^9 bytes, GiB = 2^30.  kind: measured = MLX active memory after load in a fresh process;",
        "accounted = exact stored bytes from the policy + codec layouts (see the check above).",
        "resident: ours, text decoder; +1 decode: MLX active after a 4-token prefill + 1 decode step;",
        "mapped PLE: memory-mapped, not resident; towers: vision (+audio) towers at bf16, not in our files;",
        "all = resident + mapped + towers: every weight Google's figure counts.  res/G reads Google's",
        "figure as GB, all/G as GiB (docs/quantization.md §10); conv peak: converter RSS (above baseline).",
    ]
    hdr = (
        f"{'variant':>12} {'fmt':>5} {'kind':>9} | {'resident GB':>11} {'GiB':>6} | {'+1 decode':>9} | "
        f"{'mapped PLE':>10} | {'towers':>6} | {'all GB':>6} {'GiB':>6} | {'Google':>6} | {'res/G':>5} "
        f"{'all/G':>5} | {'conv peak RSS GB':>16} {'conv s':>6}"
    )
    out += [hdr, "-" * len(hdr)]
    for r in rows:
        v = r["variant"].split("@")[0]
        full = "@" not in r["variant"]
        g = GOOGLE[v][FORMATS.index(r["fmt"].rstrip("*"))] if full and v in GOOGLE else None
        res = r["resident"]
        tw = 2 * TOWERS[v] if full else None  # our policy keeps the towers bf16 (docs/quantization.md §6)
        total = res + (r["mapped"] or 0) + tw if full else None
        dec = gb(r["decode"]) if r["decode"] is not None else "-"
        peak = f"{gb(r['conv_peak'])} ({gb(r['conv_peak'] - r['conv_base'])})" if r["conv_peak"] is not None else "-"
        gtxt = f"{g:.1f}" if g else "-"
        ratio = f"{res / (g * GB):.2f}" if g else "-"
        ratio_all = f"{total / (g * GiB):.2f}" if g else "-"
        mapped = gb(r["mapped"]) if r["mapped"] else "-"
        secs = f"{r['conv_s']:.0f}" if r["conv_s"] is not None else "-"
        out.append(
            f"{r['variant']:>12} {r['fmt']:>5} {r['kind']:>9} | {gb(res):>11} {gib(res):>6} | "
            f"{dec:>9} | {mapped:>10} | {gb(tw):>6} | {gb(total):>6} {gib(total):>6} | {gtxt:>6} | "
            f"{ratio:>5} {ratio_all:>5} | {peak:>16} {secs:>6}"
        )
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        result = CHILDREN[sys.argv[2]](*json.loads(sys.argv[3]))
        print(json.dumps(result), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument(
        "--e4b-formats",
        nargs="+",
        choices=FORMATS,
        help="formats measured for E4B (default: --formats); e.g. bf16 q4_0 to save time",
    )
    ap.add_argument(
        "--reduced-layers", type=int, default=2, help="decoder layers of the measured 26B-A4B / 31B check (0: skip it)"
    )
    ap.add_argument("--reduced-formats", nargs="+", default=["q4_0"], choices=FORMATS)
    ap.add_argument("--keep", action="store_true", help="keep the source checkpoints afterwards")
    ap.add_argument(
        "--convert-cache-limit",
        type=float,
        metavar="GB",
        help="diagnostic: mx.set_cache_limit in the converting process (0: no buffer "
        "cache), to see how much of the conversion peak is MLX's cache of freed buffers",
    )
    ap.add_argument("--out", type=Path, help="also write the output to this file")
    ap.add_argument(
        "--qat-embedding",
        action="store_true",
        help="build sources whose token embedding lies on the Q4_0 lattice (a QAT checkpoint)",
    )
    ap.add_argument(
        "--accounted-only", action="store_true", help="no checkpoints: the accounted table for every variant (seconds)"
    )
    args = ap.parse_args()

    import mlx.core as mx

    if args.convert_cache_limit is not None:
        os.environ["BENCH_MLX_CACHE_LIMIT_GB"] = str(args.convert_cache_limit)
    WORK.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    say(
        f"gemma4-mlx memory benchmark: mlx {mx.__version__}, {os.cpu_count()} CPU cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.1f} GB RAM, "
        f"{free_disk() / GB:.1f} GB free disk in {WORK}"
    )
    say(f"started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    if args.convert_cache_limit is not None:
        say(f"converting processes run with mx.set_cache_limit({args.convert_cache_limit} GB)")
    rows, checks = [], []
    for v in args.variants:
        if v in MEASURED and not args.accounted_only:
            fmts = args.e4b_formats if (v == "e4b" and args.e4b_formats) else args.formats
            say(f"\n== {v} (full depth, measured): {', '.join(fmts)}")
            run_variant(v, dict(config_dict(v), _qat_embedding=args.qat_embedding), fmts, rows, checks, args.keep)
        else:
            cfg = text_config(config_dict(v))
            for f in args.formats:
                acc = account(cfg, f)
                rows.append(
                    dict(
                        variant=v,
                        fmt=f,
                        kind="accounted",
                        resident=acc["resident"],
                        decode=None,
                        mapped=acc["mapped"],
                        conv_peak=None,
                        conv_base=None,
                        conv_s=None,
                        acc=acc["resident"],
                    )
                )
            if args.reduced_layers and not args.accounted_only:
                name = f"{v}@{args.reduced_layers}L"
                say(
                    f"\n== {name} (depth-reduced: {args.reduced_layers} decoder layers, real shapes; measured): "
                    f"{', '.join(args.reduced_formats)}"
                )
                run_variant(
                    name,
                    dict(config_dict(v, args.reduced_layers), _qat_embedding=args.qat_embedding),
                    args.reduced_formats,
                    rows,
                    checks,
                    args.keep,
                )
        if "q4_0" in args.formats:  # a QAT source (Google's Q4_0 releases): embedding Q4_0 too
            acc = account(text_config(config_dict(v)), "q4_0", qat=True)
            rows.append(
                dict(
                    variant=v,
                    fmt="q4_0*",
                    kind="accounted",
                    resident=acc["resident"],
                    decode=None,
                    mapped=acc["mapped"],
                    conv_peak=None,
                    conv_base=None,
                    conv_s=None,
                    acc=acc["resident"],
                )
            )
    elapsed = time.perf_counter() - t_start

    say("\n== accounting check (accounted vs measured resident bytes after load)")
    say(
        f"{'model':>14} {'fmt':>5} | {'accounted':>13} {'MLX active':>13} {'diff':>7} | "
        f"{'tensor nbytes':>13} {'diff':>7} | {'acc. written':>13} {'conv. wrote':>13} {'diff':>7} | mapped acc/meas"
    )
    ok = True
    for name, f, acc, active, nbytes, acc_w, wrote, acc_m, m_m in checks:
        d1, d2, d3 = (active - acc) / acc, (nbytes - acc) / acc, (wrote - acc_w) / acc_w
        ok &= abs(d1) < 0.01 and abs(d2) < 0.01 and acc_m == m_m
        say(
            f"{name:>14} {f:>5} | {acc:13,d} {active:13,d} {d1:+7.3%} | {nbytes:13,d} {d2:+7.3%} | "
            f"{acc_w:13,d} {wrote:13,d} {d3:+7.3%} | {gb(acc_m)}/{gb(m_m)} GB"
        )
    say(
        f"accounting within 1% of every measurement: {'yes' if ok else 'NO'}"
        if checks
        else "no measurement to check the accounting against"
    )

    say("\n== resident weight memory (text decoder only), next to Google's table (weights, towers included)")
    for line in table(rows):
        say(line)
    say("\n" + NOTES)
    say(f"\ntotal run time {elapsed / 60:.1f} min; finished {time.strftime('%H:%M:%S UTC', time.gmtime())}")
    if args.out:
        args.out.write_text("\n".join(say.lines) + "\n")


if __name__ == "__main__":
    import gemma4_mlx  # noqa: F401  (OpenBLAS first)

    main()
