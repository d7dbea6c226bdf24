"""ImageBind-LLM: multimodal instruction tuning of LLaMA-family models with a frozen ImageBind encoder."""

__version__ = "0.1.0"
