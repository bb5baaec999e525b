"""Slow and idle connections (slowloris): a request head has `server.header_timeout` seconds to
arrive whole, and thousands of half-open connections do not lock other clients out."""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server

HALF_OPEN = 3000
HEADER_TIMEOUT = 2.0
HEAD = b"GET /v0/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _serve(tmp: Path, header_timeout: float) -> Server:
    """`xllm serve` started with the soft open-files limit of a login shell (1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        return start_server(
            tmp, [], env={"XLLM_HEADER_TIMEOUT": str(header_timeout)}, wait_model=False
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = _serve(tmp_path_factory.mktemp("quick"), HEADER_TIMEOUT)
    yield s
    stop_server(s)


def _open_files_limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no 'Max open files' in /proc/<pid>/limits")


def _sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with suppress(OSError):  # closed while we looked
            count += fd.readlink().name.startswith("socket:")
    return count


def test_half_open_connections_do_not_lock_others_out(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """3,000 connections that send part of a request line and stop: a fresh client still gets
    its answers at once while they are held (the server raised its soft limit on open files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < HALF_OPEN + 200:
        pytest.fail(f"this test needs a hard RLIMIT_NOFILE of {HALF_OPEN + 200}, not {hard}")
    server = _serve(tmp_path_factory.mktemp("slowloris"), header_timeout=60)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        with ExitStack() as held:
            opened = 0
            for _ in range(HALF_OPEN):
                try:
                    sock = held.enter_context(
                        socket.create_connection(("127.0.0.1", server.port), timeout=2)
                    )
                    sock.sendall(b"GET /v0/health HT")
                except TimeoutError:
                    break  # the server stopped accepting: what the checks below catch
                opened += 1
            with httpx.Client(timeout=5) as fresh:
                for path in ("/api/version", "/v0/health"):
                    start = time.monotonic()
                    try:
                        r = fresh.get(f"{server.url}{path}")
                    except httpx.HTTPError as e:
                        pytest.fail(f"{path} failed while {opened} connections were held: {e!r}")
                    assert r.status_code == 200
                    assert time.monotonic() - start < 1, path
            assert opened == HALF_OPEN
            assert _sockets(server.proc.pid) >= HALF_OPEN  # all of them were still held
        limits = _open_files_limits(server.proc.pid)
        assert limits[0] == limits[1], limits
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        stop_server(server)


def _closed(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes `sock` before `deadline` (what it sends meanwhile is read)."""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def _trickle(sock: socket.socket, deadline: float) -> bool:
    """Send a request head one byte a second, never finishing it; whether the server closes
    the connection before `deadline`."""
    head = b"GET /v0/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    for byte in head:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return True
        if _closed(sock, min(deadline, time.monotonic() + 1)):
            return True
        if time.monotonic() >= deadline:
            return False
    raise AssertionError("the trickle ran out before the deadline")


def _answer_status(sock: socket.socket) -> int:
    """The status of the one response to read from `sock` (headers and Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, "connection closed before a response"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(v) for k, _, v in (h.partition(":") for h in lines) if k == "Content-Length")
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1])


@pytest.mark.parametrize(
    "case",
    ["silent after part of a request line", "trickling a byte a second", "idle keep-alive",
     "trickling a second request"],
)  # fmt: skip
def test_incomplete_request_head_is_closed_after_header_timeout(quick: Server, case: str) -> None:
    with socket.create_connection(("127.0.0.1", quick.port), timeout=5) as sock:
        if case in ("idle keep-alive", "trickling a second request"):
            sock.sendall(HEAD)
            assert _answer_status(sock) == 200
        start = time.monotonic()
        deadline = start + HEADER_TIMEOUT + 2
        if case == "silent after part of a request line":
            sock.sendall(b"GET /v0/health HT")
        closed = (
            _trickle(sock, deadline) if case.startswith("trickling") else _closed(sock, deadline)
        )
        assert closed, f"still open {HEADER_TIMEOUT + 2} s later"
        assert time.monotonic() - start > HEADER_TIMEOUT - 0.5  # not before the timeout


def test_a_head_in_pieces_within_the_timeout_is_served(quick: Server) -> None:
    with socket.create_connection(("127.0.0.1", quick.port), timeout=5) as sock:
        for piece in (HEAD[:10], HEAD[10:30], HEAD[30:]):
            sock.sendall(piece)
            time.sleep(HEADER_TIMEOUT / 4)
        assert _answer_status(sock) == 200
