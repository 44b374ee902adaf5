"""The CLI's temporary Prefect API (cli.prefect_server): it answers, and it dies with its parent -- a
`dlp compress` killed with SIGKILL leaves no server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARENT = """
import sys, time
sys.path.insert(0, {root!r})
from cli.prefect_server import start_if_needed
server = start_if_needed()
print(server.proc.pid, server.port, flush=True)
server.wait()
print("ready", flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie waiting for its reaper is dead


def test_temporary_server_answers_and_dies_with_a_killed_parent(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(root=str(ROOT))], env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child, port = map(int, parent.stdout.readline().split())
        assert parent.stdout.readline().strip() == "ready"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
            assert r.status == 200
        assert (tmp_path / "prefect" / "prefect.db").exists()  # the server uses the parent's PREFECT_HOME
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the temporary Prefect server outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
