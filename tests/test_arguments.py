"""Bad arguments are refused at the call, in one line naming them: the sampling options
of the Python API, and the CLI's options (before any model is loaded)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

import gemma4_mlx
from gemma4_mlx.api import generate_ids
from gemma4_mlx.cli import app
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.runtime.generate import SamplingOptions
from gemma4_mlx.server import app as server_app


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1.0),  # inverts the distribution
        ("temperature", math.nan),
        ("temperature", math.inf),  # every token equally likely
        ("top_p", 1.5),  # silently off in mlx-lm's filter
        ("min_p", -0.1),
        ("top_k", -1),
        ("top_k", 2.5),
        ("repetition_penalty", math.nan),
        ("presence_penalty", math.inf),
        ("seed", -1),  # a TypeError inside MLX
        ("seed", 1 << 64),
    ],
)
def test_sampling_options_refuse_what_the_samplers_would_misread(field, value):
    with pytest.raises(ValueError, match=rf"^{field} {value!r}: expected"):
        SamplingOptions(**{field: value})


def test_sampling_options_take_what_users_send():
    o = SamplingOptions(temperature=np.float32(0.7), top_p=1.0, top_k=np.int64(40), min_p=0.0, seed=(1 << 64) - 1)
    assert o.top_k == 40 and SamplingOptions(presence_penalty=-1.5, repetition_penalty=1.1).presence_penalty == -1.5


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "-m", "demo", "-p", "hi", "--temp", "nan"],
        ["generate", "-m", "demo", "-p", "hi", "--temp", "inf"],
        ["generate", "-m", "demo", "-p", "hi", "--top-p", "nan"],
        ["generate", "-m", "demo", "-p", "hi", "--repetition-penalty", "nan"],
        ["generate", "-m", "demo", "-p", "hi", "--seed", "-1"],
        ["chat", "-m", "demo", "-p", "hi", "--min-p", "nan"],
        ["serve", "--api-key", ""],
        ["serve", "--prefix-cache-gb", "inf"],
        ["generate", "-m", "demo", "-p", "hi", "--dtype", "float64"],
        ["generate", "-m", "demo", "-p", "hi", "--prompt-cache", "no-such.kv"],
        ["generate", "-m", "demo", "-p", "hi", "--image", "no-such.png"],
        ["chat", "-m", "demo", "-p", "hi", "--audio", "no-such.wav"],
        ["cache-prompt", "-m", "demo", "-f", "-", "--video", "no-such.mp4", "out.kv"],
        ["serve", "--dtype", "fp16"],
    ],
)
def test_cli_refuses_before_loading(args):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "Invalid value for" in r.output and "Traceback" not in r.output, r.output
    assert "loading" not in r.output


def test_cli_stdin_that_is_not_utf8_is_one_line():
    r = CliRunner().invoke(app, ["generate", "-m", "demo"], input=b"\xffhello")
    assert r.exit_code == 1 and r.output.strip().startswith("error: stdin: not UTF-8 text"), r.output


def test_embedded_server_refuses_an_empty_key():
    with pytest.raises(ValueError, match="api_key is empty"):
        server_app(None, None, model_name="x", api_key=" ")


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        (dict(default_max_tokens=0), "default_max_tokens 0: expected an integer >= 1"),
        (dict(default_max_tokens=2.5), "default_max_tokens 2.5: expected an integer >= 1"),
        (dict(cors_origins=["http://localhost:3000/"]), "no path, no trailing slash"),
    ],
)
def test_embedded_server_refuses_bad_settings(demo, kwargs, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        server_app(*demo, model_name="x", **kwargs)


@pytest.fixture(scope="module")
def demo():
    return gemma4_mlx.load(DEMO_MODEL)


def test_token_id_prompts_are_checked_at_the_call(demo):
    """Ids outside the vocabulary reached an MLX gather; an empty list a float array."""
    model, tok = demo
    with pytest.raises(ValueError, match=r"prompt: empty"):
        gemma4_mlx.generate(model, tok, [])
    with pytest.raises(ValueError, match=rf"prompt: token id {model.config.vocab_size} is not in the vocabulary"):
        gemma4_mlx.generate(model, tok, [2, model.config.vocab_size])
    with pytest.raises(ValueError, match=r"prompt: token id -1"):
        gemma4_mlx.batch_generate(model, [[2, 5], [-1]])
    for prompts in ([], ["hi"], "hi"):
        with pytest.raises(ValueError, match=r"prompts: expected a non-empty list of token id lists"):
            gemma4_mlx.batch_generate(model, prompts)
    assert len(gemma4_mlx.batch_generate(model, [[2, 5], [2]], max_tokens=2)[1]) == 2


def test_stream_generate_checks_at_the_call(demo):
    """Before anything is iterated, as its docstring promises (it was a generator
    function, so errors waited for the first next())."""
    model, tok = demo
    with pytest.raises(ValueError, match=r"prompt: token id -1"):
        gemma4_mlx.stream_generate(model, tok, [2, -1])
    with pytest.raises(ValueError, match=r"temperature"):
        gemma4_mlx.stream_generate(model, tok, "hi", temperature=-1.0)
    chunks = list(gemma4_mlx.stream_generate(model, tok, [2, 100, 200], max_tokens=3))
    text = gemma4_mlx.generate(model, tok, [2, 100, 200], max_tokens=3)
    assert chunks[-1].finished and "".join(c.text for c in chunks) == text


def test_token_ids_as_arrays_are_taken(demo):
    model, tok = demo
    ids = [2, 100, 200, 300]
    text = gemma4_mlx.generate(model, tok, ids, max_tokens=6)
    assert gemma4_mlx.generate(model, tok, mx.array(ids), max_tokens=6) == text
    assert gemma4_mlx.generate(model, tok, np.array(ids), max_tokens=6) == text
    rows = gemma4_mlx.batch_generate(model, [ids, ids], max_tokens=3)
    assert gemma4_mlx.batch_generate(model, np.array([ids, ids]), max_tokens=3) == rows
    assert gemma4_mlx.batch_generate(model, [mx.array(ids), np.array(ids)], max_tokens=3) == rows


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "-m", str(DEMO_MODEL), "-p", ""],
        ["generate", "-m", str(DEMO_MODEL)],  # an empty stdin (cron, CI)
        ["chat", "-m", str(DEMO_MODEL), "--draft-model", "none"],
        ["chat", "-m", str(DEMO_MODEL), "-p", "  \n", "--draft-model", "none"],
    ],
)
def test_an_empty_prompt_is_refused(args):
    r = CliRunner().invoke(app, args, input="")
    assert r.exit_code == 1 and "error: empty prompt" in r.stderr, r.output
    assert "loading" not in r.stderr or args[0] == "chat"


def test_import_is_light():
    """`import gemma4_mlx` (and so `gemma4-mlx --help`) does not pull in mlx-lm,
    transformers or torch: its public names load on first use."""
    heavy = "('mlx_lm', 'transformers', 'torch')"
    code = f"import gemma4_mlx.cli, sys; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert gemma4_mlx.share_with_thread and gemma4_mlx.SamplingOptions is SamplingOptions
    fresh = "import gemma4_mlx as g; print(g.media.__name__, g.checkpoint.__name__, hasattr(g, '__main__'))"
    out = subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["gemma4_mlx.media", "gemma4_mlx.checkpoint", "False"]  # subpackages; the CLI does not run
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        gemma4_mlx.nothing  # noqa: B018


def test_stream_generate_takes_every_sampling_field_as_a_keyword(demo):
    """README: `stream_generate` takes SamplingOptions' fields as keywords (the
    penalties were missing: a TypeError); they reach the sampler."""
    taken = inspect.signature(gemma4_mlx.stream_generate).parameters
    fields = [f.name for f in dataclasses.fields(SamplingOptions) if f.name != "constraint"]  # json_schema etc.
    assert [f for f in fields if f not in taken] == []
    model, tok = demo
    prompt = "Say hello hello hello hello"
    plain = gemma4_mlx.generate(model, tok, prompt, max_tokens=24)
    ids = gemma4_mlx.encode_prompt(tok, prompt)
    for penalty in ({"frequency_penalty": 30.0}, {"presence_penalty": 30.0}):
        penalised = gemma4_mlx.generate(model, tok, prompt, max_tokens=24, **penalty)
        out = generate_ids(model, ids, max_tokens=24, options=SamplingOptions(**penalty), stop_ids=model.config.eos_ids)
        assert penalised != plain and penalised == tok.decode([t for t in out if t not in model.config.eos_ids])


def test_sampling_edges_with_and_without_a_seed(demo):
    """top_k at the vocabulary keeps every token, and a temperature whose 1/T
    overflows float32 is greedy, seeded or not (unseeded runs used mlx-lm's sampler,
    which raised for both; they are keyed now, with a drawn seed)."""
    model, tok = demo
    prompt, vocab = "What is the capital of Japan?", model.config.vocab_size
    greedy = gemma4_mlx.generate(model, tok, prompt, max_tokens=12)
    for seed in (None, 7):
        assert gemma4_mlx.generate(model, tok, prompt, max_tokens=12, temperature=1e-300, seed=seed) == greedy
        everything = gemma4_mlx.generate(model, tok, prompt, max_tokens=12, temperature=1.0, top_k=vocab, seed=7)
        assert everything == gemma4_mlx.generate(model, tok, prompt, max_tokens=12, temperature=1.0, seed=7)
        assert gemma4_mlx.generate(model, tok, prompt, max_tokens=12, temperature=1.0, top_k=vocab, seed=seed)


def test_wrong_draft_tokens_refused_when_the_chat_is_built(demo):
    with pytest.raises(ValueError, match="draft tokens 'lots': expected a number or 'auto'"):
        gemma4_mlx.Chat(*demo, draft_tokens="lots")
    with pytest.raises(ValueError, match="draft tokens 99: expected 0..32"):
        gemma4_mlx.Chat(*demo, draft_tokens=99)


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda m, t: gemma4_mlx.Chat(m, None), "tokenizer: expected the tokenizer gemma4_mlx.load returns"),
        (lambda m, t: gemma4_mlx.Chat("demo", t), "model: expected a model from gemma4_mlx.load"),
        (lambda m, t: gemma4_mlx.Chat(m, t, options={"temperature": 0.5}), "options: expected gemma4_mlx.Sampling"),
        (lambda m, t: gemma4_mlx.Chat(m, t, tools=["get_weather"]), "tools: expected Python functions"),
        (lambda m, t: gemma4_mlx.Chat(m, t, tools=[lambda city: city]), "parameter 'city' needs a type hint"),
        (lambda m, t: gemma4_mlx.Chat(m, t, drafter="demo-assistant"), "drafter: expected a drafter from"),
        (lambda m, t: gemma4_mlx.generate(m, t, "Hi", draft_model="demo"), "draft_model: expected a drafter"),
        (lambda m, t: gemma4_mlx.generate(m, t, "Hi", max_tokens="5"), "max_tokens: expected a positive integer"),
        (lambda m, t: gemma4_mlx.generate(m, t, "Hi", max_tokens=-1), "max_tokens: expected a positive integer"),
    ],
)
def test_wrong_python_arguments_are_named(demo, call, says):
    """A wrong argument is one line naming it (they failed deep inside, e.g.
    `'NoneType' object has no attribute 'unk_token_id'`)."""
    with pytest.raises(TypeError, match=says):
        call(*demo)
    assert gemma4_mlx.generate(*demo, "Hi", max_tokens=np.int64(3))  # a numpy integer is an integer
