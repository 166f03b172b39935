"""GGUF import of the tokenizer and chat template (`convert/gguf_tokenizer.py`).

The source is an HF Gemma 4 checkpoint written by transformers, with a small
tokenizer of Gemma's own shape (BPE with byte fallback, "▁" for spaces, every Gemma 4
control string a special added token, tokenizer_config.json naming them as Google's
does).  Its GGUF is written the way llama.cpp's converter writes Gemma 4: gguf-py's
own `LlamaHfVocab` and `SpecialVocab` read the HF folder, the control strings that
llama.cpp must render are re-typed user-defined (as its `Gemma4Model.set_vocab`
does), tokenizer model "gemma4", tensor names from gguf-py's map, F32 tensors.  The
imported folder must then tokenize exactly as the source, and `gemma4-mlx generate`
must run on it as on the source.

Helpers here (`hf_checkpoint`, `llama_cpp_gguf`) are shared with test_gguf_rope.py.
"""

import json
import random

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import gemma4_mlx
from gemma4_mlx.checkpoint.load import load_tokenizer
from gemma4_mlx.convert import ConvertError, convert
from gemma4_mlx.prompt.template import SPECIAL_TOKENS

from test_gguf_info import CFG, F, S, gguf_name, metadata

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from helpers.checkpoints import randomize  # noqa: E402  (needs torch / transformers)
from test_chat_format import MINI_TEMPLATE  # noqa: E402

V = 512  # vocabulary: 24 control strings, 256 byte tokens, 232 learned BPE tokens
# The strings llama.cpp's Gemma 4 converter types USER_DEFINED (rendered in output)
RENDERED = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}
NAMED = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42\n\n",
    "Hello, world! How are you today?",
    "Gemma runs on MLX: tokens, merges and bytes.",
    "東京は日本の首都です。",
    "Ça va très bien, merci.",
    "   indented\ttabs\tand  double  spaces",
    "numbers 0123456789 and symbols #$%&*+-=/<>[]{}|~^_`@\\",
] * 4


# -- the source: an HF checkpoint with a Gemma-shaped tokenizer ---------------------------


def _id_layout() -> dict[str, int]:
    """Control strings at Gemma 4's ids below 200; the media ones at the top of V."""
    ids = {t: i for t, i in SPECIAL_TOKENS.items() if i < 200}
    media = [t for t, i in SPECIAL_TOKENS.items() if i >= 200]
    ids.update({t: V - len(media) + k for k, t in enumerate(media)})
    return ids


def _gemma_shaped(vocab: dict[str, int], merges):
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
        if vocab
        else BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    )
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    if vocab:
        controls = sorted((t for t in vocab if t in SPECIAL_TOKENS), key=vocab.get)
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in controls])
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B:1", special_tokens=[("<bos>", 2)]
        )
    return tok


def write_source_tokenizer(folder):
    """tokenizer.json / tokenizer_config.json / chat_template.jinja of Gemma 4's shape."""
    from tokenizers import trainers

    ids = _id_layout()
    learner = _gemma_shaped({}, [])
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=V - len(ids) - 256, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    free = iter(i for i in range(V) if i not in ids.values())
    vocab = dict(ids)
    vocab.update({f"<0x{b:02X}>": next(free) for b in range(256)})
    vocab.update({t: next(free) for t in sorted(learned["vocab"], key=learned["vocab"].get)})
    assert len(vocab) == V and sorted(vocab.values()) == list(range(V))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_gemma_shaped(vocab, merges),
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        extra_special_tokens=NAMED,
    )
    fast.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())  # as in Google's release: <|video|> is the unnamed extra
    cfg.update(tokenizer_class="GemmaTokenizer", padding_side="left", extra_special_tokens=["<|video|>"])
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (folder / "chat_template.jinja").write_text(MINI_TEMPLATE)


def hf_checkpoint(folder, factor: float = 0.25, seed: int = 0):
    """test_gguf_info's geometry (vocabulary V) with the full layers' partial-rotary
    factor `factor`, written by transformers, plus the source tokenizer."""
    rope = {
        S: {"rope_type": "default", "rope_theta": 10000.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": factor, "rope_theta": 1000000.0},
    }
    text = transformers.Gemma4TextConfig(
        **dict(CFG, vocab_size=V, vocab_size_per_layer_input=V, rope_parameters=rope, tie_word_embeddings=True)
    )
    cfg = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None)
    model = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    write_source_tokenizer(folder)
    return model


# -- the GGUF, as llama.cpp's converter writes it ---------------------------------------


def rope_freqs(factor: float, head_dim: int) -> np.ndarray:
    """llama.cpp's Gemma 4 rope_freqs: 1.0 for the int(head_dim * factor / 2) rotated
    pairs, 1e30 for the rest (head_dim / 2 values)."""
    n = int(head_dim * factor / 2)
    return np.array([1.0] * n + [1e30] * (head_dim // 2 - n), np.float32)


def add_vocabulary(w, folder) -> None:
    vocab = gguf.LlamaHfVocab(folder)
    tokens, scores, types = zip(*vocab.all_tokens())
    types = [gguf.TokenType.USER_DEFINED if t.decode() in RENDERED else ty for t, ty in zip(tokens, types)]
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)


def _add_metadata(w, md: dict) -> None:
    for k, v in md.items():
        if k in ("general.architecture", "general.alignment"):
            continue  # the writer's own
        add = {bool: w.add_bool, int: w.add_uint32, float: w.add_float32, str: w.add_string}.get(type(v), w.add_array)
        add(k, v)


def llama_cpp_gguf(hf_dir, path, factor: float = 0.25, vocab: bool = True, edit=None, freqs=None):
    """Write the GGUF of the HF checkpoint at hf_dir: gguf-py's writer, names and
    vocabulary; F32 tensors (loaded exactly by our HF loader); rope_freqs for `factor`
    (or `freqs` as given).  edit(writer) may change metadata after everything is added."""
    model, _ = gemma4_mlx.load(hf_dir, dtype="float32", text_only=True, fuse=False)  # checkpoint names
    w = gguf.GGUFWriter(path, "gemma4")
    md = metadata(
        **{
            "tokenizer.ggml.model": None,
            "gemma4.rope.dimension_count": CFG["global_head_dim"],
            "gemma4.rope.dimension_count_swa": CFG["head_dim"],
        }
    )
    _add_metadata(w, md)
    if vocab:
        add_vocabulary(w, hf_dir)
    for key, p in tree_flatten(model.parameters()):
        w.add_tensor(gguf_name(key), np.array(p.astype(mx.float32)))
    w.add_tensor("rope_freqs.weight", rope_freqs(factor, CFG["global_head_dim"]) if freqs is None else freqs)
    if edit is not None:
        edit(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "gemma4-tiny"
    hf_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def imported(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    path = llama_cpp_gguf(source, root / "tiny.gguf")
    report = convert(path, root / "out", "q4_0", progress=False)
    return root / "out", report


def _strings(n: int) -> list[str]:
    """Control strings next to text, partial control strings, byte-fallback characters
    (emoji, CJK outside the learned vocabulary, rare and invisible code points)."""
    rng = random.Random(0)
    pieces = list(SPECIAL_TOKENS) + [
        "Hello",
        " world",
        "the",
        " the",
        "\n",
        "\n\n",
        "  ",
        "\t",
        " ",
        "東京",
        "日本語の文章",
        "中文字符",
        "😀",
        "🦙🔥",
        "👩‍💻",
        "ß",
        "Ḁ",
        "e\u0301",
        "𝔘𝔫𝔦",
        "\u200b",
        "\ufeff",
        "\u0120",
        "\u2581",
        "<0x41>",
        "<unk>",
        "<|turn",
        "turn|>",
        "<|",
        "|>",
        "<",
        "def f(x):",
        "Ça",
        "x",
        "42",
        "\x00",
        "\x7f",
        "ÿ",
    ]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(n)]


# -- tests -----------------------------------------------------------------------------


def test_import_brings_tokenizer_config_and_template(source, imported):
    out, report = imported
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        assert (out / name).is_file(), name
    assert report.converted == ["text", "tokenizer", "chat template"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == [1, 106, 50]  # <eos>, <turn|>, <|tool_response>: llama.cpp's stops
    info = cfg["gemma4_mlx_conversion"]["tokenizer"]
    assert (info["model"], info["tokens"], info["special_tokens"], info["chat_template"]) == ("gemma4", V, 24, True)
    ours = json.loads((out / "tokenizer_config.json").read_text())
    theirs = json.loads((source / "tokenizer_config.json").read_text())
    for key in [*NAMED, "bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "extra_special_tokens"]:
        assert ours[key] == theirs[key], key
    model, tok = gemma4_mlx.load(out)
    assert tok is not None and tok.chat_template == MINI_TEMPLATE
    assert set(tok.eos_token_ids) == {1, 106, 50}


def test_tokenization_equals_source(source, imported):
    """Through the project's loader (mlx-lm's wrapper over transformers' GemmaTokenizer,
    which rebuilds Gemma's normalizer from the class) and through tokenizer.json alone."""
    from tokenizers import Tokenizer

    theirs, ours = load_tokenizer(source), load_tokenizer(imported[0])
    theirs_file, ours_file = (Tokenizer.from_file(str(f / "tokenizer.json")) for f in (source, imported[0]))
    assert ours.convert_ids_to_tokens(list(range(V))) == theirs.convert_ids_to_tokens(list(range(V)))
    assert sorted(ours.all_special_ids) == sorted(theirs.all_special_ids)
    for text, i in _id_layout().items():  # every control string is one token, at its id
        assert ours.encode(text, add_special_tokens=False) == [i], text
    strings = _strings(400)
    assert sum(any(t in s for t in SPECIAL_TOKENS) for s in strings) > 200
    assert sum(any(ord(c) > 0xFFFF for c in s) for s in strings) > 50  # emoji etc.: byte fallback
    for s in strings:
        for special in (False, True):
            want = theirs.encode(s, add_special_tokens=special)
            assert ours.encode(s, add_special_tokens=special) == want, (s, special)
        assert ours.decode(want) == theirs.decode(want), s
        assert ours_file.encode(s).ids == theirs_file.encode(s).ids == want, s
        assert ours_file.decode(want, skip_special_tokens=False) == theirs_file.decode(want, skip_special_tokens=False)
        assert ours.decode(want, skip_special_tokens=True) == theirs.decode(want, skip_special_tokens=True), s
    chat = [{"role": "system", "content": "Be <|turn> brief 😀"}, {"role": "user", "content": '東京 <|"|>?'}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == theirs.apply_chat_template(
        chat, add_generation_prompt=True
    )


def test_generate_runs_on_the_import_as_on_the_source(source, imported):
    from typer.testing import CliRunner

    from gemma4_mlx.cli import app

    runs = [
        CliRunner().invoke(
            app,
            [
                "generate",
                "--model",
                str(m),
                "--prompt",
                "Hello 東京 😀 <|turn>",
                "-n",
                "12",
                "-q",
                "--draft-model",
                "none",
            ],
        )
        for m in (imported[0], source)
    ]
    for r in runs:
        assert r.exit_code == 0, r.output
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()
    model, tok = gemma4_mlx.load(imported[0], dtype="float32")
    ref, _ = gemma4_mlx.load(source, dtype="float32")
    ids = mx.array([tok.encode("<|turn>user\nHello 東京 😀<turn|>\n<|turn>model\n")])
    assert np.array_equal(np.array(model(ids)), np.array(ref(ids)))  # F32 weights: exact


def test_gguf_without_vocabulary_imports_weights_only(source, tmp_path):
    path = llama_cpp_gguf(source, tmp_path / "novocab.gguf", vocab=False)
    report = convert(path, tmp_path / "out", "q4_0", progress=False)
    assert report.converted == ["text"] and not (tmp_path / "out" / "tokenizer.json").exists()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["gemma4_mlx_conversion"]["tokenizer"].startswith("none")


def _set(key, value, vtype=None, sub=None):
    def edit(w):
        if value is None:
            del w.kv_data[0][key]
        elif vtype is None:
            w.add_array(key, value) if isinstance(value, list) else w.add_string(key, value)
        else:
            w.add_key_value(key, value, vtype, sub)

    return edit


T = gguf.GGUFValueType
BAD = {
    "model": (_set("tokenizer.ggml.model", "llama"), r"metadata key tokenizer\.ggml\.model is 'llama'"),
    "too_many": (
        _set("tokenizer.ggml.tokens", [f"t{i}" for i in range(V + 1)]),
        r"tokenizer\.ggml\.tokens lists 513 tokens; token_embd\.weight has 512 rows",
    ),
    "duplicate": (
        _set("tokenizer.ggml.tokens", ["a"] * 2 + [f"t{i}" for i in range(V - 2)]),
        r"tokenizer\.ggml\.tokens repeats token 'a' \(id 1\)",
    ),
    "types": (_set("tokenizer.ggml.token_type", [1] * 10), r"tokenizer\.ggml\.token_type must list a type"),
    "type_range": (_set("tokenizer.ggml.token_type", [9] * V), r"tokenizer\.ggml\.token_type must list a type"),
    "no_merges": (_set("tokenizer.ggml.merges", None), r"tokenizer\.ggml\.merges must be a non-empty list"),
    "merge": (_set("tokenizer.ggml.merges", ["zz qq"]), r"tokenizer\.ggml\.merges entry 0 \('zz qq'\)"),
    "merge_space": (_set("tokenizer.ggml.merges", ["er"]), r"tokenizer\.ggml\.merges entry 0 \('er'\)"),
    "eos": (_set("tokenizer.ggml.eos_token_id", 600, T.UINT32), r"tokenizer\.ggml\.eos_token_id is 600"),
    "template": (
        _set("tokenizer.chat_template", 7, T.UINT32),
        r"metadata key tokenizer\.chat_template must be a string",
    ),
    "template_name": (_set("tokenizer.chat_template.../x", "{{ 1 }}"), r"tokenizer\.chat_template\.\.\./x"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_vocabulary_metadata_is_refused_in_one_line(source, tmp_path, case):
    edit, message = BAD[case]
    path = llama_cpp_gguf(source, tmp_path / "bad.gguf", edit=edit)
    with pytest.raises(ConvertError, match=r"^\S*bad\.gguf: " + ".*" + message) as e:
        convert(path, tmp_path / "out", "q4_0", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_named_chat_templates_come_along(source, tmp_path):
    path = llama_cpp_gguf(source, tmp_path / "named.gguf", edit=_set("tokenizer.chat_template.tool_use", "{{ 'T' }}"))
    convert(path, tmp_path / "out", "q4_0", progress=False)
    assert (tmp_path / "out" / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ 'T' }}"
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == MINI_TEMPLATE
