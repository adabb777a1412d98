"""Helpers for the server tests: a tiny model pair and a real `sglang-slo serve` subprocess."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from eval.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[1]


def tiny_pair() -> Path:
    """The committed tiny target/draft pair, or a quickly trained one cached in the temp dir."""
    from sglang_slo.engine.train_tiny import ensure_tiny_pair

    try:
        return ensure_tiny_pair()
    except FileNotFoundError:
        cache = Path(tempfile.gettempdir()) / "sglang-slo-test-tiny-pair"
        return ensure_tiny_pair(cache, target_steps=15, draft_steps=10, max_corpus_bytes=3_000_000)


# The server subprocess wrapper is shared with the demo (eval/server_process.py).
ServerProc = ServerProcess


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
