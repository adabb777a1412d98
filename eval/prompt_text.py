"""Real prompt text of a given token length, for replaying traces against a real server.

Prompts are slices of Python stdlib source text (what the tiny model was trained on),
cut by the server's own tokenizer so that a trace's `prompt_tokens` is what the server sees:

    texts = PromptTexts(Tokenizer.load("models/tiny/target"))
    p = texts.fresh(120, key="r00017")            # ~120 tokens, deterministic per key
    p2 = texts.extend(p + answer, 180, key="s1")  # starts with p + answer, ~180 tokens

Token counts are exact for the tokenizer's `encode` in almost all cases; a slice whose
re-encoding merges differently at the edges is trimmed until it fits (never longer).
"""

from __future__ import annotations

import hashlib
from typing import Protocol, Sequence

CORPUS_BYTES = 400_000  # stdlib source read for prompts (~100k tokens)
_FIT_TRIES = 6


class TextTokenizer(Protocol):
    """What prompt building needs from a tokenizer (`sglang_slo.engine.tokenizer.Tokenizer`)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class PromptTexts:
    """Deterministic prompt text of a requested token count (see module docstring)."""

    def __init__(self, tokenizer: TextTokenizer, corpus: str | None = None):
        if corpus is None:
            from sglang_slo.engine.tokenizer import read_texts, stdlib_text_files

            corpus = "\n".join(read_texts(stdlib_text_files(), max_bytes=CORPUS_BYTES))
        self.tok = tokenizer
        self.ids: list[int] = tokenizer.encode(corpus)  # [corpus_tokens]
        if len(self.ids) < 64:
            raise ValueError("prompt corpus too small (needs at least 64 tokens)")

    def count(self, text: str) -> int:
        """Tokens of `text` as the server counts them (no BOS)."""
        return len(self.tok.encode(text))

    def _offset(self, key: str, n: int) -> int:
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        return h % max(1, len(self.ids) - n)

    def fresh(self, n_tokens: int, key: str) -> str:
        """Text of about `n_tokens` tokens (at most; exact in almost all cases); same key, same text."""
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        start = self._offset(key, n_tokens)
        want = n_tokens
        text = ""
        for _ in range(_FIT_TRIES):
            text = self.tok.decode(self.ids[start : start + want])
            got = self.count(text)
            if got <= n_tokens:
                return text
            want -= got - n_tokens
            if want < 1:
                break
        return text if self.count(text) <= n_tokens else self.tok.decode(self.ids[start : start + 1])

    def extend(self, prefix: str, n_tokens: int, key: str) -> str:
        """Text of about `n_tokens` tokens that starts with `prefix` (cut if the prefix is longer)."""
        have = self.count(prefix)
        if have >= n_tokens:
            ids = self.tok.encode(prefix)[:n_tokens]
            return self.tok.decode(ids)
        return prefix + self.fresh(n_tokens - have, key)
