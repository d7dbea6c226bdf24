"""The engine: one loaded model serving requests with continuous batching, streaming, cancellation, a
bounded queue, and log-likelihood scoring. The server, the evaluation and the applications use it.

    engine = Engine(ibl.create_model())
    handle = engine.submit(Request.ask("What is in the image?", {"image": "a.jpg"}))
    for piece in handle.stream(): print(piece, end="")
"""

from imagebind_llm.cache.blend import BlendOptions
from imagebind_llm.model.media import MODALITIES, UnknownModalityError, modality, weighted_sum

from .chat import ChatSession
from .engine import Engine, EngineStopped, Handle, QueueFullError
from .request import Request
from .scoring import Score, loglikelihood, text_pairs

# BlendOptions, the modality table and the official mix are re-exported for the packages above the engine
# (serve, eval, apps).
__all__ = ["MODALITIES", "BlendOptions", "ChatSession", "Engine", "EngineStopped", "Handle", "QueueFullError",
           "Request", "Score", "UnknownModalityError", "loglikelihood", "modality", "text_pairs", "weighted_sum"]
