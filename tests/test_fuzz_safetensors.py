"""Hostile safetensors files: every malformed header or data section ends in one
`LoadError` line, and nothing is ever allocated beyond the file's own size
(docs/hardening.md §1).  The four mutants that used to load are regression cases."""

from __future__ import annotations

import json
import math
import shutil
import struct

import mlx.core as mx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gemma4_mlx
from gemma4_mlx.checkpoint.files import LoadError, read_safetensors
from gemma4_mlx.formats.safetensors import ITEM_SIZE, read_header

from helpers.fuzz import fuzz_settings, one_line


def pack(header: dict, data: bytes, n_delta: int = 0, pad: int = 0) -> bytes:
    h = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(h) + n_delta) + h + data


def table(specs) -> tuple[dict, bytes]:
    """A valid (header, data) for [(name, dtype, shape)], tensors in order."""
    header, at = {}, 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * ITEM_SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    return header, bytes(range(256)) * (at // 256) + bytes(range(at % 256))


BASE = [("a", "F32", (2, 3)), ("b", "BF16", (4,)), ("c", "U8", (5,))]


def mutant(kind: str) -> bytes:
    h, d = table(BASE)
    a, b = h["a"], h["b"]
    if kind == "length_one_short":  # the JSON's padding absorbs it: data read one byte late
        return pack(h, d, n_delta=-1, pad=8)
    if kind == "length_one_long":
        return pack(h, d, n_delta=1)
    if kind == "overlap":  # b starts inside a; c keeps the total size
        b["data_offsets"] = [20, 28]
        h["c"]["data_offsets"] = [28, 37]
        return pack(h, d + b"\0" * 4)
    if kind == "alias":  # b reads a's bytes
        b.update(dtype="F32", shape=[6], data_offsets=list(a["data_offsets"]))
        return pack(h, d)
    if kind == "float_offsets":
        b["data_offsets"] = [24.0, 32.0]
        return pack(h, d)
    if kind == "hole":
        h["c"]["data_offsets"] = [33, 38]
        return pack(h, d + b"\0")
    if kind == "trailing_bytes":
        return pack(h, d + b"\0" * 7)
    if kind == "negative_offset":
        a["data_offsets"] = [-24, 0]
        return pack(h, d)
    if kind == "huge_shape":
        a["shape"] = [2**40, 2**40]
        return pack(h, d)
    if kind == "negative_shape":
        a["shape"] = [-2, -3]
        return pack(h, d)
    if kind == "unknown_dtype":
        a["dtype"] = "F128"
        return pack(h, d)
    if kind == "list_dtype":  # found by `make fuzz`: an unhashable dtype was a TypeError
        a["dtype"] = ["F32"]
        return pack(h, d)
    if kind == "bool_offsets":
        a["data_offsets"] = [False, True]
        return pack(h, d)
    if kind == "nan_offsets":
        return pack(h, d).replace(b"[0, 24]", b"[NaN, 24]")
    if kind == "duplicate_key":
        return pack(h, d).replace(b'"b"', b'"a"')
    if kind == "length_past_eof":
        return struct.pack("<Q", 2**63) + pack(h, d)[8:]
    if kind == "length_zero":
        return struct.pack("<Q", 0) + pack(h, d)[8:]
    if kind == "not_utf8":
        return pack(h, d).replace(b'"c"', b'"\xff"')
    if kind == "utf16":
        raw = json.dumps(h).encode("utf-16-le")
        return struct.pack("<Q", len(raw)) + raw + d
    if kind == "not_object":
        raw = json.dumps([h]).encode()
        return struct.pack("<Q", len(raw)) + raw + d
    if kind == "metadata_list":
        h["__metadata__"] = ["x"]
        return pack(h, d)
    if kind == "entry_not_object":
        h["b"] = [1, 2]
        return pack(h, d)
    if kind == "truncated":
        return pack(h, d)[:-5]
    if kind == "only_length":
        return pack(h, d)[:8]
    if kind == "empty":
        return b""
    raise AssertionError(kind)


KINDS = [
    "length_one_short",
    "length_one_long",
    "overlap",
    "alias",
    "float_offsets",
    "hole",
    "trailing_bytes",
    "negative_offset",
    "huge_shape",
    "negative_shape",
    "unknown_dtype",
    "list_dtype",
    "bool_offsets",
    "nan_offsets",
    "duplicate_key",
    "length_past_eof",
    "length_zero",
    "not_utf8",
    "utf16",
    "not_object",
    "metadata_list",
    "entry_not_object",
    "truncated",
    "only_length",
    "empty",
]


def test_valid_table_loads(tmp_path):
    f = tmp_path / "ok.safetensors"
    h, d = table(BASE)
    f.write_bytes(pack(h, d, pad=8))  # trailing spaces are allowed by the format
    out = read_safetensors(f)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (2, 3), "b": (4,), "c": (5,)}
    # a file MLX itself wrote passes too
    g = tmp_path / "mlx.safetensors"
    mx.save_safetensors(str(g), {"x": mx.ones((3, 5), mx.bfloat16), "y": mx.arange(7)}, metadata={"k": "v"})
    assert read_safetensors(g)["x"].shape == (3, 5)


@pytest.mark.parametrize("kind", KINDS)
def test_mutant_is_one_line_error(tmp_path, kind):
    f = tmp_path / "m.safetensors"
    f.write_bytes(mutant(kind))
    with pytest.raises(LoadError) as e:
        read_safetensors(f)
    msg = str(e.value)
    assert one_line(msg) and msg.startswith(f"{f}: unreadable safetensors"), msg


class Blob(bytes):
    def __repr__(self) -> str:  # hypothesis prints the strategy's arguments
        return f"<safetensors file, {len(self)} bytes>"


@pytest.fixture(scope="module")
def dense_bytes(checkpoints):
    return Blob((checkpoints["dense"].path / "model.safetensors").read_bytes())


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=6,
)


@st.composite
def header_mutation(draw, raw: bytes) -> bytes:
    """One hostile change to a real checkpoint's header or data section."""
    header, data = _split(raw)
    meta = header.pop("__metadata__", None)
    names = sorted(header)
    op = draw(st.sampled_from(["field", "alias", "shift", "length", "flip", "cut", "append"]))
    n_delta = 0
    if op == "field":
        name = draw(st.sampled_from(names))
        header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
    elif op == "alias":
        a, b = draw(st.sampled_from(names)), draw(st.sampled_from(names))
        header[a] = dict(header[b])
    elif op == "shift":
        name = draw(st.sampled_from(names))
        i, delta = draw(st.integers(0, 1)), draw(st.integers(-64, 64).filter(bool))
        header[name]["data_offsets"][i] += delta
    elif op == "length":
        n_delta = draw(st.integers(-16, 16).filter(bool))
    if meta is not None:
        header["__metadata__"] = meta
    out = bytearray(pack(header, data, n_delta=n_delta))
    if op == "flip":
        n = int.from_bytes(out[:8], "little")
        pos = draw(st.integers(0, n + 7))
        out[pos] ^= 1 << draw(st.integers(0, 7))
    elif op == "cut":
        del out[draw(st.integers(0, len(out) - 1)) :]
    elif op == "append":
        out += bytes(draw(st.integers(1, 64)))
    return bytes(out)


@given(data=st.data())
@fuzz_settings(60)
def test_fuzz_reader(tmp_path_factory, dense_bytes, data):
    raw = data.draw(header_mutation(dense_bytes))
    f = tmp_path_factory.mktemp("fz") / "model.safetensors"
    f.write_bytes(raw)
    try:
        arrays = read_safetensors(f)
    except LoadError as e:
        assert one_line(str(e)), str(e)
        return
    # accepted: the header tiles the data section, so the arrays fit in the file
    start, header = read_header(f)
    assert sum(a.nbytes for a in arrays.values()) == len(raw) - start
    mx.eval(list(arrays.values()))


@given(data=st.data())
@fuzz_settings(15)
def test_fuzz_loader(tmp_path_factory, checkpoints, dense_bytes, data):
    """The same mutations through `gemma4_mlx.load` of a whole checkpoint folder."""
    raw = data.draw(header_mutation(dense_bytes))
    d = tmp_path_factory.mktemp("ck") / "dense"
    shutil.copytree(checkpoints["dense"].path, d)
    (d / "model.safetensors").write_bytes(raw)
    try:
        gemma4_mlx.load(d, dtype="float32")
    except LoadError as e:
        assert one_line(str(e)), str(e)


@pytest.mark.parametrize("kind", ["length_one_short", "overlap", "alias", "float_offsets"])
def test_issue_mutants_refused_by_load(copy_dense, kind):
    """The four header mutants of issue #20 that used to load without error."""
    d = copy_dense
    f = d / "model.safetensors"
    header, data = _split(f.read_bytes())
    meta = header.pop("__metadata__", None)
    names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    first, second = header[names[0]], header[names[1]]
    n_delta, pad = 0, 0
    if kind == "length_one_short":
        n_delta, pad = -1, 8
    elif kind == "overlap":  # the second tensor starts one element early
        second["data_offsets"] = [o - 4 for o in second["data_offsets"]]
    elif kind == "alias":
        header[names[1]] = dict(first)
    else:
        second["data_offsets"] = [float(o) for o in second["data_offsets"]]
    if meta is not None:
        header["__metadata__"] = meta
    f.write_bytes(pack(header, data, n_delta=n_delta, pad=pad))
    with pytest.raises(LoadError, match="model.safetensors: unreadable safetensors"):
        gemma4_mlx.load(d, dtype="float32")


@pytest.fixture
def copy_dense(checkpoints, tmp_path):
    d = tmp_path / "dense"
    shutil.copytree(checkpoints["dense"].path, d)
    return d
