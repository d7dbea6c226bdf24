"""Stage-2 parameter-efficient tuning of the decoder: LoRA, zero-initialised biases, trainable norms.

As in ImageBind-LLM (paper §3.3, official `llama.py`): LoRA of rank 16 on q/k/v/o and w1/w2/w3, added
to the frozen projection **without** the usual alpha/r scaling and without dropout; a zero bias on
wq, wo, w1, w2, w3; the RMSNorm weights become trainable.

`LoRALinear` subclasses `nn.Linear` and keeps its `weight`/`bias` keys, so a plain decoder state dict
loads into the adapted model unchanged (style anchors §5.1 item 7). Over a quantised GGUF projection
(`QuantizedLinear`) the frozen base stays in its blocks (``weight`` is None, the blocks are the
``quantized`` submodule): inference keeps the quantised kernels, and training works too (inputs that
need gradients multiply by the dequantised weight).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from imagebind_llm.llm.model import RMSNorm, Transformer
from imagebind_llm.llm.quantized import QuantizedLinear, QuantizedWeight

ATTENTION_PROJECTIONS = ("wq", "wk", "wv", "wo")
FFN_PROJECTIONS = ("w1", "w2", "w3")
BIASED_PROJECTIONS = ("wq", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Linear):
    """``y = x W^T + b + B(A(x))`` with ``A: in -> rank`` (Kaiming init) and ``B: rank -> out`` (zeros).

    The low-rank path is unscaled (scale 1.0), matching the official ImageBind-LLM code. The frozen
    ``W`` is the ``weight`` parameter, or, when built `from_linear` over a `QuantizedLinear`, the
    ``quantized`` blocks (and ``weight`` is None).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.quantized: QuantizedWeight | None = None
        self.lora_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))  # nn.Linear's default init
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Functional calls (not the submodules'): at small widths the module-call overhead is measurable.
        low_rank = F.linear(F.linear(x, self.lora_a.weight), self.lora_b.weight)
        return self.base_forward(x) + low_rank

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen projection alone (the path ImageBind-LLM's injection uses for W_v)."""
        if self.quantized is None:
            return F.linear(x, self.weight, self.bias)
        y = self.quantized.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + B A``: the weight of a plain linear computing the same function."""
        base = self.weight if self.quantized is None else self.quantized.dequantize()
        return base + (self.lora_b.weight @ self.lora_a.weight).to(base.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear | QuantizedLinear, rank: int) -> "LoRALinear":
        """Wrap an existing projection, sharing (not copying) its weight (or blocks) and bias."""
        if isinstance(linear, QuantizedLinear):
            device = linear.quantized.blocks.device
            dtype = linear.bias.dtype if linear.bias is not None else torch.float32
            with torch.device("meta"):  # no dense weight is ever allocated
                lora = cls(linear.in_features, linear.out_features, rank)
            lora.weight = None
            lora.quantized = linear.quantized
            lora.lora_a = nn.Linear(linear.in_features, rank, bias=False, device=device, dtype=dtype)
            lora.lora_b = nn.Linear(rank, linear.out_features, bias=False, device=device, dtype=dtype)
            lora.reset_lora_parameters()
        else:
            lora = cls(linear.in_features, linear.out_features, rank, bias=False,
                       device=linear.weight.device, dtype=linear.weight.dtype)
            lora.weight = linear.weight
        lora.bias = linear.bias
        return lora


def base_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a projection without any LoRA path it may carry."""
    if isinstance(linear, LoRALinear):
        return linear.base_forward(x)
    return linear(x)


def _add_zero_bias(linear: nn.Linear | QuantizedLinear) -> None:
    if linear.bias is None:
        device, dtype = ((linear.weight.device, linear.weight.dtype) if isinstance(linear, nn.Linear)
                         else (linear.quantized.blocks.device, torch.float32))
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=device, dtype=dtype))


def add_finetune_modules(llm: Transformer, rank: int = 16, first_layer: int = 0) -> None:
    """Turn a plain decoder into the stage-2 structure in place: LoRA and biases on q/o/w1/w2/w3 in every
    layer from ``first_layer`` on (official: 0, every layer).

    Idempotent: projections that already carry LoRA or a bias are left as they are. Quantised GGUF
    projections (`QuantizedLinear`) keep their blocks as the frozen base.
    """
    for layer in llm.layers[first_layer:]:
        for parent, names in ((layer.attention, ATTENTION_PROJECTIONS), (layer.feed_forward, FFN_PROJECTIONS)):
            for name in names:
                linear = getattr(parent, name)
                if name in BIASED_PROJECTIONS:
                    _add_zero_bias(linear)
                if not isinstance(linear, LoRALinear):
                    setattr(parent, name, LoRALinear.from_linear(linear, rank))


@torch.no_grad()
def merge_lora(llm: Transformer) -> None:
    """Fold every LoRA path into its base weight and put plain `nn.Linear`s back.

    Faster inference over a dense base; over a quantised base the merged weights are dense float32
    (several times more memory traffic per token than the blocks plus the small LoRA path).
    """
    for layer in llm.layers:
        for parent in (layer.attention, layer.feed_forward):
            for name, module in list(parent.named_children()):
                if isinstance(module, LoRALinear):
                    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                      device="meta")
                    plain.weight = nn.Parameter(module.merged_weight(), requires_grad=False)
                    plain.bias = module.bias
                    setattr(parent, name, plain)


# -------------------------------------------------------------------- what each stage trains
def finetune_params(llm: Transformer, prefix: str = "llm.", first_layer: int = 0) -> dict[str, nn.Parameter]:
    """Stage 2's trainable set, found by module type: RMSNorm weights, projection biases, LoRA weights, in
    the final norm and the layers from ``first_layer`` on. Nothing below ``first_layer`` trains, so the
    backward pass stops there."""
    params = {}
    for module_name, module in llm.named_modules():
        parts = module_name.split(".")
        if parts[0] == "layers" and len(parts) > 1 and int(parts[1]) < first_layer:
            continue
        name = f"{prefix}{module_name}." if module_name else prefix
        if isinstance(module, RMSNorm):
            params[name + "weight"] = module.weight
        if isinstance(module, nn.Linear) and module.bias is not None:
            params[name + "bias"] = module.bias
        if isinstance(module, LoRALinear):
            params[name + "lora_a.weight"] = module.lora_a.weight
            params[name + "lora_b.weight"] = module.lora_b.weight
    return params


def set_trainable(model: nn.Module, trainable: dict[str, nn.Parameter]) -> list[str]:
    """``requires_grad`` on exactly the ``trainable`` parameters of ``model``; returns their names in order."""
    chosen = {id(p) for p in trainable.values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)
    return [name for name, param in model.named_parameters() if id(param) in chosen]
