"""The batching generation engine: one worker thread decodes a token for every active request at once.

Continuous batching over llmcore's ``SlotKVCache``: between two decoding steps, waiting requests
are prefilled into free rows (up to ``max_batch``) and finished ones leave, so a new request
never waits for a whole batch to end. A request ends at <|endoftext|>, a stop string, its
``max_tokens`` or the context, or when it is cancelled (its client went away). Beyond
``max_batch`` running, requests wait in a queue of ``max_queue``; past that ``submit`` refuses
(the server answers 429) instead of queueing without limit. Events go back to each request's
asyncio queue through ``call_soon_threadsafe``, so the event loop never waits on torch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmcore.generate import SlotKVCache, sample_next_token
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

    def emit(self, event: Event) -> None:
        if event.finish_reason or event.error:
            self.done = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening
            self.cancelled = True

    async def stream(self) -> AsyncIterator[Event]:
        """Events up to the last one; a consumer that stops early (client gone) cancels the request."""
        try:
            while True:
                event = await self.events.get()
                yield event
                if event.finish_reason or event.error:
                    return
        finally:
            self.cancelled = True


class Engine:
    """Continuous batching for one generator model; ``start`` its worker, ``close`` at shutdown."""

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 eos_id: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        # GPT-2's <|endoftext|> unless told, or unless the tokenizer names its own (a Hugging Face base's).
        eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        self.model, self.tokenizer, self.eos_id = model.eval(), tokenizer, eot_id(tokenizer) if eos_id is None else eos_id
        self.context = model.cfg.context_length
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache = SlotKVCache(model, max_batch)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.active: list[Request] = []  # row i of the cache holds active[i]
        self.counts: Counter[str] = Counter()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> Request:
        """Queue a generation (from the event loop's thread); EngineBusy when the queue is full."""
        if not prompt_ids:
            raise ValueError("the prompt needs at least one token")
        if len(prompt_ids) + params.max_tokens > self.context:
            raise PromptTooLong(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                                f"exceed the context of {self.context} tokens")
        if len(self.active) + self.waiting.qsize() >= self.max_batch + self.max_queue:
            raise EngineBusy(f"{self.max_batch} requests are running and {self.max_queue} waiting: retry later")
        request = Request(prompt_ids, params, self.tokenizer, asyncio.get_running_loop())
        self.waiting.put(request)
        return request

    def stats(self) -> dict[str, int]:
        return {"active": len(self.active), "waiting": self.waiting.qsize(), "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                **{k: self.counts[k] for k in ("finished", "cancelled", "tokens", "peak_batch")}}

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                self._admit()
                self._retire()  # answers finished by their first token
                if self.active:
                    self._step()
            except Exception as exc:  # a bug: fail what is in flight, log it, keep serving
                log.exception("generation step failed")
                for request in self.active:
                    request.emit(Event("", error=f"generation failed: {exc}"))
                self.active.clear()

    def _admit(self) -> None:
        """Prefill waiting requests into free rows; wait briefly for one when nothing runs."""
        block = not self.active
        while len(self.active) < self.max_batch:
            try:
                request = self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if request.cancelled:
                self.counts["cancelled"] += 1
                continue
            self.active.append(request)  # first, so that a failing prefill is reported to it
            logits = self.cache.prefill(self.model, len(self.active) - 1, request.prompt_ids)
            request.length = len(request.prompt_ids)
            self.counts["peak_batch"] = max(self.counts["peak_batch"], len(self.active))
            self._advance(request, self._sample(request, logits[None]))

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
        return int(sample_next_token(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                     generator=request.generator)[0])

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
