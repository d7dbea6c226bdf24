"""Point-cloud loading for Point-Bind / ImageBind-LLM's 3-D branch.

Formats: ``.npy`` (numpy, no pickles), ``.pt`` (a tensor, ``torch.load(weights_only=True)``), ``.ply``
(``plyfile``; ascii and binary), ``.pcd`` (own parser; ascii and binary, not binary_compressed),
``.xyz`` / ``.pts`` (text, whitespace or comma separated; lines with fewer than 3 numbers, such as a
leading point count, are skipped), ``.obj`` (``v x y z`` lines). Arrays and tensors ``[N, >=3]`` are
accepted directly, and so are channels-first ``[C, N]`` ones when the shape says so (`points_first`).
Only the first three columns (x, y, z) are used; extra columns (normals, colours) are dropped. Input
without a file name (bytes, anonymous file objects) is recognised by its content.

Each cloud is resampled to ``n_points`` (deterministic, per cloud, independent of the batch):
  * more points: farthest point sampling in float64 starting at point 0 (Point-Bind's dataset
    uses FPS with a random start), exact for every cloud size and fast for millions of points
    (`farthest_point_sample`);
  * fewer points: the cloud is tiled, i.e. indices ``arange(n_points) % N``.
Then, if ``normalize``, it is centred on its centroid and scaled to a maximum radius of 1 (Point-Bind's
``pc_normalize``; the bundled example clouds are already normalised, so this is a no-op for them).
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any

import numpy as np
import torch
from plyfile import PlyData

from .errors import (NPY_MAGIC, MediaError, as_list, decode_text, is_source, load_npy, read_source, sniff_kind,
                     source_name, source_suffix, unsupported_type)

POINT_SUFFIXES = (".npy", ".pt", ".ply", ".pcd", ".xyz", ".pts", ".obj")
MAX_CHANNELS = 16  # per-point columns (xyz, colours, normals, ...); more means the array is [C, N] or not points
_PCD_NUMPY_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8",
                    ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}


def sniff_point_format(data: bytes) -> str:
    """Guess the point-file suffix from its first bytes."""
    head = data[:256].lstrip()
    if data.startswith(NPY_MAGIC):
        return ".npy"
    if data.startswith(b"PK"):
        return ".pt"
    if head.startswith(b"ply"):
        return ".ply"
    if head.startswith((b"# .PCD", b"VERSION", b"FIELDS")):
        return ".pcd"
    if re.search(rb"^v\s", data[:65536], flags=re.MULTILINE):
        return ".obj"
    return ".xyz"


def _parse_pcd(data: bytes) -> np.ndarray:
    """x, y, z columns of an ascii or binary PCD file -> ``[N, 3]``."""
    header: dict[str, list[str]] = {}
    pos = 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            raise ValueError("PCD header has no DATA line")
        line = data[pos:end].decode("ascii", errors="replace").strip()
        pos = end + 1
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        header[key.upper()] = values
        if key.upper() == "DATA":
            break
    fields, kind = header.get("FIELDS", []), header["DATA"][0].lower()
    if not {"x", "y", "z"} <= set(fields):
        raise ValueError(f"PCD fields {fields} lack x, y, z")
    sizes = [int(s) for s in header.get("SIZE", ["4"] * len(fields))]
    types = header.get("TYPE", ["F"] * len(fields))
    counts = [int(c) for c in header.get("COUNT", ["1"] * len(fields))]
    num_points = int(header.get("POINTS", [0])[0]) or int(header["WIDTH"][0]) * int(header.get("HEIGHT", ["1"])[0])
    if kind == "ascii":
        table = np.loadtxt(io.StringIO(data[pos:].decode("ascii")), dtype=np.float64, ndmin=2)
        columns = np.cumsum([0, *counts])
        return np.stack([table[:, columns[fields.index(a)]] for a in "xyz"], axis=1)
    if kind == "binary":
        columns = enumerate(zip(fields, sizes, types, counts))
        dtype = np.dtype([(f"{n}_{i}", _PCD_NUMPY_TYPES[(t.upper(), s)], (c,)) for i, (n, s, t, c) in columns])
        if len(data) - pos < num_points * dtype.itemsize:
            raise ValueError(f"PCD binary data is truncated ({len(data) - pos} bytes for {num_points} points)")
        table = np.frombuffer(data, dtype=dtype, count=num_points, offset=pos)
        return np.stack([table[f"{a}_{fields.index(a)}"][:, 0].astype(np.float64) for a in "xyz"], axis=1)
    raise ValueError(f"PCD DATA {kind} is not supported (only ascii and binary); re-save the file uncompressed")


def _parse_text(text: str, obj: bool) -> np.ndarray:
    """``[N, 3]`` from ``v x y z`` lines (obj) or the first three numbers of each line (xyz/pts)."""
    rows = []
    for line in text.splitlines():
        parts = line.replace(",", " ").split()
        if obj:
            if parts[:1] == ["v"] and len(parts) >= 4:
                rows.append([float(p) for p in parts[1:4]])
        elif len(parts) >= 3 and not line.lstrip().startswith(("#", "//")):
            rows.append([float(p) for p in parts[:3]])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def _load_pt(data: bytes, name: str) -> np.ndarray:
    """The tensor of a ``.pt`` file, loaded with ``weights_only=True`` (never arbitrary pickles)."""
    if not data.startswith((b"PK\x03\x04", b"\x80")):  # zip (torch >= 1.6) or a legacy pickle stream
        kind = sniff_kind(data)
        raise MediaError(name, f"not a PyTorch .pt file{f' (this looks like {kind})' if kind else ''}; "
                               "save the points with torch.save(tensor, path)")
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise MediaError(name, "the .pt file holds Python objects besides tensors (never loaded: unpickling can run "
                               "code); save a plain tensor with torch.save(tensor, path)") from None
    if not isinstance(obj, torch.Tensor):
        raise MediaError(name, f".pt file holds a {type(obj).__name__}, expected a tensor [N, 3]")
    return obj.detach().double().numpy()


def parse_points(data: bytes, suffix: str, name: str) -> np.ndarray:
    """Decode a point file's bytes (format from ``suffix``) to an array ``[N, C]``."""
    if suffix == ".npy":
        return load_npy(data, name)
    if suffix == ".pt":
        return _load_pt(data, name)
    if suffix == ".ply":
        vertex = PlyData.read(io.BytesIO(data))["vertex"]
        return np.stack([np.asarray(vertex[a], dtype=np.float64) for a in "xyz"], axis=1)
    if suffix == ".pcd":
        return _parse_pcd(data)
    if suffix in (".xyz", ".pts", ".obj"):
        return _parse_text(decode_text(data, name, "a point-cloud file"), obj=suffix == ".obj")
    raise ValueError(f"unknown point-cloud extension {suffix!r}; expected one of {', '.join(POINT_SUFFIXES)}")


def _morton_order(points: np.ndarray, bits: int = 10) -> np.ndarray:
    """A stable argsort of ``[N, 3]`` points along the Z-order curve of a ``2**bits``-per-axis grid."""
    low, extent = points.min(axis=0), np.ptp(points, axis=0)
    cells = ((points - low) / np.where(extent > 0, extent, 1.0) * (2**bits - 1)).astype(np.uint64)
    code = np.zeros(len(points), dtype=np.uint64)
    for axis in range(3):
        x = cells[:, axis]
        for shift, mask in ((16, 0x030000FF), (8, 0x0300F00F), (4, 0x030C30C3), (2, 0x09249249)):
            x = (x | (x << np.uint64(shift))) & np.uint64(mask)  # spread 10 bits to every third bit
        code |= x << np.uint64(axis)
    return np.argsort(code, kind="stable")


def farthest_point_sample(points: np.ndarray, n: int, start: int = 0, block: int = 256) -> np.ndarray:
    """Indices ``[n]`` of iterative farthest point sampling of ``[N, 3]`` float64 from point ``start``.

    Exactly the official loop (squared distances summed x, y, z in float64, ties to the lowest index),
    but fast for large clouds: the points are grouped in ``block``-sized runs along a Z-order curve, and
    a step recomputes only the blocks whose bounding box is nearer to the new point than their farthest
    remaining distance (the others cannot change; the bound is exact in floating point too).
    2 million points to 8192 take seconds instead of minutes.
    """
    count = len(points)
    blocks = -(-count // block)
    order = _morton_order(points)
    order = np.concatenate([order, np.full(blocks * block - count, order[-1])])  # pad with a repeated point
    ids = order.reshape(blocks, block)
    xyz = [np.ascontiguousarray(points[order, k]).reshape(blocks, block) for k in range(3)]
    low, high = np.stack([c.min(axis=1) for c in xyz]), np.stack([c.max(axis=1) for c in xyz])  # [3, blocks]
    dist = np.full((blocks, block), np.inf)
    dist.reshape(-1)[count:] = -np.inf  # padding is never the farthest
    farthest = np.full(blocks, np.inf)  # per block: max of dist
    chosen = np.empty(n, dtype=np.int64)
    current = start
    for i in range(n):
        chosen[i] = current
        c = points[current]
        gap = np.maximum(np.maximum(low - c[:, None], c[:, None] - high), 0.0)
        bound = gap[0] * gap[0] + gap[1] * gap[1] + gap[2] * gap[2]  # <= every point's distance to c
        near = np.flatnonzero(bound < farthest)
        d = (xyz[0][near] - c[0]) ** 2 + (xyz[1][near] - c[1]) ** 2 + (xyz[2][near] - c[2]) ** 2
        d = np.minimum(dist[near], d)
        dist[near] = d
        farthest[near] = d.max(axis=1)
        top = farthest.max()
        rows = np.flatnonzero(farthest == top)
        current = int(ids[rows][dist[rows] == top].min())
    return chosen


def resample_points(points: torch.Tensor, n: int) -> torch.Tensor:
    """``[N, 3]`` -> ``[n, 3]``: farthest point sampling if ``N > n``, tiling if ``N < n``."""
    count = points.shape[0]
    if count > n:
        return points[torch.from_numpy(farthest_point_sample(points.numpy(), n))]
    if count < n:
        return points[torch.arange(n) % count]
    return points


def normalize_points(points: torch.Tensor) -> torch.Tensor:
    """Centre ``[N, 3]`` on its centroid and scale to a maximum distance of 1 from it."""
    centred = points - points.mean(dim=0)
    return centred / centred.norm(dim=1).max()


def _to_points(source: Any, index: int) -> tuple[str, np.ndarray]:
    """Any accepted input -> (name, raw array)."""
    if isinstance(source, torch.Tensor):
        return f"<tensor #{index}>", source.detach().cpu().double().numpy()
    if isinstance(source, np.ndarray):
        return f"<array #{index}>", source
    name = source_name(source, index)
    if not is_source(source):
        raise unsupported_type(source, index, "a path, bytes, a binary file object, an array or a tensor")
    suffix = source_suffix(source)
    if suffix and suffix not in POINT_SUFFIXES:
        raise MediaError(name, f"unknown point-cloud extension {suffix!r}; expected one of {', '.join(POINT_SUFFIXES)}")
    data = read_source(source, index)
    try:
        return name, parse_points(data, suffix or sniff_point_format(data), name)
    except MediaError:
        raise
    except Exception as e:  # parsers raise many kinds (ValueError, KeyError, zip errors, ...)
        raise MediaError(name, f"cannot parse point cloud ({type(e).__name__}: {e})") from None


def points_first(array: np.ndarray, name: str) -> np.ndarray:
    """A 2-D array as ``[N, C]`` (points in rows, xyz first), transposing channels-first ``[C, N]`` input.

    A shape ``[A, B]`` is read as ``[N, C]`` when ``B <= MAX_CHANNELS`` and (``A > MAX_CHANNELS`` or
    ``B == 3``), else as ``[C, N]`` by the same rule with the axes swapped: ``[3, 1000]`` and ``[3, 10]``
    are 1000 and 10 points, ``[3, 3]`` three. Shapes fitting neither (``[6, 9]``, ``[1000, 50]``) are
    refused as ambiguous.
    """
    if array.ndim != 2 or 0 in array.shape:
        raise MediaError(name, f"expected points of shape [N, 3] (or [N, >3] with xyz first), got {list(array.shape)}")
    rows, cols = array.shape
    if cols <= MAX_CHANNELS and (rows > MAX_CHANNELS or cols == 3):
        points = array
    elif rows <= MAX_CHANNELS and (cols > MAX_CHANNELS or rows == 3):
        points = array.T
    elif min(rows, cols) < 3:
        points = array  # too few columns either way: refused below
    else:
        raise MediaError(name, f"cannot tell points from channels in shape {list(array.shape)}; pass [N, 3] "
                               f"(points in rows, xyz first, at most {MAX_CHANNELS} columns)")
    if points.shape[1] < 3:
        raise MediaError(name, f"expected points of shape [N, 3] (or [N, >3] with xyz first), got {list(array.shape)}")
    return points


def load_point_cloud(source: Any, index: int = 0, n_points: int = 8192, normalize: bool = True) -> torch.Tensor:
    """One point cloud -> ``[n_points, 3]`` float32 (see the module docstring)."""
    name, array = _to_points(source, index)
    array = points_first(array, name)
    if not np.issubdtype(array.dtype, np.number):
        raise MediaError(name, f"expected numeric coordinates, got dtype {array.dtype}")
    points = torch.from_numpy(np.ascontiguousarray(array[:, :3], dtype=np.float64))
    if not torch.isfinite(points).all():
        bad = int((~torch.isfinite(points)).any(dim=1).sum())
        raise MediaError(name, f"{bad} point(s) have NaN or infinite coordinates; remove them first")
    points = resample_points(points, n_points)
    if normalize:
        if float((points - points[0]).abs().max()) == 0.0:
            raise MediaError(name, "all points are identical; cannot normalise a degenerate cloud")
        points = normalize_points(points)
    return points.float()


def load_points(sources: Any, n_points: int = 8192, normalize: bool = True) -> torch.Tensor:
    """Load point clouds for the Point-BERT encoder.

    Args:
        sources: one or a list of paths, bytes, binary file objects, arrays or tensors ``[N, >=3]``.
        n_points: points per cloud after deterministic resampling.
        normalize: centre and scale to the unit sphere as Point-Bind trains with.

    Returns:
        ``[B, n_points, 3]`` float32.
    """
    sources = [sources] if isinstance(sources, (torch.Tensor, np.ndarray)) else as_list(sources)
    return torch.stack([load_point_cloud(s, i, n_points, normalize) for i, s in enumerate(sources)])
