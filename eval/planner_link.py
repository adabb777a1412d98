"""How the simulated engine talks to the planner: in-process calls, or a real sidecar over ZMQ.

Both follow the sidecar's protocol (sidecar/proc.py): events go in as they happen; after
each IterationReport the planner answers with one Plan for step `report.step + 2`, planned
at `now = report.end_s`. The simulated engine waits for that plan before its next
iteration (simulated time does not move while it waits), so both links give the same run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from protos import messages as protos
from protos.channel import EngineChannel, ipc_endpoint

log = logging.getLogger(__name__)


class InProcessLink:
    """The planner as a Python object in this process."""

    def __init__(self, policy: str, hardware: str | Path, **overrides):
        from sidecar.planner import Planner  # imported here: eval.metrics etc. stay planner-free

        self.planner = Planner.create(policy, hardware, **overrides)
        self.plan_latency_s = 0.0
        self.plan_failures = 0

    def send(self, msg: protos.Message) -> None:
        self.planner.observe(msg)

    def plan_after(self, report: protos.IterationReport) -> protos.Plan | None:
        """The plan for step report.step + 2, or None if the policy failed (as the sidecar
        process would: it logs the error and sends nothing, so the engine falls back)."""
        self.planner.observe(report)
        try:
            plan = self.planner.plan(report.end_s, step=report.step + 2)
        except Exception:
            log.exception("planner: policy failed; no plan this step")
            self.plan_failures += 1
            return None
        self.plan_latency_s += plan.plan_latency_s
        return plan

    def close(self) -> None:
        pass


class ZmqLink:
    """A `python -m sidecar` subprocess on a fresh ipc:// endpoint; we are its DEALER engine."""

    def __init__(self, policy: str, hardware: str | Path, hello: protos.EngineHello,
                 timeout_s: float = 30.0, overrides: dict | None = None, start_timeout_s: float = 120.0):
        """timeout_s: how long to wait for each plan (then: fallback, logged and counted);
        start_timeout_s: for the sidecar to start and welcome us (a loaded machine is slow)."""
        self.endpoint = ipc_endpoint("sim")
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.plan_latency_s = 0.0
        self.plan_failures = 0
        cmd = [sys.executable, "-m", "sidecar", "--endpoint", self.endpoint, "--policy", policy,
               "--hardware", str(hardware), "--log-level", "WARNING"]
        for k, v in (overrides or {}).items():
            cmd += ["--set", f"{k}={v}"]
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        # Output to a file, never a pipe: a chatty sidecar must not block on a full pipe.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.chan = EngineChannel(self.endpoint)
        try:
            self._handshake(hello)
        except Exception:
            self.close()
            raise

    def _handshake(self, hello: protos.EngineHello) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}: {self._log_tail()}")
            self.chan.send(hello)  # IMMEDIATE: dropped until the planner has bound; resend
            msg = self.chan.recv(200)
            if isinstance(msg, protos.PlannerWelcome):
                if not msg.accepted:
                    raise RuntimeError(f"sidecar refused the simulated engine: {msg.reason}")
                self.chan.drain()  # welcomes to our resent hellos
                return
        raise RuntimeError(f"no PlannerWelcome from the sidecar within {self.start_timeout_s:.0f} s")

    def send(self, msg: protos.Message) -> None:
        if not self.chan.send(msg):
            raise RuntimeError("sidecar not connected (send failed)")

    def plan_after(self, report: protos.IterationReport) -> protos.Plan | None:
        self.send(report)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            msg = self.chan.recv(100)
            if isinstance(msg, protos.Plan) and msg.based_on_step >= report.step:
                self.plan_latency_s += msg.plan_latency_s
                return msg
            if msg is None and self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}: {self._log_tail()}")
        log.warning("no plan from the sidecar within %.0f s of report %d: fallback", self.timeout_s, report.step)
        self.plan_failures += 1
        return None

    def _log_tail(self, chars: int = 2000) -> str:
        self.log.seek(0)
        return self.log.read()[-chars:]

    def close(self) -> None:
        self.chan.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
