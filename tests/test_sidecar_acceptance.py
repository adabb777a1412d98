"""Acceptance model: priors per class, chain/tree expectations, and online estimates that
converge toward the observed per-position acceptance (per request and per class)."""

from __future__ import annotations

import random

import pytest

from protos import messages as m
from sidecar.acceptance import DEFAULT_PRIORS, EAGLE3_STRONG, AcceptanceModel, chain_expected, widen


def _progress(rid: str, accepted: int, depth: int) -> m.RequestProgress:
    return m.RequestProgress(rid, 100, 10, verified=depth, accepted=accepted, depth=depth)


def _simulate(model: AcceptanceModel, rid: str, cls: str, alpha: float, depth: int, n: int, seed: int = 0) -> None:
    """Chains with i.i.d. per-position acceptance `alpha`."""
    rng = random.Random(seed)
    for _ in range(n):
        acc = 0
        while acc < depth and rng.random() < alpha:
            acc += 1
        model.observe(rid, cls, _progress(rid, acc, depth))


def test_chain_expectation_matches_closed_form():
    a, d = 0.7, 5
    assert chain_expected([a] * d, d) == pytest.approx(sum(a**k for k in range(1, d + 1)))
    # tau = 1 + E[accepted] = (1 - a^(d+1)) / (1 - a) for i.i.d. acceptance
    assert 1 + chain_expected([a], d) == pytest.approx((1 - a ** (d + 1)) / (1 - a))


def test_priors_per_class_and_default():
    model = AcceptanceModel()
    model.register("c", "coding")
    model.register("x", "no-such-class")
    assert model.alphas("c", 3) == EAGLE3_STRONG[:3]
    assert model.alphas("x", 2) == DEFAULT_PRIORS["default"][:2]
    assert model.expected_accepted("c", 4) > model.expected_accepted("x", 4)
    assert model.expected_accepted("c", 0) == 0.0
    assert len(model.alphas("c", 20)) == 20  # positions beyond the table repeat the last


def test_profile_priors_override_defaults():
    model = AcceptanceModel({"chat": [0.5, 0.4]})
    model.register("r", "chat")
    assert model.alphas("r", 3) == [0.5, 0.4, 0.4]


def test_wider_trees_accept_more_but_less_than_independent_siblings():
    model = AcceptanceModel()
    model.register("r", "chat")
    e1, e2, e4 = (model.expected_accepted("r", 5, w) for w in (1, 2, 4))
    assert e1 < e2 < e4 <= 5
    assert widen(0.6, 2) < 1 - 0.4**2


@pytest.mark.parametrize("true_alpha", [0.3, 0.55, 0.9])
def test_request_estimate_converges_to_observed_rate(true_alpha):
    model = AcceptanceModel(decay=1.0)
    model.register("r", "chat")
    _simulate(model, "r", "chat", true_alpha, depth=4, n=2000)
    for a in model.alphas("r", 3):
        assert a == pytest.approx(true_alpha, abs=0.05)
    expected = chain_expected([true_alpha], 4)
    assert model.expected_accepted("r", 4) == pytest.approx(expected, rel=0.1)


def test_few_observations_stay_near_the_prior():
    model = AcceptanceModel()
    model.register("r", "coding")
    model.observe("r", "coding", _progress("r", 0, 4))  # one bad iteration
    a1 = model.alphas("r", 1)[0]
    assert EAGLE3_STRONG[0] - 0.15 < a1 < EAGLE3_STRONG[0]


def test_class_estimate_moves_new_requests_prior():
    model = AcceptanceModel(class_strength=16.0)
    for i in range(40):
        rid = f"old{i}"
        model.register(rid, "chat")
        _simulate(model, rid, "chat", 0.3, depth=4, n=20, seed=i)
        model.forget(rid)
    model.register("new", "chat")
    assert model.alphas("new", 1)[0] < 0.45  # prior was 0.80
    model.register("other", "coding")
    assert model.alphas("other", 1)[0] == EAGLE3_STRONG[0]  # other classes untouched


def test_decay_tracks_a_drop_in_acceptance():
    model = AcceptanceModel(decay=0.95)
    model.register("r", "chat")
    _simulate(model, "r", "chat", 0.9, depth=4, n=300, seed=1)
    _simulate(model, "r", "chat", 0.2, depth=4, n=150, seed=2)
    assert model.alphas("r", 1)[0] < 0.4


def test_non_speculative_progress_is_ignored_and_forget_resets():
    model = AcceptanceModel()
    model.register("r", "chat")
    before = model.alphas("r", 3)
    model.observe("r", "chat", _progress("r", 0, 0))
    assert model.alphas("r", 3) == before
    _simulate(model, "r", "chat", 0.1, depth=4, n=200)
    learned = model.alphas("r", 1)[0]
    class_now = model.class_alphas("chat")[0]
    assert learned < class_now - 0.05  # the request's own evidence dominates its estimate
    model.forget("r")
    model.register("r", "chat")
    assert model.alphas("r", 1)[0] == pytest.approx(class_now)  # back to the class estimate


def test_tree_observations_map_back_to_chain_alphas():
    chain_alpha, width, depth = 0.6, 3, 4
    level = widen(chain_alpha, width)  # per-level acceptance of a width-3 tree
    model = AcceptanceModel(decay=1.0, class_strength=1e9)
    model.register("r", "chat")
    rng = random.Random(5)
    for _ in range(3000):
        acc = 0
        while acc < depth and rng.random() < level:
            acc += 1
        model.observe("r", "chat", m.RequestProgress("r", 1, 1, verified=width * depth, accepted=acc, depth=depth))
    assert model.alphas("r", 1)[0] == pytest.approx(chain_alpha, abs=0.04)
    assert model.expected_accepted("r", depth, width) == pytest.approx(chain_expected([level], depth), rel=0.08)
    assert model.expected_accepted("r", depth, 1) < model.expected_accepted("r", depth, width)


def test_observation_that_triggers_renormalisation_still_counts():
    """An add() that renormalises the decayed counts (unit past 1e100) records its own outcome
    like any other: same estimate as renormalising first and adding after."""
    from sidecar.acceptance import _Counts

    rng = random.Random(5)
    history = [(rng.randrange(4), 3) for _ in range(40)]
    a, b = _Counts(), _Counts()
    for acc, depth in history:
        a.add(acc, depth, 0.9)
        b.add(acc, depth, 0.9)
    a.unit = b.unit = 1e100 * 0.95  # the next add crosses the threshold
    b.unit /= 0.9
    b.rescale()
    b.unit *= 0.9  # b: already renormalised; its add divides by decay again
    a.add(3, 3, 0.9)
    b.add(3, 3, 0.9)
    assert a.unit == 1.0 and b.unit < 1e100
    ra = [x / t for x, t in zip(a.acc[:3], a.trials[:3])]
    rb = [x / t for x, t in zip(b.acc[:3], b.trials[:3])]
    assert ra == pytest.approx(rb, rel=1e-9)
    assert a.wexp == pytest.approx(b.wexp)
