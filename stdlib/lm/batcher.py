"""Several concurrent queries served by one language-model backend, batched.

``BatchingLM(backend, max_batch=256, max_wait_ms=10)`` is itself a ``LanguageModel``:
pass it wherever the backend would go (``model.run("smc", {"lm": batcher, ...})`` in
several threads, the hand-written loops of ``bench/``, ``await batcher.anext_logprobs``
in asyncio tasks). Every ``next_logprobs(contexts)`` call becomes a *request*; the
requests that are waiting are answered together by ONE ``backend.next_logprobs`` call
(a *tick*), and each request receives exactly its rows.

* When a tick fires. The worker takes the oldest waiting request and waits for more
  until one of: every registered client has a request waiting (``with
  batcher.client():`` around each query, or ``run_concurrently``, registers one), the
  waiting requests reach ``max_batch`` rows, ``max_wait_ms`` have passed since the
  oldest arrived, or the batcher is closing. Without registered clients, only the last
  three apply (the waiting requests' rows are counted with repeats there). Requests are
  served in arrival order and never split: a tick takes whole requests while their
  distinct contexts fit in ``max_batch`` (a single request larger than that runs alone,
  as one backend call, as it would unbatched).
* What the backend sees. The distinct contexts of the tick's requests, in order of
  first appearance (identical contexts of different queries, e.g. a shared prompt, are
  asked once). Request r receives ``answer[index_r]``: exactly the backend's rows for
  its contexts, in its order (bit for bit: the batcher does no arithmetic). The backend
  is called by one thread at a time (the worker, or the caller of ``next_logprobs``
  whose request completes a tick: it runs the tick itself, sparing two thread switches),
  so a backend that is not thread-safe (the prefix cache of ``cache.py``) needs no lock; ``encode``/``decode``/``token_text`` are
  passed through under a lock (fast tokenizers are not safe to share across threads).
* Numerics. A row of a batched forward pass can differ from the same row computed alone
  in the last bit (CPU matrix-multiply kernels are chosen by the batch's size: measured
  up to 5e-7 in a log-probability, for the small GRU and a tiny GPT-2). The backend's own
  batching of one query's particles has the same property; the batcher adds nothing to
  it. Exact backends (``ToyLM``: table look-ups) answer bit-identically whatever the
  batch, and so do the queries served through the batcher.
* Prefix caches. One tick is one backend call, so ``keep_calls`` (``cache.py``) counts
  ticks; a query whose request misses a tick finds its entries one call older. With a
  backend's default ``keep_calls=2`` a request may miss one tick without losing its
  cached prefixes; give the backend ``keep_calls`` of about the number of queries if
  they straggle more (only speed is at stake: a lost entry is recomputed).
* Errors. If the backend raises (or answers with the wrong shape) on a tick of several
  requests, each of them is retried alone: the request that causes the error receives
  it (the same exception object, raised in its own thread/task), the others receive
  their rows and carry on. The worker keeps serving. The stats count the failures.
* Shutting down. ``close()`` (or leaving ``with BatchingLM(...) as lm:``) serves what is
  waiting, stops the worker and joins it; a request made after that is a ``PPLError``.
  The worker is a daemon thread, so a batcher never closed does not keep the process
  alive.

Answers carry no autograd graph (the worker calls the backend under ``torch.no_grad``)
and stay on the backend's device.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ...semantics.errors import PPLError
from .base import LanguageModel


@dataclass
class BatcherStats:
    """Counters since the batcher was made."""

    requests: int = 0          #: next_logprobs calls made to the batcher
    rows: int = 0              #: contexts asked for (with repeats)
    ticks: int = 0             #: backend calls for a tick (one per tick, retries not counted)
    backend_rows: int = 0      #: distinct contexts sent to the backend in ticks
    max_requests_per_tick: int = 0
    max_rows_per_tick: int = 0
    full_ticks: int = 0        #: ticks fired because every registered client was waiting
    timed_out_ticks: int = 0   #: ticks fired by max_wait_ms
    size_ticks: int = 0        #: ticks fired by max_batch
    errors: int = 0            #: requests answered with an exception
    isolated_retries: int = 0  #: backend calls made to find which request of a failed tick fails

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @property
    def mean_requests_per_tick(self) -> float:
        return (self.requests - self.errors) / self.ticks if self.ticks else 0.0


class _Request:
    __slots__ = ("contexts", "future", "arrived")

    def __init__(self, contexts: list[tuple], future: Future):
        self.contexts = contexts
        self.future = future
        self.arrived = time.perf_counter()


class BatchingLM(LanguageModel):
    """A ``LanguageModel`` that serves concurrent callers with batched backend calls
    (see the module docstring). ``max_batch``: the most rows (distinct contexts of whole
    requests) one tick sends to the backend; ``max_wait_ms``: how long a tick may wait
    for more requests after its first one arrived."""

    def __init__(self, backend: LanguageModel, *, max_batch: int = 256, max_wait_ms: float = 10.0,
                 name: str | None = None):
        if not isinstance(backend, LanguageModel):
            raise PPLError(f"BatchingLM needs a LanguageModel backend, not {type(backend).__name__}")
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise PPLError(f"BatchingLM: max_batch must be a positive integer, not {max_batch!r}")
        if not isinstance(max_wait_ms, (int, float)) or isinstance(max_wait_ms, bool) or not max_wait_ms >= 0:
            raise PPLError(f"BatchingLM: max_wait_ms must be a number >= 0, not {max_wait_ms!r}")
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.name = name or getattr(backend, "name", "lm")
        self.eos_id = backend.eos_id
        self.stats = BatcherStats()
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._text_lock = threading.Lock()
        self._exec_lock = threading.Lock()  # held while the backend runs a tick
        self._clients = 0
        self._closing = False
        self._stopped: BaseException | None = None  # why the worker died, if it did
        self._worker = threading.Thread(target=self._serve, name=f"BatchingLM({self.name})", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------ the LM protocol
    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def device(self):
        return getattr(self.backend, "device", torch.device("cpu"))

    def encode(self, text: str) -> list[int]:
        with self._text_lock:
            return self.backend.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        with self._text_lock:
            return self.backend.decode(ids)

    def token_text(self, token_id: int) -> str:
        with self._text_lock:
            return self.backend.token_text(token_id)

    def __getattr__(self, name: str):
        # exact rationals of an exact backend (ToyLM): pure, passed through
        if name == "exact_next_probs" and "backend" in self.__dict__:
            return getattr(self.backend, name)
        raise AttributeError(name)

    def next_logprobs(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """The backend's rows for ``contexts``, computed in a tick shared with the other
        callers waiting now. Blocks until they are ready; raises the backend's error if
        these contexts cause one. The caller whose request completes a tick runs that
        tick itself (no hand-over to the worker thread and back)."""
        fut, batch = self._enqueue(contexts, run_here=True)
        if batch is not None:
            self._answer(batch)
        return fut.result()

    async def anext_logprobs(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """``next_logprobs`` for asyncio tasks: awaits the tick without blocking the loop."""
        return await asyncio.wrap_future(self.submit(contexts))

    def submit(self, contexts: Sequence[Sequence[int]]) -> Future:
        """Queue a request; its ``Future`` receives the [len(contexts), V] rows or the error."""
        return self._enqueue(contexts, run_here=False)[0]

    def _enqueue(self, contexts, run_here: bool) -> tuple[Future, list | None]:
        """Queue a request: (its future, the tick to run in this thread, if ``run_here``
        and the request completes one)."""
        ctxs = [c if type(c) is tuple else tuple(c) for c in contexts]
        fut: Future = Future()
        if not ctxs:
            fut.set_result(torch.empty(0, self.vocab_size, device=self.device))
            return fut, None
        with self._cond:
            if self._closing or self._stopped is not None:
                why = "it was closed" if self._stopped is None else f"its worker stopped ({self._stopped!r})"
                raise PPLError(f"the batcher of {self.name!r} takes no more requests: {why}",
                               hint="make a new BatchingLM, or call the backend directly")
            self._queue.append(_Request(ctxs, fut))
            self.stats.requests += 1
            self.stats.rows += len(ctxs)
            why = self._ready() if run_here else None
            if why is not None and why != "closing":
                return fut, self._take(why)
            self._cond.notify_all()
        return fut, None

    # --------------------------------------------------------------- clients
    @contextlib.contextmanager
    def client(self):
        """Register one concurrent query for the block: a tick fires as soon as every
        registered query has a request waiting (no need to wait ``max_wait_ms``)."""
        self._add_clients(1)
        try:
            yield self
        finally:
            self._add_clients(-1)

    def _add_clients(self, n: int) -> None:
        with self._cond:
            self._clients += n
            self._cond.notify_all()

    # -------------------------------------------------------------- shut down
    def close(self, timeout: float | None = None) -> None:
        """Serve the requests already waiting, then stop the worker (joined)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    @property
    def closed(self) -> bool:
        return not self._worker.is_alive()

    def __enter__(self) -> "BatchingLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- worker
    def _serve(self) -> None:
        try:
            while True:
                batch = self._next_tick()
                if batch is None:
                    return
                self._answer(batch)
        except BaseException as e:  # pragma: no cover - a bug or an interpreter shutdown
            with self._cond:
                self._stopped = e
                pending = list(self._queue)
                self._queue.clear()
            for r in pending:
                if not r.future.done():
                    r.future.set_exception(PPLError(f"the batcher of {self.name!r} stopped: {e!r}"))
            raise

    def _next_tick(self) -> list[_Request] | None:
        """Wait for the requests of the next tick (None: closing and nothing waits)."""
        with self._cond:
            while True:
                if not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                why = self._ready()
                if why is None:
                    left = self._queue[0].arrived + self.max_wait_s - time.perf_counter()
                    if left > 0:
                        self._cond.wait(left)
                        continue  # the queue may have changed (a caller may have run it)
                    why = "timeout"
                return self._take(why)

    def _ready(self) -> str | None:
        """Why the waiting requests make a tick now (None: wait for more). Under the lock."""
        if sum(len(r.contexts) for r in self._queue) >= self.max_batch:
            return "size"
        if self._clients and len(self._queue) >= self._clients:
            return "full"
        if self.max_wait_s == 0:
            return "timeout"
        if self._closing:
            return "closing"
        return None

    def _take(self, why: str) -> list[_Request]:
        """The next tick's requests: whole requests, in arrival order, while their distinct
        contexts fit in max_batch (at least one). Under the lock."""
        st = self.stats
        if why == "size":
            st.size_ticks += 1
        elif why == "full":
            st.full_ticks += 1
        elif why == "timeout":
            st.timed_out_ticks += 1
        batch = [self._queue.popleft()]
        distinct = set(batch[0].contexts)
        while self._queue:
            more = distinct.union(self._queue[0].contexts)
            if len(more) > self.max_batch:
                break
            distinct = more
            batch.append(self._queue.popleft())
        return batch

    def _call_backend(self, contexts: list[tuple]) -> torch.Tensor:
        with torch.no_grad():
            out = self.backend.next_logprobs(contexts)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(contexts):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise PPLError(f"{self.name}: next_logprobs returned {shape} for {len(contexts)} contexts",
                           hint="a backend answers one row per context")
        return out

    def _answer(self, batch: list[_Request]) -> None:
        """One backend call for the whole tick; on an error, each request alone. Backend
        calls are serialised (the worker and callers running a tick take turns)."""
        with self._exec_lock:
            try:
                self._answer_tick(batch)
            except BaseException as e:  # an interrupt in a caller running the tick: nobody hangs
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
                raise

    def _answer_tick(self, batch: list[_Request]) -> None:
        slot: dict[tuple, int] = {}
        indices = [[slot.setdefault(c, len(slot)) for c in r.contexts] for r in batch]
        unique = list(slot)
        st = self.stats
        st.ticks += 1
        st.backend_rows += len(unique)
        st.max_requests_per_tick = max(st.max_requests_per_tick, len(batch))
        st.max_rows_per_tick = max(st.max_rows_per_tick, len(unique))
        try:
            answer = self._call_backend(unique)
        except Exception as e:
            if len(batch) == 1:
                self._fail(batch[0], e)
            else:
                self._answer_alone(batch)
            return
        identity = list(range(len(unique)))
        for r, idx in zip(batch, indices):
            if idx == identity:
                rows = answer  # the request is the whole tick, in order: its rows as they are
            else:
                rows = answer.index_select(0, torch.tensor(idx, dtype=torch.long, device=answer.device))
            r.future.set_result(rows)

    def _answer_alone(self, batch: list[_Request]) -> None:
        """A tick of several requests failed: find the failing ones, one backend call each."""
        for r in batch:
            self.stats.isolated_retries += 1
            try:
                r.future.set_result(self._call_backend(r.contexts))
            except Exception as e:
                self._fail(r, e)

    def _fail(self, r: _Request, e: BaseException) -> None:
        self.stats.errors += 1
        r.future.set_exception(e)


def run_concurrently(lm: BatchingLM, queries: Sequence[Callable[[], object]], *,
                     return_exceptions: bool = False) -> list:
    """Run each query (a function of no arguments, e.g. ``lambda: model.run("smc", {"lm":
    lm, ...}, seed=s)``) in its own thread, each registered as a client of ``lm``; the
    results in the queries' order. A query that raises: its exception in its place with
    ``return_exceptions=True``, else the first such exception is raised once every query
    has finished (the others are not interrupted)."""
    results: list = [None] * len(queries)
    failed: list = [None] * len(queries)

    def work(i: int, fn) -> None:
        try:
            results[i] = fn()
        except BaseException as e:  # handed to the caller below
            failed[i] = e
        finally:
            lm._add_clients(-1)  # a finished query no longer holds the ticks open

    lm._add_clients(len(queries))  # every client registered before any starts: the first ticks are full
    threads = [threading.Thread(target=work, args=(i, fn), name=f"query-{i}", daemon=True)
               for i, fn in enumerate(queries)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, e in enumerate(failed):
        if e is not None:
            if return_exceptions:
                results[i] = e
            else:
                raise e
    return results
