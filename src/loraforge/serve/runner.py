"""The engine loop on one thread, and the bridge to asyncio.

The HTTP server's event loop never touches the model: it queues requests with ``submit`` and awaits
their per-request ``asyncio.Queue``; anything that changes the model (loading or unloading an adapter)
is handed to the engine thread with ``call`` and runs between two decode steps. Torch releases the GIL
inside its kernels, so the event loop keeps answering while a step runs.

Which thread: ``start`` runs the loop on a thread of its own (tests, an app embedded in another
program); ``run_here`` runs it on the calling thread, which is how ``loraforge serve`` runs it: on the
thread that loaded the model, with uvicorn on another. The difference is OpenMP's. Each thread that
runs a parallel region gets a team of its own, and once a process holds more OpenMP threads than CPUs,
libgomp stops letting idle workers spin (GOMP_SPINCOUNT no longer applies): every one of a decode step's
~200 parallel regions then waits for a sleeping worker to wake. Measured on 2 cores, 8 rows on 8
adapters, fp32, the model loaded on the main thread: the loop on the main thread 56-60 tok/s at 2.0 CPUs
busy, on a second thread 34-49 tok/s at 1.2-1.5 CPUs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import uuid
from collections.abc import Callable

from ..generate import SamplingParams
from .engine import Engine, StepOutput
from .errors import ServeError

log = logging.getLogger("loraforge")


class EngineThread:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._unloads: list[tuple[str, concurrent.futures.Future]] = []  # waiting for in-flight requests
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running_here = False  # run_here's loop is running

    def start(self) -> None:
        """Run the loop on a new thread (returns at once)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="loraforge-engine", daemon=True)
        self._thread.start()

    def run_here(self, until: threading.Thread) -> None:
        """Run the loop on the calling thread until `stop` is called or the thread `until` (the HTTP
        server's) has ended: requests still in flight while that server shuts down are served to the end."""
        self._running_here = True
        try:
            self._loop(until)
        finally:
            self._running_here = False

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def is_alive(self) -> bool:
        return self._running_here or (self._thread is not None and self._thread.is_alive())

    # -- called from the event loop -----------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
               logprobs: int | None = None) -> tuple[str, asyncio.Queue]:
        """Queue a request; its StepOutputs arrive on the returned queue (a ServeError instead on failure)."""
        q: asyncio.Queue = asyncio.Queue()
        rid = uuid.uuid4().hex
        self._streams[rid] = (asyncio.get_running_loop(), q)  # before the engine can produce anything for it
        try:
            self.engine.add_request(prompt_ids, params, adapter, request_id=rid, logprobs=logprobs)
        except BaseException:
            self._streams.pop(rid, None)
            raise
        self._wake.set()
        return rid, q

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    async def call(self, fn: Callable, *args):
        """Run fn(*args) on the engine thread between two steps and return its result (or raise its error)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, args, fut))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    async def unload(self, name: str) -> None:
        """Unload an adapter: new requests for it are refused at once, running ones finish first."""
        self.engine.begin_unload(name)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((self._unloads.append, ((name, fut),), concurrent.futures.Future()))
        self._wake.set()
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            self.engine.cancel_unload(name)
            raise

    # -- the engine thread --------------------------------------------------------------------------------
    def _loop(self, until: threading.Thread | None = None) -> None:
        while not self._stop.is_set() and (until is None or until.is_alive()):
            self._run_commands()
            self._run_unloads()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # a bug, not a user error: fail this batch, keep serving
                log.exception("engine step failed")
                err = ServeError(f"internal error in the engine: {type(e).__name__}: {e}", status=500)
                for req in self.engine.fail_all():
                    self._deliver(req.request_id, err, final=True)
                continue
            for o in outs:
                if o.finish_reason == "error":  # this request alone failed (non-finite logits)
                    self._deliver(o.request_id, ServeError(
                        "the model produced non-finite logits for this request: its adapter holds NaN or "
                        "infinite values, or overflows in this precision", status=500), final=True)
                else:
                    self._deliver(o.request_id, o, final=o.finish_reason is not None)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, args, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn(*args))
            except Exception as e:  # handed back to the awaiting caller
                fut.set_exception(e)

    def _run_unloads(self) -> None:
        for item in list(self._unloads):
            name, fut = item
            if fut.cancelled() or not self.engine.adapter_busy(name):
                self._unloads.remove(item)
                if fut.cancelled():
                    continue
                try:
                    self.engine.unload_adapter(name)
                    fut.set_result(None)
                except Exception as e:
                    fut.set_exception(e)

    def _deliver(self, request_id: str, item: StepOutput | ServeError, final: bool) -> None:
        target = self._streams.pop(request_id, None) if final else self._streams.get(request_id)
        if target is None:
            return
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass
