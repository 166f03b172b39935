"""Recipes and the precision policy: which format each tensor gets (docs/quantization.md §1, §6).

A tensor is classified by its module path (our module tree, after `checkpoint.keys.sanitize`):

  class           modules                                        keep_high_precision=True
  embedding       embed_tokens (also the tied LM head)           8-bit affine g64 (docs/quantization.md §6, §7);
                                                                 q4_0 recipe: Q4_0 when every
                                                                 block is on the QAT lattice
  ple_table       embed_tokens_per_layer                         high precision
  ple_projection  per_layer_model_projection, per_layer_input_   high precision
                  gate, per_layer_projection
  router          router.proj                                    high precision
  experts         experts.{gate,up,down}_proj                    the recipe
  linear          every other *_proj                             the recipe
  drafter_projection  {pre,post}_projection (drafter)            high precision
  centroids       masked_embedding.centroids (drafter)           high precision
  (norms, layer_scalar, router.scale / per_expert_scale are not matmul weights: always
   high precision, never quantized; the drafter's token_ordering is an index array,
   copied as is)

Vision and audio towers (module paths `vision.*`, `audio.*`):

  class             modules                                      default; keep_high_precision=False
  tower_linear      the encoders' clipped linears (`*.linear`):  high precision; the recipe
                    attention, MLP / feed-forward, lconv1d
  tower_projection  patch_embedder.input_proj, subsample_conv_   high precision; high precision
                    projection.input_proj_linear, relative_k_
                    proj, output_proj
  embedder          embed_vision / embed_audio                   high precision; high precision
                    .embedding_projection
  (conv weights, position_embedding_table, per_dim_scale, std_bias / std_scale,
   output_proj.bias and norms: never quantized; the clamp scalars `*.input_min`,
   `*.input_max`, `*.output_min`, `*.output_max` are float32 0-d for every recipe,
   bf16 / fp16 included: docs/multimodal.md §6.3)

Quantized towers are a known source of image-quality regressions elsewhere (mlx-vlm
#905, LM Studio #2265) and the E2B towers already look QAT-quantized (see
docs/quantization.md §6), so they stay high precision unless asked.  The embedders stay
high precision always (docs/quantization.md §6: embedders stay in high
precision); so do the towers' boundary projections: small, at the towers' input and
output, and two cannot run quantized in our modules (relative_k_proj casts its
position table to the weight's dtype; output_proj has a bias, the quantized
module none).

An MTP drafter (docs/speculative.md §13) is dominated by its tied head `embed_tokens`
(262144 x 1024 on 26B/31B): it and the layers' linears follow the embedding and
linear rules.  Its projections carry the target's hidden state into and out of
every draft step and the centroid scorer picks which vocabulary clusters are
scored at all; both are small, so they stay high precision.

keep_high_precision=False puts every other class on the recipe (logged: docs/quantization.md §6 calls a
4-bit PTQ PLE table catastrophic).  High precision means the source dtype for
quantized recipes and the recipe's dtype for bf16 / fp16.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from gemma4_mlx.formats.registry import FORMATS, get


@dataclass(frozen=True)
class Format:
    """How one weight is stored: a format of `gemma4_mlx.formats.registry` (kind) with
    the bits and group size this tensor uses."""

    kind: str
    bits: int = 16
    group_size: int = 0
    dtype: str | None = None  # float kinds: target dtype (None = as stored)

    def __post_init__(self):
        get(self.kind)  # ValueError for a format the registry does not know

    @property
    def mode(self) -> str | None:
        return FORMATS[self.kind].mode

    @property
    def quantized(self) -> bool:
        return FORMATS[self.kind].quantized

    def entry(self) -> dict:
        d = {"format": self.kind}
        if self.quantized:
            d.update(mode=self.mode, bits=self.bits, group_size=self.group_size)
        else:
            d["dtype"] = self.dtype or "as stored"
        return d


def _quantized(kind: str, bits: int | None = None) -> Format:
    """A quantized recipe: the format's bits (affine: `bits`) and its default group size."""
    k = FORMATS[kind].kernel(bits)
    return Format(kind, k["bits"], k["group_size"])


Q8 = _quantized("affine", 8)
RECIPES: dict[str, Format] = {
    "bf16": Format("float", dtype="bfloat16"),
    "fp16": Format("float", dtype="float16"),
    "q8": Q8,  # default 8-bit (docs/quantization.md §2.3: 0.85% error vs SFP8's 2.7%)
    "q4": _quantized("affine", 4),
    "mxfp4": _quantized("mxfp4"),
    "nvfp4": _quantized("nvfp4"),
    "q4_0": _quantized("q4_0"),
    "sfp8": _quantized("sfp8"),
}

_CLASSES = (
    # towers first: their `input_proj` / `*_k_proj` / `output_proj` also end in _proj
    ("embedder", re.compile(r"^(vision\.embed_vision|audio\.embed_audio)\.embedding_projection$")),
    ("tower_linear", re.compile(r"^(vision|audio)\..*\.linear$")),
    (
        "tower_projection",
        re.compile(
            r"^(vision\.vision_tower\.patch_embedder\.input_proj|"
            r"audio\.audio_tower\.(subsample_conv_projection\.input_proj_linear|"
            r"layers\.\d+\.self_attn\.relative_k_proj|output_proj))$"
        ),
    ),
    ("embedding", re.compile(r"^model\.embed_tokens$")),
    ("ple_table", re.compile(r"^model\.embed_tokens_per_layer$")),
    (
        "ple_projection",
        re.compile(
            r"(^model\.per_layer_model_projection|\.per_layer_input_gate|"
            r"\.per_layer_projection)$"
        ),
    ),
    ("router", re.compile(r"\.router\.proj$")),
    ("drafter_projection", re.compile(r"^(pre|post)_projection$")),
    ("centroids", re.compile(r"^masked_embedding\.centroids$")),
    ("experts", re.compile(r"\.experts\.(gate|up|down)_proj$")),
    ("linear", re.compile(r"_proj$")),
)
HIGH_PRECISION_CLASSES = ("ple_table", "ple_projection", "router", "drafter_projection", "centroids", "tower_linear")
# High precision even with keep_high_precision=False.
ALWAYS_HIGH_PRECISION = ("embedder", "tower_projection")
TOWER_CLASSES = ("tower_linear", "tower_projection", "embedder")
# The classes each kind of checkpoint has (what config.json's policy lists).
DRAFTER_CLASSES = ("embedding", "linear", "drafter_projection", "centroids")
TARGET_CLASSES = tuple(c for c, _ in _CLASSES if c not in ("drafter_projection", "centroids") + TOWER_CLASSES)
_DRAFTER_NOTE = (
    "drafter: pre_projection / post_projection carry the target hidden state "
    "and the centroid scorer selects the scored clusters; both are small and "
    "stay high precision unless keep_high_precision is false"
)


def classify(module_path: str) -> str:
    for name, rx in _CLASSES:
        if rx.search(module_path):
            return name
    return "other"


@dataclass(frozen=True)
class Policy:
    recipe: str
    keep_high_precision: bool = True

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"quant {self.recipe!r}: expected one of {', '.join(RECIPES)}")

    @property
    def base(self) -> Format:
        return RECIPES[self.recipe]

    def for_class(self, cls: str) -> Format:
        base = self.base
        if not base.quantized or cls == "other":
            return Format("float", dtype=base.dtype)
        if cls in ALWAYS_HIGH_PRECISION:
            return Format("float")
        if not self.keep_high_precision:
            return base
        if cls in HIGH_PRECISION_CLASSES:
            return Format("float")
        if cls == "embedding":
            return Q8
        return base

    def qat_embedding(self, cls: str) -> bool:
        """Try Q4_0 for the token embedding first (kept only if it is on the QAT lattice)."""
        return cls == "embedding" and self.recipe == "q4_0" and self.keep_high_precision

    def for_tensor(self, module_path: str, in_features: int) -> tuple[Format, str | None]:
        """Format for a weight with `in_features` along its grouped (last) axis, and a
        note when the group size had to change or the tensor stays unquantized."""
        cls = classify(module_path)
        fmt = self.for_class(cls)
        if not fmt.quantized:
            return fmt, None
        for g in FORMATS[fmt.kind].groups:  # preferred first
            if in_features % g == 0:
                if g == fmt.group_size:
                    return fmt, None
                return replace(fmt, group_size=g), f"group size {g}: {in_features} inputs"
        return (
            Format("float"),
            f"kept high precision: {in_features} inputs not divisible by group size {fmt.group_size}",
        )

    def describe(self, drafter: bool = False, towers: bool = False) -> dict:
        """The policy as recorded in config.json (of a target, or an MTP drafter);
        towers: the checkpoint has a vision and/or audio tower."""
        names = DRAFTER_CLASSES if drafter else TARGET_CLASSES + (TOWER_CLASSES if towers else ())
        classes = {c: self.for_class(c).entry() for c in names}
        classes["norms_and_scalars"] = Format("float", dtype=self.base.dtype).entry()
        if self.qat_embedding("embedding"):
            classes["embedding"]["if_on_qat_lattice"] = RECIPES["q4_0"].entry()
        if towers:  # whatever the recipe: part of the math, 4 bytes each
            classes["clamp_scalars"] = Format("float", dtype="float32").entry()
        out = {
            "recipe": self.recipe,
            "keep_high_precision": self.keep_high_precision,
            "base": asdict(self.base),
            "classes": classes,
        }
        if drafter:
            out["note"] = _DRAFTER_NOTE
        return out
