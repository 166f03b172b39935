"""Vision and audio encoders of gemma4-mlx vs mlx-vlm 0.7.10's Gemma 4, same weights, same process.

Builds the E2B towers at their real shapes — the small vision tower (hidden 768,
MLP 3072, 16 layers, 12 x 64 heads, patch 16, pooling 3, a 10240-row position
table, clipped linears) with `embed_vision`, and the USM Conformer audio tower
(transformers' `Gemma4AudioConfig` defaults = E2B) with `embed_audio`, text hidden
1536 — with random float32 weights written once as a hub-style checkpoint dict
(`model.*` keys, PyTorch conv layouts).  Each implementation loads that dict through
its own converter (ours: `vision.sanitize` / `audio.sanitize`; mlx-vlm:
`Model.sanitize`), so the conv transposes and the `.linear.` nesting are each
side's own.  Random values: norm weights U(0.5, 1.5) (vision q/k norms
times head_dim^-1/4, see `hub_checkpoint`), clamp scalars finite (+-[5, 10]: they exist
but rarely bind), linears N(0, 0.02), convs N(0, 1/fan_in).

Measured, float32 on the CPU, both under the same BLAS (`import gemma4_mlx` preloads
OpenBLAS before mlx.core loads, for both):

1. agreement: max |ours - mlx-vlm| / max |ours| of the soft tokens in text space
   (vision, each budget; audio, the valid tokens of each clip), and of the two
   front ends' outputs;
2. image encode (tower + embedder) at budgets 70, 280, 1120 of one 768x1024 noise
   image, preprocessed once.  Both towers get the same pixels in each side's own
   input layout: ours the processor's padded patches + position ids, mlx-vlm the
   channel-first image its own processor returns (no padding patches: the fastest
   of its two input paths);
3. preprocessing: our `ImageProcessor` vs mlx-vlm's `Gemma4ImageProcessor` (ours
   also patchifies and pads; mlx-vlm patchifies inside the tower), our `log_mel`
   vs mlx-vlm's `Gemma4AudioFeatureExtractor` on a 30 s clip;
4. audio encode (tower + embedder) of 5 s and 30 s clips, features precomputed.

Times are medians of n interleaved rounds (ours, mlx-vlm, then mlx-vlm, ours, ...)
after w warm-up rounds (FULL_SETUP); ratio = mlx-vlm / ours (> 1: we are faster).
Budget 1120 runs 4 of the 16 vision layers, once (full depth: ~6 min per run here),
and a full-depth estimate is printed next to it.  ~9 min on 2 CPU cores.  Without
mlx-vlm installed only our times are printed.  mlx-vlm pulls heavy dependencies, so
run this from a separate venv (`make bench-media` builds one under bench/_work/).

    make bench-media   # or: python bench/bench_media.py [--quick] [--out bench/RESULTS-media-cpu.txt]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import gemma4_mlx  # noqa: F401  (OpenBLAS first)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image
from report import Report  # bench/report.py (the script's folder is on sys.path)

from gemma4_mlx.config import AudioConfig, VisionConfig
from gemma4_mlx.media.audio import log_mel
from gemma4_mlx.media.image import ImageProcessor
from gemma4_mlx.models import audio as our_audio
from gemma4_mlx.models.audio import AudioModel
from gemma4_mlx.models.vision import VisionModel

try:  # after gemma4_mlx: mlx.core must load after OpenBLAS
    import mlx_vlm
    from mlx_vlm.models.gemma4 import audio as vlm_audio
    from mlx_vlm.models.gemma4 import vision as vlm_vision
    from mlx_vlm.models.gemma4.audio_feature_extractor import Gemma4AudioFeatureExtractor
    from mlx_vlm.models.gemma4.config import AudioConfig as VlmAudioConfig
    from mlx_vlm.models.gemma4.config import VisionConfig as VlmVisionConfig
    from mlx_vlm.models.gemma4.gemma4 import Model as VlmModel
    from mlx_vlm.models.gemma4.gemma4 import MultimodalEmbedder as VlmEmbedder
    from mlx_vlm.models.gemma4.processing_gemma4 import Gemma4ImageProcessor

    VLM_ERROR = None
except ImportError as e:  # degrade: time ours only
    mlx_vlm, VLM_ERROR = None, f"{type(e).__name__}: {e}"

TEXT_HIDDEN = 1536  # E2B
SR = 16000

# runs: (warm-up runs, timed runs) per image budget / clip seconds / front end ("pre").
# depth: budgets timed with only the first k tower layers (full depth at 1120 would take
# ~2 x 6 min here: the attention softmax grows with patches^2); their full-depth time is
# estimated as t(0 layers) + (layers / k) (t(k layers) - t(0 layers)), t(0) measured too.
FULL_SETUP = dict(
    vision_layers=16,
    audio_layers=12,
    budgets=[70, 280, 1120],
    clips=[5, 30],
    runs={70: (1, 5), 280: (1, 3), 1120: (0, 1), 5: (1, 7), 30: (1, 5), "pre": (1, 7)},
    depth={1120: 4},
)
# --quick: real widths, 2 layers per tower, small inputs, few runs: a smoke run of the plumbing
# (280 at 1 of the 2 layers exercises the depth-reduced path).
QUICK_SETUP = dict(
    vision_layers=2,
    audio_layers=2,
    budgets=[70, 280],
    clips=[5, 30],
    runs={70: (1, 3), 280: (0, 1), 5: (1, 3), 30: (1, 2), "pre": (1, 3)},
    depth={280: 1},
)
AGREE_TOL = 1e-3


# --------------------------------------------------------------------------- weights
def hub_checkpoint(ours: nn.Module, seed: int) -> dict[str, mx.array]:
    """Random float32 tensors for every parameter of our module, keyed and laid out as in
    a hub checkpoint: `model.` prefix, PyTorch conv layouts, 0-d clamp scalars."""
    mx.random.seed(seed)
    out = {}
    for key, value in tree_flatten(ours.parameters()):
        shape, leaf = value.shape, key.rsplit(".", 1)[-1]
        if leaf in ("input_min", "output_min", "input_max", "output_max"):
            v = (5 + 5 * mx.random.uniform(shape=shape)) * (-1 if leaf.endswith("min") else 1)
        elif key.endswith(("q_norm.weight", "k_norm.weight")):
            # Vision attention has scale 1.0: unit q/k norms give scores of std ~sqrt(64) = 8
            # and a chaotic random net (any two fp32 runs, transformers' included, then differ
            # by ~5e-3 after 16 layers).  Trained towers learn small q/k norms; as bench_text.py.
            v = (0.5 + mx.random.uniform(shape=shape)) * shape[0] ** -0.25
        elif key.endswith("norm.weight"):
            v = 0.5 + mx.random.uniform(shape=shape)
        elif leaf == "per_dim_scale":
            v = 0.3 * mx.random.normal(shape)
        elif key.endswith("conv.weight") or key.endswith("depthwise_conv1d.weight"):
            fan_in = value.size // shape[0]
            v = mx.random.normal(shape) * fan_in**-0.5
            # ours are MLX layouts; the hub stores PyTorch ones
            v = v.transpose(0, 3, 1, 2) if v.ndim == 4 else v.transpose(0, 2, 1)
        elif value.size > 1 << 20:  # uniform with the same std: faster to draw
            v = (0.02 * 3**0.5) * (2 * mx.random.uniform(shape=shape) - 1)
        else:
            v = 0.02 * mx.random.normal(shape)
        v = v.astype(mx.float32)
        mx.eval(v)
        out["model." + key] = v
    return out


def build_ours(layers_v: int, layers_a: int, seed: int):
    vcfg = VisionConfig(num_hidden_layers=layers_v, use_clipped_linears=True)
    vision = VisionModel(vcfg, TEXT_HIDDEN)
    acfg = AudioConfig(num_hidden_layers=layers_a)
    audio = AudioModel(acfg, TEXT_HIDDEN)
    ckpt = {**hub_checkpoint(vision, seed), **hub_checkpoint(audio, seed + 1)}
    # our converters: vision.sanitize / audio.sanitize
    vision.load_weights(list(vision.sanitize(ckpt).items()), strict=True)
    audio.load_weights(list(our_audio.sanitize(ckpt).items()), strict=True)
    mx.eval(vision.parameters(), audio.parameters())
    return vision, audio, ckpt


class VlmMedia(nn.Module):
    """mlx-vlm's four multimodal modules under the attribute names of its `Model`, without
    its language model (its `Model.__init__` would build the whole E2B decoder)."""

    def __init__(self, vcfg, acfg):
        super().__init__()
        self.vision_tower = vlm_vision.VisionModel(vcfg)
        self.embed_vision = VlmEmbedder(vcfg.hidden_size, TEXT_HIDDEN, vcfg.rms_norm_eps)
        self.audio_tower = vlm_audio.AudioEncoder(acfg)
        self.embed_audio = VlmEmbedder(acfg.output_proj_dims, TEXT_HIDDEN, acfg.rms_norm_eps)


def build_theirs(layers_v: int, layers_a: int, ckpt: dict[str, mx.array]) -> VlmMedia:
    vcfg = VlmVisionConfig(num_hidden_layers=layers_v, use_clipped_linears=True, default_output_length=280)
    acfg = VlmAudioConfig(num_hidden_layers=layers_a)
    media = VlmMedia(vcfg, acfg)
    # mlx-vlm's own converter, called on a stand-in `self` with the fields it reads
    shim = SimpleNamespace(
        config=SimpleNamespace(vision_config=vcfg, audio_config=acfg, text_config=None), audio_tower=media.audio_tower
    )
    weights = VlmModel.sanitize(shim, ckpt)
    media.load_weights(list(weights.items()), strict=True)
    mx.eval(media.parameters())
    return media


# --------------------------------------------------------------------------- timing
def run_eval(fn):
    out = fn()
    mx.eval(out)
    return out


def interleaved(fa, fb, runs: tuple[int, int]):
    """warm + n rounds, alternating which of the two goes first; the first `warm` rounds
    are discarded.  -> (median ms of fa, of fb or None, (first output of fa, of fb))."""
    warm, n = runs
    times, outs = ([], []), [None, None]
    for i in range(warm + n):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            fn = (fa, fb)[j]
            if fn is None:
                continue
            t = time.perf_counter()
            out = run_eval(fn)
            times[j].append(1e3 * (time.perf_counter() - t))
            if outs[j] is None:
                outs[j] = out
    return (statistics.median(times[0][warm:]), statistics.median(times[1][warm:]) if fb else None, tuple(outs))


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def to_channel_first(pixels: np.ndarray, size: tuple[int, int], p: int = 16) -> np.ndarray:
    """Our padded patch rows of one image -> the (1, 3, H, W) image mlx-vlm's processor returns."""
    h, w = size
    ph, pw = h // p, w // p
    patches = pixels[: ph * pw].reshape(ph, pw, p, p, 3)  # (patch row, col, pixel row, col, channel)
    return patches.transpose(4, 0, 2, 1, 3).reshape(1, 3, h, w)


@contextmanager
def tower_depth(vision, theirs, k: int):
    """Run both vision towers on their first k encoder layers only."""
    ours_all = vision.vision_tower.encoder.layers
    theirs_all = theirs.vision_tower.encoder.layers if theirs is not None else None
    vision.vision_tower.encoder.layers = ours_all[:k]
    if theirs is not None:
        theirs.vision_tower.encoder.layers = theirs_all[:k]
    try:
        yield
    finally:
        vision.vision_tower.encoder.layers = ours_all
        if theirs is not None:
            theirs.vision_tower.encoder.layers = theirs_all


def fmt_ms(t) -> str:
    return "-" if t is None else f"{t:.1f}" if t < 1000 else f"{t:.0f}"


# --------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers per tower, small inputs: a ~1 min smoke run")
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args()
    setup = QUICK_SETUP if args.quick else FULL_SETUP
    runs = setup["runs"]
    log = Report(args.out)
    t_start = time.perf_counter()
    have_vlm = mlx_vlm is not None

    log(f"gemma4-mlx media encoders vs mlx-vlm{' (--quick)' if args.quick else ''}")
    log(f"started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    log(
        f"mlx {mx.__version__}, mlx-vlm {mlx_vlm.__version__ if have_vlm else '-'}, device "
        f"{mx.default_device()}, BLAS {gemma4_mlx._blas.describe()}"
        f"{' (one for both: loaded before mlx.core)' if have_vlm else ''}, float32, {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), python {sys.version.split()[0]}"
    )
    if not have_vlm:
        log(f"mlx-vlm not importable ({VLM_ERROR}): timing ours only (pip install mlx-vlm==0.7.10)")
    log(f"load average at start {os.getloadavg()[0]:.2f} (compare with the end)")
    log(
        f"E2B towers: vision hidden 768, MLP 3072, {setup['vision_layers']} layers, 12x64 heads, patch 16, "
        f"pool 3, clipped linears; audio Conformer hidden 1024, {setup['audio_layers']} layers, 8 heads, "
        f"chunk 12 / left 13; embedders -> text hidden {TEXT_HIDDEN}"
        + (" (--quick: depth reduced, times not comparable with a full run)" if args.quick else "")
    )
    log(
        "random float32 weights, one hub-style dict loaded through each side's own sanitize; "
        "runs w+n: w warm-up rounds (not counted), then the median of n timed rounds, ours and mlx-vlm "
        "interleaved, alternating which goes first; "
        "ratio = mlx-vlm / ours (> 1: we are faster)"
    )

    log(
        "image inputs, same pixels: ours the processor's padded patches + position ids (padding dropped "
        "inside), mlx-vlm the channel-first image its own processor returns (no padding patches); audio: the "
        "same log-mel features and frame mask (mlx-vlm's tower takes the inverted mask)"
    )
    t0 = time.perf_counter()
    vision, audio, ckpt = build_ours(setup["vision_layers"], setup["audio_layers"], seed=0)
    theirs = build_theirs(setup["vision_layers"], setup["audio_layers"], ckpt) if have_vlm else None
    n_v = sum(v.size for _, v in tree_flatten(vision.parameters()))
    n_a = sum(v.size for _, v in tree_flatten(audio.parameters()))
    log(
        f"params: vision + embedder {n_v / 1e6:.1f} M, audio + embedder {n_a / 1e6:.1f} M (shared by both "
        f"implementations); built in {time.perf_counter() - t0:.1f} s"
    )
    del ckpt
    log("")

    rows, agree = [], []  # rows: (what, ours ms, theirs ms, N, note)

    # ------------------------------------------------------------------ images
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    vlm_proc = Gemma4ImageProcessor() if have_vlm else None
    for budget in setup["budgets"]:
        proc = ImageProcessor(budget)
        batch = proc(image)
        size, count = batch.sizes[0], batch.num_soft_tokens[0]
        patches = size[0] * size[1] // 256
        n = runs["pre"]
        fa = lambda: proc(image).pixel_values  # noqa: E731
        fb = (lambda: vlm_proc(image, max_soft_tokens=budget)[0]["pixel_values"]) if have_vlm else None  # noqa: E731
        ta, tb, (pa, pb) = interleaved(fa, fb, runs["pre"])
        rows.append(
            (
                f"image preprocess {budget:>4} (768x1024 -> {size[0]}x{size[1]})",
                ta,
                tb,
                n,
                "ours: resize+rescale+patchify+pad; mlx-vlm: resize+rescale",
            )
        )
        if have_vlm:
            agree.append((f"image preprocess {budget}: pixels", rel_diff(to_channel_first(pa[0], size), pb)))

        pixels = mx.array(batch.pixel_values)
        pos = batch.position_ids
        pixels_cf = mx.array(to_channel_first(batch.pixel_values[0], size))
        mx.eval(pixels, pixels_cf)
        fa = lambda: vision(pixels, pos)[0]  # noqa: E731
        fb = (lambda: theirs.embed_vision(theirs.vision_tower(pixels_cf))) if have_vlm else None  # noqa: E731
        what = f"image encode {budget:>4} ({count} tokens, {patches} patches)"
        k = setup["depth"].get(budget)
        if k is None:
            ta, tb, (oa, ob) = interleaved(fa, fb, runs[budget])
            rows.append((what, ta, tb, runs[budget], "tower + embed_vision"))
        else:
            layers = setup["vision_layers"]
            with tower_depth(vision, theirs, 0):
                t0a, t0b, _ = interleaved(fa, fb, (1, 3))
            with tower_depth(vision, theirs, k):
                ta, tb, (oa, ob) = interleaved(fa, fb, runs[budget])
            rows.append(
                (
                    what.replace("image encode", f"image encode, {k} of {layers} layers"),
                    ta,
                    tb,
                    runs[budget],
                    "tower + embed_vision, depth reduced (time)",
                )
            )
            est = [t0 + layers / k * (t - t0) if t is not None else None for t, t0 in ((ta, t0a), (tb, t0b))]
            rows.append(
                (
                    what.replace("image encode", "image encode, est."),
                    est[0],
                    est[1],
                    runs[budget],
                    f"estimate t0 + {layers}/{k} (t{k} - t0); t0 = 0 layers: {fmt_ms(t0a)} / {fmt_ms(t0b)} ms",
                )
            )
        if have_vlm:
            depth = f", {k} layers" if k is not None else ""
            agree.append((f"vision soft tokens, budget {budget}{depth} ({count} x {TEXT_HIDDEN})", rel_diff(oa, ob[0])))
        del oa, ob
        mx.clear_cache()
        log(f"  image budget {budget}: done ({time.perf_counter() - t_start:.0f} s)")

    # ------------------------------------------------------------------ audio
    wave30 = (0.1 * rng.standard_normal(30 * SR)).astype(np.float32)
    fe = Gemma4AudioFeatureExtractor() if have_vlm else None
    n = runs["pre"]
    fa = lambda: log_mel([wave30])[0]  # noqa: E731
    fb = (lambda: fe(wave30)["input_features"][0]) if have_vlm else None  # noqa: E731
    ta, tb, (fa_out, fb_out) = interleaved(fa, fb, runs["pre"])
    rows.append(("log-mel 30 s (2999 frames x 128)", ta, tb, n, "ours: log_mel; mlx-vlm: Gemma4AudioFeatureExtractor"))
    if have_vlm:
        agree.append(("log-mel features, 30 s", rel_diff(fa_out[0], fb_out)))

    for secs in setup["clips"]:
        feats, mask = log_mel([wave30[: secs * SR]])
        f_mx, m_mx = mx.array(feats), mx.array(mask)
        n = runs[secs]
        fa = lambda: audio(f_mx, m_mx)[0]  # noqa: E731
        fb = (lambda: theirs.embed_audio(theirs.audio_tower(f_mx, ~m_mx)[0])) if have_vlm else None  # noqa: E731
        ta, tb, (oa, ob) = interleaved(fa, fb, runs[secs])
        valid = np.asarray(mask[0, ::2][::2])
        rows.append(
            (
                f"audio encode {secs:>2} s ({feats.shape[1]} frames -> {int(valid.sum())} tokens)",
                ta,
                tb,
                n,
                "tower + embed_audio",
            )
        )
        if have_vlm:
            agree.append(
                (
                    f"audio soft tokens, {secs} s ({int(valid.sum())} x {TEXT_HIDDEN})",
                    rel_diff(np.asarray(oa)[0][valid], np.asarray(ob)[0][valid]),
                )
            )
        mx.clear_cache()
        log(f"  audio {secs} s: done ({time.perf_counter() - t_start:.0f} s)")

    # ------------------------------------------------------------------ report
    log("")
    w = max(len(r[0]) for r in rows)
    log(f"{'what':<{w}} | {'ours ms':>8} {'mlx-vlm ms':>10} {'ratio':>6} | {'runs':>4} | notes")
    log("-" * (w + 36) + "-" * max(len(r[4]) for r in rows))
    slower = []
    for what, ta, tb, n, note in rows:
        ratio = f"{tb / ta:.2f}" if tb else "-"
        log(f"{what:<{w}} | {fmt_ms(ta):>8} {fmt_ms(tb):>10} {ratio:>6} | {f'{n[0]}+{n[1]}':>4} | {note}")
        if tb and tb / ta < 0.8:
            slower.append(what.strip())
    if have_vlm:
        log("")
        log(f"agreement, max |ours - mlx-vlm| / max |ours| (fp32, tolerance {AGREE_TOL:g}):")
        ok, w = True, max(len(a[0]) for a in agree)
        for what, d in agree:
            ok &= d <= AGREE_TOL
            log(f"  {what:<{w}} {d:.2e}  {'ok' if d <= AGREE_TOL else 'DIFFERS'}")
        log(
            f"all outputs agree: {ok}"
            + (f"; we are notably slower (ratio < 0.8) on: {', '.join(slower)}" if slower else "")
        )
    log("")
    log(f"total {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
