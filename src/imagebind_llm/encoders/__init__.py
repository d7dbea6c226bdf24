"""Frozen ImageBind encoders (six modalities + ImageBind-LLM's Point-BERT branch).

API summary::

    from imagebind_llm.encoders import ImageBind, ImageBindConfig, load_official

    cfg = ImageBindConfig.huge()                  # released model + imagebind_w3D point branch
    cfg = ImageBindConfig.huge(with_point=False)  # Meta's imagebind_huge.pth
    cfg = ImageBindConfig.from_dict(d)            # official ImageBindModel kwargs (+ point_* fields)
    model = load_official("imagebind_w3D.pth", dtype=torch.bfloat16)  # meta init + assign; .pth or .safetensors
    model = ImageBind(cfg).load_official(path_or_state_dict, strict=True)
    emb = model({"vision": x, "text": ids})       # {modality: [B, out_embed_dim]} float32
    emb, pre = model(inputs, return_prenorm=True) # pre: head outputs before normalise/scale

Inputs (``B`` any size; ``S`` = clips, averaged after post-processing):
``vision`` [B,3,224,224] or video [B,S,3,2,224,224]; ``text`` [B,77] long; ``audio`` [B,S,1,128,204];
``depth``/``thermal`` [B,1,224,224]; ``imu`` [B,6,2000]; ``point`` [B,N,3] (N >= point_num_group).
Outputs: L2-normalised and scaled per modality (vision 1, text learned <= 100, audio 20, depth 5,
thermal 10, imu 5, point 1). Bad inputs raise ``ValueError`` naming the modality and expected shape.
The model is built in eval mode and must stay there for inference (no DropPath/Dropout).

Checkpoint names: ``convert.official_key``, ``official_shapes``, ``to_official``, ``from_official``.
"""

from .convert import from_official, official_shapes, to_official
from .config import MODALITIES, ImageBindConfig
from .imagebind import ImageBind, load_official
from .point_bert import PointBERT, farthest_point_sample, knn_group

__all__ = [
    "MODALITIES", "ImageBind", "ImageBindConfig", "PointBERT", "farthest_point_sample", "from_official",
    "knn_group", "load_official", "official_shapes", "to_official",
]
