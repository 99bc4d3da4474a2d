"""The Node.js host example (examples/node/), run by real Node against PostgreSQL: it writes a
batch with plain SQL and waits; the queue's cycles (run here) verify it; it prints the results."""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.sandbox.simulator import verdict_for

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"
ADDRESSES = ["jane.doe@gmail.com", "not an address", "bob@example.com", "JaneDoe+x@googlemail.com"]


@pytest.fixture(scope="module")
def node_example():
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("Node.js is not installed (.ci/run installs it)")
    if not (EXAMPLE / "node_modules" / "pg").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, check=True,
                       capture_output=True, timeout=300)
    return EXAMPLE


@pytest.fixture
def postgres_app(app, database_url):
    if not database_url.startswith("postgres"):
        pytest.skip("the example uses the pg package: PostgreSQL only")
    return app


def test_node_example_submits_waits_and_prints_results(node_example, postgres_app, bouncer, database_url):
    env = dict(os.environ, DATABASE_URL=database_url, POLL_MS="100", TIMEOUT_MS="60000")
    host = subprocess.Popen(["node", "verify.js", "alice", "deliverable", *ADDRESSES], cwd=node_example,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while host.poll() is None and time.monotonic() < deadline:
            run_cycle(postgres_app, CREATION, "deliverable")
            bouncer.complete_now()
            run_cycle(postgres_app, STATUS, "deliverable")
            time.sleep(0.1)
    finally:
        out, err = host.communicate(timeout=30)
    assert host.returncode == 0, err
    answer = json.loads(out)
    assert answer["status"] == "completed" and answer["failure_reason"] is None
    results = answer["results"]
    assert [(r["position"], r["email"]) for r in results] == list(enumerate(ADDRESSES, start=1))
    assert results[1]["status"] == "invalid" and results[1]["reason"]
    # Jane's two spellings are one mailbox: sent once, one verdict for both rows.
    assert bouncer.sent_addresses() == ["jane.doe@gmail.com", "bob@example.com"]
    assert results[0]["status"] == results[3]["status"] == verdict_for("jane.doe@gmail.com")["status"]
    assert results[2]["status"] == verdict_for("bob@example.com")["status"]
