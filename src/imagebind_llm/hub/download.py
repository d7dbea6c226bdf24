"""A resumable, checksummed downloader for the files of the registry (`imagebind_llm.hub.registry`).

``fetch(name_or_url_or_path)`` resolves, in order: an existing local path (returned as is), a
registry name or a URL (downloaded once into the cache folder and reused). Downloads stream into
``<file>.part`` with HTTP ``Range`` resume, are verified (SHA-256 when known, byte count always) and
then renamed atomically. The cache folder is ``cache_dir``, else ``$IMAGEBIND_LLM_CACHE``, else
``~/.cache/imagebind_llm``.

No SHA-256 of any official file is published in the sources we could read, so registry entries carry
``sha256=None`` and only their approximate size; a hash passed to ``fetch`` is always checked.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from imagebind_llm.hub.registry import REGISTRY, list_weights

log = logging.getLogger(__name__)

CACHE_ENV = "IMAGEBIND_LLM_CACHE"
CHUNK = 1 << 20
DEFAULT_TIMEOUT = 20.0  # seconds per connection and per read
DEFAULT_RETRIES = 2


class DownloadError(RuntimeError):
    """A download failed (network, HTTP status, truncated transfer)."""


class ChecksumError(ValueError):
    """A downloaded or cached file does not have the expected SHA-256 or size."""


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "imagebind_llm").expanduser()


def _is_url(s: str) -> bool:
    return urlparse(s).scheme in ("http", "https")


def fetch(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, sha256: str | None = None,
          expected_size: int | None = None, progress: bool = True, retries: int = DEFAULT_RETRIES,
          timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Return a local path for a local file, registry name or URL, downloading into the cache if needed.

    Args:
        source: an existing local path, a registry name (see ``list_weights()``) or an http(s) URL.
        cache_dir: download folder (default ``$IMAGEBIND_LLM_CACHE`` or ``~/.cache/imagebind_llm``).
        sha256: expected hex digest (overrides the registry's); checked for local files too.
        expected_size: expected size in bytes (overrides the registry's); checked for local files too.
        progress: show a progress bar on stderr.
        retries: how many times a failed or interrupted transfer is retried (resuming) before giving up.
        timeout: seconds to wait for the connection and for each read: a server that stops answering
            fails the attempt after this long.

    Raises:
        ValueError: ``sha256`` is not 64 hexadecimal digits.
        FileNotFoundError: ``source`` is neither an existing file, a registry name nor a URL.
        ChecksumError: the file's SHA-256 or size differs (names the file and both values).
        DownloadError: the server failed or the transfer kept breaking.
    """
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 {sha256!r} is not a SHA-256 digest (64 hexadecimal digits)")
    text = os.fspath(source)
    local = Path(text).expanduser()
    if local.exists():
        if sha256 is not None or expected_size is not None:
            _verify(local, sha256_file(local) if sha256 else None, sha256, expected_size, cached=False)
        return local
    if text in REGISTRY:
        entry = REGISTRY[text]
        url, filename = entry.url, entry.name
        sha256, expected_size = sha256 or entry.sha256, expected_size or entry.size
    elif _is_url(text):
        url, filename = text, Path(urlparse(text).path).name or "download"
    else:
        raise FileNotFoundError(f"{text}: no such file, and not a URL or one of the known files {sorted(REGISTRY)}")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / filename
    if dest.exists():
        _verify(dest, sha256_file(dest) if sha256 else None, sha256, expected_size)
        return dest
    part = dest.with_name(dest.name + ".part")
    digest = _download(url, part, progress=progress, retries=retries, timeout=timeout)
    try:
        _verify(part, digest, sha256, expected_size, source_url=url)
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    log.info("downloaded %s -> %s (sha256 %s)", url, dest, digest)
    return dest


def _verify(path: Path, digest: str | None, sha256: str | None, size: int | None, source_url: str = "",
            cached: bool = True) -> None:
    """Raise `ChecksumError` unless ``path`` has ``size`` bytes and SHA-256 ``digest == sha256`` (when given);
    ``cached``: the file is ours to delete and download again (else the user's own file)."""
    where = f" (from {source_url})" if source_url else ""
    fix = f"delete {path} to download it again" if cached else "pass the intended file or its checksum"
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{path.name}{where}: expected {size} bytes, got {actual_size}; {fix}")
    if sha256 is not None and digest != sha256.lower():
        raise ChecksumError(f"{path.name}{where}: SHA-256 mismatch, expected {sha256.lower()}, got {digest}; "
                            f"the file is corrupt or not the expected one ({fix})")


def sha256_file(path: str | os.PathLike, h: "hashlib._Hash | None" = None) -> str:
    """SHA-256 of a file, streamed (continuing ``h`` when given)."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, part: Path, *, progress: bool, retries: int, timeout: float) -> str:
    """Download ``url`` into ``part``, resuming from its current length; return the SHA-256 of the result."""
    for attempt in range(retries + 1):
        try:
            return _download_once(url, part, progress=progress, timeout=timeout)
        except (OSError, http.client.HTTPException, DownloadError) as e:
            if isinstance(e, urllib.error.HTTPError) and e.code < 500 and e.code != 416:
                raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
            if attempt == retries:
                again = f"run again to resume from {part}" if part.exists() else "check the network and run again"
                raise DownloadError(f"download of {url} failed after {retries + 1} attempt(s) "
                                    f"({_why(e, timeout)}); {again}, or download the file yourself and pass "
                                    "its local path") from e
            log.warning("download of %s interrupted (%s); retrying", url, _why(e, timeout))
    raise AssertionError("unreachable")


def _why(error: Exception, timeout: float) -> str:
    """One line on why an attempt failed (a timeout says how long it waited)."""
    reason = error.reason if isinstance(error, urllib.error.URLError) and not isinstance(
        error, urllib.error.HTTPError) else error
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    return " ".join(str(reason).split()) or type(reason).__name__


def _download_once(url: str, part: Path, *, progress: bool, timeout: float) -> str:
    from tqdm import tqdm

    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "imagebind-llm"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # range past the end: the partial file is stale, start over
            part.unlink()
            return _download_once(url, part, progress=progress, timeout=timeout)
        raise
    with resp:
        h = hashlib.sha256()
        if resp.status == 206:
            if not resp.headers.get("Content-Range", "").startswith(f"bytes {start}-"):
                raise DownloadError(f"{url}: server answered Range {start}- with "
                                    f"Content-Range {resp.headers.get('Content-Range')!r}")
            sha256_file(part, h)  # hash the prefix we keep
            mode = "ab"
        else:  # 200: the server ignored Range; start over
            start, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        received = start
        with part.open(mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                        desc=part.name.removesuffix(".part"), disable=not progress) as bar:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                h.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise DownloadError(f"{url}: connection closed after {received} of {total} bytes")
    return h.hexdigest()


def format_weights_table() -> str:
    """The registry as a text table (name, approximate size, cached?, URL) for the CLI."""
    folder = default_cache_dir()
    rows = [("name", "size", "cached", "sha256", "url")]
    for f in list_weights():
        size = f"{f.approx_size / 1e9:.2f} GB" if f.approx_size else "?"
        rows.append((f.name, size, "yes" if (folder / f.name).exists() else "no",
                     f.sha256[:12] if f.sha256 else "unpublished", f.url))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + f"\ncache folder: {folder} (set ${CACHE_ENV} to change)"
