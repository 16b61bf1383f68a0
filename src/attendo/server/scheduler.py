"""One model's scheduler: a thread that owns a `Batch` and steps it while any request is in flight.

HTTP handlers run on the asyncio event loop; the network runs on this thread. They meet in three
places, each safe to call from any thread:

- `submit(requests)` hands over one HTTP request's generation requests (n choices, maybe several
  prompts) as a `Ticket`, or refuses with `QueueFull` when the sequences waiting for a cache slot
  would exceed `max_queue`. The thread adds them to the batch before its next step, so they join
  the running ones at once; the batch prefills them in bounded chunks between decode steps.
- Each step's events become `Delta`s on their tickets' asyncio queues (one `call_soon_threadsafe`
  per step and event loop).
- `cancel(ticket)` (a client went away) drops the ticket's sequences before the next step, which
  frees their cache slots.
- `call(job)` runs a function on the thread between two steps, when the network is not in use:
  the inspection routes run their forward passes this way. The batch waits for the job (a
  bounded pass, like a prefill chunk), and jobs never run beside a step, so they neither change
  a running sequence's numbers nor compete with it for the CPU's threads.

The batch keeps sampler state per sequence (settings, seeded generator, stops), so what a request
generates does not depend on what else is in the batch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from attendo.generation.lookup import LookupBatch
from attendo.generation.loop import Batch, Event, Request, Sequence, TokenLogprob
from attendo.generation.sampler import SamplingSettings

if TYPE_CHECKING:
    from attendo.model import Model
    from attendo.server.metrics import Metrics

log = logging.getLogger("attendo.server")


class QueueFull(Exception):
    """More sequences are waiting for a cache slot than the server allows."""


class ShuttingDown(Exception):
    """The server has stopped taking new requests."""


@dataclass(frozen=True)
class Delta:
    """What one step produced for one choice of a ticket."""

    index: int  # position in the ticket's requests
    token_id: int
    text: str  # may be empty: text that could still be a stop string or half a character is held back
    logprob: TokenLogprob | None
    finish_reason: str | None  # set on the choice's last delta only


class Ticket:
    """The generation requests of one HTTP request, and the queue their deltas arrive on."""

    _ids = itertools.count()

    def __init__(self, requests: list[Request], loop: asyncio.AbstractEventLoop) -> None:
        self.id = next(self._ids)
        self.requests = requests
        self.loop = loop
        self.queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.cancelled = False
        self.sequences: list[Sequence] = []  # filled by the scheduler thread
        self.unfinished = len(requests)  # read and written by the scheduler thread only

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every delta of every choice until the last one finishes; a failure is raised here."""
        remaining = len(self.requests)
        while remaining:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
            yield item


class Scheduler:
    def __init__(
        self,
        name: str,
        model: Model,
        *,
        max_batch: int,
        max_queue: int,
        max_len: int,
        prefill_chunk: int = 256,
        prompt_lookup: int = 0,
        prefix_cache: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        """prompt_lookup: draft tokens checked per step while a single sequence decodes
        (attendo.generation.lookup); 0: plain decoding. prefix_cache: a new sequence takes the
        free cache slot whose kept tokens begin its prompt for longest and prefills only the rest
        (Batch's reuse_prefixes): chat requests share their template and system prompt, and a
        conversation's next turn repeats the whole of the last one."""
        self.name = name
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.prompt_lookup = prompt_lookup
        self.prefix_cache = prefix_cache
        self.metrics = metrics
        self.batch = self._new_batch()
        self._lock = threading.Condition()
        self._inbox: list[Ticket] = []  # submitted, not yet added to the batch
        self._cancelled: list[Ticket] = []
        self._jobs: list[tuple[Callable[[], Any], Future]] = []
        self._active = 0  # sequences submitted and not finished: running or waiting for a slot
        self._tickets: dict[int, Ticket] = {}  # ticket id -> ticket, for tickets in the batch
        self._owner: dict[int, tuple[Ticket, int]] = {}  # id(sequence) -> (ticket, index)
        self._accepting = True
        self._end_at: float | None = None  # when draining: end whatever still runs at this time
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"attendo-scheduler-{name}", daemon=True)

    def _new_batch(self) -> Batch:
        m = self.model
        if self.prompt_lookup:
            return LookupBatch(
                m.network, m.tokenizer, m.eos_token_ids, self.max_batch, self.max_len, self.prefill_chunk,
                draft_tokens=self.prompt_lookup, reuse_prefixes=self.prefix_cache,
            )  # fmt: skip
        return Batch(
            m.network, m.tokenizer, m.eos_token_ids, self.max_batch, self.max_len, self.prefill_chunk,
            reuse_prefixes=self.prefix_cache,
        )  # fmt: skip

    # --- called from any thread ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def warm_up(self) -> None:
        """One short generation through the batch before the first request (call before start):
        the first forward pays for what is made on first use (the kernels' thread team, scratch
        memory, a compiled step's compilation), which a client's first request should not."""
        first = self.model.config.bos_token_id or 0
        self.batch.add(Request([first], SamplingSettings(), 2))
        while self.batch.busy:
            self.batch.step()

    @property
    def waiting(self) -> int:
        """Sequences that have no cache slot yet."""
        return max(0, self._active - self.max_batch)

    @property
    def running(self) -> int:
        return min(self._active, self.max_batch)

    def submit(self, requests: list[Request], loop: asyncio.AbstractEventLoop) -> Ticket:
        ticket = Ticket(requests, loop)
        with self._lock:
            if not self._accepting:
                raise ShuttingDown(f"{self.name} is shutting down")
            if self._active + len(requests) > self.max_batch + self.max_queue:
                raise QueueFull(f"{self.waiting} sequences are waiting (limit {self.max_queue})")
            self._active += len(requests)
            self._inbox.append(ticket)
            self._lock.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a ticket's generation before the next step (no-op once it has finished)."""
        with self._lock:
            if ticket.cancelled:
                return
            ticket.cancelled = True
            self._cancelled.append(ticket)
            self._lock.notify()

    def call(self, job: Callable[[], Any]) -> Future:
        """Run job() on the scheduler thread before its next step; the future gets its result
        or exception."""
        future: Future = Future()
        with self._lock:
            if not self._accepting:
                raise ShuttingDown(f"{self.name} is shutting down")
            self._jobs.append((job, future))
            self._lock.notify()
        return future

    def drain(self, grace: float) -> None:
        """Take no new requests; let the running ones finish for `grace` seconds, then end them
        (finish_reason "length": cut short by a limit, the server's)."""
        with self._lock:
            self._accepting = False
            self._end_at = time.monotonic() + grace
            self._lock.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._accepting = False
            self._stopped = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the scheduler thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._cancelled or self._jobs or self.batch.busy or self._stopped):
                    self._lock.wait()
                inbox, self._inbox = self._inbox, []
                cancelled, self._cancelled = self._cancelled, []
                jobs, self._jobs = self._jobs, []
                stopped, end_at = self._stopped, self._end_at
            for job, future in jobs:
                _run_job(job, future, stopped)
            try:
                for ticket in cancelled:
                    self._drop(ticket)
                for ticket in inbox:
                    self._admit(ticket)
                if stopped or (end_at is not None and time.monotonic() >= end_at):
                    self._end_all()
                    if stopped:
                        return
                if self.batch.busy:
                    self._step()
            except Exception as e:  # a bug, not a client mistake: fail what is in flight, start afresh
                log.exception("scheduler %s failed", self.name)
                self._reset(e)

    def _reset(self, error: Exception) -> None:
        for ticket in list(self._tickets.values()):
            self._fail(ticket, error)
        self.batch = self._new_batch()

    def _admit(self, ticket: Ticket) -> None:
        if ticket.cancelled:
            self._release(len(ticket.requests))
            return
        self._tickets[ticket.id] = ticket
        for index, request in enumerate(ticket.requests):
            try:
                sequence = self.batch.add(request)
            except Exception as e:  # the handler checked every request; this is a safety net
                self._fail(ticket, e)
                return
            ticket.sequences.append(sequence)
            self._owner[id(sequence)] = (ticket, index)

    def _step(self) -> None:
        started = time.monotonic()
        events = self.batch.step()
        if self.metrics is not None:
            self.metrics.step(self.name, time.monotonic() - started, len(events))
        self._send_all([delivery for event in events if (delivery := self._deliver(event)) is not None])

    def _deliver(self, event: Event) -> tuple[Ticket, Delta] | None:
        owner = self._owner.get(id(event.sequence))
        if owner is None:
            return None
        ticket, index = owner
        sequence = event.sequence
        delta = Delta(index, event.token_id, event.text, event.logprob, sequence.finish_reason if event.finished else None)
        if ticket.first_token_at is None:
            ticket.first_token_at = time.monotonic()
            if self.metrics is not None:
                self.metrics.first_token(self.name, ticket.first_token_at - ticket.submitted)
        if event.finished:
            self._finish_sequence(ticket, sequence)
        return ticket, delta

    def _finish_sequence(self, ticket: Ticket, sequence: Sequence) -> None:
        del self._owner[id(sequence)]
        ticket.unfinished -= 1
        self._release(1)
        if ticket.unfinished == 0:
            self._tickets.pop(ticket.id, None)

    def _drop(self, ticket: Ticket) -> None:
        """A cancelled ticket: free the slots of its unfinished sequences."""
        if ticket.id not in self._tickets:
            return  # finished already, or still in the inbox (then _admit releases it)
        for sequence in ticket.sequences:
            if id(sequence) in self._owner:
                self.batch.cancel(sequence)
                self._finish_sequence(ticket, sequence)

    def _end_all(self) -> None:
        for ticket in list(self._tickets.values()):
            for index, sequence in enumerate(ticket.sequences):
                if id(sequence) in self._owner:
                    self.batch.cancel(sequence)
                    self._finish_sequence(ticket, sequence)
                    self._send(ticket, Delta(index, -1, sequence.stream.flush(), None, "length"))

    def _fail(self, ticket: Ticket, error: Exception) -> None:
        for sequence in ticket.sequences:
            if id(sequence) in self._owner:
                self.batch.cancel(sequence)
                self._finish_sequence(ticket, sequence)
        self._release(len(ticket.requests) - len(ticket.sequences))
        self._tickets.pop(ticket.id, None)
        self._send(ticket, error)

    def _release(self, count: int) -> None:
        with self._lock:
            self._active -= count

    def _send(self, ticket: Ticket, item: Delta | BaseException) -> None:
        self._send_all([(ticket, item)])

    def _send_all(self, deliveries: list[tuple[Ticket, Delta | BaseException]]) -> None:
        """Hand the items to their tickets' queues, in order, with one wake-up of each event loop
        (a step's deltas for 16 streams: one call instead of 16, each of which writes to the
        loop's self-pipe and costs the loop a read)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Delta | BaseException]]] = {}
        for ticket, item in deliveries:
            by_loop.setdefault(ticket.loop, []).append((ticket.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass


def _put_all(items: list[tuple[asyncio.Queue, Delta | BaseException]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _run_job(job: Callable[[], Any], future: Future, stopped: bool) -> None:
    if not future.set_running_or_notify_cancel():
        return
    if stopped:
        future.set_exception(ShuttingDown("the scheduler has stopped"))
        return
    try:
        future.set_result(job())
    except Exception as e:  # the caller gets the failure; the scheduler carries on
        future.set_exception(e)
