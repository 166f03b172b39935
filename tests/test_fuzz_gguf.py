"""Hostile GGUF files (docs/hardening.md §4): mutated counts, string lengths, type ids,
dims, alignment and tensor offsets end in one `ConvertError` line naming the file, in
bounded time and memory; nothing the reader accepts points outside the file."""

from __future__ import annotations

import resource
import struct
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemma4_mlx.convert import ConvertError, gguf_read
from gemma4_mlx.convert.gguf_read import GGUFFile

from helpers.fuzz import fuzz_settings, one_line
from test_gguf_info import metadata, write_gguf


class Blob(bytes):
    def __repr__(self) -> str:  # hypothesis prints the strategy's arguments
        return f"<GGUF sample, {len(self)} bytes>"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> bytes:
    rng = np.random.default_rng(1)
    tensors = [
        ("token_embd.weight", 0, (8, 32), rng.standard_normal((8, 32)).astype(np.float32).tobytes()),
        ("blk.0.attn_q.weight", 1, (4, 32), rng.standard_normal((4, 32)).astype(np.float16).tobytes()),
        ("blk.0.ffn_up.weight", 8, (2, 32), bytes(range(34)) * 2),  # Q8_0: 34 bytes per 32 values
    ]
    path = tmp_path_factory.mktemp("gg") / "s.gguf"
    write_gguf(path, metadata(**{"tokenizer.ggml.tokens": ["a", "b", "<|turn>"], "general.name": "tiny"}), tensors)
    return Blob(path.read_bytes())


def _header_end(raw: bytes) -> int:
    """Where the tensor data starts (the mutations aim at everything before it)."""
    return len(raw) - (32 * 8 * 4 + 4 * 32 * 2 + 96)  # the three tensors' padded bytes


HOSTILE_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1]
HOSTILE_U32 = [0, 1, 13, 31, 255, 2**16, 2**31, 2**32 - 1]


@st.composite
def mutated(draw, raw: bytes) -> bytes:
    out = bytearray(raw)
    end = _header_end(raw)
    ops = draw(st.lists(st.sampled_from(["u64", "u32", "byte", "cut", "counts"]), min_size=1, max_size=3))
    for op in sorted(ops, key=lambda o: o == "cut"):  # a cut last: positions stay in the file
        if op == "counts":  # tensor_count, kv_count
            pos = draw(st.sampled_from([8, 16]))
            out[pos : pos + 8] = struct.pack("<Q", draw(st.sampled_from(HOSTILE_U64)))
        elif op == "u64":  # a string / array length, a dim, a tensor offset
            pos = draw(st.integers(24, end - 8))
            out[pos : pos + 8] = struct.pack("<Q", draw(st.sampled_from(HOSTILE_U64)))
        elif op == "u32":  # a value type, an array item type, n_dims, a ggml type
            pos = draw(st.integers(24, end - 4))
            out[pos : pos + 4] = struct.pack("<I", draw(st.sampled_from(HOSTILE_U32)))
        elif op == "byte":
            pos = draw(st.integers(0, end - 1))
            out[pos] ^= 1 << draw(st.integers(0, 7))
        else:
            del out[draw(st.integers(0, len(out) - 1)) :]
            break
    return bytes(out)


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@given(data=st.data())
@fuzz_settings(80)
def test_fuzz_gguf_reader(tmp_path_factory, sample, data):
    raw = data.draw(mutated(sample))
    f = tmp_path_factory.mktemp("m") / "m.gguf"
    f.write_bytes(raw)
    rss, t0 = _rss(), time.perf_counter()
    try:
        g = GGUFFile(f)
        for key in g.metadata:
            try:
                g.metadata[key]
            except ConvertError as e:
                assert one_line(str(e)) and str(f) in str(e), str(e)
        for name, t in g.tensors.items():
            try:
                arr = g.raw(name)
            except ConvertError as e:
                assert one_line(str(e)) and str(f) in str(e), str(e)
                continue
            assert arr.nbytes == t.nbytes <= len(raw)
    except ConvertError as e:
        assert one_line(str(e)) and str(f) in str(e), str(e)
    assert time.perf_counter() - t0 < 5
    assert _rss() - rss < 256 * 2**20  # no allocation sized by a hostile count


@pytest.mark.parametrize("pos_name", ["tensor_count", "kv_count"])
@pytest.mark.parametrize("value", [2**63, 2**64 - 1, 2**32])
def test_hostile_counts(tmp_path, sample, pos_name, value):
    raw = bytearray(sample)
    pos = 8 if pos_name == "tensor_count" else 16
    raw[pos : pos + 8] = struct.pack("<Q", value)
    f = tmp_path / "c.gguf"
    f.write_bytes(bytes(raw))
    with pytest.raises(ConvertError) as e:
        GGUFFile(f)
    assert one_line(str(e.value)) and str(f) in str(e.value)


@pytest.mark.parametrize("alignment", [0, 1, 3, 2**31 - 1])
def test_hostile_alignment(tmp_path, alignment):
    rng = np.random.default_rng(2)
    tensors = [("token_embd.weight", 0, (8, 32), rng.standard_normal((8, 32)).astype(np.float32).tobytes())]
    f = tmp_path / "a.gguf"
    write_gguf(f, metadata(**{"general.alignment": alignment}), tensors)
    try:
        g = GGUFFile(f)
    except ConvertError as e:
        assert one_line(str(e)) and str(f) in str(e)
        return
    assert all(t.nbytes <= f.stat().st_size for t in g.tensors.values())


def _array_kv(key: str, n: int, body: bytes = b"") -> bytes:
    """A uint8 array value declaring n elements (body: the bytes actually there)."""
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IIQ", 9, 0, n) + body


def test_an_array_past_the_metadata_cap_is_refused_before_its_elements(tmp_path):
    """gguf-py builds numpy views per array element (~700 bytes each): a 4 MB file of
    one-byte elements took 3 GB and 40 s before the cap.  Refused from its declared length."""
    n = gguf_read.MAX_VALUES + 1
    f = tmp_path / "amp.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _array_kv("tokenizer.ggml.scores", n, bytes(n)))
    rss, t0 = _rss(), time.perf_counter()
    with pytest.raises(ConvertError) as e:
        GGUFFile(f)
    assert time.perf_counter() - t0 < 2 and _rss() - rss < 64 * 2**20
    assert str(e.value) == (
        f"{f}: metadata key 'tokenizer.ggml.scores' takes the file past {gguf_read.MAX_VALUES} metadata values;"
        " refusing to parse more"
    )


def test_the_metadata_cap_counts_every_value_once(tmp_path, monkeypatch):
    """Top-level values count one, arrays their declared length (elements not again): a
    file with exactly the cap parses, one value fewer allowed is refused naming the key."""
    md = metadata(**{"tokenizer.ggml.tokens": ["a", "b", "c"]})
    f = tmp_path / "m.gguf"
    write_gguf(f, md, [])
    values = len(md) + sum(len(v) for v in md.values() if isinstance(v, list))
    monkeypatch.setattr(gguf_read, "MAX_VALUES", values)
    assert GGUFFile(f).metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    monkeypatch.setattr(gguf_read, "MAX_VALUES", values - 1)
    with pytest.raises(ConvertError, match=f"metadata key '{list(md)[-1]}' takes the file past {values - 1} "):
        GGUFFile(f)  # the last key, an array of three
