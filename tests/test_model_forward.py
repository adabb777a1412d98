"""Our Llama/Qwen2 forward equals transformers' on random weights; HF save/load round trips."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from sglang_slo.engine.attention import AttentionBatch, SequenceInput
from sglang_slo.engine.config import ModelConfig
from sglang_slo.engine.kv_cache import KVCache
from sglang_slo.engine.loader import load_model, save_model

VOCAB = 320


def hf_model(kind: str) -> transformers.PreTrainedModel:
    """A small random-init transformers model of the given flavour."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "llama3_tied":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=50000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 32})
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits biases to zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module", params=["llama", "llama3_tied", "qwen2"])
def pair(request, tmp_path_factory):
    hf = hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return hf, load_model(d, dtype=torch.float32), d


def test_config_read_from_hf(pair):
    hf, ours, _ = pair
    cfg = ours.config
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 16
    assert cfg.attention_bias == (hf.config.model_type == "qwen2")
    assert cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
        assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 50000.0


def test_dense_and_paged_logits_match_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits                                           # [2, 90, vocab]
    dense = ours.logits(ours.forward_dense(ids))
    assert (dense - ref).abs().max() < 1e-4
    # Paged: both sequences in one ragged batch, the second split into two chunks.
    kv = KVCache.for_model(ours.config, num_blocks=32, block_size=8)
    t0, t1 = [5, 2, 9, 30, 11, 0, 7, 3, 4, 6, 8, 12], [31, 1, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
    batch = AttentionBatch.build([SequenceInput(t0, 0, 90), SequenceInput(t1, 0, 50)], 8)
    h = ours.forward(torch.cat([ids[0], ids[1, :50]]), batch.positions, batch, kv)
    assert (ours.logits(h[:90]) - ref[0]).abs().max() < 1e-4
    assert (ours.logits(h[90:]) - ref[1, :50]).abs().max() < 1e-4
    batch = AttentionBatch.build([SequenceInput(t1, 50, 40)], 8)
    h = ours.forward(ids[1, 50:], batch.positions, batch, kv)
    assert (ours.logits(h) - ref[1, 50:]).abs().max() < 1e-4


def test_bf16_forward_close_to_fp32(pair):
    _, ours, d = pair
    ours16 = load_model(d, dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    ref = ours.logits(ours.forward_dense(ids))
    kv = KVCache.for_model(ours16.config, 8, 16, dtype=torch.bfloat16)
    batch = AttentionBatch.build([SequenceInput([3, 1, 4], 0, 40)], 16)
    got = ours16.logits(ours16.forward(ids[0], batch.positions, batch, kv))
    assert got.dtype == torch.float32
    assert (got - ref[0]).abs().max() < 0.1 * ref.abs().max()
    assert (got.argmax(-1) == ref[0].argmax(-1)).float().mean() > 0.8


def test_linear_weights_are_column_major_after_load_and_casts(pair):
    """HF shapes, column-major storage (`model.gemm_layout`), kept by dtype casts; a tied
    embedding stays row-major."""
    _, ours, _ = pair
    for model in (ours, copy.deepcopy(ours).to(torch.float64)):
        for name, p in model.named_parameters():
            if p.dim() != 2:
                continue
            if name == "model.embed_tokens.weight":
                assert p.is_contiguous(), name
            else:
                assert p.stride() == (1, p.shape[0]), name


def test_save_load_round_trip_loads_in_transformers(pair, tmp_path):
    hf, ours, _ = pair
    save_model(ours, tmp_path)
    again = load_model(tmp_path, dtype=torch.float32)
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    cls = type(hf)
    reloaded = cls.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, hf(ids).logits, atol=1e-5)
    assert ModelConfig.from_pretrained(tmp_path).architecture == cls.__name__


def test_bad_inputs_raise_clear_errors(pair, tmp_path):
    _, ours, _ = pair
    kv = KVCache.for_model(ours.config, 4, 8)
    with pytest.raises(ValueError, match="blocks cannot hold"):
        AttentionBatch.build([SequenceInput([0], 0, 9)], 8)
    with pytest.raises(ValueError, match="query_len"):
        AttentionBatch.build([SequenceInput([0], 0, 0)], 8)
    batch = AttentionBatch.build([SequenceInput([0, 1], 0, 9)], 8)
    with pytest.raises(ValueError, match="differ"):
        ours.forward(torch.zeros(8, dtype=torch.long), torch.arange(8), batch, kv)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.forward_dense(torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(vocab_size=10, hidden_size=12, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=3, num_key_value_heads=2)
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"], "vocab_size": 4,
                                  "hidden_size": 8, "intermediate_size": 8,
                                  "num_hidden_layers": 1, "num_attention_heads": 2})



def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    ours = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert (ours.logits(ours.forward_dense(ids)) - hf(ids).logits).abs().max() < 1e-4
