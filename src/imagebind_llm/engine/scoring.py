"""Scoring: the log-likelihood of a given continuation given the context and the media.

What lmms-eval's ``loglikelihood`` requests and yes/no scoring (MME) need: for each pair, the sum of
``log p(continuation token | everything before it, media)`` and whether greedy decoding would have
produced exactly the continuation. One uncached forward pass over ``context + continuation`` per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from imagebind_llm.llm.generate import pad_right
from imagebind_llm.model.imagebind_llm import ImageBindLLM, Retrieve
from imagebind_llm.model.media import MediaInputs


@dataclass(frozen=True)
class Score:
    """``logprob``: summed log-probability of the continuation; ``greedy``: argmax at every step."""

    logprob: float
    greedy: bool
    tokens: int


@torch.inference_mode()
def loglikelihood(model: ImageBindLLM, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                  media: Sequence[MediaInputs | None] | None = None, retrieve: Retrieve | None = None) -> list[Score]:
    """Score ``(context ids, continuation ids)`` pairs, each with its own media (or None).

    Rows are right-padded into one batch; causal attention keeps padding out of every real position.

    Raises:
        ValueError: an empty context or continuation, or a pair longer than the model's context.
    """
    if media is not None and len(media) != len(pairs):
        raise ValueError(f"{len(pairs)} pairs but {len(media)} media entries; give one (or None) per pair")
    limit = model.llm.config.max_seq_len
    for context, continuation in pairs:
        if not context or not continuation:
            raise ValueError("scoring needs a non-empty context (at least BOS) and a non-empty continuation")
        if len(context) + len(continuation) > limit:
            raise ValueError(f"a pair of {len(context) + len(continuation)} tokens exceeds the context of {limit}")
    device = model.llm.norm.weight.device
    rows = [list(c) + list(x) for c, x in pairs]
    tokens, _ = pad_right(rows, device)
    injections = model.media_injections(list(media) if media is not None else None, retrieve)
    scored = torch.zeros_like(tokens, dtype=torch.bool)  # position t predicts token t+1: only those of a continuation
    for i, (context, continuation) in enumerate(pairs):
        scored[i, len(context) - 1:len(context) - 1 + len(continuation)] = True
    logprobs = F.log_softmax(model.llm(tokens, injections=injections, logits_mask=scored).float(), dim=-1)
    scores, offset = [], 0
    for continuation in (x for _, x in pairs):
        steps, offset = logprobs[offset:offset + len(continuation)], offset + len(continuation)  # row-major
        target = torch.tensor(list(continuation), device=device)
        picked = steps.gather(-1, target[:, None])[:, 0]
        scores.append(Score(float(picked.sum()), bool((steps.argmax(-1) == target).all()), len(continuation)))
    return scores


def text_pairs(tokenize: Callable[[str], list[int]], contexts: Sequence[str], continuations: Sequence[str]
               ) -> list[tuple[list[int], list[int]]]:
    """Token pairs for text: the continuation's ids are the tail of ``tokenize(context + continuation)``,
    so a word that merges across the boundary is scored as the model would write it (lmms-eval's rule)."""
    pairs = []
    for context, continuation in zip(contexts, continuations):
        whole, head = tokenize(context + continuation), tokenize(context)
        split = len(head)
        while split > 1 and whole[:split] != head[:split]:
            split -= 1
        pairs.append((whole[:split], whole[split:]))
    return pairs
