"""Audio path (docs/multimodal.md §4): front end and Conformer encoder against transformers 5.24.

- features: log-mel and frame masks equal `Gemma4AudioFeatureExtractor`; soft-token
  counts equal the processor's for a sweep of lengths (0.1 s .. 30 s) that includes
  the lengths where mlx-vlm's ceil(ms / 40) is one too high;
- model: a tiny `Gemma4ForConditionalGeneration` with an audio tower, every weight
  randomised (norms, per_dim_scale, finite clamp bounds), saved by transformers and
  loaded through our `sanitize`; tower outputs and embeddings within 1e-4 for single
  clips and a padded batch; mutations (relative shift, clamps) must break parity;
- loading: WAV variants, resampling quality, and clear errors for bad input.
"""

from __future__ import annotations

import gemma4_mlx  # noqa: F401  (loads OpenBLAS before mlx.core)

# isort: split

import math
import struct
import time
import types
import wave
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx.checkpoint.load import load_model
from gemma4_mlx.config import parse_config
from gemma4_mlx.media import audio as A
from gemma4_mlx.models import audio as M
from gemma4_mlx.models.text import Model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor  # noqa: E402
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor  # noqa: E402

from helpers.mm_configs import randomize_audio  # noqa: E402

TOL = 1e-4
AUDIO_CFG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    subsampling_conv_channels=[128, 8],
    conv_kernel_size=5,
    output_proj_dims=24,
    use_clipped_linears=True,
)
TEXT_CFG = dict(
    vocab_size=300,
    vocab_size_per_layer_input=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    global_head_dim=64,
    hidden_size_per_layer_input=8,
    layer_types=["sliding_attention", "full_attention"],
    sliding_window=16,
    num_kv_shared_layers=0,
)


randomize = randomize_audio  # every parameter random, finite clamp bounds


def make_clip(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t * (1 + t)) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def hf_features(clips):
    r = Gemma4AudioFeatureExtractor()(list(clips), return_tensors="np")
    return r["input_features"], r["input_features_mask"]


def diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# -- the tiny reference checkpoint ------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = transformers.Gemma4Config(text_config=TEXT_CFG, vision_config=None, audio_config=AUDIO_CFG)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    randomize(hf, 0)
    path = tmp_path_factory.mktemp("audio_ckpt")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture
def ours(ckpt):
    return load_model(ckpt[1], dtype="float32")[0].audio


def hf_run(hf, feats, mask):
    with torch.no_grad():
        o = hf.model.get_audio_features(torch.tensor(feats), torch.tensor(mask), return_dict=True)
    return o.last_hidden_state.numpy(), o.pooler_output.numpy(), o.attention_mask.numpy()


def check_parity(hf, model, clips):
    feats, mask = hf_features(clips)
    h_ref, e_ref, m_ref = hf_run(hf, feats, mask)
    h, m = model.audio_tower(mx.array(feats), mx.array(mask))
    e = model.embed_audio(h)
    h, m, e = np.array(h), np.array(m), np.array(e)
    assert (m == m_ref).all()
    assert m.sum(1).tolist() == [A.num_audio_tokens(len(c)) for c in clips]
    assert np.abs(h_ref[m]).max() > 1.0 and np.abs(e_ref[m]).max() > 1.0  # non-trivial outputs
    assert not h[~m].any()  # padded frames zeroed
    return diff(h[m], h_ref[m]), diff(e[m], e_ref[m])


@pytest.mark.parametrize("n", [20800, 7000, 16080, 1600, 161])
def test_single_clip_parity(ckpt, ours, n):
    err_h, err_e = check_parity(ckpt[0], ours, [make_clip(n, seed=n)])
    assert err_h < TOL and err_e < TOL


def test_padded_batch_parity(ckpt, ours):
    hf, lens = ckpt[0], [20800, 7000, 16080, 1600]
    clips = [make_clip(n, seed=i) for i, n in enumerate(lens)]
    err_h, err_e = check_parity(hf, ours, clips)
    assert err_h < TOL and err_e < TOL
    # soft tokens: the valid rows, clip after clip, as transformers merges them
    feats, mask = hf_features(clips)
    _, e_ref, m_ref = hf_run(hf, feats, mask)
    soft = np.array(ours.soft_tokens(feats, mask))
    assert soft.shape == (sum(A.num_audio_tokens(n) for n in lens), TEXT_CFG["hidden_size"])
    assert diff(soft, e_ref[m_ref]) < TOL
    # each clip of the batch equals the clip run alone
    for i, c in enumerate(clips):
        f1, m1 = A.log_mel([c])
        e1 = np.array(ours(f1, m1)[0])[0, : A.num_audio_tokens(len(c))]
        start = sum(A.num_audio_tokens(n) for n in lens[:i])
        assert diff(e1, soft[start : start + len(e1)]) < TOL


@pytest.mark.parametrize("geometry", [(6, 5, 0), (5, 4, 2)])
def test_other_attention_geometry(geometry):
    """Chunk/context values where transformers' relative table is not indexed by the
    plain distance (6, 5, 0) or looks ahead (5, 4, 2)."""
    chunk, left, right = geometry
    cfg = dict(AUDIO_CFG, attention_chunk_size=chunk, attention_context_left=left, attention_context_right=right)
    torch.manual_seed(1)
    hf = transformers.Gemma4AudioModel(transformers.Gemma4AudioConfig(**cfg)).eval()
    randomize(hf, 1)
    ours = M.AudioModel(M.AudioConfig.from_dict(cfg), 8)
    w = M.sanitize({"model.audio_tower." + k: mx.array(v.numpy()) for k, v in hf.state_dict().items()})
    ours.audio_tower.load_weights([(k[len("audio_tower.") :], v) for k, v in w.items()], strict=True)
    clips = [make_clip(20800), make_clip(7000, 1)]
    feats, mask = hf_features(clips)
    with torch.no_grad():
        o = hf(torch.tensor(feats), torch.tensor(mask))
    h, m = ours.audio_tower(mx.array(feats), mx.array(mask))
    m = np.array(m)
    assert diff(np.array(h)[m], o.last_hidden_state.numpy()[m]) < TOL


def test_sanitize(ckpt):
    raw = mx.load(str(next(Path(ckpt[1]).glob("*.safetensors"))))
    w = M.sanitize(raw)
    assert not [k for k in w if not k.startswith(("audio_tower.", "embed_audio."))]  # text keys dropped
    assert len(w) == sum(k.startswith(("model.audio_tower.", "model.embed_audio.")) for k in raw)
    conv0 = "audio_tower.subsample_conv_projection.layer0.conv.weight"
    assert w[conv0].shape == (128, 3, 3, 1)
    assert w["audio_tower.subsample_conv_projection.layer1.conv.weight"].shape == (8, 3, 3, 128)
    assert w["audio_tower.layers.0.lconv1d.depthwise_conv1d.weight"].shape == (32, 5, 1)
    assert w["audio_tower.layers.0.self_attn.q_proj.input_max"].dtype == mx.float32
    # already-converted (MLX layout) tensors pass through unchanged; bf16 clamps widen
    again = M.sanitize({("model." + k): v for k, v in w.items()})
    assert all(np.array_equal(np.array(again[k]), np.array(w[k])) for k in w)
    bf = M.sanitize({"model.audio_tower.layers.0.self_attn.q_proj.input_max": mx.array(2.5, mx.bfloat16)})
    assert bf["audio_tower.layers.0.self_attn.q_proj.input_max"].dtype == mx.float32


def test_bfloat16_runs(ckpt, ours):
    feats, mask = hf_features([make_clip(20800)])
    ref = np.array(ours(feats, mask)[0])
    ours.set_dtype(mx.bfloat16)  # floating parameters incl. clamp scalars; cast back at use
    got = np.array(ours(feats, mask)[0].astype(mx.float32))
    assert np.isfinite(got).all()
    assert diff(got, ref) < 0.1 * np.abs(ref).max()


# -- mutations: the parity test must see these bugs --------------------------------


def batch_error(hf, model):
    clips = [make_clip(20800), make_clip(7000, 1)]
    feats, mask = hf_features(clips)
    _, e_ref, m_ref = hf_run(hf, feats, mask)
    e, m = model(feats, mask)
    return diff(np.array(e)[m_ref], e_ref[m_ref])


def test_mutation_relative_shift_off_by_one(ckpt, ours):
    assert batch_error(ckpt[0], ours) < TOL
    tower = ours.audio_tower
    n = tower.config.hidden_size // 2
    inv = np.exp(np.arange(n) * -math.log(1e4) / (n - 1))
    tower._pos = mx.array(
        np.stack([np.concatenate([np.sin((o + 1) * inv), np.cos((o + 1) * inv)]) for o in tower._offsets]).astype(
            np.float32
        )
    )
    assert batch_error(ckpt[0], ours) > 100 * TOL


def test_mutation_clamps_ignored(ckpt, ours):
    for _, mod in ours.named_modules():
        if isinstance(mod, M.ClippableLinear):
            mod.clip = False
    assert batch_error(ckpt[0], ours) > 100 * TOL


def test_mutation_log_floor_as_clamp():
    """mlxcel issue #796: log(max(mel, floor)) instead of log(mel + floor)."""
    clip = make_clip(16080)
    ref, _ = hf_features([clip])
    ours, mask = A.log_mel([clip])
    assert diff(ours, ref) <= 1e-5
    cfg = A.FeatureConfig()
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(np.pad(clip, (0, 16128 - 16080)), (160, 0)), 321)[::160][
        :, :-1
    ]
    mel = np.abs(np.fft.rfft(frames * A._hann(320), n=512)) @ A.mel_filters(257, 128, 0.0, 8000.0, 16000)
    clamped = (np.log(np.maximum(mel, cfg.mel_floor)).astype(np.float32) * mask[0][:, None])[None]
    assert diff(clamped, ours) > 1e-3  # would fail the parity bound above


# -- features and token counts -----------------------------------------------------


@pytest.mark.parametrize("lens", [[161], [1600], [16080], [20800, 7000, 16080], [480000], [480000, 161, 33333]])
def test_log_mel_parity(lens):
    clips = [make_clip(n, seed=i) for i, n in enumerate(lens)]
    ref, ref_mask = hf_features(clips)
    got, mask = A.log_mel(clips)
    assert got.dtype == np.float32 and mask.dtype == bool
    assert got.shape == ref.shape and (mask == ref_mask).all()
    assert diff(got, ref) <= 1e-5
    assert A.tokens_from_mask(mask) == [A.num_audio_tokens(n) for n in lens]


@pytest.mark.parametrize(
    "kw",
    [
        dict(preemphasis=0.97),
        dict(preemphasis=0.97, preemphasis_htk_flavor=False),
        dict(input_scale_factor=2.0, fft_overdrive=True),
        dict(per_bin_mean=[0.1] * 128, per_bin_stddev=[2.0] * 128),
    ],
)
def test_log_mel_options(kw):
    clips = [make_clip(7000), make_clip(3000, 1)]
    r = Gemma4AudioFeatureExtractor(**kw)(clips, return_tensors="np")
    got, mask = A.log_mel(clips, A.FeatureConfig.from_dict(kw))
    assert (mask == r["input_features_mask"]).all()
    assert diff(got, r["input_features"]) <= 1e-5


def hf_processor_stub():
    fe = Gemma4AudioFeatureExtractor()
    return types.SimpleNamespace(
        feature_extractor=fe, audio_seq_length=750, boa_token="<boa>", audio_token="<a>", eoa_token="<eoa>"
    )


def test_token_count_sweep():
    rng = np.random.default_rng(0)
    special = [
        1600,
        16000,
        16001,
        16079,
        16080,
        16159,
        16160,
        16161,
        16320,
        16321,
        24000,
        479839,
        479840,
        479841,
        479999,
        480000,
    ]
    lens = np.unique(
        np.concatenate([np.geomspace(1600, 480000, 50).astype(int), special, rng.integers(1600, 480000, 40)])
    ).tolist()
    stub = hf_processor_stub()
    mlx_vlm_off = 0
    for n in lens:
        expect = Gemma4Processor._compute_audio_num_tokens(stub, np.zeros(n), 16000)
        mask = stub.feature_extractor([np.zeros(n, np.float32)], return_tensors="np")["input_features_mask"]
        text = Gemma4Processor.replace_audio_token(stub, {"input_features_mask": mask}, 0)
        assert text.count("<a>") == expect == A.num_audio_tokens(n), n
        assert A.tokens_from_mask(A.log_mel([np.zeros(n, np.float32)])[1]) == [expect]
        mlx_vlm_off += math.ceil(n / 16 / 40) != expect
    assert mlx_vlm_off >= 10  # the sweep does exercise the off-by-one lengths
    assert A.num_audio_tokens(16000) == 25 and A.num_audio_tokens(480000) == 750
    assert A.num_audio_tokens(16080) == 25  # mlx-vlm: 26
    assert A.audio_prompt_ids(2) == [256000, 258881, 258881, 258883]


def test_feature_config_from_dict():
    block = {
        "feature_extractor_type": "Gemma4AudioFeatureExtractor",
        "feature_size": 128,
        "sampling_rate": 16000,
        "frame_length": 320,
        "hop_length": 160,
        "fft_length": 512,
        "fft_overdrive": False,
        "min_frequency": 0.0,
        "max_frequency": 8000.0,
        "mel_floor": 0.001,
        "preemphasis": 0.0,
        "dither": 0.0,
        "input_scale_factor": 1.0,
        "per_bin_mean": None,
        "per_bin_stddev": None,
        "padding_value": 0.0,
        "padding_side": "right",
        "return_attention_mask": True,
    }
    cfg = A.FeatureConfig.from_dict({"processor_class": "Gemma4Processor", "feature_extractor": block})
    assert cfg == A.FeatureConfig()
    assert (cfg.frame_length, cfg.hop_length, cfg.fft_length) == (320, 160, 512)
    with pytest.raises(A.AudioError, match="frame_length"):
        A.FeatureConfig.from_dict(dict(block, frame_length=400))


def test_audio_config_from_dict():
    block = {
        "_name_or_path": "",
        "architectures": None,
        "attention_chunk_size": 12,
        "attention_context_left": 13,
        "attention_context_right": 0,
        "attention_invalid_logits_value": -1e9,
        "attention_logit_cap": 50.0,
        "conv_kernel_size": 5,
        "dtype": "bfloat16",
        "gradient_clipping": 1e10,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "model_type": "gemma4_audio",
        "num_attention_heads": 8,
        "num_hidden_layers": 12,
        "output_proj_dims": 1536,
        "residual_weight": 0.5,
        "rms_norm_eps": 1e-6,
        "subsampling_conv_channels": [128, 32],
        "use_clipped_linears": True,
    }
    cfg = M.AudioConfig.from_dict(block)
    assert cfg == M.AudioConfig() and cfg.head_dim == 128
    text = {"model_type": "gemma4", "text_config": TEXT_CFG}
    assert not Model.from_config(parse_config(dict(text, audio_config=None))).has_audio
    model = Model.from_config(parse_config(dict(text, audio_config=dict(AUDIO_CFG)))).audio
    assert model.embed_audio.embedding_projection.weight.shape == (TEXT_CFG["hidden_size"], 24)


# -- loading: WAV, resampling, bad input -----------------------------------------


def write_pcm(path, x, rate, width=2, channels=1):
    x = np.asarray(x, np.float64).reshape(-1, 1).repeat(channels, 1) if np.ndim(x) == 1 else np.asarray(x)
    if width == 1:
        data = np.clip(np.round(x * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    elif width == 3:
        v = np.clip(np.round(x * 2**23), -(2**23), 2**23 - 1).astype(np.int32).reshape(-1, 1)
        data = np.concatenate([(v >> s) & 0xFF for s in (0, 8, 16)], 1).astype(np.uint8).tobytes()
    else:
        scale = 2.0 ** (8 * width - 1)
        data = np.clip(np.round(x * scale), -scale, scale - 1).astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)


def write_float(path, x, rate, extensible=False):
    data = np.asarray(x, "<f4").tobytes()
    if extensible:
        guid = struct.pack("<H", 3) + bytes.fromhex("000000001000800000aa00389b71")
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 1, rate, rate * 4, 4, 32, 22, 32, 0) + guid
    else:
        fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    Path(path).write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_pcm(tmp_path, width):
    x = make_clip(3200) * 0.9
    write_pcm(tmp_path / "a.wav", x, 16000, width)
    got = A.load_audio(tmp_path / "a.wav")
    assert got.dtype == np.float32 and got.shape == x.shape
    assert diff(got, x) < 2.0 / 2 ** (8 * width - 1) + 1e-7


def test_wav_float_stereo_and_extensible(tmp_path):
    x = make_clip(3200)
    write_float(tmp_path / "f.wav", x, 16000)
    write_float(tmp_path / "e.wav", x, 16000, extensible=True)
    assert diff(A.load_audio(tmp_path / "f.wav"), x) == 0.0
    assert diff(A.load_audio(tmp_path / "e.wav"), x) == 0.0
    stereo = np.stack([x, -0.5 * x], 1)
    write_pcm(tmp_path / "s.wav", stereo, 16000, 2, channels=2)
    assert diff(A.load_audio(tmp_path / "s.wav"), 0.25 * x) < 1e-4


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resample_sine(tmp_path, rate):
    n = rate  # 1 s
    t = np.arange(n) / rate
    write_pcm(tmp_path / "r.wav", 0.5 * np.sin(2 * np.pi * 1000 * t), rate)
    got = A.load_audio(tmp_path / "r.wav")
    assert len(got) == 16000
    want = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert diff(got[100:-100], want[100:-100]) < 2e-3  # 16-bit quantisation + filter ripple


def test_resample_rejects_aliases():
    t = np.arange(48000) / 48000
    y = A.resample(np.sin(2 * np.pi * 12000 * t), 48000)  # above the new 8 kHz Nyquist
    assert len(y) == 16000 and np.sqrt(np.mean(y[200:-200] ** 2)) < 1e-3


def test_process_audio_mixed_sources(tmp_path):
    x = make_clip(16080)
    write_pcm(tmp_path / "a.wav", x, 16000)
    out = A.process_audio([tmp_path / "a.wav", make_clip(4000)[::2].copy()], sampling_rate=None)
    assert out.num_tokens == [25, A.num_audio_tokens(2000)]
    out8 = A.process_audio([make_clip(8000), tmp_path / "a.wav"], sampling_rate=8000)  # rate: arrays only
    assert out8.num_tokens == [A.num_audio_tokens(16000), 25] == [25, 25]
    assert out.input_features.shape[0] == 2 and out.input_features_mask.shape == out.input_features.shape[:2]


def test_bad_input(tmp_path):
    with pytest.raises(A.AudioError, match="empty"):
        A.load_audio(np.zeros(0, np.float32))
    write_pcm(tmp_path / "empty.wav", np.zeros(0), 16000)
    with pytest.raises(A.AudioError, match="empty"):
        A.load_audio(tmp_path / "empty.wav")
    with pytest.raises(A.AudioError, match="at most 30 s"):
        A.load_audio(np.zeros(480001, np.float32))
    with pytest.raises(A.AudioError, match="at most 30 s"):
        A.load_audio(np.zeros(44100 * 31, np.float32), sampling_rate=44100)
    assert len(A.load_audio(np.zeros(480000, np.float32))) == 480000
    with pytest.raises(A.AudioError, match="too short"):
        A.load_audio(np.zeros(100, np.float32))
    with pytest.raises(A.AudioError, match="1-D"):
        A.load_audio(np.zeros((2, 1000), np.float32))
    with pytest.raises(A.AudioError, match="float"):
        A.load_audio(np.zeros(1000, np.int16))
    with pytest.raises(A.AudioError, match="NaN"):
        A.load_audio(np.full(1000, np.nan, np.float32))
    with pytest.raises(TypeError):
        A.process_audio([0.1, 0.2, 0.3])


def test_bad_files(tmp_path):
    write_pcm(tmp_path / "ok.wav", make_clip(3200), 16000)
    good = (tmp_path / "ok.wav").read_bytes()
    cases = {
        "truncated.wav": (good[:2000], "corrupt WAV"),
        "garbage.wav": (b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunkjunk", "corrupt WAV"),
        "noheader.wav": (b"\x00" * 100, "corrupt WAV"),
        "song.mp3": (b"ID3\x04\x00" + b"\x00" * 100, "unsupported audio format MP3.*ffmpeg"),
        "song.flac": (b"fLaC" + b"\x00" * 100, "unsupported audio format FLAC.*soundfile"),
        "song.m4a": (b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 100, "unsupported audio format M4A"),
        "thing.xyz": (b"hello world" * 10, "unknown audio format"),
    }
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(A.AudioError, match=msg):
            A.load_audio(tmp_path / name)
    with pytest.raises(A.AudioError, match="cannot read"):
        A.load_audio(tmp_path / "missing.wav")


# -- compressed files through PyAV -----------------------------------------------


def write_encoded(path, x, rate, codec, channels=1):
    """Encode float samples (n,) or (n, channels) in [-1, 1] with PyAV; FLAC gets the same
    int16 quantisation as `write_pcm`, so FLAC and WAV hold identical samples."""
    av = pytest.importorskip("av")
    x = np.asarray(x, np.float64).reshape(len(x), channels)
    layout = "mono" if channels == 1 else "stereo"
    if codec == "flac":
        pcm = np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=layout)  # interleaved
    else:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x.T, np.float32), format="fltp", layout=layout)
    frame.sample_rate, frame.pts = rate, 0
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.layout = layout
        if codec != "flac":
            s.bit_rate = 128_000  # a usual music rate; FFmpeg's AAC default is much noisier
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    return path


def chirp(n, rate, amp=0.4):
    t = np.arange(n) / rate
    return amp * np.sin(2 * np.pi * (200 * t + 700 * t * t))  # 200 Hz .. ~3 kHz in 2 s


def snr_db(got, want, max_gain_error=0.1) -> float:
    """SNR of `got` against `want` after a least-squares gain (LAME scales its input by 0.95)."""
    n = min(len(got), len(want))
    g, w = np.asarray(got[:n], np.float64), np.asarray(want[:n], np.float64)
    gain = np.dot(g, w) / np.dot(g, g)
    assert abs(gain - 1) < max_gain_error, gain
    return float(10 * np.log10(np.sum(w**2) / np.sum((gain * g - w) ** 2)))


@pytest.mark.parametrize("rate", [16000, 44100])
def test_flac_equals_wav_path(tmp_path, rate):
    x = chirp(2 * rate, rate)
    write_pcm(tmp_path / "a.wav", x, rate)
    write_encoded(tmp_path / "a.flac", x, rate, "flac")
    got = A.load_audio(tmp_path / "a.flac")
    assert got.dtype == np.float32 and len(got) == 32000
    assert np.array_equal(got, A.load_audio(tmp_path / "a.wav"))  # lossless: same samples, same resampler
    stereo = np.stack([x, -0.5 * x], 1)
    write_pcm(tmp_path / "s.wav", stereo, rate, 2, channels=2)
    write_encoded(tmp_path / "s.flac", stereo, rate, "flac", channels=2)
    assert np.array_equal(A.load_audio(tmp_path / "s.flac"), A.load_audio(tmp_path / "s.wav"))  # channel mean


# Lossy codecs: the encoders' priming is trimmed on decoding (LAME tag, MP4 edit list,
# Opus pre-skip), so samples line up without a search.  Threshold: 20 dB SNR after a gain
# fit (error amplitude 1/10 of the signal's).  Measured at 128 kb/s: 31-78 dB; the same
# decode shifted by one sample gives ~3.5 dB, so 20 dB proves alignment and rate.  AAC
# keeps the padding of its last 1024-sample frame in MP4 here, so its length may exceed
# the source by up to one frame.
@pytest.mark.parametrize(
    "codec,ext,rate,extra",
    [
        ("libmp3lame", "mp3", 44100, 0),
        ("libmp3lame", "mp3", 16000, 0),
        ("aac", "m4a", 44100, 1024),
        ("aac", "m4a", 16000, 1024),
        ("libopus", "ogg", 48000, 0),
        ("libopus", "opus", 16000, 0),
    ],
)
def test_lossy_formats(tmp_path, codec, ext, rate, extra):
    x = chirp(2 * rate, rate)
    got = A.load_audio(write_encoded(tmp_path / f"a.{ext}", x, rate, codec))
    want = A.resample(x.astype(np.float32), rate)
    assert got.dtype == np.float32 and 32000 <= len(got) <= 32000 + math.ceil(extra * 16000 / rate)
    assert snr_db(got, want) > 20, snr_db(got, want)
    assert np.corrcoef(got[:32000], want)[0, 1] > 0.99


def test_video_soundtrack_and_no_audio(tmp_path):
    av = pytest.importorskip("av")
    x = chirp(32000, 16000)
    with av.open(str(tmp_path / "v.mp4"), "w") as c:
        v = c.add_stream("mpeg4", rate=10)
        v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        fr = av.AudioFrame.from_ndarray(x.astype(np.float32)[None], format="fltp", layout="mono")
        fr.sample_rate, fr.pts = 16000, 0
        for p in [*a.encode(fr), *a.encode()]:
            c.mux(p)
        for i in range(20):
            for p in v.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
    got = A.load_audio(tmp_path / "v.mp4")
    assert 32000 <= len(got) <= 33024 and snr_db(got, x) > 20
    with av.open(str(tmp_path / "mute.mkv"), "w") as c:
        v = c.add_stream("mpeg4", rate=10)
        v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        for p in [*v.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")), *v.encode()]:
            c.mux(p)
    with pytest.raises(A.AudioError, match="mute.mkv: no audio stream"):
        A.load_audio(tmp_path / "mute.mkv")


def test_compressed_too_long(tmp_path):
    write_encoded(tmp_path / "31s.flac", np.zeros(8000 * 31), 8000, "flac")
    with pytest.raises(A.AudioError, match=r"31s.flac: 31.00 s of audio; Gemma 4 takes at most 30 s"):
        A.load_audio(tmp_path / "31s.flac")
    # decoding stops one second past the limit; the message gives the header's duration
    write_encoded(tmp_path / "45s.flac", np.zeros(8000 * 45), 8000, "flac")
    with pytest.raises(A.AudioError, match=r"45s.flac: 45.00 s of audio; Gemma 4 takes at most 30 s"):
        A.load_audio(tmp_path / "45s.flac")
    write_encoded(tmp_path / "30s.flac", np.zeros(8000 * 30), 8000, "flac")
    assert len(A.load_audio(tmp_path / "30s.flac")) == 480000


def test_corrupt_compressed_files(tmp_path):
    rng = np.random.default_rng(0)
    flac = write_encoded(tmp_path / "ok.flac", chirp(32000, 16000), 16000, "flac").read_bytes()
    mp3 = write_encoded(tmp_path / "ok.mp3", chirp(32000, 16000), 16000, "libmp3lame").read_bytes()
    cases = {
        "cut.flac": flac[: len(flac) // 2],  # FLAC notices the cut frame
        "noise.flac": flac[:200] + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "header_only.flac": flac[:60],
        "noise.mp3": mp3[:200] + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "zeros.mp3": mp3[:200] + bytes(4000),
        "zero.flac": b"",
        "tiny.mp3": b"ID3",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(A.AudioError) as e:
            A.load_audio(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / name}: ") and "\n" not in msg, msg
        assert "corrupt or unsupported audio format" in msg or "unknown audio format" in msg, msg
    # read_wav itself stays WAV-only
    with pytest.raises(A.AudioError, match="read_wav decodes WAV only"):
        A.read_wav(tmp_path / "ok.flac")


def test_compressed_without_pyav(tmp_path, monkeypatch):
    from gemma4_mlx.media import decode

    def missing():
        raise decode.MissingPyAV("decoding it needs PyAV (`pip install av`)")

    monkeypatch.setattr(decode, "import_av", missing)
    (tmp_path / "song.flac").write_bytes(b"fLaC" + bytes(100))
    with pytest.raises(A.AudioError, match=r"song.flac: unsupported audio format FLAC without PyAV: `pip install av`"):
        A.load_audio(tmp_path / "song.flac")
    write_pcm(tmp_path / "ok.wav", make_clip(3200), 16000)
    assert len(A.load_audio(tmp_path / "ok.wav")) == 3200  # WAV never needs PyAV


# -- rates and lengths from untrusted headers ------------------------------------------


@pytest.mark.parametrize("rate", [1, 999, 384_001, 2_000_000_000])
def test_header_rate_out_of_range_is_one_line_and_quick(tmp_path, rate):
    """A 1 Hz WAV of 200 samples took 25 s to resample (x16000); 4 GHz took 1.4 GB."""
    write_pcm(tmp_path / "odd.wav", make_clip(200), rate, 2)
    t0 = time.perf_counter()
    with pytest.raises(A.AudioError, match=rf"odd.wav: sampling rate {rate} Hz is outside the 1000..384000 Hz"):
        A.load_audio(tmp_path / "odd.wav")
    with pytest.raises(A.AudioError, match=r"audio array: sampling rate"):
        A.load_audio(make_clip(200), sampling_rate=rate)
    assert time.perf_counter() - t0 < 1.0


def test_wav_longer_than_30_s_is_refused_from_its_header(tmp_path, monkeypatch):
    write_pcm(tmp_path / "long.wav", np.zeros(31 * 8000), 8000, 2)
    monkeypatch.setattr(A, "_pcm_to_float", lambda *a: pytest.fail("the samples were read"))
    with pytest.raises(A.AudioError, match=r"long.wav: 31.00 s of audio; Gemma 4 takes at most 30 s"):
        A.load_audio(tmp_path / "long.wav")


def test_truncated_wav_is_named_so_even_when_its_header_is_long(tmp_path):
    """A header claiming 40 s over 1 s of data is a truncated file, not a long clip."""
    write_pcm(tmp_path / "cut.wav", np.zeros(40 * 8000), 8000, 2)
    data = (tmp_path / "cut.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: 44 + 2 * 8000])
    with pytest.raises(A.AudioError, match=r"cut.wav: corrupt WAV file \(data chunk truncated"):
        A.load_audio(tmp_path / "cut.wav")


def test_compressed_file_at_a_huge_rate_is_refused_while_decoding(tmp_path):
    """A 15 KB FLAC at 655 kHz decoded and resampled for 18 s and 1.5 GB."""
    write_encoded(tmp_path / "hi.flac", np.zeros(4096), 655_350, "flac")
    with pytest.raises(A.AudioError, match=r"hi.flac: .*sampling rate 655350 Hz is outside"):
        A.load_audio(tmp_path / "hi.flac")
