"""The Metal/CUDA branches of `ops` and `ops_quantized`, run by the CPU test suite (docs/text-decoder.md §6.1).

With `ops.FORCE_GPU_BRANCHES` on (GEMMA4_MLX_FORCE_GPU_BRANCHES=1 in a shell; the
autouse fixture below here) the CPU takes what a GPU takes: fused
`scaled_dot_product_attention` with boolean, padded and image-block masks, the
`sorted` expert path for every multi-token block, `x @ w.T` for few-row linears,
and sorted `gather_qmm` for quantized experts.  A selection of the parity,
rollback, batching, speculative, low-precision, quantized and multimodal tests
runs again here, calling the original test functions with the switch on.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from gemma4_mlx import ops
from gemma4_mlx.cache import build_mask

import test_batch
import test_cache
import test_convert
import test_dtypes
import test_kv_quant
import test_multimodal
import test_parity
import test_speculative
from helpers.checkpoints import W
from helpers.mtp_pairs import PAIRS
from test_convert import converted, tempered  # noqa: F401  (fixtures)
from test_multimodal import inputs  # noqa: F401  (fixture; `case` is narrowed below)


@pytest.fixture(autouse=True)
def gpu_branches(monkeypatch):
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", True)


@pytest.fixture(scope="module", params=["bidir_w16", "causal_shared"])
def case(request, tmp_path_factory):
    """Image blocks clipped by a window shorter than them; causal with KV sharing."""
    return test_multimodal.Case(request.param, tmp_path_factory.mktemp(request.param))


def test_switch_takes_the_gpu_branches(monkeypatch):
    """The switch really changes the decisions (and the fused kernel runs on the CPU)."""
    assert not ops.cpu_branches()
    assert ops.moe_strategy(2 * 8, 2) == "sorted" and ops.moe_strategy(200, 25) == "sorted"
    calls = []
    real = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, kv = mx.ones((1, 2, 3, 8)), mx.ones((1, 1, 5, 8))
    ops.attention(q, kv, kv, build_mask(2, 0, 3, None, None))
    assert calls == [1]
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", False)
    assert ops.cpu_branches() and ops.moe_strategy(200, 25) == "segments"


# -- parity with transformers ------------------------------------------------------
def test_full_forward(loaded):
    test_parity.test_full_forward(loaded)


def test_prefill_then_decode_past_window(loaded):
    test_parity.test_prefill_then_decode_past_window(loaded)


def test_uneven_chunked_prefill(loaded):
    test_parity.test_uneven_chunked_prefill(loaded, (3, 6, 2, 9))


# -- rollback and batching --------------------------------------------------------------
@pytest.mark.parametrize("prompt_len", [W + 1, 3 * W + 2])
def test_draft_trim_decode(loaded, prompt_len):
    test_cache.test_draft_trim_decode(loaded[1], prompt_len, 3)


def test_rollback_after_wrapping(loaded):
    test_cache.test_many_rounds_after_wrapping(loaded[1])


def test_batched_logits_equal_single(loaded):
    test_batch.test_batched_logits_equal_single(loaded[1])


def test_batched_greedy_equals_single(loaded):
    test_batch.test_batched_greedy_equals_single(loaded[1])


# -- speculative decoding (verify blocks: sorted experts, padded fused attention) ---------
@pytest.mark.parametrize("name", list(PAIRS))
def test_speculative_lossless(pairs, name):
    test_speculative.test_cache_after_every_round_equals_plain_prefill(pairs, name)
    test_speculative.test_real_drafter_and_auto_draft_length_are_lossless(pairs, name)


# -- bfloat16 / float16: sorted experts through the CPU's gather_mm fallback, fused SDPA ---------
@pytest.mark.parametrize("dtype", test_dtypes.LOW, ids=["bf16", "f16"])
def test_low_precision_forward(dtype):
    test_dtypes.test_forward_matches_float32(dtype, "moe")


# -- quantized experts: sorted gather_qmm -----------------------------------------------------
@pytest.mark.parametrize("quant", test_convert.QUANTIZED)
def test_quantized_runtime(checkpoints, converted, quant):  # noqa: F811
    test_convert.test_runtime_matches_dequantized_weights(checkpoints, converted, "all", quant)


# -- multimodal: image-block masks in the fused kernel ------------------------------------------
def test_multimodal_logits(case, inputs):  # noqa: F811
    test_multimodal.test_logits_parity(case, inputs)
    test_multimodal.test_end_to_end_parity(case, inputs)


def test_multimodal_chunked_prefill_and_greedy(case, inputs):  # noqa: F811
    test_multimodal.test_chunked_prefill_and_greedy(case, inputs)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d, window", [(256, 8), (512, None), (16, 4)])
def test_quantized_kv_attention(bits, d, window):
    """Long query runs over quantized K/V: blocked quantized products (the CPU
    dequantizes a prefill chunk's keys instead, docs/kv-cache.md §3)."""
    test_kv_quant.test_quantized_attention_equals_dequantized(bits, d, window)


@pytest.mark.parametrize("T", [5, 130])
def test_quantized_kv_split_keys(T):
    test_kv_quant.test_split_key_attention_scores_the_unrotated_dims_from_the_values(8, T)
