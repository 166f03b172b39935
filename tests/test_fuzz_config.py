"""Hostile config.json files (docs/hardening.md §4): wrong JSON types, missing and extra
keys end in one `LoadError` line naming config.json, or load with the documented
defaults; never a TypeError / AttributeError traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

import gemma4_mlx
from gemma4_mlx.checkpoint.files import LoadError
from gemma4_mlx.config import ConfigError, parse_config

from helpers.fuzz import fuzz_settings, one_line

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.sampled_from([0, -1, 1, 2, 3, 7])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.sampled_from(["sliding_attention", "full_attention", "gemma4", "vision"]),
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.sampled_from(["0", "1"]), kids, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def mutated_config(draw, base: dict) -> dict:
    cfg = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        where = cfg if draw(st.booleans()) or not isinstance(cfg.get("text_config"), dict) else cfg["text_config"]
        op = draw(st.sampled_from(["set", "drop", "add"]))
        keys = sorted(where)
        if op == "set" and keys:
            where[draw(st.sampled_from(keys))] = draw(json_values)
        elif op == "drop" and keys:
            where.pop(draw(st.sampled_from(keys)))
        else:
            where[draw(st.text(max_size=8))] = draw(json_values)
    return cfg


@pytest.fixture(scope="module")
def dense_config(checkpoints) -> dict:
    return json.loads((checkpoints["dense"].path / "config.json").read_text())


@given(data=st.data())
@fuzz_settings(150)
def test_fuzz_parse_config(dense_config, data):
    cfg = data.draw(mutated_config(dense_config))
    try:
        parse_config(cfg, "config.json")
    except ConfigError as e:
        assert one_line(str(e)) and str(e).startswith("config.json"), str(e)


@given(data=st.data())
@fuzz_settings(25)
def test_fuzz_load_with_mutated_config(checkpoints, tmp_path_factory, dense_config, data):
    cfg = data.draw(mutated_config(dense_config))
    d = tmp_path_factory.mktemp("cfg") / "dense"
    shutil.copytree(checkpoints["dense"].path, d)
    (d / "config.json").write_text(json.dumps(cfg))
    try:
        gemma4_mlx.load(d, dtype="float32")
    except LoadError as e:
        assert one_line(str(e)), str(e)


@pytest.mark.parametrize(
    "raw",
    [b"[1, 2]", b'"gemma4"', b"\xff\xfe\x00", b"null", b'{"model_type": 7}', b'{"model_type": ["gemma4"]}'],
)
def test_not_a_config_object(checkpoints, tmp_path, raw):
    d = tmp_path / "dense"
    shutil.copytree(checkpoints["dense"].path, d)
    (d / "config.json").write_bytes(raw)
    with pytest.raises(LoadError, match=r"config\.json: ") as e:
        gemma4_mlx.load(d)
    assert one_line(str(e.value))


@pytest.mark.parametrize(
    "block, value, why",
    [
        ("vision_config", [1], "vision_config must be an object or null"),
        ("vision_config", {"head_dim": "64"}, "vision_config: head_dim must be int"),
        ("audio_config", {"hidden_size": 0}, "audio_config: hidden_size must be a positive integer"),
        ("audio_config", {"subsampling_conv_channels": "ab"}, "audio_config: subsampling_conv_channels must be"),
    ],
)
def test_tower_blocks_typed(checkpoints, tmp_path, block, value, why):
    d = tmp_path / "dense"
    shutil.copytree(checkpoints["dense"].path, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[block] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=why) as e:
        gemma4_mlx.load(d)
    assert one_line(str(e.value)) and "config.json" in str(e.value)


def test_null_media_token_id_keeps_the_default(checkpoints, tmp_path):
    """Found by `make fuzz`: a null `image_token_id` was int(None) in `media_ids`."""
    d = tmp_path / "dense"
    shutil.copytree(checkpoints["dense"].path, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["image_token_id"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    model, _ = gemma4_mlx.load(d)
    assert model.media_ids["image"] == 258880
