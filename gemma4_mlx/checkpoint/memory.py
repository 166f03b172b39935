"""The memory guard: refuse, before any tensor is read, a checkpoint that needs more
memory than this machine can give (docs/hardening.md §3).

Needed: the weights a load keeps resident, from the safetensors headers only, after
the precision policy (`dtype` casts floating tensors, never quantization metadata or
the towers' clamp bounds) and without the per-layer-embedding table when it stays
memory-mapped.  Available: Metal's recommended working-set size on macOS, else
MemAvailable (capped by a cgroup memory limit) on Linux.  The KV cache is reported
for a context length (`kv_cache_bytes`) with the same per-dtype arithmetic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from gemma4_mlx.cache.quantized import layout as kv_layout
from gemma4_mlx.checkpoint.files import LoadError, weight_files
from gemma4_mlx.checkpoint.keys import rename
from gemma4_mlx.checkpoint.quantized import QUANT_META
from gemma4_mlx.config import FULL, TextConfig
from gemma4_mlx.formats.safetensors import ITEM_SIZE, read_header
from gemma4_mlx.models.layers import CLAMPS

PLE_KEY = "model.embed_tokens_per_layer.weight"  # the row-gathered table that can stay mapped
_FLOAT = {"F32": 4, "F16": 2, "BF16": 2}
_CAST = {"float32": 4, "float16": 2, "bfloat16": 2}
_TOWER = re.compile(r"^(vision|audio)\.|(^|\.)(vision_tower|embed_vision|audio_tower|embed_audio|vision_embedder)\.")
GIB = 2**30
MAX_ROLLBACK = 32  # the sliding caches' rollback slack (cache.SlidingKVCache's default)
CHAT_ROLLBACK = 2048  # a chat session's slack (chat.session.Chat's max_rollback default)
PREFILL_CHUNK = 512  # runtime.generate's default: a sliding cache briefly holds one chunk beyond its window


@dataclass
class Need:
    resident: int  # bytes of weights held in memory after loading
    mapped: int  # bytes left memory-mapped (the PLE table): paged in on demand, evictable
    towers: int  # of `resident`: the vision / audio towers (resident once media are used)
    act_bytes: int  # bytes per element of the activations and KV cache (2 for bf16)


def _tensor_bytes(key: str, dtype: str, nbytes: int, cast: int | None) -> int:
    """Resident bytes of one stored tensor under the precision policy (checkpoint.load._cast)."""
    if cast is None or dtype not in _FLOAT or key.endswith(CLAMPS):
        return nbytes
    if key.endswith(QUANT_META) and cast != 4:
        return nbytes  # quantization metadata is never narrowed
    return nbytes // _FLOAT[dtype] * cast


def needed_bytes(
    folder: Path, dtype: str | None = None, map_ple: bool = True, text_only: bool = False, parts=None
) -> Need:
    """What `load(folder, dtype, map_ple, text_only)` will hold, from the headers alone.
    parts: key -> in how many pieces a sharded load reads it (`shards.shard_fraction`)."""
    cast = _CAST.get(dtype) if dtype is not None else None
    entries = {}
    for f in weight_files(folder):
        try:
            _, header = read_header(f)
        except (OSError, ValueError) as e:
            raise LoadError(f"{f}: unreadable safetensors ({e})") from None
        for key, e in header.items():
            a, b = e["data_offsets"]
            entries[rename(key)] = (e["dtype"], b - a)
    if "lm_head.weight" in entries and "model.embed_tokens.weight" in entries:
        del entries["lm_head.weight"]  # tied: dropped by the loader
    resident = mapped = towers = 0
    ple_quantized = PLE_KEY.replace(".weight", ".scales") in entries
    for key, (st_dtype, n) in entries.items():
        if key == PLE_KEY and map_ple and dtype is None and not ple_quantized and st_dtype in _FLOAT:
            mapped += n
            continue
        is_tower = bool(_TOWER.search(key))
        if is_tower and text_only:
            continue
        n = _tensor_bytes(key, st_dtype, n, cast) // (parts(key) if parts else 1)
        resident += n
        towers += n if is_tower else 0
    norm = entries.get("model.norm.weight")
    act = cast or (ITEM_SIZE.get(norm[0], 2) if norm else 2)
    return Need(resident, mapped, towers, act)


def kv_cache_bytes(text: TextConfig, context: int, act_bytes: int = 2, batch: int = 1) -> int:
    """KV cache bytes for `context` tokens: K and V per layer that writes its own (KV-shared
    layers read their producer's); a sliding layer keeps its window, the rollback slack and
    one prefill chunk."""
    total = 0
    for spec in text.layers:
        if spec.shared:
            continue
        tokens = context if spec.type == FULL else min(context, text.sliding_window - 1 + MAX_ROLLBACK + PREFILL_CHUNK)
        total += 2 * batch * tokens * spec.kv_heads * spec.head_dim * act_bytes
    return total


def kv_entry_bytes(spec, act_bytes: int = 2, kv_bits: int | None = None) -> int:
    """Bytes one token's K and V take in one layer's cache: float in the activation
    dtype, or with kv_bits 8 / 4 the packed codes plus one scale and bias (activation
    dtype) per group along the (padded) head dim (docs/kv-cache.md §1-§2)."""
    if kv_bits in (None, 16):
        return 2 * spec.kv_heads * spec.head_dim * act_bytes
    group, padded = kv_layout(spec.head_dim)
    return 2 * spec.kv_heads * (padded * kv_bits // 8 + 2 * (padded // group) * act_bytes)


def rollback_slack_bytes(text: TextConfig, tokens: int, act_bytes: int = 2, kv_bits: int | None = None) -> int:
    """Bytes that `tokens` of rollback slack (`max_rollback`) add to a long context's
    cache: every cache-owning sliding layer keeps that many entries beyond its window
    (a full layer keeps every entry anyway)."""
    return sum(tokens * kv_entry_bytes(s, act_bytes, kv_bits) for s in text.layers if not s.shared and s.type != FULL)


def slack_tokens(text: TextConfig, slack, act_bytes: int = 2, kv_bits: int | None = None) -> int:
    """The rollback slack in tokens: `slack` is a token count (int) or a byte budget for
    this model's sliding layers ("512MB", "1.5GB", "300MiB"), turned into the most tokens
    whose slack fits it (docs/kv-cache.md §5).  ValueError names a malformed budget."""
    if isinstance(slack, int):
        if slack < 0:
            raise ValueError(f"rollback slack: {slack} tokens is negative")
        return slack
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(KB|MB|GB|KiB|MiB|GiB)\s*", str(slack))
    if m is None:
        raise ValueError(f"rollback slack {slack!r}: expected tokens (2048) or a size (512MB, 1.5GB, 300MiB)")
    unit = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m.group(2)]
    per_token = rollback_slack_bytes(text, 1, act_bytes, kv_bits)
    return int(float(m.group(1)) * unit // per_token) if per_token else CHAT_ROLLBACK


def _meminfo() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), if limited."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text())
    except (OSError, ValueError, IndexError):
        return None


def available_bytes() -> tuple[int, str] | None:
    """(bytes this process can still take, where the number comes from); None if unknown."""
    if mx.metal.is_available():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        limit = info.get("max_recommended_working_set_size")
        if limit:
            return int(limit) - mx.get_active_memory(), "Metal's recommended working set, less what MLX holds"
    free = _meminfo()
    room = _cgroup_room()
    if free is None and room is None:
        return None
    if room is not None and (free is None or room < free):
        return room, "the cgroup's memory.max less its use"
    return free, "MemAvailable"


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def check_memory(folder: Path, need: Need, force: bool = False) -> None:
    """LoadError (one line: both numbers and the options) if `need` does not fit."""
    have = available_bytes()
    if force or have is None or need.resident <= have[0]:
        return
    raise LoadError(
        f"{folder}: needs {gib(need.resident)} ({need.resident:,} bytes) of weights in memory, "
        f"this machine can give {gib(have[0])} ({have[1]}); use a smaller format "
        f"(gemma4-mlx convert --quant q4_0 or q8), or --force (force=True) to load anyway"
    )
