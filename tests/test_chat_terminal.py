"""The first hour of a new user with `gemma4-mlx chat`: the line editor (editing,
history across sessions, Ctrl-R, multi-line paste, completion), slash-command
errors, tools files, tool calls that are not run, start-up media, thoughts and
statistics in one-shot mode.

Driven in a pseudo-terminal (pexpect) with TERM=xterm, so prompt_toolkit runs its
full editor (tests/test_chat_cli.py covers TERM=dumb).  The embedded demo model
answers; no assertion depends on its wording except where an item is about it.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pexpect = pytest.importorskip("pexpect")

from gemma4_mlx.demo import DEMO_MODEL  # noqa: E402

ENV = dict(
    os.environ,
    HF_HUB_OFFLINE="1",
    GEMMA4_MLX_OFFLINE="1",
    COLUMNS="200",
    TERM="xterm",
    PROMPT_TOOLKIT_NO_CPR="1",  # nothing in pexpect answers a cursor-position request
)
STATS = (
    r"prompt: \d+ tokens(?: \(\+\d+ cached\))?, [\d.]+ tok/s \| "  # later turns: tokens reused from earlier ones
    r"generation: \d+ tokens, [\d.]+ tok/s \| peak memory: [\d.]+ GB"
)
LEFT, UP, CTRL_R, CTRL_D = "\x1b[D", "\x1b[A", "\x12", "\x04"
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
Q = "What is the capital of France?"

TOOLS = '''
def get_weather(city: str) -> dict:
    """Get the current weather in a city.

    Args:
        city: City name
    """
    return {"temperature": 17, "condition": "cloudy"}
'''


def _sigint_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(history, *args):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "gemma4_mlx", "chat", "--draft-model", "none", *args],
        env=dict(ENV, GEMMA4_MLX_HISTORY=str(history)),
        encoding="utf-8",
        timeout=180,  # a shared, busy machine
        dimensions=(50, 200),
        preexec_fn=_sigint_default,
    )
    child.logfile_read = io.StringIO()  # everything it printed
    child.expect("you ›")
    return child


def keys(child, *chunks):
    """Type chunks one after another, as a person would (completion and search
    answer asynchronously)."""
    for chunk in chunks:
        child.send(chunk)
        time.sleep(0.4)


def answer(child):
    """Wait for the reply's statistics and the next prompt."""
    child.expect(STATS)
    child.expect("you ›")


def command(child, line, expect):
    keys(child, line, "\r")
    child.expect(expect)
    child.expect("you ›")


def finish(child):
    keys(child, CTRL_D)
    child.expect(pexpect.EOF)
    out = child.logfile_read.getvalue()
    assert "Traceback" not in out, out[-3000:]
    return out


def users(path):
    return [m["content"] for m in json.loads(path.read_text())["messages"] if m["role"] == "user"]


def one_shot(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "gemma4_mlx", "chat", "--draft-model", "none", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=dict(ENV, TERM="dumb"),
        timeout=300,
    )


# -- item 4: a real line editor ---------------------------------------------------
def test_line_editor_edits_recalls_pastes_and_completes(tmp_path):
    history = tmp_path / "history"
    target = tmp_path / "conversation_target.json"
    target.write_text('{"messages": []}')  # an earlier save (a file that is not a chat is not overwritten)
    child = spawn(history)
    keys(child, "What is the capital of Frace?", LEFT * 3, "n", "\r")  # Left arrows fix the typo
    answer(child)
    keys(child, UP, "\r")  # the previous line again
    answer(child)
    keys(child, PASTE_START + "line one\nline two" + PASTE_END, "\r")  # one message of two lines
    answer(child)
    keys(child, CTRL_R, "France", "\r", "\r")  # reverse search finds the question
    answer(child)
    keys(child, "/sa", "\t", f" {tmp_path}/conversation_t", "\t", "\r")  # command and path completed
    child.expect("saved to")
    child.expect("you ›")
    finish(child)
    assert users(target) == [Q, Q, "line one\nline two", Q]
    assert "\x1b" not in target.read_text()
    saved = history.read_text()
    assert f"+{Q}\n" in saved and "+line one\n+line two\n" in saved


def test_history_is_kept_across_sessions(tmp_path):
    history = tmp_path / "history"
    child = spawn(history)
    keys(child, "What is the capital of Peru?", "\r")
    answer(child)
    finish(child)
    child = spawn(history)
    keys(child, UP, "\r")  # the last line of the previous session
    answer(child)
    command(child, f"/save {tmp_path / 'c.json'}", "saved to")
    finish(child)
    assert users(tmp_path / "c.json") == ["What is the capital of Peru?"]


# -- items 2, 5, 6, 8: errors are one line, and the chat goes on -------------------
def test_command_errors_are_one_line_and_the_chat_goes_on(tmp_path):
    from PIL import Image

    pic = tmp_path / "pic.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(pic)
    child = spawn(tmp_path / "history")
    keys(child, Q, "\r")
    answer(child)
    command(child, "/save /nonexistent/dir/x.json", r"error: /save: /nonexistent/dir/x.json: No such file or directory")
    command(child, "/frobnicate", r"error: unknown command /frobnicate")
    command(child, "/think maybe", r"error: usage: /think on\|off")
    command(child, "/save", r"error: usage: /save FILE")
    # a text-only model refuses the image when it is attached, not at the next message
    command(child, f"/image {pic}", r"error: image \S*pic.png: this model has no vision tower")
    command(child, f"/image {tmp_path / 'nope.png'}", r"error: \S*nope.png: no such file")
    # a tool call that is not run says so (no --tools: the tool is unknown)
    keys(child, "What's the weather in Paris?", "\r")
    child.expect(r"tool call: get_weather\(city='Paris'\)")
    child.expect(r"not run: unknown tool 'get_weather' \(no tools were given")
    answer(child)
    command(child, f"/save {tmp_path / 'c.json'}", "saved to")
    out = finish(child)
    assert "attached" not in out and "run it?" not in out
    assert users(tmp_path / "c.json") == [Q, "What's the weather in Paris?"]  # nothing lost, no image sent
    interactive = re.findall(STATS, out)
    r = one_shot("-p", Q)
    assert r.returncode == 0, r.stderr
    assert interactive and re.search(STATS, r.stderr)  # one stats line, in both modes


def test_tools_file_without_type_hints_is_refused_at_start(tmp_path):
    bad = tmp_path / "tools.py"
    bad.write_text(TOOLS.replace("city: str", "city"))
    r = one_shot("--tools", str(bad), "-p", "What's the weather in Paris?")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {bad}: tool get_weather: parameter 'city' has no type hint (tools are declared from their type hints)"
    )


def test_load_tools_names_function_and_parameter(tmp_path):
    from gemma4_mlx.chat.terminal import load_tools

    cases = {
        "def f(a: int, *rest: int) -> int:\n    return a\n": "tool f: parameter 'rest': *args",
        "class Thing: pass\ndef g(a: int, b: Thing) -> int:\n    return a\n": "tool g: parameter 'b': unsupported",
        "def h(a: 'Missing') -> int:\n    return 1\n": "tool h: its type hints do not resolve",
    }
    for i, (source, needle) in enumerate(cases.items()):
        file = tmp_path / f"t{i}.py"
        file.write_text(source)
        with pytest.raises(ValueError, match=re.escape(needle)) as e:
            load_tools(str(file))
        assert "\n" not in str(e.value)
    ok = tmp_path / "ok.py"
    ok.write_text(TOOLS)
    assert [f.__name__ for f in load_tools(str(ok))] == ["get_weather"]
    text = tmp_path / "tools.txt"  # Python has no loader for the suffix: was an AttributeError
    text.write_text(TOOLS)
    with pytest.raises(ValueError, match=r"tools.txt: not a Python file"):
        load_tools(str(text))


# -- item 5: every tool call's outcome, in --json and on screen --------------------
def test_tool_call_outcomes_in_json_and_text(tmp_path):
    tools = tmp_path / "tools.py"
    tools.write_text(TOOLS)
    q = "What's the weather in Paris?"
    for args, status in (
        ([], "unknown_tool"),
        (["--tools", str(tools)], "declined"),
        (["--tools", str(tools), "--yes"], "ran"),
    ):
        r = one_shot(*args, "-p", q, "--json")
        assert r.returncode == 0, r.stderr
        calls = json.loads(r.stdout)["tool_calls"]
        assert calls and {c["status"] for c in calls} == {status}, calls
        assert all(c["name"] == "get_weather" for c in calls)
        if status == "ran":
            assert calls[0]["result"] == {"temperature": 17, "condition": "cloudy"}
        else:
            assert calls[0]["reason"]
    r = one_shot("--tools", str(tools), "-p", q)
    assert "tool call: get_weather(city='Paris')" in r.stderr
    assert "not run: declined (give --yes to run tool calls)" in r.stderr


@pytest.fixture(scope="module")
def demo():
    import gemma4_mlx

    return gemma4_mlx.load(DEMO_MODEL)


def test_malformed_tool_call_is_named_and_not_run(demo):
    from rich.console import Console

    from gemma4_mlx.chat.session import Chat, Reply, ReplyEvent
    from gemma4_mlx.chat.terminal import Terminal
    from gemma4_mlx.prompt.arguments import ToolCall
    from gemma4_mlx.runtime.generate import Stats

    ran = []

    def get_weather(city: str) -> dict:
        """Weather.

        Args:
            city: City name
        """
        ran.append(city)
        return {}

    chat = Chat(*demo, tools=[get_weather], max_tokens=32)
    bad = ToolCall(name="", arguments={}, raw="call:{city:Paris}", error="malformed_tool_call")
    replies = iter([Reply("", tool_calls=[bad], stats=Stats()), Reply("Sorry.", stats=Stats())])
    chat.stream = lambda text=None, **kw: iter([ReplyEvent("reply", reply=next(replies))])
    out = io.StringIO()
    Terminal(chat, Console(file=out, width=200), assume_yes=True).turn("weather?")
    shown = out.getvalue()
    assert "tool call without a function name: 'call:{city:Paris}'" in shown
    assert "not run: malformed tool call (no function name)" in shown
    assert "tool call: ()" not in shown and ran == []
    [told] = chat.messages  # the model is told too
    assert told["role"] == "tool" and "malformed tool call" in told["content"]


# -- item 6: start-up media -------------------------------------------------------
def test_missing_start_up_image_is_named(tmp_path):
    r = one_shot("--image", str(tmp_path / "nope.png"), "-p", "What is this?")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    # named by its option, before the model loads
    assert (
        r.stderr.strip().splitlines()[-1]
        == f"Error: Invalid value for '--image': {tmp_path / 'nope.png'}: no such file"
    )
    assert "loading" not in r.stderr


# -- item 8: one-shot thoughts and statistics ------------------------------------
def test_one_shot_shows_thoughts_and_honest_stats():
    q = "What is the capital of Japan?"
    r = one_shot("--think", "-p", q)
    assert r.returncode == 0, r.stderr
    thought = [line for line in r.stderr.splitlines() if line.startswith("thinking: ")]
    assert thought and len(thought[0]) > len("thinking: ") and thought[0][10:] not in r.stdout
    full = json.loads(one_shot("--think", "--json", "-p", q).stdout)
    cut = json.loads(one_shot("--think", "--thinking-budget", "5", "--json", "-p", q).stdout)
    assert cut["stats"]["prompt_tokens"] == full["stats"]["prompt_tokens"]  # the same prompt
    assert len(cut["reasoning"]) <= 5


def test_thinking_budget_stats_count_the_whole_turn(demo):
    from gemma4_mlx.chat.session import Chat

    chat = Chat(*demo, thinking=True, thinking_budget=5, max_tokens=64)
    fed = []
    real = chat._tokens

    def counting(*a, **kw):
        for tok in real(*a, **kw):
            fed.append(tok)
            yield tok

    chat._tokens = counting
    events = list(chat.stream("What is the capital of Japan?"))
    reply = events[-1].reply
    assert reply.thinking and len(reply.thinking) <= 5
    assert reply.stats.prompt_tokens == chat.prefilled_last  # the prompt, not the continuation's feed
    assert reply.stats.generation_tokens == len(fed)  # every sampled token, before and after `<channel|>`
    # each piece of the reply is streamed once: the events add up to the reply
    assert "".join(e.text for e in events if e.type == "content") == reply.text


SLOW_TOOLS = '''
import time


def get_weather(city: str) -> dict:
    """Get the current weather in a city.

    Args:
        city: City name
    """
    print("tool started", flush=True)
    time.sleep(60)
    return {"temperature": 17, "condition": "cloudy"}
'''


def test_ctrl_c_in_a_tool_keeps_the_session(tmp_path):
    """Ctrl-C while a --tools function runs stops that tool, records it as interrupted
    and keeps the chat going; nothing of the conversation is lost."""
    tools = tmp_path / "tools.py"
    tools.write_text(SLOW_TOOLS)
    child = spawn(tmp_path / "history", "--tools", str(tools), "--yes")
    keys(child, "What's the weather in Paris?", "\r")
    child.expect("tool started")
    child.sendintr()
    child.expect(r"\[tool interrupted\]")
    child.expect("you ›")
    keys(child, Q, "\r")
    answer(child)
    command(child, f"/save {tmp_path / 'c.json'}", "saved to")
    finish(child)
    messages = json.loads((tmp_path / "c.json").read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["What's the weather in Paris?", Q]
    assert any(m["role"] == "tool" and "interrupted" in m["content"] for m in messages)


def test_command_arguments_that_are_not_one_value(demo, tmp_path):
    """A paste starting with `/save a` saved to a file named "a\\nb"; `/budget ²` (a
    Unicode digit) gave int()'s message without naming /budget."""
    from rich.console import Console

    from gemma4_mlx.chat.session import Chat
    from gemma4_mlx.chat.terminal import Terminal

    out = io.StringIO()
    term = Terminal(Chat(*demo, max_tokens=4), Console(file=out, width=200))
    assert term.command(f"/save {tmp_path}/a\nb")
    assert term.command("/budget ²")
    assert term.command("/system Be terse.\nAnswer in French.")  # a prompt may span lines (Alt-Enter)
    assert term.chat.system == "Be terse.\nAnswer in French."
    shown = out.getvalue()
    assert "error: /save: the argument must fit on one line" in shown and not list(tmp_path.iterdir())
    assert "error: /budget must be one of" in shown
