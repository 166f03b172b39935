"""`generate --json-schema FILE` (docs/structured-output.md §7): the printed answer
follows the schema; a schema the engine refuses is one
`error:` line naming the file, before the model loads."""

from __future__ import annotations

import json

import jsonschema
from typer.testing import CliRunner

from gemma4_mlx.cli import app
from gemma4_mlx.demo import DEMO_MODEL

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Tokyo", "Lima", "Paris"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


def cli(*args):
    """The CLI in this process (a subprocess would pay the imports again)."""
    return CliRunner().invoke(app, list(args))


BASE = ["generate", "--model", str(DEMO_MODEL), "-p", "What is the capital of Japan?", "-n", "40", "-q"]


def test_generate_json_schema(tmp_path):
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(SCHEMA))
    r = cli(*BASE, "--draft-model", "none", "--json-schema", str(f))
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.stdout), SCHEMA)


def test_bad_schema_file_is_one_line(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "strnig"}}}))
    r = cli(*BASE, "--json-schema", str(f))
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: --json-schema {f}: ") and "strnig" in lines[0]
    assert "loading" not in r.stderr  # refused before the model loads


def test_a_grammar_the_engine_gives_up_on_is_one_line(tmp_path):
    """Mid-output engine failure (a pattern past llguidance's limits): was a traceback
    without a drafter and a quiet one-token answer with one."""
    code = {"type": "string", "pattern": "^(ab{1000}){1000}$"}
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"code": code}, "required": ["code"]}))
    for drafter in (["--draft-model", "none"], []):
        r = cli("generate", "-m", str(DEMO_MODEL), "--json-schema", str(schema), "-n", "30", "-p", "Go", *drafter)
        assert r.exit_code == 1 and "the output grammar failed while decoding" in r.output, r.output
        assert "Traceback" not in r.output


def test_a_schema_cut_at_max_tokens_is_an_error(tmp_path):
    """Text cut at --max-tokens is not JSON the schema accepts: it used to print and
    exit 0 as if it were the answer."""
    f = tmp_path / "schema.json"
    f.write_text(json.dumps({"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}))
    r = cli(*BASE[:-3], "-n", "4", "--draft-model", "none", "--json-schema", str(f))
    assert r.exit_code == 1 and "reached --max-tokens 4 before it was complete under --json-schema" in r.stderr


def test_plain_text_cut_at_max_tokens_says_so():
    r = cli("generate", "--model", str(DEMO_MODEL), "-p", "Hello", "-n", "3", "--draft-model", "none")
    assert r.exit_code == 0 and "(stopped at --max-tokens 3)" in r.stderr
    r = cli("generate", "--model", str(DEMO_MODEL), "-p", "Hello", "-n", "200", "--draft-model", "none")
    assert r.exit_code == 0 and "stopped at" not in r.stderr


def test_a_constrained_output_complete_at_max_tokens_is_not_cut():
    r = cli(
        "generate", "-m", str(DEMO_MODEL), "-p", "Pick a digit", "--regex", "[0-9]", "-n", "1", "--draft-model", "none"
    )
    assert r.exit_code == 0 and r.stdout.strip().isdigit() and "stopped at" not in r.stderr, r.output


def test_a_constrained_output_that_could_go_on_is_cut(tmp_path):
    """An integer (or an optional tail) may stop anywhere yet go on: cut at --max-tokens
    it is not the answer, even though the text so far is valid."""
    f = tmp_path / "int.json"
    f.write_text(json.dumps({"type": "integer"}))
    r = cli(
        "generate",
        "-m",
        str(DEMO_MODEL),
        "-p",
        "What is 12 plus 5?",
        "--json-schema",
        str(f),
        "-n",
        "2",
        "--draft-model",
        "none",
    )
    assert r.exit_code == 1 and "before it was complete" in r.stderr, r.output
