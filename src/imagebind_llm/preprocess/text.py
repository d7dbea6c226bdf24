"""CLIP byte-level BPE tokenizer for ImageBind's text modality (77 ids, SOT 49406, EOT 49407, pad 0).

The vocabulary is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (shipped as package data). Text is cleaned
as CLIP does: ``ftfy.fix_text``, HTML-unescaped twice, whitespace collapsed, lower-cased.

Truncation of texts longer than 75 BPE tokens:
  * default (ImageBind HEAD, OpenAI ``clip.tokenize(truncate=True)``): ``[SOT] + bpe[:75] + [EOT]``;
  * ``legacy_truncation=True`` (ImageBind-LLM's and Point-Bind's vendored tokenizer):
    ``([SOT] + bpe + [EOT])[:77]``, which drops EOT, so ImageBind pools at SOT for every long text.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
from collections.abc import Sequence

import ftfy
import regex
import torch

CONTEXT_LENGTH = 77
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
_NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP (the file holds more)
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to ``chr(256 + k)`` in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    # Vocabulary order is printable bytes first, then the remapped ones (CLIP's order).
    return {b: mapping[b] for b in [*printable, *(b for b in range(256) if b not in printable)]}


def clean_text(text: str) -> str:
    """CLIP's cleaning: ftfy, double HTML unescape, whitespace collapse, strip, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """Byte-level BPE with CLIP's merges; ``encode`` gives ids without SOT/EOT."""

    def __init__(self, bpe_path: str | None = None) -> None:
        if bpe_path is None:
            resource = importlib.resources.files("imagebind_llm") / "data" / "bpe_simple_vocab_16e6.txt.gz"
            raw = resource.read_bytes()
        else:
            with open(bpe_path, "rb") as f:
                raw = f.read()
        lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_encoder = byte_to_unicode()
        base = list(self.byte_encoder.values())
        vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.sot_id = self.encoder[SOT_TOKEN]
        self.eot_id = self.encoder[EOT_TOKEN]
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    def _bpe_uncached(self, token: str) -> tuple[str, ...]:
        """Merge the symbols of one pre-token (last symbol carries ``</w>``) by ascending merge rank."""
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` after CLIP cleaning (no SOT/EOT)."""
        ids: list[int] = []
        for piece in _PATTERN.findall(clean_text(text)):
            if piece in (SOT_TOKEN, EOT_TOKEN):
                ids.append(self.encoder[piece])
                continue
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[sym] for sym in self._bpe(chars))
        return ids

    def __call__(self, texts: str | Sequence[str], legacy_truncation: bool = False) -> torch.Tensor:
        """Tokenise to ``[N, 77]`` int64, zero-padded; see the module docstring for truncation."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), CONTEXT_LENGTH, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text #{row} is a {type(text).__name__}, expected str")
            body = self.encode(text)
            if legacy_truncation:
                ids = ([self.sot_id, *body, self.eot_id])[:CONTEXT_LENGTH]
            else:
                ids = [self.sot_id, *body[: CONTEXT_LENGTH - 2], self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The CLIP tokenizer built from the packaged vocabulary (built once, on first use)."""
    return ClipTokenizer()


def tokenize(texts: str | Sequence[str], legacy_truncation: bool = False) -> torch.Tensor:
    """Tokenise text(s) for ImageBind's text encoder.

    Args:
        texts: one string or a list of strings.
        legacy_truncation: reproduce ImageBind-LLM's vendored tokenizer (EOT dropped on long texts).

    Returns:
        ``[N, 77]`` int64 ids.
    """
    return default_tokenizer()(texts, legacy_truncation=legacy_truncation)
