"""Make the plugin's `sglang.srt.plugins` entry point discoverable by SGLang's processes.

The package declares it in pyproject.toml (`slo = "sglang_slo.sglang_plugin:register"`).
When the installed metadata lacks it (an install that predates it, or running from a source
tree), `ensure_entry_point()` writes a minimal `*.dist-info` with just that entry point into
a directory the caller puts on PYTHONPATH: `importlib.metadata` scans every sys.path entry,
so every SGLang process (server, schedulers, detokenizer) then finds and loads the plugin.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import entry_points
from pathlib import Path

GROUP = "sglang.srt.plugins"
NAME = "slo"
VALUE = "sglang_slo.sglang_plugin:register"
_DIST = "sglang_slo_plugin_entry-0.1.0.dist-info"


def is_registered() -> bool:
    """Whether some installed distribution already exposes `slo` in `sglang.srt.plugins`."""
    return any(ep.name == NAME and ep.value == VALUE for ep in entry_points(group=GROUP))


def write_entry_point(root: str | Path) -> Path:
    """Write the dist-info under `root` (created if needed) and return `root`."""
    root = Path(root)
    dist = root / _DIST
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sglang_slo_plugin_entry\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(f"[{GROUP}]\n{NAME} = {VALUE}\n")
    return root


def ensure_entry_point() -> str | None:
    """A directory to prepend to PYTHONPATH so SGLang finds the plugin, or None if installed."""
    if is_registered():
        return None
    return str(write_entry_point(tempfile.mkdtemp(prefix="sglang-slo-entry-")))
