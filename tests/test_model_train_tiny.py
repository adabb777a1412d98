"""train-tiny is deterministic for a seed, writes loadable HF pairs and a manifest."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
import transformers

from sglang_slo.engine import train_tiny
from sglang_slo.engine.loader import load_model, save_model
from sglang_slo.engine.tokenizer import Tokenizer, read_texts, stdlib_text_files


def quick_run(out, seed: int, extra: list[str] = ()) -> int:
    parser = argparse.ArgumentParser()
    train_tiny.add_arguments(parser)
    args = parser.parse_args(["--out", str(out), "--seed", str(seed), "--target-steps", "3",
                              "--draft-steps", "2", "--batch-size", "2",
                              "--max-corpus-bytes", "1000000", "--vocab-size", "512", *extra])
    return train_tiny.run(args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    assert quick_run(root / "a", 0) == 0
    return root


def train_and_hash(tok: Tokenizer, data: torch.Tensor, seed: int, out) -> str:
    model = train_tiny.new_model(train_tiny.draft_config(tok.vocab_size, 0, 1), seed)
    settings = train_tiny.TrainSettings(steps=3, max_secs=None, batch_size=2, seq_len=64)
    train_tiny.train(model, data, settings, seed, log=lambda *_: None)
    save_model(model, out, dtype=torch.float32)
    return train_tiny.weights_sha256(out)


def test_training_is_deterministic_for_a_seed(tmp_path):
    texts = read_texts(stdlib_text_files(), max_bytes=100_000)
    tok = Tokenizer.train(texts, 400)  # tokenizer determinism: test_model_tokenizer.py
    data = torch.tensor([t for ids in tok.encode_batch(texts) for t in ids])
    first = train_and_hash(tok, data, 0, tmp_path / "a")
    assert first == train_and_hash(tok, data, 0, tmp_path / "b")
    assert first != train_and_hash(tok, data, 1, tmp_path / "c")


def test_manifest_and_pair_load(runs):
    m = json.loads((runs / "a" / "manifest.json").read_text())
    assert m["seed"] == 0 and m["target"]["steps"] == 3 and m["draft"]["steps"] == 2
    assert m["target"]["sha256"] == train_tiny.weights_sha256(runs / "a" / "target")
    assert 0 < m["target"]["val_loss"] < 10 and 0 < m["draft"]["val_loss"] < 10
    acc = m["greedy_acceptance"]
    assert 1.0 <= acc["tokens_per_verify"] <= acc["depth"] + 1
    assert "--target-steps 3" in m["reproduce"]
    target = load_model(runs / "a" / "target", dtype=torch.float32)
    draft = load_model(runs / "a" / "draft", dtype=torch.float32)
    assert target.config.num_hidden_layers > draft.config.num_hidden_layers
    tok = Tokenizer.load(runs / "a" / "target")
    assert tok.vocab_size == target.config.vocab_size == draft.config.vocab_size
    assert target.config.eos_token_ids == (tok.eos_token_id,)
    hf = transformers.LlamaForCausalLM.from_pretrained(runs / "a" / "draft").float().eval()
    ids = torch.tensor([tok.encode("import os\n")])
    with torch.no_grad():
        ref = hf(ids).logits[0]
    assert (draft.logits(draft.forward_dense(ids)[0]) - ref).abs().max() < 1e-4


def test_ensure_tiny_pair_returns_existing_dir_without_training(runs):
    assert train_tiny.ensure_tiny_pair(runs / "a") == runs / "a"


def test_committed_pair_is_complete():
    root = train_tiny.ensure_tiny_pair()
    m = json.loads((root / "manifest.json").read_text())
    for role in ("target", "draft"):
        assert train_tiny.weights_sha256(root / role) == m[role]["sha256"]
        assert Tokenizer.load(root / role).vocab_size == m["vocab_size"]
    # The committed draft is the distilled one; its base is kept (for `--from-pair`).
    assert train_tiny.weights_sha256(root / "draft-base") == m["draft"]["base_sha256"]
    assert "--distill-steps" in m["reproduce"] and "--from-pair" in m["reproduce_from_base"]
    assert m["greedy_acceptance"]["tokens_per_verify"] > m["base_greedy_acceptance"]["tokens_per_verify"] + 1.0
    target = load_model(root / "target", dtype=torch.float32)
    draft = load_model(root / "draft", dtype=torch.float32)
    assert target.config.num_parameters > 4 * draft.config.num_parameters
    assert target.config.max_position_embeddings == train_tiny.CONTEXT


DISTILL = ["--distill-steps", "2", "--distill-prompts", "6", "--distill-new-tokens", "8",
           "--distill-sampled-fraction", "0.5"]


def test_distill_stage_from_base_pair_reproduces_the_full_run(runs, tmp_path):
    """Base + distill in one command == distill stage alone from the base pair (same bytes),
    the base draft is kept, and the stage changes the draft."""
    full = tmp_path / "full"
    assert quick_run(full, 0, DISTILL) == 0
    m = json.loads((full / "manifest.json").read_text())
    base_draft = train_tiny.weights_sha256(runs / "a" / "draft")
    assert m["draft"]["base_sha256"] == base_draft == train_tiny.weights_sha256(full / "draft-base")
    assert m["draft"]["sha256"] == train_tiny.weights_sha256(full / "draft") != base_draft
    assert m["distill"]["steps"] == 2 and m["distill"]["sequences"] == [6, 64 + 8]
    assert "--distill-steps 2" in m["reproduce"] and "--target-steps 3" in m["reproduce"]
    staged = tmp_path / "staged"
    assert quick_run(staged, 0, DISTILL + ["--from-pair", str(full)]) == 0  # uses full/draft-base
    assert train_tiny.weights_sha256(staged / "draft") == m["draft"]["sha256"]
    assert train_tiny.weights_sha256(staged / "target") == m["target"]["sha256"]


def test_from_pair_rejects_a_mismatched_base(runs, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(runs / "a", bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["target"]["sha256"] = "0" * 64
    (bad / "manifest.json").write_text(json.dumps(m))
    assert quick_run(tmp_path / "out", 0, DISTILL + ["--from-pair", str(bad)]) == 1
    assert "does not match" in capsys.readouterr().err
    assert quick_run(tmp_path / "out", 0, ["--from-pair", str(runs / "a")]) == 1  # no stage
