"""Cost model: least squares recovers known coefficients; the inverse is consistent; online
refit tracks a changed machine; hardware profiles load and are sane; bad YAML is refused."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from protos import messages as m
from sidecar.cost_model import CostModel, EngineLimits, load_profile, profile_from_dict, report_features

TRUE = CostModel(
    base_s=0.006, k_tok_s=3e-6, k_knee_s=2e-5, knee_tokens=256, k_ctx_s=4e-8, k_pf2_s=4.5e-10,
    d_step_s=2e-4, k_dtok_s=7e-7, k_ver_s=2e-6,
)
# max_tokens_within ignores the prefill^2 term (documented): compare inverses against this.
NOPF2 = CostModel(**{**TRUE.coefficients(), "k_pf2_s": 0.0})
HW = Path(__file__).resolve().parent.parent / "configs" / "hardware"


def _samples(model: CostModel, n: int, noise: float, seed: int = 0) -> list[tuple]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = rng.randint(0, 4096) if rng.random() < 0.5 else 0
        v = rng.randint(1, 512)
        s = rng.randint(0, 8)
        c = rng.randint(0, 200_000)
        d = v * s
        rows.append((p, v, s, c, d, model.iteration_time(p, v, s, c, d) * (1 + noise * rng.gauss(0, 1))))
    return rows


def test_fit_recovers_known_coefficients():
    fitted = CostModel.fit(_samples(TRUE, 400, noise=0.01))
    for name, true in TRUE.coefficients().items():
        got = fitted.coefficients()[name]
        assert got == pytest.approx(true, rel=0.15, abs=1e-9), name
    # Predictions agree within noise over the sampled range.
    for row in _samples(TRUE, 50, noise=0.0, seed=1):
        assert fitted.iteration_time(*row[:5]) == pytest.approx(row[5], rel=0.03)


def test_fit_with_fixed_terms_fits_the_rest():
    rows = [(0, v, 0, 0, 0, TRUE.iteration_time(0, v, 0, 0)) for v in (1, 32, 64, 128, 256, 512, 1024, 2048, 4096)]
    fitted = CostModel.fit(rows, fixed={"k_ctx_s": 1e-7, "d_step_s": 1e-3})
    assert fitted.k_ctx_s == 1e-7 and fitted.d_step_s == 1e-3
    assert fitted.knee_tokens == 256
    assert fitted.iteration_time(0, 3000, 0, 0) == pytest.approx(TRUE.iteration_time(0, 3000, 0, 0), rel=1e-6)


def test_fit_keeps_coefficients_non_negative():
    rng = random.Random(3)
    rows = [(0, v, 0, rng.randint(0, 1000), 0, 0.01 + 1e-5 * v) for v in range(1, 200, 7)]
    fitted = CostModel.fit(rows)
    assert all(v >= 0 for v in fitted.coefficients().values())


@pytest.mark.parametrize("rows", [[], [(1, 2, 3)], [(0, 1, 0, 0, 0, -1.0), (0, 2, 0, 0, 0, 1.0)]])
def test_fit_rejects_bad_samples(rows):
    with pytest.raises(ValueError):
        CostModel.fit(rows)


@pytest.mark.parametrize("seconds", [0.0, 0.005, 0.0062, 0.0069, 0.02, 0.1, 1.0])
def test_max_tokens_within_is_the_inverse(seconds):
    n = TRUE.max_tokens_within(seconds, draft_steps=2, context_tokens=10_000, draft_tokens=100)
    if n == 0:
        assert NOPF2.iteration_time(1, 0, 2, 10_000, 100) > seconds
        return
    assert NOPF2.iteration_time(n, 0, 2, 10_000, 100) <= seconds + 1e-9
    assert NOPF2.iteration_time(n + 1, 0, 2, 10_000, 100) > seconds


def _report(step, t0, n, ctx, seconds):
    return m.IterationReport(step, t0, t0 + seconds, step, 0, n, 0, ctx, 1000)


def test_online_scale_tracks_a_slower_machine():
    model = CostModel(**{k: v for k, v in TRUE.coefficients().items()}, refit_every=0)
    rng = random.Random(0)
    for i in range(300):
        n = rng.randint(1, 2000)
        model.observe(_report(i, float(i), n, 5000, 1.5 * TRUE.iteration_time(0, n, 0, 5000)))
    assert model.scale == pytest.approx(1.5, rel=0.03)
    assert model.iteration_time(0, 700, 0, 5000) == pytest.approx(1.5 * TRUE.iteration_time(0, 700, 0, 5000), rel=0.03)


def test_online_scale_converges_even_when_the_profile_is_far_off():
    model = CostModel(**TRUE.coefficients(), refit_every=0)
    for i in range(400):
        model.observe(_report(i, float(i), 64, 0, 10.0 * TRUE.iteration_time(0, 64, 0, 0)))
    assert model.scale == pytest.approx(10.0, rel=0.02)


def test_online_scale_is_robust_to_a_stall():
    model = CostModel(**TRUE.coefficients(), refit_every=0)
    model.observe(_report(0, 0.0, 100, 0, 50.0))  # a 50 s hiccup
    assert model.scale < 1.2


def test_windowed_refit_learns_a_different_shape():
    other = CostModel(base_s=0.02, k_tok_s=1e-5, k_knee_s=5e-5, knee_tokens=512, k_ctx_s=1e-7)
    model = CostModel(**TRUE.coefficients(), refit_every=64, window=256)
    rng = random.Random(1)
    for i in range(256):
        n = rng.randint(1, 3000)
        ctx = rng.randint(0, 100_000)
        model.observe(_report(i, float(i), n, ctx, other.iteration_time(0, n, 0, ctx)))
    for n in (10, 600, 2500):
        assert model.iteration_time(0, n, 0, 50_000) == pytest.approx(other.iteration_time(0, n, 0, 50_000), rel=0.05)


@pytest.mark.parametrize("name", ["h100-llama3.1-8b-eagle3", "a100-llama3.1-70b-1b-draft"])
def test_gpu_profiles_load_and_match_their_sources(name):
    prof = load_profile(HW / f"{name}.yaml")
    assert prof.name == name and "reference" in prof.source
    c = prof.cost
    # Monotone in every input; decode of one token takes milliseconds, not seconds.
    assert 0.002 < c.iteration_time(0, 1, 0, 0) < 0.05
    assert c.iteration_time(0, 512, 0, 0) < c.iteration_time(0, 1024, 0, 0) < c.iteration_time(0, 4096, 0, 0)
    assert c.iteration_time(0, 64, 0, 100_000) > c.iteration_time(0, 64, 0, 0)
    assert c.iteration_time(0, 64, 4, 0, 256) > c.iteration_time(0, 64, 0, 0)
    assert 400_000 <= prof.engine.kv_capacity_tokens <= 600_000
    assert set(prof.acceptance_priors) >= {"default", "coding", "chat", "reasoning"}


def test_h100_profile_reproduces_the_vidur_table_within_10_percent():
    c = load_profile(HW / "h100-llama3.1-8b-eagle3.yaml").cost
    # Vidur H100 7B GEMM medians x 1.19 + 1 ms (the profile's own derivation).
    for n, ms in [(1, 5.6), (128, 6.4), (512, 12.1), (1024, 21.3), (2048, 40.8), (4096, 84.5)]:
        assert c.iteration_time(0, n, 0, 0) * 1e3 == pytest.approx(ms * 1.19 + 1.0, rel=0.10), n


def test_a100_profile_reproduces_adaserve_table_within_15_percent():
    c = load_profile(HW / "a100-llama3.1-70b-1b-draft.yaml").cost
    for n, ms in [(128, 55), (256, 85), (512, 125), (768, 165), (1024, 205)]:
        assert c.iteration_time(0, n, 0, 0) * 1e3 == pytest.approx(ms, rel=0.15), n
    assert c.d_step_s == pytest.approx(0.005)


GOOD = {
    "name": "x", "source": "test", "engine": {"kv_capacity_tokens": 1000, "max_batch_tokens": 64, "max_depth": 4, "max_width": 1},
    "cost": {"base_s": 0.01, "k_tok_s": 1e-4},
}


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"bogus": 1}, "unknown keys"),
        ({"cost": {"base_s": 0.01, "nope": 1}}, "unknown cost keys"),
        ({"cost": None}, "needs 'cost'"),
        ({"engine": {"kv_capacity_tokens": 0, "max_batch_tokens": 64, "max_depth": 0, "max_width": 1}}, "positive"),
        ({"acceptance": {"chat": [1.5]}}, "alphas"),
        ({"samples": [[1, 2, 3]]}, "6 columns"),
    ],
)
def test_bad_profiles_are_refused_with_a_reason(patch, needle):
    with pytest.raises(ValueError, match=needle):
        profile_from_dict({**GOOD, **patch})


def test_load_profile_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_profile(bad)


def test_engine_limits_from_hello():
    lim = EngineLimits.from_hello(m.EngineHello(1, "sim", [m.SpecMode.CHAIN], 512, 9000, 6, 2, [4, 2], 32))
    assert lim == EngineLimits(9000, 512, 6, 2, (2, 4), 32)


def test_deferred_refit_waits_for_refit_if_due():
    other = CostModel(base_s=0.02, k_tok_s=1e-5, k_knee_s=5e-5, knee_tokens=512, k_ctx_s=1e-7)
    model = CostModel(**TRUE.coefficients(), refit_every=64, window=128)
    rng = random.Random(2)
    for i in range(64):
        n = rng.randint(1, 3000)
        model.observe(_report(i, float(i), n, 1000, other.iteration_time(0, n, 0, 1000)), defer_refit=True)
    assert model.base_s == TRUE.base_s  # nothing refit yet (the scale moved, the shape did not)
    assert model.refit_if_due() and model.base_s != TRUE.base_s
    assert not model.refit_if_due()  # not due again until 64 more observations


def test_sliced_refit_lands_the_same_fit_over_several_steps():
    other = CostModel(base_s=0.02, k_tok_s=1e-5, k_knee_s=5e-5, knee_tokens=512, k_ctx_s=1e-7)
    whole, sliced = (CostModel(**TRUE.coefficients(), refit_every=64, window=128) for _ in range(2))
    rng = random.Random(3)
    for i in range(64):
        n = rng.randint(1, 3000)
        rep = _report(i, float(i), n, 1000, other.iteration_time(0, n, 0, 1000))
        whole.observe(rep, defer_refit=True)
        sliced.observe(rep, defer_refit=True)
    assert whole.refit_if_due()
    steps = 1
    while sliced.refit_step():
        assert sliced.base_s == TRUE.base_s  # nothing lands before the last slice
        steps += 1
    assert steps > 5  # one knee per step
    assert sliced.coefficients() == whole.coefficients() and sliced.knee_tokens == whole.knee_tokens
    assert not sliced.refit_step()  # not due again until 64 more observations


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(0.0, 0.05), lo=st.floats(0.0, 1e-4), hi=st.floats(0.0, 1e-3), knee=st.integers(0, 4096),
    ctx=st.floats(0.0, 1e-7), seconds=st.floats(0.0, 2.0), steps=st.integers(0, 8), context=st.integers(0, 10**6),
)
def test_max_tokens_within_inverts_any_model(base, lo, hi, knee, ctx, seconds, steps, context):
    model = CostModel(base_s=base, k_tok_s=lo, k_knee_s=hi, knee_tokens=knee, k_ctx_s=ctx, d_step_s=1e-4)
    n = model.max_tokens_within(seconds, draft_steps=steps, context_tokens=context)
    assert n >= 0
    if n == 0:
        assert model.iteration_time(0, 1, steps, context) > seconds - 1e-12 or lo + hi == 0
    elif n < 1 << 30:
        assert model.iteration_time(0, n, steps, context) <= seconds * (1 + 1e-9) + 1e-12
        assert model.iteration_time(0, n + 1, steps, context) > seconds * (1 - 1e-9) - 1e-12


def test_verify_premium_is_fit_only_when_identifiable_and_inverted():
    # Verify-only samples cannot separate a verify premium from the per-token slope: pinned to 0.
    rows = [(0, v, 0, 0, 0, TRUE.iteration_time(0, v, 0, 0)) for v in (1, 64, 256, 1024, 4096)]
    assert CostModel.fit(rows).k_ver_s == 0.0
    # With a verify budget already decided, the rest is priced as prefill tokens.
    n = TRUE.max_tokens_within(0.02, verify_tokens=300)
    assert NOPF2.iteration_time(n - 300, 300, 0, 0) <= 0.02 + 1e-12 < NOPF2.iteration_time(n - 299, 300, 0, 0)
    assert n < TRUE.max_tokens_within(0.02)  # verify tokens cost more than prefill tokens here


PER_REQ = CostModel(**{**TRUE.coefficients(), "k_req_s": 6e-5, "k_spec_s": 1.5e-4, "k_tree_s": 4e-5})


def _request_rows(model: CostModel, n: int, seed: int = 0) -> list[tuple]:
    """9-column rows: (prefill, verify, steps, context, draft_tokens, seconds, requests,
    spec_requests, tree_tokens) of random batches of prefill chunks, decodes, chains, trees."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chunks, decodes = rng.randint(0, 3), rng.randint(1, 40)
        spec = rng.randint(0, decodes)
        steps = rng.randint(1, 6) if spec else 0
        tree = rng.randint(0, spec) if spec else 0
        per = [rng.randint(1, steps) if i < spec - tree else rng.randint(steps + 1, 3 * steps)
               for i in range(spec)]  # chain: <= depth nodes, tree: more
        p = sum(rng.randint(8, 512) for _ in range(chunks))
        d, tt = sum(per), sum(per[spec - tree:])
        v, c = decodes + d, rng.randint(0, 20_000)
        req = chunks + decodes
        rows.append((p, v, steps, c, d, model.iteration_time(p, v, steps, c, d, req, spec, tt), req, spec, tt))
    return rows


def test_fit_recovers_per_request_terms_from_request_counts():
    rows = _request_rows(PER_REQ, 400)
    fitted = CostModel.fit(rows, knee_grid=[PER_REQ.knee_tokens])
    for name in ("k_req_s", "k_spec_s", "k_tree_s", "base_s", "d_step_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(PER_REQ, name), rel=0.05), name
    for r in _request_rows(PER_REQ, 50, seed=1):
        assert fitted.iteration_time(*r[:5], *r[6:]) == pytest.approx(r[5], rel=1e-3)


def test_six_column_rows_keep_the_classic_model():
    fitted = CostModel.fit(_samples(TRUE, 200, noise=0.0))
    assert fitted.k_req_s == fitted.k_spec_s == fitted.k_tree_s == 0.0


def test_request_counts_default_to_token_estimates():
    # 3 decodes, all speculating (3 + 3 + 2 draft tokens), plus one prefill chunk.
    explicit = PER_REQ.iteration_time(100, 11, 4, 500, 8, 4, 3)
    assert PER_REQ.iteration_time(100, 11, 4, 500, 8) == pytest.approx(explicit)
    assert PER_REQ.iteration_time(100, 11, 4, 500, 8, tree_tokens=8) == pytest.approx(explicit + 8 * 4e-5)


def test_report_features_reads_requests_off_the_report():
    prog = [m.RequestProgress("p", 10, 0, prefill_tokens=10),
            m.RequestProgress("c", 0, 5, verified=3, accepted=1, depth=3),   # chain
            m.RequestProgress("t", 0, 5, verified=6, accepted=2, depth=3),   # tree (wider)
            m.RequestProgress("d", 0, 5)]                                    # plain decode
    rep = m.IterationReport(1, 0.0, 0.01, 1, 10, 12, 3, 900, 1000, progress=prog)
    assert report_features(rep) == (10, 12, 3, 900, 9, 4, 2, 6)
    model = CostModel(**PER_REQ.coefficients(), refit_every=0)
    model.observe(rep)  # scale moves toward measured / predicted with the same features
    ratio = 0.01 / PER_REQ.iteration_time(10, 12, 3, 900, 9, 4, 2, 6)
    assert model.scale == pytest.approx(0.95 + 0.05 * min(4.0, max(0.25, ratio)))


def test_online_refit_adds_request_terms_only_to_models_that_have_them():
    rows = _request_rows(PER_REQ, 200, seed=3)
    for start, expect_terms in ((TRUE, False), (PER_REQ, True)):
        model = CostModel(**start.coefficients(), refit_every=64, window=256)
        for r in rows:
            model.observe_features((*r[:5], *r[6:]), r[5] * 1.3)  # a slower machine
        assert (model.k_req_s > 0) == expect_terms
