"""The engine: one loaded model serving many requests with continuous batching.

Each `step()` of the scheduler:

1. drops cancelled rows (their KV-cache rows are free at once);
2. admits waiting requests into free rows: their media are encoded together (one encoder call per
   modality across all admitted requests), blended with the cache, bound, and turned into per-layer
   injections; their prompts are prefilled into the free KV-cache rows while the running rows keep
   their cache;
3. runs one decode step for every running row, each at its own position, samples each row with its own
   options, streams the new text, and removes finished rows at once.

Rows stay packed in KV-cache rows ``0..n-1``: a finished row's slot is filled by moving the last row
into it, so prefill and decode always address a contiguous slice of the cache.

Without a background thread (``Engine(..., background=False)``) nothing runs until a handle is waited
on (or `step` / `run_until_idle` is called), which makes scheduling deterministic for tests.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from imagebind_llm.cache.blend import BlendOptions, FeatureRetriever
from imagebind_llm.engine.request import Request
from imagebind_llm.engine.scoring import Score, loglikelihood, text_pairs
from imagebind_llm.llm.constrain import ConstraintState, as_constraint
from imagebind_llm.llm.generate import Completion, RowText, apply_repetition_penalty, pad_right, sample
from imagebind_llm.llm.templates import choose_template
from imagebind_llm.model.imagebind_llm import ImageBindLLM
from imagebind_llm.model.media import MediaInputs

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 2048


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; the request was not accepted."""


class EngineStopped(RuntimeError):
    """The engine was stopped before the request finished."""


class Handle:
    """A submitted request: stream its text with `stream()`, wait for `result()`, or `cancel()` it."""

    def __init__(self, engine: "Engine", request: Request) -> None:
        self.engine, self.request = engine, request
        self._pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._done = threading.Event()
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._listeners: list[Callable[[], None]] = []  # called (on the engine's thread) after each piece

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; the row is freed at the next scheduler step and the result ends as ``"cancelled"``."""
        self.cancelled = True
        self.engine._wake()

    def stream(self) -> Iterator[str]:
        """Text pieces as they are generated; they concatenate to ``result().text``."""
        while True:
            piece = self._next_piece()
            if piece is None:
                break
            yield piece
        self.result()  # raise the request's error, if any

    async def astream(self) -> AsyncIterator[str]:
        """`stream` for asyncio code (a server): waits without holding a thread; needs a background engine."""
        if not self.engine.background:
            raise RuntimeError("astream needs an engine running in the background (Engine(background=True))")
        loop, ready = asyncio.get_running_loop(), asyncio.Event()
        self._listeners.append(lambda: loop.call_soon_threadsafe(ready.set))
        while True:
            try:
                piece = self._pieces.get_nowait()
            except queue.Empty:
                await ready.wait()
                ready.clear()
                continue
            if piece is None:
                break
            yield piece
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> Completion:
        """The completion, once finished (drives the scheduler when the engine has no thread)."""
        while not self._done.is_set():
            if self.engine.background:
                if not self._done.wait(timeout):
                    raise TimeoutError(f"request not finished after {timeout} s")
            else:
                self.engine.step()
        if self.error is not None:
            raise self.error
        return self.completion

    def _next_piece(self) -> str | None:
        while True:
            try:
                return self._pieces.get(block=self.engine.background, timeout=0.1 if self.engine.background else None)
            except queue.Empty:
                if not self.engine.background:
                    self.engine.step()

    def _emit(self, piece: str) -> None:
        if piece:
            self._pieces.put(piece)
            self._notify()

    def _finish(self, completion: Completion | None, error: BaseException | None = None) -> None:
        self.completion, self.error = completion, error
        self._pieces.put(None)
        self._done.set()
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()


@dataclass
class _Row:
    """A running request: its handle, position in the KV cache, and per-row sampling state."""

    handle: Handle
    text: RowText
    pos: int  # tokens in the cache
    max_new: int
    has_media: bool
    generator: torch.Generator | None
    seen: torch.Tensor | None  # [V] bool, for the repetition penalty
    generated: int = 0
    last: int = 0  # the token to feed next
    suppress: list[int] = field(default_factory=list)
    constraint: ConstraintState | None = None  # the grammar state of a constrained row


class Engine:
    """One loaded model serving requests with continuous batching.

    Args:
        model: the model (the engine owns its KV cache from now on).
        cache: the retrieval cache (`FeatureCache`, `ExactBank`, ...) or None.
        max_batch: rows decoded together (KV-cache rows).
        max_queue: requests accepted beyond the free rows before `submit` refuses.
        max_context: KV-cache slots per row (prompt + answer); default ``min(max_seq_len, 2048)``.
        template: prompt template name (`imagebind_llm.llm.templates.choose_template`); None: the model's own
            chat template, else Alpaca (ImageBind-LLM's format).
        background: run the scheduler in a daemon thread; False: it runs when handles are waited on.
        admit_group: while rows are running, waiting requests are held until this many rows are free (or as
            many as are waiting), so that several share one prefill pass: on a CPU a prefill costs the
            running rows ~2.5 decode steps, whatever the number of prompts in it.
        admit_wait: the most decode steps a request is held back for that.
    """

    def __init__(self, model: ImageBindLLM, *, cache: FeatureRetriever | None = None, max_batch: int = 8,
                 max_queue: int = 64, max_context: int | None = None, template: str | None = None,
                 background: bool = True, admit_group: int = 4, admit_wait: int = 32) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} >= 0")
        self.model, self.cache = model.eval(), cache
        self.tokenizer = model.tokenizer
        self.template = choose_template(template, self.tokenizer)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context = min(max_context or DEFAULT_MAX_CONTEXT, model.llm.config.max_seq_len)
        self.background = background
        self.admit_group, self.admit_wait = admit_group, admit_wait
        self._held = 0  # decode steps the waiting requests have been held back
        self.device = model.llm.norm.weight.device
        self.lock = threading.RLock()  # one thread at a time runs the model
        self._waiting: collections.deque[Handle] = collections.deque()
        self._rows: list[_Row] = []
        self._inject: list[torch.Tensor | None] | None = None  # per layer [max_batch, 1, H, hd]
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.steps = 0

    # ---------------------------------------------------------------- the public surface
    def submit(self, request: Request) -> Handle:
        """Queue ``request``; returns its `Handle` at once.

        Raises:
            QueueFullError: ``max_queue`` requests are already waiting.
            EngineStopped: the engine was stopped.
        """
        if self._stopped:
            raise EngineStopped("the engine is stopped; create a new one")
        handle = Handle(self, request)
        with self._wakeup:
            if len(self._waiting) >= self.max_queue + self.max_batch - len(self._rows):  # free rows take some
                raise QueueFullError(f"the engine's queue is full ({len(self._waiting)} waiting requests); retry "
                                     "later or raise max_queue")
            self._waiting.append(handle)
            self._wakeup.notify()
        if self.background and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="imagebind-llm-engine", daemon=True)
            self._thread.start()
        return handle

    def generate(self, request: Request) -> Completion:
        """Submit and wait: the completion of one request."""
        return self.submit(request).result()

    @property
    def running(self) -> int:
        """Rows being decoded now."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests queued for a free row."""
        return len(self._waiting)

    def loglikelihood(self, requests: Sequence[Request], continuations: Sequence[str]) -> list[Score]:
        """How likely each continuation is as the answer to its request (prompt and media as `submit`
        would use them, the cache blend included); see `imagebind_llm.engine.scoring`."""
        if len(requests) != len(continuations):
            raise ValueError(f"{len(requests)} requests but {len(continuations)} continuations")
        with self.lock:
            prompts = [self.template.render(r.text_messages()) for r in requests]
            bos = self.tokenizer.add_bos and not self.template.writes_bos
            pairs = text_pairs(lambda t: self.tokenizer.encode(t, bos=bos), prompts, continuations)
            media = [r.media() for r in requests]
            groups = _group_by_blend([r.blend for r in requests])
            scores: list[Score | None] = [None] * len(requests)
            for options, members in groups.items():
                retrieve = None if self.cache is None else functools.partial(self.cache.blend, options=options)
                for i, score in zip(members, loglikelihood(self.model, [pairs[i] for i in members],
                                                           [media[i] for i in members], retrieve)):
                    scores[i] = score
            return scores

    def run_forever(self) -> None:
        """Run the scheduler in the calling thread until `stop()`: a server loads the model and serves it from
        one thread (on a CPU, OpenMP runs ~1.5x slower in a thread other than the one that loaded the model)."""
        if not self.background:
            raise RuntimeError("run_forever is for background engines; this one runs when handles are waited on")
        if self._thread is not None:
            raise RuntimeError("the engine's scheduler is already running in another thread")
        self._thread = threading.current_thread()
        self._loop()

    def run_until_idle(self) -> None:
        """Step until no request is waiting or running (for engines without a thread)."""
        while self.step():
            pass

    def stop(self) -> None:
        """Finish nothing more: running and waiting requests end with `EngineStopped`."""
        self._stopped = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self.lock:
            for handle in [*(r.handle for r in self._rows), *self._waiting]:
                if not handle.done:
                    handle._finish(None, EngineStopped("the engine was stopped"))
            self._rows, self._waiting = [], collections.deque()

    # ---------------------------------------------------------------- the scheduler
    def step(self) -> bool:
        """One scheduler iteration (drop cancelled, admit, decode); returns whether work remains."""
        with self.lock, torch.inference_mode():
            try:
                self._drop_cancelled()
                self._admit()
                if self._rows:
                    self._decode()
            except Exception as e:  # the running requests end with the error; the engine keeps serving
                log.exception("engine step failed; failing the %d running requests", len(self._rows))
                for row in self._rows:
                    if not row.handle.done:
                        row.handle._finish(None, e)
                self._rows = []
            self.steps += 1
            return bool(self._rows or self._waiting)

    def _loop(self) -> None:
        while not self._stopped:
            with self._wakeup:
                while not self._stopped and not (self._rows or self._waiting):
                    self._wakeup.wait()
            if not self._stopped:
                self.step()

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    def _drop_cancelled(self) -> None:
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
            handle._finish(Completion(text="" if self.tokenizer else None, finish_reason="cancelled"))
        for i in reversed(range(len(self._rows))):
            if self._rows[i].handle.cancelled:
                self._rows[i].text.result.finish_reason = "cancelled"
                self._retire(i)

    def _should_admit(self) -> bool:
        free = self.max_batch - len(self._rows)
        if not self._waiting or free == 0:
            return False
        group = min(self.admit_group, len(self._waiting), self.max_batch)
        if self._rows and free < group and self._held < self.admit_wait:
            self._held += 1
            return False
        self._held = 0
        return True

    def _admit(self) -> None:
        """Move waiting requests into free rows: encode their media together, prefill their prompts."""
        if not self._should_admit():
            return
        free = self.max_batch - len(self._rows)
        taken: list[tuple[Handle, list[int], MediaInputs | torch.Tensor | None, _Row]] = []
        while free > len(taken) and self._waiting:
            with self._wakeup:
                handle = self._waiting.popleft()
            try:
                ids, media = self.prompt_ids(handle.request), self._media_of(handle.request)
                taken.append((handle, ids, media, self._new_row(handle, ids, media is not None)))
            except Exception as e:  # a bad request fails alone, never the batch
                handle._finish(None, e)
        if not taken:
            return
        start = len(self._rows)
        self._rows += [row for *_, row in taken]  # rows first: if encoding fails, `step` fails exactly these requests
        self.model.llm.setup_caches(self.max_batch, self.max_context)  # a no-op while the cache is ours
        self._write_injections(start, [h.request for h, *_ in taken], [m for _, _, m, _ in taken])
        self._prefill(start, [ids for _, ids, *_ in taken])

    def encode(self, request: Request) -> torch.Tensor | None:
        """The mixed ImageBind feature ``[1, feature_dim]`` of ``request``'s media (None without media), to
        reuse as ``Request(features=...)``."""
        media = self._media_of(request)
        if media is None or torch.is_tensor(media):
            return media
        with self.lock, torch.inference_mode():
            return self.model.mix_requests([media])[0]

    def _media_of(self, request: Request) -> MediaInputs | torch.Tensor | None:
        """The request's precomputed features, or its loaded media, or None."""
        if request.features is not None:
            if tuple(request.features.shape) != (1, self.model.config.feature_dim):
                raise ValueError(f"request features must be [1, {self.model.config.feature_dim}], "
                                 f"got {list(request.features.shape)}")
            return request.features
        media = request.media(self.model.bind.proj.weight.dtype)
        if media is not None and self.model.encoder is None:
            raise ValueError("this model has no ImageBind encoder, so it cannot take media; build it with one "
                             "(ModelSpec(imagebind=...))")
        return media

    def prompt_ids(self, request: Request) -> list[int]:
        """The prompt's token ids (``request.prompt_ids`` or the rendered template).

        Raises:
            ValueError: the prompt is empty or does not fit the context (a caller may check before `submit`).
        """
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
        else:
            prompt = self.template.render(request.text_messages())
            ids = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos and not self.template.writes_bos)
        if not ids:
            raise ValueError("the prompt is empty; send at least one message")
        if len(ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(ids)} tokens but the engine's context holds {self.max_context}; "
                             "shorten the conversation or raise max_context")
        return ids

    def _new_row(self, handle: Handle, ids: list[int], has_media: bool) -> _Row:
        options = handle.request.sampling
        stop_ids = set(options.stop_token_ids if options.stop_token_ids is not None else self.tokenizer.stop_ids)
        stop_strings = options.stop_strings or getattr(self.template, "stop_strings", ())
        constraint = as_constraint(handle.request.constraint)
        state = None
        if constraint is not None:  # the grammar decides the end: no stop strings, no suppressed stop tokens
            state = constraint.start(self.tokenizer, self.model.llm.config.vocab_size)
            stop_ids |= set(self.tokenizer.stop_ids)
            stop_strings = ()
        seen = None
        if options.repetition_penalty != 1.0:
            seen = torch.zeros(self.model.llm.config.vocab_size, dtype=torch.bool, device=self.device)
            seen[torch.tensor(ids, device=self.device)] = True
        return _Row(handle=handle, text=RowText(self.tokenizer, stop_ids, [s for s in stop_strings if s]),
                    pos=len(ids), max_new=min(options.max_new_tokens, self.max_context - len(ids)),
                    has_media=has_media, generator=options.generator(self.device), seen=seen,
                    suppress=[] if state is not None else sorted(stop_ids), constraint=state)

    def _write_injections(self, start: int, requests: Sequence[Request],
                          media: Sequence[MediaInputs | torch.Tensor | None]) -> None:
        """Encode the admitted requests' media at once and store their injections in rows ``start..``."""
        if not any(m is not None for m in media):
            if self._inject is not None:
                for term in self._inject:
                    if term is not None:
                        term[start:start + len(media)] = 0
            return
        mixed = self._mixed_features(media)
        rows = [i for i, m in enumerate(media) if m is not None]
        bound = torch.empty(len(rows), 1, self.model.llm.config.dim, device=self.device,
                            dtype=self.model.bind.proj.weight.dtype)
        for options, members in _group_by_blend([requests[i].blend for i in rows]).items():
            retrieve = None if self.cache is None else functools.partial(self.cache.blend, options=options)
            bound[members] = self.model.encode_features(mixed[members], retrieve)
        terms = self.model.injections(bound)
        if self._inject is None:
            self._inject = [None if t is None else t.new_zeros(self.max_batch, *t.shape[1:]) for t in terms]
        slots = [start + i for i in rows]
        for buffer, term in zip(self._inject, terms):
            if buffer is not None:
                buffer[start:start + len(media)] = 0
                buffer[slots] = term

    def _mixed_features(self, media: Sequence[MediaInputs | torch.Tensor | None]) -> torch.Tensor:
        """``[M, feature_dim]`` for the ``M`` rows with media: one encoder call per modality for the rows
        that need encoding, precomputed features as they are."""
        to_encode = [m if isinstance(m, Mapping) else None for m in media]
        encoded, encoded_rows = self.model.mix_requests(to_encode) if any(to_encode) else (None, [])
        parts = {i: encoded[j:j + 1] for j, i in enumerate(encoded_rows)}
        parts.update({i: m.float() for i, m in enumerate(media) if torch.is_tensor(m)})
        return torch.cat([parts[i].to(self.device) for i in sorted(parts)])

    def _injections(self, rows: slice) -> list[torch.Tensor | None] | None:
        if self._inject is None or not any(r.has_media for r in self._rows[rows]):
            return None  # exactly the plain LLM, and cheaper
        return [None if t is None else t[rows] for t in self._inject]

    def _prefill(self, start: int, prompts: list[list[int]]) -> None:
        tokens, lengths = pad_right(prompts, self.device)
        rows = slice(start, start + len(prompts))
        positions = torch.arange(tokens.shape[1], device=self.device)
        logits = self.model.llm(tokens, positions, injections=self._injections(rows), logits_index=lengths - 1,
                                cache_rows=rows, kv_len=tokens.shape[1])[:, 0]
        self._sample_and_emit(start, logits)

    def _decode(self) -> None:
        n = len(self._rows)
        tokens = torch.tensor([[r.last] for r in self._rows], device=self.device)
        positions = torch.tensor([[r.pos] for r in self._rows], device=self.device)
        kv_len = max(r.pos for r in self._rows) + 1
        logits = self.model.llm(tokens, positions, injections=self._injections(slice(0, n)),
                                cache_rows=slice(0, n), kv_len=kv_len)[:, 0]
        for r in self._rows:
            r.pos += 1
        self._sample_and_emit(0, logits)

    def _sample_and_emit(self, start: int, logits: torch.Tensor) -> None:
        """Sample one token for rows ``start..start+len(logits)``, stream it, retire finished rows."""
        finished = []
        for j in range(logits.shape[0]):
            row = self._rows[start + j]
            token = self._sample(row, logits[j:j + 1])
            row.generated += 1
            row.last = token
            if row.seen is not None:
                row.seen[token] = True
            row.handle._emit(row.text.push(token))
            if row.text.done or row.generated >= row.max_new:
                finished.append(start + j)
        for i in reversed(finished):
            self._retire(i)

    def _sample(self, row: _Row, logits: torch.Tensor) -> int:
        options = row.handle.request.sampling
        if row.seen is not None:
            logits = apply_repetition_penalty(logits, row.seen[None], options.repetition_penalty)
        if row.generated < options.min_new_tokens and row.suppress:
            logits = logits.index_fill(-1, torch.tensor(row.suppress, device=self.device), float("-inf"))
        mask = None if row.constraint is None else row.constraint.mask(self.device)[None]
        token = int(sample(logits, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                           generator=row.generator, mask=mask)[0])
        if row.constraint is not None and token not in row.text.stop_ids:
            row.constraint.advance(token)
            if row.constraint.done:  # the grammar is complete: this token is the row's last
                row.text.done, row.text.result.finish_reason = True, "stop"
        return token

    def _retire(self, i: int) -> None:
        """Finish row ``i`` and keep the rows packed: the last row moves into its slot."""
        row = self._rows[i]
        row.handle._emit(row.text.flush())
        row.handle._finish(row.text.result)
        last = len(self._rows) - 1
        if i != last:
            self.model.llm.copy_cache_row(last, i)
            for term in self._inject or []:
                if term is not None:
                    term[i] = term[last]
            self._rows[i] = self._rows[last]
        self._rows.pop()


def _group_by_blend(options: Sequence[BlendOptions]) -> dict[BlendOptions, list[int]]:
    groups: dict[BlendOptions, list[int]] = {}
    for i, o in enumerate(options):
        groups.setdefault(o, []).append(i)
    return groups
