"""Sequence-level distillation of the draft on the target's own continuations.

Greedy speculation accepts a draft token exactly when it equals the target's argmax, and the
contexts a draft sees while serving are the target's own outputs (often repetitive: a tiny
target's greedy text loops). Training on stdlib text alone never shows the draft those
contexts. This stage therefore

1. cuts `prompts` windows of `prompt_len` tokens from the training stream,
2. lets the target continue each by `new_tokens` tokens through the paged serving forward
   (batched; a `sampled_fraction` of them sampled at temperature 1, the rest greedy),
3. fine-tunes the draft on those sequences with
   `hard_weight * CE(draft, argmax target) + (1 - hard_weight) * KL(target || draft)`
   at every position (teacher logits recomputed on the fly, no storage).

Deterministic for a seed (one torch thread, seeded generators, fixed order).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_slo.engine.attention import AttentionBatch, SequenceInput
from sglang_slo.engine.kv_cache import KVCache, blocks_needed
from sglang_slo.engine.model import LlamaForCausalLM


@dataclass(slots=True)
class DistillSettings:
    """Settings of the distillation stage."""

    steps: int
    """Optimizer steps on the distilled sequences (0 = stage off)."""
    prompts: int = 512
    """Target continuations generated (prompt windows cut from the training stream)."""
    prompt_len: int = 64
    """Tokens per prompt."""
    new_tokens: int = 192
    """Tokens the target adds to each prompt (prompt_len + new_tokens <= context)."""
    sampled_fraction: float = 0.5
    """Share of continuations sampled at temperature 1 (the rest are greedy)."""
    gen_batch: int = 64
    """Prompts generated together."""
    batch_size: int = 8
    """Sequences per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW), linear warm-up then cosine decay to 10%."""
    warmup: int = 10
    """Warm-up steps."""
    hard_weight: float = 0.5
    """Weight of the cross-entropy to the target's argmax (greedy acceptance); the rest is KL."""

    def __post_init__(self):
        if self.steps < 0 or self.prompts < 1 or self.prompt_len < 1 or self.new_tokens < 1:
            raise ValueError("distillation needs steps >= 0 and prompts, prompt_len, new_tokens >= 1")
        if not 0.0 <= self.sampled_fraction <= 1.0 or not 0.0 <= self.hard_weight <= 1.0:
            raise ValueError("sampled_fraction and hard_weight must lie in [0, 1]")


@torch.inference_mode()
def generate(model: LlamaForCausalLM, prompts: list[list[int]], new_tokens: int,
             generator: torch.Generator | None = None, block_size: int = 16) -> list[list[int]]:
    """Continue every prompt by `new_tokens` tokens, batched, through the paged forward.

    Greedy without a generator; otherwise sampled at temperature 1 from `generator`.
    """
    per_seq = blocks_needed(max(map(len, prompts)) + new_tokens, block_size)
    kv = KVCache.for_model(model.config, per_seq * len(prompts), block_size,
                           dtype=next(model.parameters()).dtype)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    ctx = [0] * len(prompts)
    pending = [list(p) for p in prompts]  # tokens not yet in the cache
    outs: list[list[int]] = [[] for _ in prompts]
    for _ in range(new_tokens):
        batch = AttentionBatch.build([SequenceInput(t, c, len(p))
                                      for t, c, p in zip(tables, ctx, pending)], block_size)
        ids = torch.tensor([t for p in pending for t in p])
        logits = model.logits(model.forward(ids, batch.positions, batch, kv)[batch.last_rows])
        if generator is None:
            nxt = logits.argmax(-1).tolist()
        else:
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0].tolist()
        for i, tok in enumerate(nxt):
            ctx[i] += len(pending[i])
            pending[i] = [tok]
            outs[i].append(tok)
    return outs


def distill_sequences(target: LlamaForCausalLM, data: torch.Tensor, s: DistillSettings,
                      seed: int, log=print) -> torch.Tensor:
    """[prompts, prompt_len + new_tokens] int64: prompt windows of `data` + target continuations."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - s.prompt_len, (s.prompts,), generator=gen).tolist()
    prompts = [data[i:i + s.prompt_len].tolist() for i in starts]
    n_sampled = round(s.sampled_fraction * s.prompts)
    rows: list[list[int]] = []
    t0 = time.perf_counter()
    for lo in range(0, s.prompts, s.gen_batch):
        chunk = prompts[lo:lo + s.gen_batch]
        greedy = [p for j, p in enumerate(chunk) if lo + j >= n_sampled]
        sampled = [p for j, p in enumerate(chunk) if lo + j < n_sampled]
        if sampled:
            rows += [p + o for p, o in zip(sampled, generate(target, sampled, s.new_tokens, gen))]
        if greedy:
            rows += [p + o for p, o in zip(greedy, generate(target, greedy, s.new_tokens))]
        log(f"  distill data: {len(rows)}/{s.prompts} continuations {time.perf_counter() - t0:.0f}s")
    return torch.tensor(rows, dtype=torch.int64)


def distill(draft: LlamaForCausalLM, target: LlamaForCausalLM, seqs: torch.Tensor,
            s: DistillSettings, seed: int, log=print) -> dict:
    """Fine-tune `draft` on `seqs` [N, L] against `target` (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in draft.parameters() if p.dim() == 2]
    other = [p for p in draft.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))
    draft.train()
    target.eval()
    t0, loss_val, order = time.perf_counter(), float("nan"), torch.empty(0, dtype=torch.long)
    for step in range(s.steps):
        lr = s.lr * min(1.0, (step + 1) / s.warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / s.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        if order.numel() < s.batch_size:  # new epoch: a fresh seeded permutation
            order = torch.randperm(len(seqs), generator=gen)
        pick, order = order[:s.batch_size], order[s.batch_size:]
        x = seqs[pick, :-1]                                     # [B, L-1]
        with torch.no_grad():
            t_logp = F.log_softmax(target.logits(target.forward_dense(x)), -1)  # [B, L-1, V]
        logp = F.log_softmax(draft.logits(draft.forward_dense(x)), -1)
        hard = F.nll_loss(logp.flatten(0, 1), t_logp.argmax(-1).flatten())
        kl = F.kl_div(logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean")
        loss = s.hard_weight * hard + (1 - s.hard_weight) * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        loss_val = float(loss.detach())
        if (step + 1) % 50 == 0 or step == 0:
            log(f"  distill step {step + 1}/{s.steps} loss {loss_val:.3f} (hard {float(hard.detach()):.3f} "
                f"kl {float(kl.detach()):.3f}) lr {lr:.2e} {time.perf_counter() - t0:.0f}s")
    draft.eval()
    return {"steps": s.steps, "secs": round(time.perf_counter() - t0, 1),
            "final_loss": round(loss_val, 4)}
