"""Invariant 10: a large submit is written in committed slices, invisible to the queue until its
last one, so the cycles running meanwhile never wait on it for long, send nothing of it, and
a submit killed mid-load leaves nothing visible and is removed by a later cycle."""
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import submit

from bouncer.cycles.runner import run_cycle
from bouncer.doors.admission import DEAD_LOADER_AFTER
from bouncer.names import CREATION
from bouncer.store.database import database, utcnow
from bouncer.store.models import UserBatch, UserBatchEmail

ROOT = Path(__file__).resolve().parent.parent
LINES = 150000    # thirty slices


def write_file(path, lines, prefix="big"):
    path.write_text("".join("%s%d@example-%d.com\n" % (prefix, i, i % 50) for i in range(lines)))
    return path


def start_submit(database_url, path, user="loader"):
    env = dict(os.environ, DATABASE_URL=database_url, LOG_LEVEL="WARNING")
    return subprocess.Popen([sys.executable, "-m", "bouncer", "submit", str(path), "--user", user,
                             "--check-type", "deliverable", "--json"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def loading_batch():
    return UserBatch.get_or_none(UserBatch.user_id == "loader")


def rows_written(batch):
    return UserBatchEmail.select().where(UserBatchEmail.batch == batch.id).count()


def wait_until(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for %s" % what
        time.sleep(0.01)


def test_cycles_run_while_a_large_submit_loads_and_send_nothing_of_it(app, bouncer, database_url, tmp_path):
    """The loader commits slice by slice, so cycles run to their end while it loads (several of
    them, each with the database's normal lock wait) and send nothing of the loading batch. How
    long a cycle waits on a loader's slice is a measure, not a test: the bench's large-intake
    rows give the longest database call of the cycles run meanwhile (0.2-0.4 s)."""
    earlier = ["early%d@example.com" % i for i in range(5)]
    submit("early", earlier)
    submitter = start_submit(database_url, write_file(tmp_path / "big.txt", LINES))
    cycles, seen_loading = [], False
    try:
        while submitter.poll() is None:
            started = time.monotonic()
            report = run_cycle(app, CREATION, "deliverable")
            cycles.append(time.monotonic() - started)
            batch = loading_batch()
            if batch is not None and UserBatch.get_by_id(batch.id).status == "loading":
                seen_loading = seen_loading or rows_written(batch) > 0
                assert not any(a.startswith("big") for a in bouncer.sent_addresses()), report.summary()
            bouncer.complete_now()
    finally:
        out, err = submitter.communicate(timeout=120)
    assert submitter.returncode == 0, err
    assert seen_loading, "no cycle ran while the submit was loading"
    assert len(cycles) >= 3
    print("creation cycles during the load: %d, longest %.3f s" % (len(cycles), max(cycles)))
    # Visible now, and in line after what was submitted before it.
    for _ in range(3):
        run_cycle(app, CREATION, "deliverable")
    sent = bouncer.sent_addresses()
    assert set(earlier) <= set(sent[:5 + 30]) and any(a.startswith("big") for a in sent)


def test_submit_killed_mid_load_leaves_nothing_visible_and_is_removed(app, bouncer, database_url, tmp_path):
    before = UserBatchEmail.select().count()
    submitter = start_submit(database_url, write_file(tmp_path / "big.txt", LINES))
    try:
        wait_until(lambda: loading_batch() is not None and rows_written(loading_batch()) >= 5000,
                   "the first slices")
        submitter.send_signal(signal.SIGKILL)
    finally:
        submitter.wait(timeout=30)
    assert submitter.returncode == -signal.SIGKILL
    batch = loading_batch()
    assert UserBatch.get_by_id(batch.id).status == "loading"
    written = rows_written(batch)
    assert 0 < written < LINES
    run_cycle(app, CREATION, "deliverable")
    assert bouncer.count("create") == 0
    assert database.execute_sql("SELECT count(*) FROM user_batch_results r JOIN user_batches b ON b.id ="
                                " r.batch_id WHERE b.status != 'loading'").fetchone()[0] == 0
    # Still within the heartbeat: a slow loader is left alone...
    run_cycle(app, CREATION, "deliverable", now=utcnow() + DEAD_LOADER_AFTER / 2)
    assert rows_written(batch) == written
    # ...a silent one is taken for dead, and what it wrote is removed.
    later = utcnow() + DEAD_LOADER_AFTER + datetime.timedelta(seconds=5)
    report = run_cycle(app, CREATION, "deliverable", now=later)
    assert report.admission.removed == [batch.id]
    assert UserBatch.get_or_none(UserBatch.id == batch.id) is None
    assert UserBatchEmail.select().count() == before


@pytest.mark.parametrize("failure", ["bad line", "no valid address"])
def test_submit_that_fails_mid_load_removes_its_own_slices(db, tmp_path, database_url, failure):
    path = tmp_path / "leads.txt"
    if failure == "bad line":
        path.write_bytes(b"".join(b"u%d@example.com\n" % i for i in range(12000)) + b"\xff\xfe\n")
    else:
        path.write_text("not an address\n" * 12000)
    done = subprocess.run([sys.executable, "-m", "bouncer", "submit", str(path), "--user", "alice",
                           "--check-type", "deliverable"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, DATABASE_URL=database_url), timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert UserBatch.select().count() == 0 and UserBatchEmail.select().count() == 0
