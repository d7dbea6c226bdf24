"""A LLaMA-family decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

One `Transformer` covers LLaMA-1/2/3, SmolLM2 and Qwen2 through `LLMConfig` (tied or untied
embeddings, optional q/k/v biases, Llama-3 RoPE frequency scaling). Q/K projection weights use Meta's
original (and GGUF's) rotary layout: adjacent channel pairs ``(0, 1), (2, 3), ...`` of each head rotate
together. Hugging Face checkpoints store them in the "rotate-half" layout and are permuted on load.

Two ways to run it:

* Training / scoring: ``model(tokens)`` with no ``input_pos`` is plain causal attention over positions
  ``0..S-1`` and is differentiable.
* Generation: ``model.setup_caches(B, T)`` preallocates a static KV cache of ``T`` slots per row; then
  ``model(tokens, input_pos)`` writes the new keys/values at ``input_pos`` and attends to every cached
  slot at a position ``<=`` the query's. ``input_pos`` may be ``[S]`` (same positions for every row) or
  ``[B, S]`` (per-row positions). Batches of prompts of different lengths are right-padded: each row's
  padding sits at positions past its own prompt, is never attended to by the row's real tokens, and is
  overwritten by the row's generated tokens, so no separate padding mask is needed.

With quantised projections (`QuantizedLinear`, GGUF weights on the CPU), a decode-sized forward (up to
`KERNEL_MAX_ROWS` tokens) runs within `kernels.decoding`: each layer's norm and q/k/v projections are one
kernel call, a one-token step's rotary embeddings, cache write and attention another, the norm, gate
and up projections and SwiGLU a third, and torch's remaining small ops stay in the calling thread.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import LLMConfig, RopeScaling
from .quantized import KERNEL_MAX_ROWS, ProjectionGroup, QuantizedWeight


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference implementations."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32, cast back, then scale (Meta's order); one fused kernel for the first part.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x)

    def kernel_args(self) -> tuple[Tensor, float] | None:
        """``(weight, eps)`` for the quantised kernels to apply this norm inside a projection (`ProjectionGroup`),
        or None when the weight is not a contiguous float32 CPU tensor."""
        w = self.weight
        return (w, self.eps) if w.dtype == torch.float32 and w.is_cpu and w.is_contiguous() else None


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> Tensor:
    """Inverse rotary frequencies ``[head_dim // 2]`` (float32), with optional Llama-3 scaling.

    Llama-3 scaling leaves high frequencies (wavelength below ``original_max / high_freq_factor``)
    untouched, divides low frequencies (wavelength above ``original_max / low_freq_factor``) by
    ``factor``, and interpolates linearly in ``original_max / wavelength`` between the two bands.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    old = scaling.original_max_position_embeddings
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smooth = smooth.clamp(0.0, 1.0)  # 0 in the low band, 1 in the high band
    return (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq


def rope_table(config: LLMConfig, device: torch.device | str | None = None) -> Tensor:
    """Unit complex rotations ``exp(i * pos * freq)`` for every position, ``[max_seq_len, head_dim // 2]``."""
    inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling).to(device)
    angles = torch.outer(torch.arange(config.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` ``[B, S, H, D]`` by ``rope`` ``[B or 1, S, 1, D/2]`` (complex).

    One complex multiply per tensor: pairs ``(x[2j], x[2j+1])`` are the numbers ``x[2j] + i x[2j+1]``.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rope).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Static key/value cache: buffers ``[B, n_kv_heads, max_seq_len, head_dim]`` written in place."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, rows: slice = slice(None),
               length: int | None = None) -> tuple[Tensor, Tensor]:
        """Store ``k``/``v`` ``[B, Hkv, S, D]`` at positions ``input_pos`` ``[B, S]`` of cache rows ``rows``;
        return those rows' caches, their first ``length`` slots (default all)."""
        k_rows, v_rows = self.k[rows], self.v[rows]  # views: a slice of rows is contiguous
        slots = input_pos[:, None, :, None].expand(k.shape)
        k_rows.scatter_(2, slots, k.to(self.k.dtype))
        v_rows.scatter_(2, slots, v.to(self.v.dtype))
        return k_rows[:, :, :length], v_rows[:, :, :length]

    def copy_row(self, src: int, dst: int) -> None:
        """Make row ``dst`` a copy of row ``src`` (continuous batching compacts its rows this way)."""
        self.k[dst].copy_(self.k[src])
        self.v[dst].copy_(self.v[src])


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional per-head additive injection."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.wq = nn.Linear(config.dim, q_dim, bias=config.attn_bias)
        self.wk = nn.Linear(config.dim, kv_dim, bias=config.attn_bias)
        self.wv = nn.Linear(config.dim, kv_dim, bias=config.attn_bias)
        self.wo = nn.Linear(q_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self._qkv = ProjectionGroup()  # wq, wk, wv in one call when they are quantised (no weights of its own)

    def forward(self, x: Tensor, rope: Tensor, input_pos: Tensor | None = None,
                mask: Tensor | None = None, injection: Tensor | None = None,
                cache_rows: slice = slice(None), norm: nn.Module | None = None) -> Tensor:
        """Attention over ``x`` ``[B, S, dim]``.

        Args:
            x: hidden states ``[B, S, dim]``, normalised (or normalised here by ``norm``).
            rope: complex rotations for these positions, ``[B or 1, S, 1, head_dim / 2]``.
            input_pos: ``[B, S]`` cache positions; None for uncached causal attention.
            mask: ``[B, 1, S, T]`` bool, True where a query may see a cache slot (cached path only);
                only the first ``T`` slots are read.
            injection: None or a tensor broadcastable to ``[B, S, n_heads, head_dim]`` added to the
                attention output of every head before ``wo``.
            cache_rows: the KV cache rows these ``B`` rows use (a slice of length ``B``).
            norm: None, or the `RMSNorm` to apply to ``x`` first (inside the projections' kernel call
                when they are quantised).

        Returns:
            ``[B, S, dim]``.
        """
        B, S, _ = x.shape
        q, k, v = self._qkv((self.wq, self.wk, self.wv), x, norm)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        if input_pos is not None and S == 1 and kernels.in_decoding():  # rotary, cache write, attention: one call
            assert self.kv_cache is not None, "cached forward without setup_caches"
            y = kernels.attention(q, k, v, rope, self.kv_cache.k, self.kv_cache.v, input_pos, cache_rows,
                                  mask.shape[-1])
            if y is not None:
                if injection is not None:
                    y = (y.view(B, S, self.n_heads, self.head_dim) + injection).view(B, S, -1)
                return self.wo(y)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if input_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            assert self.kv_cache is not None, "cached forward without setup_caches"
            k, v = self.kv_cache.update(input_pos, k, v, cache_rows, mask.shape[-1])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2)
        if injection is not None:
            y = y + injection
        return self.wo(y.reshape(B, S, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self._gate_up = ProjectionGroup(gated=True)  # silu(w1 x) * w3 x in one call when they are quantised

    def forward(self, x: Tensor, norm: nn.Module | None = None) -> Tensor:
        """``x`` ``[..., dim]`` (normalised first by ``norm`` when given) -> ``[..., dim]``."""
        return self.w2(self._gate_up((self.w1, self.w3), x, norm)[0])


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, rope: Tensor, input_pos: Tensor | None = None,
                mask: Tensor | None = None, injection: Tensor | None = None,
                cache_rows: slice = slice(None)) -> Tensor:
        if kernels.in_decoding():  # the norms run inside the quantised projections' kernel calls
            h = x + self.attention(x, rope, input_pos, mask, injection, cache_rows, norm=self.attention_norm)
            return h + self.feed_forward(h, norm=self.ffn_norm)
        # (Outside: FSDP shards the attention and MLP apart from their norms, and training gives wrong
        # gradients when a norm of the root group runs inside a sharded module's forward.)
        h = x + self.attention(self.attention_norm(x), rope, input_pos, mask, injection, cache_rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The decoder: token embedding, ``n_layers`` blocks, final norm and LM head.

    With ``config.tie_embeddings`` the LM head's weight is the embedding's parameter itself;
    ``output.weight`` is then left out of ``state_dict()`` and not expected by ``load_state_dict``
    (the tie is restored after loading, also with ``assign=True``).
    """

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
            self.register_state_dict_post_hook(_drop_tied_output)
            self.register_load_state_dict_pre_hook(_fill_tied_output)
            self.register_load_state_dict_post_hook(_retie_output)
        self._head = ProjectionGroup()  # the final norm inside a quantised LM head's kernel call
        # RoPE tables are derived data, built lazily on the device in use (so meta init needs nothing).
        self._rope: Tensor | None = None
        # arange(T) over the KV cache slots, for the position mask; a buffer so that .to() moves it.
        self.register_buffer("_cache_slots", None, persistent=False)

    def setup_caches(self, batch_size: int, max_seq_len: int, *, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Preallocate one static KV cache per layer for ``batch_size`` rows of ``max_seq_len`` slots.

        Existing caches of exactly this shape, dtype and device are reused as they are: stale slots
        need no clearing because a query only sees slots at positions ``<=`` its own, and a new request
        rewrites positions from 0. ``dtype``/``device`` default to the model's parameters.
        """
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's "
                             f"config.max_seq_len={self.config.max_seq_len}; shorten the prompt or max_new_tokens")
        param = self.norm.weight  # a plain parameter even when the projections are quantised
        dtype = dtype or param.dtype
        device = torch.device(device) if device is not None else param.device
        old = self.layers[0].attention.kv_cache
        if old is not None and old.k.shape[0] == batch_size and old.k.shape[2] == max_seq_len \
                and old.k.dtype == dtype and old.k.device == device:
            return
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, max_seq_len, self.config.n_kv_heads,
                                               self.config.head_dim, dtype, device)
        self._cache_slots = torch.arange(max_seq_len, device=device)

    def reset_caches(self) -> None:
        """Free the KV caches; forward calls with ``input_pos`` then need `setup_caches` again."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self._cache_slots = None

    @property
    def caches_enabled(self) -> bool:
        return self._cache_slots is not None

    def _rope_for(self, positions: Tensor) -> Tensor:
        """Complex rotations ``[B or 1, S, 1, head_dim / 2]`` for integer ``positions`` ``[B or 1, S]``."""
        if self._rope is None or self._rope.device != positions.device:
            self._rope = rope_table(self.config, positions.device)
        return self._rope[positions].unsqueeze(2)

    def copy_cache_row(self, src: int, dst: int) -> None:
        """Copy KV cache row ``src`` over row ``dst`` in every layer."""
        for layer in self.layers:
            layer.attention.kv_cache.copy_row(src, dst)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, *,
                injections: Sequence[Tensor | None] | None = None,
                logits_index: Tensor | None = None, logits_mask: Tensor | None = None,
                cache_rows: slice | None = None, kv_len: int | None = None) -> Tensor:
        """Logits for ``tokens``.

        Args:
            tokens: ``[B, S]`` token ids.
            input_pos: None for uncached causal attention over positions ``0..S-1``; otherwise the
                positions of ``tokens`` in the KV cache, ``[S]`` or ``[B, S]`` (needs `setup_caches`).
            injections: None, or one entry per layer, each None or a tensor broadcastable to
                ``[B, S, n_heads, head_dim]`` added to that layer's attention output before ``wo``.
            logits_index: optional ``[B]`` index along ``S`` per row; only those positions go through
                the final norm and LM head (saves the ``[B, S, vocab]`` projection when generating).
            logits_mask: optional ``[B, S]`` bool; only the True positions go through the final norm and LM
                head (training: the positions that predict a label).
            cache_rows: which KV cache rows the ``B`` rows use (a slice of ``B`` rows); None: all rows.
                A continuous-batching scheduler prefills new requests into free rows this way.
            kv_len: attend over the first ``kv_len`` cache slots only (must exceed every position in
                ``input_pos``); None: all slots. Saves reading the unused tail of a long cache.

        Returns:
            ``[B, S, vocab_size]`` logits, ``[B, 1, vocab_size]`` with ``logits_index``, ``[N, vocab_size]``
            (the ``N`` True positions of ``logits_mask`` in row-major order) with ``logits_mask``.
        """
        B, S = tokens.shape
        if S > self.config.max_seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds config.max_seq_len={self.config.max_seq_len}")
        if injections is not None and len(injections) != len(self.layers):
            raise ValueError(f"injections has {len(injections)} entries; expected one per layer ({len(self.layers)})")
        mask = None
        if input_pos is None:
            positions = torch.arange(S, device=tokens.device)[None]
        else:
            if not self.caches_enabled:
                raise ValueError("input_pos given but no KV cache: call model.setup_caches(batch_size, max_seq_len)")
            cache_batch = self.layers[0].attention.kv_cache.k.shape[0]
            rows = cache_rows if cache_rows is not None else slice(None)
            if len(range(cache_batch)[rows]) != B:
                held = "" if cache_rows is None else f" rows {rows.start}:{rows.stop}"
                raise ValueError(f"batch of {B} rows but the KV cache{held} holds "
                                 f"{len(range(cache_batch)[rows])}; call setup_caches({B}, ...)")
            positions = input_pos = input_pos.expand(B, S)
            mask = input_pos[:, None, :, None] >= self._cache_slots[:kv_len]  # [B, 1, S, T]
        rope = self._rope_for(positions)
        with kernels.decoding() if self._on_kernels(tokens) else contextlib.nullcontext():
            x = self.tok_embeddings(tokens)
            for i, layer in enumerate(self.layers):
                x = layer(x, rope, input_pos, mask, None if injections is None else injections[i],
                          cache_rows if cache_rows is not None else slice(None))
            if logits_index is not None:
                x = x[torch.arange(B, device=x.device), logits_index].unsqueeze(1)
            elif logits_mask is not None:
                x = x[logits_mask]
            return self._head((self.output,), x, self.norm)[0]

    def _on_kernels(self, tokens: Tensor) -> bool:
        """Whether this forward is a decode-sized step whose projections run on the quantised kernels."""
        B, S = tokens.shape
        return (tokens.is_cpu and B * S <= KERNEL_MAX_ROWS and len(self.layers) > 0
                and isinstance(getattr(self.layers[0].feed_forward.w2, "quantized", None), QuantizedWeight))


def _drop_tied_output(module: Transformer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict.pop(prefix + "output.weight", None)


def _fill_tied_output(module: Transformer, state_dict: dict, prefix: str, *args) -> None:
    if prefix + "tok_embeddings.weight" in state_dict:
        state_dict.setdefault(prefix + "output.weight", state_dict[prefix + "tok_embeddings.weight"])


def _retie_output(module: Transformer, incompatible_keys) -> None:
    if isinstance(module.output, nn.Linear) and isinstance(module.tok_embeddings, nn.Embedding):
        module.output.weight = module.tok_embeddings.weight  # (quantised GGUF modules share theirs already)
