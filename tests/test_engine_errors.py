"""Bad input gets a typed error; NaN logits abort only the poisoned request; KV never leaks."""

from __future__ import annotations

import random

import pytest
import torch

from protos import messages as protos
from sglang_slo.engine.request import InvalidRequestError, SamplingParams
from test_engine_factories import SLO, drive, make_engine, random_prompts, tiny_pair

FR = protos.FinishReason


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(seed=5)


@pytest.mark.parametrize("prompt,params,why", [
    ([], SamplingParams(), "empty prompt"),
    (list(range(10)) * 26, SamplingParams(), "context length"),
    ([1, 2, 99999], SamplingParams(), "token ids"),
    ([1, 2], SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ([1, 2], SamplingParams(temperature=-0.5), "temperature"),
    ([1, 2], SamplingParams(top_p=0.0), "top_p"),
])
def test_bad_requests_raise_typed_error_and_leave_engine_unchanged(pair, prompt, params, why):
    eng = make_engine(pair[0], pair[1])
    with pytest.raises(InvalidRequestError, match=why):
        eng.add_request("bad", prompt, params, SLO)
    assert not eng.has_work and not eng.requests
    eng.add_request("bad", [1, 2, 3], SamplingParams(max_new_tokens=2), SLO)  # id still free
    with pytest.raises(InvalidRequestError, match="already in use"):
        eng.add_request("bad", [1, 2, 3], SamplingParams(), SLO)


def test_nan_logits_abort_only_that_request(pair):
    target, draft = pair
    poison = 13
    sick = type(target)(target.config).double().eval()
    sick.load_state_dict(target.state_dict())
    with torch.no_grad():
        sick.model.embed_tokens.weight[poison] = float("nan")
    prompts = [[p for p in pr if p != poison] or [1] for pr in random_prompts(12, seed=7)]
    params = lambda i: SamplingParams(max_new_tokens=16, ignore_eos=True)  # noqa: E731
    clean = drive(make_engine(target, draft, fallback_depth=3, fallback_width=2, fallback_tree_cap=5), prompts, params)
    sick_prompts = list(prompts) + [[1, 2, poison, 4], [poison]]
    eng = make_engine(sick, draft, fallback_depth=3, fallback_width=2, fallback_tree_cap=5)
    reasons = {}
    out = drive(eng, sick_prompts, params, arrive_at=lambda i: i % 3,
                on_step=lambda e, o: reasons.update({f.rid: (f.reason, f.message) for f in o.finished}))
    assert reasons["r12"][0] == FR.ERROR and "NaN" in reasons["r12"][1]
    assert reasons["r13"][0] == FR.ERROR
    for i in range(12):  # the others finished normally with the exact healthy outputs,
        if poison not in clean[f"r{i}"]:  # unless they generated the poison token themselves
            assert out[f"r{i}"] == clean[f"r{i}"] and reasons[f"r{i}"][0] == FR.LENGTH
    eng.check_kv()
    assert eng.tables.target.allocator.num_used == eng.tables.num_reserved


def test_thousands_of_mixed_finishes_and_aborts_never_leak_kv(pair):
    """Small KV (preemptions), random aborts, stop tokens, EOS, length limits, plans and fallback."""
    target, draft = tiny_pair(seed=9, eos=(3,), layers=1)
    eng = make_engine(target, draft, kv_tokens=256, block_size=4, fallback_depth=3, fallback_width=2,
                      fallback_tree_cap=6, fallback_budget=48, max_running=24)
    rng = random.Random(11)
    n_req, finished, reasons, step = 0, 0, {}, 0
    while finished < 2000:
        for _ in range(rng.randint(0, 6) if len(eng.requests) < 48 else 0):  # bounded queue
            prompt = [rng.randrange(64) for _ in range(rng.randint(1, 40))]
            params = SamplingParams(max_new_tokens=rng.randint(1, 20), ignore_eos=rng.random() < 0.5,
                                    temperature=rng.choice([0.0, 0.0, 1.0]), top_p=rng.choice([1.0, 0.8]),
                                    stop_token_ids=(rng.randrange(64),) if rng.random() < 0.3 else (), seed=n_req)
            eng.add_request(f"q{n_req}", prompt, params, SLO)
            n_req += 1
        if eng.requests and rng.random() < 0.3:
            for rid in rng.sample(sorted(eng.requests), k=min(len(eng.requests), rng.randint(1, 3))):
                eng.abort(rid)
        if rng.random() < 0.5 and eng.requests:
            live = list(eng.requests.values())
            eng.apply_plan(protos.Plan(
                step=step, valid_until_s=eng.clock() + (1.0 if rng.random() < 0.8 else -1.0),
                token_budget=rng.randint(4, 64),
                prefill=[protos.PrefillChunk(r.rid, rng.randint(1, 32)) for r in live],
                decode=[protos.DecodeEntry(r.rid, 1 + 2 * rng.random(), rng.randint(1, 8), rng.randint(0, 4), rng.randint(1, 2))
                        for r in live],
                decisions=[protos.AdmissionDecision(r.rid, rng.choice(list(protos.Decision))) for r in rng.sample(live, 1)]
                if rng.random() < 0.1 else []))
        out = eng.step()
        for f in out.finished:
            finished += 1
            reasons[f.reason] = reasons.get(f.reason, 0) + 1
        eng.check_kv()  # after every step: held blocks == blocks of live requests
        step += 1
    for rid in list(eng.requests):
        eng.abort(rid)
    eng.step()
    eng.check_kv()
    assert eng.tables.target.allocator.num_used == eng.tables.num_reserved
    assert eng.tables.draft.allocator.num_used == eng.tables.num_reserved
    assert {FR.STOP, FR.LENGTH, FR.ABORT, FR.REJECTED} <= set(reasons), reasons
    assert eng.scheduler.num_preemptions > 0  # the small cache forced preemptions along the way
