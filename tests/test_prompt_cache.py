"""Prompt caches on disk (docs/kv-cache.md §8): a saved and reloaded cache — float or
quantized, sliding layers past their window included — continues bit for bit as the
never-saved one; saved chats continue identically; files made for another model,
dtype or kv_bits, and damaged files, are refused with one line; the checkpoint
fingerprint that names the model covers sampled weight bytes.  Also the batched
speculative entry with kv_bits (§5)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

import gemma4_mlx
from gemma4_mlx.cache import disk
from gemma4_mlx.chat import saved
from gemma4_mlx.chat.session import Chat
from gemma4_mlx.checkpoint.files import WHOLE, LoadError, fingerprint, read_safetensors
from gemma4_mlx.checkpoint.load import load_model
from gemma4_mlx.checkpoint.prompt_cache import CacheFileError, load_prompt_cache, save_prompt_cache
from gemma4_mlx.cli import app
from gemma4_mlx.demo import DEMO_DRAFTER, DEMO_MODEL
from gemma4_mlx.formats.safetensors import read_header
from gemma4_mlx.runtime.generate import batch_generate, generate_tokens, prefill
from gemma4_mlx.speculative.loop import speculative_batch_generate

from helpers.checkpoints import W, random_ids
from helpers.mtp_pairs import PAIRS


def same_state(a, b) -> bool:
    """Every cache-owning layer holds the same offset and bit-identical retained K/V."""
    for x, y in zip(a, b):
        if (x is None) != (y is None):
            return False
        if x is None:
            continue
        if x.offset != y.offset:
            return False
        for p, q in zip(x.state, y.state):
            p, q = (t if isinstance(t, tuple) else (t,) for t in (p, q))
            if len(p) != len(q) or not all(s.shape == t.shape and mx.array_equal(s, t).item() for s, t in zip(p, q)):
                return False
    return True


def filled(model, ids, bits, rollback=8):
    cache = model.make_cache(max_rollback=rollback, kv_bits=bits)
    mx.eval(prefill(model, mx.array([ids]), cache, chunk_size=5))  # chunked, as a long prompt is
    return cache


# (family, kv_bits): every family at 8 and 4 bits, and float caches on two of them
ROUND_TRIPS = [(n, b) for n in PAIRS for b in (8, 4)] + [("dense", 16), ("e2b_like", 16)]


@pytest.mark.parametrize("name, bits", ROUND_TRIPS)
def test_disk_round_trip_continues_bit_for_bit(pairs, name, bits, tmp_path):
    """Saved past the sliding window, reloaded: the same entries, and every later
    step — decoding, rolling back, greedy generation — gives identical logits."""
    model, _ = pairs[name]
    ids = random_ids(4 * W + 3, seed=bits)
    live = filled(model, ids, bits)
    assert any(c.window is not None and c.offset > c.window for c in live.writers())  # past the window
    path = tmp_path / "p.kv"
    save_prompt_cache(path, model, live, ids)
    loaded = load_prompt_cache(path, model, kv_bits=bits, max_rollback=8)
    assert loaded.keys == ids and same_state(loaded.cache, live)
    if bits != 16:
        assert all(isinstance(c.state[0], tuple) for c in loaded.cache.writers())
    got = loaded.cache
    for step in ([7, 9, 11], [5]):
        a, b = model(mx.array([step]), live), model(mx.array([step]), got)
        assert mx.array_equal(a, b).item()
    live.trim(3), got.trim(3)  # a rollback after the restore
    cont = random_ids(4, seed=9)
    want = list(generate_tokens(model, cont, max_tokens=8, cache=live))
    assert list(generate_tokens(model, cont, max_tokens=8, cache=got)) == want
    assert same_state(got, live)


def test_refused_when_made_for_another_model_dtype_or_kv_bits(pairs, checkpoints, tmp_path):
    dense, _ = pairs["dense"]
    moe, _ = pairs["moe"]
    ids = random_ids(2 * W + 1, seed=1)
    path = tmp_path / "dense.kv"
    save_prompt_cache(path, dense, filled(dense, ids, 8), ids)
    with pytest.raises(CacheFileError, match=r"dense.kv: made for another model \('dense'.*not 'moe'"):
        load_prompt_cache(path, moe, kv_bits=8)
    with pytest.raises(CacheFileError, match=r"dense.kv: its KV cache is 8-bit, this run uses 16-bit"):
        load_prompt_cache(path, dense)
    bf16, _ = load_model(checkpoints["dense"].path, "bfloat16")
    with pytest.raises(CacheFileError, match="made with the model in float32, this one runs in bfloat16"):
        load_prompt_cache(path, bf16, kv_bits=8)
    load_prompt_cache(path, dense, kv_bits=8)  # the right one loads


def test_damaged_files_are_refused_in_one_line(pairs, tmp_path):
    model, _ = pairs["e2b_like"]
    ids = random_ids(2 * W + 3, seed=2)
    good = tmp_path / "good.kv"
    save_prompt_cache(good, model, filled(model, ids, 4), ids)
    data = good.read_bytes()

    def refused(raw: bytes, match: str) -> None:
        bad = tmp_path / "bad.kv"
        bad.write_bytes(raw)
        with pytest.raises(CacheFileError, match=match) as e:
            load_prompt_cache(bad, model, kv_bits=4)
        assert "\n" not in str(e.value) and str(bad) in str(e.value)

    refused(data[: len(data) - 100], "unreadable or truncated")
    flipped = bytearray(data)
    flipped[-5] ^= 0x40  # one bit of the last tensor's data
    refused(bytes(flipped), "corrupt cache file")
    refused(b"not a cache at all", "unreadable or truncated")
    refused(json.dumps({"messages": []}).encode(), "unreadable or truncated")
    other = tmp_path / "plain.safetensors"  # a safetensors file, but no cache of ours
    mx.save_safetensors(str(other), {"x": mx.zeros((2,))})
    refused(other.read_bytes(), "not a gemma4-mlx KV cache file")
    with pytest.raises(CacheFileError, match="no such file"):
        load_prompt_cache(tmp_path / "absent.kv", model, kv_bits=4)


def tiny_checkpoint(folder, edit=None):
    """config.json and one safetensors file: a norm weight (256 B, hashed whole) and a
    [128, 256] float32 matrix (128 KiB, sampled); `edit(norm, big)` changes values
    in place (a fine-tune: same config, names, shapes and header)."""
    norm = np.linspace(0.5, 1.5, 64, dtype=np.float32)
    big = np.arange(128 * 256, dtype=np.float32).reshape(128, 256) / 1000
    if edit is not None:
        edit(norm, big)
    assert norm.nbytes <= WHOLE < big.nbytes
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gemma4_text"}')
    mx.save_safetensors(str(folder / "model.safetensors"), {"norm.weight": mx.array(norm), "big.weight": mx.array(big)})
    return fingerprint(folder)


def test_fingerprint_covers_weight_bytes(tmp_path):
    """Same config and header, other values: another fingerprint, whether the change is
    in a small tensor or at the start, middle or end of a large one."""
    base = tiny_checkpoint(tmp_path / "base")
    assert len(base) == 32 and int(base, 16) >= 0
    assert tiny_checkpoint(tmp_path / "copy") == base  # an identical copy elsewhere

    def changed(name, edit):
        fp = tiny_checkpoint(tmp_path / name, edit)
        assert read_header(tmp_path / name / "model.safetensors") == read_header(tmp_path / "base/model.safetensors")
        return fp

    assert changed("norm", lambda n, b: n.__setitem__(37, 1.25)) != base
    assert changed("middle", lambda n, b: b.__setitem__((64, 0), -1.0)) != base  # element 16384 of 32768
    assert changed("start", lambda n, b: b.__setitem__((0, 3), -1.0)) != base
    assert changed("end", lambda n, b: b.__setitem__((127, 250), -1.0)) != base
    # the documented blind spot (docs/kv-cache.md §8): a change only between samples
    assert changed("quarter", lambda n, b: b.__setitem__((32, 0), -1.0)) == base


def test_fingerprint_of_files_that_are_not_safetensors(tmp_path):
    """A shard the index names that is not safetensors, or a malformed header: hashed by
    sampled raw bytes (no traceback); the loader refuses the file in one line."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "weights.bin"}}))
    raw = bytearray(np.arange(100_000, dtype=np.uint32).tobytes())  # 400 kB
    (folder / "weights.bin").write_bytes(raw)
    before = fingerprint(folder)
    raw[200_000] ^= 1  # the middle of the file
    (folder / "weights.bin").write_bytes(raw)
    assert fingerprint(folder) != before

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes((12).to_bytes(8, "little") + b'{"x": [[[[[' + bytes(100))
    assert len(fingerprint(bad)) == 32
    with pytest.raises(LoadError, match="model.safetensors: unreadable safetensors") as e:
        read_safetensors(bad / "model.safetensors")
    assert "\n" not in str(e.value)


def test_refused_by_a_model_that_differs_only_in_weight_bytes(pairs, checkpoints, tmp_path):
    """A fine-tune of the dense checkpoint (one norm weight's values changed in place:
    config, names and headers identical) does not accept the original's prompt cache."""
    model, _ = pairs["dense"]
    tuned = tmp_path / "dense"
    shutil.copytree(checkpoints["dense"].path, tuned)
    (weights,) = tuned.glob("*.safetensors")
    start, entries = read_header(weights)
    name = next(k for k in entries if k.endswith("layers.2.input_layernorm.weight"))
    begin, end = entries[name]["data_offsets"]
    assert end - begin <= WHOLE
    data = bytearray(weights.read_bytes())
    data[start + (begin + end) // 2] ^= 0x01  # one bit of one value: a tiny update
    weights.write_bytes(data)
    other, _ = load_model(tuned, "float32")
    ids = random_ids(W + 3, seed=5)
    path = tmp_path / "orig.kv"
    save_prompt_cache(path, model, filled(model, ids, 16), ids)
    with pytest.raises(CacheFileError, match=r"made for another model \('dense', fingerprint .*not 'dense'") as e:
        load_prompt_cache(path, other)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: ")
    load_prompt_cache(path, model)  # the original still loads it


def test_shapes_that_do_not_fit_the_model_are_refused(pairs, tmp_path):
    """A well-formed file (checksum recomputed) whose tensors do not fit the model's
    layers: refused before any cache changes."""
    model, _ = pairs["moe"]
    ids = random_ids(W + 3, seed=4)
    good = tmp_path / "good.kv"
    save_prompt_cache(good, model, filled(model, ids, 8), ids)
    tensors, meta = disk.read(good)

    def refused(tensors, meta, match):
        bad = tmp_path / "bad.safetensors"  # mx.save_safetensors adds the suffix if missing
        mx.save_safetensors(str(bad), tensors, metadata={**meta, "checksum": disk._checksum(tensors)})
        with pytest.raises(CacheFileError, match=match):
            load_prompt_cache(bad, model, kv_bits=8)

    name = "layers.0.keys.scales"
    refused({**tensors, name: tensors[name][:, :1]}, meta, rf"layer 0: {name} is \[1, 1, .*expected \[1, 2, S")
    del tensors["layers.2.values.biases"]
    refused(tensors, meta, "layer 2: layers.2.values.biases missing")
    layers = json.loads(meta["layers"])
    layers[0]["window"] = 99
    refused(disk.read(good)[0], {**meta, "layers": json.dumps(layers)}, "layer 0: sliding window 99, the model's is 4")


def test_a_failed_write_leaves_the_old_file(pairs, tmp_path, monkeypatch):
    model, _ = pairs["dense"]
    ids = random_ids(W + 2, seed=3)
    path = tmp_path / "p.kv"
    save_prompt_cache(path, model, filled(model, ids, 16), ids)
    before = path.read_bytes()

    def crash(name, *a, **k):
        with open(name, "wb") as f:
            f.write(b"half")  # a partial write, then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(disk.mx, "save_safetensors", crash)
    with pytest.raises(CacheFileError, match="p.kv: cannot write the cache file \\(disk full\\)"):
        save_prompt_cache(path, model, filled(model, ids[:-1], 16), ids[:-1])
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["p.kv"]


@pytest.fixture(scope="module")
def demo():
    return gemma4_mlx.load(DEMO_MODEL)


@pytest.mark.parametrize("bits", [16, 4])
def test_saved_chat_continues_identically(demo, bits, tmp_path):
    model, tok = demo
    live = Chat(model, tok, max_tokens=24, kv_bits=bits, system="Answer briefly.")
    for q in ("What is the capital of France?", "What is 3 plus 4?", "Hello"):
        live.send(q)
    assert len(live.cached) > model.config.sliding_window  # past the window
    path = tmp_path / "chat.kv"
    live.save(path, with_cache=True)
    loaded = Chat.load(path, model, tok, max_tokens=24)
    assert loaded.messages == live.messages and loaded.system == live.system and loaded.cached == live.cached
    assert loaded.kv_bits == (None if bits == 16 else bits) and loaded.max_rollback == live.max_rollback
    assert same_state(loaded.cache, live.cache)
    a, b = live.send("Add 12 and 9."), loaded.send("Add 12 and 9.")
    assert a.text == b.text and loaded.prefilled_last == live.prefilled_last < 30  # only the new turn
    assert same_state(loaded.cache, live.cache)

    # without the cache: the same conversation, re-prefilled on the next turn
    live.save(tmp_path / "chat.json")
    text_only = Chat.load(tmp_path / "chat.json", model, tok, max_tokens=24, kv_bits=bits)
    assert text_only.messages == live.messages and text_only.cached == []
    assert text_only.send("Hello").text == live.send("Hello").text
    assert text_only.prefilled_last > live.prefilled_last

    with pytest.raises(CacheFileError, match="chat.kv: its KV cache is"):
        Chat.load(path, model, tok, kv_bits=8)
    live.messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "this?"}]})
    with pytest.raises(ValueError, match="cannot save a conversation with media"):
        live.save(tmp_path / "media.kv", with_cache=True)


def test_a_failed_save_keeps_the_previous_one(demo, tmp_path, monkeypatch):
    """A saved chat is written to a temporary file and renamed: a write that fails
    (a full disk) leaves the earlier save readable, and says which file."""
    model, tok = demo
    chat = Chat(model, tok)
    chat.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "chat.json"
    chat.save(path)
    before = path.read_text()
    chat.messages.append({"role": "user", "content": "more " * 100})

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saved.os, "fsync", full_disk)
    with pytest.raises(OSError, match=r"No space left on device: '.*/chat\.json'"):
        chat.save(path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["chat.json"]
    assert Chat.load(path, model, tok).messages == chat.messages[:2]
    monkeypatch.undo()
    path.chmod(0o600)  # a rename keeps what the user set, and follows a link to its file
    link = tmp_path / "link.json"
    link.symlink_to(path)
    chat.save(link)
    assert link.is_symlink() and path.stat().st_mode & 0o777 == 0o600
    assert Chat.load(path, model, tok).messages == chat.messages


def cli(*args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.stdout


def test_cli_cache_prompt_then_generate_equals_plain_generate(demo, tmp_path):
    doc = "The capital of France is Paris. The capital of Japan is Tokyo. " * 3  # past the window of 64
    (tmp_path / "doc.txt").write_text(doc)
    out = tmp_path / "doc.kv"
    cli("cache-prompt", "-m", DEMO_MODEL, "-f", tmp_path / "doc.txt", "--kv-bits", "8", "-q", out)
    base = ["generate", "-m", DEMO_MODEL, "-n", "16", "--draft-model", "none"]
    quiet8 = [*base, "-q", "--kv-bits", "8"]
    for question in ("What is the capital of Japan?", "Is Paris in France?"):
        plain = cli(*quiet8, "-p", doc + question)
        assert plain.strip()
        assert cli(*quiet8, "-p", doc + question, "--prompt-cache", out) == plain
    # the reuse is real: the statistics line counts the cached prompt tokens apart
    r = CliRunner().invoke(app, [*map(str, base), "--kv-bits", "8", "-p", doc + "Hi", "--prompt-cache", str(out)])
    assert r.exit_code == 0 and " cached), " in r.output, r.output
    # speculative decoding (the demo's drafter) from the loaded cache: the same text
    spec = [*quiet8[:-5], "-q", "--kv-bits", "8", "--draft-model", DEMO_DRAFTER, "--draft-tokens", "3"]
    assert cli(*spec, "-p", doc + question, "--prompt-cache", out) == plain
    # chat --prompt-cache: the same reply as without
    chat = ["chat", "-m", DEMO_MODEL, "-n", "16", "--kv-bits", "8", "--draft-model", "none", "-p", doc + "Hello"]
    assert cli(*chat, "--prompt-cache", out) == cli(*chat)
    # another kv_bits: one line naming the file, exit 1
    r = CliRunner().invoke(app, [*map(str, base), "-p", "Hi", "--prompt-cache", str(out)])
    assert r.exit_code == 1 and f"error: {out}: its KV cache is 8-bit, this run uses 16-bit" in r.output


def oracle(refs: list[list[int]], every: int):
    """Draft override: each row's reference continuation, wrong at every `every`-th draft
    (rows accept different counts: ragged commits)."""
    calls = [0]

    def override(rows, index, drafts):
        out = []
        for r, n, d in zip(rows, index, drafts):
            row = []
            for i in range(len(d)):
                calls[0] += 1
                want = refs[r][n + i] if n + i < len(refs[r]) else d[i]
                row.append(want if calls[0] % every else (want + 1) % 256)
            out.append(row)
        return out

    return override


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(PAIRS))
def test_speculative_batch_with_kv_bits_equals_plain_batch(pairs, name, bits):
    target, drafter = pairs[name]
    prompts = [random_ids(n, seed=n + bits) for n in (5, 13, 9)]
    plain = batch_generate(target, prompts, max_tokens=10, kv_bits=bits)
    quantized = []

    def on_commit(caches, rows, outputs):
        quantized.append(all(isinstance(c.state[0], tuple) for c in caches.writers()))

    spec = speculative_batch_generate(
        target,
        drafter,
        prompts,
        max_tokens=10,
        draft_tokens=3,
        kv_bits=bits,
        draft_override=oracle(plain, 4),
        on_commit=on_commit,
    )
    assert spec == plain
    assert quantized and all(quantized)


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    from helpers.mm_configs import write_chat_checkpoint

    return gemma4_mlx.load(write_chat_checkpoint(tmp_path_factory.mktemp("mm_cache")), dtype="float32")


def test_media_keys_decide_what_a_prompt_cache_serves(multimodal, tmp_path):
    """The file keeps each placeholder's content key: the same picture reuses the
    cached image, another picture at the same place reuses only what precedes it."""
    import numpy as np
    from PIL import Image

    def picture(seed):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8))

    model, tok = multimodal
    path, deep = tmp_path / "img.kv", tmp_path / "deep.kv"
    n = gemma4_mlx.cache_prompt(model, tok, "look closely", path, images=[picture(1)])
    gemma4_mlx.cache_prompt(model, tok, "look closely", deep, images=[picture(1)], max_rollback=n)

    def run(prompt, seed, **kw):
        chunks = list(gemma4_mlx.stream_generate(model, tok, prompt, images=[picture(seed)], max_tokens=5, **kw))
        return "".join(c.text for c in chunks), chunks[-1].stats

    keys = load_prompt_cache(path, model).keys
    first_media = next(i for i, k in enumerate(keys) if isinstance(k, tuple))
    # the same picture: all but the file's last few tokens are reused; another one:
    # what precedes it, when the sliding layers kept enough slack to roll back that
    # far (else the prompt is prefilled from scratch: exact either way)
    for seed, file, reused in ((1, path, n - 10), (2, deep, first_media), (2, path, 0)):
        text, stats = run("look closely, then describe", seed, prompt_cache=file)
        assert stats.prompt_cached >= reused and (seed == 1 or stats.prompt_cached == reused), (seed, stats)
        assert text == run("look closely, then describe", seed)[0]


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    """A safetensors file written byte for byte (headers MLX's writer would not make)."""
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_crafted_files_are_refused_in_one_line(pairs, tmp_path):
    """Reviews found these escaping as tracebacks or loading silently: a tensor of
    negative shape (MLX takes it: the byte count matches), metadata that is not a
    string or is 100,000 levels deep, K/V of another dtype than the model's, token ids
    outside the vocabulary (the checksum covers tensors, not metadata)."""
    model, _ = pairs["dense"]
    ids = random_ids(W + 3, seed=5)
    good = tmp_path / "good.kv"
    save_prompt_cache(good, model, filled(model, ids, None), ids)
    tensors, meta = disk.read(good)

    def refused(path, match):
        with pytest.raises(CacheFileError, match=match) as e:
            load_prompt_cache(path, model)
        assert "\n" not in str(e.value) and str(path) in str(e.value)

    neg = tmp_path / "neg.kv"
    _raw_safetensors(
        neg,
        {"__metadata__": meta, "layers.0.keys": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}},
        bytes(16),
    )
    refused(neg, r"malformed tensor layers.0.keys \(shape \[-1, -4\]\)")
    odd = tmp_path / "odd.kv"
    _raw_safetensors(odd, {"__metadata__": {**meta, "extra": {"chat": 1}}}, b"")
    with pytest.raises(CacheFileError, match="extra is not a string|unreadable"):
        disk.read_metadata(odd)

    def resaved(name, tensors=tensors, **edits):
        path = tmp_path / f"{name}.safetensors"
        mx.save_safetensors(str(path), tensors, metadata={**meta, **edits, "checksum": disk._checksum(tensors)})
        return path

    refused(resaved("deep", extra="[" * 100_000), r"malformed cache metadata \(extra\)")
    half = {n: t.astype(mx.float16) for n, t in tensors.items()}
    refused(resaved("half", half, dtype="float16"), "K/V stored as float16 for a float32 model")
    vocab = model.config.vocab_size
    refused(resaved("vocab", tokens=json.dumps([*ids[:-1], vocab])), rf"malformed cache metadata \(token {vocab}\)")
    layers = json.loads(meta["layers"])
    sliding = max(i for i, info in enumerate(layers) if info is not None and info["window"] is not None)
    layers[sliding]["offset"] += 1 << 40  # a sliding layer's slots fit any offset: this loaded
    refused(resaved("offsets", layers=json.dumps(layers)), "its layers disagree on the tokens they hold")
    assert load_prompt_cache(resaved("same"), model).keys == list(ids)  # the untouched file loads
