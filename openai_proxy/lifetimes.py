"""How long a request may run: its own timeout, cut short for every request when the server drains."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from openai_proxy.errors import APIError


class RequestLifetimes:
    """Deadlines of the requests in flight; `drain` (on shutdown) brings all of them forward."""

    def __init__(self, timeout_s: float, grace_s: float) -> None:
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self._drain_deadline = math.inf
        self._scopes: set[anyio.CancelScope] = set()

    @property
    def draining(self) -> bool:
        return self._drain_deadline < math.inf

    def new_deadline(self) -> float:
        return anyio.current_time() + self.timeout_s

    @contextmanager
    def bounded(self, deadline: float) -> Iterator[anyio.CancelScope]:
        """Cancel the body at `deadline`, or at the end of a drain's grace period if that comes first."""
        scope = anyio.CancelScope(deadline=min(deadline, self._drain_deadline))
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def expired(self, deadline: float) -> APIError:
        """What to tell a client whose `bounded` body was cut off."""
        if self._drain_deadline <= deadline:
            return APIError(503, "the server is shutting down; retry the request", code="server_shutting_down")
        return APIError(504, f"the request took longer than the {self.timeout_s:g}s limit", code="timeout")

    def drain(self) -> None:
        """Start shutting down: requests in flight may run `grace_s` seconds more at most."""
        self._drain_deadline = anyio.current_time() + self.grace_s
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, self._drain_deadline)
