"""The web process cannot be exhausted: a body longer than its route takes is refused from the
headers alone, before it is sent; idle connections neither starve /health nor stay open."""
import json
import socket
import threading
import time

import pytest
from conftest import with_settings

from bouncer.web.server import SMALL_BODY, make_server, stop_server

TOKEN = "tok-host-app-3f9a2c71"


@pytest.fixture
def served(app):
    """The real waitress server of the web app on a loopback port, in this process."""
    server = make_server(with_settings(app, api_tokens=(TOKEN,), api_max_emails=100), 0, host="127.0.0.1",
                         idle_timeout=1)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield server.effective_port
    stop_server(server, thread)


def send_head(port, head):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head.encode())
    return sock


def answer_of(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("path, headers", [
    ("/bouncer/callback/wrong-secret", ""),
    ("/api/v1/batches", ""),                                      # no token: the small bound
    ("/api/v1/batches", "Authorization: Bearer wrong-token-1\r\n"),
    ("/health", ""),
])
def test_a_large_body_is_refused_from_its_headers_before_it_is_sent(served, path, headers):
    sock = send_head(served, "POST %s HTTP/1.1\r\nHost: x\r\n%sContent-Type: application/json\r\n"
                     "Content-Length: %d\r\n\r\n" % (path, headers, 1024 ** 3))
    started = time.monotonic()
    head = answer_of(sock)                  # not one byte of the 1 GB body was sent
    sock.close()
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert time.monotonic() - started < 5
    body = head.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in head else b""
    assert body == b"" or json.loads(body)["error"].startswith("request body too large")


def test_a_token_holder_may_send_an_api_submit_up_to_its_bound(served):
    limit = 100 * 400 + SMALL_BODY
    sock = send_head(served, "POST /api/v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                     "Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % (TOKEN, limit + 1))
    assert answer_of(sock).startswith(b"HTTP/1.1 413")
    sock.close()
    body = b"a@example.com\n" * 10
    sock = send_head(served, "POST /api/v1/batches?user_id=a&check_type=deliverable HTTP/1.1\r\nHost: x\r\n"
                     "Authorization: Bearer %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
                     % (TOKEN, len(body)))
    sock.sendall(body)
    assert answer_of(sock).startswith(b"HTTP/1.1 201")
    sock.close()


def test_idle_connections_do_not_starve_health_and_are_closed(served):
    idle = [socket.create_connection(("127.0.0.1", served), timeout=5) for _ in range(150)]
    try:
        started = time.monotonic()
        sock = send_head(served, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = answer_of(sock)
        sock.close()
        assert head.split(b" ")[1] in (b"200", b"503") and time.monotonic() - started < 5
        time.sleep(3)                         # past the idle timeout (1 s here, 30 s in production)
        closed = 0
        for conn in idle:
            conn.settimeout(1)
            try:
                closed += conn.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(idle)
    finally:
        for conn in idle:
            conn.close()


def test_a_server_stopped_from_another_thread_ends_its_loop_without_an_error(app, monkeypatch):
    failures = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    server = make_server(app, 0, host="127.0.0.1")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    idle = socket.create_connection(("127.0.0.1", server.effective_port), timeout=5)
    time.sleep(0.3)                        # the loop waits in its poll, a connection open
    stop_server(server, thread)
    assert not thread.is_alive() and failures == []
    assert idle.recv(1) == b""             # closed by the server's own loop
    idle.close()
    with pytest.raises(OSError):
        send_head(server.effective_port, "GET /health HTTP/1.1\r\n\r\n")
