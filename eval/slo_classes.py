"""Named SLO classes (configs/slo_classes.yaml) -> `protos.Slo`.

One file, loaded by the simulator, the workload generators and the HTTP server. Units are
seconds at GPU scale; `scale_for_unloaded_tpot` rescales a class table for a slower engine
(the CPU tiny model) from its measured unloaded TPOT (reference §2.4).
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import yaml

from protos.messages import Slo, Stage

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "configs" / "slo_classes.yaml"


class StageSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One stage of a multi-stage class."""

    tpot_s: float
    """Per-token deadline spacing within the stage, seconds."""
    ttft_s: float = 0.0
    """Extra allowance before the stage's first token, seconds."""


class SloClass(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One named SLO class."""

    ttft_s: float
    """Time to first token objective, seconds from arrival."""
    tpot_s: float
    """Time per output token objective, seconds (the first stage's when `stages` is set)."""
    priority: int = 0
    """Larger = more important (SGLang priority scheduling)."""
    best_effort: bool = False
    """No SLO guarantee; served on leftover capacity."""
    stages: list[StageSpec] = []
    """Per-stage objectives in stream order; empty = one stage."""
    cpu_tpot_multiplier: float = 3.0
    """On a slow engine: tpot_s = this x measured unloaded TPOT (other stages keep their ratio)."""
    cpu_ttft_multiplier: float = 50.0
    """On a slow engine: ttft_s = this x measured unloaded TPOT."""

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError("ttft_s and tpot_s must be positive")
        if any(s.tpot_s <= 0 or s.ttft_s < 0 for s in self.stages):
            raise ValueError("stage tpot_s must be positive and ttft_s non-negative")

    def to_slo(self, name: str, stage_tokens: list[int] | None = None) -> Slo:
        """The wire SLO; `stage_tokens` fills `Stage.tokens` (0 = unknown, the default)."""
        stages = [
            Stage(tpot_s=s.tpot_s, tokens=(stage_tokens[i] if stage_tokens else 0), ttft_s=s.ttft_s)
            for i, s in enumerate(self.stages)
        ]
        return Slo(ttft_s=self.ttft_s, tpot_s=self.tpot_s, stages=stages, slo_class=name,
                   priority=self.priority, best_effort=self.best_effort)


class _File(msgspec.Struct, forbid_unknown_fields=True):
    classes: dict[str, SloClass]


def load_slo_classes(path: str | Path = DEFAULT_PATH) -> dict[str, SloClass]:
    """Parse and validate an SLO class file; raises ValueError with the file name on bad input."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
        return msgspec.convert(raw, _File).classes
    except FileNotFoundError:
        raise ValueError(f"SLO class file not found: {path}") from None
    except (yaml.YAMLError, msgspec.ValidationError, ValueError, TypeError) as e:
        raise ValueError(f"bad SLO class file {path}: {e}") from None


def scale_for_unloaded_tpot(classes: dict[str, SloClass], unloaded_tpot_s: float) -> dict[str, SloClass]:
    """Classes for an engine whose unloaded TPOT is `unloaded_tpot_s` seconds (CPU tiny model).

    tpot_s = cpu_tpot_multiplier x unloaded TPOT; later stages keep their ratio to the first;
    ttft_s = cpu_ttft_multiplier x unloaded TPOT.
    """
    if unloaded_tpot_s <= 0:
        raise ValueError("unloaded_tpot_s must be positive")
    out = {}
    for name, c in classes.items():
        tpot = c.cpu_tpot_multiplier * unloaded_tpot_s
        f = tpot / c.tpot_s
        stages = [StageSpec(tpot_s=s.tpot_s * f, ttft_s=s.ttft_s * f) for s in c.stages]
        out[name] = msgspec.structs.replace(c, tpot_s=tpot, ttft_s=c.cpu_ttft_multiplier * unloaded_tpot_s,
                                            stages=stages)
    return out
