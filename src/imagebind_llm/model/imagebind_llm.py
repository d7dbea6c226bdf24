"""The ImageBind-LLM model (Han et al. 2023, arXiv 2309.03905): a frozen ImageBind encoder, a bind
network, and a LLaMA-family decoder whose every attention output receives a zero-gated visual term.

For layer ``l`` (one of the last ``inject_layers`` layers), head ``h`` and every position ``t``::

    attn_out[t, h] = softmax(q_t K^T / sqrt(d) + mask) V  +  tanh(g_{l,h}) * (W_v^{(l)} (bind(F) + p_l))_h

``F`` is the weighted mix of L2-normalised ImageBind embeddings (optionally blended with a retrieval
cache), ``bind`` the `BindNetwork`, ``p_l`` a learned per-layer prefix vector, ``g_l`` per-head gates
initialised to zero, and ``W_v`` the layer's frozen value projection (no LoRA on this path). For
grouped-query backbones the value heads are repeated to the query heads, as attention does.

The term depends on the media only, not on the tokens, so it is computed once per request
(`injections`) and passed to the decoder, which adds it before ``W_o``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from imagebind_llm.encoders.convert import official_key as official_encoder_key
from imagebind_llm.llm.generate import Completion, generate, stream
from imagebind_llm.llm.model import RMSNorm, Transformer
from imagebind_llm.llm.templates import alpaca_prompt
from imagebind_llm.model.bind import BindNetwork
from imagebind_llm.model.convert import (
    CheckpointMismatchError, gate_to_official, is_legacy_bind, official_to_ours, ours_to_official, read_adapter_file,
)
from imagebind_llm.model.lora import LoRALinear, add_finetune_modules, base_linear
from imagebind_llm.model.retrieval import FeatureRetriever

PHASES = ("pretrain", "finetune")

# Request names (case-insensitive) -> ImageBind modality. Images and videos share the vision tower.
MODALITIES = {
    "image": "vision", "video": "vision", "vision": "vision", "audio": "audio", "text": "text",
    "point": "point", "depth": "depth", "thermal": "thermal", "imu": "imu",
}

MediaInputs = Mapping[str, tuple[torch.Tensor, float]]


class UnknownModalityError(ValueError):
    """A request named a modality ImageBind-LLM does not have."""


@dataclass
class AdapterConfig:
    """What ImageBind-LLM adds to a decoder. Widths of the decoder come from its own `LLMConfig`.

    Attributes:
        feature_dim: ImageBind embedding width (``out_embed_dim``; 1024 for imagebind_huge).
        bind_hidden_dim: SwiGLU width of the bind network; ``None`` means ``4 * llm.dim`` (official).
        bind_blocks: residual blocks in the bind network (3).
        legacy_bind: LayerNorm + biased linears, as in the released ``7B-beta.pth``.
        inject_layers: how many of the last decoder layers receive the visual term; ``None`` = all.
        phase: ``"pretrain"`` (stage 1: bind net, prefix, gates train; no LoRA/bias modules) or
            ``"finetune"`` (stage 2: LoRA + biases + norms train).
        lora_rank: rank of the stage-2 LoRA (16).
    """

    feature_dim: int = 1024
    bind_hidden_dim: int | None = None
    bind_blocks: int = 3
    legacy_bind: bool = False
    inject_layers: int | None = None
    phase: str = "finetune"
    lora_rank: int = 16

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def canonical_modality(name: str) -> str:
    """``'Image'`` -> ``'vision'``, ``'Audio'`` -> ``'audio'``; unknown names raise naming the choices."""
    key = MODALITIES.get(name.lower())
    if key is None:
        raise UnknownModalityError(f"unknown modality {name!r}; use one of {sorted(set(MODALITIES))}")
    return key


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
        device = llm.norm.weight.device
        self.bind = BindNetwork(config.feature_dim, dim, config.bind_hidden_dim or 4 * dim, config.bind_blocks,
                                legacy=config.legacy_bind).to(device)
        self.prefix = nn.Parameter(torch.randn(n_inject, dim, device=device))  # official: nn.Embedding N(0,1)
        self.gates = nn.ParameterList(nn.Parameter(torch.zeros(llm.config.n_heads, device=device))
                                      for _ in range(n_inject))
        if config.phase == "finetune":
            add_finetune_modules(llm, config.lora_rank)
        if encoder is not None:
            encoder.requires_grad_(False)
        set_trainable(self, config.phase)

    @classmethod
    def from_official(cls, llama_dir: str | Path, tokenizer: str | Path | None = None,
                      adapter: str | Path | Mapping[str, torch.Tensor] | None = None,
                      imagebind: nn.Module | str | Path | None = None, phase: str = "finetune",
                      **kwargs: Any) -> "ImageBindLLM":
        """The released model: base weights, tokenizer, adapter file, encoder. See `factory.from_official`."""
        from imagebind_llm.model.factory import from_official

        return from_official(llama_dir, adapter, imagebind, tokenizer=tokenizer, phase=phase, **kwargs)

    # ---------------------------------------------------------------- media -> bind output
    def embed_modality(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised ImageBind embedding ``[B, feature_dim]`` of one modality batch."""
        if self.encoder is None:
            raise RuntimeError("this model has no ImageBind encoder; build it with one to use media inputs")
        key = canonical_modality(modality)
        with torch.no_grad():
            emb = self.encoder({key: x})[key]
        return F.normalize(emb.float(), dim=-1)

    def mix_features(self, inputs: MediaInputs) -> torch.Tensor:
        """Official modality fusion: ``sum_i w_i / (sum_j w_j + 1e-6) * normalize(e_i)`` -> ``[B, feature_dim]``."""
        if not inputs:
            raise ValueError("no media inputs: pass at least one {modality: (tensor, weight)}")
        embeddings = {name: self.embed_modality(name, x) for name, (x, _) in inputs.items()}
        return _weighted_sum(embeddings, {name: w for name, (_, w) in inputs.items()})

    def encode_inputs(self, inputs: MediaInputs, cache: FeatureRetriever | None = None, top_k: int = 10,
                      temperature: float = 20.0, weight: float = 0.5) -> torch.Tensor:
        """Media of one batch (same modalities per row) -> bind-network output ``[B, 1, dim]``.

        Args:
            inputs: ``{modality: (tensor [B, ...], weight)}``; see `MODALITIES` for names.
            cache: optional retrieval cache; its blend is applied to the mixed feature before the bind
                network with ``top_k``, ``temperature`` and ``weight`` (official defaults 10, 20, 0.5).
        """
        return self._bind_features(self.mix_features(inputs), cache, top_k, temperature, weight)

    def encode_requests(self, requests: Sequence[MediaInputs | None], cache: FeatureRetriever | None = None,
                        **cache_options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample media (rows may use different modality sets, or none) -> ``([B, 1, dim], has_media [B])``.

        Each modality is encoded once for all the rows that use it, each row is mixed with its own
        weights, and the cache and the bind network run once on the rows with media. Rows without media
        get zeros and ``has_media=False`` (they run the plain LLM).
        """
        rows = [{name.lower(): value for name, value in r.items()} if r else {} for r in requests]
        users: dict[tuple[str, tuple[int, ...]], list[int]] = {}  # same modality and item shape -> one batch
        for i, row in enumerate(rows):
            for name, (x, _) in row.items():
                users.setdefault((name, _item_shape(x)), []).append(i)
        per_row: list[dict[str, torch.Tensor]] = [{} for _ in rows]
        for (name, _), indices in users.items():
            embeddings = self.embed_modality(name, _stack_rows([rows[i][name][0] for i in indices]))
            for j, i in enumerate(indices):
                per_row[i][name] = embeddings[j:j + 1]
        with_media = [i for i, row in enumerate(rows) if row]
        device, dtype = self.bind.proj.weight.device, self.bind.proj.weight.dtype
        visual = torch.zeros(len(rows), 1, self.llm.config.dim, device=device, dtype=dtype)
        if with_media:
            mixed = torch.cat([_weighted_sum(per_row[i], {n: w for n, (_, w) in rows[i].items()}) for i in with_media])
            visual[with_media] = self._bind_features(mixed, cache, **cache_options)
        return visual, torch.tensor([bool(row) for row in rows], device=device)

    def _bind_features(self, mixed: torch.Tensor, cache: FeatureRetriever | None = None, top_k: int = 10,
                       temperature: float = 20.0, weight: float = 0.5) -> torch.Tensor:
        """Mixed features ``[B, feature_dim]`` -> (cache blend) -> bind network ``[B, 1, dim]``."""
        if cache is not None:
            mixed = cache.blend(mixed, top_k=top_k, temperature=temperature, weight=weight)
        return self.bind(mixed.to(self.bind.proj.weight.dtype).unsqueeze(1))

    # ---------------------------------------------------------------- injection into the decoder
    def injections(self, visual: torch.Tensor, has_media: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Per-layer additive attention terms ``tanh(g_l) * W_v(visual + p_l)`` as ``[B, 1, H, head_dim]``.

        Args:
            visual: bind-network output ``[B, 1, dim]``.
            has_media: optional ``[B]`` bool; rows without media get a zero term.
        """
        cfg = self.llm.config
        out: list[torch.Tensor | None] = [None] * self.first_injected_layer
        for j, layer in enumerate(self.llm.layers[self.first_injected_layer:]):
            adapter = visual + self.prefix[j].to(visual.dtype)
            values = base_linear(layer.attention.wv, adapter.to(self.llm.norm.weight.dtype))
            values = values.view(visual.shape[0], 1, cfg.n_kv_heads, cfg.head_dim)
            values = values.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=2)
            term = torch.tanh(self.gates[j]).to(values.dtype).view(1, 1, -1, 1) * values
            if has_media is not None:
                term = term * has_media.view(-1, 1, 1, 1).to(term.dtype)
            out.append(term)
        return out

    def forward(self, tokens: torch.Tensor, visual: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, has_media: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, S, V]`` for tokens ``[B, S]`` with the visual term of ``visual [B, 1, dim]`` injected."""
        injections = None if visual is None else self.injections(visual, has_media)
        return self.llm(tokens, input_pos, injections=injections)

    def forward_logits(self, tokens: torch.Tensor, visual: torch.Tensor | None, start_pos: int = 0) -> torch.Tensor:
        """Incremental decoding with the KV cache, as the official ``forward_inference``.

        ``start_pos == 0`` (re)allocates the cache for this batch. Returns logits ``[B, L, V]``.
        """
        batch, length = tokens.shape
        if start_pos == 0:
            self.llm.setup_caches(batch, self.llm.config.max_seq_len)
        input_pos = torch.arange(start_pos, start_pos + length, device=tokens.device)
        return self(tokens, visual, input_pos)

    def training_loss(self, tokens: torch.Tensor, labels: torch.Tensor, images: torch.Tensor | None = None,
                      visual: torch.Tensor | None = None) -> torch.Tensor:
        """Official training loss: next-token cross-entropy, label 0 ignored, images injected with weight 1.

        Args:
            tokens: ``[B, S]`` input ids; labels: ``[B, S]`` targets with 0 on prompt and padding.
            images: ``[B, 3, 224, 224]`` images, or ``visual`` precomputed bind output ``[B, 1, dim]``.
        """
        if visual is None and images is not None:
            visual = self.encode_inputs({"image": (images, 1.0)})
        logits = self(tokens, visual)
        shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
        if not (shifted_labels != 0).any():  # the official code returns a zero that keeps the graph
            return shifted_logits.mean() * 0.0
        return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]).float(),
                               shifted_labels.reshape(-1), ignore_index=0)


    # ---------------------------------------------------------------- generation
    def media_injections(self, media: MediaInputs | Sequence[MediaInputs | None] | None,
                         cache: FeatureRetriever | None = None, **cache_options: Any) -> list[torch.Tensor | None] | None:
        """Per-layer injections for one request's media (a dict) or a batch (a list; None rows allowed).

        Returns None when no row has media, so the decoder runs exactly as the plain LLM.
        """
        if media is None:
            return None
        requests = [media] if isinstance(media, Mapping) else list(media)
        if not any(requests):
            return None
        visual, has_media = self.encode_requests(requests, cache, **cache_options)
        return self.injections(visual, None if bool(has_media.all()) else has_media)

    def _prompt_ids(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer: pass token ids, or set model.tokenizer")
        return [self.tokenizer.encode(p, bos=getattr(self.tokenizer, "add_bos", True)) if isinstance(p, str)
                else list(p) for p in prompts]

    def _generation_args(self, prompt_ids: list[list[int]], media: Any, cache: FeatureRetriever | None,
                         cache_top_k: int, cache_temperature: float, cache_weight: float,
                         max_new_tokens: int) -> dict[str, Any]:
        longest = max(len(p) for p in prompt_ids)
        room = self.llm.config.max_seq_len - longest
        if room <= 0:
            raise ValueError(f"a prompt of {longest} tokens leaves no room in the context of "
                             f"{self.llm.config.max_seq_len} tokens; shorten it")
        injections = self.media_injections(media, cache, top_k=cache_top_k, temperature=cache_temperature,
                                           weight=cache_weight)
        return dict(injections=injections, max_new_tokens=min(max_new_tokens, room))  # official: total <= max_seq_len

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str | Sequence[int]], media: Any = None, *,
                 cache: FeatureRetriever | None = None, cache_top_k: int = 10, cache_temperature: float = 20.0,
                 cache_weight: float = 0.5, max_new_tokens: int = 256, temperature: float = 0.1,
                 top_p: float | None = 0.75, **sampling: Any) -> list[Completion]:
        """Batched multimodal generation (official defaults: temperature 0.1, top-p 0.75, 256 new tokens).

        Args:
            prompts: formatted prompt strings (BOS added as the tokenizer wants) or token-id lists.
            media: ``{modality: (tensor, weight)}`` for a single prompt, or one such dict (or None) per
                prompt; rows may use different modalities. None: plain LLM.
            cache, cache_top_k, cache_temperature, cache_weight: the retrieval cache and its blend.
            sampling: ``top_k``, ``repetition_penalty``, ``stop_strings``, ``stop_token_ids``, ``generator``
                (see `imagebind_llm.llm.generate.generate`).
        """
        ids = self._prompt_ids(prompts)
        args = self._generation_args(ids, media, cache, cache_top_k, cache_temperature, cache_weight, max_new_tokens)
        return generate(self.llm, ids, tokenizer=self.tokenizer, temperature=temperature, top_p=top_p,
                        **args, **sampling)

    @torch.inference_mode()
    def stream(self, prompt: str | Sequence[int], media: MediaInputs | None = None, *,
               cache: FeatureRetriever | None = None, cache_top_k: int = 10, cache_temperature: float = 20.0,
               cache_weight: float = 0.5, max_new_tokens: int = 256, temperature: float = 0.1,
               top_p: float | None = 0.75, **sampling: Any) -> Iterator[str]:
        """Like `generate` for one prompt, yielding decoded text pieces as they are produced."""
        ids = self._prompt_ids([prompt])
        args = self._generation_args(ids, media, cache, cache_top_k, cache_temperature, cache_weight, max_new_tokens)
        yield from stream(self.llm, self.tokenizer, ids[0], temperature=temperature, top_p=top_p, **args, **sampling)

    def ask(self, question: str, media: MediaInputs | None = None, *, input: str | None = None, **kwargs: Any) -> str:
        """Answer one question about ``media`` with the official Alpaca prompt; returns the text."""
        return self.generate([alpaca_prompt(question, input)], media, **kwargs)[0].text

    # ---------------------------------------------------------------- official adapter files
    def load_adapter(self, source: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
        """Load an official adapter (``7B.pth``, ``7B-pretrained.pth``, ``7B-beta.pth`` layout) over the base.

        Like the official loader: no unexpected key is allowed, missing keys keep their current values
        (e.g. stage-2 LoRA/biases stay at their init when a stage-1 file is loaded). Returns the
        official names that were absent from the file.
        """
        official = dict(source) if isinstance(source, Mapping) else read_adapter_file(source)
        if is_legacy_bind(official) != self.config.legacy_bind:
            kind = "a legacy (LayerNorm + bias, 7B-beta)" if is_legacy_bind(official) else "an RMSNorm (7B)"
            raise CheckpointMismatchError(f"the adapter has {kind} bind network; build the model with "
                                          f"AdapterConfig(legacy_bind={is_legacy_bind(official)})")
        params = dict(self.named_parameters())
        unexpected, mismatched, loaded = [], [], {}
        for name, tensor in official.items():
            key = official_to_ours(name, self.first_injected_layer)
            if key not in params:
                unexpected.append(name)
                continue
            if key.startswith("gates."):
                tensor = tensor.reshape(-1)
            if tuple(tensor.shape) != tuple(params[key].shape):
                mismatched.append(f"{name}: file {tuple(tensor.shape)} vs model {tuple(params[key].shape)}")
            loaded[key] = tensor
        if unexpected:
            hint = " (a stage-2 file needs phase='finetune')" if any("lora" in k for k in unexpected) else ""
            raise CheckpointMismatchError(f"unexpected adapter keys{hint}: {_abbrev(unexpected)}")
        if mismatched:
            raise CheckpointMismatchError(f"adapter shapes do not match the model: {_abbrev(mismatched)}")
        with torch.no_grad():
            for key, tensor in loaded.items():
                params[key].copy_(tensor)
        names = official_names(self)
        return sorted(names[k] for k in self.adapter_parameter_names() if k not in loaded)

    def adapter_parameter_names(self) -> list[str]:
        """Our names of everything an official adapter file holds: bind net, prefix, gates, decoder
        norms, biases and LoRA (the official ``convert_ckpt.py`` keeps llama keys with norm/bias/lora)."""
        keep = _finetune_names(self.llm)
        return [n for n, _ in self.named_parameters()
                if n.startswith(("bind.", "gates.")) or n == "prefix" or n in keep]

    def official_adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Export to the official adapter layout (wrap as ``{'model': ...}`` to write a ``7B.pth``)."""
        params = dict(self.named_parameters())
        out = {}
        for key in self.adapter_parameter_names():
            name = ours_to_official(key, self.first_injected_layer)
            tensor = params[key].detach()
            out[name] = gate_to_official(tensor) if key.startswith("gates.") else tensor
        return out


def official_names(model: ImageBindLLM) -> dict[str, str]:
    """Our parameter name -> official ImageBind-LLM name, for every parameter of the model."""
    names = {}
    for key, _ in model.named_parameters():
        if key.startswith("encoder."):
            names[key] = "image_bind." + official_encoder_key(key[len("encoder."):])
        else:
            names[key] = ours_to_official(key, model.first_injected_layer)
    return names


def _abbrev(items: Sequence[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _weighted_sum(embeddings: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_i w_i / (sum_j w_j + 1e-6) * e_i`` with the weights as Python floats, as the official code."""
    values = {name: float(w) for name, w in weights.items()}
    if any(w < 0 for w in values.values()):
        raise ValueError(f"modality weights must be non-negative, got {values}")
    total = sum(values.values()) + 1e-6
    mixed = None
    for name, embedding in embeddings.items():
        term = (values[name] / total) * embedding
        mixed = term if mixed is None else mixed + term
    return mixed


def _as_row(x: torch.Tensor) -> torch.Tensor:
    """One request's media tensor, ``[1, ...]`` or ``[...]``, as ``[1, ...]``."""
    return x if x.ndim and x.shape[0] == 1 else x.unsqueeze(0)


def _item_shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(_as_row(x).shape[1:])


def _stack_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row media tensors of one shape (each ``[1, ...]`` or ``[...]``) -> one batch ``[N, ...]``."""
    return torch.cat([_as_row(t) for t in tensors])


# -------------------------------------------------------------------- what trains in each stage
def trainable_names(model: ImageBindLLM, phase: str) -> set[str]:
    """The official trainable sets: stage 1 bind net + prefix + gates; stage 2 decoder norms, biases, LoRA."""
    if phase == "pretrain":
        return {n for n, _ in model.named_parameters() if n.startswith(("bind.", "gates.")) or n == "prefix"}
    if phase == "finetune":
        return _finetune_names(model.llm)
    raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def _finetune_names(llm: Transformer) -> set[str]:
    names = set()
    for module_name, module in llm.named_modules():
        prefix = f"llm.{module_name}." if module_name else "llm."
        if isinstance(module, RMSNorm):
            names.add(prefix + "weight")
        if isinstance(module, nn.Linear) and module.bias is not None:
            names.add(prefix + "bias")
        if isinstance(module, LoRALinear):
            names.update({prefix + "lora_a.weight", prefix + "lora_b.weight"})
    return names


def set_trainable(model: ImageBindLLM, phase: str) -> list[str]:
    """Set ``requires_grad`` for the phase; returns the trainable parameter names."""
    names = trainable_names(model, phase)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return [name for name, _ in model.named_parameters() if name in names]
