"""Per-request expected-token rows kept incrementally in one matrix (plan latency at 4096).

Row of request i: E_i[m-1] = expected committed tokens of an m-node draft chain, m = 1..D+1,
from its per-position acceptance alphas (E_i[0] = 1: the root). Reading 4096 requests' alphas
and rebuilding the table every plan costs milliseconds in Python, so each row lives in a slot of
a persistent matrix and is re-read from the acceptance model every `refresh` plans (staggered
by slot, so ~1/refresh of the rows are refreshed per plan).
"""

from __future__ import annotations

import numpy as np


def expected_table(alphas: np.ndarray) -> np.ndarray:
    """[n, D] conditional alphas -> [n, D+1] expected committed tokens of 1..D+1 chain nodes."""
    n, d = alphas.shape
    out = np.ones((n, d + 1))
    if n and d:
        np.cumsum(np.cumprod(alphas, axis=1), axis=1, out=out[:, 1:])
        out[:, 1:] += 1.0
    return out


def expected_row(alphas: list[float]) -> list[float]:
    """One row of `expected_table` in plain Python (the same sequential products and sums as
    numpy's cumprod / cumsum, so the same floats; cheaper for the few rows refreshed per plan)."""
    row, run, total = [1.0], 1.0, 0.0
    for a in alphas:
        run *= a
        total += run
        row.append(total + 1.0)
    return row


class ExpectedRows:
    """Slots of expected-token rows by request id, refreshed round-robin."""

    def __init__(self, refresh: int = 8):
        if refresh < 1:
            raise ValueError("refresh must be >= 1")
        self.refresh = refresh
        self.depth = -1
        self._slot: dict[str, int] = {}
        self._rid: list[str | None] = []
        self._free: list[int] = []
        self._mat = np.ones((0, 1))
        self._stamp = np.zeros(0, dtype=np.int64)
        self._last: tuple[list[str], np.ndarray] = ([], np.zeros(0, dtype=np.int64))  # (rids, their slots)

    def clear(self) -> None:
        self.__init__(self.refresh)

    def _grow(self, need: int) -> None:
        cap = max(64, 2 * need)
        mat = np.ones((cap, self.depth + 1))
        mat[: len(self._mat)] = self._mat
        stamp = np.zeros(cap, dtype=np.int64)
        stamp[: len(self._stamp)] = self._stamp
        self._free.extend(range(cap - 1, len(self._rid) - 1, -1))
        self._rid.extend([None] * (cap - len(self._rid)))
        self._mat, self._stamp = mat, stamp

    def gather(self, acceptance, rids: list[str], depth: int, plan_no: int) -> np.ndarray:
        """[n, depth+1] rows for `rids` (acceptance: object with alphas(rid, depth))."""
        if depth != self.depth:
            self.__init__(self.refresh)
            self.depth = depth
        n = len(rids)
        if len(self._free) < n:
            self._grow(len(self._rid) + n)
        slot_of, rid_of, free, stamp = self._slot, self._rid, self._free, self._stamp
        new = []
        last_rids, idx = self._last
        if rids != last_rids:  # (the same requests as the last call keep their slots)
            try:  # common case: every rid already has a slot (one C-level pass)
                idx = np.fromiter(map(slot_of.__getitem__, rids), dtype=np.int64, count=n)
            except KeyError:  # newcomers take free slots, in rid order
                for rid in rids:
                    if rid not in slot_of:
                        s = slot_of[rid] = free.pop()
                        rid_of[s] = rid
                        new.append(s)
                idx = np.fromiter(map(slot_of.__getitem__, rids), dtype=np.int64, count=n)
            self._last = (list(rids), idx)
        if new:
            fresh = np.asarray(new, dtype=np.int64)
            stamp[fresh] = plan_no - self.refresh  # due now
        due = idx[plan_no - stamp[idx] >= self.refresh]
        if due.size and depth:
            flat: list[float] = []  # the due rows, concatenated (one fromiter: cheaper than nested lists)
            for s in due.tolist():
                flat += expected_row(acceptance.alphas(rid_of[s], depth))
            self._mat[due] = np.fromiter(flat, dtype=np.float64, count=len(flat)).reshape(len(due), depth + 1)
        stamp[due] = plan_no
        if new:  # stagger the next refresh of new rows by slot, so ~1/refresh come due per plan
            stamp[fresh] = plan_no - fresh % self.refresh
        if len(slot_of) > 2 * n + 64:  # forget finished requests
            live = set(rids)
            for rid in [r for r in slot_of if r not in live]:
                s = slot_of.pop(rid)
                rid_of[s] = None
                free.append(s)
        return self._mat[idx]


__all__ = ["ExpectedRows", "expected_row", "expected_table"]
