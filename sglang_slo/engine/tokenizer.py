"""Byte-level BPE tokenizer: train on local text, save/load HF files, chat template.

    tok = Tokenizer.train(stdlib_text_files(), vocab_size=2048)
    tok.save("dir")                        # tokenizer.json + tokenizer_config.json
    tok = Tokenizer.load("dir")            # no transformers needed
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])

Special tokens: `<s>` (bos), `</s>` (eos, ends every chat turn), `<|system|>`, `<|user|>`,
`<|assistant|>` (turn headers) and `<think>` / `</think>` (reasoning stages). The files are
what `transformers.PreTrainedTokenizerFast` expects, so `AutoTokenizer.from_pretrained(dir)`
loads them too.
"""

from __future__ import annotations

import functools
import json
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS = "<s>", "</s>"
THINK_START, THINK_END = "<think>", "</think>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [BOS, EOS, *ROLE_TOKENS.values(), THINK_START, THINK_END]

# One turn: header token, newline, content, eos, newline. The generation prompt is the
# assistant header, so the model's reply ends at its eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)


@functools.cache
def stdlib_text_files() -> tuple[Path, ...]:
    """Python stdlib `.py` sources on this machine, sorted, without test and package dirs."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py")
             if not skip.intersection(p.relative_to(root).parts[:-1])]
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def read_texts(files: Iterable[Path], max_bytes: int | None = None) -> list[str]:
    """File contents in order (undecodable bytes replaced), up to about max_bytes in total."""
    out, total = [], 0
    for p in files:
        text = p.read_bytes().decode("utf-8", errors="replace")
        out.append(text)
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    return out


class Tokenizer:
    """A byte-level BPE tokenizer with the project's special tokens and chat template."""

    def __init__(self, tokenizer: HFTokenizer, chat_template: str = CHAT_TEMPLATE) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self._template = ImmutableSandboxedEnvironment(
            trim_blocks=False, keep_trailing_newline=True).from_string(chat_template)
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.bos_token_id: int = ids[BOS]
        self.eos_token_id: int = ids[EOS]
        self.think_start_id: int = ids[THINK_START]
        self.think_end_id: int = ids[THINK_END]
        self.special_ids = frozenset(ids.values())

    @property
    def vocab_size(self) -> int:
        """Number of token ids (including special tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
        """Train byte-level BPE on texts (deterministic for the same texts in the same order)."""
        if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size {vocab_size} too small for byte-level BPE")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read tokenizer.json (+ chat template from tokenizer_config.json if present)."""
        d = Path(directory)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {d}")
        template = CHAT_TEMPLATE
        cfg = d / "tokenizer_config.json"
        if cfg.is_file():
            template = json.loads(cfg.read_text()).get("chat_template") or template
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        return cls(HFTokenizer.from_file(str(d / "tokenizer.json")), template)

    def save(self, directory: str | Path, model_max_length: int = 2048) -> None:
        """Write tokenizer.json and tokenizer_config.json (HF PreTrainedTokenizerFast format)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": EOS,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS)],
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "chat_template": self.chat_template,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of text; special-token strings in text become their ids."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of many texts at once (faster)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids (byte-level: decode(encode(s)) == s)."""
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]],
                            add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        """Render messages ([{"role", "content"}], roles system/user/assistant) to ids or text."""
        for i, m in enumerate(messages):
            if m.get("role") not in ROLE_TOKENS or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: need role in {sorted(ROLE_TOKENS)} and str "
                                 f"content, got {m!r}")
        text = self._template.render(messages=list(messages), bos_token=BOS, eos_token=EOS,
                                     add_generation_prompt=add_generation_prompt)
        return self.encode(text) if tokenize else text
