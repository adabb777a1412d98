"""Llama-family decoder (Llama, Qwen2): RMSNorm, RoPE (incl. llama3 scaling), GQA, SwiGLU.

Two entry points share the weights:

- `forward(input_ids [T], positions [T], batch, kv) -> hidden [T, hidden]`: serving. One
  ragged batch of prefill chunks, decode tokens and verify trees over a paged KV cache
  (see `attention.py`); new K/V are written to `batch.slot_mapping`.
- `forward_dense(input_ids [B, L]) -> hidden [B, L, hidden]`: causal, no cache (training,
  reference checks).

`logits(hidden [R, hidden]) -> [R, vocab]` (float32) runs the LM head only on the rows given,
so callers pass just the rows that need a next-token distribution.

Projections are fused (`qkv_proj`, `gate_up_proj`) to cut per-layer kernel calls on CPU;
`loader.py` maps HF's separate q/k/v and gate/up tensors onto them and back. Linear weights
keep HF's `[out, in]` shape but are stored column-major (see `gemm_layout`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sglang_slo.engine.attention import AttentionBatch, dense_causal_attention, paged_attention
from sglang_slo.engine.config import ModelConfig
from sglang_slo.engine.kv_cache import KVCache


def gemm_layout(weight: nn.Parameter) -> None:
    """Store a linear weight `[out, in]` column-major (strides (1, out)), in place: F.linear
    then multiplies by a contiguous `[in, out]` matrix, which on CPU (MKL, one thread) is
    15-45% faster for decode-sized inputs (1-32 rows) and the same for prefill-sized ones.
    Shape, values and names are unchanged; dtype/device moves and `to_empty` keep the strides.
    Tied embeddings stay row-major (their rows are gathered)."""
    weight.data = weight.data.t().contiguous().t()


class RMSNorm(nn.Module):
    """y = weight * x / rms(x), computed in float32 like HF."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one call, same math
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies `[head_dim / 2]`, with llama3 scaling if configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type", "default")) == "default":
        return inv
    # llama3: long wavelengths divided by `factor`, short kept, smooth blend in between.
    factor = float(rs["factor"])
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_len = float(rs["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed tables `[max_positions, head_dim]` (float32, not saved): cos repeated for
    both halves, and sin with the first half negated, so rotating is x * cos + swap(x) * sin
    (4 ops instead of 8; bitwise the same as HF's x * cos + rotate_half(x) * sin)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.build_tables(cfg)

    def build_tables(self, cfg: ModelConfig, device: str | torch.device | None = None) -> None:
        """(Re)compute the tables, e.g. after the module was created on the meta device."""
        t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32, device=device)
        freqs = torch.outer(t, rope_inv_freq(cfg).to(t.device))  # [positions, head_dim/2]
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", torch.cat((cos, cos), -1), persistent=False)   # [P, head_dim]
        self.register_buffer("sin", torch.cat((-sin, sin), -1), persistent=False)  # [P, head_dim]

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin for positions `[...]` -> `[..., 1, head_dim]` (once per forward)."""
        return (self.cos[positions].unsqueeze(-2).to(dtype),
                self.sin[positions].unsqueeze(-2).to(dtype))

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x `[..., heads, head_dim]` by tables from `tables()` (HF "rotate_half"
        layout: out = [x1 cos - x2 sin, x2 cos + x1 sin])."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """GQA self-attention with fused q/k/v projection."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size,
                                  bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def _qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        lead = x.shape[:-1]
        qkv = F.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        qk = qkv[..., :self.q_size + self.kv_size].unflatten(-1, (-1, self.head_dim))
        qk = RotaryEmbedding.rotate(qk, *rope)  # q and k heads rotated in one call
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=-2)
        v = qkv[..., self.q_size + self.kv_size:].view(*lead, self.num_kv_heads, self.head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                batch: AttentionBatch, kv: KVCache) -> torch.Tensor:
        q, k, v = self._qkv(x, rope)  # [T, heads|kv_heads, head_dim]
        return F.linear(paged_attention(q, k, v, batch, kv, self.layer, self.scale), self.o_proj.weight)

    def forward_dense(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self._qkv(x, rope)  # [B, L, heads|kv_heads, head_dim]
        return self.o_proj(dense_causal_attention(q, k, v, self.scale))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) with gate and up fused."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj.weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj.weight)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and final norm (HF name prefix `model.`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head; parameter names follow HF except the fused projections."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight is not self.model.embed_tokens.weight:
                gemm_layout(m.weight)

    def _check_positions(self, positions: torch.Tensor) -> None:
        limit = self.config.max_position_embeddings
        if positions.numel() and int(positions.max()) >= limit:
            raise ValueError(f"position {int(positions.max())} >= max_position_embeddings {limit}")

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv: KVCache) -> torch.Tensor:
        """Ragged serving forward. input_ids, positions: [T]. Returns hidden [T, hidden]."""
        if input_ids.shape != positions.shape or input_ids.shape[0] != batch.num_tokens:
            raise ValueError(f"input_ids {tuple(input_ids.shape)}, positions "
                             f"{tuple(positions.shape)} and batch of {batch.num_tokens} tokens differ")
        self._check_positions(positions)
        m = self.model
        h = F.embedding(input_ids, m.embed_tokens.weight)
        rope = m.rotary_emb.tables(positions, h.dtype)
        # Submodules' forward() called directly: nn.Module.__call__ costs microseconds per
        # call, a visible share of a tiny model's decode step on CPU.
        for layer in m.layers:
            h = h + layer.self_attn.forward(layer.input_layernorm.forward(h), rope, batch, kv)
            h = h + layer.mlp.forward(layer.post_attention_layernorm.forward(h))
        return m.norm.forward(h)

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Causal forward over full sequences [B, L] without a cache; hidden [B, L, hidden].

        Autograd-enabled (used for training)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        self._check_positions(positions)
        m = self.model
        h = m.embed_tokens(input_ids)
        rope = m.rotary_emb.tables(positions, h.dtype)
        for layer in m.layers:
            h = h + layer.self_attn.forward_dense(layer.input_layernorm(h), rope)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return m.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on the given rows only: [R, hidden] -> [R, vocab] float32."""
        with torch.inference_mode(hidden.is_inference()):
            return F.linear(hidden, self.lm_head.weight).float()
