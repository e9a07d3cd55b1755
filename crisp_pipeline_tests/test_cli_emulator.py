"""`crisp-pipeline emulator` serves the emulator as its own process, for any client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(port: int, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "crisp_pipeline.cli", "emulator", "--port", str(port),
               "--website-id", "W", "--token", "tid:tkey-SECRET", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                           signal.SIG_DFL))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=0.2)
            return process
        except httpx.TransportError:
            if process.poll() is not None:
                raise AssertionError(process.stdout.read())
            time.sleep(0.05)
    process.kill()
    raise AssertionError("the emulator did not start")


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=15)
    assert process.returncode == 0, output
    return output


def test_the_emulator_command_serves_checks_tokens_and_keeps_state(tmp_path: Path):
    port, state = free_port(), tmp_path / "state.json"
    base = f"http://127.0.0.1:{port}/v1/website/W/"
    auth, tier = ("tid", "tkey-SECRET"), {"X-Crisp-Tier": "plugin"}
    process = start(port, "--state", str(state), "--seed", "1", "--daily-quota", "3")
    try:
        created = httpx.post(base + "people/profile", auth=auth, headers=tier,
                             json={"email": "cli@x.io", "person": {"nickname": "C"}})
        assert created.status_code == 201
        assert httpx.get(base + "people/stats", auth=("tid", "bad"), headers=tier).status_code \
            == 401
        assert httpx.get(base + "people/stats", auth=auth, headers=tier).status_code == 200
        assert httpx.get(base + "people/stats", auth=auth, headers=tier).status_code == 200
        assert httpx.get(base + "people/stats", auth=auth, headers=tier).status_code == 429
    finally:
        output = stop(process)
    assert "tkey-SECRET" not in output and "tid" in output
    saved = json.loads(state.read_text())
    assert [p["email"] for p in saved["websites"]["W"]] == ["cli@x.io"]

    process = start(port, "--state", str(state))
    try:
        stats = httpx.get(base + "people/stats", auth=auth, headers=tier)
        assert stats.json()["data"] == {"total": 1}
    finally:
        stop(process)


def test_the_emulator_command_refuses_a_malformed_token():
    result = subprocess.run([sys.executable, "-m", "crisp_pipeline.cli", "emulator",
                             "--website-id", "W", "--token", "no-colon"],
                            capture_output=True, text=True, env={**os.environ}, timeout=60)
    assert result.returncode == 2 and "IDENTIFIER:KEY" in result.stderr
