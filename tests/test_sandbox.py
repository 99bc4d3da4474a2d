"""The Bouncer sandbox: the simulator over real HTTP (lifecycle, verdicts, auth, errors, faults,
callbacks), the controls tests steer it with, the same simulator behind `responses`, and its
options (declared once, the CLI's options built from them)."""
import json
import queue
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import requests

from bouncer.sandbox import Sandbox, simulator

BATCH_PATH = "/v1.1/email/verify/batch"
CATCHALL_PATH = "/v1.1/email/verify/catchall/batch"
KEY = {"x-api-key": "test-key"}
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FLAG_VALUES = {"yes", "no", "unknown"}


@pytest.fixture
def make_sandbox():
    """Starts sandboxes with the given settings and stops them all afterwards."""
    started = []

    def make(**settings):
        settings.setdefault("processing_time", 0.2)
        box = Sandbox(port=0, **settings).start()
        started.append(box)
        return box

    yield make
    for box in started:
        box.stop()


@pytest.fixture
def sandbox(make_sandbox):
    return make_sandbox()


def create(box, emails, path=BATCH_PATH, headers=KEY, params=None):
    items = [email if isinstance(email, dict) else {"email": email} for email in emails]
    return requests.post(box.url + path, json=items, headers=headers, params=params, timeout=5)


def create_batch(box, emails, path=BATCH_PATH, params=None):
    response = create(box, emails, path=path, params=params)
    assert response.status_code == 200, response.text
    return response.json()["batchId"]


def get_status(box, batch_id, path=BATCH_PATH, params=None):
    return requests.get("%s%s/%s" % (box.url, path, batch_id), headers=KEY, params=params,
                        timeout=5)


def download(box, batch_id, path=BATCH_PATH, which="all"):
    return requests.get("%s%s/%s/download" % (box.url, path, batch_id), headers=KEY,
                        params={"download": which}, timeout=5)


def download_records(box, batch_id, path=BATCH_PATH, which="all"):
    box.complete_now(batch_id)
    response = download(box, batch_id, path=path, which=which)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until_completed(box, batch_id, deadline=3.0):
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        answer = get_status(box, batch_id).json()
        if answer["status"] == "completed":
            return answer
        time.sleep(0.02)
    raise AssertionError("batch %s never completed" % batch_id)


# -- lifecycle ---------------------------------------------------------------------------------


def test_create_answers_queued(sandbox):
    response = create(sandbox, ["a@example.com", "b@example.com"])

    assert response.status_code == 200
    answer = response.json()
    assert answer["status"] == "queued"
    assert answer["quantity"] == 2
    assert answer["duplicates"] == 0
    assert ISO_MS_Z.match(answer["created"])
    assert answer["batchId"] in sandbox.batches


def test_status_queued_right_after_create(make_sandbox):
    box = make_sandbox(processing_time=60)
    batch_id = create_batch(box, ["a@example.com"])

    answer = get_status(box, batch_id).json()

    assert answer["status"] == "queued"
    assert "started" not in answer and "completed" not in answer and "credits" not in answer


def test_status_completed_after_processing_time(sandbox):
    batch_id = create_batch(sandbox, ["a@example.com"])

    completed = wait_until_completed(sandbox, batch_id)

    assert completed["credits"] == 1
    assert ISO_MS_Z.match(completed["started"]) and ISO_MS_Z.match(completed["completed"])
    assert completed["created"] <= completed["started"] <= completed["completed"]


def test_status_passes_through_processing(make_sandbox):
    box = make_sandbox(processing_time=10)
    batch_id = create_batch(box, ["a@example.com"])
    box.batches[batch_id]["created_mono"] -= 5  # halfway through

    answer = get_status(box, batch_id, params={"with-stats": "true"}).json()

    assert answer["status"] == "processing"
    assert "started" in answer and "completed" not in answer
    assert 0 <= answer["processed"] <= 1


def test_status_with_stats_counts_verdicts(sandbox):
    emails = ["deliverable@sandbox.usebouncer.com", "free@sandbox.usebouncer.com",
              "accept-all@sandbox.usebouncer.com", "undeliverable@sandbox.usebouncer.com",
              "unknown@sandbox.usebouncer.com"]
    batch_id = create_batch(sandbox, emails)
    sandbox.complete_now(batch_id)

    answer = get_status(sandbox, batch_id, params={"with-stats": "true"}).json()

    assert answer["processed"] == 5
    assert answer["stats"] == {"deliverable": 2, "risky": 1, "undeliverable": 1, "unknown": 1}


def test_download_405_before_completion_then_records(make_sandbox):
    box = make_sandbox(processing_time=0.5)
    batch_id = create_batch(box, ["a@example.com", "b@example.com"])

    early = download(box, batch_id)
    wait_until_completed(box, batch_id)
    late = download(box, batch_id)

    assert early.status_code == 405
    assert early.json() == {"status": 405, "error": "Method Not Allowed",
                            "message": "batch is not completed"}
    assert late.status_code == 200
    assert [record["email"] for record in late.json()] == ["a@example.com", "b@example.com"]


def test_finish_completes_batch_now(make_sandbox):
    box = make_sandbox(processing_time=60)
    batch_id = create_batch(box, ["a@example.com"])

    finished = requests.post("%s%s/%s/finish" % (box.url, BATCH_PATH, batch_id), headers=KEY,
                             timeout=5)

    assert finished.status_code == 202
    assert get_status(box, batch_id).json()["status"] == "completed"
    assert download(box, batch_id).status_code == 200


def test_complete_now_completes_all_batches(make_sandbox):
    box = make_sandbox(processing_time=60)
    batch_ids = [create_batch(box, ["a@example.com"]), create_batch(box, ["b@example.com"])]

    box.complete_now()

    assert [get_status(box, b).json()["status"] for b in batch_ids] == ["completed", "completed"]


def test_catchall_prefix_serves_same_lifecycle(sandbox):
    batch_id = create_batch(sandbox, ["accept-all@sandbox.usebouncer.com"], path=CATCHALL_PATH)
    sandbox.complete_now(batch_id)

    status = get_status(sandbox, batch_id, path=CATCHALL_PATH).json()
    records = download_records(sandbox, batch_id, path=CATCHALL_PATH)

    assert status["status"] == "completed"
    assert records[0]["domain"]["acceptAll"] == "yes"


def test_credits_answers_balance(sandbox):
    response = requests.get(sandbox.url + "/v1.1/credits", headers=KEY, timeout=5)

    assert response.json() == {"credits": 1000000}


# -- records and verdicts ----------------------------------------------------------------------


def test_download_records_are_emails_as_sent_one_per_address(sandbox):
    emails = ["John@Example.com", "john@example.com", "jane@example.com", "JOHN@EXAMPLE.COM"]
    response = create(sandbox, emails)
    batch_id = response.json()["batchId"]

    records = download_records(sandbox, batch_id)

    assert response.json()["quantity"] == 4
    assert response.json()["duplicates"] == 2
    assert get_status(sandbox, batch_id).json()["credits"] == 2
    assert [record["email"] for record in records] == ["John@Example.com", "jane@example.com"]


def test_download_record_shape_matches_bouncer(sandbox):
    batch_id = create_batch(sandbox, [{"email": "john@example.com", "name": "John"},
                                      "jane@example.com"])

    named, unnamed = download_records(sandbox, batch_id)

    assert named["name"] == "John" and "name" not in unnamed
    assert set(unnamed) == {"email", "status", "reason", "domain", "account", "dns", "provider",
                            "score", "toxic", "toxicity", "didYouMean", "retryAfter"}
    assert unnamed["domain"]["name"] == "example.com"
    assert set(unnamed["dns"]) == {"type", "record"}
    flags = [unnamed["domain"][f] for f in ("acceptAll", "disposable", "free")]
    flags += [unnamed["account"][f] for f in ("role", "disabled", "fullMailbox")]
    assert set(flags) <= FLAG_VALUES
    assert unnamed["didYouMean"] is None and unnamed["retryAfter"] is None


@pytest.mark.parametrize("email, status, reason, flag, score", [
    ("deliverable@sandbox.usebouncer.com", "deliverable", "accepted_email", None, 100),
    ("deliverable+tag@sandbox.usebouncer.com", "deliverable", "accepted_email", None, 100),
    ("undeliverable@sandbox.usebouncer.com", "undeliverable", "rejected_email", None, 0),
    ("accept-all@sandbox.usebouncer.com", "risky", "low_deliverability", "acceptAll", 50),
    ("disposable@sandbox.usebouncer.com", "risky", "low_quality", "disposable", None),
    ("free@sandbox.usebouncer.com", "deliverable", "accepted_email", "free", None),
    ("unknown@sandbox.usebouncer.com", "unknown", "unavailable_smtp", None, None),
    ("other@sandbox.usebouncer.com", "undeliverable", "invalid_email", None, None),
    ("role@sandbox.usebouncer.com", "deliverable", "accepted_email", "role", None),
])
def test_verdict_for_sandbox_address(email, status, reason, flag, score):
    record = simulator.build_record({"email": email})

    assert (record["status"], record["reason"]) == (status, reason)
    flags = {**record["domain"], **record["account"]}
    for name in ("acceptAll", "disposable", "free", "role"):
        assert (flags[name] == "yes") == (name == flag)
    if score is not None:
        assert record["score"] == score


def test_download_sandbox_addresses_over_http(sandbox):
    emails = ["deliverable+tag@sandbox.usebouncer.com", "undeliverable@sandbox.usebouncer.com",
              "accept-all+x@sandbox.usebouncer.com", "disposable@sandbox.usebouncer.com",
              "free@sandbox.usebouncer.com", "unknown@sandbox.usebouncer.com",
              "other@sandbox.usebouncer.com"]
    batch_id = create_batch(sandbox, emails)

    records = download_records(sandbox, batch_id)

    assert [(r["email"], r["status"]) for r in records] == [
        ("deliverable+tag@sandbox.usebouncer.com", "deliverable"),
        ("undeliverable@sandbox.usebouncer.com", "undeliverable"),
        ("accept-all+x@sandbox.usebouncer.com", "risky"),
        ("disposable@sandbox.usebouncer.com", "risky"),
        ("free@sandbox.usebouncer.com", "deliverable"),
        ("unknown@sandbox.usebouncer.com", "unknown"),
        ("other@sandbox.usebouncer.com", "undeliverable"),
    ]


def test_download_filter_by_status(sandbox):
    batch_id = create_batch(sandbox, ["deliverable@sandbox.usebouncer.com",
                                      "undeliverable@sandbox.usebouncer.com"])

    records = download_records(sandbox, batch_id, which="undeliverable")

    assert [r["email"] for r in records] == ["undeliverable@sandbox.usebouncer.com"]


def test_verdicts_deterministic_across_batches(sandbox):
    emails = ["user%d@example%d.com" % (n, n % 7) for n in range(200)]
    first = download_records(sandbox, create_batch(sandbox, emails))
    second = download_records(sandbox, create_batch(sandbox, list(reversed(emails))))

    by_email = {record["email"]: record for record in second}
    assert all(record == by_email[record["email"]] for record in first)
    statuses = {record["status"] for record in first}
    assert statuses == {"deliverable", "risky", "undeliverable", "unknown"}


def test_verdicts_mark_free_providers():
    record = simulator.build_record({"email": "someone@gmail.com"})

    assert record["domain"]["free"] == "yes"
    assert record["domain"]["acceptAll"] != "yes"


# -- auth and errors ---------------------------------------------------------------------------


def test_auth_missing_key_401(sandbox):
    response = create(sandbox, ["a@example.com"], headers={})

    assert response.status_code == 401
    assert response.json() == {"status": 401, "error": "Unauthorized",
                               "message": "Invalid API key"}
    assert sandbox.batches == {}


def test_auth_wrong_key_401(make_sandbox):
    box = make_sandbox(api_key="right-key")

    wrong = create(box, ["a@example.com"], headers={"x-api-key": "wrong-key"})
    right = create(box, ["a@example.com"], headers={"x-api-key": "right-key"})

    assert wrong.status_code == 401
    assert right.status_code == 200


def test_status_unknown_batch_404(sandbox):
    response = get_status(sandbox, "nosuchbatch")

    assert response.status_code == 404
    assert response.json() == {"status": 404, "error": "Not Found",
                               "message": "request nosuchbatch does not exist"}


def test_status_deleted_batch_404(sandbox):
    batch_id = create_batch(sandbox, ["a@example.com"])

    deleted = requests.delete("%s%s/%s" % (sandbox.url, BATCH_PATH, batch_id), headers=KEY,
                              timeout=5)

    assert deleted.status_code == 200
    assert get_status(sandbox, batch_id).status_code == 404
    assert download(sandbox, batch_id).status_code == 404


def test_status_forgotten_batch_404(sandbox):
    batch_id = create_batch(sandbox, ["a@example.com"])

    sandbox.forget(batch_id)

    assert get_status(sandbox, batch_id).status_code == 404


def test_unknown_route_404(sandbox):
    response = requests.get(sandbox.url + "/v1.1/nothing/here", headers=KEY, timeout=5)

    assert response.status_code == 404
    assert response.json()["error"] == "Not Found"


@pytest.mark.parametrize("body", [
    b"[{\"email\": \"a@example.com\"",
    b"not json at all",
    b"{\"email\": \"a@example.com\"}",
    b"[\"a@example.com\"]",
    b"[{\"email\": 42}]",
    b"[{\"name\": \"no email\"}]",
    b"[]",
])
def test_create_bad_body_400(sandbox, body):
    response = requests.post(sandbox.url + BATCH_PATH, data=body, headers=KEY, timeout=5)

    assert response.status_code == 400
    assert response.json()["error"] == "Bad Request"
    assert sandbox.batches == {}


def test_create_too_many_emails_400(sandbox):
    response = create(sandbox, ["u%d@example.com" % n for n in range(100_001)])

    assert response.status_code == 400
    assert "100000" in response.json()["message"]


def test_handler_error_answers_500_and_keeps_serving(sandbox, monkeypatch):
    batch_id = create_batch(sandbox, ["a@example.com"])
    sandbox.complete_now(batch_id)

    def broken(item):
        raise RuntimeError("boom")

    monkeypatch.setattr(simulator, "build_record", broken)
    failed = download(sandbox, batch_id)
    monkeypatch.undo()

    assert failed.status_code == 500
    assert failed.json()["status"] == 500
    assert download(sandbox, batch_id).status_code == 200


# -- faults ------------------------------------------------------------------------------------


def test_fail_next_sends_non_json_body(sandbox):
    sandbox.fail_next(502, body="<html>bad gateway</html>")

    failed = create(sandbox, ["a@example.com"])
    then = create(sandbox, ["a@example.com"])

    assert failed.status_code == 502
    assert failed.text == "<html>bad gateway</html>"
    assert then.status_code == 200
    assert len(sandbox.batches) == 1
    assert [r["fault"] for r in sandbox.requests] == ["502", None]


def test_fail_next_default_body_is_bouncer_error(sandbox):
    sandbox.fail_next(402, count=2)

    answers = [create(sandbox, ["a@example.com"]) for _ in range(3)]

    assert [a.status_code for a in answers] == [402, 402, 200]
    assert answers[0].json() == {"status": 402, "error": "Payment Required",
                                 "message": "0 credits left"}


def test_fail_next_only_matches_kind(sandbox):
    sandbox.fail_next(503, kind="download")
    batch_id = create_batch(sandbox, ["a@example.com"])
    sandbox.complete_now(batch_id)

    status = get_status(sandbox, batch_id)
    failed = download(sandbox, batch_id)
    retried = download(sandbox, batch_id)

    assert status.status_code == 200
    assert (failed.status_code, retried.status_code) == (503, 200)


def test_fail_rate_gives_5xx_and_creates_no_batch(make_sandbox):
    box = make_sandbox(fail_rate=1.0)

    answers = [create(box, ["a@example.com"]) for _ in range(6)]

    assert all(a.status_code in (500, 503) for a in answers)
    assert answers[0].json()["message"] == "injected fault"
    assert box.batches == {}
    assert box.stats()["batches_created"] == 0
    assert all(r["fault"] in ("500", "503") for r in box.requests)


def test_fail_rate_same_seed_same_faults(make_sandbox):
    runs = []
    for _ in range(2):
        box = make_sandbox(fail_rate=0.5, seed=7)
        runs.append([create(box, ["a@example.com"]).status_code for _ in range(10)])

    assert runs[0] == runs[1]
    assert 200 in runs[0] and set(runs[0]) - {200}


def test_rate_limit_rate_gives_429(make_sandbox):
    box = make_sandbox(rate_limit_rate=1.0)

    response = create(box, ["a@example.com"])

    assert response.status_code == 429
    assert response.json() == {"status": 429, "error": "Too Many Requests",
                               "message": "too many requests"}
    assert box.batches == {}
    assert box.requests[0]["fault"] == "429"


def test_slow_rate_delays_then_answers(make_sandbox):
    box = make_sandbox(slow_rate=1.0, slow_seconds=0.1)

    began = time.monotonic()
    response = create(box, ["a@example.com"])

    assert response.status_code == 200
    assert time.monotonic() - began >= 0.1
    assert box.requests[0]["fault"] == "slow"


def test_stats_counts_requests_faults_and_batches(sandbox):
    batch_id = create_batch(sandbox, ["a@example.com", "b@example.com"])
    get_status(sandbox, batch_id)
    sandbox.fail_next(429, kind="status")
    get_status(sandbox, batch_id)
    download(sandbox, batch_id)
    requests.get(sandbox.url + "/v1.1/credits", headers=KEY, timeout=5)

    stats = sandbox.stats()

    assert stats["requests"] == 5
    assert stats["by_kind"] == {"create": 1, "status": 2, "download": 1, "other": 1}
    assert stats["by_method"] == {"POST": 1, "GET": 4}
    assert stats["faults"] == {"429": 1}
    assert (stats["batches_created"], stats["emails_received"]) == (1, 2)


# -- callbacks ---------------------------------------------------------------------------------


@pytest.fixture
def callback_receiver():
    """A tiny HTTP server that puts each POSTed JSON body on a queue."""
    received = queue.Queue()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            received.put(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d/hook" % server.server_address[1], received
    server.shutdown()
    server.server_close()


def test_callback_posted_on_completion(sandbox, callback_receiver):
    url, received = callback_receiver

    batch_id = create_batch(sandbox, ["a@example.com"], params={"callback": url})

    assert received.get(timeout=3) == {"batchId": batch_id, "status": "completed"}
    assert get_status(sandbox, batch_id).json()["status"] == "completed"


def test_callback_posted_once_when_finished_early(make_sandbox, callback_receiver):
    url, received = callback_receiver
    box = make_sandbox(processing_time=60)
    batch_id = create_batch(box, ["a@example.com"], params={"callback": url})

    box.complete_now(batch_id)

    assert received.get(timeout=3) == {"batchId": batch_id, "status": "completed"}
    with pytest.raises(queue.Empty):
        received.get(timeout=0.2)


# -- secrets -----------------------------------------------------------------------------------


def test_api_key_never_in_request_logs(make_sandbox, tmp_path):
    log_path = tmp_path / "requests.jsonl"
    box = make_sandbox(api_key="s3cret-key-123", request_log=str(log_path))
    good = {"x-api-key": "s3cret-key-123"}
    batch_id = create(box, ["a@example.com"], headers=good).json()["batchId"]
    create(box, ["a@example.com"], headers={"x-api-key": "s3cret-key-123-wrong"})
    requests.get("%s%s/%s" % (box.url, BATCH_PATH, batch_id), headers=good, timeout=5)

    lines = log_path.read_text().splitlines()

    assert "s3cret" not in log_path.read_text()
    assert "s3cret" not in json.dumps(box.requests)
    assert [json.loads(line) for line in lines] == box.requests
    assert [r["status"] for r in box.requests] == [200, 401, 200]
    assert set(box.requests[0]) == {"time", "kind", "method", "path", "status", "fault"}
