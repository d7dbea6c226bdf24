"""Point-BERT point-cloud encoder as used by ImageBind-LLM's Point-Bind branch.

``points [B, N, 3]`` -> farthest point sampling of ``G`` centres -> kNN groups of ``K`` points
(relative to their centre) -> mini-PointNet per group -> ``G`` tokens + CLS -> transformer (the
positional embedding of the centres is re-added before every block) -> LayerNorm ->
``[CLS || max over tokens]`` ``[B, 2 * W]`` -> ``@ pc_projection`` ``[B, P]``.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import POINT_POS_HIDDEN, ImageBindConfig
from .layers import Block, drop_path_rates

POINT_LN_EPS = 1e-5


def farthest_point_sample(xyz: torch.Tensor, n: int, start: int | None = 0,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Iterative farthest point sampling.

    Args:
        xyz: ``[B, N, 3]`` points.
        n: number of points to pick.
        start: index of the first pick; ``None`` draws it at random per cloud (upstream behaviour).
        generator: RNG for the random start.

    Returns:
        ``[B, n]`` int64 indices; ties go to the lowest index.
    """
    B, N, _ = xyz.shape
    if start is None:
        first = torch.randint(0, N, (B,), generator=generator, device=xyz.device)
    else:
        first = torch.full((B,), start, dtype=torch.long, device=xyz.device)
    idx = torch.empty(B, n, dtype=torch.long, device=xyz.device)
    dist = torch.full((B, N), 1e10, dtype=xyz.dtype, device=xyz.device)
    batch = torch.arange(B, device=xyz.device)
    far = first
    for i in range(n):
        idx[:, i] = far
        centre = xyz[batch, far].unsqueeze(1)  # [B, 1, 3]
        dist = torch.minimum(dist, ((xyz - centre) ** 2).sum(-1))
        far = dist.argmax(-1)
    return idx


def knn_group(xyz: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, G, k]`` of the ``k`` nearest points of ``xyz [B, N, 3]`` to each of ``centres [B, G, 3]``.

    Squared distances use the ``|c|^2 - 2 c.p + |p|^2`` expansion of Point-BERT so that near-ties at the
    k-th neighbour resolve the same way.
    """
    d = -2 * centres @ xyz.transpose(1, 2)
    d = d + (centres**2).sum(-1, keepdim=True) + (xyz**2).sum(-1).unsqueeze(1)
    return d.topk(k, dim=-1, largest=False, sorted=False).indices


class MiniPointNet(nn.Module):
    """Shared per-group PointNet: ``[B*G, K, 3]`` -> ``[B*G, C]`` (BatchNorm uses running stats in eval)."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, out_dim, 1))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        f = self.first_conv(groups.transpose(1, 2))  # [BG, 256, K]
        g = f.amax(dim=2, keepdim=True).expand_as(f)
        f = self.second_conv(torch.cat([g, f], dim=1))  # [BG, C, K]
        return f.amax(dim=2)


class PointBERT(nn.Module):
    """Point-BERT encoder: ``[B, N, 3]`` -> ``[B, 2 * point_trans_dim]`` (CLS and max-pooled tokens)."""

    def __init__(self, config: ImageBindConfig) -> None:
        super().__init__()
        c, w = config, config.point_trans_dim
        self.num_group, self.group_size, self.fps_start = c.point_num_group, c.point_group_size, c.point_fps_start
        self.encoder = MiniPointNet(c.point_encoder_dims)
        self.reduce_dim = nn.Linear(c.point_encoder_dims, w)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Sequential(nn.Linear(3, POINT_POS_HIDDEN), nn.GELU(), nn.Linear(POINT_POS_HIDDEN, w))
        self.blocks = nn.ModuleList(
            Block(w, c.point_heads, eps=POINT_LN_EPS, qkv_bias=False, drop_path=p)
            for p in drop_path_rates(c.point_drop_path, c.point_depth))
        self.norm = nn.LayerNorm(w, eps=POINT_LN_EPS)

    def group(self, xyz: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Split ``xyz [B, N, 3]`` into neighbourhoods ``[B, G, K, 3]`` (relative) and centres ``[B, G, 3]``."""
        batch = torch.arange(xyz.shape[0], device=xyz.device)[:, None]
        centres = xyz[batch, farthest_point_sample(xyz, self.num_group, self.fps_start, generator)]
        idx = knn_group(xyz, centres, self.group_size)  # [B, G, K]
        return xyz[batch[:, :, None], idx] - centres.unsqueeze(2), centres

    def forward(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # Grouping stays in float32 so the sampled centres do not depend on the model dtype.
        groups, centres = self.group(points.float(), generator)
        dtype = self.reduce_dim.weight.dtype
        B, G, K, _ = groups.shape
        tokens = self.reduce_dim(self.encoder(groups.to(dtype).reshape(B * G, K, 3)).reshape(B, G, -1))
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(B, -1, -1), self.pos_embed(centres.to(dtype))], dim=1)
        for block in self.blocks:
            x = block(x + pos)
        x = self.norm(x)
        return torch.cat([x[:, 0], x[:, 1:].amax(dim=1)], dim=-1)


class PointTrunk(nn.Module):
    """Point-BERT followed by the ``pc_projection`` matrix: ``[B, N, 3]`` -> ``[B, point_proj_dim]``."""

    def __init__(self, config: ImageBindConfig) -> None:
        super().__init__()
        self.point_encoder = PointBERT(config)
        # ULIP's init: a zero matrix gives every cloud the zero embedding, which a tower trained from scratch
        # never leaves (the normalised embedding's gradient at zero overflows and clipping zeroes every step).
        self.pc_projection = nn.Parameter(torch.randn(2 * config.point_trans_dim, config.point_proj_dim)
                                          * config.point_proj_dim ** -0.5)

    def forward(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.point_encoder(points, generator) @ self.pc_projection
