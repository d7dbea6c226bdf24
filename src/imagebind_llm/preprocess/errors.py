"""The one exception every preprocessing loader raises, and the input plumbing shared by all loaders.

A *source* is a filesystem path (``str`` / ``os.PathLike``), raw ``bytes`` / ``bytearray`` /
``memoryview``, or a binary file object (anything with ``read``). Loaders that take decoded data
(arrays, PIL images) handle those themselves before calling into this module.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]
NPY_MAGIC = b"\x93NUMPY"
# (offset, magic, kind): a file with ``magic`` at ``offset`` is ``kind``; to name a file given to the wrong loader.
_MAGIC: list[tuple[int, bytes, str]] = [
    (0, b"\xff\xd8\xff", "a JPEG image"), (0, b"\x89PNG\r\n\x1a\n", "a PNG image"), (0, b"GIF8", "a GIF image"),
    (8, b"WEBP", "a WebP image"), (0, b"BM", "a BMP image"), (0, b"II*\x00", "a TIFF image"),
    (0, b"MM\x00*", "a TIFF image"), (8, b"WAVE", "a WAV audio file"), (0, b"fLaC", "a FLAC audio file"),
    (0, b"OggS", "an Ogg audio file"), (0, b"ID3", "an MP3 audio file"), (4, b"ftyp", "an MP4/MOV video"),
    (0, b"\x1aE\xdf\xa3", "a Matroska/WebM video"), (8, b"AVI ", "an AVI video"), (0, NPY_MAGIC, "a numpy .npy array"),
    (0, b"PK\x03\x04", "a zip archive (or a PyTorch .pt file)"), (0, b"%PDF", "a PDF document"),
]


class MediaError(ValueError):
    """A media input could not be loaded; the message names the input and says what to fix."""

    def __init__(self, source_name: str, problem: str) -> None:
        self.source_name = source_name
        self.problem = problem
        super().__init__(f"{source_name}: {problem}")


def sniff_kind(data: bytes) -> str | None:
    """What the first bytes say a file is (``"a JPEG image"``), or None when they match no known format."""
    for offset, magic, kind in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return kind
    return None


def decode_text(data: bytes, name: str, expected: str) -> str:
    """``data`` as UTF-8 text; binary data (a NUL byte or invalid UTF-8) raise naming what it looks like.

    Args:
        expected: what the file should have been, for the message (``"a CSV/NPY file"``).
    """
    try:
        if b"\x00" in data[:65536]:
            raise UnicodeError
        return data.decode("utf-8")
    except UnicodeError:
        kind = sniff_kind(data)
        raise MediaError(name, f"not {expected} (binary data{f', this looks like {kind}' if kind else ''})") from None


def load_npy(data: bytes, name: str) -> np.ndarray:
    """An ``.npy`` file's array, never unpickling: anything else raises saying what the file is."""
    if not data.startswith(NPY_MAGIC):
        kind = sniff_kind(data)
        raise MediaError(name, f"not an .npy array file{f' (this looks like {kind})' if kind else ''}; "
                               "save arrays with numpy.save")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # a corrupt header or body raises ValueError, SyntaxError, EOFError, ...
        if "Object arrays" in str(e):
            raise MediaError(name, "holds an object array (pickled Python objects, never loaded); save numbers "
                                   "with numpy.save") from None
        raise MediaError(name, f"the .npy file is corrupt or truncated ({type(e).__name__}: {e})") from None


def source_name(source: Any, index: int) -> str:
    """A short human-readable name for ``source``: its path, its file name, or ``<bytes #index>``."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes #{index}>"
    name = getattr(source, "name", None)
    if isinstance(name, str):
        return name
    return f"<{type(source).__name__} #{index}>"


def source_suffix(source: Any) -> str:
    """The lower-case file extension (``".wav"``) of a path or named file object, else ``""``."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source).suffix.lower()
    name = getattr(source, "name", None)
    return Path(name).suffix.lower() if isinstance(name, str) else ""


def unsupported_type(source: Any, index: int, accepted: str = "a path, bytes or a binary file object") -> MediaError:
    """The error for an input of a type the loader does not take."""
    return MediaError(source_name(source, index), f"unsupported input type {type(source).__name__}; pass {accepted}")


def is_source(obj: Any) -> bool:
    """Whether ``obj`` is a path, a bytes-like object or a binary file object."""
    return isinstance(obj, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(obj, "read")


@contextmanager
def open_source(source: Source, index: int) -> Iterator[BinaryIO]:
    """Open ``source`` as a seekable binary file object.

    Raises:
        MediaError: the path does not exist / is not a file, the input is empty, or the object is
            not a supported source type.
    """
    name = source_name(source, index)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise MediaError(name, "file not found (check the path)" if not path.exists() else "not a regular file")
        if path.stat().st_size == 0:
            raise MediaError(name, "file is empty (0 bytes)")
        with open(path, "rb") as f:
            yield f
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise MediaError(name, "input is empty (0 bytes)")
        yield io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        if not (hasattr(source, "seekable") and source.seekable()):
            source = io.BytesIO(source.read())  # decoders need to seek
        start = source.tell()
        if not source.read(1):
            raise MediaError(name, "file object is empty (nothing left to read)")
        source.seek(start)
        yield source
    else:
        raise unsupported_type(source, index)


def read_source(source: Source, index: int) -> bytes:
    """The whole content of ``source`` as bytes (see `open_source` for errors)."""
    with open_source(source, index) as f:
        return f.read()


def as_list(sources: Any) -> list:
    """Accept one source or a list/tuple of them; always return a list."""
    if isinstance(sources, (list, tuple)):
        if not sources:
            raise ValueError("no inputs given (empty list)")
        return list(sources)
    return [sources]
