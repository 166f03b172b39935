"""Two `Chat` sessions on one loaded model, used from two threads at once (what a macOS
app does; docs/architecture.md §6).  Run in a subprocess: MLX's failure mode here is a
process abort at exit (without `mx.clear_streams()` in every thread that ran MLX: about
one run in three), which must not take the test runner down."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, threading
import mlx.core as mx
import gemma4_mlx
from gemma4_mlx.api import own_thread, share_with_thread
from gemma4_mlx.chat.session import Chat
from gemma4_mlx.demo import DEMO_MODEL

model, tok = gemma4_mlx.load(DEMO_MODEL)
# a and c have prompts of the same lengths: their forwards meet at the same positions,
# where a per-model memo (RoPE's angles) made on one thread's stream was read by the other
TURNS = {
    "a": ["What is the capital of France?", "And of Spain?"],
    "b": ["Hi there", "Capital of Italy?"],
    "c": ["What is the capital of Peru?", "And of Chile?"],
}

def conversation(name):
    chat = Chat(model, tok, max_tokens=40)
    return [chat.send(q).text for q in TURNS[name]]

def in_threads(setup):
    out, errors = {}, {}
    def work(name):
        try:
            setup()
            out[name] = conversation(name)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
        finally:
            mx.clear_streams()  # the thread's streams, before it ends (else: abort at exit)
    threads = [threading.Thread(target=work, args=(k,)) for k in TURNS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, errors

_, cold_errors = in_threads(lambda: None)  # the weights are still lazy arrays of this thread's stream
ref = {k: conversation(k) for k in TURNS}
share_with_thread(model)  # evaluate every array on the loading thread
runs = [in_threads(own_thread) for _ in range(3)]  # each worker: its own default stream
out = [o for o, _ in runs]
errors = {k: e for _, errs in runs for k, e in errs.items()}
print(json.dumps({"cold_errors": cold_errors, "ref": ref, "out": out, "errors": errors}), flush=True)
mx.clear_streams()  # the main thread's too
"""


def test_two_sessions_on_one_model_from_two_threads():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]  # and no abort at exit
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # before share_with_thread: refused by MLX with a RuntimeError naming the missing stream
    assert set(got["cold_errors"]) == {"a", "b", "c"}, got
    assert all("RuntimeError" in e and "in current thread" in e for e in got["cold_errors"].values()), got
    # after it, with own_thread() in each worker: the concurrent replies equal the sequential ones
    assert not got["errors"] and got["out"] == [got["ref"]] * 3, got
    assert all(r for replies in got["ref"].values() for r in replies), got
