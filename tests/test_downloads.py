"""Verified downloads: sha256 checks, backup addresses, atomic files, safe zip extraction."""

import hashlib
import inspect
import io
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lora_helpers import downloads


def _resource(monkeypatch, tmp_path, payload: bytes, *, urls, zip_member=None, sha=None):
    """Register a resource 'demo' served from file:// URLs, with the data folder in tmp_path."""
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "data"))
    resource = downloads.Resource(
        path="demo/file.txt",
        sha256=sha or hashlib.sha256(payload).hexdigest(),
        urls=tuple(urls),
        zip_member=zip_member,
    )
    monkeypatch.setitem(downloads.RESOURCES, "demo", resource)
    return tmp_path / "data" / "demo" / "file.txt"


def _serve(tmp_path: Path, name: str, payload: bytes) -> str:
    path = tmp_path / "server" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path.as_uri()


def test_fetch_downloads_verifies_and_then_uses_the_local_copy(monkeypatch, tmp_path):
    url = _serve(tmp_path, "f.txt", b"hello")
    dest = _resource(monkeypatch, tmp_path, b"hello", urls=[url])
    assert downloads.fetch("demo") == dest and dest.read_bytes() == b"hello"
    (tmp_path / "server" / "f.txt").unlink()  # the second call needs no network
    assert downloads.fetch("demo") == dest


def test_backup_address_is_used_when_the_first_fails(monkeypatch, tmp_path):
    good = _serve(tmp_path, "f.txt", b"hello")
    dest = _resource(monkeypatch, tmp_path, b"hello", urls=[good + ".missing", good])
    assert downloads.fetch("demo").read_bytes() == b"hello"
    assert dest.exists()


def test_corrupt_download_is_refused_and_leaves_no_file(monkeypatch, tmp_path):
    url = _serve(tmp_path, "f.txt", b"tampered")
    dest = _resource(monkeypatch, tmp_path, b"hello", urls=[url])
    with pytest.raises(downloads.DownloadError, match="sha256"):
        downloads.fetch("demo")
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no temporary files either


def test_corrupt_local_file_is_reported_never_used(monkeypatch, tmp_path):
    dest = _resource(monkeypatch, tmp_path, b"hello", urls=[])
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"hellO")
    with pytest.raises(downloads.CorruptFileError, match="corrupt"):
        downloads.fetch("demo")


def test_interrupted_download_leaves_no_file(monkeypatch, tmp_path):
    class Broken(io.BytesIO):
        headers = {"Content-Length": "1000"}

        def read1(self, n=-1):
            if self.tell() > 0:
                raise ConnectionResetError("connection dropped")
            return super().read1(10)

    monkeypatch.setattr(
        downloads.urllib.request, "urlopen", lambda url, timeout: Broken(b"x" * 1000)
    )
    dest = tmp_path / "out" / "file.bin"
    with pytest.raises(ConnectionResetError):
        downloads.download_file("https://example.invalid/file.bin", dest)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_no_network_error_says_where_to_put_the_file(monkeypatch, tmp_path):
    dest = _resource(monkeypatch, tmp_path, b"x", urls=["http://127.0.0.1:9/nothing-listens"])
    with pytest.raises(downloads.DownloadError) as info:
        downloads.fetch("demo", timeout=2)
    assert str(dest) in str(info.value) and "LORA_DATA_DIR" in str(info.value)


def _zip(tmp_path: Path, members: dict[str, bytes]) -> Path:
    path = tmp_path / "server" / "archive.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return path


def test_zip_member_is_extracted_and_verified(monkeypatch, tmp_path):
    archive = _zip(tmp_path, {"readme": b"r", "file.txt": b"content"})
    dest = _resource(
        monkeypatch, tmp_path, b"content", urls=[archive.as_uri()], zip_member="file.txt"
    )
    assert downloads.fetch("demo").read_bytes() == b"content"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.txt"]


def test_zip_paths_leaving_the_target_folder_are_refused(tmp_path):
    archive = _zip(tmp_path, {"../evil.txt": b"boom", "file.txt": b"ok"})
    dest = tmp_path / "target" / "file.txt"
    dest.parent.mkdir()
    with pytest.raises(ValueError, match="outside"):
        downloads.safe_extract(archive, "file.txt", dest)
    assert not (tmp_path / "evil.txt").exists() and not dest.exists()


# --- servers that never answer or never finish -----------------------------------------------


@pytest.fixture
def hanging_server():
    """An address on 127.0.0.1 that accepts connections (the kernel completes them) but never
    answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/file.txt"


class Trickle(BaseHTTPRequestHandler):
    """Answers at once, then sends one byte every 0.1 s: never stalls, never finishes."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        for _ in range(1000):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.1)

    def log_message(self, *args):
        pass


@pytest.fixture
def trickle_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/file.txt"
    server.shutdown()
    server.server_close()


def demo_resource(monkeypatch, tmp_path, urls) -> None:
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "data"))
    resource = downloads.Resource(path="demo/file.txt", sha256="0" * 64, urls=tuple(urls))
    monkeypatch.setitem(downloads.RESOURCES, "demo", resource)


def test_a_server_that_never_answers_fails_over_then_gives_a_clear_error(
    monkeypatch, tmp_path, hanging_server
):
    backup = hanging_server.replace("file.txt", "backup.txt")
    demo_resource(monkeypatch, tmp_path, [hanging_server, backup])
    with pytest.raises(downloads.DownloadError, match="Could not download 'demo'") as err:
        downloads.fetch("demo", timeout=0.2)
    lines = str(err.value).splitlines()
    assert any(hanging_server in line and "timed out" in line for line in lines)
    assert any(backup in line and "timed out" in line for line in lines)  # the backup was tried
    assert "LORA_DATA_DIR" in str(err.value)


def test_a_download_that_never_ends_is_cut_at_its_deadline(monkeypatch, tmp_path, trickle_server):
    demo_resource(monkeypatch, tmp_path, [trickle_server])
    with pytest.raises(downloads.DownloadError, match="longer than its deadline of 0.5 s"):
        downloads.fetch("demo", timeout=1.0, deadline=0.5)
    assert list((tmp_path / "data" / "demo").iterdir()) == []  # no partial file left


def test_the_default_timeouts_fail_over_within_20_seconds():
    """Two addresses that never answer cost 2 x timeout; the resources with most addresses."""
    timeout = inspect.signature(downloads.fetch).parameters["timeout"].default
    assert max(len(r.urls) for r in downloads.RESOURCES.values()) * timeout <= 20
