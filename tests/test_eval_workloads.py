"""Workload generators: determinism, configured distributions, closed-loop structure, errors."""


from pathlib import Path

import numpy as np
import pytest

from eval.arrivals import ArrivalSpec, arrival_times
from eval.slo_classes import load_slo_classes, scale_for_unloaded_tpot
from eval.workloads import LengthDist, SingleSpec, ToolCallingSpec, WorkloadSpec, generate, load_workload_spec


def spec_of(*classes, arrival=ArrivalSpec(), sigma=0.1):
    return WorkloadSpec(name="t", rate=5.0, duration_s=200.0, arrival=arrival, acceptance_sigma=sigma,
                        classes=list(classes))


def test_deterministic_for_a_seed():
    spec = load_workload_spec("mixed")
    a, b = generate(spec, seed=7), generate(spec, seed=7)
    assert a.requests == b.requests and len(a.requests) > 50
    assert generate(spec, seed=8).requests != a.requests


@pytest.mark.parametrize("process,kw,cv", [("poisson", {}, 1.0), ("gamma", {"burstiness": 0.25}, 2.0)])
def test_renewal_rate_and_burstiness(process, kw, cv):
    t = arrival_times(ArrivalSpec(process=process, **kw), rate=20.0, duration_s=500.0, rng=np.random.default_rng(0))
    gaps = np.diff(t)
    assert len(t) / 500.0 == pytest.approx(20.0, rel=0.08)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)


def test_onoff_keeps_the_mean_rate_and_is_bursty():
    t = arrival_times(ArrivalSpec(process="onoff", on_s=5, off_s=10, on_factor=6), rate=10.0, duration_s=2000.0,
                      rng=np.random.default_rng(1))
    assert len(t) / 2000.0 == pytest.approx(10.0, rel=0.1)
    counts = np.histogram(t, bins=np.arange(0, 2001, 1.0))[0]
    assert counts.var() / counts.mean() > 2.0  # Poisson would be ~1


def test_single_class_lengths_match_configured_lognormal():
    chat = SingleSpec(slo_class="chat", prompt=LengthDist(mu=6.63, sigma=0.99),
                      output=LengthDist(mu=5.02, sigma=0.86))
    w = generate(spec_of(chat), seed=0)
    out = np.log([r.output_tokens for r in w.requests])
    inp = np.log([r.prompt_tokens for r in w.requests])
    assert len(w.requests) > 800
    assert out.mean() == pytest.approx(5.02, abs=0.08) and out.std() == pytest.approx(0.86, abs=0.08)
    assert inp.mean() == pytest.approx(6.63, abs=0.1)
    assert all(r.max_new_tokens >= r.output_tokens for r in w.requests)


def test_tool_calling_sessions():
    tool = ToolCallingSpec()
    w = generate(spec_of(tool), seed=0)
    sessions: dict[str, list] = {}
    for r in w.requests:
        sessions.setdefault(r.session_id, []).append(r)
    calls = np.array([len(v) for v in sessions.values()])
    expect = (1 - 0.65**8) / 0.35  # E[min(Geometric(0.35), 8)]
    assert calls.mean() == pytest.approx(expect, rel=0.1) and calls.max() <= 8 and calls.min() == 1
    system = {v[0].prefix_tokens for v in sessions.values()}
    assert len(system) == 1  # one shared system/tool prefix for the whole app
    delays = []
    for v in sessions.values():
        assert v[0].after_rid == "" and v[-1].slo.slo_class == "tool-final"
        assert all(c.slo.slo_class == "tool-call" for c in v[:-1])
        for prev, cur in zip(v, v[1:]):
            assert cur.after_rid == prev.rid and cur.session_id == prev.session_id
            assert cur.prefix_tokens == prev.prompt_tokens + prev.output_tokens
            assert cur.prompt_tokens > cur.prefix_tokens  # + the tool result
            delays.append(cur.delay_s)
    assert np.median(delays) == pytest.approx(0.3, rel=0.2)
    classes = load_slo_classes()
    assert classes["tool-call"].tpot_s < classes["tool-final"].tpot_s


def test_reasoning_has_two_stages_with_tight_think():
    w = generate(load_workload_spec("mixed"), seed=0, duration_s=300)
    rs = [r for r in w.requests if r.slo.slo_class == "reasoning"]
    assert len(rs) > 30
    for r in rs:
        assert len(r.stage_tokens) == 2 and sum(r.stage_tokens) == r.output_tokens
        assert r.slo.stages[0].tpot_s < r.slo.stages[1].tpot_s
        assert 1 <= r.stage_tokens[1] <= 400
    think = np.log([r.stage_tokens[0] for r in rs])
    assert np.median(think) == pytest.approx(7.3, abs=0.3)


def test_adaserve_mix_and_baseline_relative_slo():
    w = generate(load_workload_spec("adaserve"), seed=0, duration_s=300, unloaded_tpot_s=0.03)
    share = {c: sum(r.slo.slo_class == c for r in w.requests) / len(w.requests) for c in ("coding", "chat", "summarization")}
    assert share["coding"] == pytest.approx(0.6, abs=0.05) and share["chat"] == pytest.approx(0.2, abs=0.05)
    assert all(r.output_tokens == 256 == r.max_new_tokens for r in w.requests)
    tpot = {r.slo.slo_class: r.slo.tpot_s for r in w.requests}
    assert tpot == pytest.approx({"coding": 0.036, "chat": 0.05, "summarization": 0.15})


def test_acceptance_heterogeneity():
    code = SingleSpec(slo_class="coding", acceptance="eagle3_strong", acceptance_shift=0.05,
                      prompt=LengthDist(dist="fixed", value=100), output=LengthDist(dist="fixed", value=100))
    a1 = np.array([r.alphas[0] for r in generate(spec_of(code), seed=0).requests])
    assert a1.mean() == pytest.approx(0.90, abs=0.02)
    assert a1.std() == pytest.approx(0.1, abs=0.035)
    assert ((a1 > 0) & (a1 < 1)).all()
    flat = generate(spec_of(code, sigma=0.0), seed=0).requests
    assert all(r.alphas[0] == pytest.approx(0.90) for r in flat)


def test_small_context_scales_lengths():
    w = generate(load_workload_spec("mixed"), seed=0, max_context_tokens=128)
    assert all(r.prompt_tokens + r.output_tokens <= 128 for r in w.requests)
    assert all(r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in w.requests)


def test_cpu_slo_scaling():
    c = scale_for_unloaded_tpot(load_slo_classes(), 0.02)
    assert c["coding"].tpot_s == pytest.approx(1.2 * 0.02)
    assert c["reasoning"].stages[1].tpot_s / c["reasoning"].stages[0].tpot_s == pytest.approx(0.1 / 0.03)
    with pytest.raises(ValueError):
        scale_for_unloaded_tpot(c, 0.0)


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_workload_spec("no-such-workload")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nclasses: [{kind: single, slo_class: chat, prompt: {dist: weird}, output: {}}]\n")
    with pytest.raises(ValueError, match="bad workload file"):
        load_workload_spec(str(bad))
    with pytest.raises(ValueError, match="acceptance regime"):
        SingleSpec(slo_class="chat", acceptance="nope", prompt=LengthDist(), output=LengthDist())
    unknown_class = spec_of(SingleSpec(slo_class="nope", prompt=LengthDist(), output=LengthDist()))
    with pytest.raises(ValueError, match="SLO class 'nope'"):
        generate(unknown_class)
    with pytest.raises(ValueError, match="max_context_tokens"):
        generate(spec_of(ToolCallingSpec()), max_context_tokens=4)


def test_workload_json_round_trip_and_bad_file(tmp_path):
    from eval.workloads import load_workload, save_workload

    w = generate(load_workload_spec("mixed"), seed=2, duration_s=10)
    save_workload(w, tmp_path / "w.json")
    assert load_workload(tmp_path / "w.json") == w
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read workload"):
        load_workload(tmp_path / "bad.json")


def test_make_workload_scales_slos_for_slow_engines():
    from eval.compare import make_workload, unloaded_tpot_s
    from sidecar.cost_model import load_profile

    hw = str(Path(__file__).resolve().parent.parent / "configs/hardware/h100-llama3.1-8b-eagle3.yaml")
    base = unloaded_tpot_s(load_profile(hw))
    w = make_workload("mixed", hw, duration_s=20, scale_slos=True)
    coding = [r for r in w.requests if r.slo.slo_class == "coding"]
    assert coding and all(r.slo.tpot_s == pytest.approx(1.2 * base) for r in coding)
