"""Tokenizers of the LLaMA family behind one small interface.

Three sources are supported:

* SentencePiece ``tokenizer.model`` files (LLaMA-1/2, the ImageBind-LLM base), through ``sentencepiece``;
* Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``/``generation_config.json``), through
  ``tokenizers``;
* the vocabularies embedded in GGUF files, rebuilt as ``tokenizers`` BPE models: byte-level BPE
  (``tokenizer.ggml.model == "gpt2"``) with the pre-tokenizer named by ``tokenizer.ggml.pre``, and
  SentencePiece BPE (``"llama"``, e.g. Llama-2 GGUFs) with merges recovered from the piece scores.

Every tokenizer exposes ``encode(text, *, bos=None, eos=False)``, ``decode(ids)``, ``bos_id``,
``eos_id``, ``stop_ids`` (end-of-sequence plus end-of-turn tokens such as ``<|im_end|>``),
``vocab_size``, ``add_bos`` (whether the model expects a BOS token at the start of a prompt) and
``chat_template`` (a Jinja template string when the files carry one).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# Special tokens that end an assistant turn in common chat formats. They join `stop_ids` when the
# vocabulary has them as special tokens, so generation stops at the end of a turn even when the
# file's EOS is another token (e.g. `<|endoftext|>` for Qwen2 base vocabularies).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>")

# Pre-tokenizer split patterns, by `tokenizer.ggml.pre` (the names llama.cpp writes). These are the
# regular expressions the vocabularies were trained with (published in each model's tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_GGUF_PRE_TYPES = ("default", "gpt2", "gpt-2", "smollm", *_GGUF_SPLITS)  # llama.cpp writes "gpt-2"
GGUF_TOKENIZER_TYPES = ("gpt2", "llama")  # `tokenizer.ggml.model` values we rebuild

# GGUF `tokenizer.ggml.token_type` values.
_GGUF_NORMAL = 1
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4


class BaseTokenizer(ABC):
    """Shared encode/decode logic; subclasses implement `_encode_text`, `_decode` and the vocabulary."""

    bos_id: int | None
    eos_id: int | None
    stop_ids: frozenset[int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    bos_token: str
    eos_token: str

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""

    @abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Ids of `text`, without BOS/EOS."""

    @abstractmethod
    def _decode(self, ids: Sequence[int], skip_special: bool) -> str:
        """Text of valid `ids`."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` (as the vocabulary spells it, e.g. ``'▁the'``, ``'Ġthe'``)."""

    @abstractmethod
    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry, or None when it is not in the vocabulary."""

    def encode(self, text: str, *, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text (``<|im_start|>``, ``</s>``) map to their ids.

        Args:
            text: the text to encode.
            bos: prepend the BOS token; None (default) follows the model's convention (`add_bos`).
            eos: append the EOS token.
        """
        ids = self._encode_text(text)
        if bos is None:
            bos = self.add_bos
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token; encode with bos=False")
            ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id is None:
                raise ValueError("this tokenizer has no EOS token; encode with eos=False")
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; with `skip_special`, control tokens (BOS, EOS, ``<|im_end|>``...) are dropped."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        return self._decode(ids, skip_special)

    def _set_stop_ids(self, extra: Iterable[int | None] = ()) -> None:
        ids = {self.eos_id, *extra}
        for token in END_OF_TURN_TOKENS:
            token_id = self.token_to_id(token)
            if token_id is not None and self.is_special(token_id):
                ids.add(token_id)
        self.stop_ids = frozenset(i for i in ids if i is not None)

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a control/special token rather than text."""


class SentencePieceTokenizer(BaseTokenizer):
    """A SentencePiece ``tokenizer.model`` (LLaMA-1/2): BOS added to prompts, special tokens parsed from text.

    Text is cut at special tokens written in it (``<s>``, ``</s>``) and each piece is encoded on its own,
    as Meta's Llama-2 chat code encodes each turn separately (each piece gets SentencePiece's leading
    ``▁``).
    """

    def __init__(self, model_path: str | Path, *, chat_template: str | None = None) -> None:
        import sentencepiece

        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"SentencePiece model {model_path} does not exist")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self.path = model_path
        n = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_token = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else ""
        self.eos_token = self.sp.id_to_piece(self.eos_id) if self.eos_id is not None else ""
        self.add_bos, self.add_eos = True, False
        self.chat_template = chat_template
        self._special = {
            self.sp.id_to_piece(i): i
            for i in range(n)
            if self.is_special(i)
        }
        # Longest first, so that a special token containing another one is matched whole.
        names = sorted(self._special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self._set_stop_ids()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _encode_text(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._special[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def _decode(self, ids: Sequence[int], skip_special: bool) -> str:
        if skip_special:
            return self.sp.decode([i for i in ids if not self.is_special(i)])
        out, run = [], []
        for i in ids:
            if self.is_special(i):
                out.append(self.sp.decode(run) + self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def token_to_id(self, piece: str) -> int | None:
        token_id = self.sp.piece_to_id(piece)
        return None if token_id == self.sp.unk_id() and piece != self.sp.id_to_piece(token_id) else token_id

    def is_special(self, token_id: int) -> bool:
        return self.sp.is_control(token_id) or self.sp.is_unknown(token_id)


class HFTokenizer(BaseTokenizer):
    """A ``tokenizers.Tokenizer`` (from a ``tokenizer.json`` or rebuilt from GGUF metadata).

    BOS/EOS are added by `encode` itself, never by the file's post-processor, so that `bos`/`eos`
    behave the same for every source.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool,
        add_eos: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        self.tk = tokenizer
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self.bos_id = self._lookup(bos_token, "bos_token")
        self.eos_id = self._lookup(eos_token, "eos_token")
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        self._special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._set_stop_ids(extra_stop_ids)

    def _lookup(self, token: str | None, what: str) -> int | None:
        if not token:
            return None
        token_id = self.tk.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        """Load ``tokenizer.json`` from a Hugging Face model directory.

        ``tokenizer_config.json`` gives ``bos_token``/``eos_token``/``add_bos_token``/``chat_template``
        (a ``chat_template.jinja`` file takes precedence for the template); ``generation_config.json``
        may add end-of-sequence ids (Llama-3 lists several).

        Raises:
            FileNotFoundError: when `path` has no ``tokenizer.json``.
        """
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        tk = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg = _read_json(path / "tokenizer_config.json")
        bos, eos = _token_content(cfg.get("bos_token")), _token_content(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            template = _read_json(path / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # a list of named templates; the default one is used for chat
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:
            add_bos = _post_processor_adds(tk, tk.token_to_id(bos) if bos else None)
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        extra = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        return cls(
            tk, bos_token=bos, eos_token=eos, add_bos=bool(add_bos), add_eos=bool(cfg.get("add_eos_token", False)),
            chat_template=template, extra_stop_ids=extra,
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> HFTokenizer:
        """Rebuild the tokenizer described by GGUF metadata (``tokenizer.ggml.*`` keys).

        Args:
            metadata: GGUF key -> Python value (strings, numbers, lists), at least
                ``tokenizer.ggml.{model,tokens,merges}``.

        Raises:
            ValueError: for a vocabulary type other than ``gpt2`` (byte-level BPE) and ``llama``
                (SentencePiece), or an unknown pre-tokenizer.
        """
        kind = metadata.get("tokenizer.ggml.model")
        tokens: list[str] = list(_need(metadata, "tokenizer.ggml.tokens"))
        types = list(metadata.get("tokenizer.ggml.token_type", ()))
        if kind == "gpt2":
            tk = _gguf_byte_level_bpe(tokens, metadata)
        elif kind == "llama":
            tk = _gguf_sentencepiece_bpe(tokens, types, metadata)
        else:
            raise ValueError(
                f"GGUF tokenizer type {kind!r} is not supported (only 'gpt2' byte-level BPE and 'llama' "
                "SentencePiece); put the model's tokenizer.model or tokenizer.json next to the .gguf file"
            )
        tk.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL]
        )
        tk.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED]
        )

        def token(key: str) -> str | None:
            token_id = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[int(token_id)] if token_id is not None else None

        extra = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        return cls(
            tk,
            bos_token=token("bos_token_id"),
            eos_token=token("eos_token_id"),
            # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
            extra_stop_ids=[int(i) for i in extra if i is not None],
        )

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def _encode_text(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: Sequence[int], skip_special: bool) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_piece(self, token_id: int) -> str:
        piece = self.tk.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return piece

    def token_to_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


def _gguf_byte_level_bpe(tokens: list[str], metadata: Mapping[str, Any]) -> Tokenizer:
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE_TYPES:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {list(_GGUF_PRE_TYPES)}")
    merges = [tuple(m.split(" ", 1)) for m in _need(metadata, "tokenizer.ggml.merges")]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tk.decoder = decoders.ByteLevel()
    return tk


def _gguf_sentencepiece_bpe(tokens: list[str], types: list[int], metadata: Mapping[str, Any]) -> Tokenizer:
    """SentencePiece BPE as a ``tokenizers`` BPE: spaces become ``▁``, unknown characters fall back to bytes.

    SentencePiece merges the adjacent pair whose union has the highest score; the equivalent BPE merge
    list holds every split of every normal piece into two pieces of the vocabulary, ranked by the
    score of the union.
    """
    scores = list(_need(metadata, "tokenizer.ggml.scores"))
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t for t, ty in zip(tokens, types) if ty == _GGUF_NORMAL} if types else set(tokens)
    ranked = []
    for piece in normal:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[vocab[piece]], vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], byte_fallback=True,
                              unk_token=tokens[int(unk)] if unk is not None else None, fuse_unk=True))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tk.normalizer = normalizers.Sequence(
        [*([normalizers.Prepend("\u2581")] if prefix else []), normalizers.Replace(" ", "\u2581")]
    )
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
         *([decoders.Strip(" ", 1, 0)] if prefix else [])]
    )
    return tk


def _need(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise ValueError(f"GGUF metadata lacks {key}; the file's tokenizer is incomplete")
    return metadata[key]


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _GGUF_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_GGUF_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's vocabulary was trained with every digit split off
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _post_processor_adds(tk: Tokenizer, bos_id: int | None) -> bool:
    """Whether the file's post-processor prepends BOS (how Llama-3 tokenizer.json files say "add BOS")."""
    if bos_id is None:
        return False
    ids = tk.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id


def _token_content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_tokenizer(path: str | Path) -> BaseTokenizer:
    """A tokenizer from a file or directory.

    Accepts a ``tokenizer.model`` file, a ``tokenizer.json`` file, or a directory holding one of them
    (``tokenizer.json`` is preferred when both exist). GGUF tokenizers come with their weights, see
    `imagebind_llm.llm.weights.load_llm`.

    Raises:
        FileNotFoundError: when no tokenizer file is found, naming what was looked for.
    """
    path = Path(path)
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if path.is_file():
        return SentencePieceTokenizer(path)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(path)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model", chat_template=_dir_chat_template(path))
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}; copy the model's tokenizer files there")


def _dir_chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    return _read_json(path / "tokenizer_config.json").get("chat_template")
