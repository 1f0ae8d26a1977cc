"""Suite-wide: the largest line a server makes in the tests, against ``max_reply``.

Every ``Server.handle_line`` and ``reload_event`` call in this process is measured; the
summary prints the largest line, and the run fails if any line exceeds ``MAX_REPLY``
(docs/protocol.md, "Line limits"). Servers run as subprocesses are checked by their tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tphtrap import serve
from tphtrap.wire import MAX_REPLY

_LARGEST: dict[str, Any] = {"bytes": 0, "test": None}


def _measured(method: Any) -> Any:
    def wrapper(self: Any, *args: Any) -> bytes:
        out: bytes = method(self, *args)
        for line in out.splitlines():
            if len(line) > _LARGEST["bytes"]:
                _LARGEST["bytes"] = len(line)
                _LARGEST["test"] = _CURRENT.get("test")
        return out

    return wrapper


_CURRENT: dict[str, str] = {}


@pytest.fixture(autouse=True, scope="session")
def _measure_replies() -> Iterator[None]:
    handle, event = serve.Server.handle_line, serve.Server.reload_event
    serve.Server.handle_line = _measured(handle)  # type: ignore[method-assign]
    serve.Server.reload_event = _measured(event)  # type: ignore[method-assign]
    yield
    serve.Server.handle_line = handle  # type: ignore[method-assign]
    serve.Server.reload_event = event  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _name_the_test(request: pytest.FixtureRequest) -> None:
    _CURRENT["test"] = request.node.nodeid


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _LARGEST["bytes"]:
        terminalreporter.write_line(
            f"largest reply line: {_LARGEST['bytes']:,} bytes (max_reply {MAX_REPLY:,}), "
            f"in {_LARGEST['test']}"
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _LARGEST["bytes"] > MAX_REPLY:
        session.exitstatus = 1
