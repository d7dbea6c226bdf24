"""`ImageBindLLM`: a frozen ImageBind encoder, the bind network, and a LLaMA-family decoder whose
attention outputs receive the zero-gated visual term of `imagebind_llm.model.injection`.

Media flow: ``{modality: (tensor, weight)}`` -> ImageBind per modality -> L2-normalise -> weighted
mix ``[B, D]`` (`model.media`) -> optional cache blend (a ``retrieve`` callable, see
`imagebind_llm.cache.blend`) -> bind network ``[B, 1, dim]`` -> per-layer injections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from imagebind_llm.llm.generate import Completion, SamplingOptions, generate, stream
from imagebind_llm.llm.model import Transformer
from imagebind_llm.llm.templates import alpaca_prompt
from imagebind_llm.model.bind import BindNetwork
from imagebind_llm.model.config import AdapterConfig
from imagebind_llm.model.injection import injection_terms
from imagebind_llm.model.media import (MediaInputs, as_row, canonical_modality, group_rows, modality, per_prompt,
                                      weighted_sum)
from imagebind_llm.model.peft import add_finetune_modules, finetune_params, set_trainable

# mixed features [B, D] -> blended features [B, D]; e.g. functools.partial(cache.blend, options=BlendOptions())
Retrieve = Callable[[torch.Tensor], torch.Tensor]


class ImageBindLLM(nn.Module):
    """ImageBind encoder + bind network + injected LLaMA-family decoder.

    Args:
        llm: the decoder (`imagebind_llm.llm.model.Transformer`), any LLaMA-family size.
        encoder: an ImageBind encoder mapping ``{modality: tensor}`` to ``{modality: [B, feature_dim]}``;
            may be ``None`` for a text-only model or when features are precomputed.
        config: the adapter configuration.
        tokenizer: the decoder's tokenizer (`imagebind_llm.llm.tokenizer`), needed to generate from text.
    """

    def __init__(self, llm: Transformer, encoder: nn.Module | None, config: AdapterConfig | None = None,
                 tokenizer: Any = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.config = config = config or AdapterConfig()
        self.llm = llm
        self.encoder = encoder
        dim, n_layers = llm.config.dim, llm.config.n_layers
        n_inject = n_layers if config.inject_layers is None else config.inject_layers
        if not 0 < n_inject <= n_layers:
            raise ValueError(f"inject_layers={config.inject_layers} must be in 1..{n_layers}")
        self.first_injected_layer = n_layers - n_inject
        n_tuned = n_layers if config.lora_layers is None else config.lora_layers
        if not 0 < n_tuned <= n_layers:
            raise ValueError(f"lora_layers={config.lora_layers} must be in 1..{n_layers}")
        self.first_tuned_layer = n_layers - n_tuned
        device = llm.norm.weight.device
        self.bind = BindNetwork(config.feature_dim, dim, config.bind_hidden_dim or 4 * dim, config.bind_blocks,
                                legacy=config.legacy_bind).to(device)
        self.prefix = nn.Parameter(torch.randn(n_inject, dim, device=device))  # official: nn.Embedding N(0,1)
        self.gates = nn.ParameterList(nn.Parameter(torch.zeros(llm.config.n_heads, device=device))
                                      for _ in range(n_inject))
        if config.phase == "finetune":
            add_finetune_modules(llm, config.lora_rank, self.first_tuned_layer)
        if encoder is not None:
            encoder.requires_grad_(False)
        set_trainable(self, self.adapter_params())

    # ---------------------------------------------------------------- what trains
    def adapter_params(self, phase: str | None = None) -> dict[str, nn.Parameter]:
        """The parameters ``phase`` trains (default: the model's): stage 1 (``"pretrain"``) the bind
        network, prefix and gates; stage 2 (``"finetune"``) the decoder's norms, biases and LoRA (in the last
        ``config.lora_layers``).
        ``"all"``: both, with the norms of every layer, i.e. everything an official adapter file holds."""
        phase = phase or self.config.phase
        stage1 = {f"bind.{n}": p for n, p in self.bind.named_parameters()}
        stage1["prefix"] = self.prefix
        stage1.update({f"gates.{i}": g for i, g in enumerate(self.gates)})
        if phase == "pretrain":
            return stage1
        if phase == "finetune":
            return finetune_params(self.llm, first_layer=self.first_tuned_layer)
        if phase == "all":
            return {**stage1, **finetune_params(self.llm)}
        raise ValueError(f"phase must be 'pretrain', 'finetune' or 'all', got {phase!r}")

    # ---------------------------------------------------------------- media -> features -> bind output
    def embed_modality(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised ImageBind embedding ``[B, feature_dim]`` of one modality batch."""
        if self.encoder is None:
            raise RuntimeError("this model has no ImageBind encoder; build it with one to use media inputs")
        key = canonical_modality(name)
        with torch.no_grad():
            emb = self.encoder({key: x})[key]
        return F.normalize(emb.float(), dim=-1)

    def mix_features(self, inputs: MediaInputs) -> torch.Tensor:
        """Media of one batch (same modalities per row) -> the official weighted mix ``[B, feature_dim]``."""
        if not inputs:
            raise ValueError("no media inputs: pass at least one {modality: (tensor, weight)}")
        embeddings = {name: self.embed_modality(name, x) for name, (x, _) in inputs.items()}
        return weighted_sum(embeddings, {name: w for name, (_, w) in inputs.items()})

    def mix_requests(self, requests: Sequence[MediaInputs | None]) -> tuple[torch.Tensor, list[int]]:
        """Per-request media (rows may use different modalities, or none) -> (mixed ``[M, D]``, row indices).

        Each modality is encoded once for all the rows that use it (rows whose items differ in shape,
        such as point clouds, form separate batches); each row is mixed with its own weights. Only
        the ``M`` rows with media are returned, with their indices.
        """
        requests = [{modality(k).name: v for k, v in r.items()} if r else {} for r in requests]
        per_row: list[dict[str, torch.Tensor]] = [{} for _ in requests]
        for (name, _), rows in group_rows(requests).items():
            embeddings = self.embed_modality(name, torch.cat([as_row(requests[i][name][0]) for i in rows]))
            for j, i in enumerate(rows):
                per_row[i][name] = embeddings[j:j + 1]
        with_media = [i for i, row in enumerate(requests) if row]
        if not with_media:
            return torch.zeros(0, self.config.feature_dim), []
        mixed = [weighted_sum(per_row[i], {n: w for n, (_, w) in requests[i].items()}) for i in with_media]
        return torch.cat(mixed), with_media

    def encode_features(self, features: torch.Tensor, retrieve: Retrieve | None = None) -> torch.Tensor:
        """Mixed ImageBind features ``[B, feature_dim]`` -> (cache blend) -> bind network ``[B, 1, dim]``.

        The one path from features to the bind input: inference, training on images, and training
        from pre-extracted features all go through it.
        """
        if retrieve is not None:
            features = retrieve(features)
        return self.bind(features.to(self.bind.proj.weight.dtype).unsqueeze(1))

    def encode_inputs(self, inputs: MediaInputs, retrieve: Retrieve | None = None) -> torch.Tensor:
        """Media of one batch (same modalities per row) -> bind-network output ``[B, 1, dim]``."""
        return self.encode_features(self.mix_features(inputs), retrieve)

    def encode_requests(self, requests: Sequence[MediaInputs | None], retrieve: Retrieve | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-request media -> ``(visual [B, 1, dim], has_media [B])``; rows without media get zeros."""
        mixed, rows = self.mix_requests(requests)
        device, dtype = self.bind.proj.weight.device, self.bind.proj.weight.dtype
        visual = torch.zeros(len(requests), 1, self.llm.config.dim, device=device, dtype=dtype)
        if rows:
            visual[rows] = self.encode_features(mixed.to(device), retrieve)
        return visual, torch.tensor([bool(r) for r in requests], device=device)

    # ---------------------------------------------------------------- injection into the decoder
    def injections(self, visual: torch.Tensor, has_media: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Per-layer terms ``tanh(g_l) * W_v(visual + p_l)`` ``[B, 1, H, head_dim]`` (`model.injection`)."""
        return injection_terms(self.llm, visual, self.prefix, self.gates, has_media)

    def media_injections(self, media: MediaInputs | Sequence[MediaInputs | None] | None,
                         retrieve: Retrieve | None = None) -> list[torch.Tensor | None] | None:
        """Per-layer injections for one request's media (a dict) or a batch (a list; None rows allowed).

        Returns None when no row has media, so the decoder runs exactly as the plain LLM.
        """
        if media is None:
            return None
        requests = [media] if isinstance(media, Mapping) else list(media)
        if not any(requests):
            return None
        visual, has_media = self.encode_requests(requests, retrieve)
        return self.injections(visual, None if bool(has_media.all()) else has_media)

    def forward(self, tokens: torch.Tensor, visual: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, has_media: torch.Tensor | None = None,
                logits_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, S, V]`` for tokens ``[B, S]`` with the visual term of ``visual [B, 1, dim]`` injected
        (``[N, V]`` at the ``N`` True positions of a ``[B, S]`` ``logits_mask``)."""
        injections = None if visual is None else self.injections(visual, has_media)
        return self.llm(tokens, input_pos, injections=injections, logits_mask=logits_mask)

    def forward_logits(self, tokens: torch.Tensor, visual: torch.Tensor | None, start_pos: int = 0) -> torch.Tensor:
        """Incremental decoding with the KV cache, as the official ``forward_inference``.

        ``start_pos == 0`` (re)allocates the cache for this batch. Returns logits ``[B, L, V]``.
        """
        batch, length = tokens.shape
        if start_pos == 0:
            self.llm.setup_caches(batch, self.llm.config.max_seq_len)
        input_pos = torch.arange(start_pos, start_pos + length, device=tokens.device)
        return self(tokens, visual, input_pos)

    # ---------------------------------------------------------------- generation
    def prompt_ids(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Prompt strings (BOS added as the tokenizer wants) or token-id lists -> token-id lists."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer: pass token ids, or set model.tokenizer")
        return [self.tokenizer.encode(p, bos=getattr(self.tokenizer, "add_bos", True)) if isinstance(p, str)
                else list(p) for p in prompts]

    def _generation_args(self, prompt_ids: list[list[int]], media: Any, retrieve: Retrieve | None,
                         sampling: SamplingOptions) -> dict[str, Any]:
        longest = max(len(p) for p in prompt_ids)
        room = self.llm.config.max_seq_len - longest
        if room <= 0:
            raise ValueError(f"a prompt of {longest} tokens leaves no room in the context of "
                             f"{self.llm.config.max_seq_len} tokens; shorten it")
        sampling = sampling.replace(max_new_tokens=min(sampling.max_new_tokens, room))  # official: total <= max_seq_len
        return dict(injections=self.media_injections(media, retrieve),
                    **sampling.generate_kwargs(self.llm.norm.weight.device))

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str | Sequence[int]], media: Any = None, *,
                 sampling: SamplingOptions | None = None, retrieve: Retrieve | None = None,
                 **changes: Any) -> list[Completion]:
        """Batched multimodal generation (the engine, `imagebind_llm.engine`, adds continuous batching).

        Args:
            prompts: formatted prompt strings (BOS added as the tokenizer wants) or token-id lists.
            media: ``{modality: (tensor, weight)}`` with one item per tensor (shared by every prompt) or
                ``len(prompts)`` (one per prompt), or one such dict (or None) per prompt; rows may use
                different modalities. None: plain LLM.
            sampling: `SamplingOptions` (default: the official ones); ``changes`` override its fields.
            retrieve: the cache blend (mixed features -> blended features), or None.
        """
        ids = self.prompt_ids(prompts)
        if isinstance(media, Mapping):
            media = per_prompt(media, len(ids))
        elif media is not None and len(media) != len(ids):
            raise ValueError(f"{len(ids)} prompts but {len(media)} media entries; give one (or None) per prompt")
        args = self._generation_args(ids, media, retrieve, (sampling or SamplingOptions()).replace(**changes))
        return generate(self.llm, ids, tokenizer=self.tokenizer, **args)

    @torch.inference_mode()
    def stream(self, prompt: str | Sequence[int], media: MediaInputs | None = None, *,
               sampling: SamplingOptions | None = None, retrieve: Retrieve | None = None,
               **changes: Any) -> Iterator[str]:
        """Like `generate` for one prompt, yielding decoded text pieces as they are produced."""
        ids = self.prompt_ids([prompt])
        args = self._generation_args(ids, media, retrieve, (sampling or SamplingOptions()).replace(**changes))
        yield from stream(self.llm, self.tokenizer, ids[0], **args)

    def ask(self, question: str, media: MediaInputs | None = None, *, input: str | None = None, **kwargs: Any) -> str:
        """Answer one question about ``media`` with the official Alpaca prompt; returns the text."""
        return self.generate([alpaca_prompt(question, input)], media, **kwargs)[0].text

