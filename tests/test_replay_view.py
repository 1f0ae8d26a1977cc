"""Replay's per-device TPH view follows the device writes of the decisions byte for byte.

The view takes a whole control register or ST entry at once and reads partial writes byte by
byte; a byte-level copy of the registers, fed the same writes, is the reference.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tphtrap.device import ConfigSpace
from tphtrap.events import ConfigWrite, Decision, DeviceWrite, MsixWrite, Verdict
from tphtrap.replay_summary import TphView
from tphtrap.spec import StLocation
from tphtrap.synth import MsixSpec, TphSpec, build_config

TPH_AT, ENTRIES = 0x148, 8
CTRL, TABLE = TPH_AT + 8, TPH_AT + 0xC  # the control register, the capability's ST table
MSIX_BAR, MSIX_TABLE = 2, 0x4000


def device(location: StLocation) -> ConfigSpace:
    data = build_config(
        tph=TphSpec(location=location, table_size=ENTRIES, entries=tuple(range(1, ENTRIES + 1))),
        msix=MsixSpec(table_size=ENTRIES, bir=MSIX_BAR, table_offset=MSIX_TABLE),
        tph_at=TPH_AT,
    )
    return ConfigSpace.from_bytes(data, "view-test")


def writes(location: StLocation) -> st.SearchStrategy[list[DeviceWrite]]:
    config = st.builds(
        lambda off, width, value: DeviceWrite("config", off, width, value & ((1 << 8 * width) - 1)),
        st.integers(CTRL - 3, TABLE + 2 * ENTRIES + 2),
        st.sampled_from([1, 2, 4]),
        st.integers(0, (1 << 32) - 1),
    )
    if location is StLocation.CAP:
        return st.lists(config, max_size=30)
    bar = st.builds(
        lambda off, width, value: DeviceWrite(
            "bar", off, width, value & ((1 << 8 * width) - 1), MSIX_BAR
        ),
        st.integers(MSIX_TABLE - 3, MSIX_TABLE + 16 * ENTRIES + 2),
        st.sampled_from([1, 2, 4, 8]),
        st.integers(0, (1 << 64) - 1),
    )
    return st.lists(st.one_of(config, bar), max_size=30)


def reference(cfg: ConfigSpace, location: StLocation, ws: list[DeviceWrite]) -> tuple[int, dict]:
    """(control register, entry -> tag) after ``ws``, applied one byte at a time."""
    config = bytearray(cfg.data)
    table = bytearray(16 * ENTRIES)  # the MSI-X table: unknown until written, 0 here
    written: set[int] = set()
    for w in ws:
        for b in range(w.width):
            byte, pos = (w.value >> (8 * b)) & 0xFF, w.offset + b
            if w.space == "config" and CTRL <= pos < CTRL + 4:
                config[pos] = byte
            elif w.space == "config" and location is StLocation.CAP:
                if TABLE <= pos < TABLE + 2 * ENTRIES:
                    config[pos] = byte
            elif w.space == "bar" and 0 <= pos - MSIX_TABLE < len(table):
                rel = pos - MSIX_TABLE
                if rel % 16 >= 14:
                    table[rel] = byte
                    written.add(rel // 16)
    ctrl = int.from_bytes(config[CTRL : CTRL + 4], "little")
    if location is StLocation.CAP:
        entries = {i: int.from_bytes(config[TABLE + 2 * i : TABLE + 2 * i + 2], "little")
                   for i in range(ENTRIES)}  # fmt: skip
    else:
        entries = {i: int.from_bytes(table[16 * i + 14 : 16 * i + 16], "little") for i in written}
    return ctrl, entries


def follow(location: StLocation, ws: list[DeviceWrite]) -> TphView:
    view = TphView.of(device(location), None)
    assert view is not None
    for n, w in enumerate(ws):
        access = (
            ConfigWrite("vm", "0000:00:03.0", w.offset, w.width, w.value)
            if w.space == "config"
            else MsixWrite("vm", "0000:00:03.0", MSIX_BAR, w.offset, w.width, w.value)
        )
        view.observe("t", n + 1, access, Decision(Verdict.PASS, "not-tph", "", (w,)))
    return view


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_view_follows_writes_like_a_byte_copy(data: st.DataObject) -> None:
    location = data.draw(st.sampled_from([StLocation.CAP, StLocation.MSIX]))
    ws = data.draw(writes(location))
    view = follow(location, ws)
    ctrl, entries = reference(device(location), location, ws)
    assert view.dev_ctrl == ctrl
    assert view.entry_values == entries


def test_whole_and_partial_writes_of_an_entry() -> None:
    ws = [
        DeviceWrite("config", TABLE, 4, 0x0202_0101),  # entries 0 and 1 at once
        DeviceWrite("config", TABLE + 3, 1, 0x07),  # the high byte of entry 1
        DeviceWrite("config", CTRL, 4, 0x101),  # Interrupt Vector, TPH enabled
    ]
    view = follow(StLocation.CAP, ws)
    assert (view.entry_values[0], view.entry_values[1]) == (0x0101, 0x0702)
    assert view.enabled_at == "t:3" and 0x01 in view.usable
    msix = follow(StLocation.MSIX, [DeviceWrite("bar", MSIX_TABLE + 8, 8, 0x0123_0000 << 32, 2)])
    assert msix.entry_values == {0: 0x0123}  # data and Vector Control in one 8-byte write
