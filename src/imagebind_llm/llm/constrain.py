"""Constrained decoding: a JSON schema or a regular expression becomes a token mask at every step.

The grammar engine is `llguidance <https://github.com/guidance-ai/llguidance>`_ (the ``structured`` extra:
``pip install 'imagebind-llm[structured]'``), imported only when a constraint is used. It builds a JSON-schema
grammar in about a millisecond and computes a mask over a 49k-token vocabulary in tens of microseconds, and
it reads both our tokenizer kinds: `HFTokenizer` (byte-level BPE, e.g. the embedded SmolLM2, and the
SentencePiece-style BPE rebuilt from GGUF files) through its ``tokenizer.json`` text, and
`SentencePieceTokenizer` (LLaMA's ``tokenizer.model``) through a vocabulary of byte strings.

Usage::

    constraint = Constraint.json_schema({"type": "object", "properties": {...}})
    state = constraint.start(tokenizer, vocab_size)      # one per generated row
    while not state.done:
        logits = ...                                     # [1, V]
        token = sample(logits, mask=state.mask()[None])  # `imagebind_llm.llm.generate.sample`
        state.advance(token)

JSON is generated compactly (``{"a":1,"b":[2,3]}``: no whitespace between tokens), so that a small model
cannot wander into endless whitespace; object properties come in the schema's order. When the grammar is
complete the mask allows only the end-of-sequence tokens and `ConstraintState.done` turns true (callers stop
there). A row that runs out of ``max_new_tokens`` before that ends with incomplete output.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_INSTALL_HINT = "constrained decoding needs llguidance: pip install 'imagebind-llm[structured]'"


class ConstraintError(ValueError):
    """A schema or pattern the grammar engine cannot compile, or a missing ``llguidance``."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConstraintError(_INSTALL_HINT) from e
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What the output must match; immutable and cheap (compiled per row by `start`).

    Attributes:
        kind: ``"json_schema"`` (``spec`` is the schema as JSON text), ``"json_object"`` (any JSON object),
            ``"regex"`` (``spec`` is the pattern, matched against the whole output) or ``"lark"`` (a Lark
            grammar in llguidance's dialect).
        spec: the schema, pattern or grammar text.
    """

    kind: str
    spec: str = ""

    KINDS = ("json_schema", "json_object", "regex", "lark")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ConstraintError(f"constraint kind {self.kind!r} is not one of {list(self.KINDS)}")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool | str) -> Constraint:
        """Output a JSON value valid against ``schema`` (a dict, ``True``, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (Mapping, bool)):
            raise ConstraintError(f"a JSON schema is an object (or true), got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema, sort_keys=False))

    @classmethod
    def json_object(cls) -> Constraint:
        """Output any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Output text matching ``pattern`` whole (Rust ``regex`` syntax, close to Python's)."""
        return cls("regex", pattern)

    @property
    def schema(self) -> Any:
        """The JSON schema (``{"type": "object"}`` for ``json_object``); None for regex/lark constraints."""
        if self.kind == "json_object":
            return {"type": "object"}
        return json.loads(self.spec) if self.kind == "json_schema" else None

    def grammar(self) -> str:
        """The llguidance grammar text of this constraint."""
        ll = _llguidance()
        if self.kind in ("json_schema", "json_object"):
            try:
                return ll.LLMatcher.grammar_from_json_schema(self.schema, defaults={"whitespace_flexible": False})
            except ValueError as e:
                raise ConstraintError(f"bad JSON schema: {e}") from None
        if self.kind == "regex":
            return ll.LLMatcher.grammar_from_regex(self.spec)
        return ll.LLMatcher.grammar_from_lark(self.spec)

    def check(self) -> None:
        """Compile the grammar without a tokenizer (a server checks a request before queueing it).

        Raises:
            ConstraintError: naming what the grammar engine did not accept.
        """
        error = _llguidance().LLMatcher.validate_grammar(self.grammar())
        if error and not error.startswith("WARNING"):
            raise ConstraintError(f"the {self.kind.replace('_', ' ')} cannot be compiled: {error.strip()}")

    def start(self, tokenizer: Any, vocab_size: int | None = None) -> ConstraintState:
        """A fresh per-row state for ``tokenizer`` (`HFTokenizer` or `SentencePieceTokenizer`).

        Args:
            vocab_size: the model's logits width when it differs from the tokenizer's (padded embeddings);
                ids past the tokenizer's vocabulary are never allowed.

        Raises:
            ConstraintError: the grammar does not compile.
        """
        ll = _llguidance()
        lltok = engine_tokenizer(tokenizer, vocab_size)
        matcher = ll.LLMatcher(lltok, self.grammar(), log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"the {self.kind.replace('_', ' ')} cannot be compiled: "
                                  f"{matcher.get_error().splitlines()[0] if matcher.get_error() else '?'}")
        return ConstraintState(matcher, lltok.vocab_size, int(vocab_size or tokenizer.vocab_size))


def as_constraint(value: Any) -> Constraint | None:
    """A `Constraint` from what a caller gives: a `Constraint`, a JSON-schema dict, or None."""
    if value is None or isinstance(value, Constraint):
        return value
    if isinstance(value, (Mapping, bool)):
        return Constraint.json_schema(value)
    raise ConstraintError(f"a constraint is a Constraint or a JSON-schema dict, got {type(value).__name__} "
                          "(use Constraint.regex(pattern) for a regular expression)")


class ConstraintState:
    """One row's progress through its grammar: the mask of the next token, and `advance` with the chosen one."""

    def __init__(self, matcher: Any, grammar_vocab: int, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size  # the logits' width
        self._bits = np.zeros((grammar_vocab + 31) // 32, dtype=np.int32)
        self._grammar_vocab = grammar_vocab

    @property
    def done(self) -> bool:
        """The grammar is complete (only end-of-sequence may follow), or it hit an error."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """The output so far is complete (it may end here)."""
        return self.matcher.is_accepting()

    def mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The allowed next tokens, ``[V]`` bool."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        mask = bits_to_bool(self._bits, min(self._grammar_vocab, self.vocab_size))
        if mask.shape[0] < self.vocab_size:  # ids past the tokenizer's vocabulary (padded embeddings): never
            mask = torch.cat([mask, mask.new_zeros(self.vocab_size - mask.shape[0])])
        return mask.to(device)

    def advance(self, token: int) -> None:
        """Consume the chosen ``token``.

        Raises:
            ConstraintError: the token is not allowed (a caller that did not apply the mask).
        """
        if not self.matcher.consume_token(int(token)):
            raise ConstraintError(f"token {token} is not allowed here: {self.matcher.get_error().splitlines()[0]}")


def bits_to_bool(bits: np.ndarray, vocab_size: int) -> torch.Tensor:
    """An llguidance bitmask (int32 words, bit ``k`` of word ``w`` is token ``32w + k``) -> ``[V]`` bool."""
    return torch.from_numpy(np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab_size].view(np.bool_))


def masks(states: Sequence[ConstraintState | None], vocab_size: int,
          device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The ``[B, V]`` mask of a batch whose rows each have their own constraint (None: unconstrained row);
    None when no row is constrained."""
    if all(s is None for s in states):
        return None
    out = torch.ones(len(states), vocab_size, dtype=torch.bool)
    for row, state in enumerate(states):
        if state is not None:
            mask = state.mask()
            out[row, :mask.shape[0]] = mask
            out[row, mask.shape[0]:] = False
    return out.to(device)


# ---------------------------------------------------------------------------------------------- tokenizers
_CACHE: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def engine_tokenizer(tokenizer: Any, vocab_size: int | None = None) -> Any:
    """The ``llguidance.LLTokenizer`` of one of our tokenizers (built once per tokenizer, ~0.3 s for 49k tokens).

    End-of-sequence for the grammar is the tokenizer's ``stop_ids`` (EOS and end-of-turn tokens).
    """
    n = int(vocab_size or tokenizer.vocab_size)
    with _CACHE_LOCK:
        built = _CACHE.setdefault(tokenizer, {})
        if n not in built:
            built[n] = _build(tokenizer, n)
        return built[n]


def _build(tokenizer: Any, n_vocab: int) -> Any:
    ll = _llguidance()
    stop = sorted(getattr(tokenizer, "stop_ids", ()) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else []))
    if not stop:
        raise ConstraintError("constrained decoding needs a tokenizer with an end-of-sequence token")
    if hasattr(tokenizer, "tk"):  # HFTokenizer: llguidance reads the tokenizers JSON (byte-level or byte-fallback BPE)
        return ll.LLTokenizer(tokenizer.tk.to_str(), n_vocab=n_vocab, eos_token=stop)
    if hasattr(tokenizer, "sp"):  # SentencePieceTokenizer
        return ll.LLTokenizer(ll.TokenizerWrapper(_SentencePieceVocab(tokenizer.sp, stop)), n_vocab=n_vocab,
                              eos_token=stop)
    raise ConstraintError(f"constrained decoding does not know the tokenizer {type(tokenizer).__name__}")


class _SentencePieceVocab:
    """A SentencePiece model as llguidance's ``TokenizerWrapper`` wants it: each piece's bytes (``▁`` is a
    space, ``<0x0A>`` the byte 0x0A), the special ids, and a tokenizer whose tokens spell the input exactly
    (without SentencePiece's dummy-prefix space)."""

    def __init__(self, sp: Any, stop: Sequence[int]) -> None:
        self.sp = sp
        self.eos_token_id = stop[0]
        self.bos_token_id = sp.bos_id() if sp.bos_id() >= 0 else None
        n = sp.get_piece_size()
        self.special_token_ids = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
        self.tokens = [self._bytes(i) for i in range(n)]

    def _bytes(self, i: int) -> bytes:
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return piece.encode()
        return piece.replace("\u2581", " ").encode()

    def __call__(self, text: bytes | str) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode()
        ids = self._encode(data.decode("utf-8", errors="replace"))
        if b"".join(self.tokens[i] for i in ids) != data:  # normalised away (spaces), or not UTF-8: byte pieces
            ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in data]
        return ids

    def _encode(self, text: str) -> list[int]:
        ids = list(self.sp.encode(text))
        if ids and not text.startswith(" ") and self.sp.id_to_piece(ids[0]).startswith("\u2581"):
            rest = self.sp.id_to_piece(ids[0])[1:]  # drop the dummy-prefix space SentencePiece added
            rest_id = self.sp.piece_to_id(rest) if rest else None
            if rest and (rest_id == self.sp.unk_id() or self.sp.id_to_piece(rest_id) != rest):
                rest_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in rest.encode()]
            else:
                rest_ids = [rest_id] if rest else []
            ids = rest_ids + ids[1:]
        return ids
