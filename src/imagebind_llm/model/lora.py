"""Stage-2 parameter-efficient tuning of the decoder: LoRA, zero-initialised biases, trainable norms.

As in ImageBind-LLM (paper §3.3, official `llama.py`): LoRA of rank 16 on q/k/v/o and w1/w2/w3, added
to the frozen projection **without** the usual alpha/r scaling and without dropout; a zero bias on
wq, wo, w1, w2, w3; the RMSNorm weights become trainable.

`LoRALinear` subclasses `nn.Linear` and keeps its `weight`/`bias` keys, so a plain decoder state dict
loads into the adapted model unchanged (style anchors §5.1 item 7).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from imagebind_llm.llm.model import Transformer
from imagebind_llm.llm.quantized import QuantizedLinear

ATTENTION_PROJECTIONS = ("wq", "wk", "wv", "wo")
FFN_PROJECTIONS = ("w1", "w2", "w3")
BIASED_PROJECTIONS = ("wq", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Linear):
    """``y = x W^T + b + B(A(x))`` with ``A: in -> rank`` (Kaiming init) and ``B: rank -> out`` (zeros).

    The low-rank path is unscaled (scale 1.0), matching the official ImageBind-LLM code.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.lora_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))  # nn.Linear's default init
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_b(self.lora_a(x))

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen projection alone (the path ImageBind-LLM's injection uses for W_v)."""
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + B A``: the weight of a plain linear computing the same function."""
        return self.weight + self.lora_b.weight @ self.lora_a.weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LoRALinear":
        """Wrap an existing linear, sharing (not copying) its weight and bias tensors."""
        lora = cls(linear.in_features, linear.out_features, rank, bias=False,
                   device=linear.weight.device, dtype=linear.weight.dtype)
        lora.weight = linear.weight
        lora.bias = linear.bias
        return lora


def base_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply a projection without any LoRA path it may carry."""
    if isinstance(linear, LoRALinear):
        return linear.base_forward(x)
    return linear(x)


def _add_zero_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device,
                                               dtype=linear.weight.dtype))


def add_finetune_modules(llm: Transformer, rank: int = 16) -> None:
    """Turn a plain decoder into the stage-2 structure in place: LoRA everywhere, biases on q/o/w1/w2/w3.

    Idempotent: projections that already carry LoRA or a bias are left as they are. Quantised GGUF
    projections (`QuantizedLinear`) are dequantised to float32 first: LoRA trains on dense weights.
    """
    for layer in llm.layers:
        for parent, names in ((layer.attention, ATTENTION_PROJECTIONS), (layer.feed_forward, FFN_PROJECTIONS)):
            for name in names:
                linear = getattr(parent, name)
                if isinstance(linear, QuantizedLinear):
                    linear = linear.to_linear()
                if name in BIASED_PROJECTIONS:
                    _add_zero_bias(linear)
                if not isinstance(linear, LoRALinear):
                    setattr(parent, name, LoRALinear.from_linear(linear, rank))


@torch.no_grad()
def merge_lora(llm: Transformer) -> None:
    """Fold every LoRA path into its base weight and put plain `nn.Linear`s back (for fast inference)."""
    for layer in llm.layers:
        for parent in (layer.attention, layer.feed_forward):
            for name, module in list(parent.named_children()):
                if isinstance(module, LoRALinear):
                    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                      device="meta")
                    plain.weight = nn.Parameter(module.merged_weight(), requires_grad=False)
                    plain.bias = module.bias
                    setattr(parent, name, plain)
