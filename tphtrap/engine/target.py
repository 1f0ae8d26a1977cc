"""Target device state: what the device may hold, as pure functions of the guest's view.

:func:`grant_control` decides the control register from the guest's request, the device's
capabilities, the policy and the latches. :func:`resolve_entry` decides one ST entry. Neither
looks at how the guest's bytes arrived: the session merges them into the guest's view first.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from ..layouts import TPH_CTRL
from ..policy import OnViolation, TagRules
from ..spec import ReqEnable, StMode, TagWidth
from .geometry import CTRL_WRITABLE, Geometry

__all__ = [
    "KEEP",
    "LATCH",
    "REFUSE",
    "Grant",
    "HostLimit",
    "control_value",
    "grant_control",
    "resolve_entry",
]

MODE = TPH_CTRL["st_mode_select"]
REQ = TPH_CTRL["tph_requester_enable"]
WIDTH_OF_ENABLE: Final[dict[int, TagWidth]] = {
    ReqEnable.TPH: TagWidth.ST8,
    ReqEnable.EXT_TPH: TagWidth.ST16,
}

#: :func:`resolve_entry` results besides a value: keep what the device holds; refuse the enable
KEEP: Final = -1
REFUSE: Final = -2
LATCH: Final = -3


class Grant:
    """The granted control register: writable bits, tag width in force, reasons."""

    __slots__ = ("bits", "mode", "reasons", "refused", "requested_width", "uses_entries", "width")

    def __init__(
        self,
        bits: int,
        width: TagWidth | None,
        reasons: list[str],
        requested_width: TagWidth | None,
        refused: bool = False,
    ) -> None:
        self.bits = bits  # mode select | Requester Enable
        self.width = width  # None: disabled
        self.mode = MODE.get(bits)
        self.reasons = reasons
        self.requested_width = requested_width  # the width an enable asked for (after downgrade)
        self.refused = refused  # the guest asked for an enable it does not get
        #: enabled in Interrupt Vector mode: the device uses its ST entries
        self.uses_entries = width is not None and self.mode == StMode.INT_VEC


class HostLimit(NamedTuple):
    """What the host kernel allows an enable (the ``host`` backend).

    ``width``: the request type ``pcie_enable_tph`` will choose (None: it refuses every
    enable); ``refusal``: a reason code that keeps TPH off whatever is asked (a failed host
    operation, entries that cannot be made safe before the enable).
    """

    width: TagWidth | None
    refusal: str | None = None


def grant_control(
    requested: int,
    geo: Geometry,
    rules: TagRules,
    latched: bool,
    revoked: bool,
    host: HostLimit | None = None,
) -> Grant:
    """The control bits the device may get for the guest's ``requested`` control value.

    With ``host``, the tag width is the host kernel's, not the guest's: an enable is granted at
    that width or not at all.
    """
    mode = MODE.get(requested)
    en = REQ.get(requested)
    supported = (mode == StMode.NO_ST and geo.ns_ok) or (mode == StMode.INT_VEC and geo.iv_ok)
    off = MODE.put(0, mode) if supported else 0
    if en == ReqEnable.DISABLED:
        return Grant(off, None, ["tph-disabled"], None)
    if mode > StMode.DEV_SPEC:
        return Grant(0, None, ["mode-reserved"], None, True)
    if en == ReqEnable.RESERVED:
        return Grant(off, None, ["req-enable-reserved"], None, True)
    want_ext = en == ReqEnable.EXT_TPH
    ext = want_ext and geo.ext_ok and rules.ext_allowed
    if host is not None and host.width is not None:
        ext = host.width is TagWidth.ST16
    width = TagWidth.ST16 if ext else TagWidth.ST8
    refusal = None
    if revoked:
        refusal = "device-revoked"
    elif latched:
        refusal = "tph-latched-off"
    elif not rules.tph_allowed:
        refusal = "tph-forbidden"
    elif geo.refusal:
        refusal = geo.refusal
    elif mode == StMode.DEV_SPEC:
        refusal = "device-specific-mode"
    elif not supported:
        refusal = "mode-unsupported"
    elif host is not None and host.refusal is not None:
        refusal = host.refusal
    elif host is not None and host.width is None:
        refusal = "host-no-tph"
    elif ext and not rules.ext_allowed:
        refusal = "host-width-forbidden"  # the host enables Extended TPH: 16-bit tags only
    elif mode == StMode.NO_ST and not rules.host_ok(0, width):
        refusal = "no-st-tag-foreign"
    if refusal:
        return Grant(off, None, [refusal], width, True)
    if host is not None:
        reasons = ["host-width"] if want_ext != ext else ["control-granted"]
    else:
        reasons = ["ext-downgraded"] if want_ext and not ext else ["control-granted"]
    bits = REQ.put(off, ReqEnable.EXT_TPH if ext else ReqEnable.TPH)
    return Grant(bits, width, reasons, width)


def resolve_entry(
    guest: int,
    written: bool,
    device: int | None,
    width: TagWidth,
    in_use: bool,
    rules: TagRules,
) -> tuple[int, str | None]:
    """The device value of one ST entry, or KEEP / REFUSE / LATCH, with its reason.

    ``in_use``: the entry is usable at ``width`` once the target lands (Interrupt Vector mode
    enabled). An entry the guest never wrote is left alone while unused and gets the VM's
    fallback tag when it becomes usable.
    """
    if not written:
        if not in_use:
            return KEEP, None
        fb = rules.fallback[width]
        if fb is None:
            return REFUSE, "enable-refused"
        return fb, "tag-fallback"
    host = rules.resolve(guest, width)
    if host is not None:
        return host, ("tag-allowed" if host == guest else "tag-translated")
    code = "unknown-virtual-tag" if rules.translate is not None else "foreign-tag"
    action = rules.on_violation
    if action is OnViolation.REWRITE and rules.fallback[width] is not None:
        return rules.fallback[width] or 0, code
    if action is OnViolation.DISABLE:
        return LATCH, code
    if device is not None and rules.host_ok(device, width):
        return KEEP, code
    return (REFUSE if in_use else KEEP), code


def control_value(reserved: int, bits: int) -> int:
    """A whole control register: the device's reserved bits (RsvdP) and the granted bits."""
    return (reserved & ~CTRL_WRITABLE) | bits
