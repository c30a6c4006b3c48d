"""Bring back what died: a Python-backend stub (OOM, crash, kill) or tritonserver itself.

Triton 2.51's Python backend does not restart a dead stub: the model stays READY and every request
to it fails ("Stub process 'vit_0_0' is not healthy"). The supervisor watches the stubs and the
server from the process that started them. A model whose stub is gone is unloaded and loaded again
through the repository API (strict readiness makes the server not-ready meanwhile, so health checks
say so); processes the dead stub left behind (vLLM's engine core and workers) are killed first.

A dead decoupled stub (`vlm`, which owns the LLM engine) needs more: the backend never ends the
requests it had in flight, so whoever waits on them would wait forever. `on_requests_lost` tells the
proxy, which answers its requests in flight with a 503 at once. A dead non-decoupled stub (`vit`,
`preprocess`, `vit_cache`) fails the calls in flight, which `vlm` answers with 503 itself.

When tritonserver dies, or a reload fails, the server is restarted: killed with its whole process group
and started again on the same ports (the proxy's streams fail by themselves).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from launcher.triton_server import TritonServer

logger = logging.getLogger(__name__)


class Supervisor:
    """A daemon thread that checks `triton` every `poll_s` seconds while running.

    `keep` gives the pids of the deployment's other top-level processes (the proxy), whose children are
    not orphans to kill. `on_requests_lost` is called when the requests in flight will never end.
    """

    def __init__(self, triton: TritonServer, keep: Callable[[], list[int]],
                 on_requests_lost: Callable[[], None], poll_s: float = 0.5) -> None:
        self.triton = triton
        self.keep = keep
        self.on_requests_lost = on_requests_lost
        self.poll_s = poll_s
        self.restarts = 0  # model reloads and server restarts so far, for tests and logs
        self._models: dict[str, str] = {}  # instance name ("vit_0_0") -> model, of the server as started
        self._stub_pids: dict[str, int] = {}  # instance name -> its stub's pid, as last seen alive
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="triton-supervisor", daemon=True)

    def start(self) -> None:
        # The instances of the started server are those that must live; a stub that dies while the server
        # restarts, or a model reloads, is missing at the next check whenever it died.
        stubs = self.triton.stub_instances()
        self._models = {name: stub.model for name, stub in stubs.items()}
        self._stub_pids = {name: stub.pid for name, stub in stubs.items()}
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, before a deliberate stop that must not be undone (a recovery under way fails once
        the server is stopped: `TritonServer.start` refuses then)."""
        self._stopped.set()

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        server_ok = True
        while not self._stopped.wait(self.poll_s):
            try:
                if server_ok:
                    self._check()
                else:
                    self._restart_server()
                server_ok = True
            except Exception:  # retried at the next poll, with a server restart
                if self._stopped.is_set():  # the server was stopped under us, on purpose
                    return
                logger.exception("recovery failed; restarting tritonserver")
                server_ok = False

    def _check(self) -> None:
        if self.triton.process is None or self.triton.process.poll() is not None:
            logger.error("tritonserver exited (code %s); restarting it", self.triton.process.returncode)
            self._restart_server()
            return
        live = self.triton.stub_instances()
        models = sorted({model for name, model in self._models.items() if name not in live})
        dead = [pid for name, pid in self._stub_pids.items() if name not in live]
        self._stub_pids.update((name, stub.pid) for name, stub in live.items())
        if not models:
            return
        logger.error("backend process of %s died; reloading", ", ".join(models))
        if any(self.triton.is_decoupled(model) for model in models):
            self.on_requests_lost()
        # A stub that is still exiting (its memory already gone, so no longer a live instance) keeps its children
        # until its last thread ends: they are not orphans yet, but they go with it.
        orphans = self.triton.deployment.kill_orphans([self.triton.process.pid, *self.keep()], dead)
        if orphans:
            logger.info("killed %d processes the dead stub left behind", len(orphans))
        with ThreadPoolExecutor(len(models)) as reloads:  # Triton loads models in parallel
            list(reloads.map(self.triton.reload_model, models))
        # The backend leaves a dead stub's region in /dev/shm when it starts a new one, and a live instance of
        # the same model that the reload stopped may leave its own: once every stub is up again, no region of
        # the deployment that none of them maps is in use.
        in_use = {stub.region for stub in self.triton.stub_instances().values()}
        for region in self.triton.deployment.regions():
            if region.name not in in_use:
                region.unlink(missing_ok=True)
        self.restarts += 1
        logger.info("%s back", ", ".join(models))

    def _restart_server(self) -> None:
        self.triton.kill()
        self.triton.start()
        self.restarts += 1
        logger.info("tritonserver back")
