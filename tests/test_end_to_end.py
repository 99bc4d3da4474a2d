"""End to end, as a host application meets it: the real `web`, `worker` and `scheduler`
processes and the sandbox over HTTP. A batch is submitted over HTTP, its webhook is received and
verified, its results fetched; a receiver that never answers is given up after the last retry
(compressed schedule), and meanwhile the cycles run on time."""
import json
import time
import urllib.request

import pytest
from conftest import API_KEY, REDIS_URL

from bouncer.sandbox import Sandbox
from support.ports import free_port, wait_for_port
from support.processes import Supervisor, service_env
from support.receiver import Receiver
from support.waiting import wait_until

TOKEN = "tok-e2e-5b1d9a7c3e"
SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaA=="
CALLBACK_SECRET = "cb-e2e-8f2e4d6a"


class Api:
    def __init__(self, port):
        self.base = "http://127.0.0.1:%d/api/v1" % port

    def call(self, method, path, body=None, content_type="application/json"):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": "Bearer %s" % TOKEN, "Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()

    def status(self, batch_id):
        return json.loads(self.call("GET", "/batches/%d" % batch_id)[2])


@pytest.fixture
def service(tmp_path):
    sandbox = Sandbox(port=0, processing_time=1).start()
    port = free_port()
    env = service_env("sqlite:///%s" % (tmp_path / "bouncer.db"), REDIS_URL, sandbox.url, API_KEY,
                      API_TOKENS=TOKEN, WEBHOOK_SECRET=SECRET, WEBHOOK_RETRY_SCHEDULE="1,1,1",
                      WEBHOOK_ALLOW_PRIVATE="true",   # the receivers are on loopback
                      WEBHOOK_TIMEOUT="2", PUBLIC_URL="http://127.0.0.1:%d" % port,
                      CALLBACK_SECRET=CALLBACK_SECRET, STATUS_CHECK_INTERVAL="5", PORT=str(port))
    processes = Supervisor(tmp_path, env)
    try:
        with processes.logs_on_failure():
            assert processes.run("init-db").returncode == 0
            web = processes.start("web", "web")
            for name in ("worker-1", "worker-2"):
                processes.start(name, "worker")
            processes.start("scheduler", "scheduler")
            wait_for_port(port, web)
            yield processes, Api(port), sandbox
            assert processes.exited() == {}
            codes = processes.stop(["web", "worker-1", "worker-2", "scheduler"], grace=40)
            assert set(codes.values()) == {0}, codes
    finally:
        processes.stop_all()
        sandbox.stop()


def creation_ages(processes):
    """Seconds since each creation job last succeeded, as `status --json` says."""
    jobs = json.loads(processes.run("status", "--json").stdout)["jobs"]
    return [job["age_seconds"] for name, job in jobs.items() if name.startswith("batch_creator_")]


@pytest.mark.slow
def test_submit_over_http_webhook_received_results_fetched(service):
    processes, api, sandbox = service
    with Receiver(SECRET) as hooks, Receiver(SECRET, hang=True) as silent:
        status, headers, body = api.call("POST", "/batches?user_id=alice&check_type=deliverable&callback_url=%s"
                                         % hooks.url, b"deliverable@sandbox.usebouncer.com\nnot-an-address\n"
                                         b"undeliverable@sandbox.usebouncer.com\n", content_type="text/plain")
        assert status == 201
        batch_id = json.loads(body)["batch_id"]
        lost = json.loads(api.call("POST", "/batches", {"user_id": "bob", "check_type": "deliverable",
                                                        "emails": ["free@sandbox.usebouncer.com"],
                                                        "callback_url": silent.url})[2])["batch_id"]

        wait_until(lambda: hooks.verified(), "the webhook of alice's batch", timeout=60)
        (payload,) = hooks.verified()
        assert (payload["type"], payload["data"]["batch_id"]) == ("batch.completed", batch_id)
        status, headers, body = api.call("GET", "/batches/%d/results" % batch_id)
        assert headers["X-Batch-Status"] == "completed"
        assert [(r["email"], r["status"]) for r in json.loads(body)] == [
            ("deliverable@sandbox.usebouncer.com", "deliverable"), ("not-an-address", "invalid"),
            ("undeliverable@sandbox.usebouncer.com", "undeliverable")]

        # The silent receiver costs its retries, on the sender's queue; the cycles keep time.
        ages = []
        deadline = time.monotonic() + 60
        while api.status(lost)["webhook"]["state"] != "given up":
            assert time.monotonic() < deadline, api.status(lost)
            ages += creation_ages(processes)
            time.sleep(1)
    delivery = api.status(lost)["webhook"]
    assert delivery["attempts"] == 4 and delivery["last_error"] == "no answer within 2s"
    assert len(silent.received) == 4
    assert ages and max(ages) < 5, ages        # every second or so, as BATCH_CREATE_INTERVAL says
    assert sorted(sandbox.sent_addresses()) == ["deliverable@sandbox.usebouncer.com", "free@sandbox.usebouncer.com",
                                                "undeliverable@sandbox.usebouncer.com"]
