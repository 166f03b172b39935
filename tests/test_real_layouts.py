"""Checkpoints as other tools write them: a text-only conversion by mlx-lm's own
converter (towers dropped, `audio_config` kept) and processor files with null blocks."""

import json

import mlx.core as mx
import numpy as np
import pytest
import transformers

import gemma4_mlx
from gemma4_mlx.media.prepare import MediaError, MediaProcessor

from helpers.checkpoints import max_diff, write_char_tokenizer
from helpers.mm_configs import TEXT_TINY, build_multimodal


@pytest.fixture(scope="module")
def mlx_lm_text_only(tmp_path_factory):
    """A multimodal HF checkpoint (vision + audio towers) converted by mlx-lm."""
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("mlx_lm")
    hf = build_multimodal(transformers.Gemma4TextConfig(**TEXT_TINY).to_dict(), "small")
    src = root / "src"
    hf.save_pretrained(src)
    write_char_tokenizer(src)
    cfg = json.loads((src / "config.json").read_text())
    # mlx-lm 0.32 reads the top-level vocab size and the legacy global_head_dim (as in
    # Google's released config.json files), not transformers 5.25's per-layer form
    cfg["vocab_size"] = TEXT_TINY["vocab_size"]
    cfg["text_config"]["global_head_dim"] = TEXT_TINY["global_head_dim"]
    (src / "config.json").write_text(json.dumps(cfg))
    dst = root / "dst"
    convert(str(src), mlx_path=str(dst), dtype="float32")
    return src, dst


def test_mlx_lm_text_only_conversion_loads(mlx_lm_text_only, caplog):
    src, dst = mlx_lm_text_only
    written = json.loads((dst / "config.json").read_text())
    assert "audio_config" in written and "vision_config" not in written  # what mlx-lm writes
    assert not any(
        k.startswith(("vision", "audio", "model.vision", "model.audio"))
        for k in mx.load(str(dst / "model.safetensors"))
    )
    with caplog.at_level("WARNING"):
        model, tok = gemma4_mlx.load(dst)
    assert not model.has_audio and not model.has_vision
    assert any(
        "declares an audio tower but the checkpoint has none of its tensors" in r.message for r in caplog.records
    )
    ref, _ = gemma4_mlx.load(src, text_only=True)
    ids = mx.array([[2, 5, 9, 33, 7, 12, 40]])
    assert max_diff(model(ids), ref(ids)) < 1e-5
    with pytest.raises(MediaError, match="no audio tower"):
        gemma4_mlx.generate(model, tok, "x", audio=[np.zeros(1600, np.float32)], max_tokens=1)


def test_partly_present_tower_is_an_error(mlx_lm_text_only, tmp_path):
    src, dst = mlx_lm_text_only
    import shutil

    shutil.copytree(dst, tmp_path / "m")
    weights = dict(mx.load(str(dst / "model.safetensors")))
    full = mx.load(str(src / "model.safetensors"))
    key = next(k for k in full if k.startswith("model.audio_tower."))
    weights[key] = full[key]  # one audio tensor of many
    mx.save_safetensors(str(tmp_path / "m" / "model.safetensors"), weights, metadata={"format": "mlx"})
    with pytest.raises(gemma4_mlx.checkpoint.load.LoadError, match=r"missing tensor audio\..*\(and \d+ more\)"):
        gemma4_mlx.load(tmp_path / "m")


@pytest.mark.parametrize("block", ["video_processor", "image_processor", "feature_extractor"])
def test_null_processor_blocks_are_absent(mlx_lm_text_only, tmp_path, block):
    src, _ = mlx_lm_text_only
    model, _ = gemma4_mlx.load(src)
    (tmp_path / "processor_config.json").write_text(json.dumps({block: None}))
    mp = MediaProcessor.from_folder(model, tmp_path)
    assert mp is not None
    (tmp_path / "processor_config.json").write_text("[1, 2]")
    with pytest.raises(MediaError, match="processor_config.json: expected a JSON object"):
        MediaProcessor.from_folder(model, tmp_path)
