"""One Idempotency-Key, many requests at once, against the real web process: one batch is made,
and every request gets the same 2xx answer, counts and all (none a 503, none `accepted: 0`)."""
import http.client
import json
import os

import pytest
from conftest import API_KEY, REDIS_URL

from bouncer.store.models import IdempotencyKey, UserBatch
from support.ports import free_port, wait_for_port
from support.processes import Supervisor
from support.waiting import at_once

TOKEN = "tok-host-app-3f9a2c71"
REQUESTS = 12
ROWS = 3000


def post_batch(port, body, key):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/api/v1/batches?user_id=alice&check_type=deliverable", body=body, headers={
            "Authorization": "Bearer %s" % TOKEN, "Content-Type": "text/plain", "Idempotency-Key": key})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


@pytest.fixture
def web(database_url, redis_conn, db, tmp_path):
    port = free_port()
    supervisor = Supervisor(tmp_path, dict(os.environ, DATABASE_URL=database_url, REDIS_URL=REDIS_URL,
                                           BOUNCER_API_KEY=API_KEY, API_TOKENS=TOKEN, HOST="127.0.0.1",
                                           PORT=str(port), LOG_LEVEL="INFO"))
    process = supervisor.start("web", "web")
    try:
        with supervisor.logs_on_failure():
            wait_for_port(port, process)
            yield port
    finally:
        supervisor.stop_all()


@pytest.mark.slow
def test_requests_racing_with_one_key_all_get_the_same_answer(web):
    lines = ["user%d@example.com" % i for i in range(ROWS - 2)] + ["not an address", "user0@example.com"]
    body = ("\n".join(lines) + "\n").encode()
    answers, errors = at_once(lambda: post_batch(web, body, "order-1234"), REQUESTS)
    assert errors == []
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * (REQUESTS - 1) + [201], answers
    expected = {"batch_id": answers[0][1]["batch_id"], "accepted": ROWS - 1, "invalid": 1, "duplicates": 1,
                "invalid_lines": answers[0][1]["invalid_lines"]}
    assert [answer for _, answer in answers] == [expected] * REQUESTS
    assert UserBatch.select().count() == 1 and IdempotencyKey.select().count() == 1
    # A retry later answers the same again.
    assert post_batch(web, body, "order-1234") == (200, expected)
