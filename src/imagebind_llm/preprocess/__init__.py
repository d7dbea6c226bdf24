"""Media preprocessing for ImageBind / Point-Bind: files (paths, bytes, file objects or decoded data) in,
model-ready tensors out. Every loader raises `MediaError` (a ``ValueError``) naming the bad input.

Shapes: images ``[N, 3, 224, 224]``, audio ``[N, 3, 1, 128, 204]``, video ``[N, 15, 3, 2, 224, 224]``,
text ``[N, 77]``, points ``[N, n_points, 3]``, depth/thermal ``[N, 1, 224, 224]``, IMU ``[N, 6, 2000]``.
"""

from .audio import AudioConfig, load_audio
from .errors import MediaError
from .image import ImageConfig, load_images, train_transform
from .points import load_points
from .sensors import DepthConfig, IMUConfig, ThermalConfig, depth_to_disparity, load_depth, load_imu, load_thermal
from .text import ClipTokenizer, tokenize
from .video import VideoConfig, load_video

__all__ = [
    "AudioConfig",
    "ClipTokenizer",
    "DepthConfig",
    "IMUConfig",
    "ImageConfig",
    "MediaError",
    "ThermalConfig",
    "VideoConfig",
    "depth_to_disparity",
    "load_audio",
    "load_depth",
    "load_images",
    "load_imu",
    "load_points",
    "load_thermal",
    "load_video",
    "tokenize",
    "train_transform",
]
