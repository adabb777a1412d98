"""Wire protocol: byte-pinned round trips (reordering or retyping a field breaks these) and
bad frames -> ProtocolError (never another exception)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from protos import messages as m

D = m.Decision

PINNED: list[tuple[m.Message, str]] = [
    (
        m.EngineHello(1, "sim", [m.SpecMode.CHAIN, m.SpecMode.TREE], 8192, 450000, 8, 4, [2, 4], 16, "abc", 1.5),
        "9da568656c6c6f01a373696d920102cd2000ce0006ddd0080492020410a3616263cb3ff8000000000000c3",
    ),
    (m.PlannerWelcome(1, False, "fcfs", "nope"), "96a777656c636f6d6501c2a466636673a46e6f7065a0"),
    (
        m.RequestArrived(
            "r1", 100, 50, m.Slo(0.5, 0.03, [m.Stage(0.03, 10), m.Stage(0.1)], "reasoning", 2), 1.25, "s", 16
        ),
        "98a761727269766564a27231643296cb3fe0000000000000cb3f9eb851eb851eb89293cb3f9eb851eb851eb80acb0000000000"
        "00000093cb3fb999999999999a00cb0000000000000000a9726561736f6e696e6702c2cb3ff4000000000000a17310",
    ),
    (
        m.IterationReport(
            7, 1.0, 1.5, 6, 128, 10, 3, 2000, 1000, [m.RequestProgress("r1", 100, 5, 0, 3, 2, 3, 0.5, 1, 1.2)], 4, 0.4
        ),
        "9da67265706f727407cb3ff0000000000000cb3ff800000000000006cc800a03cd07d0cd03e8919aa27231640500030203cb3f"
        "e000000000000001cb3ff333333333333304cb3fd999999999999a",
    ),
    (m.RequestFinished("r1", m.FinishReason.LENGTH, 50, 2.0), "96a866696e6973686564a272310132cb4000000000000000a0"),
    (
        m.Resync(
            3.0, 9, [m.RequestSnapshot(m.RequestArrived("r2", 10, 5, m.Slo(1.0, 0.1), 0.5), 10, 2, 0.75, 0, D.ADMIT)], 777
        ),
        "95a6726573796e63cb400800000000000009919698a761727269766564a272320a0596cb3ff0000000000000cb3fb99999999999"
        "9a90a000c2cb3fe0000000000000a0000a02cb3fe80000000000000000cd0309",
    ),
    (
        m.Plan(
            9, 2.5, 512, [m.PrefillChunk("r1", 64)], [m.DecodeEntry("r2", 1.5, 6, 4, 2)],
            [m.AdmissionDecision("r3", D.REJECT)], 4, 0.001, 7,
        ),
        "9ba4706c616e09cb4004000000000000cd02009192a27231409195a27232cb3ff80000000000000604029192a272330204cb3f50"
        "624dd2f1a9fc0700",
    ),
]


# Encodings from before a field was appended: they still decode, the new field at its default.
BEFORE_APPEND: list[tuple[str, m.Message]] = [
    ("9ca568656c6c6f01a373696d920102cd2000ce0006ddd0080492020410a3616263cb3ff8000000000000", PINNED[0][0]),
    ("9aa4706c616e09cb4004000000000000cd02009192a27231409195a27232cb3ff80000000000000604029192a272330204cb3f50"
     "624dd2f1a9fc07", PINNED[-1][0]),
]


@pytest.mark.parametrize("hexbytes,msg", BEFORE_APPEND, ids=["EngineHello", "Plan"])
def test_encodings_from_before_an_appended_field_still_decode(hexbytes, msg):
    back = m.decode(bytes.fromhex(hexbytes))
    assert back == msg
    assert getattr(back, "mixed_forward", True) is True and getattr(back, "arrival_tokens", 0) == 0


def test_appended_fields_round_trip_non_default():
    hello = m.EngineHello(1, "sglang", [m.SpecMode.NONE], 4096, 16384, mixed_forward=False)
    assert m.decode(m.encode(hello)).mixed_forward is False
    plan = m.Plan(3, 1.0, 64, arrival_tokens=48)
    assert m.decode(m.encode(plan)).arrival_tokens == 48


@pytest.mark.parametrize("msg,hexbytes", PINNED, ids=[type(p[0]).__name__ for p in PINNED])
def test_pinned_bytes_round_trip(msg, hexbytes):
    assert m.encode(msg).hex() == hexbytes
    back = m.decode(bytes.fromhex(hexbytes))
    assert type(back) is type(msg)
    assert back == msg


def test_every_message_type_is_pinned():
    pinned = {type(msg) for msg, _ in PINNED}
    assert pinned == set(m.Message.__args__)


def test_frame_without_trailing_optional_fields_decodes_with_defaults():
    # Append-only evolution: a peer that predates the optional fields sends only the required ones.
    old = msgspec.msgpack.encode(["plan", 1, 0.5, 64])
    plan = m.decode(old)
    assert plan == m.Plan(1, 0.5, 64)
    assert plan.spec_depth == -1 and plan.based_on_step == -1 and plan.decode == []


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00",
        b"garbage frame",
        bytes.fromhex("92a4706c616e"),  # plan missing required fields
        bytes.fromhex("94a3626164010203"),  # unknown tag
        msgspec.msgpack.encode(["plan", "not-an-int", 0.5, 64]),  # wrong type
        msgspec.msgpack.encode({"t": "plan"}),  # map instead of array
        bytes.fromhex(PINNED[3][1])[:-5],  # truncated report
    ],
)
def test_bad_frames_raise_protocol_error(frame):
    with pytest.raises(m.ProtocolError):
        m.decode(frame)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_protocol_error(frame):
    try:
        m.decode(frame)
    except m.ProtocolError:
        pass


def test_invalid_utf8_in_a_string_field_is_a_protocol_error():
    # Found by hypothesis: a one-field array whose str field holds byte 0x80.
    with pytest.raises(m.ProtocolError, match="undecodable"):
        m.decode(b"\x91\xab" + b"\x00" * 10 + b"\x80")


def test_check_hello_reasons():
    ok = m.EngineHello(m.PROTOCOL_VERSION, "sim", [m.SpecMode.NONE], 64, 1000)
    assert m.check_hello(ok) == ""
    assert "protocol version" in m.check_hello(m.EngineHello(m.PROTOCOL_VERSION + 1, "sim", [], 64, 1000))
    assert "positive" in m.check_hello(m.EngineHello(m.PROTOCOL_VERSION, "sim", [], 0, 1000))
