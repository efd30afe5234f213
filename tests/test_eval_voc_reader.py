"""The result-file reader's parts: the sorted-bytes image lookup equals the dictionary
lookup; decimals halfway between two doubles are left to ``float()``."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mapdet.evaluation.voc_results import ImageIndex, parse_decimals

ID = st.sampled_from(["a", "ab", "b", "000001", "000010", "2008_000001", "é", "a\x00", "", "zz"])


@settings(max_examples=300, deadline=None)
@given(known=st.lists(ID, max_size=8), queries=st.lists(ID.filter(lambda i: i.isascii()
                                                                  and "\x00" not in i
                                                                  and i), max_size=10))
def test_bytes_lookup_equals_dict_lookup(known, queries):
    """Prefixes, repeats (first position wins), non-ASCII ids, an id ending in NUL (the
    index then falls back to the dictionary), an empty set."""
    index = ImageIndex(known)
    want = [index._str.get(q, -1) for q in queries]
    got = index.lookup(np.array([q.encode() for q in queries], dtype="S12"))
    assert got.tolist() == want and got.dtype == np.int64
    assert index.lookup(queries).tolist() == want


def test_halfway_decimals_are_left_to_float():
    """2^53 + 1 and 2^53 + 3 lie exactly halfway between two doubles: the long-double
    quotient is the halfway point itself, which must not be rounded a second time."""
    tokens = [b"9007199254740993", b"9007199254740995", b"-9007199254740993.0",
              b"0.30000000000000004", b"115.68932342529297"]
    text = b" ".join(tokens)
    b = np.frombuffer(text, dtype=np.uint8)
    ends = np.cumsum([len(t) + 1 for t in tokens]) - 1
    starts = ends - np.array([len(t) for t in tokens])
    values, ok = parse_decimals(b, starts, ends)
    assert ok.tolist() == [False, False, False, True, True]
    for t, v, good in zip(tokens, values, ok, strict=True):
        if good:
            assert v == float(t) and math.copysign(1, v) == math.copysign(1, float(t))
