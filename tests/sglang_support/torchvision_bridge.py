"""CPU bridge: let the registry's (CUDA-built) torchvision 0.28 import next to CPU torch.

Test support, not product. `torchvision/_meta_registrations.py` calls `register_fake` for
`torchvision::nms` / `qnms`, whose C++ schemas only exist in a CUDA build, so on CPU torch
`import torchvision` dies with "operator torchvision::nms does not exist" -- and
`transformers` and `sglang` import torchvision whenever it is installed. This module installs
a meta-path finder that, right before torchvision is first imported, defines those two op
schemas (a `torch.library` FRAGMENT). torchvision's Python parts (transforms) then work;
its C++ ops stay unavailable and are never called.

Installed into the venv as `sglang_slo_torchvision_bridge.py` plus a `.pth` line that
imports it (`make sglang-cpu`), so every Python process of the venv gets it. Importing this
module is cheap: torch is only imported when torchvision is.
"""

from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_defined = False
_library = None  # keep the Library object alive: dropping it would unregister the schemas


def define_torchvision_schemas() -> None:
    """Define torchvision::nms and ::qnms unless some build of torchvision already did."""
    global _defined, _library
    if _defined:
        return
    _defined = True
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 -- present in a matching (CPU) torchvision
        return
    except (AttributeError, RuntimeError):
        pass
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs `define_torchvision_schemas` once, on the first `import torchvision`."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_torchvision_schemas()
        return None  # let the normal finders locate torchvision


def install() -> None:
    """Arm the bridge (idempotent); a no-op if torchvision is already imported."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


install()
