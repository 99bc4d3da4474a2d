"""The soak run (scripts/soak.py, support/soak/) and the whole-run checks it relies on.

The fast tests show each check catches what it is for, on both backends; the slow one runs
`python -m scripts.soak --duration 60` on each backend, both at once, as CI does, and wants
every invariant held.

Each soak gets its own throwaway redis-server on a free loopback port, so it can flush its
database without touching any test session's. On PostgreSQL, the soak creates a fresh
database named after the one given (`bouncer_soak_<pid>_<random>`) and drops it at the end;
the test checks that nothing is left behind.
"""
import contextlib
import datetime
import os
import re
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from conftest import addresses, submit, with_settings

from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.store.database import utcnow
from bouncer.store.models import BouncerBatch, QueuedEmail
from support import invariants
from support.processes import ROOT
from support.servers import RedisServer, Unavailable, postgres_admin

SOAK_SECONDS = 60
# 60 s of run, at most 180 s of drain, starting and stopping the processes: well inside. Past
# it, each soak gets a minute to stop (the test's own timeout leaves room for both).
SOAK_TIMEOUT = 400
INVARIANT_LINE = re.compile(r"^invariant (\d) \(.*\)\s+(held|VIOLATED \(\d+\))$", re.M)


# -- the checks, on purpose-built histories --

def stored_batches():
    return [b.id for b in BouncerBatch.select().where(BouncerBatch.bouncer_id.is_null(False))
            .order_by(BouncerBatch.id)]


def all_visible_now(*batch_ids):
    now = utcnow()
    return dict.fromkeys(batch_ids, now)


def fifo_violations(visible_at):
    return [message for ledger_id in stored_batches()
            for message in invariants.fifo_violations_of_sent_batch(ledger_id, visible_at)]


@contextlib.contextmanager
def out_of_line(batch_id):
    """The rows of one user batch taken out of the line meanwhile, then put back as they were."""
    waiting = list(QueuedEmail.select().where(QueuedEmail.batch_id == batch_id).dicts())
    QueuedEmail.delete().where(QueuedEmail.batch_id == batch_id).execute()
    yield
    QueuedEmail.insert_many(waiting).execute()


def test_fifo_check_flags_a_batch_that_passed_over_an_older_email(app, bouncer):
    alice, bob = submit("alice", addresses("a", 3)), submit("bob", addresses("b", 3))
    visible_at = all_visible_now(alice, bob)
    # A planner that skips alice's rows: out of the line for the walk, then back in it.
    with out_of_line(alice):
        run_cycle(app, CREATION, "deliverable")

    problems = fifo_violations(visible_at)

    assert len(problems) == 3 and all("user batch %s" % alice in p for p in problems)


def test_fifo_check_excuses_emails_whose_call_failed_in_the_same_cycle(app, bouncer):
    batch = submit("alice", addresses("a", 30))
    visible_at = all_visible_now(batch)
    bouncer.fail_next(500, kind="create")
    run_cycle(app, CREATION, "deliverable")   # the 10 oldest wait; the next 20 are sent
    first, second = stored_batches()
    assert invariants.fifo_violations_of_sent_batch(first, visible_at) == []
    assert invariants.fifo_violations_of_sent_batch(second, visible_at) == []
    # The same history, with no room for the failed call of the cycle: the batch reserved after
    # the refusal flags the 10 (the one reserved while the call was on the wire found them held).
    no_room = datetime.timedelta(0)
    assert invariants.fifo_violations_of_sent_batch(first, visible_at, same_cycle=no_room) == []
    assert len(invariants.fifo_violations_of_sent_batch(second, visible_at, same_cycle=no_room)) == 10
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    run_cycle(app, CREATION, "deliverable")   # now the 10 go first

    assert len(stored_batches()) == 3
    assert fifo_violations(visible_at) == []


def test_fifo_check_ignores_emails_not_yet_visible_when_the_batch_was_planned(app, bouncer):
    alice, bob = submit("alice", addresses("a", 3)), submit("bob", addresses("b", 3))
    with out_of_line(alice):
        run_cycle(app, CREATION, "deliverable")
    # As if alice's transaction had committed only after the batch was planned.
    later = utcnow() + datetime.timedelta(seconds=5)

    assert fifo_violations({alice: later, bob: later - datetime.timedelta(seconds=60)}) == []


def test_ledger_history_gives_the_most_batches_ever_in_flight(app, bouncer):
    submit("alice", addresses("a", 50))
    run_cycle(app, CREATION, "deliverable")        # three batches of ten (max_outstanding 3)
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    run_cycle(with_settings(app, max_outstanding=2), CREATION, "deliverable")

    assert invariants.max_in_flight_from_ledger("deliverable") == 3
    assert invariants.max_in_flight_from_ledger("catchall") == 0


def test_request_budget_counts_every_rolling_window():
    times = [100.0, 101.0, 102.0, 159.5, 161.0, 300.0]
    assert invariants.requests_over_budget(times, 3) == [159.5]
    assert invariants.requests_over_budget(times, 3, window=59.0) == []
    assert invariants.max_requests_in_window(times) == (4, 100.0)


# -- the soak itself, as CI runs it --

@pytest.fixture
def private_redis(tmp_path):
    """Starts redis-servers of the soak's own (scripts/test installs redis-server when needed),
    one per call with a name, and returns each one's URL; all stop with the test."""
    servers = []

    def start(name):
        try:
            server = RedisServer(tmp_path / ("redis-%s" % name))
        except Unavailable as exc:
            pytest.fail(str(exc))
        servers.append(server)
        return server.start().url

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


class SoakRun:
    """The soak as a subprocess, from the repository root. Each run draws its own seed (printed
    first), so CI covers more histories over time and a failure can be replayed with --seed."""

    def __init__(self, name, run_dir, *options):
        self.name = name
        # Workers are stopped every 15 s, by turns with SIGTERM (a deploy) and SIGKILL.
        command = [sys.executable, "-m", "scripts.soak", "--duration", str(SOAK_SECONDS), "--kill-every", "15",
                   "--run-dir", str(run_dir), *options]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)

    def finish(self, deadline):
        """(exit code, output), waiting until the monotonic `deadline`; past it the soak is
        stopped and the test fails."""
        try:
            output, _ = self.process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            output = self.stop()
            pytest.fail("the soak on %s did not finish in %d s:\n%s" % (self.name, SOAK_TIMEOUT, output[-6000:]))
        return self.process.returncode, output

    def stop(self):
        """SIGTERM first, so its finally block stops the processes it started (SIGKILL after a
        minute); returns what it printed. Nothing to do once it ended."""
        if self.process.returncode is not None:
            return ""
        self.process.send_signal(signal.SIGTERM)
        try:
            output, _ = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
        return output


def assert_soak_passed(soak, code, output):
    verdicts = dict(INVARIANT_LINE.findall(output))
    said = "the soak on %s:\n%s" % (soak.name, output[-6000:])
    assert sorted(verdicts) == ["1", "2", "3", "4", "5"], said
    assert set(verdicts.values()) == {"held"}, said
    assert re.search(r"^secrets in logs and /health\s+none$", output, re.M), said
    assert re.search(r"^workers stopped and restarted\s+.*SIGTERM", output, re.M), said
    assert re.search(r"^orphans \(created at the sandbox, not followed\)\s+\d+ of \d+ batches; "
                     r"\d+ extra credits", output, re.M), said
    assert code == 0, said


@pytest.mark.slow
@pytest.mark.timeout(SOAK_TIMEOUT + 150)
def test_soak_on_sqlite_and_on_postgres_side_by_side(tmp_path, private_redis):
    # The two soaks run at once, each on its own redis-server and database: a soak mostly waits
    # (on its budget of requests, then the drain), so one test worker holds both while the
    # others run the rest of the suite.
    base = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5433/bouncer_test")
    prefix = "bouncer_soak_%d" % os.getpid()
    url = urlunsplit(urlsplit(base)._replace(path="/" + prefix))
    try:
        assert soak_databases(url, prefix) == []
    except psycopg2.OperationalError as exc:
        pytest.fail("PostgreSQL is not reachable at %s (run the tests with `bash scripts/test`): %s"
                    % (url, exc))
    deadline = time.monotonic() + SOAK_TIMEOUT
    soaks = [SoakRun("SQLite", tmp_path / "sqlite", "--redis-url", private_redis("sqlite"))]
    try:
        soaks.append(SoakRun("PostgreSQL", tmp_path / "postgres", "--redis-url", private_redis("postgres"),
                             "--database-url", url))
        finished = [(soak, *soak.finish(deadline)) for soak in soaks]
    finally:
        for soak in soaks:
            soak.stop()

    for soak, code, output in finished:
        assert_soak_passed(soak, code, output)
    assert soak_databases(url, prefix) == [], "the soak left its database behind"


def soak_databases(url, prefix):
    # `_` is a LIKE wildcard: escaped, only this test's databases match.
    pattern = prefix.replace("_", "\\_") + "\\_%"
    rows = postgres_admin(url, "SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,))
    return [name for (name,) in rows]
