"""Encode one weight tensor in a `Format`: the arrays to store and what happened.

Every function takes an MLX array [..., out, in] (lazy, memory-mapped from the source
shard) and returns ({suffix: array}, info).  Suffixes are appended to the module path:
"weight", "scales", "biases", "tensor_scale".  The numpy codecs (Q4_0, SFP8) work on
row chunks so their fp32 temporaries stay bounded whatever the tensor size.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import numpy as np

from gemma4_mlx.checkpoint.files import DTYPES
from gemma4_mlx.formats import q4_0, sfp8
from gemma4_mlx.formats.registry import FORMATS

from .policy import Format

CHUNK = 1 << 20  # elements per step: bounds the codecs' temporaries (4 MB of fp32 input)
LATTICE_MIN = 0.99  # docs/quantization.md §4.3: below this a tensor was not trained for Q4_0
# docs/quantization.md §2.4: the mxfp8 form must reproduce the SFP8 values.  Judged per element: a
# group spanning too many binades loses only its tiniest elements (relative to the
# group's max), and on small tensors one such group is already > 1% of the groups.
SFP8_MIN_EXACT = 0.995

log = logging.getLogger(__name__)


class CodecError(ValueError):
    pass


def _rows(w: mx.array):
    """Yield (start, stop, float32 numpy chunk) over the rows of w viewed as [R, K]."""
    K = w.shape[-1]
    flat = w.reshape(-1, K)
    step = max(1, CHUNK // K)
    for a in range(0, flat.shape[0], step):
        b = min(flat.shape[0], a + step)
        yield a, b, np.array(flat[a:b].astype(mx.float32))


def _check_finite(w: mx.array) -> None:
    # By row chunks: a whole-tensor isfinite held ~1.5x the tensor in temporaries
    # (+4.2 GB on the 31B embedding, bench/RESULTS-memory-cpu.txt).
    flat = w.reshape(-1, w.shape[-1])
    step = max(1, CHUNK // w.shape[-1])
    for a in range(0, flat.shape[0], step):
        if not mx.all(mx.isfinite(flat[a : a + step])).item():
            raise CodecError("contains NaN or Inf")


def encode(w: mx.array, fmt: Format) -> tuple[dict[str, mx.array], dict]:
    if not fmt.quantized:
        return {"weight": w.astype(DTYPES[fmt.dtype]) if fmt.dtype else w}, {}
    _check_finite(w)
    if FORMATS[fmt.kind].encode is mx.quantize:  # MLX's own formats
        return _mx_quantize(w, fmt), {"provenance": "ptq"}
    return _OWN_CODECS[fmt.kind](w)


def _mx_quantize(w: mx.array, fmt: Format) -> dict[str, mx.array]:
    """mx.quantize by row chunks, each evaluated at once: on the CPU a whole-tensor
    quantize keeps many fp32 temporaries alive (nvfp4: ~40x the bf16 input)."""
    K, parts = w.shape[-1], []
    flat = w.reshape(-1, K)
    step = max(1, CHUNK // K)
    for a in range(0, flat.shape[0], step):
        part = mx.quantize(flat[a : a + step], fmt.group_size, fmt.bits, mode=fmt.mode)
        mx.eval(part)
        parts.append(part)
    names = ("weight", "scales", "biases")
    return {
        n: mx.concatenate([p[i] for p in parts]).reshape(*w.shape[:-1], -1)
        for i, n in enumerate(names[: len(parts[0])])
    }


def _q4_0(w: mx.array):
    """ggml Q4_0 as MLX affine g32 (scales = d; biases = -8d are not stored).

    First pass: recover the lattice block by block (docs/quantization.md §4.3).  A tensor with
    >= LATTICE_MIN exact blocks was trained for Q4_0 and keeps the recovered codes;
    otherwise it is quantized with ggml's reference rule (fp16 d).
    """
    arrays, info = _recover_q4_0(w)
    if arrays is not None:
        return arrays, info
    frac = info["lattice_exact"]
    info["provenance"] = "ptq-ggml"
    if frac > 0.05:  # partly on a lattice: QAT for another grid, or a damaged tensor
        info["warning"] = f"only {frac:.1%} of blocks on the Q4_0 lattice; re-quantized"
        log.warning("q4_0: %s", info["warning"])
    words, scales = [], []
    for _, _, x in _rows(w):
        d, q = q4_0.quantize(x)
        if not np.isfinite(d).all():  # ggml's fp16 d overflows too: every weight of the block would be inf
            raise CodecError("has values beyond Q4_0's range (|w| up to 524,032: fp16 scales); keep it in q8 or bf16")
        wq, s, _ = q4_0.to_mlx_affine(d, q, "float16")  # ggml's d is fp16 by definition
        words.append(wq)
        scales.append(s)
    return _q4_0_arrays(w.shape, words, mx.concatenate(scales), info), info


def q4_0_lattice(w: mx.array) -> tuple[dict[str, mx.array] | None, dict]:
    """(Q4_0 arrays, info) if `w` lies on the Q4_0 lattice (a QAT tensor), else (None,
    info), without spending a ggml re-quantization pass on it."""
    _check_finite(w)
    return _recover_q4_0(w)


def _recover_q4_0(w: mx.array) -> tuple[dict[str, mx.array] | None, dict]:
    """The lattice pass: (arrays, info) when >= LATTICE_MIN of the blocks are exact,
    else (None, info with the exact fraction)."""
    words, scales, exact, total, fits16 = [], [], 0, 0, True
    for _, _, x in _rows(w):
        lat = q4_0.recover_lattice(x, storage=_storage(w))
        wq, s, _ = lat.to_mlx_affine("float32")
        words.append(wq)
        scales.append(s)
        exact += int(lat.exact.sum())
        total += lat.exact.size
        fits16 &= lat.d_fits_fp16
    frac = exact / total if total else 1.0
    info = {"lattice_exact": round(frac, 6)}
    if frac < LATTICE_MIN:
        return None, info
    info["provenance"] = "qat-lattice"
    s = mx.concatenate(scales)
    # fp16 when every d (and its bias -8d) is exact in it (half the metadata), else fp32;
    # never bf16 (docs/quantization.md §3.3).
    fits16 = fits16 and q4_0.bias_fits_fp16(s)
    return _q4_0_arrays(w.shape, words, s.astype(mx.float16) if fits16 else s, info), info


def _q4_0_arrays(shape, words, s, info) -> dict[str, mx.array]:
    info["scale_dtype"] = str(s.dtype).replace("mlx.core.", "")
    info["biases"] = "derived at load: -8 * scales"
    wq = mx.concatenate(words)
    return {"weight": wq.reshape(*shape[:-1], -1), "scales": s.reshape(*shape[:-1], -1)}


def _storage(w: mx.array) -> str:
    dt = str(w.dtype).replace("mlx.core.", "")
    return dt if dt in ("bfloat16", "float16") else "float32"


def _sfp8(w: mx.array):
    """SFP8 codes transcoded to mxfp8, plus the fp32 per-tensor scale (docs/quantization.md §2.4 b)."""
    shape = w.shape
    amax = np.float32(mx.abs(w).max().astype(mx.float32).item())
    s = sfp8.tensor_scale(np.array([amax], np.float32))  # the whole tensor's scale
    inv = np.float32(1.0 / np.float64(np.float32(s)))
    words, scales, good, groups, elems = [], [], 0.0, 0, 0.0
    for _, _, x in _rows(w):
        if s != 1.0:
            # Scale exactly as sfp8.encode does for the whole tensor, so chunking
            # does not change a single code.
            x = np.copysign(np.minimum(np.float32(sfp8.MAX), np.abs(x * inv)), x).astype(np.float32)
        codes, s_chunk = sfp8.encode(x)
        assert s_chunk == 1.0
        m = sfp8.to_mxfp8(codes, s)
        n = codes.size // sfp8.GROUP
        good += m.exact_groups * n
        groups += n
        elems += m.exact_elements * codes.size
        words.append(m.w_q)
        scales.append(m.scales)
    frac = good / groups if groups else 1.0
    efrac = elems / (groups * sfp8.GROUP) if groups else 1.0
    if efrac < SFP8_MIN_EXACT:
        raise CodecError(f"only {efrac:.2%} of mxfp8 elements reproduce the SFP8 values (minimum {SFP8_MIN_EXACT:.1%})")
    out = {
        "weight": mx.concatenate(words).reshape(*shape[:-1], -1),
        "scales": mx.concatenate(scales).reshape(*shape[:-1], -1),
        "tensor_scale": mx.array([s], mx.float32),
    }
    return out, {
        "provenance": "ptq-sfp8",
        "tensor_scale": float(s),
        "mxfp8_exact_groups": round(frac, 6),
        "mxfp8_exact_elements": round(efrac, 6),
    }


# Formats with a codec of our own (formats/q4_0.py, formats/sfp8.py), run by row chunks.
_OWN_CODECS = {"q4_0": _q4_0, "sfp8": _sfp8}
