"""Config forms, released presets and real-shape parameter counts (built lazily)."""

import json
from pathlib import Path

import mlx.core as mx
import pytest
import transformers

import gemma4_mlx
from gemma4_mlx.config import FULL, ConfigError, parse_config, read_config
from gemma4_mlx.models.text import Model
from gemma4_mlx.presets import PRESETS, preset

from helpers.checkpoints import max_diff, random_ids

COUNTS = {"e2b": 4_628_569_344, "e4b": 7_463_013_376, "26b-a4b": 25_233_141_760, "31b": 30_697_345_280}
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs"


@pytest.mark.parametrize("name", list(COUNTS))
def test_preset_parameter_count_without_allocating(name):
    before = mx.get_active_memory()
    model = Model(preset(name))
    assert model.num_parameters() == COUNTS[name]
    assert mx.get_active_memory() - before < 1 << 20  # lazy: nothing materialised


@pytest.mark.parametrize("name", list(COUNTS))
def test_reference_config_files(name):
    path = REFERENCE / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    cfg = read_config(path)  # carries a `_note` key that must be ignored
    assert Model(cfg.text).num_parameters() == COUNTS[name]
    ours = preset(name)
    assert [(s.type, s.head_dim, s.kv_heads, s.intermediate, s.shared, s.producer) for s in cfg.text.layers] == [
        (s.type, s.head_dim, s.kv_heads, s.intermediate, s.shared, s.producer) for s in ours.layers
    ]


def test_released_geometry():
    e2b, e4b, moe, dense = (preset(n) for n in PRESETS)
    assert [s.index for s in e2b.layers if s.type == FULL] == [4, 9, 14, 19, 24, 29, 34]
    assert {s.producer for s in e2b.layers if s.shared} == {13, 14}
    assert {s.producer for s in e4b.layers if s.shared} == {22, 23}
    assert {s.intermediate for s in e2b.layers[15:]} == {12288}
    assert (moe.layers[5].head_dim, moe.layers[5].kv_heads, moe.layers[0].kv_heads) == (512, 2, 8)
    assert dense.layers[59].k_eq_v and not dense.layers[58].k_eq_v


def test_legacy_and_per_layer_config_forms_agree(checkpoints, tmp_path):
    """transformers writes `per_layer_config`; the hub files carry the legacy keys."""
    ref = checkpoints["dense"]
    saved = json.loads((ref.path / "config.json").read_text())
    assert "per_layer_config" in saved["text_config"]
    legacy = json.loads(json.dumps(saved))
    t = legacy["text_config"]
    t.pop("per_layer_config")
    t["global_head_dim"], t["num_global_key_value_heads"] = 32, 1
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(legacy))
    for f in ref.path.glob("*.safetensors"):
        (folder / f.name).symlink_to(f)
    a = gemma4_mlx.load(ref.path, dtype="float32")[0]
    b = gemma4_mlx.load(folder, dtype="float32")[0]
    assert a.config.layers == b.config.layers
    ids = mx.array([random_ids(12, seed=3)])
    assert max_diff(a(ids), b(ids)) == 0.0


def test_text_only_layout(checkpoints, tmp_path):
    """A `gemma4_text` save (prefix `model.`) loads like the wrapper."""
    import transformers

    ref = checkpoints["e2b_like"]
    text_cfg = ref.hf.config.text_config
    hf_text = transformers.Gemma4ForCausalLM(text_cfg).eval()
    hf_text.model.load_state_dict(ref.hf.model.language_model.state_dict())
    hf_text.save_pretrained(tmp_path / "text")
    assert json.loads((tmp_path / "text" / "config.json").read_text())["model_type"] == "gemma4_text"
    ids = random_ids(10, seed=4)
    m = gemma4_mlx.load(tmp_path / "text", dtype="float32")[0]
    assert max_diff(m(mx.array([ids])), ref.logits(ids)) < 1e-4


def test_unknown_keys_ignored_and_bad_configs_rejected():
    d = dict(PRESETS["e2b"], model_type="gemma4_text", brand_new_key=1)
    assert parse_config(d).text.hidden_size == 1536
    with pytest.raises(ConfigError, match="unknown model_type 'llama'"):
        parse_config({"model_type": "llama"})
    with pytest.raises(ConfigError, match="gemma4_unified"):
        parse_config({"model_type": "gemma4_unified"})
    with pytest.raises(ConfigError, match="layer_types"):
        parse_config(dict(PRESETS["e2b"], model_type="gemma4_text", layer_types=["full_attention"]))


def test_per_layer_config_form_decides_full_head_dim():
    """transformers 5.24 writes global_head_dim as a per_layer_config override; when it
    equals head_dim the override is empty and global_head_dim is absent: full layers
    then use head_dim, not the legacy default 512."""
    transformers = pytest.importorskip("transformers")
    from gemma4_mlx.config import TextConfig

    for g in (16, 32):
        c = transformers.Gemma4TextConfig(
            vocab_size=64,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            global_head_dim=g,
            layer_types=["sliding_attention", "full_attention"],
            hidden_size_per_layer_input=0,
        )
        assert [s.head_dim for s in TextConfig.from_dict(c.to_dict()).layers] == [16, g]
    legacy = {
        "vocab_size": 64,
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    }
    assert TextConfig.from_dict(legacy).layers[1].head_dim == 512  # transformers' default there too


def test_a_last_sliding_layer_reads_as_full_like_transformers():
    """transformers' Gemma 4 text config forces the last layer to full attention
    (with a warning); a config.json written by hand that says otherwise is read the same."""
    types = ["sliding_attention"] * 3
    hf = transformers.Gemma4TextConfig(num_hidden_layers=3, layer_types=list(types), num_kv_shared_layers=0)
    ours = parse_config(
        dict(PRESETS["e2b"], model_type="gemma4_text", num_hidden_layers=3, layer_types=types, num_kv_shared_layers=0)
    )
    assert ours.text.layer_types == hf.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
