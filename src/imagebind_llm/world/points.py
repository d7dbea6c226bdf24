"""3-D primitives: noisy surface point clouds and shaded renders of the same posed solid.

A `Solid` is a primitive with a rotation, per-axis scale and colour. `point_cloud` samples its surface
uniformly by area, adds Gaussian noise and normalises as Point-Bind does (centroid at 0, largest radius 1), so
`imagebind_llm.preprocess.points` loads the saved ``[8192, 3]`` clouds without resampling or rescaling.
`render_primitive` splats a dense, noise-free sample of the same surface with Lambert shading into a
224 x 224 image (orthographic camera on +z, the same normalisation), so cloud and render agree in pose.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .scene import COLOURS, IMAGE_SIZE, WorldError

PRIMITIVES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")
POINTS_PER_CLOUD = 8192  # what the Point-BERT preprocessing samples (`load_points(n_points=8192)`)
NOISE = 0.01  # Gaussian jitter of cloud points, in units of the normalised radius
LIGHT = np.array([-0.4, 0.5, 0.77]) / np.linalg.norm([-0.4, 0.5, 0.77])  # towards the upper left, in front
RENDER_POINTS = 160_000  # dense enough that 2 x 2 splats leave no holes at 224 x 224
BACKGROUND = (235, 235, 235)


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class Solid:
    """A posed primitive: ``points @ diag(scale) @ rotation.T`` maps its canonical surface into the scene."""

    primitive: str
    rotation: np.ndarray  # [3, 3], orthonormal, det 1
    scale: np.ndarray  # [3]
    colour: str


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation ``[3, 3]`` (QR of a Gaussian matrix with the sign fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def sample_solid(rng: np.random.Generator, primitive: str) -> Solid:
    """``primitive`` with a random rotation, per-axis scale in [0.75, 1.25] and colour."""
    if primitive not in PRIMITIVES:
        raise WorldError(f"unknown primitive {primitive!r}; choose one of {PRIMITIVES}")
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    return Solid(primitive, random_rotation(rng), rng.uniform(0.75, 1.25, size=3), colour)


# ------------------------------------------------------------------------------------------ surfaces
def _choose(rng: np.random.Generator, n: int, areas: list[float]) -> np.ndarray:
    """Part index ``[n]`` per point, each part chosen in proportion to its area."""
    return rng.choice(len(areas), size=n, p=np.asarray(areas) / sum(areas))


def _triangles(rng: np.random.Generator, n: int, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniform points and outward normals on a closed mesh convex about 0, triangles ``corners [T, 3, 3]``."""
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    cross = np.cross(b - a, c - a)
    area = np.linalg.norm(cross, axis=1)
    normal = cross / area[:, None]
    normal *= np.sign(np.einsum("ij,ij->i", normal, a))[:, None]  # outward: away from the centre
    t = _choose(rng, n, list(area))
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1  # fold the far half of the parallelogram back into the triangle
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    return a[t] + u[:, None] * (b - a)[t] + v[:, None] * (c - a)[t], normal[t]


def _cube_triangles() -> np.ndarray:
    tris = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            quad = np.zeros((4, 3))
            quad[:, axis] = sign
            quad[:, (axis + 1) % 3] = [-1, 1, 1, -1]
            quad[:, (axis + 2) % 3] = [-1, -1, 1, 1]
            tris += [quad[[0, 1, 2]], quad[[0, 2, 3]]]
    return np.stack(tris) / np.sqrt(3)


def _pyramid_triangles() -> np.ndarray:
    base = np.array([[-1, -1, -0.5], [1, -1, -0.5], [1, 1, -0.5], [-1, 1, -0.5]]) * 0.8
    apex = np.array([0.0, 0.0, 0.9])
    sides = [np.stack([base[i], base[(i + 1) % 4], apex]) for i in range(4)]
    return np.stack([*sides, base[[0, 1, 2]], base[[0, 2, 3]]])


def surface(primitive: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform by area on a canonical primitive (radius about 1, centred) and their unit outward
    normals, each ``[n, 3]`` float64."""
    if primitive == "sphere":
        p = rng.standard_normal((n, 3))
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        return p, p.copy()
    if primitive == "cube":
        return _triangles(rng, n, _cube_triangles())
    if primitive == "pyramid":
        return _triangles(rng, n, _pyramid_triangles())
    theta = rng.uniform(0, 2 * np.pi, n)
    ring = np.stack([np.cos(theta), np.sin(theta), np.zeros(n)], axis=1)
    z = np.array([0.0, 0.0, 1.0])
    if primitive in ("cylinder", "cone"):
        r, h = 0.7, 1.4
        cap = np.sqrt(rng.random(n))[:, None] * r * ring  # uniform on a disc
        if primitive == "cylinder":
            part = _choose(rng, n, [2 * np.pi * r * h, np.pi * r * r, np.pi * r * r])  # side, top, bottom
            side = r * ring + rng.uniform(-h / 2, h / 2, n)[:, None] * z
            top = np.where(part[:, None] == 1, 1.0, -1.0)
            p = np.where(part[:, None] == 0, side, cap + top * h / 2 * z)
            normal = np.where(part[:, None] == 0, ring, top * z)
            return p, normal
        slant = np.hypot(r, h)
        part = _choose(rng, n, [np.pi * r * slant, np.pi * r * r])  # side, base
        s = np.sqrt(rng.random(n))[:, None]  # distance from the apex, uniform by area
        side = s * r * ring + (h / 2 - s * h) * z
        side_normal = (h * ring + r * z) / slant
        p = np.where(part[:, None] == 0, side, cap - h / 2 * z)
        normal = np.where(part[:, None] == 0, side_normal, -z)
        return p, normal
    if primitive == "torus":
        big, small = 0.7, 0.3
        phi = np.empty(0)
        while len(phi) < n:  # rejection: the outer side of the tube has more area
            candidate = rng.uniform(0, 2 * np.pi, 2 * n)
            keep = rng.random(2 * n) < (big + small * np.cos(candidate)) / (big + small)
            phi = np.concatenate([phi, candidate[keep]])
        phi = phi[:n, None]
        normal = np.cos(phi) * ring + np.sin(phi) * z
        return big * ring + small * normal, normal
    raise WorldError(f"unknown primitive {primitive!r}; choose one of {PRIMITIVES}")


def _pose(solid: Solid, points: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale then rotate points; normals by the inverse transpose, renormalised."""
    # einsum, not @: BLAS threads cost more than this [N, 3] x [3, 3] product
    p = np.einsum("nj,kj->nk", points * solid.scale, solid.rotation)
    nrm = np.einsum("nj,kj->nk", normals / solid.scale, solid.rotation)
    return p, nrm / np.linalg.norm(nrm, axis=1, keepdims=True)


def _unit(points: np.ndarray) -> np.ndarray:
    """Centre ``[N, 3]`` on its centroid and scale its largest radius to 1 (Point-Bind's ``pc_normalize``)."""
    centred = points - points.mean(axis=0)
    return centred / np.linalg.norm(centred, axis=1).max()


# ------------------------------------------------------------------------------------------ outputs
def point_cloud(solid: Solid, rng: np.random.Generator, n: int = POINTS_PER_CLOUD) -> np.ndarray:
    """A noisy surface sample ``[n, 3]`` float32 of ``solid``, centred on its centroid, largest radius 1."""
    p = _unit(_pose(solid, *surface(solid.primitive, n, rng))[0])
    return _unit(p + NOISE * rng.standard_normal(p.shape)).astype(np.float32)


@lru_cache(maxsize=len(PRIMITIVES))
def _dense_surface(primitive: str) -> tuple[np.ndarray, np.ndarray]:
    """A fixed dense sample of a canonical primitive for rendering (the same for every pose: no noise)."""
    return surface(primitive, RENDER_POINTS, np.random.default_rng(0))


def render_primitive(solid: Solid, size: int = IMAGE_SIZE) -> Image.Image:
    """``solid`` seen along -z (orthographic), Lambert shaded in its colour on a light grey background."""
    p, normal = _pose(solid, *_dense_surface(solid.primitive))
    p = _unit(p)  # the cloud's normalisation, up to sampling noise
    keep = normal[:, 2] > 0  # back faces are hidden anyway; dropping them halves the z-buffer work
    p, normal = p[keep], normal[keep]
    lambert = np.clip((normal * LIGHT).sum(axis=1), 0, None)[:, None]
    colour = np.asarray(COLOURS[solid.colour], dtype=np.float64)
    rgb = np.clip((0.25 + 0.75 * lambert) * colour + 0.15 * 255 * lambert**16, 0, 255)  # ambient, diffuse, gloss
    x = np.floor((p[:, 0] * 0.85 + 1) / 2 * (size - 1)).astype(np.int64)
    y = np.floor((1 - p[:, 1] * 0.85) / 2 * (size - 1)).astype(np.int64)
    nearest = np.argsort(-p[:, 2], kind="stable")  # the camera looks down -z: larger z is nearer
    rank = np.empty_like(nearest)
    rank[nearest] = np.arange(len(nearest))
    zbuffer = np.full(size * size, len(nearest))  # per pixel: depth rank of the nearest point, len = none
    for dx in (0, 1):  # 2 x 2 splats
        for dy in (0, 1):
            np.minimum.at(zbuffer, np.minimum(y + dy, size - 1) * size + np.minimum(x + dx, size - 1), rank)
    image = np.empty((size * size, 3))
    image[:] = BACKGROUND
    hit = zbuffer < len(nearest)
    image[hit] = rgb[nearest[zbuffer[hit]]]
    return Image.fromarray(np.uint8(np.round(image)).reshape(size, size, 3))
