"""`gemma4-mlx serve` as a subprocess: the demo model with its MTP drafter answers
over HTTP as `generate` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import openai

from helpers.live_server import free_port, http


def test_serve_command_with_drafter():
    port = free_port()
    cmd = [sys.executable, "-m", "gemma4_mlx", "serve", "--model", "demo", "--port", str(port), "--api-key", "k"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if http("GET", url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.1)
        assert json.loads(http("GET", url + "/health")[2])["model"] == "demo"
        oa = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=30)
        r = oa.chat.completions.create(
            model="demo", temperature=0, messages=[{"role": "user", "content": "What is the capital of Japan?"}]
        )
        assert r.choices[0].message.content == "The capital of Japan is Tokyo."
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "draft model:" in out  # the demo's drafter was found and used
