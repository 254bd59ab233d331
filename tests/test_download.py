"""Resumable Criteo downloads against a local HTTP server: never the network."""

from __future__ import annotations

import gzip
import random
import re
import shutil
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from preprocess import download
from preprocess.errors import DataError
from tests.conftest import criteo_line

CHUNK = 1024


def payload(day: int, rows: int = 200) -> bytes:
    """Criteo-format text that gzip cannot shrink to nothing (so transfers span many chunks)."""
    rng = random.Random(day)
    lines = [
        criteo_line(rng.randint(0, 1), [str(rng.randint(0, 999)) for _ in range(13)],
                    [f"{rng.getrandbits(32):08x}" for _ in range(26)])
        for _ in range(rows)
    ]
    return "".join(lines).encode()


@dataclass
class Site:
    """What the test server serves, how it misbehaves, and the requests it saw."""

    files: dict[str, bytes]
    url: str = ""
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    ignore_range: bool = False
    drop_after: int | None = None  # the next GET sends only this many body bytes, then hangs up
    head_sizes: dict[str, int] = field(default_factory=dict)  # HEAD Content-Length overrides

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET"]


class Handler(BaseHTTPRequestHandler):
    """Static files with HEAD and ``Range: bytes=N-``, plus the failure modes a Site asks for."""

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        site: Site = self.server.site  # type: ignore[attr-defined]
        wanted = self.headers.get("Range")
        site.requests.append((self.command, self.path, wanted))
        data = site.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        if not body:
            self.send_response(200)
            self.send_header("Content-Length", str(site.head_sizes.get(self.path, len(data))))
            self.end_headers()
            return
        start = 0
        if wanted and not site.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted)[1])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        end = len(data)
        if site.drop_after is not None:
            end, site.drop_after = start + site.drop_after, None
            self.close_connection = True
        self.wfile.write(data[start:end])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def site(monkeypatch) -> Site:
    monkeypatch.setenv("no_proxy", "*")  # a proxy from the environment must not see 127.0.0.1
    served = Site(files={f"/day_{d}.gz": gzip.compress(payload(d)) for d in (0, 1)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.site = served  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    served.url = f"http://127.0.0.1:{server.server_address[1]}/"
    yield served
    server.shutdown()
    server.server_close()
    thread.join()


def fetch(site: Site, dest: Path, days: list[int], progress: list[int] | None = None) -> list[Path]:
    report = progress.append if progress is not None else None
    return download.download_days(days, dest, base_url=site.url, progress=report, chunk=CHUNK)


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_full_download(site, tmp_path):
    received: list[int] = []
    paths = fetch(site, tmp_path, [0, 1], received)
    assert paths == [tmp_path / "day_0.gz", tmp_path / "day_1.gz"]
    for day, path in enumerate(paths):
        assert path.read_bytes() == site.files[f"/day_{day}.gz"]
        assert (tmp_path / f"day_{day}.gz.size").read_text().strip() == str(path.stat().st_size)
    assert sum(received) == sum(len(d) for d in site.files.values())
    assert len(received) > 2  # reported as it arrives, not once per file
    assert not list(tmp_path.glob("*.part"))
    assert [(m, p) for m, p, _ in site.requests] == [("HEAD", "/day_0.gz"), ("HEAD", "/day_1.gz"),
                                                     ("GET", "/day_0.gz"), ("GET", "/day_1.gz")]


def test_complete_files_are_reused(site, tmp_path):
    fetch(site, tmp_path, [0, 1])
    site.requests.clear()
    fetch(site, tmp_path, [0, 1])
    assert site.requests == []  # the recorded sizes vouch for the files
    # Without the record, the server's size does, and is recorded again.
    (tmp_path / "day_0.gz.size").unlink()
    fetch(site, tmp_path, [0, 1])
    assert site.requests == [("HEAD", "/day_0.gz", None)]
    assert (tmp_path / "day_0.gz.size").is_file()


def test_interrupted_transfer_resumes_with_a_range_request(site, tmp_path):
    data = site.files["/day_0.gz"]
    site.drop_after = 3000
    with pytest.raises(DataError) as excinfo:
        fetch(site, tmp_path, [0])
    message = one_line_error(excinfo)
    assert f"stopped at 3000 of {len(data)} bytes" in message and "resume" in message
    assert (tmp_path / "day_0.gz.part").stat().st_size == 3000
    assert not (tmp_path / "day_0.gz").exists()

    received: list[int] = []
    fetch(site, tmp_path, [0], received)
    assert site.gets()[-1] == ("GET", "/day_0.gz", "bytes=3000-")
    assert sum(received) == len(data) - 3000
    assert (tmp_path / "day_0.gz").read_bytes() == data
    assert not (tmp_path / "day_0.gz.part").exists()


def test_server_ignoring_range_restarts_from_zero(site, tmp_path):
    data = site.files["/day_0.gz"]
    (tmp_path / "day_0.gz.part").write_bytes(b"x" * 3000)  # would corrupt the file if appended to
    site.ignore_range = True
    received: list[int] = []
    fetch(site, tmp_path, [0], received)
    assert site.gets() == [("GET", "/day_0.gz", "bytes=3000-")]
    assert sum(received) == len(data)
    assert (tmp_path / "day_0.gz").read_bytes() == data


def test_size_mismatch_is_detected(site, tmp_path):
    size = len(site.files["/day_0.gz"])
    site.head_sizes["/day_0.gz"] = size + 7
    with pytest.raises(DataError) as excinfo:
        fetch(site, tmp_path, [0])
    message = one_line_error(excinfo)
    assert "size mismatch" in message and site.url + "day_0.gz" in message
    assert str(size + 7) in message and str(size) in message
    assert not list(tmp_path.glob("day_0.gz*"))  # neither a partial nor a "complete" file


def test_file_of_the_wrong_size_is_downloaded_again(site, tmp_path):
    (tmp_path / "day_0.gz").write_bytes(b"not the day")
    fetch(site, tmp_path, [0])
    assert (tmp_path / "day_0.gz").read_bytes() == site.files["/day_0.gz"]


def test_required_bytes_counts_remaining_download_and_decompressed_size(tmp_path):
    (tmp_path / "day_0").write_text("already decompressed")
    (tmp_path / "day_1.gz.part").write_bytes(b"x" * 300)
    (tmp_path / "day_2.gz").write_bytes(b"x" * 500)  # complete
    need = download.required_bytes({0: 1000, 1: 2000, 2: 500}, tmp_path)
    assert need == 1000 + (2000 - 300 + 6400) + 1600


def test_disk_space_check_fails_before_downloading(site, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12, free=2 * 10**8))
    site.head_sizes["/day_0.gz"] = 10**9
    with pytest.raises(DataError) as excinfo:
        fetch(site, tmp_path, [0])
    message = one_line_error(excinfo)
    assert f"not enough disk space in {tmp_path}" in message
    assert "need 4.2 GB" in message and "0.2 GB free" in message and "days 0 " in message
    assert site.gets() == []


def test_decompress_day(tmp_path):
    gz = tmp_path / "day_0.gz"
    gz.write_bytes(gzip.compress(payload(0)))
    download.decompress_day(gz, tmp_path / "day_0")
    assert (tmp_path / "day_0").read_bytes() == payload(0)


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"not gzip at all" + b[15:]])
def test_truncated_or_corrupt_gzip_names_the_file(tmp_path, damage):
    gz = tmp_path / "day_0.gz"
    gz.write_bytes(damage(gzip.compress(payload(0))))
    with pytest.raises(DataError) as excinfo:
        download.decompress_day(gz, tmp_path / "day_0")
    message = one_line_error(excinfo)
    assert str(gz) in message and "delete it" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day_0.gz"]  # no output, no temporary file


def test_missing_file_is_a_clear_error(site, tmp_path):
    with pytest.raises(DataError) as excinfo:
        fetch(site, tmp_path, [5])
    message = one_line_error(excinfo)
    assert "HTTP 404" in message and site.url + "day_5.gz" in message


def test_unreachable_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(DataError) as excinfo:
        download.download_days([0], tmp_path, base_url=url)
    message = one_line_error(excinfo)
    assert f"cannot download {url}/day_0.gz" in message
