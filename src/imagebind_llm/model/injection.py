"""The paper's equation: how ImageBind-LLM puts the media into the decoder (Han et al. 2023, §3.2).

For layer ``l`` (one of the last ``inject_layers`` layers), head ``h`` and every position ``t``::

    attn_out[t, h] = softmax(q_t K^T / sqrt(d) + mask) V  +  tanh(g_{l,h}) * (W_v^{(l)} (bind(F) + p_l))_h

``F`` is the weighted mix of L2-normalised ImageBind embeddings (optionally blended with the cache),
``bind`` the `BindNetwork`, ``p_l`` a learned per-layer prefix vector, ``g_l`` per-head gates
initialised to zero, and ``W_v`` the layer's frozen value projection (no LoRA on this path). For
grouped-query backbones the value heads are repeated to the query heads, as attention does.

The term depends on the media only, not on the tokens, so it is computed once per request and passed
to the decoder (`Transformer.forward(injections=...)`), which adds it before ``W_o``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imagebind_llm.llm.model import Transformer
from imagebind_llm.model.peft import base_linear


def injection_terms(llm: Transformer, visual: torch.Tensor, prefix: torch.Tensor, gates: Sequence[nn.Parameter],
                    has_media: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """Per-layer additive attention terms ``tanh(g_l) * W_v(visual + p_l)``, each ``[B, 1, H, head_dim]``.

    Args:
        llm: the decoder; the last ``len(gates)`` layers are injected, earlier ones get None.
        visual: bind-network output ``[B, 1, dim]``.
        prefix: ``[n_inject, dim]`` per-layer prefix vectors ``p_l``.
        gates: ``n_inject`` per-head gates ``g_l`` ``[H]``.
        has_media: optional ``[B]`` bool; rows without media get a zero term.
    """
    cfg = llm.config
    first = cfg.n_layers - len(gates)
    out: list[torch.Tensor | None] = [None] * first
    for j, layer in enumerate(llm.layers[first:]):
        adapter = visual + prefix[j].to(visual.dtype)
        values = base_linear(layer.attention.wv, adapter.to(llm.norm.weight.dtype))
        values = values.view(visual.shape[0], 1, cfg.n_kv_heads, cfg.head_dim)
        values = values.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=2)
        term = torch.tanh(gates[j]).to(values.dtype).view(1, 1, -1, 1) * values
        if has_media is not None:
            term = term * has_media.view(-1, 1, 1, 1).to(term.dtype)
        out.append(term)
    return out
