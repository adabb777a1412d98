"""Start and stop a real SGLang 0.5.23 CPU server (test support, not product).

`SglangCpuServer(model_dir, port, plugin=True, ...)` runs `python -m sglang_slo.sglang_plugin.launch`
(SGLang + this project's plugin + a supervised planner sidecar) or, with `plugin=False`,
SGLang's own `python -m sglang.launch_server` with plugins switched off (SGLANG_PLUGINS), both
with the CPU bridges: the sgl_kernel shim on PYTHONPATH and SGLANG_USE_CPU_ENGINE=1.
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

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "tests" / "sglang_support" / "sgl_kernel_shim"
CPU_PROFILE = ROOT / "tests" / "sglang_support" / "hardware-cpu-tiny-sglang.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", SGLANG_USE_CPU_ENGINE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIM), str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


class SglangCpuServer:
    """One SGLang CPU server process tree; `start()` blocks until /v1/models answers."""

    def __init__(self, model_dir: str | Path, *, plugin: bool = True, policy: str = "slo_unified",
                 workdir: str | Path, extra_args: tuple[str, ...] = (), port: int | None = None,
                 planner_set: tuple[str, ...] = (), launcher_args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(workdir)
        self.report_log = self.workdir / "iterations.jsonl"
        self.log = self.workdir / ("server-plugin.log" if plugin else "server-default.log")
        self.sidecar_log = self.workdir / "sidecar.log"
        sglang_args = ["--max-total-tokens", "16384", *extra_args]
        if plugin:
            self.cmd = [sys.executable, "-m", "sglang_slo.sglang_plugin.launch", "--model", str(model_dir), "--cpu",
                        "--policy", policy, "--hardware", str(CPU_PROFILE), "--port", str(self.port),
                        "--sidecar-log", str(self.sidecar_log),
                        *[a for kv in planner_set for a in ("--planner-set", kv)], *launcher_args, "--", *sglang_args]
            self.env = cpu_env(SGLANG_SLO_REPORT_LOG=str(self.report_log))
        else:
            from sglang_slo.sglang_plugin.launch import CPU_FLAGS

            self.cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), *CPU_FLAGS,
                        "--host", "127.0.0.1", "--port", str(self.port), *sglang_args]
            self.env = cpu_env(SGLANG_PLUGINS="none-loaded")  # SGLang as shipped: no plugin at all
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300.0) -> SglangCpuServer:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log}\n{self.tail()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"server not up after {timeout_s}s; log: {self.log}\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def sidecar_pids(self) -> list[int]:
        """Pids of planner processes started for this server (children of the launcher)."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.proc.pid and b"sidecar" in cmd:
                out.append(int(d.name))
        return out

    def descendants(self) -> dict[int, str]:
        """pid -> comm of every live process under this server's launcher."""
        parent: dict[int, int] = {}
        comm: dict[int, str] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            head, _, rest = stat.rpartition(")")
            parent[int(d.name)] = int(rest.split()[1])
            comm[int(d.name)] = head.partition("(")[2]
        out = {}
        for pid in parent:
            p = pid
            while p in parent and p != self.proc.pid and p > 1:
                p = parent[p]
            if p == self.proc.pid and pid != p:
                out[pid] = comm[pid]
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the launcher's own process group (new session)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
