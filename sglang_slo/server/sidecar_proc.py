"""Runs the planner sidecar (`python -m sidecar ...`) as a supervised child process.

The child is started in its own session (a Ctrl-C in the terminal reaches only the server,
which then stops the child in order) and gets SIGTERM if the server dies first (Linux
PR_SET_PDEATHSIG). A monitor thread restarts it whenever it exits while the server runs (even
after SIGKILL), with capped exponential backoff, and calls `on_restart` so the engine's link
handshakes again and resynchronises the new planner.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class SidecarSupervisor:
    """Starts, watches, restarts and stops the planner process."""

    def __init__(
        self,
        endpoint: str,
        policy: str,
        hardware: str | None = None,
        extra_args: Sequence[str] = (),
        on_restart: Callable[[int], None] | None = None,
        log_path: str | None = None,
        python: str = sys.executable,
        max_backoff_s: float = 2.0,
    ):
        self.endpoint = endpoint
        self.cmd = [python, "-m", "sidecar", "--endpoint", endpoint, "--policy", policy]
        if hardware:
            self.cmd += ["--hardware", hardware]
        self.cmd += list(extra_args)
        self.on_restart = on_restart
        self.log_path = log_path
        self.max_backoff_s = max_backoff_s
        self.restarts = 0
        """How many times the sidecar was restarted after dying."""
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Spawn the sidecar and the monitor thread (returns at once; see `wait_ready`)."""
        self._spawn()
        self._monitor = threading.Thread(target=self._watch, name="sidecar-monitor", daemon=True)
        self._monitor.start()

    def _spawn(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self._started_at = time.monotonic()
        with self._lock:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if self.log_path else None,
                start_new_session=True, preexec_fn=_die_with_parent, env=env,
            )
        if out is not subprocess.DEVNULL:
            out.close()
        log.info("sidecar started (pid %d): %s", self.proc.pid, " ".join(self.cmd))

    def _watch(self) -> None:
        backoff = 0.0  # seconds; grows while the sidecar keeps dying young
        while not self._stop.wait(0.05):
            proc = self.proc
            if proc is None or proc.poll() is None:
                continue
            lived = time.monotonic() - self._started_at
            backoff = 0.05 if lived > 5.0 else min(self.max_backoff_s, max(0.05, backoff * 2))
            log.warning("sidecar (pid %d) exited with %s after %.1fs; restarting in %.2fs",
                        proc.pid, proc.returncode, lived, backoff)
            if self._stop.wait(backoff):
                return
            self._spawn()
            self.restarts += 1
            if self.on_restart:
                try:
                    self.on_restart(self.restarts)
                except Exception:  # a callback bug must not stop supervision
                    log.exception("sidecar on_restart callback failed")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop supervising and terminate the sidecar (SIGTERM, then SIGKILL)."""
        self._stop.set()
        if self._monitor:
            self._monitor.join(timeout=1.0)
        with self._lock:
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("sidecar did not stop on SIGTERM; killing it")
            proc.kill()
            proc.wait(timeout_s)
