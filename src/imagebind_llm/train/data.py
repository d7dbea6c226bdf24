"""Training data: file formats -> `Example` records -> token/label tensors -> batches.

Formats (chosen per file from its suffix, and per JSON item from its keys):

* ``.tsv`` / ``.csv``: a header with an image column (``url``, ``path`` or ``image``; the official
  ``url`` column holds local paths) and a caption column (``caption`` or ``text``). A caption cell
  holding a JSON list gives several captions; each epoch picks one with the dataset's seeded RNG.
* ``.tar``: webdataset shards: members ``{key}.jpg|jpeg|png|webp`` with ``{key}.txt`` or ``{key}.json``
  (``caption``/``text``) of the same key. Read with `tarfile`; an image is addressed as ``shard.tar::member``.
* ``.json`` (a list, or MiniGPT-4's ``{"annotations": [...]}``) and ``.jsonl`` (one item per line), items:
  * LLaVA: ``conversations`` [{``from``: human|gpt, ``value``}], optional ``image``; **every** turn is
    used and the ``<image>`` placeholder is removed;
  * chat: ``messages`` [{``role``: system|user|assistant, ``content``}], optional ``image``;
  * Alpaca: ``instruction``, ``input``, ``output``, optional ``image``;
  * captions: ``caption``/``text`` (a string or a list) with ``image``/``url``/``path`` or MiniGPT-4's
    ``image_id`` (file ``{image_id}.jpg``); stage 1 asks the caption prompt, stage 2 the detail prompt.

Sequences are built as the official ``PretrainDataset``/``FinetuneDataset``: BOS + prompt + answer + EOS,
where prompt and answer are tokenized together, truncated to ``max_words``; labels are the tokens on
answers (and their EOS) and 0 elsewhere (0 is the loss's ignore index). Conversations continue with
``\\n\\n### Instruction:\\n{q}\\n\\n### Response:`` after each answer's EOS (the `AlpacaTemplate` layout) and
every answer carries labels. Relative image paths are resolved against ``image_root``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from imagebind_llm.cache.shards import IMAGE_SUFFIXES, TAR_SEP, read_image_bytes
from imagebind_llm.llm.templates import alpaca_prompt
from imagebind_llm.preprocess import MediaError, train_transform

CAPTION_PROMPT = "Generate caption of this image"  # official stage-1 instruction
DETAIL_PROMPT = "Describe this image in detail."  # MiniGPT-4 style detail data in stage 2


class DataFormatError(ValueError):
    """A training file or item that does not match any supported format."""


@dataclass
class Example:
    """One training sample before tokenization.

    Attributes:
        image: image path (or ``shard.tar::member``), None for text-only samples.
        turns: ``(user, assistant)`` pairs; empty for caption samples.
        captions: caption choices of a caption sample (one is picked per epoch).
        input: the Alpaca ``input`` field of a single-turn sample.
        system: a system message replacing the Alpaca header sentence.
    """

    image: str | None
    turns: list[tuple[str, str]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    input: str | None = None
    system: str | None = None


# -------------------------------------------------------------------- readers
def read_examples(paths: Sequence[str | Path], image_root: str | Path | None = None) -> list[Example]:
    """All examples of ``paths`` (any supported format), concatenated in order, image paths resolved."""
    if not paths:
        raise DataFormatError("no training files given; set data.train to a list of files")
    examples: list[Example] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"training file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix in (".tsv", ".csv"):
            new = _read_table(path, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".tar":
            new = _read_tar(path)
        elif suffix == ".jsonl":
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            new = [parse_item(_json(line, f"{path}:{i + 1}"), f"{path}:{i + 1}") for i, line in enumerate(lines)]
        elif suffix == ".json":
            items = _json(path.read_text(), str(path))
            if isinstance(items, dict) and isinstance(items.get("annotations"), list):
                items = items["annotations"]  # MiniGPT-4 cc_sbu_align filter_cap.json
            if not isinstance(items, list):
                raise DataFormatError(f"{path}: expected a JSON list of items (or {{'annotations': [...]}})")
            new = [parse_item(item, f"{path}[{i}]") for i, item in enumerate(items)]
        else:
            raise DataFormatError(f"{path}: unsupported training file type {suffix!r}; use .tsv, .csv, .jsonl, "
                                  ".json or webdataset .tar shards")
        if not new:
            raise DataFormatError(f"{path} holds no examples")
        examples.extend(new)
    if image_root is not None:
        for ex in examples:
            if ex.image is not None and TAR_SEP not in ex.image and not Path(ex.image).is_absolute():
                ex.image = str(Path(image_root) / ex.image)
    return examples


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{where}: invalid JSON ({e})") from None


def _captions(value: Any, where: str) -> list[str]:
    if isinstance(value, str) and value.lstrip().startswith("["):
        value = _json(value, where)
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise DataFormatError(f"{where}: a caption must be a string or a non-empty list of strings, got {value!r}")
    return captions


def _read_table(path: Path, delimiter: str) -> list[Example]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = reader.fieldnames or []
        image_col = next((c for c in ("url", "path", "image") if c in fields), None)
        caption_col = next((c for c in ("caption", "text") if c in fields), None)
        if image_col is None or caption_col is None:
            raise DataFormatError(f"{path}: needs a header with an image column (url, path or image) and a caption "
                                  f"column (caption or text); found {fields}")
        return [Example(row[image_col], captions=_captions(row[caption_col], f"{path}:{i + 2}"))
                for i, row in enumerate(reader)]


def tar_files(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """``(key, suffix, member)`` of each file of a webdataset tar: ``dir/x.vision.png`` has the key ``dir/x``
    and the suffix ``.vision.png`` (lower case; empty without a dot)."""
    for member in tar.getmembers():
        if member.isfile():
            base = member.name.rsplit("/", 1)[-1]
            key = member.name[: len(member.name) - len(base)] + base.split(".", 1)[0]
            yield key, "." + base.split(".", 1)[1].lower() if "." in base else "", member


def _read_tar(path: Path) -> list[Example]:
    images: dict[str, str] = {}
    texts: dict[str, list[str]] = {}
    with tarfile.open(path) as tar:
        for key, suffix, member in tar_files(tar):
            if suffix in IMAGE_SUFFIXES:
                images[key] = member.name
            elif suffix in (".txt", ".json"):
                raw = tar.extractfile(member).read().decode("utf-8")
                where = f"{path}::{member.name}"
                if suffix == ".json":
                    item = _json(raw, where)
                    raw = item.get("caption", item.get("text")) if isinstance(item, dict) else None
                    if raw is None:
                        raise DataFormatError(f"{where}: needs a 'caption' or 'text' field")
                texts[key] = _captions(raw, where)
    missing = sorted(set(images) ^ set(texts))
    if missing:
        raise DataFormatError(f"{path}: keys without both an image and a caption: {missing[:5]}")
    return [Example(f"{path}{TAR_SEP}{images[k]}", captions=texts[k]) for k in sorted(images)]


def parse_item(item: Any, where: str) -> Example:
    """One JSON item (LLaVA, chat, Alpaca or caption format, see the module doc) -> `Example`."""
    if not isinstance(item, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(item).__name__}")
    image = item.get("image")
    if "conversations" in item:
        return Example(image, turns=_llava_turns(item["conversations"], where))
    if "messages" in item:
        system, turns = _chat_turns(item["messages"], where)
        return Example(image, turns=turns, system=system)
    if "instruction" in item:
        if "output" not in item:
            raise DataFormatError(f"{where}: an Alpaca item needs 'instruction' and 'output'")
        return Example(image, turns=[(item["instruction"], item["output"])], input=item.get("input") or None)
    caption = item.get("caption", item.get("text"))
    if caption is not None:
        image = image or item.get("url") or item.get("path")
        if image is None and "image_id" in item:
            image = f"{item['image_id']}.jpg"
        if image is None:
            raise DataFormatError(f"{where}: a caption item needs an 'image', 'url', 'path' or 'image_id'")
        return Example(image, captions=_captions(caption, where))
    raise DataFormatError(f"{where}: unknown item format with keys {sorted(item)}; expected LLaVA "
                          "'conversations', chat 'messages', Alpaca 'instruction'/'output' or 'caption' + 'image'")


def _llava_turns(conversations: Any, where: str) -> list[tuple[str, str]]:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    messages = []
    for turn in conversations:
        role = roles.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        if role is None:
            raise DataFormatError(f"{where}: LLaVA turns need 'from' (human/gpt) and 'value', got {turn!r}")
        text = turn["value"] if role == "assistant" else _strip_image_tag(turn["value"])
        messages.append({"role": role, "content": text})
    return _pairs(messages, where)


def _strip_image_tag(text: str) -> str:
    return text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()


def _chat_turns(messages: Any, where: str) -> tuple[str | None, list[tuple[str, str]]]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise DataFormatError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    return system, _pairs(messages, where)


def _pairs(messages: list[dict[str, str]], where: str) -> list[tuple[str, str]]:
    if messages and messages[-1]["role"] == "user":
        messages = messages[:-1]  # a trailing question has no answer to learn
    roles = [m["role"] for m in messages]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2):
        raise DataFormatError(f"{where}: a conversation must alternate user/assistant turns starting with "
                              f"the user, got roles {roles}")
    return [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]


# -------------------------------------------------------------------- tokenization
def prompt_segments(example: Example, caption_prompt: str, caption: str | None = None) -> list[tuple[str, str]]:
    """``(prompt text, answer)`` per assistant turn; the first prompt is the official Alpaca prompt."""
    turns = example.turns or [(caption_prompt, caption)]
    segments = []
    for i, (question, answer) in enumerate(turns):
        if i == 0 and example.system is None:
            prompt = alpaca_prompt(question, example.input)
        elif i == 0:
            prompt = f"{example.system}\n\n### Instruction:\n{question}\n\n### Response:"
        else:
            prompt = f"\n\n### Instruction:\n{question}\n\n### Response:"
        segments.append((prompt, answer))
    return segments


def encode_segments(tokenizer: Any, segments: Sequence[tuple[str, str]], max_words: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and labels ``[L]`` (``L <= max_words``, unpadded) of BOS + (prompt + answer + EOS) per turn.

    Each prompt and its answer are tokenized together, as the official datasets do; labels are 0 on BOS
    and prompts.
    """
    tokens, labels = [tokenizer.bos_id], [0]
    for prompt, answer in segments:
        n_prompt = len(tokenizer.encode(prompt, bos=False))
        ids = tokenizer.encode(prompt + answer, bos=False) + [tokenizer.eos_id]
        tokens += ids
        labels += [0] * n_prompt + ids[n_prompt:]
    return torch.tensor(tokens[:max_words]), torch.tensor(labels[:max_words])


# -------------------------------------------------------------------- dataset
def _rng_seed(*parts: int) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TrainDataset(Dataset):
    """Examples -> training items; indexed by ``(epoch, index)`` so randomness is a function of both.

    Each item is a dict: ``tokens``/``labels`` ``[L]`` long, ``has_media`` bool, and ``image``
    ``[3, 224, 224]`` (random resized crop) or ``feature`` ``[D]`` (from a `imagebind_llm.cache.shards.FeatureStore`)
    or neither. An example whose image cannot be read gives ``{"error": message}`` instead (`collate` passes
    it on, the training loop raises it), so the message reaches the user intact from DataLoader workers.

    Args:
        examples: from `read_examples`.
        tokenizer: the decoder's tokenizer (``encode``, ``bos_id``, ``eos_id``).
        max_words: truncation length.
        caption_prompt: the instruction of caption samples.
        text_only: ``"no_injection"`` (text-only samples run the plain LLM) or ``"zero_image"`` (the
            official all-zero dummy image goes through the whole visual path).
        features: optional feature store with one row per example (replaces the images).
        seed: seed of caption choice and crops.
    """

    def __init__(self, examples: Sequence[Example], tokenizer: Any, max_words: int,
                 caption_prompt: str = CAPTION_PROMPT, text_only: str = "no_injection",
                 features: Any = None, seed: int = 0) -> None:
        if text_only not in ("no_injection", "zero_image"):
            raise ValueError(f"text_only must be 'no_injection' or 'zero_image', got {text_only!r}")
        if features is not None and len(features) != len(examples):
            raise ValueError(f"the feature store has {len(features)} rows for {len(examples)} examples; "
                             "extract features from the same data.train files")
        self.examples, self.tokenizer, self.max_words = list(examples), tokenizer, max_words
        self.caption_prompt, self.text_only, self.features, self.seed = caption_prompt, text_only, features, seed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        example = self.examples[index]
        generator = torch.Generator().manual_seed(_rng_seed(self.seed, epoch, index))
        caption = None
        if not example.turns:
            caption = example.captions[int(torch.randint(len(example.captions), (1,), generator=generator))]
        tokens, labels = encode_segments(self.tokenizer, prompt_segments(example, self.caption_prompt, caption),
                                         self.max_words)
        item: dict[str, Any] = {"tokens": tokens, "labels": labels, "has_media": example.image is not None}
        if self.features is not None:
            item["feature"] = torch.tensor(np.asarray(self.features[index]), dtype=torch.float32)
        elif example.image is not None:
            try:
                item["image"] = train_transform(read_image_bytes(example.image), generator)
            except (MediaError, OSError) as e:  # returned, not raised: DataLoader workers would bury it in a traceback
                problem = e.problem if isinstance(e, MediaError) else str(e)
                return {"error": f"{example.image} (example {index} of data.train): {problem}; fix or remove it"}
        elif self.text_only == "zero_image":
            item["image"], item["has_media"] = torch.zeros(3, 224, 224), True
        return item


def image_sources(examples: Sequence[Example]) -> list[str]:
    """The image of every example, in order (the sources of a feature store); all examples must have one."""
    missing = [i for i, ex in enumerate(examples) if ex.image is None]
    if missing:
        raise ValueError(f"examples {missing[:5]} have no image; features can only be extracted for image data")
    return [ex.image for ex in examples]


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad to the longest row with 0 and stack.

    Returns:
        ``tokens``/``labels`` ``[B, S]``, ``has_media`` ``[B]`` bool, and ``images`` ``[M, 3, 224, 224]``
        or ``features`` ``[M, D]`` for the ``M`` rows with media (in row order), when any; or the first
        item's ``{"error": message}`` when an item is one (see `TrainDataset`).
    """
    errors = [it for it in items if "error" in it]
    if errors:
        return errors[0]
    length = max(len(it["tokens"]) for it in items)
    tokens = torch.zeros(len(items), length, dtype=torch.long)
    labels = torch.zeros(len(items), length, dtype=torch.long)
    for row, it in enumerate(items):
        tokens[row, : len(it["tokens"])] = it["tokens"]
        labels[row, : len(it["labels"])] = it["labels"]
    batch = {"tokens": tokens, "labels": labels, "has_media": torch.tensor([bool(it["has_media"]) for it in items])}
    for key, out in (("image", "images"), ("feature", "features")):
        rows = [it[key] for it in items if key in it]
        if rows:
            batch[out] = torch.stack(rows)
    return batch


# -------------------------------------------------------------------- order
def batch_order(n: int, *, batch_size: int, world_size: int, rank: int, accum_iter: int, seed: int,
                epoch: int, start_step: int = 0, group: int = 1) -> Iterator[list[tuple[int, int]]]:
    """This process's micro-batches of ``epoch`` from optimiser step ``start_step`` on.

    Every epoch is a seeded permutation shared by all processes, cut into global batches of
    ``batch_size * world_size * accum_iter`` (the incomplete tail is dropped). Micro-batch ``a`` of
    process ``r`` is chunk ``a * world_size + r`` of the global batch, so one process with
    ``accum_iter = k`` sees exactly the chunks that ``k`` processes see, in the same grouping.
    ``group > 1``: examples ``[g * group, (g + 1) * group)`` move together (the permutation is of whole
    groups, a tail shorter than a group is dropped), so each group lands in one micro-batch when
    ``batch_size`` is a multiple of ``group``: e.g. a scene and its counterfactuals as one another's
    hard negatives.
    """
    chunk = batch_size
    global_batch = chunk * world_size * accum_iter
    if group < 1 or batch_size % group:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the group size {group}")
    steps = steps_per_epoch(n, batch_size, world_size, accum_iter, group)
    if steps == 0:
        raise ValueError(f"{n} examples do not fill one global batch of {global_batch} "
                         f"(batch_size {batch_size} x {world_size} processes x accum_iter {accum_iter})")
    groups = torch.randperm(n // group, generator=torch.Generator().manual_seed(_rng_seed(seed, epoch)))
    perm = (groups[:, None] * group + torch.arange(group)).flatten().tolist()
    for step in range(start_step, steps):
        base = step * global_batch
        for a in range(accum_iter):
            start = base + (a * world_size + rank) * chunk
            yield [(epoch, i) for i in perm[start : start + chunk]]


def steps_per_epoch(n: int, batch_size: int, world_size: int, accum_iter: int, group: int = 1) -> int:
    return n // group * group // (batch_size * world_size * accum_iter)
