"""The Bouncer sandbox: the simulator over real HTTP (lifecycle, verdicts, auth, errors, faults,
callbacks), the controls tests steer it with, the same simulator behind `responses`, and its
options (declared once, the CLI's options built from them)."""
import json
import queue
import re
import threading
import time
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, HTTPServer

import click
import pytest
import requests
from clirun import invoke
from conftest import assert_clean_failure

from bouncer.cli import cli
from bouncer.errors import ConfigError
from bouncer.sandbox import Sandbox, SandboxOptions, simulator

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


def delete(box, batch_id):
    return requests.delete("%s%s/%s" % (box.url, BATCH_PATH, batch_id), headers=KEY, timeout=5)


def finish(box, batch_id):
    return requests.post("%s%s/%s/finish" % (box.url, BATCH_PATH, batch_id), headers=KEY, timeout=5)


def test_status_deleted_batch_404(sandbox):
    batch_id = create_batch(sandbox, ["a@example.com"])
    wait_until_completed(sandbox, batch_id)

    deleted = delete(sandbox, batch_id)

    assert deleted.status_code == 200 and deleted.json() == {}
    assert get_status(sandbox, batch_id).status_code == 404
    assert download(sandbox, batch_id).status_code == 404
    assert delete(sandbox, batch_id).status_code == 404


def test_delete_of_a_running_batch_answers_405(make_sandbox):
    box = make_sandbox(processing_time=60)
    batch_id = create_batch(box, ["a@example.com"])

    refused = delete(box, batch_id)

    assert refused.status_code == 405
    assert refused.json() == {"status": 405, "error": "Method Not Allowed",
                              "message": "batch cannot be deleted in current state"}
    assert get_status(box, batch_id).json()["status"] in ("queued", "processing")


def test_finish_keeps_what_was_verified_and_refunds_the_rest(make_sandbox):
    box = make_sandbox(processing_time=60, credits=10)
    batch_id = create_batch(box, ["a@example.com", "b@example.com", "c@example.com", "d@example.com"])
    box.set_processed(batch_id, 3)
    assert get_status(box, batch_id, params={"with-stats": "true"}).json()["processed"] == 3

    finished = finish(box, batch_id)
    again = finish(box, batch_id)

    assert (finished.status_code, finished.json()) == (202, {})
    assert again.status_code == 400 and again.json()["message"] == "batch has to be running to finish"
    status = get_status(box, batch_id).json()
    assert (status["status"], status["credits"]) == ("completed", 3)
    assert [r["email"] for r in download(box, batch_id).json()] == ["a@example.com", "b@example.com",
                                                                     "c@example.com"]
    assert box.credits == 10 - 4 + 1
    assert (box.count("finish"), box.count("other")) == (2, 0)


def test_greylisted_addresses_answer_unknown_with_a_retry_after_until_tried_late_enough(make_sandbox):
    box = make_sandbox(processing_time=0, greylist_rate=1.0, greylist_seconds=0.5)
    emails = ["a@example.com", "b@example.com"]
    first = download_records(box, create_batch(box, emails))
    early = download_records(box, create_batch(box, ["A@example.com"]))
    time.sleep(0.6)
    late = download_records(box, create_batch(box, emails))

    assert [(r["status"], r["reason"]) for r in first] == [("unknown", "timeout")] * 2
    retry_after = first[0]["retryAfter"]
    assert ISO_MS_Z.match(retry_after)
    assert early[0]["retryAfter"] == retry_after     # too early: the same wait, counted
    assert [r["status"] for r in late] == [simulator.verdict_for(e)["status"] for e in emails]
    assert [r["retryAfter"] for r in late] == [None, None]
    assert box.stats()["early_retries"] == 1 and box.stats()["greylisted"] == 2


def test_greylist_rate_picks_a_stable_share_and_spares_sandbox_addresses():
    picked = [simulator.is_greylisted("u%d@example.com" % i, 0.25) for i in range(2000)]
    assert 400 < sum(picked) < 600
    assert picked == [simulator.is_greylisted("U%d@Example.com " % i, 0.25) for i in range(2000)]
    assert not simulator.is_greylisted("unknown@sandbox.usebouncer.com", 1.0)
    assert not any(simulator.is_greylisted("u%d@example.com" % i, 0.0) for i in range(100))


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
    assert stats["by_kind"] == {"create": 1, "status": 2, "download": 1, "finish": 0, "delete": 0, "other": 1}
    assert stats["by_method"] == {"POST": 1, "GET": 4}
    assert stats["faults"] == {"429": 1}
    assert (stats["batches_created"], stats["emails_received"]) == (1, 2)
    assert (stats["greylisted"], stats["early_retries"]) == (0, 0)


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
    # A create Bouncer accepted also names its batch and the credits it cost.
    assert set(box.requests[0]) == {"time", "kind", "method", "path", "status", "fault", "batch_id", "credits"}
    assert (box.requests[0]["batch_id"], box.requests[0]["credits"]) == (batch_id, 1)
    assert set(box.requests[1]) == {"time", "kind", "method", "path", "status", "fault"}


# -- controls ----------------------------------------------------------------------------------


def test_processing_time_zero_completes_at_once(make_sandbox):
    box = make_sandbox(processing_time=0)
    batch_id = create_batch(box, ["a@example.com"])

    assert get_status(box, batch_id).json()["status"] == "completed"
    assert download(box, batch_id).status_code == 200


def test_download_body_built_once_for_repeated_downloads(sandbox, monkeypatch):
    built = []
    real = simulator.build_record
    monkeypatch.setattr(simulator, "build_record", lambda item, *more: built.append(item) or real(item, *more))
    batch_id = create_batch(sandbox, ["a@example.com", "b@example.com"])
    sandbox.complete_now(batch_id)

    first = download(sandbox, batch_id)
    get_status(sandbox, batch_id, params={"with-stats": "true"})
    second = download(sandbox, batch_id)

    assert first.content == second.content and len(first.json()) == 2
    assert len(built) == 2
    assert sandbox.batches[batch_id]["downloads"]["all"].body == first.content


def test_credits_spent_per_distinct_address_and_402_when_short(make_sandbox):
    box = make_sandbox(credits=3)

    first = create(box, ["a@example.com", "A@example.com", "b@example.com"])
    short = create(box, ["c@example.com", "d@example.com"])
    balance = requests.get(box.url + "/v1.1/credits", headers=KEY, timeout=5).json()

    assert first.status_code == 200 and box.credits == 1
    assert short.status_code == 402
    assert short.json() == {"status": 402, "error": "Payment Required", "message": "1 credits left"}
    assert balance == {"credits": 1}
    assert len(box.batches) == 1 and box.sent_addresses() == [
        "a@example.com", "A@example.com", "b@example.com"]


def test_credits_topped_up_by_a_test(make_sandbox):
    box = make_sandbox(credits=0)
    refused = create(box, ["a@example.com"])

    box.credits = 5
    accepted = create(box, ["a@example.com"])

    assert (refused.status_code, accepted.status_code) == (402, 200)
    assert refused.json()["message"] == "0 credits left"
    assert box.credits == 4


def test_remove_results_answers_a_final_405(sandbox):
    batch_id = create_batch(sandbox, ["a@example.com"])
    sandbox.complete_now(batch_id)

    sandbox.remove_results(batch_id)
    answers = [download(sandbox, batch_id) for _ in range(2)]

    assert [a.status_code for a in answers] == [405, 405]
    assert "email addresses and results have been removed" in answers[0].json()["message"]
    assert answers[0].json() != {"status": 405, "error": "Method Not Allowed",
                                 "message": "batch is not completed"}
    assert get_status(sandbox, batch_id).json()["status"] == "completed"


def test_set_status_answers_an_undocumented_status_until_cleared(make_sandbox):
    box = make_sandbox(processing_time=60)
    batch_id = create_batch(box, ["a@example.com"])

    box.set_status(batch_id, "completed")
    says_completed = get_status(box, batch_id).json()["status"]
    not_ready = download(box, batch_id)
    box.set_status(batch_id, "paused")
    paused = get_status(box, batch_id).json()["status"]
    box.set_status(batch_id, None)

    assert (says_completed, not_ready.status_code, paused) == ("completed", 405, "paused")
    assert get_status(box, batch_id).json()["status"] == "queued"


@pytest.mark.parametrize("control", [
    lambda box: box.set_status("nosuchbatch", "paused"),
    lambda box: box.remove_results("nosuchbatch"),
    lambda box: box.complete_now("nosuchbatch"),
], ids=["set_status", "remove_results", "complete_now"])
def test_controls_refuse_an_unknown_batch(sandbox, control):
    with pytest.raises(KeyError, match="nosuchbatch"):
        control(sandbox)


def test_alter_downloads_serves_what_the_hook_returns_then_the_real_records(sandbox):
    batch_id = create_batch(sandbox, ["a@example.com", "b@example.com"])
    sandbox.complete_now(batch_id)

    def drop_first_and_spoil(records):
        records[1]["status"] = "spoiled"
        return records[1:] + ["not a record"]
    sandbox.alter_downloads(drop_first_and_spoil)
    altered = download(sandbox, batch_id).json()
    sandbox.alter_downloads(None)
    restored = download(sandbox, batch_id).json()

    assert [r if isinstance(r, str) else (r["email"], r["status"]) for r in altered] == [
        ("b@example.com", "spoiled"), "not a record"]
    assert [r["email"] for r in restored] == ["a@example.com", "b@example.com"]
    assert restored[1]["status"] == simulator.verdict_for("b@example.com")["status"]


def test_readers_count_kinds_and_keep_addresses_of_deleted_batches(sandbox):
    first = create_batch(sandbox, ["a@example.com", "b@example.com"])
    create_batch(sandbox, ["c@example.com"])
    sandbox.complete_now(first)
    delete(sandbox, first)
    sandbox.fail_next(503, kind="status")
    get_status(sandbox, first)
    requests.get(sandbox.url + "/v1.1/credits", headers=KEY, timeout=5)

    assert sandbox.sent_addresses() == ["a@example.com", "b@example.com", "c@example.com"]
    assert [sandbox.count(kind) for kind in ("create", "status", "delete", "other")] == [2, 1, 1, 1]
    assert [(r["kind"], r["status"], r["fault"]) for r in sandbox.requests] == [
        ("create", 200, None), ("create", 200, None), ("delete", 200, None), ("status", 503, "503"),
        ("other", 200, None)]
    with pytest.raises(ValueError, match="kind"):
        sandbox.count("created")


def test_clear_faults_forgets_planned_faults(sandbox):
    sandbox.fail_next(500, count=3)

    sandbox.clear_faults()

    assert create(sandbox, ["a@example.com"]).status_code == 200


@pytest.mark.parametrize("status, body", [
    (99, None), (600, None), ("slow", None), (True, None), ("timeout", "body"),
    (requests.ConnectionError, b"x"),
])
def test_fail_next_refuses_a_fault_it_cannot_play(sandbox, status, body):
    with pytest.raises(ValueError):
        sandbox.fail_next(status, body=body)


def test_fail_next_timeout_over_http_answers_late_and_still_creates(make_sandbox):
    box = make_sandbox(processing_time=60, slow_seconds=0.5)
    box.fail_next("timeout", kind="create")

    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(box.url + BATCH_PATH, json=[{"email": "a@example.com"}], headers=KEY,
                      timeout=0.2)
    assert box.batches == {}            # Bouncer is still working on it
    deadline = time.monotonic() + 3
    while not box.batches and time.monotonic() < deadline:
        time.sleep(0.02)

    assert len(box.batches) == 1
    assert [(r["fault"], r["status"]) for r in box.requests] == [("timeout", 200)]


def test_fail_next_exception_over_http_closes_the_connection_unanswered(sandbox):
    sandbox.fail_next(requests.ConnectionError, kind="create")

    with pytest.raises(requests.ConnectionError):
        create(sandbox, ["a@example.com"])

    assert sandbox.batches == {}
    assert [(r["fault"], r["status"]) for r in sandbox.requests] == [("ConnectionError", None)]
    assert create(sandbox, ["a@example.com"]).status_code == 200


def test_attribute_out_of_range_refused(sandbox):
    with pytest.raises(ConfigError, match="--slow-rate"):
        sandbox.slow_rate = 1.5
    sandbox.slow_rate = 0.25

    assert sandbox.options.slow_rate == 0.25


# -- behind responses --------------------------------------------------------------------------

MOCK_URL = "https://bouncer.test"


@pytest.fixture
def mocked():
    """The simulator behind `responses` at MOCK_URL."""
    box = Sandbox(processing_time=60, api_key="test-key")
    with box.behind_responses(MOCK_URL):
        yield box


def mocked_create(emails, timeout=5):
    return requests.post(MOCK_URL + BATCH_PATH, json=[{"email": e} for e in emails], headers=KEY,
                         timeout=timeout)


def test_responses_lifecycle_is_the_same_simulator(mocked):
    created = mocked_create(["deliverable@sandbox.usebouncer.com", "b@example.com"])
    batch_id = created.json()["batchId"]
    status_url = "%s%s/%s" % (MOCK_URL, BATCH_PATH, batch_id)

    early = requests.get(status_url + "/download", headers=KEY, timeout=5)
    mocked.complete_now(batch_id)
    status = requests.get(status_url, headers=KEY, params={"with-stats": "true"}, timeout=5)
    records = requests.get(status_url + "/download", headers=KEY, timeout=5).json()

    assert created.status_code == 200 and batch_id in mocked.batches
    assert early.status_code == 405
    assert status.json()["status"] == "completed" and status.json()["processed"] == 2
    assert records == [simulator.build_record({"email": e}) for e in
                       ("deliverable@sandbox.usebouncer.com", "b@example.com")]
    assert [(r["kind"], r["path"]) for r in mocked.requests] == [
        ("create", BATCH_PATH), ("download", "/v1.1/email/verify/batch/%s/download" % batch_id),
        ("status", "/v1.1/email/verify/batch/%s" % batch_id),
        ("download", "/v1.1/email/verify/batch/%s/download" % batch_id)]


def test_responses_checks_the_key(mocked):
    answer = requests.post(MOCK_URL + BATCH_PATH, json=[{"email": "a@example.com"}],
                           headers={"x-api-key": "wrong"}, timeout=5)

    assert answer.status_code == 401 and mocked.batches == {}


def test_responses_fail_next_status_and_body(mocked):
    mocked.fail_next(502, body="<html>bad gateway</html>")
    mocked.fail_next(429)

    failed = mocked_create(["a@example.com"])
    limited = mocked_create(["a@example.com"])

    assert (failed.status_code, failed.text) == (502, "<html>bad gateway</html>")
    assert limited.status_code == 429 and limited.json()["message"] == "too many requests"
    assert mocked.batches == {}


def test_responses_timeout_raises_read_timeout_and_still_creates(mocked):
    mocked.fail_next("timeout", kind="create")

    began = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        mocked_create(["a@example.com"])

    assert time.monotonic() - began < 1           # no real waiting behind responses
    assert len(mocked.batches) == 1 and mocked.sent_addresses() == ["a@example.com"]
    assert mocked.requests[0]["fault"] == "timeout"


@pytest.mark.parametrize("error", [requests.exceptions.ConnectTimeout, requests.ConnectionError])
def test_responses_exception_is_raised_and_nothing_created(mocked, error):
    mocked.fail_next(error)

    with pytest.raises(error):
        mocked_create(["a@example.com"])

    assert mocked.batches == {} and mocked.count("create") == 1


def test_responses_slow_answer_times_out_only_past_the_client_timeout(mocked):
    mocked.slow_rate, mocked.slow_seconds = 1.0, 0.2

    with pytest.raises(requests.exceptions.ReadTimeout):
        mocked_create(["a@example.com"], timeout=(5, 0.1))
    began = time.monotonic()
    late = mocked_create(["b@example.com"], timeout=5)

    assert late.status_code == 200 and time.monotonic() - began >= 0.2
    assert len(mocked.batches) == 2
    assert [r["fault"] for r in mocked.requests] == ["slow", "slow"]


def test_responses_serves_only_its_base_url(mocked):
    with pytest.raises(requests.ConnectionError):
        requests.get("https://bouncer.testing" + BATCH_PATH + "/x", headers=KEY, timeout=5)

    assert mocked.requests == []


# -- options -----------------------------------------------------------------------------------


def test_options_keywords_override_the_dataclass():
    box = Sandbox(SandboxOptions(fail_rate=0.5, seed=3), seed=9, credits=10)

    assert (box.options.fail_rate, box.options.seed, box.credits) == (0.5, 9, 10)
    assert box.fail_rate == 0.5


@pytest.mark.parametrize("name, value, words", [
    ("port", 70000, "between 0 and 65535"),
    ("processing_time", -1, "at least 0"),
    ("fail_rate", 1.5, "between 0 and 1"),
    ("rate_limit_rate", -0.1, "between 0 and 1"),
    ("slow_rate", float("nan"), "number"),
    ("slow_seconds", -2, "at least 0"),
    ("credits", -1, "at least 0"),
    ("seed", "seven", "whole number"),
    ("port", True, "whole number"),
    ("api_key", 42, "text"),
])
def test_options_out_of_range_refused(name, value, words):
    with pytest.raises(ConfigError, match=words) as refused:
        SandboxOptions(**{name: value})

    assert "--" + name.replace("_", "-") in str(refused.value)


def test_options_repr_hides_the_key():
    assert "s3cret" not in repr(SandboxOptions(api_key="s3cret-key-123"))


def test_cli_sandbox_options_come_from_the_dataclass(monkeypatch):
    monkeypatch.delenv("SANDBOX_API_KEY", raising=False)
    command = cli.commands["sandbox"]
    with click.Context(command) as ctx:
        params = {p.name: p for p in command.get_params(ctx) if p is not command.get_help_option(ctx)}

    assert list(params) == [f.name for f in fields(SandboxOptions)]
    for f in fields(SandboxOptions):
        assert params[f.name].opts == ["--" + f.name.replace("_", "-")]
        assert params[f.name].default == f.default
        assert f.metadata["help"] in params[f.name].help
    assert params["api_key"].envvar == "SANDBOX_API_KEY"
    assert command.get_short_help_str().startswith("A local Bouncer")
    result = invoke(["sandbox", "--help"])
    for f in fields(SandboxOptions):
        assert "--" + f.name.replace("_", "-") in result.output
    assert "[env var: SANDBOX_API_KEY]" in " ".join(result.output.split())


def test_cli_sandbox_help_never_shows_the_key_from_the_environment():
    result = invoke(["sandbox", "--help"], env={"SANDBOX_API_KEY": "s3cret-key-123"})

    assert result.exit_code == 0 and "s3cret" not in result.output


def test_cli_sandbox_builds_its_options_from_the_command_line(monkeypatch):
    served = []
    monkeypatch.setattr(Sandbox, "serve_forever", lambda box: served.append(box.options))

    result = invoke(
        ["sandbox", "--port", "0", "--processing-time", "0", "--fail-rate", "0.1",
              "--seed", "7", "--credits", "5"], env={"SANDBOX_API_KEY": "from-the-env"})

    assert result.exit_code == 0, result.output
    assert served == [SandboxOptions(port=0, processing_time=0.0, fail_rate=0.1, seed=7,
                                     credits=5, api_key="from-the-env")]


@pytest.mark.parametrize("args, flag", [
    (["--fail-rate", "2"], "--fail-rate"),
    (["--port", "70000"], "--port"),
    (["--slow-seconds", "-1"], "--slow-seconds"),
    (["--credits", "-5"], "--credits"),
])
def test_cli_sandbox_out_of_range_is_one_clean_line(monkeypatch, args, flag):
    monkeypatch.setattr(Sandbox, "serve_forever", lambda box: pytest.fail("must not serve"))

    result = invoke(["sandbox", *args])

    assert_clean_failure(result, flag)


# -- throughput: an account rate shared by the batches processed at once -----------------------


def test_the_accounts_rate_is_shared_by_the_batches_it_processes_and_the_others_wait():
    from bouncer.sandbox.account import Account
    account = Account(per_hour=3600, parallel=2)       # one address a second in all
    for batch_id, size in (("a", 10), ("b", 10), ("c", 5)):
        account.add(batch_id, size, now=0.0)
    assert account.state("a", 10.0) == ("processing", 0.0, None, 5.0)     # half the rate each
    assert account.state("c", 10.0) == ("queued", None, None, None)
    assert account.load(10.0) == (2, 1)
    assert account.state("b", 20.0) == ("completed", 0.0, 20.0, 0)
    assert account.state("c", 22.0) == ("processing", 20.0, None, 3.0)      # alone: the whole rate
    assert account.state("c", 100.0) == ("completed", 20.0, 25.0, 0)


def test_a_batch_arriving_slows_the_one_in_progress_and_a_finished_one_frees_its_slot():
    from bouncer.sandbox.account import Account
    account = Account(per_hour=3600, parallel=1)
    account.add("a", 10, now=0.0)
    account.add("b", 4, now=5.0)                        # waits: one batch at a time
    assert account.state("b", 6.0)[0] == "queued"
    account.complete("a", now=7.0)                       # finished early (complete_now, a finish)
    assert account.state("a", 7.5) == ("completed", 0.0, 7.0, 0)
    assert account.state("b", 100.0) == ("completed", 7.0, 11.0, 0)
    shared = Account(per_hour=3600, parallel=25)
    shared.add("a", 10, now=0.0)
    shared.add("b", 10, now=5.0)                         # from 5 s on, a gets half the rate
    assert shared.state("a", 100.0)[2] == 15.0 and shared.state("b", 100.0)[2] == 20.0


def test_with_a_throughput_status_follows_the_load_and_callbacks_come_when_each_is_done(make_sandbox,
                                                                                     callback_receiver):
    url, received = callback_receiver
    box = make_sandbox(throughput=36000, parallel_batches=1)     # 10 addresses a second
    first = create_batch(box, ["a%d@example.com" % i for i in range(5)], params={"callback": url})
    second = create_batch(box, ["b%d@example.com" % i for i in range(5)], params={"callback": url})
    assert get_status(box, second).json()["status"] == "queued"      # behind the first
    assert received.get(timeout=5) == {"batchId": first, "status": "completed"}
    assert received.get(timeout=5) == {"batchId": second, "status": "completed"}
    answers = [get_status(box, b, params={"with-stats": "true"}).json() for b in (first, second)]
    assert [(a["status"], a["processed"]) for a in answers] == [("completed", 5), ("completed", 5)]
    assert answers[1]["started"] == answers[0]["completed"]          # the slot it waited for
    assert len(download(box, second).json()) == 5
