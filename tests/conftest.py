"""Session fixtures: the tiny transformers checkpoints (`helpers.checkpoints`) and
MTP drafters (`helpers.mtp_pairs`) every parity test compares against."""

from __future__ import annotations

import gemma4_mlx  # noqa: F401  (loads OpenBLAS before mlx.core)

# isort: split


import pytest

from gemma4_mlx.checkpoint.load import load_drafter, load_model

from helpers.checkpoints import FAMILIES, Reference, build_hf
from helpers.mtp_pairs import PAIRS, hf_drafter


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Reference]:
    root = tmp_path_factory.mktemp("ckpt")
    refs = {}
    for i, name in enumerate(FAMILIES):
        hf = build_hf(name, seed=i)
        path = root / name
        hf.save_pretrained(path)
        refs[name] = Reference(name, path, hf)
    return refs


@pytest.fixture(params=list(FAMILIES))
def ref(request, checkpoints) -> Reference:
    return checkpoints[request.param]


@pytest.fixture(params=list(FAMILIES))
def loaded(request, checkpoints) -> tuple[Reference, object]:
    """Per family: (its reference, our float32 model loaded from it), loaded afresh
    for each test (tests that switch `ops` branches get no model built under another)."""
    ref = checkpoints[request.param]
    return ref, gemma4_mlx.load(ref.path, dtype="float32")[0]


@pytest.fixture(scope="session")
def drafters(tmp_path_factory, checkpoints) -> dict[str, Reference]:
    """One HF-written MTP drafter per target family of `mtp_pairs.PAIRS`."""

    root = tmp_path_factory.mktemp("drafters")
    out = {}
    for i, (name, centroid) in enumerate(PAIRS.items()):
        hf = hf_drafter(name, centroid, seed=100 + i)
        path = root / name
        hf.save_pretrained(path)
        out[name] = Reference(name, path, hf)
    return out


@pytest.fixture(scope="module")
def pairs(checkpoints, drafters):
    """Per target family of `mtp_pairs.PAIRS`: (target, its MTP drafter), float32."""
    out = {}
    for name in PAIRS:
        target, _ = load_model(checkpoints[name].path, "float32")
        out[name] = (target, load_drafter(drafters[name].path, "float32", target=target))
    return out
