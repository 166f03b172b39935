"""Structured outputs: grammar-engine mask time on Gemma 4's 262,144-piece vocabulary,
schema coverage, and the decode overhead of constraints (docs/structured-output.md §1, §6).

1. Engines (llguidance, xgrammar, outlines-core) on the same vocabulary: for each
   JSON schema of the test set, the compile time, whether it compiles at all, and
   the mean / worst time per token to compute the next-token mask while walking
   a valid instance (the engine then accepts the token).  The vocabulary is a
   synthetic Gemma-shaped one (no real Gemma 4 tokenizer is available offline):
   control tokens at Gemma's ids, 256 byte-fallback pieces, "▁"-prefixed words,
   all 1-2 character ASCII pieces, digit runs, punctuation runs and CJK pieces,
   262,144 in all, in the layout of `convert/gguf_tokenizer.py`'s rebuild.
2. Decode: tokens/s of the E2B-shaped random model (bench_text.SHAPES, V = 262,144)
   unconstrained vs under a JSON schema and a regex (greedy, same number of tokens,
   no stop), i.e. the masks' per-token overhead on the decode loop.

    python bench/bench_structured.py [--quick]     # --quick: 4 layers, fewer tokens / schemas
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import gemma4_mlx  # noqa: F401  (OpenBLAS first)

# isort: split
import llguidance as llg
import mlx.core as mx
import numpy as np
from bench_text import SHAPES
from mlx.utils import tree_flatten

from gemma4_mlx.config import TextConfig
from gemma4_mlx.constrain import Constraint, json_schema, regex
from gemma4_mlx.constrain.grammar import JSON_OPTIONS
from gemma4_mlx.models.text import Model
from gemma4_mlx.prompt.template import SPECIAL_TOKENS
from gemma4_mlx.runtime.generate import SamplingOptions, Stats, generate_tokens

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from test_structured import SCHEMAS  # noqa: E402  (the test set's schemas, one source)

V = 262144
EXTRA = {  # beyond the test set: what users send that engines differ on
    "recursive $ref": {
        "$defs": {
            "node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
        },
        "$ref": "#/$defs/node",
    },
    "format email": {"type": "string", "format": "email"},
    "minLength": {"type": "string", "minLength": 3, "maxLength": 5},
    "patternProperties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
}
STRINGS = [  # string-heavy walks: a bounded string makes llguidance walk the whole token trie
    ({"type": "array", "items": {"type": "string", "maxLength": 12}}, ["abc", "de", "fghij", "k", "lmnop"] * 2),
    ({"type": "array", "items": {"type": "string"}}, ["abc", "de", "fghij", "k", "lmnop"] * 2),
]
INSTANCES = [  # one valid instance per SCHEMAS entry (the walk)
    {"name": "ada", "age": 36, "admin": True},
    "green",
    [1, -2, 3],
    {"user": {"id": 42, "role": "b"}},
    "xx",
    "2024-02-29",
    {"ok": True, "none": None, "p": 1},
    [{"k": "x", "v": False}, {"k": "y"}],
    "two",
    {"a": 2, "b": "07"},
    [{"x": 1, "y": 2}],
    "123e4567-e89b-12d3-a456-426614174000",
    {"t": "a"},
]


# -- a Gemma-shaped 262,144-piece vocabulary -----------------------------------------------
def synthetic_pieces(n: int, seed: int = 0) -> list[bytes]:
    """n distinct byte strings: 1-2 char ASCII, digit runs, punctuation runs, CJK
    characters, then English-like words (half with a leading space)."""
    rng = random.Random(seed)
    out, seen = [], set()

    def add(b: bytes):
        if b and b not in seen and len(out) < n:
            seen.add(b)
            out.append(b)

    add(b" ")  # Gemma has the lone "▁": without it a space a grammar forces falls back to bytes
    printable = [chr(c) for c in range(33, 127)]
    for a in printable:
        add(a.encode())
        add((" " + a).encode())
    for a in printable:
        for b in printable:
            add((a + b).encode())
    for k in range(2, 5):
        for i in range(10**k if k < 4 else 3000):
            add(str(i).zfill(k).encode())
    for p in ['{"', '":', '",', '"}', '":"', '"},{"', "[{", "}]", "\n", "\n\n", "  ", "    ", "\t"]:
        add(p.encode())
    for c in range(0x4E00, 0x4E00 + 20000):
        add(chr(c).encode())
    letters, weights = (
        "etaoinshrdlcumwfgypbvkjxqz",
        [12, 9, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1],
    )
    while len(out) < n:
        w = "".join(rng.choices(letters, weights, k=rng.randint(2, 12)))
        w = w.capitalize() if rng.random() < 0.15 else w
        add(((" " if rng.random() < 0.5 else "") + w).encode())
    return out


def gemma_shaped_tokenizer(work: Path) -> tuple[str, list[bytes | None]]:
    """(tokenizer.json text, per id: the piece's bytes, None for control tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    path = work / "gemma-262k-synthetic-v2.json"  # v2: with the lone space piece
    controls = dict(SPECIAL_TOKENS)
    free = [i for i in range(V) if i not in controls.values()]
    pieces = [f"<0x{b:02X}>".encode() for b in range(256)] + synthetic_pieces(len(free) - 256)
    by_id: list[bytes | None] = [None] * V
    vocab = {t: i for t, i in controls.items()}
    for i, p in zip(free, pieces):
        by_id[i] = bytes([int(p[3:5], 16)]) if p.startswith(b"<0x") and len(p) == 6 else p
        vocab[p.decode().replace(" ", "\u2581") if not p.startswith(b"<0x") or len(p) != 6 else p.decode()] = i
    if not path.exists():
        tok = Tokenizer(BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in controls])
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(tok.to_str())
    return path.read_text(), by_id


# -- the engines, behind one small interface ----------------------------------------------
class Llguidance:
    name = "llguidance"

    def __init__(self, tj: str, by_id):
        self.tok = llg.LLTokenizer(tj, n_vocab=V, eos_token=1)

    def compile(self, schema):
        g = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        err = llg.LLMatcher.validate_grammar(g, self.tok)
        if err:
            raise ValueError(err.splitlines()[0])
        return g

    def walk(self, compiled, ids):
        m = llg.LLMatcher(self.tok, compiled, log_level=0)
        out = np.zeros((V + 31) // 32, dtype=np.int32)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
            times.append(time.perf_counter() - t0)
            assert m.consume_token(t), "llguidance refused the instance"
        return times


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tj: str, by_id):
        import xgrammar as xgr

        self.xgr = xgr
        vocab = [b if b is not None else b"" for b in by_id]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=V, stop_token_ids=[1])
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def walk(self, compiled, ids):
        m = self.xgr.GrammarMatcher(compiled)
        mask = self.xgr.allocate_token_bitmask(1, V)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - t0)
            assert m.accept_token(t), "xgrammar refused the instance"
        return times


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tj: str, by_id):
        import outlines_core as oc

        self.oc = oc
        table: dict[bytes, list[int]] = {}
        for i, b in enumerate(by_id):
            if b is not None:
                table.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(1, table)

    def compile(self, schema):
        return self.oc.Index(self.oc.json_schema.build_regex_from_schema(json.dumps(schema), r"[ ]?"), self.vocab)

    def walk(self, compiled, ids):
        g = self.oc.Guide(compiled)
        mask = np.zeros((V + 31) // 32, dtype=np.int32)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            g.write_mask_into(mask.ctypes.data, mask.size, 4)
            times.append(time.perf_counter() - t0)
            g.advance(t)  # raises on a refused token
        return times


def engines_table(tj, by_id, schemas, instances, extra, budget_s: float) -> None:
    walk_ids = [
        llg.LLTokenizer(tj, n_vocab=V, eos_token=1).greedy_tokenize(json.dumps(x, separators=(",", ":")))
        for x in instances
    ]
    print(f"\n== engines, V = {V:,} (synthetic Gemma-shaped vocabulary) ==")
    for cls in (Llguidance, Xgrammar, OutlinesCore):
        t0 = time.perf_counter()
        try:
            eng = cls(tj, by_id)
        except Exception as e:  # not installable / usable here
            print(f"{cls.name:14s} unavailable: {type(e).__name__}: {e}")
            continue
        setup = time.perf_counter() - t0
        compiled, comp_t, fails, per_tok, detail = 0, [], [], [], []
        start = time.perf_counter()
        for i, s in enumerate(list(schemas) + list(extra.values())):
            name = f"#{i}" if i < len(schemas) else list(extra)[i - len(schemas)]
            if time.perf_counter() - start > budget_s:
                fails.append(f"{name}: over the time budget")
                continue
            try:
                t1 = time.perf_counter()
                c = eng.compile(s)
                comp_t.append(time.perf_counter() - t1)
                compiled += 1
                if i < len(instances):
                    ts = eng.walk(c, walk_ids[i])
                    per_tok += ts
                    if i >= len(instances) - len(STRINGS):
                        detail.append(f"{json.dumps(s['items'])}: mean {np.mean(ts) * 1e6:.0f} us")
            except Exception as e:
                fails.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:70] if str(e) else ''}")
        n = len(schemas) + len(extra)
        us = np.array(per_tok) * 1e6 if per_tok else np.array([float("nan")])
        print(
            f"{eng.name:14s} setup {setup:6.2f} s | compiled {compiled}/{n}"
            f" | compile mean {np.mean(comp_t) * 1e3:8.1f} ms"
            f" | mask per token mean {us.mean():7.1f} us, p99 {np.percentile(us, 99):7.1f} us, max {us.max():8.1f} us"
            f" ({len(per_tok)} tokens)"
        )
        for d in detail:
            print(f"    strings, array of {d}")
        for f in fails:
            print(f"    not compiled: {f}")


# -- decode overhead on the E2B shape -------------------------------------------------------
def random_e2b(layers: int | None) -> Model:
    spec = dict(SHAPES["e2b-shaped"])
    if layers:
        spec.update(num_hidden_layers=layers, layer_types=spec["layer_types"][:layers], num_kv_shared_layers=0)
    model = Model(TextConfig.from_dict(spec))
    mx.random.seed(0)
    model.load_weights([(k, 0.02 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.parameters())])
    mx.eval(model.parameters())
    return model


def decode_overhead(tj: str, layers: int | None, n_tokens: int, repeats: int) -> None:
    model = random_e2b(layers)
    tok = llg.LLTokenizer(tj, n_vocab=V, eos_token=1)
    cases = {
        "unconstrained": None,
        "json schema (maxLength strings)": json_schema(
            {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 500}
        ),
        "json schema (free strings)": json_schema({"type": "array", "items": {"type": "string"}, "minItems": 500}),
        "regex ([a-z]+ )+": regex("([a-z]+ )+"),
    }
    prompt = list(range(300, 316))
    print(
        f"\n== decode, E2B-shaped random model ({model.config.num_hidden_layers} layers, V = {V:,}),"
        f" {n_tokens} tokens =="
    )
    base = None
    for name, g in cases.items():
        c = None if g is None else Timed(Constraint(g, tok, V, (1, 106)))
        best, host = float("inf"), 0.0
        for _ in range(repeats):
            st, options = Stats(), SamplingOptions(constraint=c)
            if c is not None:
                c.seconds, c.calls = 0.0, 0
            for _ in generate_tokens(model, prompt, max_tokens=n_tokens, options=options, stats=st):
                pass
            best = min(best, st.generation_time / max(st.generation_tokens - 1, 1))
            host = c.seconds / c.calls if c is not None else 0.0
        base = best if base is None else base
        print(
            f"{name:32s} {best * 1e3:8.2f} ms/token ({1 / best:5.2f} tok/s),"
            f" wall overhead {100 * (best / base - 1):+5.1f} %"
            f" | processor on the host {host * 1e3:6.2f} ms/token = {100 * host / base:5.2f} % of a step"
        )


class Timed:
    """A constraint factory whose processors count the host time they take: the
    part of a constrained step that cannot overlap the model.  (Wall-clock overhead
    on a loaded machine is dominated by noise; this is not.)"""

    def __init__(self, constraint):
        self.constraint, self.seconds, self.calls = constraint, 0.0, 0

    def __call__(self):
        proc = self.constraint()

        def timed(history, logits):
            t0 = time.perf_counter()
            out = proc(history, logits)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        return timed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 layers, 12 tokens, 5 schemas, 60 s engine budget")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-engines", action="store_true")
    args = ap.parse_args()
    work = Path(__file__).parent / "_work"
    t0 = time.perf_counter()
    tj, by_id = gemma_shaped_tokenizer(work)
    print(f"vocabulary ready in {time.perf_counter() - t0:.1f} s")
    if not args.skip_engines:
        k = 5 if args.quick else len(SCHEMAS)
        schemas = SCHEMAS[:k] + [s for s, _ in STRINGS]
        instances = INSTANCES[:k] + [x for _, x in STRINGS]
        engines_table(tj, by_id, schemas, instances, {} if args.quick else EXTRA, 60 if args.quick else 600)
    if not args.skip_decode:
        decode_overhead(tj, 4 if args.quick else None, 12 if args.quick else 48, 1 if args.quick else 2)


if __name__ == "__main__":
    main()
