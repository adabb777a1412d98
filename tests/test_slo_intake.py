"""SLO intake (sglang_slo.slo): classes, custom_params, priority, headers -> protos.Slo."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protos.messages import Slo, decode, encode, RequestArrived
from sglang_slo.slo import FALLBACK_SLO, SloCatalog, SloError, parse_slo

CATALOG = SloCatalog.from_mapping(
    {
        "default": "chat",
        "classes": {
            "chat": {"ttft_ms": 1000, "tpot_ms": 100},
            "coding": {"ttft_ms": 500, "tpot_ms": 30, "priority": 2},
            "batch": {"ttft_s": 60, "tpot_s": 1.0, "best_effort": True, "priority": -1},
            "reasoning": {
                "ttft_ms": 1000,
                "stages": [
                    {"name": "think", "tpot_ms": 30, "end_marker": "</think>"},
                    {"name": "answer", "tpot_ms": 100},
                ],
            },
            "tool-call": {
                "stages": {"call": {"ttft_ms": 300, "tpot_ms": 30, "end_marker": ""}, "final": {"ttft_ms": 1000, "tpot_ms": 100}},
            },
        },
    }
)


def slo_of(body=None, **kw):
    return parse_slo({"slo": body} if body is not None else None, catalog=CATALOG, **kw)


def test_default_class_when_unannotated():
    r = slo_of()
    assert r.slo == Slo(ttft_s=1.0, tpot_s=0.1, slo_class="chat")
    assert parse_slo(None).slo == FALLBACK_SLO


def test_named_class_with_overrides_and_priority():
    r = slo_of({"class": "coding", "tpot_ms": 25})
    assert (r.slo.slo_class, r.slo.ttft_s, r.slo.tpot_s, r.slo.priority) == ("coding", 0.5, 0.025, 2)
    assert slo_of({"class": "coding"}, priority=7).slo.priority == 7
    assert slo_of({"class": "batch"}).slo.best_effort


def test_explicit_values_without_class_use_default_class_name():
    r = slo_of({"ttft_ms": 300, "tpot_ms": 40})
    assert (r.slo.ttft_s, r.slo.tpot_s, r.slo.slo_class) == (0.3, 0.04, "chat")


def test_headers_override_body():
    h = {"X-SLO-Class": "coding", "x-slo-tpot-ms": "20", "x-slo-ttft-ms": "250"}
    r = slo_of({"tpot_ms": 40}, headers=h)
    assert (r.slo.slo_class, r.slo.ttft_s, r.slo.tpot_s) == ("coding", 0.25, 0.02)


def test_reasoning_has_two_stages_switching_at_marker():
    r = slo_of({"class": "reasoning", "answer_tpot_ms": 200})
    assert r.slo.tpot_s == 0.03 and [s.tpot_s for s in r.slo.stages] == [0.03, 0.2]
    assert r.stage_markers == ("</think>",)


def test_tool_call_session_and_stage_selection():
    call = slo_of({"class": "tool-call", "session": "agent-1"})
    final = slo_of({"class": "tool-call", "session": "agent-1", "stage": "final"})
    assert call.session_id == final.session_id == "agent-1"
    assert (call.slo.ttft_s, call.slo.tpot_s, call.slo.stages) == (0.3, 0.03, [])
    assert (final.slo.ttft_s, final.slo.tpot_s) == (1.0, 0.1)
    assert slo_of({"class": "tool-call", "stage": "final", "final_tpot_ms": 150}).slo.tpot_s == 0.15


@pytest.mark.parametrize(
    "body,field",
    [
        ({"class": "nope"}, "custom_params.slo.class"),
        ({"ttft_ms": -5}, "custom_params.slo.ttft_ms"),
        ({"tpot_ms": float("nan")}, "custom_params.slo.tpot_ms"),
        ({"tpot_ms": float("inf")}, "custom_params.slo.tpot_ms"),
        ({"tpot_ms": 1e12}, "custom_params.slo.tpot_ms"),
        ({"ttft_ms": 0}, "custom_params.slo.ttft_ms"),
        ({"ttft_ms": "fast"}, "custom_params.slo.ttft_ms"),
        ({"tpot_ms": True}, "custom_params.slo.tpot_ms"),
        ({"ttfb_ms": 3}, "custom_params.slo.ttfb_ms"),
        ({"class": "reasoning", "think_tokens": -1}, "custom_params.slo.think_tokens"),
        ({"class": "tool-call", "stage": "middle"}, "custom_params.slo.stage"),
        ({"best_effort": "yes"}, "custom_params.slo.best_effort"),
        ({"nested": {"a": 1}}, "custom_params.slo.nested"),
    ],
)
def test_bad_values_name_the_field(body, field):
    with pytest.raises(SloError) as e:
        slo_of(body)
    assert e.value.field == field and field in str(e.value)


def test_bad_shapes_headers_and_priority():
    with pytest.raises(SloError, match="custom_params.slo"):
        parse_slo({"slo": [1, 2]})
    with pytest.raises(SloError, match="^custom_params"):
        parse_slo("slo")
    with pytest.raises(SloError, match="x-slo-tpot-ms"):
        slo_of(headers={"x-slo-tpot-ms": "nan"})
    with pytest.raises(SloError, match="x-slo-class"):
        slo_of(headers={"x-slo-class": "gold"})
    with pytest.raises(SloError) as e:
        slo_of(priority="high")
    assert e.value.field == "priority"
    with pytest.raises(SloError, match="sampling_params.custom_params.slo.ttft_ms"):
        parse_slo({"slo": {"ttft_ms": -1}}, where="sampling_params.custom_params")


def test_project_class_file_loads_and_scales():
    cat = SloCatalog.load("configs/slo_classes.yaml")
    assert {"coding", "chat", "summarization", "tool-call", "reasoning", "batch"} <= set(cat.classes)
    r = parse_slo({"slo": {"class": "reasoning"}}, catalog=cat)
    assert len(r.slo.stages) == 2 and r.stage_markers == ("</think>",)
    assert parse_slo(None, catalog=cat).slo.slo_class == "chat"
    slow = SloCatalog.load("configs/slo_classes.yaml", unloaded_tpot_s=0.01)
    assert slow.classes["coding"].tpot_s == pytest.approx(0.012)
    r = parse_slo({"slo": {"class": "reasoning", "answer_tpot_ms": 500}}, catalog=slow)
    assert r.slo.stages[1].tpot_s == 0.5


def test_catalog_validation_names_the_class():
    with pytest.raises(SloError, match="coding"):
        SloCatalog.from_mapping({"coding": {"ttft_ms": 500}})
    with pytest.raises(SloError, match="default"):
        SloCatalog.from_mapping({"default": "x", "classes": {"a": {"ttft_ms": 1, "tpot_ms": 1}}})


@given(
    ttft=st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text(max_size=3) | st.none(),
    tpot=st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.booleans(),
)
def test_any_input_gives_valid_slo_or_slo_error(ttft, tpot):
    body = {"tpot_ms": tpot} if ttft is None else {"ttft_ms": ttft, "tpot_ms": tpot}
    try:
        r = slo_of(body)
    except SloError as e:
        assert e.field.startswith("custom_params.slo.")
        return
    s = r.slo
    assert math.isfinite(s.ttft_s) and 0 < s.ttft_s <= 3600 and 0 < s.tpot_s <= 60
    # the result crosses the wire unchanged
    msg = RequestArrived(rid="r", prompt_tokens=1, max_new_tokens=1, slo=s, arrival_s=0.0)
    assert decode(encode(msg)).slo == s
