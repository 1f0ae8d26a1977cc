"""The sans-IO trap-and-filter engine: a reference monitor for one host's TPH devices.

One access in, one decision out. The parts, in the order a decision passes through them:

- :mod:`.geometry`: where a device's filtered registers are (built once at attach);
- :mod:`.session`: the guest's view and the device's state; merges an access into the view
  and plans the transition to the target;
- :mod:`.target`: what the device may hold (control register, ST entries): pure functions;
- :mod:`.check`: the self-check, an independent byte-level copy of the device every plan is
  tried on before it leaves the engine;
- :mod:`.core`: :class:`Engine`, the lifecycle (attach, reset, reload) and the decisions;
- :mod:`.reasons`: every reason code and what it means.
"""

from .core import Engine
from .geometry import AttachRefused
from .reasons import REASONS, describe_reason
from .session import Session

__all__ = ["REASONS", "AttachRefused", "Engine", "Session", "describe_reason"]
