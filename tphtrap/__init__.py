"""tphtrap: trap-and-filter proxy for PCIe TPH steering tags in virtual machines.

The public API is re-exported here; the engine is sans-IO (an access in, a decision out), and
the command line, the stdin/stdout plugin and trace replay are thin adapters around it.
"""

from __future__ import annotations

__version__ = "0.1.0"
