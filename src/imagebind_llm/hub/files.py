"""Writing outputs safely, the one way every package does it.

A file is written to a temporary name in its own folder, flushed to disk and renamed into place
(`atomic_write`); several files that belong together (weights + ``params.json`` + a marker, a cache
folder, a shard and its ``.done``) are renamed together, their last one acting as the commit record
(`atomic_files`). An interrupted write (Ctrl-C, a kill, a crash) leaves the previous file or none,
never a truncated one. Existing outputs are only replaced when the caller says so (`refuse_overwrite`),
and an output folder that is a file is named as such (`make_dir`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

PathLike = str | os.PathLike


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """A temporary path to write ``path`` to; renamed into place when the block succeeds.

    The temporary name is in the same folder and ends with the same suffix (``np.save`` keeps it).
    On an exception, Ctrl-C included, the temporary file is removed and ``path`` is unchanged.
    """
    with atomic_files(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_files(*paths: PathLike) -> Iterator[list[Path]]:
    """Temporary paths for ``paths``, all renamed into place when the block succeeds.

    Write every target to its temporary path inside the block. On success each temporary file is
    flushed to disk and they are renamed in the order given, with SIGINT/SIGTERM held back (in the main
    thread) until all are in place. The last path is the set's commit record (a marker, a ``meta.json``,
    a ``config.json``): with several paths its old version is removed before the others are replaced, so
    an interrupted commit shows a set without its record, never the old record beside new files. On an
    exception the temporary files are removed and no target changes.
    """
    targets = [Path(p) for p in paths]
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmps = [t.with_name(f".{t.name}.{token}.tmp{t.suffix}") for t in targets]
    try:
        yield tmps
        for tmp in tmps:
            _fsync(tmp)
        with _signals_held():
            if len(targets) > 1:
                targets[-1].unlink(missing_ok=True)
            for tmp, target in zip(tmps, targets):
                os.replace(tmp, target)
        for folder in dict.fromkeys(t.parent for t in targets):
            with contextlib.suppress(OSError):  # the renames' durability; not every file system syncs folders
                _fsync(folder)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def refuse_overwrite(*paths: PathLike, overwrite: bool) -> None:
    """Raise `FileExistsError` naming the first of ``paths`` that exists, unless ``overwrite``."""
    if overwrite:
        return
    for path in paths:
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it, or write elsewhere")


def make_dir(path: PathLike, what: str = "output folder") -> Path:
    """``mkdir -p path``; a file in the way is a clear `NotADirectoryError` instead of ``[Errno 17]``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in (path, *path.parents) if p.exists() and not p.is_dir())
        raise NotADirectoryError(f"the {what} {path} cannot be created: {blocker} is a file, not a folder") from None
    return path


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back during the block: the first one caught is raised again after it.

    Python runs signal handlers in the main thread only, so elsewhere (and for signals whose handler is
    not Python's, or that are ignored) this holds nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {sig: handler for sig in (signal.SIGINT, signal.SIGTERM)
            if (handler := signal.getsignal(sig)) not in (None, signal.SIG_IGN)}
    for sig in held:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])
