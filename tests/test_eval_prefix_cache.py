"""The simulator's prefix cache: a waiting agent call's session prefix stays evictable (LRU)
until the call is admitted; it is reused only if still resident then, else recomputed."""

import random
from pathlib import Path

import pytest
import yaml

from eval.compare import make_workload
from eval.kv_blocks import KvBlocks
from eval.metrics import Outcome
from eval.simulator import SimConfig, Simulator
from eval.workloads import GenRequest, Workload
from protos.messages import Slo

ROOT = Path(__file__).resolve().parent.parent
H100 = str(ROOT / "configs/hardware/h100-llama3.1-8b-eagle3.yaml")


def profile_with_kv(tmp_path, kv_tokens):
    doc = yaml.safe_load(Path(H100).read_text())
    doc["engine"]["kv_capacity_tokens"] = kv_tokens
    p = tmp_path / f"kv-{kv_tokens}.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


# ---- the allocator ------------------------------------------------------------------------

def test_reserved_prefix_is_not_pinned_and_is_evicted_for_others():
    lost = []
    kv = KvBlocks(100 * 16, 16, on_claim_lost=lost.append)
    assert kv.grow("a", 60 * 16)
    kv.park("a", "s", 60 * 16)
    assert kv.reserve("s", "b", 60 * 16) == 60 * 16
    assert kv.free_tokens == 100 * 16  # reserved, not pinned: still counts as free
    assert kv.can_grow("c", 80 * 16) and kv.grow("c", 80 * 16)  # needs the parked blocks
    assert lost == ["b"] and kv.claims_lost == 1 and kv.evictions == 1 and not kv.parked
    assert kv.grow("b", 10 * 16) and kv.held["b"] == 10 and kv.claims_pinned == 0
    kv.check()


def test_admission_pins_the_reserved_prefix_and_protects_it():
    lost = []
    kv = KvBlocks(100 * 16, 16, on_claim_lost=lost.append)
    for owner, key in (("a", "s"), ("x", "t")):
        assert kv.grow(owner, 40 * 16)
        kv.park(owner, key, 40 * 16)
    assert kv.reserve("s", "b", 30 * 16) == 30 * 16  # b reuses the first 30 blocks of s
    # b gets all 100: its 30 + s's other 10 + 20 free + 40 of t (evictable)
    assert kv.can_grow("b", 100 * 16) and not kv.can_grow("b", 101 * 16)
    assert not kv.grow("b", 101 * 16) and kv.claims["b"] == ("s", 30 * 16)  # nothing changed
    assert kv.grow("b", 35 * 16)
    assert kv.held["b"] == 35 and kv.claims_pinned == 1 and kv.claim_tokens_pinned == 30 * 16
    assert "s" not in kv.parked and "t" in kv.parked and lost == []
    kv.release("b")
    kv.drop_parked()
    kv.check()
    assert kv.free_blocks == kv.total_blocks


def test_random_operations_keep_the_block_invariant():
    rng = random.Random(7)
    kv = KvBlocks(200 * 16, 16)
    owners = [f"r{i}" for i in range(12)]
    for _ in range(3000):
        o, k = rng.choice(owners), f"s{rng.randrange(6)}"
        op = rng.randrange(6)
        if op == 0:
            before = (kv.free_blocks, dict(kv.held), dict(kv.parked))
            want = rng.randrange(1, 120 * 16)
            ok = kv.can_grow(o, want)
            assert kv.grow(o, want) == ok
            if not ok:
                assert (kv.free_blocks, kv.held, dict(kv.parked)) == before
        elif op == 1:
            kv.shrink(o, rng.randrange(0, 40 * 16))
        elif op == 2:
            kv.release(o)
        elif op == 3 and o not in kv.claims:
            kv.park(o, k, rng.randrange(0, 60 * 16))
        elif op == 4 and o not in kv.held:
            kv.reserve(k, o, rng.randrange(1, 60 * 16))
        kv.check()
        assert 0 <= kv.free_blocks <= kv.total_blocks
    for o in owners:
        kv.release(o)
    kv.drop_parked()
    kv.check()
    assert kv.free_blocks == kv.total_blocks and not kv.claims and not kv.claimant


# ---- the simulator ------------------------------------------------------------------------

SLO_TIGHT = Slo(ttft_s=0.5, tpot_s=0.1)
SLO_LOOSE = Slo(ttft_s=30.0, tpot_s=0.1)


def agent_and_big_prompt(big_prompt: int) -> Workload:
    """a (session s) runs first; when it finishes, `big` (queued meanwhile) is admitted and
    prefills `big_prompt` tokens in chunks while a's successor b waits (max_running=1)."""
    a = GenRequest(rid="a", arrival_s=0.0, prompt_tokens=3000, output_tokens=4, slo=SLO_TIGHT, alphas=[0.7],
                   session_id="s")
    big = GenRequest(rid="big", arrival_s=0.001, prompt_tokens=big_prompt, output_tokens=4, slo=SLO_LOOSE,
                     alphas=[0.7])
    b = GenRequest(rid="b", arrival_s=0.0, prompt_tokens=3104, output_tokens=4, slo=SLO_LOOSE, alphas=[0.7],
                   session_id="s", after_rid="a", delay_s=0.001, prefix_tokens=3004)
    return Workload(name="prefix", rate=1, duration_s=1.0, seed=0, requests=[a, big, b])


def run_watching(sim: Simulator):
    """Run; return (prefill tokens per rid, the most blocks in use at any allocation)."""
    prefilled: dict[str, int] = {}
    peak = [0]
    schedule, grow = sim.sched.schedule, sim.kv.grow

    def watched_schedule(plan, now):
        batch = schedule(plan, now)
        for p in batch.prefills:
            prefilled[p.req.rid] = prefilled.get(p.req.rid, 0) + p.num_tokens
        return batch

    def watched_grow(owner, tokens):
        ok = grow(owner, tokens)
        peak[0] = max(peak[0], sim.kv.total_blocks - sim.kv.free_blocks)
        return ok

    sim.sched.schedule, sim.kv.grow = watched_schedule, watched_grow
    res = sim.run()
    return res, prefilled, peak[0]


def test_waiting_calls_prefix_is_evicted_so_others_are_admitted_and_it_is_recomputed(tmp_path):
    # 8000 tokens of KV: a parks ~3000; big needs 6000 while b waits with a's context reserved.
    # Pinned on arrival (the old bug) big could never finish its prefill.
    hw = profile_with_kv(tmp_path, 8000)
    sim = Simulator(agent_and_big_prompt(6000), hw, None, config=SimConfig(max_running=1, check_kv=True))
    res, prefilled, peak = run_watching(sim)
    rec = {r.rid: r for r in res.records}
    assert all(r.outcome is Outcome.FINISHED for r in res.records)
    assert rec["big"].token_times[0] < rec["b"].arrival_s + 1.0  # not stuck behind b's prefix
    assert rec["b"].token_times[0] > rec["big"].token_times[-1]  # b waited (max_running=1)
    assert res.stats["prefix_evicted_while_waiting"] == 1 and res.stats["kv_evictions"] >= 1
    assert sim.reqs["b"].cached_prefix == 0
    assert prefilled["b"] == 3104  # evicted: the whole prompt is prefilled again
    assert prefilled["big"] == 6000 and peak <= sim.kv.total_blocks


def test_prefix_still_resident_when_admitted_is_reused(tmp_path):
    hw = profile_with_kv(tmp_path, 20_000)  # room for big and a's parked context
    sim = Simulator(agent_and_big_prompt(6000), hw, None, config=SimConfig(max_running=1, check_kv=True))
    res, prefilled, _ = run_watching(sim)
    assert all(r.outcome is Outcome.FINISHED for r in res.records)
    assert res.stats["prefix_evicted_while_waiting"] == 0
    reused = 3004 - 1  # a's last output token never got KV (it was the decode root)
    assert sim.reqs["b"].cached_prefix == reused
    assert res.stats["prefix_hits"] == 1 and res.stats["prefix_tokens_reused"] == reused
    assert prefilled["b"] == 3104 - reused  # only the tool result is prefilled


def test_evicted_prefix_is_reported_to_the_planner(tmp_path):
    # Same eviction under a planner: the arrival promised a cached prefix, the eviction makes
    # the engine report prefilled=0, and the call still finishes (nothing starves).
    hw = profile_with_kv(tmp_path, 8000)
    sim = Simulator(agent_and_big_prompt(6000), hw, "fcfs", config=SimConfig(max_running=1, check_kv=True))
    sent = []
    send = sim.link.send
    sim.link.send = lambda m: (sent.append(m), send(m))[1]
    res, prefilled, _ = run_watching(sim)
    assert all(r.outcome is Outcome.FINISHED for r in res.records)
    arrived_b = [m for m in sent if getattr(m, "rid", "") == "b" and hasattr(m, "cached_prefix_tokens")]
    assert arrived_b and arrived_b[0].cached_prefix_tokens == 3003
    assert res.stats["prefix_evicted_while_waiting"] == 1 and prefilled["b"] == 3104


@pytest.mark.parametrize("policy", [None, "fcfs"])
def test_mixed_load_on_short_kv_stays_within_capacity_and_frees_everything(tmp_path, policy):
    hw = profile_with_kv(tmp_path, 12_000)
    w = make_workload("mixed", H100, rate=14.0, duration_s=6.0, seed=0, max_context=4000)
    sim = Simulator(w, hw, policy, seed=0, config=SimConfig(check_kv=True))
    res, _, peak = run_watching(sim)
    assert peak <= sim.kv.total_blocks and res.stats["peak_kv_frac"] > 0.9
    # both paths run: some reserved prefixes survive to admission, others are evicted first
    assert res.stats["prefix_hits"] > 0 and res.stats["prefix_evicted_while_waiting"] > 0
    assert sim.kv.free_blocks == sim.kv.total_blocks and not sim.kv.held and not sim.kv.claims
    done = [r for r in res.records if r.outcome is Outcome.FINISHED]
    assert len(done) >= 0.9 * len(res.records)
