"""Hypothesis strategies for engine values: accesses, device writes, decisions, request ids.

Shared by the tests that compare a hand-written encoder with the generic one (the access
reply in tests/test_wire_fastpath.py, the access.decided line in tests/test_audit.py): the
values are anything the types allow, not just what the engine produces, so escaping, optional
fields and number formatting are all exercised.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tphtrap.events import (
    ConfigRead,
    ConfigWrite,
    Decision,
    DeviceWrite,
    HostOp,
    MsixRead,
    MsixWrite,
    Reset,
    Verdict,
)

__all__ = ["ACCESSES", "DECISIONS", "IDS", "INTS", "TEXT", "WRITES"]

TEXT = st.text(max_size=12)  # any code point: escaping must match json's
INTS = st.integers(min_value=0, max_value=2**64 - 1)
IDS = st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.text(min_size=1, max_size=20)
ACCESSES = st.one_of(
    st.builds(ConfigWrite, TEXT, TEXT, INTS, st.sampled_from([1, 2, 4]), INTS),
    st.builds(ConfigRead, TEXT, TEXT, INTS, st.sampled_from([1, 2, 4])),
    st.builds(MsixWrite, TEXT, TEXT, st.integers(0, 5), INTS, st.sampled_from([4, 8]), INTS),
    st.builds(MsixRead, TEXT, TEXT, st.integers(0, 5), INTS, st.sampled_from([4, 8])),
    st.builds(Reset, TEXT, TEXT),
)
WRITES = st.builds(
    DeviceWrite,
    space=st.sampled_from(["config", "bar"]),
    offset=INTS,
    width=st.sampled_from([1, 2, 4, 8]),
    value=INTS,
    bar=st.none() | st.integers(min_value=0, max_value=5),
)
_REASONS = (
    st.sampled_from(
        ["not-tph", "tag-allowed", "foreign-tag", "internal-error", "entries-corrected"]
    )
    | TEXT
)
HOST_OPS = st.one_of(
    st.builds(HostOp, op=st.just("tph_disable")),
    st.builds(
        HostOp,
        op=st.just("tph_enable"),
        mode=st.sampled_from(["iv", "ns"]),
        width=st.sampled_from([8, 16]),
    ),
    st.builds(
        HostOp,
        op=st.just("st_set"),
        index=st.integers(0, 3),
        cpu=st.none() | st.integers(0, 2),
        tag=st.integers(0, 2),
    ),
)
DECISIONS = st.builds(
    Decision,
    verdict=st.sampled_from(list(Verdict)),
    reason=_REASONS,
    detail=TEXT,
    writes=st.lists(WRITES, max_size=4).map(tuple),
    guest_value=st.none() | INTS,
    read_mask=st.sampled_from([0, 0xFF, 0xFFFF, 0xFFFF_0000, 0xFFFF_FFFF]),
    reasons=st.lists(_REASONS, max_size=3).map(tuple),
    rule=st.none() | st.just("") | TEXT,
    ops=st.none() | st.lists(HOST_OPS, max_size=5).map(tuple),
)
