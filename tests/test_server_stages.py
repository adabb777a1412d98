"""Stage switching at end-of-stage markers (sglang_slo.server.bridge.new_stage_starts)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_slo.server.bridge import new_stage_starts

THINK_END = [9]  # e.g. the id of the `</think>` special token


@pytest.mark.parametrize("ids,new_from,expected", [
    ([1, 2, 3], 0, []),
    ([1, 9, 3], 0, [2]),
    ([1, 9, 3], 2, []),  # tokens before new_from were scanned already
    ([9], 0, [1]),
])
def test_single_token_marker(ids, new_from, expected):
    assert new_stage_starts(ids, [THINK_END], 0, new_from) == expected


def test_multi_token_marker_straddling_chunks_and_chained_stages():
    markers = [[7, 8], [5]]
    assert new_stage_starts([1, 7], [[7, 8]], 0, 0) == []
    assert new_stage_starts([1, 7, 8, 2], [[7, 8]], 0, 2) == [3]  # "7" came earlier, "8" now
    assert new_stage_starts([7, 8, 5, 1], markers, 0, 0) == [2, 3]
    assert new_stage_starts([7, 8, 5, 1], markers, 2, 0) == []  # no markers beyond the last stage
    assert new_stage_starts([5, 7, 8], markers, 1, 0) == [1]


@given(ids=st.lists(st.integers(0, 4), max_size=30), cut=st.integers(0, 30))
def test_chunked_equals_whole(ids, cut):
    """Feeding output in two chunks finds the same stage starts as feeding it at once."""
    markers = [[1, 2], [3]]
    whole = new_stage_starts(ids, markers, 0, 0)
    cut = min(cut, len(ids))
    first = new_stage_starts(ids[:cut], markers, 0, 0)
    second = new_stage_starts(ids, markers, len(first), cut)
    assert first + second == whole
