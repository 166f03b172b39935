"""The parity, speculative, low-precision, multimodal and audio tests again, with
`cpu_exp`'s kernels at every row length (`ops.CPU_EXP_MIN_ROW` 0), so that the tiny
test models go through them everywhere (docs/text-decoder.md §6.5)."""

from __future__ import annotations

import pytest

from gemma4_mlx import ops
from gemma4_mlx.checkpoint.load import load_model

import test_audio
import test_dtypes
import test_multimodal
import test_parity
import test_speculative
from helpers.mtp_pairs import PAIRS
from test_audio import ckpt  # noqa: F401  (fixture)
from test_multimodal import inputs  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not ops.CPU_EXP_PLATFORM, reason="cpu_exp is taken on x86-64 Linux only")


@pytest.fixture
def everywhere(monkeypatch):
    monkeypatch.setattr(ops, "CPU_EXP_MIN_ROW", 0)


def test_full_forward(everywhere, loaded):
    test_parity.test_full_forward(loaded)


def test_prefill_then_decode_past_window(everywhere, loaded):
    test_parity.test_prefill_then_decode_past_window(loaded)


def test_greedy_64_tokens_identical(everywhere, loaded):
    test_parity.test_greedy_64_tokens_identical(loaded)


@pytest.mark.parametrize("name", list(PAIRS))
def test_speculative_lossless(everywhere, pairs, name):
    test_speculative.test_real_drafter_and_auto_draft_length_are_lossless(pairs, name)


@pytest.mark.parametrize("dtype", test_dtypes.LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("family", ["dense", "moe"])
def test_low_precision_forward(everywhere, dtype, family):
    test_dtypes.test_forward_matches_float32(dtype, family)


@pytest.fixture(scope="module", params=["bidir_w16"])
def case(request, tmp_path_factory):
    return test_multimodal.Case(request.param, tmp_path_factory.mktemp(request.param))


def test_multimodal_logits(everywhere, case, inputs):  # noqa: F811
    test_multimodal.test_logits_parity(case, inputs)


def test_audio_tower(everywhere, ckpt):  # noqa: F811
    test_audio.test_padded_batch_parity(ckpt, load_model(ckpt[1], dtype="float32")[0].audio)
