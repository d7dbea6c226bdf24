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

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


class MediaError(ValueError):
    """A media input could not be loaded; the message names the input and says what to fix."""

    def __init__(self, source_name: str, problem: str) -> None:
        self.source_name = source_name
        self.problem = problem
        super().__init__(f"{source_name}: {problem}")


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
