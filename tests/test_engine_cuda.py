"""The embedded engine on CUDA with the committed tiny pair (sglang_slo/assets/tiny): greedy
speculative output equals greedy plain output token for token (chains and trees, batched,
prefill chunks sharing forwards with verifies), equals the CPU engine's output in float32,
every KV block is freed at the end, and sampling at temperature > 0 runs and terminates.
GPU tests are marked `gpu` and skip without CUDA (`scripts/gpu_check.sh` runs them)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from protos import messages as protos
from sglang_slo.engine.bench import bench_prompts
from sglang_slo.engine.engine import Engine, EngineConfig
from sglang_slo.engine.loader import load_model
from sglang_slo.engine.request import SamplingParams
from sglang_slo.engine.scheduler import SchedulerConfig
from test_engine_factories import drive

TINY = Path(__file__).resolve().parents[1] / "sglang_slo" / "assets" / "tiny"
N_NEW = 40


def load_pair(device: str, dtype: torch.dtype = torch.float32):
    return (load_model(TINY / "target", dtype=dtype, device=device),
            load_model(TINY / "draft", dtype=dtype, device=device))


def make_engine(target, draft, device: str, dtype: str = "float32", depth: int = 0, width: int = 1) -> Engine:
    """Block size 16 and a 4096-token cache; with `depth`, the local fallback speculates
    (used when a test sends no plans)."""
    sched = SchedulerConfig(max_batch_tokens=1024, max_running=64, max_depth=8, max_width=4,
                            fallback_budget=1024, fallback_depth=depth, fallback_width=width,
                            fallback_tree_cap=1 + depth * width)
    return Engine(target, draft, EngineConfig(kv_capacity_tokens=4096, block_size=16, scheduler=sched,
                                              device=device, dtype=dtype))


def prompts(n: int = 12, seed: int = 0) -> list[list[int]]:
    """Windows of tokenized stdlib sources of unequal lengths (real text: drafts get accepted)."""
    rng = random.Random(seed)
    return [p[: rng.randint(6, 64)] for p in bench_prompts(n, 64, 2048, str(TINY), seed=seed)]


def random_planner(seed: int, depth: int, width: int):
    """A plan per step: random per-request depth/width/tree cap, random prefill chunks and
    budgets, so prefill chunks, plain decodes, chains and trees share forwards."""
    rng = random.Random(seed)

    def plan_for(engine: Engine, step: int) -> protos.Plan:
        live = list(engine.requests.values())
        decode = []
        for r in live:
            d = rng.randint(0, depth)
            w = 1 if width == 1 or rng.random() < 0.3 else rng.randint(2, width)
            decode.append(protos.DecodeEntry(r.rid, min_tokens=1 + 3 * rng.random(),
                                             tree_cap=rng.randint(1, 1 + d * w), depth=d, width=w))
        prefill = [protos.PrefillChunk(r.rid, rng.randint(4, 48)) for r in live if r.is_prefilling or not r.output_ids]
        return protos.Plan(step=step, valid_until_s=float("inf"), token_budget=rng.randint(32, 512),
                           prefill=prefill, decode=decode)

    return plan_for


def greedy(i: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=N_NEW, ignore_eos=True)


def run_greedy(device: str, dtype: torch.dtype = torch.float32, mode: str = "plain",
               batch: list[list[int]] | None = None, pair=None) -> tuple[dict[str, list[int]], dict]:
    """Greedy outputs of `batch` (all at once) in `mode`: plain, chain (fallback chains of
    depth 6), planned-chain or planned-tree (random plans). Checks every KV block came back.
    Returns (outputs by rid, stats: verifies and accepted draft tokens)."""
    target, draft = pair or load_pair(device, dtype)
    name = str(dtype).removeprefix("torch.")
    depth = {"plain": 0, "chain": 6}.get(mode, 0)
    eng = make_engine(target, None if mode == "plain" else draft, device, name, depth=depth)
    plan_for = {"planned-chain": random_planner(1, 6, 1), "planned-tree": random_planner(2, 5, 3)}.get(mode)
    stats = {"verifies": 0, "accepted": 0}

    def on_step(engine, out):
        for p in out.report.progress:
            stats["verifies"] += bool(p.verified)
            stats["accepted"] += p.accepted

    out = drive(eng, batch if batch is not None else prompts(), greedy, plan_for=plan_for, on_step=on_step)
    assert not eng.requests
    eng.check_kv()  # no leak: only the reserved null block is held
    assert eng.tables.free_tokens == eng.tables.capacity_tokens
    assert eng.tables.target.allocator.num_used == eng.tables.num_reserved
    return out, stats


@pytest.fixture(scope="module")
def cuda_pair():
    return load_pair("cuda")


@pytest.fixture(scope="module")
def cuda_plain(cuda_pair):
    return run_greedy("cuda", pair=cuda_pair)[0]


@pytest.mark.parametrize("mode", ["chain", "planned-chain", "planned-tree"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_speculative_equals_plain_on_cuda(cuda_pair, cuda_plain, mode):
    out, stats = run_greedy("cuda", mode=mode, pair=cuda_pair)
    assert stats["accepted"] > 0 and stats["verifies"] > 0  # speculation ran and was accepted
    assert set(out) == set(cuda_plain)
    for rid in cuda_plain:
        assert len(out[rid]) == N_NEW
        assert out[rid] == cuda_plain[rid], f"{mode}: {rid} diverges from plain decoding"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_greedy_equals_cpu_greedy_float32(cuda_plain):
    cpu, _ = run_greedy("cpu")
    assert cpu == cuda_plain


@pytest.mark.parametrize("mode", ["plain", "chain", "planned-tree"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_runs_and_terminates_on_cuda(cuda_pair, mode):
    target, draft = cuda_pair
    batch = prompts(8, seed=3)

    def sampled(i: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=N_NEW, temperature=0.8, top_p=0.95 if i % 2 else 1.0,
                              seed=None if i == 0 else i, ignore_eos=i % 3 != 0)

    def once() -> dict[str, list[int]]:
        eng = make_engine(target, None if mode == "plain" else draft, "cuda", depth=4 if mode == "chain" else 0)
        plan_for = random_planner(5, 4, 3) if mode == "planned-tree" else None
        out = drive(eng, batch, sampled, plan_for=plan_for)
        eng.check_kv()
        assert eng.tables.free_tokens == eng.tables.capacity_tokens
        return out

    out = once()
    assert set(out) == {f"r{i}" for i in range(len(batch))}
    for i in range(len(batch)):
        toks = out[f"r{i}"]
        assert 1 <= len(toks) <= N_NEW and all(0 <= t < 2048 for t in toks)
        if sampled(i).ignore_eos:
            assert len(toks) == N_NEW
    assert len({tuple(v) for v in out.values()}) > 1
    if mode == "plain":  # seeded requests draw the same tokens again (same batch, same device)
        again = once()
        for i in range(1, len(batch)):
            assert again[f"r{i}"] == out[f"r{i}"]


def test_engine_refuses_models_on_another_device():
    target, draft = load_pair("cpu")
    with pytest.raises(ValueError, match="device"):
        make_engine(target, draft, "cuda")
