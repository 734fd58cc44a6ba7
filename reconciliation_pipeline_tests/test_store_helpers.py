"""Pure helpers of the store layer and the keys that route documents: combined name regexes, the
read-ahead of MongoDB batches, route keys, shared strings (no services needed)."""

from __future__ import annotations

import re
import threading
import time

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciliation_pipeline.core.frames import share_strings
from reconciliation_pipeline.core.keys import last_name_patterns, route_key
from reconciliation_pipeline.store.mongo import combined_patterns, prefetched

_names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(_names, min_size=1, max_size=6), st.lists(_names, min_size=1, max_size=6))
def test_combined_regex_matches_exactly_what_one_of_the_patterns_matches(names, candidates):
    patterns = last_name_patterns(pd.Series([f"Max {n}" for n in names] + [f"{n}, Max" for n in names]))
    combined = combined_patterns(patterns)
    for text in candidates + names:
        any_single = any(re.search(p, text, re.IGNORECASE) for p in patterns)
        any_combined = any(re.search(c, text, re.IGNORECASE) for c in combined)
        assert any_single == any_combined, (text, patterns, combined)


def test_combined_regex_is_split_when_long_and_keeps_other_patterns_apart():
    patterns = [f"^\\s*{'x' * 50}{i}\\s*$" for i in range(1000)] + ["no-anchor"]
    combined = combined_patterns(patterns)
    assert "no-anchor" in combined
    assert len(combined) > 2 and all(len(c) < 20_000 for c in combined)
    assert sum(c.count("|") + 1 for c in combined if c != "no-anchor") == 1000


def test_prefetched_keeps_order_and_reads_ahead():
    read = []

    def batches():
        for i in range(5):
            read.append(i)
            yield i

    out = []
    for item in prefetched(batches()):
        time.sleep(0.05)  # the reader runs ahead while this item is worked on
        out.append((item, max(read)))
    assert [i for i, _ in out] == [0, 1, 2, 3, 4]
    assert any(ahead > item for item, ahead in out)


def test_prefetched_raises_the_readers_error_where_it_happened():
    def batches():
        yield 1
        raise ConnectionError("cut")

    seen = []
    with pytest.raises(ConnectionError, match="cut"):
        for item in prefetched(batches()):
            seen.append(item)
    assert seen == [1]


def test_prefetched_stops_the_reader_when_the_consumer_stops():
    produced = []

    def batches():
        for i in range(1000):
            produced.append(i)
            yield i

    before = threading.active_count()
    for item in prefetched(batches()):
        if item == 2:
            break
    time.sleep(0.2)
    assert len(produced) < 10
    assert threading.active_count() <= before


@pytest.mark.parametrize(
    ("aktenzeichen", "expected"),
    [("542900", "542900"), (" 542900 ", " 542900 "), ("", None), ("   ", None), (None, None), (542900, None),
     ({"$ne": None}, None), ("a\x00b", None), ("x" * 501, None)],
)
def test_route_key_is_the_stored_aktenzeichen_or_the_id_behind_a_nul(aktenzeichen, expected):
    assert route_key(aktenzeichen, "65f0c0ffee") == (expected if expected is not None else "\x0065f0c0ffee")


def test_share_strings_keeps_values_and_shares_objects():
    frame = pd.DataFrame({
        "az_key": pd.array(["1", "2", None, "1"], dtype="string"),
        "client_name": pd.Series(["".join(["A", "b"]), "Ab", None, "C"], dtype=object),
        "other": [1, 2, 3, 4],
    })
    shared = share_strings(frame)
    for column in frame:
        assert shared[column].isna().tolist() == frame[column].isna().tolist()
        assert shared[column].dropna().tolist() == frame[column].dropna().tolist()
    assert shared["az_key"].dtype == frame["az_key"].dtype
    assert shared["client_name"].iloc[0] is shared["client_name"].iloc[1]
