"""Incremental detokenization with stop strings (pure; one instance per request).

Token ids arrive a few at a time; `push` returns only text that is final: no trailing
U+FFFD of an unfinished multi-byte character, and no suffix that could still turn into a stop
string. A matched stop string ends the stream and is trimmed from the text (OpenAI's rule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_CONTEXT_TOKENS = 4  # prompt tokens decoded with the output so leading spaces come out right


class TextStream:
    """Turns a growing list of output token ids into text deltas."""

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()):
        self._decode = decode
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # ids[prefix:read] were already turned into text
        self._read = len(self._ids)
        self._stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""
        """All text decoded so far (stop string trimmed once matched)."""
        self.emitted = 0
        """Characters of `text` already returned to the caller."""
        self.stopped = ""
        """The stop string that ended the stream ('' = none yet)."""

    def push(self, ids: Sequence[int]) -> str:
        """Add new output ids; return the text that became final (maybe '')."""
        if self.stopped or not ids:
            return ""
        self._ids.extend(ids)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: flush held-back text (a partial stop string is just text)."""
        if not self.stopped and self._read < len(self._ids):
            tail = self._decode(self._ids[self._prefix :])[len(self._decode(self._ids[self._prefix : self._read])) :]
            self.text += tail.rstrip("\ufffd")
            self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop and not self.stopped:
            start = max(0, self.emitted - self._max_stop + 1)
            hits = [(i, s) for s in self._stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                i, s = min(hits)
                self.text, self.stopped, final = self.text[:i], s, True
        end = len(self.text)
        if not final and self._stop:
            end -= self._held_back()
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for k in range(min(self._max_stop - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
