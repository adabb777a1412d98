"""Byte-level BPE trained on stdlib text: round trip, special tokens, chat template, HF files."""

from __future__ import annotations

import pytest
import transformers

from sglang_slo.engine.tokenizer import (SPECIAL_TOKENS, Tokenizer, read_texts,
                                        stdlib_text_files)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(read_texts(stdlib_text_files(), max_bytes=300_000), vocab_size=600)


def test_stdlib_files_sorted_without_tests():
    files = stdlib_text_files()
    assert len(files) > 100
    assert all("test" not in p.parts[-2:-1] for p in files)
    assert not any(part in ("test", "tests", "site-packages") for p in files for part in p.parts[-3:-1])


def test_round_trip_and_compression(tok):
    text = 'def f(x):\n    return {"é": x ** 2}  # 🐍 tab\there\n'
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges learned
    assert tok.vocab_size == 600
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([600])


def test_special_tokens_are_single_ids(tok):
    for t in SPECIAL_TOKENS:
        assert len(tok.encode(t)) == 1
    ids = tok.encode("<think>plan</think>answer", add_bos=True)
    assert ids[0] == tok.bos_token_id and ids[1] == tok.think_start_id
    assert tok.think_end_id in ids
    assert tok.decode(ids, skip_special_tokens=True) == "plananswer"


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<s><|system|>\nbe brief</s>\n<|user|>\nhi</s>\n<|assistant|>\n"
    ids = tok.apply_chat_template(msgs)
    assert ids == tok.encode(text) and ids.count(tok.eos_token_id) == 2
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False).endswith(
        "<|assistant|>\n")
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_save_load_and_transformers_agree(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    text = "import os\nprint(os.getcwd())\n"
    assert again.encode(text) == tok.encode(text)
    msgs = [{"role": "user", "content": "x = 1"}]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            == again.apply_chat_template(msgs, tokenize=False))
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing")


def test_training_is_deterministic():
    texts = read_texts(stdlib_text_files(), max_bytes=100_000)
    a, b = Tokenizer.train(texts, 400), Tokenizer.train(texts, 400)
    assert a._tok.to_str() == b._tok.to_str()
