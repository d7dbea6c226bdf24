"""ImageBind-LLM itself: config and `ModelSpec`, the bind network, the injection (`injection.py`, the
paper's equation), `ImageBindLLM`, media mixing and the modality table, LoRA and what each stage trains
(`peft.py`), official adapter keys (`convert.py`), and `create_model` (`factory.py`)."""

from .config import AdapterConfig, ModelSpec
from .factory import create_model, load_adapter_tensors, save_pretrained
from .imagebind_llm import ImageBindLLM
from .media import MODALITIES, MediaInputs, load_media

__all__ = ["AdapterConfig", "ImageBindLLM", "MODALITIES", "MediaInputs", "ModelSpec", "create_model", "load_adapter_tensors",
           "load_media", "save_pretrained"]
