"""The batching generation engine: one worker thread decodes a token for every active request at once.

Continuous batching over llmcore's ``SlotKVCache``: between two decoding steps, waiting requests
are prefilled into free rows (up to ``max_batch``) and finished ones leave, so a new request
never waits for a whole batch to end. A request ends at <|endoftext|>, a stop string, its
``max_tokens`` or the context, or when it is cancelled (its client went away). Beyond
``max_batch`` running, requests wait in a queue of ``max_queue``; past that ``submit`` refuses
(the server answers 429) instead of queueing without limit. Events go back to each request's
asyncio queue, so the event loop never waits on torch.

Per-token overhead is kept off the decoding path: the prompts that arrive together are prefilled
in one forward; the events of a step are handed to the event loop in one ``call_soon_threadsafe``
(not one per request), at most every ``stream_interval`` seconds (a request's first and last
pieces go at once), and a stream that falls behind takes all its pending text as one event, so
the event loop and the clients handle a few pieces per interval instead of one per token.

All of the server's torch work runs on the engine's thread: other model calls (classification)
are queued with ``call`` and run between two decoding steps. With GNU OpenMP every thread that
runs a parallel torch op keeps its own pool of worker threads; once the pools together hold more
threads than there are cores, libgomp stops spinning between parallel regions and puts its
workers to sleep after each one, and a decoding step of small matrices, dozens of regions long,
took 2-2.5x as long (measured on 2 cores, int8 cpu-small at batch 1). So there is one such
thread (``threads`` sets its torch threads), and ``serving.__main__`` leaves the main thread
(loading, the event loop) one torch thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmcore.generate import sample_next_token
from llmcore.slot_cache import SlotKVCache
from llmcore.tokenizer import eot_id
from serving.text import TextStream

log = logging.getLogger(__name__)


class EngineBusy(Exception):
    """Every row is running and the queue is full: the client should retry later."""


class PromptTooLong(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Event:
    """New answer text; the last event of a request has ``finish_reason`` ("stop", "length") or ``error``."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


class Request:
    """One generation in the engine; ``stream()`` yields its events to the event loop."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, tokenizer, loop: asyncio.AbstractEventLoop):
        self.prompt_ids, self.params, self.loop = list(prompt_ids), params, loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.text = TextStream(tokenizer, params.stop)
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        self.cancelled = self.done = False
        self.length = 0  # tokens in the cache
        self.tokens = 0  # tokens generated (<|endoftext|> not counted)
        self.last = 0  # the newest token, fed at the next step
        self.outbox: list[Event] = []  # events not yet handed to the event loop
        self.streaming = False  # its first event has been handed over

    def emit(self, event: Event) -> None:
        """Queue ``event`` for the event loop (engine thread); ``Engine._flush`` sends it."""
        if event.finish_reason or event.error:
            self.done = True
        self.outbox.append(event)

    async def stream(self) -> AsyncIterator[Event]:
        """Events up to the last one; a consumer that stops early (client gone) cancels the request.

        Events already waiting when the consumer asks come out merged, as one event."""
        try:
            while True:
                event = await self.events.get()
                while not (event.finish_reason or event.error) and not self.events.empty():
                    event = merged(event, self.events.get_nowait())
                yield event
                if event.finish_reason or event.error:
                    return
        finally:
            self.cancelled = True


def merged(first: Event, then: Event) -> Event:
    """One event with the text of both; the later one's ending."""
    return Event(first.text + then.text, then.finish_reason, then.completion_tokens, then.error)


def _deliver(batch: list[tuple[Request, list[Event]]]) -> None:
    """On the event loop: put a step's events into their requests' queues."""
    for request, events in batch:
        event = events[0]
        for later in events[1:]:
            event = merged(event, later)
        request.events.put_nowait(event)


class Engine:
    """Continuous batching for one generator model; ``start`` its worker, ``close`` at shutdown."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        eos_id: int | None = None,
        stream_interval: float = 0.0,
        threads: int | None = None,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        # GPT-2's <|endoftext|> unless told, or unless the tokenizer names its own (a Hugging Face base's).
        eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        self.model, self.tokenizer, self.eos_id = (
            model.eval(),
            tokenizer,
            eot_id(tokenizer) if eos_id is None else eos_id,
        )
        self.context = model.cfg.context_length
        self.max_batch, self.max_queue, self.stream_interval = max_batch, max_queue, stream_interval
        self.threads = threads  # torch threads of the engine's thread (None: torch's setting)
        self._flushed = 0.0  # time.monotonic() of the last hand-over
        self.cache = SlotKVCache(model, max_batch)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.jobs: queue.SimpleQueue[tuple[concurrent.futures.Future, Callable, tuple]] = queue.SimpleQueue()
        self._wake = threading.Event()  # set by submit and call: something is waiting
        self.active: list[Request] = []  # row i of the cache holds active[i]
        self.counts: Counter[str] = Counter()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        while not self.jobs.empty():
            self.jobs.get_nowait()[0].cancel()

    def call(self, fn: Callable, *args) -> asyncio.Future:
        """Run ``fn(*args)`` on the engine's thread between two decoding steps (from the event loop);
        await the result. Raises RuntimeError once the engine is closed."""
        if self._closing.is_set():
            raise RuntimeError("the engine is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((future, fn, args))
        self._wake.set()
        return asyncio.wrap_future(future)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> Request:
        """Queue a generation (from the event loop's thread); EngineBusy when the queue is full."""
        if not prompt_ids:
            raise ValueError("the prompt needs at least one token")
        if len(prompt_ids) + params.max_tokens > self.context:
            raise PromptTooLong(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                f"exceed the context of {self.context} tokens"
            )
        if len(self.active) + self.waiting.qsize() >= self.max_batch + self.max_queue:
            raise EngineBusy(f"{self.max_batch} requests are running and {self.max_queue} waiting: retry later")
        request = Request(prompt_ids, params, self.tokenizer, asyncio.get_running_loop())
        self.waiting.put(request)
        self._wake.set()
        return request

    def stats(self) -> dict[str, int]:
        return {
            "active": len(self.active),
            "waiting": self.waiting.qsize(),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            **{k: self.counts[k] for k in ("finished", "cancelled", "tokens", "peak_batch")},
        }

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while not self._closing.is_set():
            try:
                self._run_jobs()
                self._admit()
                self._retire()  # first tokens out; answers finished by their first token
                if self.active:
                    self._step()
            except Exception as exc:  # a bug: fail what is in flight, log it, keep serving
                log.exception("generation step failed")
                for request in self.active:
                    request.outbox.clear()
                    request.emit(Event("", error=f"generation failed: {exc}"))
                self._flush()
                self.active.clear()

    def _flush(self) -> None:
        """Hand every queued event to its event loop, one ``call_soon_threadsafe`` per loop; wait for
        ``stream_interval`` since the last time unless some request ends or has its first piece."""
        now = time.monotonic()
        if now - self._flushed < self.stream_interval and not any(
            r.outbox and (r.done or not r.streaming) for r in self.active
        ):
            return
        self._flushed = now
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Request, list[Event]]]] = {}
        for request in self.active:
            if request.outbox:
                batches.setdefault(request.loop, []).append((request, request.outbox))
                request.outbox, request.streaming = [], True
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the event loop is closed: nobody is listening
                for request, _ in batch:
                    request.cancelled = True

    def _run_jobs(self) -> None:
        """Run the queued ``call`` jobs; wait briefly for work when nothing is running."""
        if not self.active:
            self._wake.wait(timeout=0.05)
            self._wake.clear()  # what arrived before this is taken below; later arrivals set it again
        while not self.jobs.empty():
            future, fn, args = self.jobs.get_nowait()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except Exception as exc:  # the caller's error, raised where it awaits
                future.set_exception(exc)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, in one forward."""
        admitted = []
        while len(self.active) + len(admitted) < self.max_batch:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                break
            if request.cancelled:
                self.counts["cancelled"] += 1
                continue
            admitted.append(request)
        if not admitted:
            return
        first = len(self.active)
        self.active.extend(admitted)  # first, so that a failing prefill is reported to them
        logits = self.cache.prefill_rows(self.model, first, [r.prompt_ids for r in admitted])
        self.counts["peak_batch"] = max(self.counts["peak_batch"], len(self.active))
        for row, request in enumerate(admitted):
            request.length = len(request.prompt_ids)
            self._advance(request, self._sample(request, logits[row : row + 1]))

    def _step(self) -> None:
        lengths = torch.tensor([r.length for r in self.active])
        logits = self.cache.decode(self.model, torch.tensor([r.last for r in self.active]), lengths)
        greedy = logits.argmax(dim=-1).tolist()  # one call for every greedy row
        for row, request in enumerate(self.active):
            request.length += 1
            sampled = request.params.temperature > 0
            self._advance(request, self._sample(request, logits[row : row + 1]) if sampled else greedy[row])
        self._retire()

    @staticmethod
    def _sample(request: Request, logits: torch.Tensor) -> int:
        """A token from ``logits`` (1, vocab) with the request's settings and its own generator."""
        p = request.params
        return int(
            sample_next_token(
                logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, generator=request.generator
            )[0]
        )

    def _advance(self, request: Request, token: int) -> None:
        """Add ``token`` to ``request``'s answer and send the text it completes."""
        if token == self.eos_id:
            request.emit(Event(request.text.finish(), "stop", request.tokens))
            return
        request.tokens += 1
        request.last = token
        self.counts["tokens"] += 1
        piece = request.text.push(token)
        if request.text.stopped:
            request.emit(Event(piece, "stop", request.tokens))
        elif request.tokens >= request.params.max_tokens or request.length >= self.context:
            request.emit(Event(piece + request.text.finish(), "length", request.tokens))
        elif piece:
            request.emit(Event(piece))

    def _retire(self) -> None:
        """Drop finished and cancelled rows, moving the last active row into each gap."""
        self._flush()  # their last events first
        for row in reversed(range(len(self.active))):
            request = self.active[row]
            if not (request.done or request.cancelled):
                continue
            self.counts["cancelled" if request.cancelled and not request.done else "finished"] += 1
            last = len(self.active) - 1
            if row != last:
                self.cache.move(last, row, self.active[last].length)
                self.active[row] = self.active[last]
            self.active.pop()
