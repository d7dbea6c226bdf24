"""The paper's applications built on the engine: images out of the joint space (`unclip`).

    from imagebind_llm.apps import UnCLIP, image_embedding
    emb = image_embedding(engine, Request.ask("", {"audio": "rain.wav", "image": "street.jpg"}))
    UnCLIP("stabilityai/stable-diffusion-2-1-unclip").generate(emb, "a painting")[0].save("out.png")

diffusers is an optional extra: ``pip install 'imagebind-llm[images]'``.
"""

from .unclip import (DEFAULT_PIPELINE, POINT_SCALE, PipelineMissingError, UnCLIP, image_embedding,
                     prenorm_mix, tiny_pipeline)

__all__ = ["DEFAULT_PIPELINE", "POINT_SCALE", "PipelineMissingError", "UnCLIP", "image_embedding", "prenorm_mix",
           "tiny_pipeline"]
