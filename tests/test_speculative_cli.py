"""`--draft-model` / `--draft-tokens` on the command line: same text, speculation stats,
auto-discovery of `<model>-assistant`, clear errors."""

import shutil

import gemma4_mlx
from gemma4_mlx.speculative.stats import SpecStats

from helpers.checkpoints import write_char_tokenizer
from test_bad_input import cli


def _pair(tmp_path, checkpoints, drafters, name="e2b_like"):
    target = tmp_path / name
    shutil.copytree(checkpoints[name].path, target)
    write_char_tokenizer(target)
    return target, drafters[name].path


def test_generate_with_a_drafter_prints_the_same_text(tmp_path, checkpoints, drafters):
    target, drafter = _pair(tmp_path, checkpoints, drafters)
    base = ["generate", "--model", str(target), "--prompt", "hello there", "-n", "16", "--raw", "--dtype", "float32"]
    plain = cli(*base, "--draft-model", "none")
    spec = cli(*base, "--draft-model", str(drafter), "--draft-tokens", "3")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "draft model:" in spec.stderr and "speculative:" in spec.stderr
    assert "speculative:" not in plain.stderr
    sampled = ["--temp", "0.9", "--seed", "11"]
    a = cli(*base, *sampled, "--draft-model", "none", "-q")
    b = cli(*base, *sampled, "--draft-model", str(drafter), "--draft-tokens", "auto", "-q")
    assert a.returncode == 0 and a.stdout == b.stdout


def test_drafter_next_to_the_model_is_found(tmp_path, checkpoints, drafters):
    target, drafter = _pair(tmp_path, checkpoints, drafters)
    shutil.copytree(drafter, target.with_name(target.name + "-assistant"))
    r = cli("generate", "--model", str(target), "--prompt", "hi", "-n", "4", "--raw")
    assert r.returncode == 0 and f"{target.name}-assistant" in r.stderr, r.stderr
    assert gemma4_mlx.checkpoint.hub.find_drafter(str(tmp_path / "nothing-here")) is None


def test_bad_drafter_arguments_are_one_line_errors(tmp_path, checkpoints, drafters):
    target, _ = _pair(tmp_path, checkpoints, drafters)
    wrong = drafters["dense"].path  # made for another target: K/V layout differs
    for extra, needle in (  # a drafter's error names --draft-model (not to be read as --model's)
        (["--draft-model", str(wrong)], "--draft-model: "),
        (["--draft-model", str(wrong)], "KV heads"),
        (["--draft-model", str(tmp_path / "missing")], "error: --draft-model: "),
        (["--draft-model", str(tmp_path / "missing")], "no such folder"),
        (["--draft-tokens", "lots"], "--draft-tokens"),
    ):
        r = cli("generate", "--model", str(target), "--prompt", "hi", "-n", "4", *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and lines[-1].startswith("error: ") and needle in lines[-1], r.stderr


def test_bad_draft_tokens_rejected_before_the_model_loads(tmp_path):
    missing = str(tmp_path / "no-model-here")  # loading it would fail with "no such folder"
    for command in (["generate", "-p", "hi"], ["chat", "-p", "hi"]):
        r = cli(*command, "--model", missing, "--draft-tokens", "lots")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert lines[0] == "error: --draft-tokens: draft tokens 'lots': expected a number or 'auto'"


def test_stats_line_without_draft_rounds_says_so():
    r = cli("generate", "-m", "demo", "-p", "What is the capital of France?", "-n", "1", "--draft-tokens", "4")
    assert r.returncode == 0 and "draft model:" in r.stderr, r.stderr
    assert "speculative: no draft rounds ran" in r.stderr and "0 rounds" not in r.stderr
    stats = SpecStats()
    stats.record(0, [0], 1)  # a round with nothing drafted (too few tokens left)
    assert stats.line().startswith("speculative: nothing drafted in 1 rounds")
    stats.record(2, [1], 2)
    assert stats.line().startswith("speculative: 1.50 tokens/round over 2 rounds (K=0:1,K=2:1)")
