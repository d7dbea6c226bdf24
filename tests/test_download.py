"""Downloader: loopback HTTP server with and without Range support, resume, checksums, cache reuse."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from imagebind_llm import hub
from imagebind_llm.hub import REGISTRY, ChecksumError, DownloadError, fetch, format_weights_table, list_weights

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: more than one chunk
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.payload``; optional Range support and a cut-off on the first request."""

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        srv = self.server
        srv.requests.append(dict(self.headers))
        if self.path != "/files/model.bin":
            self.send_error(404)
            return
        data, start = srv.payload, 0
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:  # send part of the body, then drop the connection
            cut, srv.cut_after = srv.cut_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.payload, srv.ranges, srv.cut_after, srv.requests = PAYLOAD, True, None, []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/files/model.bin"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_verifies_and_reuses_cache(server, tmp_path):
    path = fetch(server.url, tmp_path, sha256=SHA, expected_size=len(PAYLOAD), progress=False)
    assert path == tmp_path / "model.bin" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "model.bin.part").exists()
    assert fetch(server.url, tmp_path, sha256=SHA, progress=False) == path
    assert len(server.requests) == 1  # second call served from the cache


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.cut_after = 300_000
    with pytest.raises(DownloadError, match="run again to resume"):
        fetch(server.url, tmp_path, sha256=SHA, progress=False, retries=0)
    part = tmp_path / "model.bin.part"
    assert part.stat().st_size == 300_000
    path = fetch(server.url, tmp_path, sha256=SHA, progress=False, retries=0)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1]["Range"] == "bytes=300000-"


def test_automatic_retry_resumes_in_one_call(server, tmp_path):
    server.cut_after = 123_456
    path = fetch(server.url, tmp_path, sha256=SHA, progress=False, retries=2)
    assert path.read_bytes() == PAYLOAD
    assert [r.get("Range") for r in server.requests] == [None, "bytes=123456-"]


def test_server_without_range_restarts_from_zero(server, tmp_path):
    server.ranges = False
    (tmp_path / "model.bin.part").write_bytes(b"stale partial data")
    path = fetch(server.url, tmp_path, sha256=SHA, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_corrupted_file_fails_checksum(server, tmp_path):
    server.payload = PAYLOAD[:-1] + b"X"
    bad = hashlib.sha256(server.payload).hexdigest()
    with pytest.raises(ChecksumError, match=f"model.bin.*expected {SHA}, got {bad}"):
        fetch(server.url, tmp_path, sha256=SHA, progress=False)
    assert not (tmp_path / "model.bin").exists() and not (tmp_path / "model.bin.part").exists()


def test_corrupted_cached_file_fails_checksum(server, tmp_path):
    (tmp_path / "model.bin").write_bytes(b"not the model")
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        fetch(server.url, tmp_path, sha256=SHA, progress=False)


def test_wrong_size_fails(server, tmp_path):
    with pytest.raises(ChecksumError, match=f"expected {len(PAYLOAD) + 1} bytes, got {len(PAYLOAD)}"):
        fetch(server.url, tmp_path, expected_size=len(PAYLOAD) + 1, progress=False)


def test_http_404_is_a_clear_error(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(server.url.replace("model.bin", "missing.bin"), tmp_path, progress=False)


def test_local_paths(tmp_path):
    f = tmp_path / "weights.pth"
    f.write_bytes(b"x")
    assert fetch(str(f)) == f
    with pytest.raises(FileNotFoundError, match="nope.pth.*imagebind_w3D.pth"):
        fetch(tmp_path / "nope.pth")


def test_registry_name_uses_cache_env(server, tmp_path, monkeypatch):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(REGISTRY, "imagebind_w3D.pth",
                        hub.WeightFile("imagebind_w3D.pth", server.url, "test", sha256=SHA))
    path = fetch("imagebind_w3D.pth", progress=False)
    assert path == tmp_path / "imagebind_w3D.pth" and path.read_bytes() == PAYLOAD
    assert "imagebind_w3D.pth" in format_weights_table() and str(tmp_path) in format_weights_table()


def test_registry_lists_official_files():
    names = {f.name for f in list_weights()}
    assert names == {"imagebind_huge.pth", "imagebind_w3D.pth", "7B.pth", "7B-pretrained.pth", "7B-beta.pth",
                     "7B_chinese_delta.pth", "7B_chinese_params.json", "knn.index"}
    assert REGISTRY["imagebind_huge.pth"].url == "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
    assert "e9206a10f118b0790c730264e7b3aa5c324c35cb" in REGISTRY["imagebind_w3D.pth"].url
    # No official file has a published hash: none may be invented.
    assert all(f.sha256 is None for f in list_weights())
