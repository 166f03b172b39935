"""`gemma4-mlx serve` as a subprocess: the demo model with its MTP drafter answers
over HTTP as `generate` does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import openai
import pytest
import typer

import gemma4_mlx
from gemma4_mlx.cli.serve import check_address, served_names
from gemma4_mlx.demo import DEMO_MODEL

from helpers.live_server import free_port, http, live_server


def test_serve_command_with_drafter():
    port = free_port()
    cmd = [sys.executable, "-m", "gemma4_mlx", "serve", "--model", "demo", "--port", str(port), "--api-key", "k"]
    cmd += ["--default-max-tokens", "3", "--cors-origin", "https://chat.example.com"]
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
        japan = [{"role": "user", "content": "What is the capital of Japan?"}]
        r = oa.chat.completions.create(model="demo", temperature=0, messages=japan, max_tokens=20)
        assert r.choices[0].message.content == "The capital of Japan is Tokyo."
        r = oa.chat.completions.create(model="demo", temperature=0, messages=japan)  # no limit: --default-max-tokens
        assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (3, "length")
        key = {"Authorization": "Bearer k"}
        body = {"model": "demo", "messages": japan, "max_tokens": 2}
        assert http("POST", url + "/v1/chat/completions", body, key | {"Origin": "https://chat.example.com"})[0] == 200
        status, _, said = http("POST", url + "/v1/chat/completions", body, key | {"Origin": "http://localhost:3000"})
        assert status == 403 and b"--cors-origin http://localhost:3000" in said  # `local` was not given
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "draft model:" in out  # the demo's drafter was found and used


def test_served_names(tmp_path):
    folder = tmp_path / "out_q4"
    folder.mkdir()
    assert served_names(str(folder) + "/", None) == ["out_q4", str(folder) + "/"]  # the folder's name, the path too
    assert served_names("google/gemma-4-E2B-it", None) == ["google/gemma-4-E2B-it"]
    assert served_names(str(folder), ["gpt-4o", "gemma", "gpt-4o"]) == ["gpt-4o", "gemma"]


def test_check_address_before_loading(capsys):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(typer.Exit):
            check_address("127.0.0.1", port, None)
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err
    check_address("127.0.0.1", free_port(), None)
    assert capsys.readouterr().err == ""
    check_address("0.0.0.0", free_port(), None)
    assert "without --api-key" in capsys.readouterr().err
    check_address("0.0.0.0", free_port(), "k")
    assert capsys.readouterr().err == ""


def test_aliases_are_served_and_listed():
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    with live_server(model, tok, model_name="out_q4", aliases=["./out_q4", "gpt-4o"]) as (url, _):
        oa = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        assert [m.id for m in oa.models.list()] == ["out_q4", "./out_q4", "gpt-4o"]
        r = oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert r.model == "out_q4" and oa.models.retrieve("gpt-4o").id == "gpt-4o"
        with pytest.raises(openai.BadRequestError, match="serves 'out_q4' or './out_q4' or 'gpt-4o'"):
            oa.chat.completions.create(model="other", messages=[{"role": "user", "content": "Hi"}])


def test_a_hub_snapshot_is_served_by_its_repo_id(tmp_path):
    snapshot = tmp_path / "hub" / "models--google--gemma-4-E2B-it" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert served_names(str(snapshot), None) == ["google/gemma-4-E2B-it", str(snapshot)]
