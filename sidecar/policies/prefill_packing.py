"""Pack prompt chunks into an iteration's prefill budget, in a given order, admitting as needed."""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import messages as protos
from sidecar.state import ReqState

Decision = protos.Decision


@dataclass(slots=True)
class Packing:
    chunks: list[protos.PrefillChunk] = field(default_factory=list)
    decisions: list[protos.AdmissionDecision] = field(default_factory=list)
    used: int = 0
    """Prefill tokens packed."""
    kv_left: int = 0
    """KV slots left for further admissions."""


def kv_need(r: ReqState, new_token_ratio: float, decode_clip: int = 4096) -> int:
    """KV a waiting request reserves when admitted: its prompt + a share of its output."""
    rest = r.max_new_tokens - r.decoded
    return r.prompt_tokens - r.prefilled + int((rest if rest < decode_clip else decode_clip) * new_token_ratio)


def pack(
    order: list[ReqState],
    budget: int,
    kv_left: int,
    new_token_ratio: float,
    admit_as: Decision = Decision.ADMIT,
    chunk_cap: int = 1 << 30,
    head_of_line: bool = True,
    out: Packing | None = None,
    kv_capacity: int = 0,
    preadmitted: frozenset[str] | set[str] = frozenset(),
) -> Packing:
    """Give each request of `order` a chunk (admitting waiting ones while KV fits).

    budget: prefill tokens available; chunk_cap: most tokens in total (the chunk size);
    head_of_line: stop at the first waiting request that does not fit (SGLang), else skip it;
    kv_capacity: waiting requests whose prompt alone does not fit it are rejected (0 = never);
    preadmitted: rids the caller already admitted in this plan (no second decision).
    """
    out = out or Packing(kv_left=kv_left)
    left = min(budget, chunk_cap) - out.used
    for r in order:
        if left <= 0:
            break
        rest = r.prompt_tokens - r.prefilled
        if rest <= 0:
            continue
        if not r.is_admitted and r.rid not in preadmitted:
            if kv_capacity and r.prompt_tokens >= kv_capacity:
                out.decisions.append(protos.AdmissionDecision(r.rid, Decision.REJECT))
                continue
            need = kv_need(r, new_token_ratio)
            if need > out.kv_left:
                if head_of_line:
                    break
                continue
            out.kv_left -= need
            out.decisions.append(protos.AdmissionDecision(r.rid, admit_as))
        n = rest if rest < left else left
        out.chunks.append(protos.PrefillChunk(r.rid, n))
        out.used += n
        left -= n
    return out


__all__ = ["Packing", "pack", "kv_need"]
