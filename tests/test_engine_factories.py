"""Factories for engine tests: tiny random-init target/draft pairs, engines, request drivers.

Models are float64 so that batching differences (ragged groups, padding, tree vs chain)
never flip a greedy argmax: the lossless tests then compare token for token.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from protos import messages as protos
from sglang_slo.engine.config import ModelConfig
from sglang_slo.engine.engine import Engine, EngineConfig, StepOutput
from sglang_slo.engine.model import LlamaForCausalLM
from sglang_slo.engine.request import SamplingParams
from sglang_slo.engine.scheduler import SchedulerConfig

VOCAB = 64
SLO = protos.Slo(ttft_s=1.0, tpot_s=0.05)


def tiny_config(vocab: int = VOCAB, max_pos: int = 256, eos: tuple[int, ...] = (), layers: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                       eos_token_ids=eos)


def tiny_pair(seed: int = 0, noise: float = 0.05, vocab: int = VOCAB, logit_scale: float = 8.0,
              eos: tuple[int, ...] = (), layers: int = 2) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(target, draft): the draft is the target with Gaussian weight noise (partial acceptance)."""
    torch.manual_seed(seed)
    cfg = tiny_config(vocab, eos=eos, layers=layers)
    target = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(logit_scale)  # peaked distributions, like a trained model
    draft = LlamaForCausalLM(cfg).double().eval()
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * noise)
    return target, draft


def make_engine(target, draft=None, kv_tokens: int = 4096, block_size: int = 4, **sched) -> Engine:
    sched.setdefault("fallback_budget", 256)
    sched.setdefault("max_depth", 6)
    sched.setdefault("max_width", 3)
    cfg = EngineConfig(kv_capacity_tokens=kv_tokens, block_size=block_size,
                       scheduler=SchedulerConfig(**sched), dtype="float64")
    return Engine(target, draft, cfg)


def random_prompts(n: int, seed: int, max_len: int = 40, vocab: int = VOCAB) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def drive(engine: Engine, prompts: list[list[int]], params: Callable[[int], SamplingParams],
          arrive_at: Callable[[int], int] = lambda i: 0,
          plan_for: Callable[[Engine, int], protos.Plan | None] | None = None,
          on_step: Callable[[Engine, StepOutput], None] | None = None,
          max_steps: int = 10_000) -> dict[str, list[int]]:
    """Run until every request finished; request i is added at step arrive_at(i).

    plan_for(engine, step) may return a plan applied before that step. Returns outputs by rid.
    """
    outputs: dict[str, list[int]] = {}
    streamed: dict[str, list[int]] = {}
    pending = sorted(range(len(prompts)), key=arrive_at)
    step = 0
    while pending or engine.has_work:
        while pending and arrive_at(pending[0]) <= step:
            i = pending.pop(0)
            engine.add_request(f"r{i}", prompts[i], params(i), SLO)
        if plan_for is not None and (p := plan_for(engine, step)) is not None:
            engine.apply_plan(p)
        out = engine.step()
        for rid, toks in out.new_tokens.items():
            streamed.setdefault(rid, []).extend(toks)
        for f in out.finished:
            outputs[f.rid] = f.output_ids
            # What was streamed is exactly what finished (no token lost or repeated).
            assert streamed.get(f.rid, []) == f.output_ids or f.reason == protos.FinishReason.ABORT
        if on_step is not None:
            on_step(engine, out)
        step += 1
        assert step < max_steps, "engine made no progress"
    return outputs


def dense_greedy(model: LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    """Reference: plain greedy decoding with the cache-free dense forward."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            h = model.forward_dense(torch.tensor([seq]))
            seq.append(int(model.logits(h[0, -1:]).argmax()))
    return seq[len(prompt):]
