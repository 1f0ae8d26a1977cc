"""tphtrap: trap-and-filter proxy for PCIe TPH steering tags in virtual machines.

The engine is sans-IO: :meth:`Engine.handle` takes one access and returns one
:class:`Decision`; the command line, the stdin/stdout plugin and trace replay are thin adapters
around it. Everything in ``__all__`` is the public API::

    from tphtrap import ConfigWrite, Engine, load_device, load_policy

    engine = Engine(load_policy("policies/two-tenants.yaml"))
    engine.attach("tenant-a", "0000:3b:00.0", load_device("fixtures/devices/nic-st-in-cap.lspci"))
    decision = engine.handle(ConfigWrite("tenant-a", "0000:3b:00.0", 0x156, 2, 0x02))
    decision.verdict, decision.reason, decision.writes
"""

from __future__ import annotations

__version__ = "0.1.0"

from .device import ConfigSpace, load_device, load_devices
from .engine import AttachRefused, Engine
from .errors import (
    DeviceError,
    LayoutError,
    PolicyError,
    Problem,
    TphtrapError,
    TraceError,
    WireError,
)
from .events import (
    Access,
    ConfigRead,
    ConfigWrite,
    Decision,
    DeviceWrite,
    MsixRead,
    MsixWrite,
    Reset,
    Verdict,
)
from .policy import OnViolation, Policy, TagRules
from .policyfile import load_policy, load_policy_text

__all__ = [
    "Access",
    "AttachRefused",
    "ConfigRead",
    "ConfigSpace",
    "ConfigWrite",
    "Decision",
    "DeviceError",
    "DeviceWrite",
    "Engine",
    "LayoutError",
    "MsixRead",
    "MsixWrite",
    "OnViolation",
    "Policy",
    "PolicyError",
    "Problem",
    "Reset",
    "TagRules",
    "TphtrapError",
    "TraceError",
    "Verdict",
    "WireError",
    "__version__",
    "load_device",
    "load_devices",
    "load_policy",
    "load_policy_text",
]
