"""How long a request may run: its own timeout, cut short for every request when the server drains, or at
once when the model server has lost the requests in flight."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio

from openai_proxy.errors import APIError, model_unavailable


@dataclass(eq=False)
class Lifetime:
    """One `bounded` body: its cancel scope, its own deadline, and whether the model server lost it."""

    scope: anyio.CancelScope
    deadline: float
    lost: bool = False

    @property
    def cut_off(self) -> bool:
        return self.scope.cancelled_caught


class RequestLifetimes:
    """Deadlines of the requests in flight; `drain` (on shutdown) brings all of them forward, and `lose`
    ends them now."""

    def __init__(self, timeout_s: float, grace_s: float) -> None:
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self._drain_deadline = math.inf
        self._lifetimes: set[Lifetime] = set()

    @property
    def draining(self) -> bool:
        return self._drain_deadline < math.inf

    def new_deadline(self) -> float:
        return anyio.current_time() + self.timeout_s

    @contextmanager
    def bounded(self, deadline: float) -> Iterator[Lifetime]:
        """Cancel the body at `deadline`, at the end of a drain's grace period if that comes first, or when
        the requests in flight are lost."""
        lifetime = Lifetime(anyio.CancelScope(deadline=min(deadline, self._drain_deadline)), deadline)
        self._lifetimes.add(lifetime)
        try:
            with lifetime.scope:
                yield lifetime
        finally:
            self._lifetimes.discard(lifetime)

    def expired(self, lifetime: Lifetime) -> APIError:
        """What to tell a client whose `bounded` body was cut off."""
        if lifetime.lost:
            return model_unavailable()
        if self._drain_deadline <= lifetime.deadline:
            return APIError(503, "the server is shutting down; retry the request", code="server_shutting_down")
        return APIError(504, f"the request took longer than the {self.timeout_s:g}s limit", code="timeout")

    def drain(self) -> None:
        """Start shutting down: requests in flight may run `grace_s` seconds more at most."""
        self._drain_deadline = anyio.current_time() + self.grace_s
        for lifetime in self._lifetimes:
            lifetime.scope.deadline = min(lifetime.scope.deadline, self._drain_deadline)

    def lose(self) -> None:
        """The model server lost every request in flight (a decoupled model's process died, whose requests
        Triton never ends): end each now with a 503, as the requests that come while it restarts get."""
        for lifetime in self._lifetimes:
            lifetime.lost = True
            lifetime.scope.cancel()
