"""A real `sglang-slo serve` subprocess on a free loopback port (used by the demo and tests).

    with ServerProcess.for_pair(model_dir, "slo_unified", log_path) as srv:
        httpx.get(srv.url + "/v1/models")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m sglang_slo.cli serve ARGS --port P`; a context manager; `stop()` sends SIGTERM."""

    def __init__(self, args: list[str] | tuple[str, ...], log_path: Path, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = Path(log_path)
        cmd = [sys.executable, "-m", "sglang_slo.cli", "serve", "--port", str(self.port), "--log-level", "WARNING",
               "--sidecar-log", str(self.log_path.with_suffix(".sidecar.log")), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.cmd = cmd
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @classmethod
    def for_pair(cls, model_dir: Path, policy: str, log_path: Path, *, hardware: Path | None = None,
                 unloaded_tpot_s: float | None = None, speculation: bool = True,
                 extra_args: tuple[str, ...] = ()) -> "ServerProcess":
        """Serve a tiny pair directory (target/, draft/); speculation=False leaves the draft out."""
        args = ["--model", str(Path(model_dir) / "target"), "--policy", policy]
        if speculation:
            args += ["--draft", str(Path(model_dir) / "draft")]
        if hardware is not None:
            args += ["--hardware", str(hardware)]
        if unloaded_tpot_s:
            args += ["--unloaded-tpot-ms", f"{unloaded_tpot_s * 1000:.3f}"]
        return cls([*args, *extra_args], log_path)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Block until GET /health answers 200; returns the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready in {timeout_s:.0f} s:\n{self.log_tail()}")

    def state(self) -> dict:
        """The server's /debug/state (free KV, sidecar pid and restarts, handshakes)."""
        return httpx.get(self.url + "/debug/state", headers=self.headers(), timeout=10).json()

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value}."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
