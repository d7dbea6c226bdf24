"""ImageBind-LLM: multimodal instruction tuning of LLaMA-family models with a frozen ImageBind encoder.

    import imagebind_llm as ibl
    model = ibl.create_model()                       # or "imagebind-llm-7b", or ibl.ModelSpec(...)
    media = ibl.load_media({"image": "a.jpg"})
    print(model.ask("Describe the image.", media))
"""

__version__ = "0.1.0"

from imagebind_llm.cache.blend import BlendOptions
from imagebind_llm.llm.generate import SamplingOptions
from imagebind_llm.model import ImageBindLLM, ModelSpec, create_model, load_media

__all__ = ["BlendOptions", "ImageBindLLM", "ModelSpec", "SamplingOptions", "__version__", "create_model", "load_media"]
