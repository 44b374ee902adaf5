"""A temporary Prefect API for one ``dlp compress`` / ``dlp sweep`` process, started before anything heavy.

Without ``PREFECT_API_URL`` Prefect starts its own temporary server (``SubprocessASGIServer``) when the first
flow runs. Two things make that slow on a small machine: it starts only then, and the parent imports the
whole server package (FastAPI app, database models: about 3 s of CPU under the GIL) just to launch it. Here
the same uvicorn app is launched as a child process at the very start of the command, without importing
prefect in the parent; the parent points ``PREFECT_API_URL`` at it, so the preflight checks, the data check
and the imports of torch / transformers / MLflow run while the server boots on the other core.

The child dies with the parent (Linux ``PR_SET_PDEATHSIG``; ``atexit`` elsewhere): a ``dlp compress`` killed
with SIGKILL leaves no server behind (Prefect's own temporary server does).
"""

from __future__ import annotations

import atexit
import fcntl
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["TemporaryPrefectServer", "start_if_needed"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 -- not Linux: atexit still stops it
        pass


class TemporaryPrefectServer:
    """Prefect's API app (the one its temporary server runs) in a child uvicorn process on 127.0.0.1."""

    def __init__(self, port: int | None = None):
        spec = importlib.util.find_spec("prefect")  # locates the package without importing it
        if spec is None or spec.origin is None:
            raise RuntimeError("prefect is not installed")
        self.app_dir = Path(spec.origin).parent.parent
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.log_path: Path | None = None  # set by start(), in PREFECT_HOME
        self._boot_lock = None  # held from start() until healthy: one server at a time migrates the database

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> "TemporaryPrefectServer":
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        home = Path(os.environ.get("PREFECT_HOME") or tempfile.gettempdir())
        home.mkdir(parents=True, exist_ok=True)
        # Two commands in one work dir share its Prefect database: the second server waits until the first
        # has created/migrated it (two concurrent migrations fail with "table ... already exists").
        self._boot_lock = open(home / ".temporary-server.lock", "w")
        fcntl.flock(self._boot_lock, fcntl.LOCK_EX)
        self.log_path = home / f"temporary-server-{self.port}.log"  # a file: a full pipe would stall the server
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(self.app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        atexit.register(self.stop)
        return self

    def wait(self, timeout: float | None = None) -> None:
        """Block until ``/api/health`` answers 200; a clear error when the child exits or times out."""
        try:
            self._wait_healthy(timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")))
        finally:
            self._release_boot_lock()

    def _release_boot_lock(self) -> None:
        if self._boot_lock is not None:
            self._boot_lock.close()  # closing the file drops the flock
            self._boot_lock = None

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.log_path.read_text(errors="replace").strip()
                last = err.splitlines()[-1] if err else f"exit code {self.proc.returncode}"
                raise RuntimeError(f"the temporary Prefect server failed to start ({last}); set PREFECT_API_URL "
                                   "to a running Prefect server instead")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f}s; raise "
                           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL")

    def stop(self, wait: float = 0.0) -> None:
        """SIGTERM (uvicorn shuts down gracefully on its own); ``wait`` > 0 waits that long, then kills. At
        exit the parent does not wait: the command's result is already printed."""
        self._release_boot_lock()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            if wait > 0:
                try:
                    self.proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
            if self.log_path.exists() and self.log_path.stat().st_size == 0:
                self.log_path.unlink()


def start_if_needed() -> TemporaryPrefectServer | None:
    """Start a temporary server and set ``PREFECT_API_URL`` -- only in a process that has not imported prefect
    and has no API configured (``PREFECT_API_URL``); otherwise None (Prefect's own behaviour applies)."""
    if "prefect" in sys.modules or os.environ.get("PREFECT_API_URL"):
        return None
    server = TemporaryPrefectServer().start()
    os.environ["PREFECT_API_URL"] = server.api_url
    return server
