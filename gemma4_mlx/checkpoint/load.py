"""Load an HF-format (or our own MLX-format) Gemma 4 folder into `Model`, and MTP drafters.

Errors are one line naming the file or tensor (`LoadError`).  Weights are read
with `mx.load`, which maps safetensors lazily, and assigned straight into the
module tree, so only one copy of each tensor ever exists.  The steps live in
`files` (reading), `keys` (key mapping), `quantized` (module swap) and `hub`
(finding a folder).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from gemma4_mlx import ops
from gemma4_mlx.checkpoint.cpu_forms import choose_cpu_form
from gemma4_mlx.checkpoint.files import (
    DTYPES,
    LoadError,
    claim_tensors,
    missing_tensors,
    read_safetensors,
    tensor_mismatch,
    weight_files,
)
from gemma4_mlx.checkpoint.generation import read_generation_defaults
from gemma4_mlx.checkpoint.hub import resolve_path
from gemma4_mlx.checkpoint.keys import (
    TOKEN_ORDERING_KEY,
    drop_absent_towers,
    drop_tied_head,
    rename,
    sanitize,
    sanitize_drafter,
)
from gemma4_mlx.checkpoint.memory import PLE_KEY, check_memory, needed_bytes
from gemma4_mlx.checkpoint.quantized import QUANT_META, apply_quantization, quantization_block
from gemma4_mlx.checkpoint.shards import check_same_model, cut_loaded, read_sliced, shard_fraction
from gemma4_mlx.config import AssistantConfig, ConfigError, ModelConfig, read_config
from gemma4_mlx.models.assistant import Drafter, check_pair
from gemma4_mlx.models.layers import CLAMPS
from gemma4_mlx.models.parallel import Shard, ShardError
from gemma4_mlx.models.ple_table import MappedTable
from gemma4_mlx.models.text import Model

log = logging.getLogger(__name__)


def _cast(key: str, v: mx.array, target) -> mx.array:
    if not mx.issubdtype(v.dtype, mx.floating) or v.dtype == target:
        return v
    if key.endswith(CLAMPS):
        return v  # the towers' clamp bounds stay float32 (docs/multimodal.md §6.3)
    if key.endswith(QUANT_META) and target != mx.float32:
        return v  # never narrow quantization metadata (fp16 Q4_0 scales are lossy in bf16)
    return v.astype(target)


def check_and_assign(model: Model, weights: dict[str, mx.array], source: str) -> None:
    expected = dict(tree_flatten(model.parameters()))
    for key, value in weights.items():
        if key not in expected:
            raise LoadError(f"{source}: unexpected tensor {key} {tuple(value.shape)}")
        mismatch = tensor_mismatch(key, value, expected[key])
        if mismatch:
            raise LoadError(f"{source}: {mismatch}")
    # Clamp bounds absent from a checkpoint keep their default (+-inf: no clamp).
    missing = [k for k in expected if k not in weights and not k.endswith(CLAMPS)]
    if missing:
        raise LoadError(missing_tensors(source, missing))
    model.load_weights(list(weights.items()), strict=False)


def finish(model: nn.Module, weights: dict[str, mx.array], dtype: str | None, folder: Path) -> None:
    """Assign the checked weights, tell quantized tables the activation dtype, eval mode."""
    check_and_assign(model, weights, str(folder))
    norm = weights.get("model.norm.weight")
    act = DTYPES[dtype] if dtype is not None else (norm.dtype if norm is not None else None)
    for _, m in model.named_modules():
        if hasattr(m, "out_dtype"):
            m.out_dtype = act  # quantized tables return rows in the activation dtype
    model.eval()


# -- memory-mapped PLE table ------------------------------------------------
# E2B/E4B's per-layer-embedding table (4.7/5.6 GB bf16) is only row-gathered, so by
# default it stays mapped in its safetensors file instead of in MLX memory
# (docs/quantization.md §6, §10).  A quantized table (converter asked for it) is loaded
# as usual.  Only done when the stored dtype is kept (dtype None): an explicit
# dtype asks for a resident cast copy, and the test/tooling paths that load with
# dtype="float32" and rebuild models from `parameters()` need every tensor there.
# (`MappedTable(out_dtype=...)` can cast per gathered row, exact, if wanted later.)


def map_ple_table(model: Model, weights: dict[str, mx.array], src: tuple[Path, str], source: str) -> bool:
    """Swap the PLE nn.Embedding for a `MappedTable`; False (nothing changed) if unmappable."""
    f, name = src
    try:
        table = MappedTable(f, name)
    except ValueError as e:  # e.g. a dtype numpy cannot map: load it the ordinary way
        log.info("PLE table not mapped: %s", e)
        return False
    want = tuple(model.model.embed_tokens_per_layer.weight.shape)
    if table.shape != want:
        raise LoadError(f"{source}: tensor {PLE_KEY} has shape {table.shape}, config says {want}")
    del weights[PLE_KEY]  # the lazy mx.load array is dropped unread
    model.model.embed_tokens_per_layer = table  # a plain attribute: not a parameter
    return True


# -- public API -------------------------------------------------------------


def load_model(
    path: str | Path,
    dtype: str | None = None,
    map_ple: bool = False,
    text_only: bool = False,
    force: bool = False,
    group=None,
    fuse: bool = True,
) -> tuple[Model, ModelConfig]:
    """map_ple: keep an unquantized PLE table memory-mapped (see `map_ple_table`).
    Off here so `info.resident_bytes` and weight-level tooling see every tensor.
    text_only: leave the vision/audio towers out.  (With them, their weights stay
    lazily mapped until the first image or clip is encoded.)
    force: load even if the weights need more memory than the machine can give
    (`memory.check_memory`, docs/hardening.md §3).
    group: an `mx.distributed` group of more than one process: this rank builds and
    reads only its shard (docs/distributed.md); every rank must call this together.
    fuse: stack q/k/v and gate/up into one product each (`models/fuse.py`); False
    keeps the checkpoint's modules, for tools that address them by name."""
    folder = Path(path)
    try:
        ops.check_cpu_form_setting()
    except ValueError as e:
        raise LoadError(str(e)) from None
    if not folder.is_dir():
        raise LoadError(f"{folder}: not a folder")
    try:
        config = read_config(folder)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    try:
        model = Model.from_config(config, text_only=text_only)
    except ValueError as e:
        raise LoadError(f"{folder / 'config.json'}: {e}") from None
    if dtype is not None and dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    tp = Shard.of(group)
    check_same_model(folder, tp)
    try:
        plan = model.shard(tp)
    except ShardError as e:
        raise LoadError(f"{folder / 'config.json'}: cannot split over {tp.size} ranks: {e}") from None
    check_memory(folder, needed_bytes(folder, dtype, map_ple, text_only, shard_fraction(plan)), force)
    weights: dict[str, mx.array] = {}
    ple_src, owners = None, {}  # (file, checkpoint key) of the PLE table; tensor -> shard
    for f in weight_files(folder):
        raw = read_safetensors(f) if not plan else read_sliced(f, plan)
        claim_tensors(owners, f, raw)
        ple_src = next(((f, k) for k in raw if rename(k) == PLE_KEY), ple_src)
        weights.update(sanitize(raw, model))
        del raw
    drop_tied_head(weights, folder)
    drop_absent_towers(model, weights, folder)
    q = quantization_block(config.raw, str(folder / "config.json"))
    if q is not None:
        apply_quantization(model, weights, q, str(folder))
    if (
        map_ple
        and dtype is None
        and ple_src is not None
        and PLE_KEY in weights
        and PLE_KEY.replace(".weight", ".scales") not in weights
    ):
        map_ple_table(model, weights, ple_src, str(folder))
    if dtype is not None:
        target = DTYPES[dtype]
        weights = {k: _cast(k, v, target) for k, v in weights.items()}
    finish(model, weights, dtype, folder)
    del weights  # the model holds them now; stacking frees each part as it goes (`models/fuse.py`)
    if fuse and ops.stack_projections():
        model.fuse()
    choose_cpu_form(model)
    model.folder = folder  # where processor_config.json (image budget, audio front end) lives
    return model, config


def load_tokenizer(folder: Path, eos_ids=None):
    """mlx-lm's TokenizerWrapper (streaming detokeniser), or None without tokenizer files."""
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        return None
    from mlx_lm.tokenizer_utils import load as load_wrapper

    return load_wrapper(folder, eos_token_ids=eos_ids)


def load(
    path: str | Path,
    dtype: str | None = None,
    map_ple: bool = True,
    text_only: bool = False,
    force: bool = False,
    group=None,
    fuse: bool = True,
):
    """Load `(model, tokenizer)` from a checkpoint folder or hub id.

    tokenizer is None when the folder ships no tokenizer files.
    dtype: None keeps the stored dtype; "float32" (or "bfloat16", "float16") casts.
    map_ple: with dtype None, serve an unquantized per-layer-embedding table from a
        memory map of its safetensors file instead of MLX memory.
    text_only: do not build the vision/audio towers.
    force: load even when the weights need more memory than this machine can give
        (otherwise a one-line LoadError with both numbers).
    group: `mx.distributed.init()` to load this rank's shard (docs/distributed.md).
    fuse: stack projections that share an input (False: the checkpoint's modules).
    """
    folder = resolve_path(str(path))
    model, config = load_model(folder, dtype, map_ple=map_ple, text_only=text_only, force=force, group=group, fuse=fuse)
    model.generation_defaults = read_generation_defaults(folder)  # what a server uses when a request is silent
    return model, load_tokenizer(folder, config.eos_ids or None)


# -- MTP drafters -------------------------------------------------------------

_HEAD = "model.embed_tokens"


def load_drafter(path: str | Path, dtype: str | None = None, target: Model | None = None):
    """Load a `gemma4_assistant` checkpoint (ours or HF) as a `Drafter`.

    target: checked for compatibility (hidden size, vocabulary, window, K/V layout).
    The centroid head's table is stored in `token_ordering` order (docs/speculative.md §5) when
    that is a permutation of the vocabulary.
    """
    folder = resolve_path(str(path))
    cfg_file = folder / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
        cfg = AssistantConfig.from_dict(raw, str(cfg_file))
        if target is not None:
            check_pair(cfg, target.config, str(folder))
    except FileNotFoundError:
        raise LoadError(f"{cfg_file}: not found") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{cfg_file}: not valid JSON ({e})") from None
    except ConfigError as e:
        raise LoadError(str(e)) from None
    if dtype is not None and dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    weights: dict[str, mx.array] = {}
    owners: dict = {}
    for f in weight_files(folder):
        tensors = read_safetensors(f)
        claim_tensors(owners, f, tensors)
        weights.update(sanitize_drafter(tensors))  # the reference ignores its K/V too
    # Trust the tensors, not the config (docs/speculative.md §1): some configs declare centroids
    # that the files do not carry.
    has_centroids = TOKEN_ORDERING_KEY in weights
    if has_centroids != cfg.use_ordered_embeddings:
        log.info("%s: centroid head %s by the tensors present", folder, "enabled" if has_centroids else "disabled")
        cfg.use_ordered_embeddings = has_centroids
    model = Drafter(cfg)
    # A sharded target's drafter follows it; small, so its tensors are cut after a whole read.
    cut_loaded(weights, model.shard(getattr(target, "tp", None)), str(folder))
    drop_tied_head(weights, folder)
    q = quantization_block(raw, str(cfg_file))
    if q is not None:
        apply_quantization(model, weights, q, str(folder))
    if dtype is not None:
        weights = {k: _cast(k, v, DTYPES[dtype]) for k, v in weights.items()}
    if has_centroids:
        order = weights[TOKEN_ORDERING_KEY].astype(mx.int32)
        weights[TOKEN_ORDERING_KEY] = order
        V = cfg.text.vocab_size
        o = np.array(order)
        if o.shape != (V,) or (o.size and (o.min() < 0 or o.max() >= V)):
            raise LoadError(
                f"{folder}: {TOKEN_ORDERING_KEY} must hold {V} token ids in [0, {V}), got shape {tuple(o.shape)}"
            )
        if (np.bincount(o, minlength=V) == 1).all():
            for suffix in (".weight", ".scales", ".biases"):
                if _HEAD + suffix in weights:
                    weights[_HEAD + suffix] = weights[_HEAD + suffix][order]
            model.ordered = True
        else:
            log.warning(
                "%s: %s is not a permutation of the vocabulary; using the slower unordered candidate gather",
                folder,
                TOKEN_ORDERING_KEY,
            )
    finish(model, weights, dtype, folder)
    del weights  # as in load_model: stacking frees each part as it goes
    if ops.stack_projections():
        model.fuse()
    return model
