"""The web process cannot be exhausted: a body longer than its route takes is refused from the
headers alone, before it is sent; a body nested deep is refused at its first bracket too deep;
idle connections neither starve /health nor stay open."""
import http.client
import json
import os
import socket
import threading
import time

import pytest
from conftest import API_KEY, REDIS_URL, with_settings

from bouncer.web.server import SMALL_BODY, make_server, stop_server
from support.ports import free_port, wait_for_port
from support.processes import Supervisor, bouncer_command

TOKEN = "tok-host-app-3f9a2c71"
CALLBACK_SECRET = "cb-secret-5e4d3c2b1a"
AS_LIMIT = 2 * 1024 ** 3        # the web process's address space in the nesting test: a regression
                                # ends in MemoryError there, not in the machine's memory


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


def nested(depth):
    return b"[" * depth + b"]" * depth


def post(port, path, body, token=TOKEN):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Authorization": "Bearer %s" % token,
                                                       "Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")
    finally:
        conn.close()


def peak_memory_kb(pid):
    """The process's peak resident memory (VmHWM), in kB."""
    with open("/proc/%d/status" % pid) as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


FIELDS = b'"user_id": "a", "check_type": "deliverable"'
NESTED_BODIES = [
    # (what, path, body, status, the error's start)
    ("40 KB nested 20,000 deep in emails", "/api/v1/batches",
     b"{" + FIELDS + b', "emails": ' + nested(20_000) + b"}", 400, "emails: item 1 is not a string"),
    ("200 KB nested 100,000 deep in emails", "/api/v1/batches",
     b"{" + FIELDS + b', "emails": ' + nested(100_000) + b"}", 400, "emails: item 1 is not a string"),
    ("nested under a field of its own", "/api/v1/batches",
     b"{" + FIELDS + b', "x": ' + nested(100_000) + b"}", 400, "unknown field 'x'"),
    ("nested in user_id", "/api/v1/batches",
     b'{"user_id": ' + nested(100_000) + b"}", 422, "user_id must be a string"),
    ("a list for a body", "/api/v1/batches", nested(100_000), 400, "the body must be a JSON object"),
    ("Bouncer's callback, 64 KB nested", "/bouncer/callback/%s/deliverable?reservation=1" % CALLBACK_SECRET,
     nested(32_000), 400, "the body nests deeper than 8 levels"),
]


@pytest.mark.slow
def test_a_deeply_nested_body_is_refused_without_the_web_process_growing(settings, redis_conn, db, tmp_path):
    port = free_port()
    supervisor = Supervisor(tmp_path, dict(
        os.environ, DATABASE_URL=settings.database_url, REDIS_URL=REDIS_URL, BOUNCER_API_KEY=API_KEY,
        API_TOKENS=TOKEN, PUBLIC_URL="https://bouncer.example.com", CALLBACK_SECRET=CALLBACK_SECRET,
        HOST="127.0.0.1", PORT=str(port)))
    web = supervisor.launch("web", ["prlimit", "--as=%d" % AS_LIMIT, "--", *bouncer_command("web")])
    try:
        with supervisor.logs_on_failure():
            wait_for_port(port, web)
            small = b"{" + FIELDS + b', "emails": ["a@example.com"]}'
            assert post(port, "/api/v1/batches", small)[0] == 201      # every module the route needs loaded
            before = peak_memory_kb(web.pid)
            for what, path, body, status, error in NESTED_BODIES:
                answer = post(port, path, body)
                assert answer[0] == status and answer[1]["error"].startswith(error), (what, answer)
            grown = peak_memory_kb(web.pid) - before
            assert grown < 20 * 1024, "the web process grew by %d kB" % grown
    finally:
        supervisor.stop_all()
