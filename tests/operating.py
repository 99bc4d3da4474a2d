"""What the console, /metrics and `status --json` tests share: the operator's secrets, a queue
with something in every state, and `status --json` as the CLI prints it."""
import base64
import json

from clirun import invoke
from conftest import addresses, submit, with_settings

from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.queue.progress import cancel_batch
from bouncer.runtime.jobs import job_definitions, record_run
from bouncer.store.database import utcnow
from bouncer.store.models import UserBatch, UserBatchEmail

PASSWORD = "op-pass-4c3b2a19"
METRICS_TOKEN = "metrics-tok-77aa55e1"
API_TOKEN = "tok-host-app-3f9a2c71"
CALLBACK_SECRET = "cb-secret-5e4d3c2b1a"
WEBHOOK_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaA=="


def operator_app(app, **changes):
    """The test's App with the console on (and every other secret set, so pages can be searched
    for them)."""
    return with_settings(app, operator_password=PASSWORD, api_tokens=(API_TOKEN,), public_url="https://q.example.com",
                         callback_secret=CALLBACK_SECRET, webhook_secret=WEBHOOK_SECRET, **changes)


def secrets_of(app):
    return [s for s in app.settings.secrets() if s]


def basic(user="operator", password=PASSWORD):
    return {"Authorization": "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()}


def status_json(*args):
    """`python -m bouncer status [args] --json`, parsed (the CLI runs with the test's App)."""
    result = invoke(["status", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def figure(answer, path):
    """The value at `path` ("check_types.deliverable.queued_emails") of a status answer."""
    for key in path.split("."):
        answer = answer[key]
    return answer


def host_batch(user_id, emails, check_type="deliverable"):
    """A batch a host wrote with plain SQL: its rows still `new`, not yet admitted."""
    batch_id = UserBatch.insert(user_id=user_id, check_type=check_type).execute()
    UserBatchEmail.insert_many([{"batch": batch_id, "position": i + 1, "email": e}
                                for i, e in enumerate(emails)]).execute()
    return batch_id


def busy_queue(app, bouncer):
    """Something in every state: batches completed, in flight, queued, cancelled, not yet
    admitted; Bouncer batches completed and outstanding; every job's last run recorded.
    Returns {name: user batch id}."""
    ids = {"alice": submit("alice", addresses("alice", 33) + ["not an address", "=cmd@example.com"]),
           "bob": submit("bob", addresses("bob", 4), check_type="catchall")}
    run_cycle(app, CREATION, "deliverable")          # 3 batches of 10 (the test cap is 3)
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")            # ingested: alice has 30 verdicts
    ids["carol"] = submit("carol", addresses("carol", 12))
    run_cycle(app, CREATION, "deliverable")          # alice's last 4 and carol's 12: two batches in flight
    run_cycle(app, CREATION, "catchall")
    ids["frank"] = submit("frank", addresses("frank", 15))      # queued, not yet packed
    ids["dave"] = submit("dave", addresses("dave", 5))
    cancel_batch(ids["dave"])                        # nothing sent: cancelled at once, a webhook due
    ids["erin"] = host_batch("erin", addresses("erin", 3) + ["nope"])
    now = utcnow()
    for seconds, job_id in enumerate(job_definitions(app.settings), start=1):
        record_run(job_id, now, summary="ok", seconds=seconds / 10, now=now)
    return ids
