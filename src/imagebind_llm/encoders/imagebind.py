"""ImageBind: one transformer tower per modality, all mapping into a shared embedding space.

Per modality: stem (patchify / embed) -> [CLS] + learned positions -> pre-norm transformer ->
LayerNorm and pooling (CLS token, the EOT token for text, or with our
``vision_pool="max"`` the maximum over patch tokens) -> bias-free projection to
``out_embed_dim`` (the "head" output) -> L2 normalisation times a per-modality scale (text: learned,
clamped at 100; audio 20, depth 5, thermal 10, imu 5, point 1; vision: none).

Inputs with a clip axis (``ndim >= 5``: video ``[B, S, 3, T, H, W]``, audio ``[B, S, 1, mel, frames]``)
are embedded per clip, post-processed, then averaged over clips (not re-normalised).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagebind_llm.hub import read_state_dict

from .convert import from_official, has_point_branch
from .config import (
    IMAGE_SIZE, IMU_CHANNELS, IMU_LENGTH, LOGIT_SCALE_INIT, MAX_LOGIT_SCALE, TEXT_CONTEXT, TEXT_VOCAB,
    ImageBindConfig,
)
from .layers import Block, drop_path_rates
from .point_bert import PointTrunk

log = logging.getLogger(__name__)

TRUNK_LN_EPS = 1e-6  # blocks, vision pre-norm, heads
STEM_LN_EPS = 1e-5  # audio / depth / thermal / imu stems


# ---------------------------------------------------------------------------------------------------
# Stems: raw input -> [B, N, D] patch tokens
# ---------------------------------------------------------------------------------------------------
class VisionStem(nn.Module):
    """Images ``[B, 3, H, W]`` (repeated to ``video_frames``) or clips ``[B, 3, T, H, W]`` -> Conv3d patches
    ``[B, N, dim]``, after the optional per-frame convolutions of ``conv_stem`` (``ImageBindConfig``)."""

    def __init__(self, dim: int, kernel_size: tuple[int, int, int], video_frames: int,
                 conv_stem: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.video_frames = video_frames
        layers: list[nn.Module] = []
        for c_in, c_out in zip((3, *conv_stem), conv_stem):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.convs = nn.Sequential(*layers) if layers else None
        kt, kh, kw = kernel_size
        shrink = 2 ** len(conv_stem)  # kernel_size is in input pixels
        patch = (kt, kh // shrink, kw // shrink)
        self.proj = nn.Conv3d(conv_stem[-1] if conv_stem else 3, dim, kernel_size=patch, stride=patch, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if self.convs is not None:  # per frame, before an image is repeated into a clip
            b, _, t = x.shape[:3]
            x = self.convs(x.transpose(1, 2).flatten(0, 1))  # [B*T, C, H', W']
            x = x.unflatten(0, (b, t)).transpose(1, 2)
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.video_frames, -1, -1)
        return self.proj(x).flatten(2).transpose(1, 2)


class ConvStem(nn.Module):
    """Single-channel maps ``[B, 1, H, W]`` -> Conv2d patches -> LayerNorm (audio, depth, thermal)."""

    def __init__(self, dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=kernel_size, stride=stride, bias=False)
        self.norm = nn.LayerNorm(dim, eps=STEM_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class IMUStem(nn.Module):
    """IMU ``[B, 6, L]`` -> windows of ``k`` steps ``[B, L/k, 6*k]`` (channel-major) -> Linear -> LayerNorm."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.proj = nn.Linear(IMU_CHANNELS * kernel_size, dim, bias=False)
        self.norm = nn.LayerNorm(dim, eps=STEM_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        x = x.unfold(-1, k, k).permute(0, 2, 1, 3).flatten(2)  # [B, L/k, 6*k]
        return self.norm(self.proj(x))


def _make_stem(modality: str, c: ImageBindConfig) -> nn.Module:
    dim = c.width(modality)
    if modality == "vision":
        return VisionStem(dim, c.kernel_size, c.video_frames, c.vision_conv_stem)
    if modality == "audio":
        return ConvStem(dim, c.audio_kernel_size, c.audio_stride)
    if modality in ("depth", "thermal"):
        k = getattr(c, f"{modality}_kernel_size")
        return ConvStem(dim, k, k)
    if modality == "imu":
        return IMUStem(dim, c.imu_kernel_size)
    raise ValueError(f"no stem for modality {modality!r}")


# ---------------------------------------------------------------------------------------------------
# Towers: input -> head output [B, out_embed_dim]
# ---------------------------------------------------------------------------------------------------
class _Tower(nn.Module):
    """Shared head (LayerNorm -> bias-free Linear) and post-processor (normalise, scale)."""

    def _init_head(self, modality: str, in_dim: int, out_dim: int) -> None:
        self.head_norm = nn.LayerNorm(in_dim, eps=TRUNK_LN_EPS)
        self.head_proj = nn.Linear(in_dim, out_dim, bias=False)
        self.log_logit_scale: torch.Tensor | None
        if modality == "text":
            self.log_logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT[modality]).log())
        elif modality in LOGIT_SCALE_INIT:
            self.register_buffer("log_logit_scale", torch.tensor(LOGIT_SCALE_INIT[modality]).log())
        else:
            self.log_logit_scale = None

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head_proj(self.head_norm(pooled))

    def postprocess(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` head output -> float32 ``normalize(h) * scale``."""
        e = F.normalize(h.float(), dim=-1)
        if self.log_logit_scale is None:
            return e
        return e * self.log_logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)


class TransformerTower(_Tower):
    """One ImageBind modality: stem, [CLS], positions, transformer blocks, pooled head (`pool`)."""

    def __init__(self, modality: str, c: ImageBindConfig) -> None:
        super().__init__()
        dim, n = c.width(modality), c.num_patches(modality)
        self.is_text = modality == "text"
        self.max_pool = modality == "vision" and c.vision_pool == "max"
        if self.is_text:
            self.token_embedding = nn.Embedding(TEXT_VOCAB, dim)
            self.cls_token = None
        else:
            self.stem = _make_stem(modality, c)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            n += 1
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        self.pre_norm = nn.LayerNorm(dim, eps=TRUNK_LN_EPS) if modality == "vision" else None
        bias_kv = modality in ("audio", "depth", "thermal", "imu")
        self.blocks = nn.ModuleList(
            Block(dim, c.heads(modality), eps=TRUNK_LN_EPS, add_bias_kv=bias_kv, drop_path=p)
            for p in drop_path_rates(c.drop_path(modality), c.depth(modality)))
        self._init_head(modality, dim, c.out_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Input batch (already validated) -> head output ``[B, out_embed_dim]``."""
        if self.is_text:
            h = self.token_embedding(x)
        else:
            h = self.stem(x)
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.pos_embed
        if self.pre_norm is not None:
            h = self.pre_norm(h)
        for block in self.blocks:
            h = block(h, causal=self.is_text)
        return self.head(self.pool(h, x))

    def pool(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, S, D]`` (``S = 1 + N``: CLS first; text: its 77 tokens) -> ``[B, D]``: text at its
        end-of-text token (the largest id in ``x``), vision with ``vision_pool="max"`` at the maximum over patch
        tokens, every other tower at CLS."""
        if self.is_text:
            return h[torch.arange(h.shape[0], device=h.device), x.argmax(-1)]
        return h[:, 1:].amax(dim=1) if self.max_pool else h[:, 0]


class PointTower(_Tower):
    """Point-BERT trunk + projection, then the point head: ``[B, N, 3]`` -> ``[B, out_embed_dim]``."""

    def __init__(self, c: ImageBindConfig) -> None:
        super().__init__()
        self.trunk = PointTrunk(c)
        self._init_head("point", c.point_proj_dim, c.out_embed_dim)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.head(self.trunk(x, generator))


# ---------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------
def _expected(modality: str, c: ImageBindConfig) -> str:
    s, f = IMAGE_SIZE, c.video_frames
    return {
        "vision": f"[B, 3, {s}, {s}] images or [B, S, 3, {f}, {s}, {s}] video clips",
        "text": f"[B, {TEXT_CONTEXT}] integer token ids in [0, {TEXT_VOCAB})",
        "audio": f"[B, S, 1, {c.audio_num_mel_bins}, {c.audio_target_len}] log-mel clips "
                 f"(or [B, 1, {c.audio_num_mel_bins}, {c.audio_target_len}] for one clip)",
        "depth": f"[B, 1, {s}, {s}] depth maps",
        "thermal": f"[B, 1, {s}, {s}] thermal images",
        "imu": f"[B, {IMU_CHANNELS}, {IMU_LENGTH}] IMU signals",
        "point": f"[B, N, 3] point clouds with N >= {max(c.point_num_group, c.point_group_size)}",
    }[modality]


def _item_shape_ok(modality: str, shape: tuple[int, ...], c: ImageBindConfig) -> bool:
    s = IMAGE_SIZE
    if modality == "vision":
        return shape == (3, s, s) or (len(shape) == 4 and shape[0] == 3 and shape[1] in (1, c.video_frames)
                                      and shape[2:] == (s, s))
    if modality == "text":
        return shape == (TEXT_CONTEXT,)
    if modality == "audio":
        return shape == (1, c.audio_num_mel_bins, c.audio_target_len)
    if modality in ("depth", "thermal"):
        return shape == (1, s, s)
    if modality == "imu":
        return shape == (IMU_CHANNELS, IMU_LENGTH)
    return len(shape) == 2 and shape[1] == 3 and shape[0] >= max(c.point_num_group, c.point_group_size)


def check_input(modality: str, x: torch.Tensor, c: ImageBindConfig) -> tuple[torch.Tensor, int | None]:
    """Validate one modality's input and fold a clip axis into the batch.

    Returns:
        ``(x, clips)``: ``x`` with batch (and clips) flattened, ``clips`` the clip count or ``None``.

    Raises:
        ValueError: naming the modality, the received and the expected shape or dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{modality}: expected a torch.Tensor of shape {_expected(modality, c)}, "
                         f"got {type(x).__name__}")
    clips = None
    shape = tuple(x.shape)
    if x.ndim >= 5 and modality != "point":
        clips = shape[1]
        x = x.flatten(0, 1)
    if x.ndim < 2 or x.shape[0] == 0 or (clips == 0) or not _item_shape_ok(modality, tuple(x.shape[1:]), c):
        raise ValueError(f"{modality}: got shape {list(shape)}, expected {_expected(modality, c)}; "
                         "use imagebind_llm.preprocess to build inputs of the right shape")
    if modality == "text":
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"text: token ids must be an integer tensor (torch.long), got {x.dtype}")
        if int(x.min()) < 0 or int(x.max()) >= TEXT_VOCAB:
            raise ValueError(f"text: token ids must lie in [0, {TEXT_VOCAB}), got range "
                             f"[{int(x.min())}, {int(x.max())}]; tokenize with imagebind_llm.preprocess")
    else:
        if not x.is_floating_point():
            raise ValueError(f"{modality}: expected a floating-point tensor {_expected(modality, c)}, "
                             f"got dtype {x.dtype}; convert with .float()")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{modality}: input contains NaN or infinite values; clean or re-preprocess it")
    return x, clips


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
class ImageBind(nn.Module):
    """All ImageBind towers (and optionally the Point-BERT branch) in one module.

    Call ``model({modality: tensor})`` in eval mode; see the module docstring for the semantics.
    """

    def __init__(self, config: ImageBindConfig) -> None:
        super().__init__()
        self.config = config
        towers: dict[str, nn.Module] = {m: TransformerTower(m, config) for m in config.modalities if m != "point"}
        if config.with_point:
            towers["point"] = PointTower(config)
        self.towers = nn.ModuleDict(towers)
        self.eval()

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

    def _prepare(self, modality: str, x: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        if modality not in self.towers:
            hint = " (this model has no point branch: build it with with_point=True)" if modality == "point" else ""
            raise ValueError(f"unknown modality {modality!r}{hint}; expected one of {list(self.towers)}")
        x, clips = check_input(modality, x, self.config)
        ref = next(self.towers[modality].parameters())
        if modality == "text":
            return x.to(device=ref.device, dtype=torch.long), clips
        # Points are grouped in float32 inside the tower; everything else runs in the model dtype.
        return x.to(device=ref.device, dtype=torch.float32 if modality == "point" else ref.dtype), clips

    def forward(self, inputs: Mapping[str, torch.Tensor], *, return_prenorm: bool = False,
                generator: torch.Generator | None = None
                ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Embed each modality of ``inputs``.

        Args:
            inputs: ``{modality: tensor}``; shapes as listed in the package docstring.
            return_prenorm: also return the head outputs before normalisation and scaling (clip-averaged),
                as the official ``prenorm=True`` (used for image generation).
            generator: RNG for the point branch when ``config.point_fps_start`` is ``None``.

        Returns:
            ``{modality: [B, out_embed_dim]}`` float32 embeddings, or ``(embeddings, prenorm)``.
        """
        if not isinstance(inputs, Mapping):
            raise ValueError(f"ImageBind expects a dict {{modality: tensor}}, got {type(inputs).__name__}")
        out, pre = {}, {}
        for modality, value in inputs.items():
            x, clips = self._prepare(modality, value)
            tower = self.towers[modality]
            h = tower(x, generator) if modality == "point" else tower(x)
            e = tower.postprocess(h)
            if clips is not None:
                e = e.unflatten(0, (-1, clips)).mean(1)
                h = h.unflatten(0, (-1, clips)).mean(1)
            out[modality] = e
            pre[modality] = h.float()
        return (out, pre) if return_prenorm else out

    def load_official(self, source: str | Path | Mapping[str, torch.Tensor], strict: bool = True, *,
                      dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ImageBind:
        """Load an official state dict (``imagebind_huge.pth``, ``imagebind_w3D.pth``, ``.safetensors``).

        Tensors are assigned in place of the current parameters (build the model on the ``meta``
        device to avoid allocating it twice). Floating tensors are cast to ``dtype`` (default: the
        model's current dtype; scalar log logit scales stay float32), everything moved to ``device``
        (default: the model's device, CPU for meta).

        Raises:
            ValueError: on missing or unexpected keys (strict) or shape mismatches, naming them.
        """
        state = read_state_dict(source, what="ImageBind checkpoint") if isinstance(source, (str, Path)) else source
        ours = from_official(state, self, strict=strict)
        current = self.state_dict(keep_vars=True)
        converted = {}
        for key, value in ours.items():
            ref = current[key]
            dev = device if device is not None else ("cpu" if ref.is_meta else ref.device)
            if not value.is_floating_point():
                dt = value.dtype
            elif value.ndim == 0:  # log logit scales: float32 keeps low-precision models' scales exact
                dt = torch.float32
            else:
                dt = dtype or ref.dtype
            converted[key] = value.to(device=dev, dtype=dt)
        self.load_state_dict(converted, strict=strict, assign=True)
        still_meta = [k for k, v in self.state_dict(keep_vars=True).items() if v.is_meta]
        if still_meta:
            raise ValueError(f"these tensors were not in the checkpoint and have no values: {still_meta[:10]}"
                             f"{' ...' if len(still_meta) > 10 else ''}")
        return self


def load_official(source: str | Path | Mapping[str, torch.Tensor],
                  config: ImageBindConfig | Mapping[str, Any] | str | Path | None = None, *,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ImageBind:
    """Build an ``ImageBind`` on the meta device and load an official checkpoint straight into ``dtype``.

    Args:
        source: path (``.pth``/``.pt``/``.safetensors``) or an official-layout state dict.
        config: an `ImageBindConfig`; or official ``ImageBindModel`` arguments as a dict or a JSON file
            (optionally wrapped as ``{"ImageBindModel_kwargs": {...}}``), whose ``with_point`` defaults
            to whether the checkpoint has a point branch; None: ``ImageBindConfig.huge()``, likewise.
    """
    state = read_state_dict(source, what="ImageBind checkpoint") if isinstance(source, (str, Path)) else source
    if isinstance(config, (str, Path)):
        config = read_config(Path(config), has_point_branch(state))
    elif not isinstance(config, ImageBindConfig):
        fields = dict(config or {})
        fields = {"with_point": has_point_branch(state), **fields.get("ImageBindModel_kwargs", fields)}
        config = ImageBindConfig.from_dict(fields) if config is not None else ImageBindConfig.huge(**fields)
    with torch.device("meta"):
        model = ImageBind(config)
    model.load_official(state, dtype=dtype, device=device)
    log.info("loaded ImageBind (%s) in %s on %s", "with point branch" if config.with_point else "no point branch",
             dtype, device)
    return model.eval()


def read_config(path: Path, with_point: bool) -> ImageBindConfig:
    """The config of a JSON file of ``ImageBindModel`` arguments (optionally under ``"ImageBindModel_kwargs"``);
    ``with_point`` unless the file says.

    Raises:
        ValueError: naming the file: not UTF-8 JSON, not an object, or unknown fields.
    """
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"ImageBind config {path} is not valid JSON ({e})") from None
    if isinstance(fields, dict):
        fields = fields.get("ImageBindModel_kwargs", fields)
    if not isinstance(fields, dict):
        raise ValueError(f"ImageBind config {path} must hold a JSON object of ImageBindModel arguments")
    try:
        return ImageBindConfig.from_dict({"with_point": with_point, **fields})
    except ValueError as e:
        raise ValueError(f"ImageBind config {path}: {e}") from None
