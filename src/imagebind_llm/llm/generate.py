"""Text generation around `Transformer`: prefill, one-token decode, sampling, stopping, streaming.

Plain functions in the gpt-fast style. A batch of prompts of different lengths is right-padded and run
with per-row positions (see `imagebind_llm.llm.model`), so each row gets exactly the positions it would
get alone. Sampling stays on the device (no host sync); the loop syncs once per step to read the new
tokens for stop checks and streaming.

The tokenizer is duck-typed: ``encode(text, *, bos=False, eos=False) -> list[int]``,
``decode(ids, *, skip_special=False) -> str``, ``bos_id``, ``eos_id`` (int or None) and ``vocab_size``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .model import Transformer


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str: ...


@dataclass
class Completion:
    """One row's result.

    ``tokens`` are the generated ids, without the stop token that ended the row (``finish_reason``
    ``"eos"``); with a stop string (``"stop"``) they run up to the token that completed it while
    ``text`` is cut just before the stop string. ``"length"``: ``max_new_tokens`` was reached.
    ``text`` is None when no tokenizer was given.
    """

    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = "length"


@dataclass(frozen=True)
class SamplingOptions:
    """How one answer is sampled. The defaults are ImageBind-LLM's official ones (256 new tokens,
    temperature 0.1, top-p 0.75); `GREEDY` is the deterministic choice.

    Attributes:
        max_new_tokens: answer length limit in tokens.
        temperature: 0 is greedy (argmax); otherwise logits are divided by it.
        top_p, top_k: nucleus and top-k filters (None: off).
        repetition_penalty: CTRL penalty over prompt and generated tokens (1 disables it).
        min_new_tokens: the stop tokens cannot be sampled before this many tokens.
        stop_strings: texts that end the answer (cut before them).
        stop_token_ids: ids that end the answer; None: the tokenizer's stop ids.
        seed: seed of this answer's own random generator (None: the global one).
    """

    max_new_tokens: int = 256
    temperature: float = 0.1
    top_p: float | None = 0.75
    top_k: int | None = None
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.repetition_penalty)
        if not (_is_int(self.min_new_tokens) and self.min_new_tokens >= 0):
            raise ValueError(f"min_new_tokens={self.min_new_tokens!r} must be a whole number >= 0")
        if self.seed is not None and not (_is_int(self.seed) and -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed={self.seed!r} must be a whole number in [-2**63, 2**64) or None")

    def replace(self, **changes: Any) -> "SamplingOptions":
        return dataclasses.replace(self, **changes)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A fresh generator seeded with ``seed`` (None without a seed)."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)

    def generate_kwargs(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """These options as the keyword arguments of `generate` / `stream`."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "seed"}
        return {**kwargs, "generator": self.generator(device)}


# ---------------------------------------------------------------------------------------------- sampling


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty: logits of already seen tokens are divided by ``penalty`` if positive,
    multiplied by it if negative. ``logits`` ``[B, V]`` float, ``seen`` ``[B, V]`` bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row ``[B, V]`` (ties at the k-th value are kept), the rest -inf."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose probability sums to ``>= p``."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most probable token always survives
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, mask: Tensor | None = None) -> Tensor:
    """Pick one token per row of ``logits`` ``[B, V]``; returns ``[B]`` int64.

    ``mask`` ``[B, V]`` bool (True: allowed), e.g. from a grammar (`imagebind_llm.llm.constrain`), is
    applied first: disallowed tokens get -inf before temperature, top-k and top-p, so the filters only
    see allowed tokens. Every row needs at least one allowed token.

    ``temperature == 0`` is greedy (argmax). Otherwise the logits are scaled by ``1 / temperature``,
    filtered by top-k and top-p, and sampled with the exponential-race trick (``argmax(p / Exp(1))``),
    which is a categorical draw that needs no host sync.
    """
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------- model steps


def pad_right(rows: Sequence[Sequence[int]], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Token-id rows of different lengths -> right-padded ``[B, S]`` (zeros after each row) and lengths ``[B]``."""
    lengths = torch.tensor([len(r) for r in rows], device=device)
    tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return tokens, lengths


def prefill(model: Transformer, tokens: Tensor, lengths: Tensor,
            injections: Sequence[Tensor | None] | None = None) -> Tensor:
    """Run right-padded prompts ``tokens`` ``[B, S]`` (row ``b`` valid up to ``lengths[b]``) through the
    cached model at positions ``0..S-1``; returns the logits at each row's last prompt token ``[B, V]``."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return model(tokens, positions, injections=injections, logits_index=lengths - 1)[:, 0]


def decode_one_token(model: Transformer, token: Tensor, input_pos: Tensor,
                     injections: Sequence[Tensor | None] | None = None) -> Tensor:
    """One cached step: ``token`` ``[B]`` at per-row positions ``input_pos`` ``[B]``; returns ``[B, V]``."""
    return model(token[:, None], input_pos[:, None], injections=injections)[:, 0]


@torch.inference_mode()
def generate_tokens(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    repetition_penalty: float = 1.0, min_new_tokens: int = 0, suppress_ids: Sequence[int] = (),
                    injections: Sequence[Tensor | None] | None = None, generator: torch.Generator | None = None,
                    compile: bool = False) -> Iterator[Tensor]:
    """Yield the sampled tokens ``[B]`` of each step, up to ``max_new_tokens`` steps.

    ``suppress_ids`` (normally the stop tokens) cannot be sampled during the first ``min_new_tokens``
    steps. The KV cache is (re)allocated for ``len(prompts)`` rows and ``max prompt + max_new_tokens`` slots.
    Stopping early is the caller's business: closing the iterator stops the computation.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add BOS to empty prompts)")
    device = model.norm.weight.device
    vocab = model.config.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")
    tokens, lengths = pad_right(prompts, device)
    model.setup_caches(len(prompts), tokens.shape[1] + max_new_tokens)
    step: Callable[..., Tensor] = torch.compile(decode_one_token, dynamic=False) if compile else decode_one_token
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            seen[row, torch.tensor(p, device=device)] = True

    logits = prefill(model, tokens, lengths, injections)
    input_pos = lengths.clone()
    for i in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        if i < min_new_tokens and suppress_ids:
            logits = logits.index_fill(-1, torch.tensor(list(suppress_ids), device=device), float("-inf"))
        token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield token
        if i + 1 == max_new_tokens:
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        logits = step(model, token, input_pos, injections)
        input_pos += 1


# ---------------------------------------------------------------------------------------------- stopping


class RowText:
    """Tracks one row's tokens and decoded text; decides stops and which text is safe to emit."""

    def __init__(self, tokenizer: Tokenizer | None, stop_ids: set[int], stop_strings: Sequence[str]) -> None:
        self.tokenizer, self.stop_ids, self.stop_strings = tokenizer, stop_ids, stop_strings
        self.result = Completion(text="" if tokenizer is not None else None)
        self.done = False
        self._emitted = 0

    def push(self, token: int) -> str:
        """Add one generated token; return the text that became final (possibly "")."""
        if token in self.stop_ids:
            self.done, self.result.finish_reason = True, "eos"
            return self.flush()
        self.result.tokens.append(token)
        if self.tokenizer is None:
            return ""
        # control tokens (a stray BOS, <|im_start|>...) are not text, as SentencePiece's own decode has it
        text = self.result.text = self.tokenizer.decode(self.result.tokens, skip_special=True)
        cuts = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if cuts:
            self.done, self.result.finish_reason = True, "stop"
            self.result.text = text[: min(cuts)]
            return self.flush()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte(s)
            return ""
        # Hold back a tail that could still grow into a stop string.
        held = max((n for s in self.stop_strings for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])),
                   default=0)
        return self._emit(len(text) - held)

    def flush(self) -> str:
        """Emit the rest at the end of the row, minus a character whose bytes were cut off by the stop."""
        if self.result.text is None:
            return ""
        self.result.text = self.result.text.rstrip("\ufffd")
        return self._emit(len(self.result.text))

    def _emit(self, end: int) -> str:
        piece = self.result.text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return piece


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    """A finite real number (not a bool; NaN, infinities and integers too large for a float fail)."""
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                    repetition_penalty: float) -> None:
    # written so that NaN fails every check
    if not (_is_int(max_new_tokens) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a whole number >= 1")
    if not (_is_real(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 is greedy)")
    if top_k is not None and not (_is_int(top_k) and top_k >= 1):
        raise ValueError(f"top_k={top_k!r} must be a whole number >= 1 or None")
    if top_p is not None and not (_is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] or None")
    if not (_is_real(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be a finite number > 0 (1 disables it)")


GREEDY = SamplingOptions(temperature=0.0, top_p=None)


def _rows(prompts: Sequence[Sequence[int]], tokenizer: Tokenizer | None, stop_token_ids: Iterable[int] | None,
          stop_strings: Sequence[str]) -> list[RowText]:
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    if stop_token_ids is None:
        stop_token_ids = [] if tokenizer is None or tokenizer.eos_id is None else [tokenizer.eos_id]
    stop_ids = set(stop_token_ids)
    return [RowText(tokenizer, stop_ids, [s for s in stop_strings if s]) for _ in prompts]


@torch.inference_mode()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, tokenizer: Tokenizer | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, repetition_penalty: float = 1.0, min_new_tokens: int = 0,
             stop_token_ids: Iterable[int] | None = None, stop_strings: Sequence[str] = (),
             injections: Sequence[Tensor | None] | None = None, generator: torch.Generator | None = None,
             compile: bool = False) -> list[Completion]:
    """Generate a completion for each prompt (token ids; rows may differ in length).

    Args:
        model: the decoder; its KV cache is (re)allocated for this batch.
        prompts: ``B`` lists of token ids (BOS included if the model wants it).
        tokenizer: decodes the completions' ``text``; needed for ``stop_strings``.
        max_new_tokens: generation limit per row.
        temperature, top_k, top_p: sampling; ``temperature == 0`` is greedy.
        repetition_penalty: CTRL penalty over prompt and generated tokens (1 disables it).
        min_new_tokens: the stop tokens cannot be sampled before this many tokens were generated.
        stop_token_ids: ids that end a row; None means the tokenizer's ``eos_id`` (if any), and an
            empty collection never stops early.
        stop_strings: texts that end a row; the completion text is cut before them.
        injections: passed to every forward call, see `Transformer.forward` (``[B or 1, 1, H, D]``).
        generator: random source for sampling.
        compile: ``torch.compile`` the decode step (off by default; pays off on GPUs).

    Returns:
        One `Completion` per prompt, in order.
    """
    rows = _rows(prompts, tokenizer, stop_token_ids, stop_strings)
    steps = generate_tokens(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                            min_new_tokens=min_new_tokens, suppress_ids=sorted(rows[0].stop_ids),
                            injections=injections, generator=generator, compile=compile)
    for tokens in steps:
        for row, token in zip(rows, tokens.tolist()):
            if not row.done:
                row.push(token)
        if all(row.done for row in rows):
            steps.close()
            break
    for row in rows:
        row.flush()
    return [row.result for row in rows]


@torch.inference_mode()
def stream(model: Transformer, tokenizer: Tokenizer, prompt: Sequence[int], **kwargs: Any) -> Iterator[str]:
    """Generate for one prompt and yield the decoded text in pieces as it is produced.

    A piece is only emitted once it is final: never half of a multi-byte UTF-8 character, and never
    text that might turn out to start a stop string. The pieces concatenate to the ``text`` that
    `generate` returns for the same arguments. ``kwargs`` are those of `generate`.
    """
    row = _rows([prompt], tokenizer, kwargs.pop("stop_token_ids", None), kwargs.pop("stop_strings", ()))[0]
    steps = generate_tokens(model, [prompt], **{"max_new_tokens": 256, **kwargs}, suppress_ids=sorted(row.stop_ids))
    for tokens in steps:
        piece = row.push(int(tokens[0]))
        if piece:
            yield piece
        if row.done:
            steps.close()
            return
    piece = row.flush()
    if piece:
        yield piece
