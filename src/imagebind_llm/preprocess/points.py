"""Point-cloud loading for Point-Bind / ImageBind-LLM's 3-D branch.

Formats: ``.npy`` (numpy, no pickles), ``.pt`` (a tensor, ``torch.load(weights_only=True)``), ``.ply``
(``plyfile``; ascii and binary), ``.pcd`` (own parser; ascii and binary, not binary_compressed),
``.xyz`` / ``.pts`` (text, whitespace or comma separated; lines with fewer than 3 numbers, such as a
leading point count, are skipped), ``.obj`` (``v x y z`` lines). Arrays and tensors ``[N, >=3]`` are
accepted directly. Only the first three columns (x, y, z) are used; extra columns (normals, colours)
are dropped. Input without a file name (bytes, anonymous file objects) is recognised by its content.

Each cloud is resampled to ``n_points`` (deterministic, per cloud, independent of the batch):
  * more points: farthest point sampling in float64 starting at point 0 (Point-Bind's dataset
    uses FPS with a random start);
  * fewer points: the cloud is tiled, i.e. indices ``arange(n_points) % N``.
Then, if ``normalize``, it is centred on its centroid and scaled to a maximum radius of 1 (Point-Bind's
``pc_normalize``; the bundled example clouds are already normalised, so this is a no-op for them).
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import torch
from plyfile import PlyData

from .errors import MediaError, as_list, is_source, read_source, source_name, source_suffix, unsupported_type

POINT_SUFFIXES = (".npy", ".pt", ".ply", ".pcd", ".xyz", ".pts", ".obj")
_PCD_NUMPY_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8",
                    ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}


def sniff_point_format(data: bytes) -> str:
    """Guess the point-file suffix from its first bytes."""
    head = data[:256].lstrip()
    if data.startswith(b"\x93NUMPY"):
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


def _parse_text(data: bytes, obj: bool) -> np.ndarray:
    """``[N, 3]`` from ``v x y z`` lines (obj) or the first three numbers of each line (xyz/pts)."""
    rows = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        parts = line.replace(",", " ").split()
        if obj:
            if parts[:1] == ["v"] and len(parts) >= 4:
                rows.append([float(p) for p in parts[1:4]])
        elif len(parts) >= 3 and not line.lstrip().startswith(("#", "//")):
            rows.append([float(p) for p in parts[:3]])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def parse_points(data: bytes, suffix: str) -> np.ndarray:
    """Decode a point file's bytes (format from ``suffix``) to an array ``[N, C]``."""
    if suffix == ".npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if suffix == ".pt":
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f".pt file holds a {type(obj).__name__}, expected a tensor [N, 3]")
        return obj.detach().double().numpy()
    if suffix == ".ply":
        vertex = PlyData.read(io.BytesIO(data))["vertex"]
        return np.stack([np.asarray(vertex[a], dtype=np.float64) for a in "xyz"], axis=1)
    if suffix == ".pcd":
        return _parse_pcd(data)
    if suffix in (".xyz", ".pts", ".obj"):
        return _parse_text(data, obj=suffix == ".obj")
    raise ValueError(f"unknown point-cloud extension {suffix!r}; expected one of {', '.join(POINT_SUFFIXES)}")


def farthest_point_sample(points: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """Indices ``[n]`` of iterative farthest point sampling of ``[N, 3]`` float64 from point ``start``.

    Ties go to the lowest index (``argmax``). Works column-wise in place: far faster than a per-step
    ``[N, 3]`` reduction, which dominates for large clouds.
    """
    columns = [np.ascontiguousarray(points[:, k]) for k in range(3)]
    dist = np.full(points.shape[0], np.inf)
    total, square = np.empty_like(dist), np.empty_like(dist)
    chosen = np.empty(n, dtype=np.int64)
    current = start
    for i in range(n):
        chosen[i] = current
        total.fill(0.0)
        for col in columns:
            np.subtract(col, col[current], out=square)
            np.multiply(square, square, out=square)
            total += square
        np.minimum(dist, total, out=dist)
        current = int(dist.argmax())
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
        return name, parse_points(data, suffix or sniff_point_format(data))
    except Exception as e:  # parsers raise many kinds (ValueError, KeyError, pickle/zip errors, ...)
        raise MediaError(name, f"cannot parse point cloud ({type(e).__name__}: {e})") from None


def load_point_cloud(source: Any, index: int = 0, n_points: int = 8192, normalize: bool = True) -> torch.Tensor:
    """One point cloud -> ``[n_points, 3]`` float32 (see the module docstring)."""
    name, array = _to_points(source, index)
    if array.ndim != 2 or array.shape[1] < 3 or array.shape[0] == 0:
        raise MediaError(name, f"expected points of shape [N, 3] (or [N, >3] with xyz first), got {list(array.shape)}")
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
