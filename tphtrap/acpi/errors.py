"""The errors of the ACPI side. Each message names the table, tool or path at fault."""

from __future__ import annotations

from ..errors import TphtrapError

__all__ = ["AcpiError", "AcpiToolMissing", "NoSteeringTags"]


class AcpiError(TphtrapError):
    """A table is unreadable or malformed, or iasl/acpiexec failed or timed out."""


class AcpiToolMissing(AcpiError):
    """``iasl`` or ``acpiexec`` is not installed."""


class NoSteeringTags(AcpiError):
    """The firmware answers no steering tag: TPH cannot be used safely on this host."""
