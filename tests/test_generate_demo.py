"""Plain generation on an instruction checkpoint renders the prompt as a user turn,
with or without a template file: on the embedded demo model `generate` answers what
`Chat` answers; `--raw` / chat=False keeps raw completion."""

import subprocess
import sys

import pytest

import gemma4_mlx
from gemma4_mlx.chat.session import Chat
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.prompt.template import CHAT_TEMPLATE
from gemma4_mlx.prompt.tokens import chat_template_for, encode_prompt

QUESTIONS = ["What is the capital of Japan?", "What is the capital of Peru?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def demo():
    return gemma4_mlx.load(DEMO_MODEL)


def test_generate_answers_as_chat_does(demo):
    model, tok = demo
    for q in QUESTIONS:
        text = gemma4_mlx.generate(model, tok, q, max_tokens=40)
        assert text == Chat(model, tok).send(q).text
        assert q.split()[-1].rstrip("?") in text  # "... capital of Japan is Tokyo."


def test_template_falls_back_to_ours(demo):
    _, tok = demo
    assert chat_template_for(tok) in (CHAT_TEMPLATE, getattr(tok, "chat_template", None))
    ids = encode_prompt(tok, "Hello")
    assert tok.decode(ids) == "<bos><|turn>user\nHello<turn|>\n<|turn>model\n"
    raw = encode_prompt(tok, "Hello", chat=False)
    assert tok.decode(raw) == "<bos>Hello"


def test_cli_generate_on_the_demo():
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gemma4_mlx",
            "generate",
            "--model",
            str(DEMO_MODEL),
            "-q",
            "--prompt",
            QUESTIONS[0],
            "--max-tokens",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "Tokyo" in run.stdout and "<|" not in run.stdout
