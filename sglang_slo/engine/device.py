"""Where the embedded runtime runs: the `--device` / `--dtype` arguments shared by
`bench-engine`, `profile` and `serve`, and what they resolve to.

    add_device_arguments(parser)
    where = Placement.from_args(args)        # checks CUDA is there when asked for
    target = load_model(dir, dtype=where.torch_dtype, device=where.device)
    Engine(target, draft, EngineConfig(..., device=where.device, dtype=where.dtype))
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: `serve`'s argument parser uses this module too.
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype` (weights and KV cache), with the same help everywhere."""
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where the models and KV caches live (cuda: the current CUDA device)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights and KV cache dtype (logits are always float32)")


@dataclass(frozen=True)
class Placement:
    """A device and dtype the engine runs with."""

    device: str = "cpu"
    """'cpu' or 'cuda'."""
    dtype: str = "float32"
    """One of DTYPES (a torch dtype name)."""

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Placement:
        """From `add_device_arguments`' arguments; SystemExit if CUDA is asked for and absent."""
        import torch

        where = cls(getattr(args, "device", "cpu"), getattr(args, "dtype", "float32"))
        if where.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device "
                             f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        return where

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"

    def describe(self) -> dict:
        """What the numbers were measured on (for benchmark JSON)."""
        import torch

        out = {"device": self.device, "dtype": self.dtype, "torch": torch.__version__}
        if self.is_cuda:
            out["gpu"] = torch.cuda.get_device_name()
            out["cuda"] = torch.version.cuda
        return out


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """A no-argument function that waits for the device's queued work: CUDA kernels run
    asynchronously, so a host clock read after a forward's launch does not time it."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return _nothing


def _nothing() -> None:
    return None


def attention_backends(device: str | torch.device) -> Callable[[], ContextManager]:
    """A context (made per forward batch) that keeps torch SDPA off its cuDNN backend on
    CUDA. On the H200 (torch 2.11) bfloat16 SDPA with our boolean masks went to cuDNN,
    which builds a graph per new shape: every iteration of the engine has new key lengths,
    and speculative iterations at 8-64 requests took 156-185 ms instead of 16-24 ms in
    float32 (bench-engine, 2026-11-22). Flash, memory-efficient and math kernels need no
    per-shape build. On the CPU: no context."""
    import torch

    if torch.device(device).type != "cuda":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return lambda: sdpa_kernel(backends)
