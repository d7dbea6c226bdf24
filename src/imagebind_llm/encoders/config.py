"""Configuration of the ImageBind encoder (six modalities) and its optional Point-BERT branch.

Field names are exactly the constructor arguments of the official ``ImageBindModel`` (defaults are the
official defaults), plus the ``point_*`` fields of ImageBind-LLM's Point-Bind branch. Sizes that the
official code fixes rather than exposes (image side, text context, IMU length) are constants here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu", "point")

IMAGE_SIZE = 224  # vision, depth and thermal inputs are [.., H, W] = 224 x 224
TEXT_CONTEXT = 77
TEXT_VOCAB = 49408
IMU_CHANNELS = 6
IMU_LENGTH = 2000
MLP_RATIO = 4
POINT_POS_HIDDEN = 128  # Point-BERT positional MLP: 3 -> 128 -> trans_dim

# Fixed (not learned) output scales; text's is learned and clamped at 100, vision has none.
LOGIT_SCALE_INIT = {"text": 1 / 0.07, "audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0, "point": 1.0}
MAX_LOGIT_SCALE = 100.0
POOLS = ("cls", "max")  # vision_pool


@dataclass
class ImageBindConfig:
    """Sizes of every ImageBind tower (official ``ImageBindModel`` argument names) and the point branch.

    Defaults are those of the official constructor; ``huge()`` is the released ``imagebind_huge``.
    Drop-path rates only matter for training (the encoder is frozen and runs in eval mode).

    Point branch (ImageBind-LLM's ``imagebind_w3D``): Point-BERT with ``point_depth`` blocks of width
    ``point_trans_dim``, ``point_num_group`` groups of ``point_group_size`` points, a mini-PointNet of
    ``point_encoder_dims`` channels and a ``[2 * point_trans_dim, point_proj_dim]`` projection.
    ``point_fps_start`` is the farthest-point-sampling start index (``None``: random, as upstream).
    ``with_point=False`` drops the branch (Meta's ``imagebind_huge.pth``).

    ``vision_conv_stem`` is our extension (empty, as in every released checkpoint: the official stem): the
    channels of stride-2 3x3 convolutions (BatchNorm, ReLU) that run on each frame before the patchify, the
    "early convolutions" of Xiao et al. 2021, which small vision towers trained from scratch need to learn
    shapes. ``kernel_size`` stays in input pixels, so the number of patches does not change.
    ``vision_pool`` is ours too: ``"cls"`` (official) pools the [CLS] token, ``"max"`` the element-wise
    maximum over the patch tokens, which a tower trained from scratch learns "is there a star?" and
    "which cells are occupied" from many times sooner.
    """

    video_frames: int = 2
    kernel_size: tuple[int, int, int] = (2, 14, 14)
    audio_kernel_size: int = 16
    audio_stride: int = 10
    out_embed_dim: int = 768
    vision_embed_dim: int = 1024
    vision_num_blocks: int = 24
    vision_num_heads: int = 16
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    audio_num_mel_bins: int = 128
    audio_target_len: int = 204
    audio_drop_path: float = 0.1
    text_embed_dim: int = 768
    text_num_blocks: int = 12
    text_num_heads: int = 12
    depth_embed_dim: int = 384
    depth_kernel_size: int = 16
    depth_num_blocks: int = 12
    depth_num_heads: int = 8
    depth_drop_path: float = 0.0
    thermal_embed_dim: int = 768
    thermal_kernel_size: int = 16
    thermal_num_blocks: int = 12
    thermal_num_heads: int = 12
    thermal_drop_path: float = 0.0
    imu_embed_dim: int = 512
    imu_kernel_size: int = 8
    imu_num_blocks: int = 6
    imu_num_heads: int = 8
    imu_drop_path: float = 0.7
    with_point: bool = True
    point_depth: int = 12
    point_num_group: int = 512
    point_group_size: int = 32
    point_trans_dim: int = 384
    point_heads: int = 6
    point_encoder_dims: int = 256
    point_proj_dim: int = 512
    point_drop_path: float = 0.1
    point_fps_start: int | None = 0
    vision_conv_stem: tuple[int, ...] = ()
    vision_pool: str = "cls"

    def __post_init__(self) -> None:
        self.kernel_size = tuple(int(k) for k in self.kernel_size)  # type: ignore[assignment]
        self.vision_conv_stem = tuple(int(c) for c in self.vision_conv_stem)  # type: ignore[assignment]
        if len(self.kernel_size) != 3:
            raise ValueError(f"kernel_size must be (time, height, width), got {self.kernel_size}")
        kt, kh, kw = self.kernel_size
        if self.video_frames % kt or IMAGE_SIZE % kh or IMAGE_SIZE % kw:
            raise ValueError(f"kernel_size={self.kernel_size} must tile video_frames={self.video_frames} "
                             f"and the {IMAGE_SIZE}x{IMAGE_SIZE} image")
        if self.vision_pool not in POOLS:
            raise ValueError(f"vision_pool={self.vision_pool!r}: choose one of {list(POOLS)}")
        stride = 2 ** len(self.vision_conv_stem)
        if min(self.vision_conv_stem, default=1) < 1:
            raise ValueError(f"vision_conv_stem={list(self.vision_conv_stem)}: channel counts must be positive")
        if kh % stride or kw % stride:
            raise ValueError(f"vision_conv_stem={list(self.vision_conv_stem)}: its stride-2 layers shrink frames "
                             f"{stride}x, which must divide the patch size {kh}x{kw} of kernel_size")
        if IMU_LENGTH % self.imu_kernel_size:
            raise ValueError(f"imu_kernel_size={self.imu_kernel_size} must divide the IMU length {IMU_LENGTH}")
        for m in ("vision", "text", "audio", "depth", "thermal", "imu") + (("point",) if self.with_point else ()):
            dim, heads = self.width(m), self.heads(m)
            if dim % heads:
                raise ValueError(f"{m}: embed dim {dim} is not divisible by its {heads} heads")
        if self.point_fps_start is not None and self.point_fps_start < 0:
            raise ValueError(f"point_fps_start must be >= 0 or None (random), got {self.point_fps_start}")

    # ---- per-modality views -------------------------------------------------------------------
    @property
    def modalities(self) -> tuple[str, ...]:
        return MODALITIES if self.with_point else MODALITIES[:-1]

    def width(self, modality: str) -> int:
        return self.point_trans_dim if modality == "point" else getattr(self, f"{modality}_embed_dim")

    def heads(self, modality: str) -> int:
        return self.point_heads if modality == "point" else getattr(self, f"{modality}_num_heads")

    def depth(self, modality: str) -> int:
        return self.point_depth if modality == "point" else getattr(self, f"{modality}_num_blocks")

    def drop_path(self, modality: str) -> float:
        return getattr(self, f"{modality}_drop_path", 0.0)

    def num_patches(self, modality: str) -> int:
        """Number of patch tokens (without CLS) the stem of ``modality`` produces."""
        if modality == "vision":
            kt, kh, kw = self.kernel_size
            return (self.video_frames // kt) * (IMAGE_SIZE // kh) * (IMAGE_SIZE // kw)
        if modality == "audio":
            k, s = self.audio_kernel_size, self.audio_stride
            return ((self.audio_num_mel_bins - k) // s + 1) * ((self.audio_target_len - k) // s + 1)
        if modality in ("depth", "thermal"):
            return (IMAGE_SIZE // getattr(self, f"{modality}_kernel_size")) ** 2
        if modality == "imu":
            return IMU_LENGTH // self.imu_kernel_size
        if modality == "text":
            return TEXT_CONTEXT
        raise ValueError(f"unknown modality {modality!r}")

    # ---- named configurations and serialisation -----------------------------------------------
    @classmethod
    def huge(cls, with_point: bool = True, **overrides: Any) -> ImageBindConfig:
        """The released ``imagebind_huge``; ``with_point=True`` adds the ``imagebind_w3D`` point branch."""
        return cls(**{**HUGE, "with_point": with_point, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kernel_size"] = list(self.kernel_size)
        d["vision_conv_stem"] = list(self.vision_conv_stem)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageBindConfig:
        """Build from a dict of field names (e.g. the official ``ImageBindModel`` kwargs); unknown keys raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ImageBindConfig fields {unknown}; valid fields are {sorted(names)}")
        return cls(**d)


# Official `imagebind_huge()` overrides of the constructor defaults.
HUGE: dict[str, Any] = dict(
    vision_embed_dim=1280, vision_num_blocks=32, vision_num_heads=16,
    text_embed_dim=1024, text_num_blocks=24, text_num_heads=16,
    out_embed_dim=1024, audio_drop_path=0.1, imu_drop_path=0.7,
)
