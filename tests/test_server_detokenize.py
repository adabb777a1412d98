"""Incremental detokenization and stop strings (sglang_slo.server.detokenize) on a real BPE tokenizer."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_slo.engine.tokenizer import Tokenizer
from sglang_slo.server.detokenize import TextStream

TEXTS = ["def main():\n    print('hello world')  # ünïcödé ✓ 漢字\n", "the quick brown fox jumps over the lazy dog"] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=300)


def run(tok, text, stop=(), chunk=1):
    ids = tok.encode(text)
    ts = TextStream(lambda t: tok.decode(t), tok.encode("prompt: "), stop)
    out = []
    for i in range(0, len(ids), chunk):
        d = ts.push(ids[i : i + chunk])
        assert "\ufffd" not in d
        out.append(d)
        if ts.stopped:
            break
    else:
        out.append(ts.finish())
    return "".join(out), ts


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stream_reassembles_text_exactly(tok, chunk):
    text = "print('ünïcödé ✓ 漢字') fox"
    got, ts = run(tok, text, chunk=chunk)
    assert got == text and ts.text == text and not ts.stopped


def test_stop_string_is_trimmed_and_ends_stream(tok):
    got, ts = run(tok, "the quick brown fox jumps", stop=["brown", "zzz"])
    assert got == "the quick " and ts.stopped == "brown"


def test_partial_stop_string_is_held_back_then_released(tok):
    ts = TextStream(lambda t: tok.decode(t), (), ["fox!"])
    released = ts.push(tok.encode("a fox"))
    assert not released.endswith("fox")  # could still become "fox!"
    assert released + ts.finish() == "a fox"


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="abc fox✓漢\n", max_size=40), stop=st.text(alphabet="abcfox ", min_size=1, max_size=4),
       chunk=st.integers(1, 4))
def test_stop_semantics_match_str_find(tok, text, stop, chunk):
    got, ts = run(tok, text, stop=[stop], chunk=chunk)
    i = text.find(stop)
    assert got == (text if i < 0 else text[:i])
