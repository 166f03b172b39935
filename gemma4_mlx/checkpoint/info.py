"""`gemma4-mlx info`: what a checkpoint holds, per component (docs/quantization.md §10).

Parameters and bytes come from the safetensors headers only (no tensor is read);
the format of each component from config.json; resident memory, optionally, from
loading the model and evaluating its parameters.
"""

from __future__ import annotations

import re
from pathlib import Path

from gemma4_mlx.checkpoint.files import LoadError, weight_files
from gemma4_mlx.checkpoint.keys import rename
from gemma4_mlx.checkpoint.load import load_model
from gemma4_mlx.checkpoint.memory import (
    CHAT_ROLLBACK,
    available_bytes,
    kv_cache_bytes,
    needed_bytes,
    rollback_slack_bytes,
)
from gemma4_mlx.checkpoint.quantized import QUANT_META, kernel_params, quantization_block
from gemma4_mlx.config import ConfigError, read_config
from gemma4_mlx.formats.safetensors import read_header

COMPONENTS = (
    "embedding",
    "per_layer_embeddings",
    "attention",
    "mlp",
    "experts",
    "router",
    "norms_other",
    "vision",
    "audio",
)
_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "U32": "uint32",
    "U8": "uint8",
    "I8": "int8",
    "I32": "int32",
    "I64": "int64",
    "F8_E4M3": "float8_e4m3",
}
_RULES = (  # first match wins; norms before their parent blocks so q_norm is not "attention"
    ("vision", re.compile(r"(^|\.)(vision_tower|vision_embedder|embed_vision|multi_modal_projector)\.")),
    ("audio", re.compile(r"(^|\.)(audio_tower|embed_audio)\.")),
    (
        "per_layer_embeddings",
        re.compile(
            r"(embed_tokens_per_layer|per_layer_model_projection|"
            r"\.per_layer_input_gate|\.per_layer_projection)\."
        ),
    ),
    ("norms_other", re.compile(r"norm[^.]*\.weight$")),
    ("embedding", re.compile(r"^(model\.embed_tokens|lm_head)\.")),
    ("experts", re.compile(r"\.experts\.")),
    ("router", re.compile(r"\.router\.")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("mlp", re.compile(r"\.mlp\.")),
)


def component(key: str) -> str:
    key = rename(key)
    for name, rx in _RULES:
        if rx.search(key):
            return name
    return "norms_other"  # layer scalars and anything not listed


def _header(path: Path) -> tuple[int, dict]:
    """(header bytes incl. the 8-byte length, tensor entries) of one safetensors file."""
    try:
        return read_header(path)
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: unreadable safetensors header ({e})") from None


def model_info(path, load: bool = True, max_context: int | None = None) -> dict:
    """Per-component parameters, bytes and formats of the checkpoint folder `path`, and
    what a default load needs in memory: weights (as the memory guard counts them) and
    the KV cache for `max_context` tokens (default: the model's longest)."""
    folder = Path(path)
    try:
        config = read_config(folder)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    q = quantization_block(config.raw, str(folder / "config.json"))
    overrides = {
        rename(k): v for k, v in (q or {}).items() if isinstance(v, (dict, bool)) and k not in ("tensors", "policy")
    }
    headers = {f: _header(f) for f in weight_files(folder)}
    names = {rename(k) for _, h in headers.values() for k in h}
    comps = {c: {"params": 0, "bytes": 0, "tensors": 0, "modes": set()} for c in COMPONENTS}
    for f, (_, header) in headers.items():
        for key, e in header.items():
            try:
                a, b = e["data_offsets"]
                shape, dtype = list(e["shape"]), _DTYPES.get(e["dtype"], e["dtype"].lower())
            except (KeyError, TypeError, ValueError):
                raise LoadError(f"{f}: tensor {key}: malformed header entry") from None
            c = comps[component(key)]
            c["bytes"] += b - a
            c["tensors"] += 1
            k = rename(key)
            if k.endswith(QUANT_META):
                continue  # metadata of a quantized weight: bytes, no parameters
            module = k[: -len(".weight")] if k.endswith(".weight") else None
            n = 1
            for s in shape:
                n *= s
            if q is not None and module and f"{module}.scales" in names:
                p = kernel_params(module, q, overrides, str(folder))
                if p is None:
                    raise LoadError(f"{folder}: {module}.scales present but config.json marks {module} unquantized")
                n = n * 32 // p["bits"] if dtype == "uint32" else n  # packed words -> elements
                c["modes"].add(p["format"] if p["format"] != "affine" else f"affine{p['bits']}g{p['group_size']}")
            else:
                c["modes"].add(dtype)
            c["params"] += n
    header_bytes = sum(h for h, _ in headers.values())
    out = {
        "path": str(folder),
        "files": [f.name for f in headers],
        "total_bytes": sum(f.stat().st_size for f in headers),
        "header_bytes": header_bytes,
        "quantization": (q or {}).get("recipe") or (q or {}).get("mode") if q else None,
        "components": {k: {**v, "modes": sorted(v["modes"])} for k, v in comps.items() if v["tensors"]},
        "resident_bytes": resident_bytes(folder) if load else None,
    }
    out["total_params"] = sum(c["params"] for c in out["components"].values())
    out["memory"] = _memory(folder, config, max_context)
    return out


def _memory(folder: Path, config, max_context: int | None) -> dict:
    """The memory guard's arithmetic (docs/hardening.md §3) for `load(folder)`."""
    need = needed_bytes(folder)
    context = max_context or config.text.max_position_embeddings
    have = available_bytes()
    return {
        "weights_resident": need.resident,
        "towers": need.towers,
        "mapped": need.mapped,
        "kv_context": context,
        "kv_cache": kv_cache_bytes(config.text, context, need.act_bytes),
        # a chat's rollback slack on the sliding layers, at each KV width (docs/kv-cache.md §6)
        "chat_slack_tokens": CHAT_ROLLBACK,
        "chat_slack": {
            bits: rollback_slack_bytes(config.text, CHAT_ROLLBACK, need.act_bytes, bits) for bits in (16, 8, 4)
        },
        "available": have[0] if have else None,
        "available_from": have[1] if have else None,
    }


def resident_bytes(folder: Path) -> int:
    """MLX active memory taken by the loaded model's evaluated parameters."""
    import gc

    import mlx.core as mx

    gc.collect()
    before = mx.get_active_memory()
    model, _ = load_model(folder)
    mx.eval(model.parameters())
    used = mx.get_active_memory() - before
    del model
    gc.collect()
    return used


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def render(info: dict, console) -> None:
    """A rich table of `model_info`'s result."""
    from rich.table import Table

    t = Table(title=f"{info['path']} ({info['quantization'] or 'unquantized'})")
    for col in ("component", "params", "bytes", "MiB", "bits/param", "format"):
        t.add_column(col, justify="left" if col in ("component", "format") else "right")
    for name, c in info["components"].items():
        bpp = 8 * c["bytes"] / c["params"] if c["params"] else 0.0
        t.add_row(
            name,
            f"{c['params']:,}",
            f"{c['bytes']:,}",
            f"{c['bytes'] / 2**20:.2f}",
            f"{bpp:.2f}",
            ", ".join(c["modes"]),
        )
    t.add_row("headers", "", f"{info['header_bytes']:,}", f"{info['header_bytes'] / 2**20:.2f}", "", "")
    t.add_row(
        "total on disk",
        f"{info['total_params']:,}",
        f"{info['total_bytes']:,}",
        f"{info['total_bytes'] / 2**20:.2f}",
        "",
        "",
        style="bold",
    )
    console.print(t)
    m = info.get("memory")
    if m:
        have = f"{_size(m['available'])} ({m['available_from']})" if m["available"] is not None else "?"
        console.print(
            f"memory for a default load: weights {_size(m['weights_resident'])} resident "
            f"(towers {_size(m['towers'])} of it), {_size(m['mapped'])} memory-mapped; "
            f"KV cache for {m['kv_context']:,} tokens: {_size(m['kv_cache'])} ({m['kv_cache']:,} bytes); "
            f"available: {have}",
            markup=False,
        )
        slack = m["chat_slack"]
        console.print(
            f"chat rollback slack ({m['chat_slack_tokens']:,} tokens per sliding layer; "
            "a token count or a byte budget: chat --rollback-slack 256MB, Chat(max_rollback=)): "
            f"{_size(slack[16])} at 16-bit KV, {_size(slack[8])} at 8-bit, {_size(slack[4])} at 4-bit",
            markup=False,
        )
    if info["resident_bytes"] is not None:
        console.print(
            f"resident after load (MLX active memory): {info['resident_bytes']:,} bytes "
            f"({info['resident_bytes'] / 2**20:.2f} MiB)"
        )
