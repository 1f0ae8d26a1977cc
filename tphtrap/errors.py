"""The error hierarchy and the positioned :class:`Problem`. No logic lives here.

Every error the project raises on purpose derives from :class:`TphtrapError`; anything else
reaching a front end is a bug (exit code 3). Each error knows *where*: a file and line, a record
number, a request id, or a breadcrumb path, so the one-line message names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "DeviceError",
    "LayoutError",
    "PolicyError",
    "Problem",
    "TphtrapError",
    "TraceError",
    "UsageError",
    "WireError",
]


class TphtrapError(Exception):
    """Base of every deliberate tphtrap error. Not raised directly."""

    def __init__(self, message: str) -> None:
        if type(self) is TphtrapError:
            raise TypeError("raise a subclass of TphtrapError")
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class LayoutError(TphtrapError):
    """A ``construct`` parse or build failed; ``path`` is construct's breadcrumb."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class DeviceError(TphtrapError):
    """A config-space source could not be read or is malformed.

    ``where`` is ``file:line`` (or ``file`` / ``file@0xOFF`` for binary sources).
    """

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.reason = message


@dataclass(frozen=True, order=True)
class Problem:
    """One problem in a policy file, ordered like yamllint's (line, column, rule)."""

    line: int
    column: int
    rule: str
    message: str = field(compare=False)
    path: str = field(default="", compare=False)  # breadcrumb, e.g. vms.web.cpus
    file: str = field(default="", compare=False)
    level: str = field(default="error", compare=False)

    def format(self) -> str:
        where = f"{self.line}:{self.column}"
        if self.file:
            where = f"{self.file}:{where}"
        return f"{where}: {self.level}: {self.message} ({self.rule})"


class PolicyError(TphtrapError):
    """A policy did not load; ``problems`` lists every problem found, in position order."""

    def __init__(self, problems: tuple[Problem, ...] | list[Problem]) -> None:
        self.problems = tuple(sorted(problems))
        super().__init__("\n".join(p.format() for p in self.problems) or "invalid policy")


class WireError(TphtrapError):
    """A protocol line from the hypervisor is malformed.

    ``code`` is the protocol error code, ``request_id`` the id when it could be read,
    ``field`` the offending field when there is one.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        request_id: int | str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.field = field


class TraceError(TphtrapError):
    """A trace record could not be read; ``where`` is ``file:line``."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.reason = message


class UsageError(TphtrapError):
    """Options that argparse accepts one by one but not together (exit code 2)."""
