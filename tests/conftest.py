"""Fixtures: a fresh database (SQLite and PostgreSQL), a scratch Redis database, Bouncer (the
sandbox simulator, behind `responses` or over real HTTP), and the App the cycles run with.

The servers are real: `scripts/test` starts a throwaway redis-server and PostgreSQL cluster and
exports TEST_REDIS_URL and TEST_POSTGRES_URL.
"""
import logging
import multiprocessing
import os
import shutil
import socket
import threading
import time
from urllib.parse import urlsplit

import psycopg2
import pytest
import redis as redis_lib

from bouncer.app import App, set_current_app
from bouncer.client import BouncerClient
from bouncer.config import Settings
from bouncer.doors.loading import create_user_batch
from bouncer.news import targets
from bouncer.sandbox import Sandbox
from bouncer.states import SENT, RowState
from bouncer.store.database import connection, database, open_database
from bouncer.store.migrations import create_schema
from bouncer.store.models import QueuedEmail, RidingRows, UserBatchEmail
from bouncer.store.schema import empty_tables
from support import invariants
from support.servers import RedisClaims

# Each pytest session gets its own Redis database number and PostgreSQL database, so that
# several test runs on one machine never flush or truncate each other's data.
SESSION = os.getpid()
REDIS_SERVER = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6390/0").rsplit("/", 1)[0]
CLAIM_SECONDS = 3600


def claim_redis_database():
    """A Redis database number no other live test session or soak uses (support.servers)."""
    try:
        with RedisClaims(REDIS_SERVER, connect_timeout=2) as claims:
            number = claims.claim_any(str(SESSION), CLAIM_SECONDS)
    except redis_lib.ConnectionError:
        number = None  # reported by the redis_conn fixture, with how to start the server
    return number if number is not None else 1 + SESSION % 15


# Processes a test spawns import this module too: only a pytest process that runs tests claims a
# database, when a test first asks for it (the controller of parallel workers runs none).
IN_TEST_SESSION = multiprocessing.parent_process() is None
_claimed = []


def redis_db():
    if not _claimed:
        _claimed.append(claim_redis_database() if IN_TEST_SESSION else 1 + SESSION % 15)
    return _claimed[0]


def redis_url():
    return "%s/%d" % (REDIS_SERVER, redis_db())


def __getattr__(name):
    """REDIS_DB and REDIS_URL, claimed on first use (`from conftest import REDIS_URL` asks here)."""
    if name == "REDIS_DB":
        return redis_db()
    if name == "REDIS_URL":
        return redis_url()
    raise AttributeError(name)


def pytest_unconfigure(config):
    if not (IN_TEST_SESSION and _claimed):
        return
    try:
        with RedisClaims(REDIS_SERVER, connect_timeout=2) as claims:
            claims.release(_claimed[0], str(SESSION))
    except redis_lib.ConnectionError:
        pass


POSTGRES_URL = "%s_%d" % (os.environ.get("TEST_POSTGRES_URL",
                                         "postgresql://postgres@127.0.0.1:5433/bouncer_test"), SESSION)
API_KEY = "sk-test-9f8e7d6c5b4a"
BOUNCER_URL = "https://bouncer.test"
# Longer than any test: a batch completes only when the test says so (complete_now).
NEVER = 3600


def postgres_admin(url, statement):
    parts = urlsplit(url)
    admin = psycopg2.connect(host=parts.hostname, port=parts.port or 5432,
                             user=parts.username or "postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(statement % {"name": parts.path.lstrip("/")})
    admin.close()


# Names a callback_url may use in tests, and what they resolve to: no test asks DNS (see `dns`).
PUBLIC_ADDRESS = "93.184.216.34"
NAMES = {"host.example.com": [PUBLIC_ADDRESS], "hooks.example.com": [PUBLIC_ADDRESS],
         "localhost": ["127.0.0.1", "::1"]}


@pytest.fixture(autouse=True)
def dns(monkeypatch):
    """The resolver of callback URLs (targets.resolve, its one seam), without DNS: an address
    literal in any spelling (`2130706433`, `127.1`, `::1`) is read by the system's own
    getaddrinfo, which asks no server for one; a name is looked up in the returned dict (a test
    may change it); any other name does not resolve."""
    names = {name: list(addresses) for name, addresses in NAMES.items()}

    def resolve(host, port):
        if host in names:
            return list(names[host])
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        return [info[4][0] for info in infos]

    monkeypatch.setattr(targets, "resolve", resolve)
    return names


@pytest.fixture(autouse=True)
def restore_logging():
    """The CLI points the root logger at the runner's stderr; put the test's handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def postgres_url():
    try:
        postgres_admin(POSTGRES_URL, 'DROP DATABASE IF EXISTS "%(name)s"')
        postgres_admin(POSTGRES_URL, 'CREATE DATABASE "%(name)s"')
    except psycopg2.OperationalError as exc:
        pytest.fail("PostgreSQL is not reachable at %s (run the tests with `bash scripts/test`): %s"
                    % (POSTGRES_URL, exc))
    open_database(POSTGRES_URL)
    create_schema()
    yield POSTGRES_URL
    if not database.is_closed():
        database.close()
    postgres_admin(POSTGRES_URL, 'DROP DATABASE IF EXISTS "%(name)s" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory):
    """A SQLite file with the schema and no rows, made once: each test starts from a copy."""
    path = tmp_path_factory.mktemp("template") / "bouncer.db"
    open_database("sqlite:///%s" % path)
    with database.connection_context():
        create_schema()
        database.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")   # the whole schema in the one file
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """A database with the schema and no rows, once per backend."""
    if request.param == "sqlite":
        path = tmp_path / "bouncer.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        url = "sqlite:///%s" % path
        open_database(url)
    else:
        url = request.getfixturevalue("postgres_url")
        open_database(url)
        with database.connection_context():
            empty_tables()
    return url


@pytest.fixture
def db(database_url):
    """The open database, one connection for the test."""
    database.connect(reuse_if_open=True)
    yield database
    database.close()


@pytest.fixture
def redis_conn():
    conn = redis_lib.Redis.from_url(redis_url())
    try:
        conn.flushdb()
    except redis_lib.ConnectionError as exc:
        pytest.fail("Redis is not reachable at %s (run the tests with `bash scripts/test`): %s"
                    % (redis_url(), exc))
    yield conn
    conn.flushdb()
    conn.close()


def make_settings(database_url, **overrides):
    values = {"database_url": database_url, "redis_url": redis_url(), "api_key": API_KEY,
              "api_url": BOUNCER_URL, "batch_size": 10, "max_outstanding": 3, "bouncer_timeout": 5}
    values.update(overrides)
    return Settings(**values).validate()


@pytest.fixture
def settings(database_url):
    return make_settings(database_url)


@pytest.fixture
def bouncer():
    """Bouncer at BOUNCER_URL: the sandbox simulator behind `responses` (the HTTP seam), taking
    only API_KEY; batches complete only when a test says so."""
    simulator = Sandbox(processing_time=NEVER, api_key=API_KEY)
    with simulator.behind_responses(BOUNCER_URL):
        yield simulator


@pytest.fixture
def app(settings, redis_conn, bouncer, db):
    client = BouncerClient(settings.api_url, settings.api_key, timeout=settings.bouncer_timeout,
                           catchall_path=settings.catchall_path)
    application = App(settings, redis=redis_conn, client=client)
    set_current_app(application)
    yield application
    set_current_app(None)


@pytest.fixture
def sandbox():
    """The local Bouncer over real HTTP; batches complete only when a test says so."""
    server = Sandbox(port=0, processing_time=NEVER).start()
    yield server
    server.stop()


@pytest.fixture
def sandbox_app(database_url, redis_conn, sandbox, db):
    """An App talking to the sandbox over real HTTP (no `responses` in the way)."""
    application = App(make_settings(database_url, api_url=sandbox.url), redis=redis_conn)
    set_current_app(application)
    yield application
    set_current_app(None)


def with_settings(app, **overrides):
    """The same App with some settings changed."""
    values = {f: getattr(app.settings, f) for f in app.settings.__dataclass_fields__}
    values.update(overrides)
    return App(Settings(**values).validate(), redis=app.redis, client=app.client)


def current_app_with(app, **overrides):
    """The same App with some settings changed, made the process's current App (the one the
    CLI and the jobs take) until the generator ends; then `app` again. For a fixture."""
    changed = with_settings(app, **overrides)
    set_current_app(changed)
    yield changed
    set_current_app(app)


# -- small helpers for tests --

def assert_clean_failure(result, *fragments):
    """Exit code 1, one `Error:` line on stderr naming what is wrong, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def submit(user, emails, check_type="deliverable"):
    return create_user_batch(user, check_type, emails).batch_id


def addresses(prefix, n, domain="example.com"):
    return ["%s%d@%s" % (prefix, i, domain) for i in range(n)]


def in_another_thread(work):
    """Start `work` on a connection of its own in another thread, and give it half a second: it
    should wait for this thread's transaction. Returns (the thread, whether it was still waiting,
    a list that gets what `work` returned, or the exception it raised)."""
    outcome = []

    def run():
        try:
            with connection():
                outcome.append(work())
        except Exception as exc:       # the test reads it
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(0.5)
    return thread, thread.is_alive(), outcome


def row_states(batch_id=None):
    """{row id: state} of every row (of one user batch), as the queue sees it: a queued row
    riding on a Bouncer batch is `sent`. Checks on the way that every queued row is either in
    line or riding, never both, and that no other row is in either."""
    Row = UserBatchEmail
    rows, waiting = Row.select(Row.id, Row.status), QueuedEmail.select(QueuedEmail.row)
    if batch_id is not None:
        rows, waiting = rows.where(Row.batch == batch_id), waiting.where(QueuedEmail.batch_id == batch_id)
    waiting = {r for (r,) in waiting.tuples()}
    riding = [r for _, r in invariants.riding(None if batch_id is None else RidingRows.batch_id == batch_id)]
    assert len(riding) == len(set(riding)), "a row rides on two Bouncer batches"
    riding = set(riding)
    states = {}
    for row_id, status in rows.tuples():
        if status == RowState.QUEUED:
            assert (row_id in waiting) != (row_id in riding), "queued row %s is %s" % (
                row_id, "in line and riding" if row_id in waiting else "neither in line nor riding")
            status = SENT if row_id in riding else RowState.QUEUED
        else:
            assert row_id not in waiting and row_id not in riding, \
                "%s row %s is still in line or riding" % (status, row_id)
        states[row_id] = status
    return states


def statuses(batch_id=None):
    """{row state: count} of one user batch (of every row), as the queue sees it."""
    counts = {}
    for status in row_states(batch_id).values():
        counts[status] = counts.get(status, 0) + 1
    return counts


def rode_on():
    """{row id: ledger id} of every row riding on a Bouncer batch, or brought to an end by one."""
    ended = UserBatchEmail.select(UserBatchEmail.id, UserBatchEmail.bouncer_batch).where(
        UserBatchEmail.bouncer_batch.is_null(False) & UserBatchEmail.status.in_(("done", "failed")))
    found = dict(ended.tuples())
    found.update((row, ledger) for ledger, row in invariants.riding())
    return found


@pytest.fixture
def no_autovacuum(db):
    """On PostgreSQL, no autovacuum or autoanalyze of any table while the test runs (taking the
    setting waits for one under way): a test that counts pages, or rewrites in place, would see
    theirs. A vacuum reads an index's pages too, and an ANALYZE holds a snapshot, which keeps the
    old versions of every table's rows from being pruned from their pages meanwhile."""
    tables = []
    if on_postgres():
        tables = [t for (t,) in db.execute_sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    for table in tables:
        db.execute_sql('ALTER TABLE "%s" SET (autovacuum_enabled = false)' % table)
    yield
    for table in tables:
        db.execute_sql('ALTER TABLE "%s" RESET (autovacuum_enabled)' % table)


def on_postgres():
    """Whether the test's database is PostgreSQL."""
    from bouncer.store.database import dialect
    return dialect().name == "postgres"


def postgres_statistics(query):
    """One row of PostgreSQL's cumulative statistics, with this backend's own counts in them:
    they are flushed only once it is idle, and a transaction reads a snapshot of them."""
    from bouncer.store.database import database
    database.execute_sql("SELECT pg_stat_force_next_flush()")
    database.execute_sql("SELECT 1")
    database.execute_sql("SELECT pg_stat_clear_snapshot()")
    return database.execute_sql(query).fetchone()


def wait_for_older_transactions(timeout=60):
    """On PostgreSQL, until every other transaction of the server that began before now has
    ended (up to `timeout` seconds), including those of other tests' databases: a transaction
    open anywhere keeps every database's row versions that were alive when it began from being
    pruned from their pages (a parallel test holding a host's transaction open, say)."""
    now = database.execute_sql("SELECT clock_timestamp()").fetchone()[0]
    deadline = time.monotonic() + timeout
    while database.execute_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND xact_start < %s"
            " AND backend_type <> 'autovacuum worker'", (now,)).fetchone()[0]:
        assert time.monotonic() < deadline, "a transaction of another test stayed open %d s" % timeout
        time.sleep(0.05)


def pytest_collection_modifyitems(config, items):
    """With parallel workers (pytest-xdist), the longest tests first, the soak runs (the longest
    timeout) first of all: the first tests are handed out one by one in turn, so the long ones
    start at once on different workers rather than queue behind each other at the end."""
    # The workers collect and run the tests (xdist clears their `numprocesses`); each sorts
    # alike, as xdist wants one order from all.
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: (item.get_closest_marker("slow") is None, -longest_allowed(item)))


def longest_allowed(item):
    marker = item.get_closest_marker("timeout")
    return marker.args[0] if marker is not None and marker.args else 0
