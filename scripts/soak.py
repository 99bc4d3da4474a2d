"""A soak run of the whole system on loopback, bounded in time.

    bash scripts/soak [--duration 600] [--database-url URL] [--redis-url URL] [--workers 4]
                      [--schedulers 2] [--fault-rate 0.05] [--seed N] [--run-dir DIR]

Starts real processes: the Bouncer sandbox (answering some requests with 500/503, 429 or too
late), `init-db`, the workers, the schedulers and the web process, with compressed intervals,
a request budget small enough to bind, and the completion callback on. During the first 70% of
the run it submits user batches of both check types (cross-user repeats, Gmail spellings,
unusual but valid addresses, a few invalid rows); about every second it checks design.md's
invariants 2, 3, 4 and 5. Then it waits (at most 3 minutes) for the queue to drain, stops
every process with SIGTERM, checks invariant 1 and that neither the API key nor the callback
secret reached a log file or a /health answer, and prints one table.

Exit code 0 only when every invariant held, no secret leaked and every process exited cleanly.
A violation never stops the run: it is recorded with its time (violations.log) and reported.

How each invariant is judged (the checks live in tests/invariants.py):
1. After the drain: every row has a verdict, or is failed or invalid with a reason, and every
   row submitted is stored and counted.
2. Each sample: no address in two in-flight batches of a check type, none twice in a batch.
3. Each sample, and at the end over the ledger's whole history (overlaps of reserved_at to
   finished_at), which also catches a peak between two samples.
4. From the sandbox's request log, every request kind, faulted ones included: no request
   arrives with RATE_LIMIT_BUFFER others in the 60 s before it (strictly: the limiter counts a
   62 s window, so the milliseconds between taking a slot and arriving are covered;
   --transit-tolerance shortens the judged window if ever needed). And, strictly, the service's
   own record of slots (rate_limit_tracker).
5. Each Bouncer batch once its id is stored: no row older than the youngest address it sent
   was pending and visible when it was reserved, yet left for a later batch, unless a failed
   call of the same cycle or an in-flight batch holding its address explains it. Visibility
   comes from the submitter (the time its commit returned), so a user batch still being
   written is never judged. This needs neither cycle boundaries nor a sampling rate: the ledger
   and the rows say what each reservation passed over. The simpler "nothing stays queued while
   a user batch N s younger is all sent" would flag the design's own exception: a call that
   fails leaves its emails for the next cycle, and with the budget used up that can be long.
"""
import argparse
import collections
import contextlib
import datetime
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import psycopg2  # noqa: E402
import redis as redis_lib  # noqa: E402
from peewee import fn  # noqa: E402
from rq import Worker  # noqa: E402

import invariants  # noqa: E402
from bouncer.db import open_database, utcnow  # noqa: E402
from bouncer.models import (  # noqa: E402
    IN_FLIGHT_STATES, PENDING_STATES, QUEUED, BouncerBatch, RateLimitTracker, UserBatch,
    UserBatchEmail, database,
)
from bouncer.sandbox import parse_route, request_kind  # noqa: E402
from bouncer.intake import create_user_batch  # noqa: E402

CHECK_TYPES = ("deliverable", "catchall")

# The service under test, compressed so a minute exercises every path: batches of 100, four in
# flight per check type, a budget of 50 requests a minute that binds (each batch costs a create,
# a few status checks and a download), calls that time out after 3 s, and reservations
# abandoned after 10 s.
MAX_OUTSTANDING = 4
RATE_LIMIT_BUFFER = 50
SERVICE_SETTINGS = {
    "BATCH_CREATE_INTERVAL": "1",
    "STATUS_CHECK_INTERVAL": "2",
    "BOUNCER_BATCH_SIZE": "100",
    "BOUNCER_MAX_OUTSTANDING": str(MAX_OUTSTANDING),
    "RATE_LIMIT_PER_MINUTE": "60",
    "RATE_LIMIT_BUFFER": str(RATE_LIMIT_BUFFER),
    "BOUNCER_TIMEOUT": "3",
    "RESERVATION_TIMEOUT": "10",
    "LOG_LEVEL": "INFO",
}
# Settings left at their defaults whatever the caller's environment says.
DEFAULTED_SETTINGS = ("BATCH_TIMEOUT", "RESULT_CACHE_DAYS", "BOUNCER_CATCHALL_PATH")
PROCESSING_SECONDS = 3
# Longer than BOUNCER_TIMEOUT: a slow answer is a timeout for the client, and the sandbox still
# creates the batch afterwards, as Bouncer would (a batch nobody follows).
SLOW_SECONDS = 4

SUBMIT_SHARE = 0.7          # of the duration, the part during which user batches are submitted
MAX_BACKLOG = 1200          # queued rows above which the submitter waits, so the drain is bounded
CLI_SHARE = 0.2             # of submissions made through `python -m bouncer submit`
USERS = 12
CHECK_EVERY = 1.0
HEALTH_EVERY = 5.0
DRAIN_LIMIT = 180
STARTUP_LIMIT = 30
COMMAND_LIMIT = 60
HTTP_TIMEOUT = 10
# A worker's horse gets 20 s after SIGTERM to finish its cycle (bouncer.worker.SHUTDOWN_GRACE).
STOP_GRACE = 25
KILL_GRACE = 10
KILL_POLL = 0.05            # how often a due kill looks for a creation cycle mid-reservation
# Longer than any creation cycle here (four calls of at most 3 s each, plus database waits):
# within it, a rejected attempt excuses an older row waiting (design.md, invariant 5).
FIFO_SAME_CYCLE = datetime.timedelta(seconds=60)
# The service counts a request when it takes its slot; the sandbox when the request arrives,
# some milliseconds later (more for a create, whose slot precedes the reservation transaction).
# A limiter can only count what it sends, so at the sandbox invariant 4 is judged over windows
# this much shorter than 60 s; the strict 60 s figures are reported beside it.
TRANSIT_TOLERANCE = 0.0
KEPT_EXAMPLES = 1000        # violation messages kept per invariant; beyond, only counted
KEPT_ERRORS = 5             # errors kept word for word (submissions, checks); beyond, only counted

INVARIANTS = {
    1: "no email lost",
    2: "no address twice in flight",
    3: "in flight <= max per type",
    4: "requests in 60 s <= buffer",
    5: "FIFO",
}
SERVICE_NAMES = ("worker", "scheduler", "web")   # whose exit code must be 0


# ---------------------------------------------------------------------------------------------
# Options and output


def parse_options(argv=None):
    parser = argparse.ArgumentParser(
        description="A bounded soak run of the whole system on loopback (see the module doc).")
    parser.add_argument("--duration", type=float, default=600,
                        help="seconds of submitting and checking, before the drain (default 600)")
    parser.add_argument("--database-url",
                        help="default: SQLite in the run directory; a postgresql:// URL names "
                             "a server and a name prefix: a fresh database is created for the "
                             "run and dropped after it")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6390/14",
                        help="flushed at start (default redis://127.0.0.1:6390/14)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--schedulers", type=int, default=2)
    parser.add_argument("--fault-rate", type=float, default=0.05,
                        help="share of Bouncer requests answered 500/503, 429 or too late")
    parser.add_argument("--seed", type=int, help="replays a run's submissions and faults")
    parser.add_argument("--transit-tolerance", type=float, default=TRANSIT_TOLERANCE,
                        help="seconds between the service counting a request and the sandbox "
                             "receiving it that invariant 4 tolerates (default %(default)s; "
                             "0 judges the sandbox's arrivals strictly)")
    parser.add_argument("--kill-every", type=float, default=0,
                        help="every this many seconds of the run, SIGKILL one worker with the "
                             "cycle it runs, and start it again (invariant 6: a reservation of "
                             "the dead cycle is abandoned after RESERVATION_TIMEOUT; its lock "
                             "frees itself within 60 s); 0, the default: never")
    parser.add_argument("--run-dir", help="where logs go (default: a new temporary directory)")
    parser.add_argument("--keep-database", action="store_true",
                        help="keep the PostgreSQL database of the run for inspection")
    options = parser.parse_args(argv)
    if options.seed is None:
        options.seed = secrets.randbelow(1_000_000)
    if not 0 <= options.fault_rate <= 1:
        parser.error("--fault-rate must be between 0 and 1")
    if options.duration <= 0 or options.workers < 1 or options.schedulers < 1:
        parser.error("--duration, --workers and --schedulers must be positive")
    if options.kill_every < 0:
        parser.error("--kill-every must be 0 (never) or a number of seconds")
    return options


class Output:
    """Everything the soak says goes to stdout and to soak.log, which is checked for secrets
    like every other log."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()

    def say(self, text=""):
        with self.lock:
            print(text, flush=True)
            with open(self.path, "a", encoding="utf-8") as log:
                log.write(text + "\n")


class Errors:
    """Errors that do not stop the run (a failed submission, a check the busy database did not
    answer): counted, the first few kept word for word, so a long run stays small."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0
        self.first = []

    def add(self, where, exc):
        with self.lock:
            self.count += 1
            if len(self.first) < KEPT_ERRORS:
                self.first.append("%s %s: %s: %s" % (iso(time.time()), where, type(exc).__name__, exc))

    def summary(self):
        with self.lock:
            return "%d, first: %s" % (self.count, self.first[0]) if self.count else None


def iso(epoch):
    return datetime.datetime.fromtimestamp(epoch).strftime("%H:%M:%S.%f")[:-3]


class Violations:
    """Every violation seen, with when it was first seen; the same one seen again by a later
    sample is counted once. Thread-safe: the checker and the final checks both record."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.seen = {number: {} for number in INVARIANTS}

    def record(self, number, message, when=None):
        when = when or time.time()
        with self.lock:
            known = self.seen[number]
            if message in known:
                return
            if len(known) >= KEPT_EXAMPLES:
                known.setdefault("(more, not kept)", when)
                return
            known[message] = when
            with open(self.path, "a", encoding="utf-8") as log:
                log.write("%s invariant %d: %s\n" % (iso(when), number, message))

    def count(self, number):
        return len(self.seen[number])

    def examples(self, number, limit=5):
        items = sorted(self.seen[number].items(), key=lambda item: item[1])
        return [(when, message) for message, when in items[:limit]]


# ---------------------------------------------------------------------------------------------
# Databases


@contextlib.contextmanager
def fresh_database(options, run_dir):
    """The run's database URL: SQLite in the run directory by default, or a new PostgreSQL
    database named after the given one (never an existing one, so no data is at risk)."""
    url = options.database_url
    if not url:
        yield "sqlite:///%s" % (run_dir / "soak.db")
        return
    if url.startswith("sqlite:///"):
        # Absolute: the services run from the repository root, the soak from anywhere.
        path = os.path.abspath(url[len("sqlite:///"):])
        if os.path.exists(path):
            raise SystemExit("%s exists: a soak run needs a fresh database" % path)
        yield "sqlite:///%s" % path
        return
    if not url.startswith(("postgres://", "postgresql://")):
        raise SystemExit("--database-url must be sqlite:///FILE or postgresql://...")
    parts = urlsplit(url)
    name = "%s_%s" % (parts.path.lstrip("/") or "bouncer_soak", secrets.token_hex(4))
    postgres_admin(parts, 'CREATE DATABASE "%s"' % name)
    try:
        yield urlunsplit(parts._replace(path="/" + name))
    finally:
        if not database.is_closed():
            database.close()
        if not options.keep_database:
            postgres_admin(parts, 'DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)


def postgres_admin(parts, statement):
    admin = psycopg2.connect(host=parts.hostname, port=parts.port or 5432,
                             user=parts.username or "postgres", password=parts.password,
                             dbname="postgres", connect_timeout=10)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(statement)
    finally:
        admin.close()


@contextlib.contextmanager
def claimed_redis(url, seconds):
    """The Redis database of the run, flushed. Test sessions claim their database numbers in
    database 0 (tests/conftest.py); the soak claims its own the same way, so neither flushes
    the other's."""
    connection = redis_lib.Redis.from_url(url, socket_connect_timeout=5)
    number = connection.connection_pool.connection_kwargs.get("db", 0)
    # The URL's own database number wins over a `db=` argument in redis-py: rewrite the path.
    registry = redis_lib.Redis.from_url(urlunsplit(urlsplit(url)._replace(path="/0")),
                                        socket_connect_timeout=5)
    key, owner = "bouncer-tests:db:%d" % number, "soak-%d" % os.getpid()
    owned = False
    try:
        if number and not registry.set(key, owner, nx=True, ex=int(seconds)) \
                and not take_over_stale_claim(registry, key, owner, seconds):
            raise SystemExit("Redis database %d is claimed by %s (a running test session or "
                             "soak); pass --redis-url with another database"
                             % (number, (registry.get(key) or b"?").decode()))
        owned = True
        connection.flushdb()
        yield url
    finally:
        # Only a database this run owns is flushed: a refused claim leaves it as it was.
        with contextlib.suppress(redis_lib.RedisError):
            if owned:
                connection.flushdb()
            if owned and number and registry.get(key) == owner.encode():
                registry.delete(key)
        connection.close()
        registry.close()


def take_over_stale_claim(registry, key, owner, seconds):
    """A claim whose owner process is gone (a test session killed before it could release its
    database, or a child process that claimed one on import) is taken over."""
    holder = (registry.get(key) or b"").decode()
    if not holder or process_alive(holder.rsplit("-", 1)[-1]):
        return False
    # Only if it still names the same dead owner: another claimant may have been quicker.
    with registry.pipeline() as pipe:
        try:
            pipe.watch(key)
            if (pipe.get(key) or b"").decode() != holder:
                return False
            pipe.multi()
            pipe.set(key, owner, ex=int(seconds))
            pipe.execute()
            return True
        except redis_lib.WatchError:
            return False


def process_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ValueError:
        return True      # not a pid we understand: assume a live owner
    except ProcessLookupError:
        return False
    except PermissionError:
        return True      # someone else's live process
    return True


# ---------------------------------------------------------------------------------------------
# Processes


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def die_with_parent():
    """Runs in the child before exec: if the soak itself is killed (-9), its children get
    SIGTERM instead of running on. Linux only; elsewhere the finally block is the only guard."""
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def descendants(pid):
    """Pids of the processes below `pid`, read from /proc (Linux; elsewhere none are found).
    rq's work horse puts itself in a process group of its own, so a group kill misses it."""
    children = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name, in parentheses, may hold spaces: the parent pid follows it.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children[int(fields[1])].append(int(stat.parent.name))
    found, pending = [], [pid]
    while pending:
        below = children.get(pending.pop(), [])
        found += below
        pending += below
    return found


def kill_with_descendants(process):
    """SIGKILL to a process we started, what it forked (a horse running a cycle) first."""
    for pid in descendants(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


class Services:
    """The `python -m bouncer ...` processes of the run, each with its own log file."""

    def __init__(self, run_dir, env):
        self.run_dir = run_dir
        self.env = env
        self.running = {}
        self.exit_codes = {}

    def command(self, *args):
        return [sys.executable, "-m", "bouncer", *args]

    def start(self, name, *args, env=None):
        with open(self.run_dir / ("%s.log" % name), "ab") as log:
            # Its own session: a Ctrl-C meant for the soak reaches the services only through the
            # soak's orderly stop.
            process = subprocess.Popen(self.command(*args), cwd=ROOT, env=env or self.env,
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, preexec_fn=die_with_parent)
        self.running[name] = process
        return process

    def run(self, name, *args):
        with open(self.run_dir / ("%s.log" % name), "ab") as log:
            done = subprocess.run(self.command(*args), cwd=ROOT, env=self.env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=COMMAND_LIMIT)
        if done.returncode != 0:
            raise SystemExit("`%s` failed (exit %d); see %s.log" % (" ".join(args), done.returncode, name))

    def died(self):
        """{name: exit code} of the processes that stopped without being asked."""
        return {name: process.returncode for name, process in self.running.items()
                if name not in self.exit_codes and process.poll() is not None}

    def stop(self, names, grace=STOP_GRACE):
        """SIGTERM to each, then wait (all together, within `grace`); remembers exit codes."""
        for name in names:
            with contextlib.suppress(ProcessLookupError):
                self.running[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name in names:
            try:
                code = self.running[name].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = "still running %ds after SIGTERM" % grace
            self.exit_codes.setdefault(name, code)

    def kill_and_restart(self, name, *args):
        """SIGKILL to a worker and the horse running its cycle, then the same command again
        under the same name, its output appended to the same log."""
        process = self.running[name]
        kill_with_descendants(process)
        process.wait(timeout=KILL_GRACE)
        self.start(name, *args)

    def kill_all(self):
        """The last resort, in a finally block: SIGTERM, then SIGKILL to what is left of each
        process and what it forked."""
        alive = [process for process in self.running.values() if process.poll() is None]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        for process in alive:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_with_descendants(process)
                process.wait(timeout=KILL_GRACE)


def wait_for_port(port, process, name, log):
    deadline = time.monotonic() + STARTUP_LIMIT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("%s exited with code %s at start; see %s" % (name, process.returncode, log))
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.2)
    raise SystemExit("%s did not answer on port %d within %d s; see %s" % (name, port, STARTUP_LIMIT, log))


# ---------------------------------------------------------------------------------------------
# What is submitted


DOMAINS = ("example.com", "example.org", "example.net", "acme.io", "yahoo.com")
SANDBOX_NAMES = ("deliverable", "undeliverable", "accept-all", "disposable", "free", "unknown",
                 "other", "role")
# Valid syntax, awkward for whoever builds JSON or SQL by hand.
UNUSUAL = ("o'brien{n}@example.com", "ünïcödé{n}@example.com", "josé.{n}@exämple.com",
           "a&b{n}+x@example.org", "日本{n}@example.jp", "{{curly{n}}}|~@example.net")
# Each fails the syntax check: kept as an invalid row, never sent.
INVALID = ("back\\slash{n}@example.com", "not an address {n}", "missing-at-{n}.example.com",
           "user{n}@localhost", '"quoted{n}"@example.com', "two@@{n}.example.com")


class AddressBook:
    """Addresses for user batches: mostly new, some seen before (so several users hold the same
    mailbox), each reuse spelled as the provider allows (Gmail dots and +tags, googlemail.com,
    Outlook +tags, case)."""

    def __init__(self, rng):
        self.rng = rng
        self.seen = []
        self.count = 0

    def pick(self):
        if self.seen and self.rng.random() < 0.25:
            return self.spelling(self.rng.choice(self.seen))
        self.count += 1
        mailbox = self.new_mailbox(self.count)
        self.seen.append(mailbox)
        return self.spelling(mailbox)

    def new_mailbox(self, n):
        roll = self.rng.random()
        if roll < 0.15:
            return ("gmail", n)
        if roll < 0.2:
            return ("outlook", n)
        if roll < 0.25:
            return ("unusual", self.rng.choice(UNUSUAL).format(n=n))
        if roll < 0.28:
            return ("sandbox", self.rng.choice(SANDBOX_NAMES))
        return ("plain", "user%d@%s" % (n, self.rng.choice(DOMAINS)))

    def spelling(self, mailbox):
        kind, value = mailbox
        rng = self.rng
        if kind == "gmail":
            # All of these strip to first<n>last@gmail.com.
            return rng.choice(("first{n}.last@gmail.com", "First{n}.Last+news@gmail.com",
                               "f.irst{n}last@googlemail.com", "FIRST{n}LAST+x{t}@gmail.com")
                              ).format(n=value, t=rng.randint(1, 9))
        if kind == "outlook":
            return rng.choice(("user{n}@outlook.com", "user{n}+tag{t}@outlook.com",
                               "User{n}@Outlook.com")).format(n=value, t=rng.randint(1, 9))
        if kind == "sandbox":
            return "%s+%d@sandbox.usebouncer.com" % (value, rng.randint(1, 99))
        return value.upper() if rng.random() < 0.1 else value

    def invalid(self):
        self.count += 1
        return self.rng.choice(INVALID).format(n=self.count)


def batch_size(rng):
    """1..300, mostly small: many small user batches, now and then a large one."""
    roll = rng.random()
    if roll < 0.5:
        return rng.randint(1, 10)
    if roll < 0.85:
        return rng.randint(11, 100)
    return rng.randint(101, 300)


def user_batch_rows(rng, book):
    """The rows of one user batch: at least one valid address, sometimes a repeat within the
    batch, sometimes a few invalid rows."""
    rows = [book.pick() for _ in range(batch_size(rng))]
    if rng.random() < 0.1:
        rows.append(rng.choice(rows))
    invalid = [book.invalid() for _ in range(rng.randint(1, 3))] if rng.random() < 0.3 else []
    for row in invalid:
        rows.insert(rng.randint(0, len(rows)), row)
    return rows, len(invalid)


Submission = collections.namedtuple(
    "Submission", "batch_id user check_type rows accepted invalid expected_invalid duplicates via visible_at")


class Submitter(threading.Thread):
    """Submits user batches until its deadline, through the library (the code path of every app)
    and now and then through the CLI, waiting whenever the backlog is large enough that the
    drain at the end could not finish in time."""

    def __init__(self, soak, deadline):
        super().__init__(name="submitter", daemon=True)
        self.soak = soak
        self.deadline = deadline
        self.rng = random.Random(soak.options.seed)
        self.book = AddressBook(self.rng)
        self.submissions = []
        self.errors = Errors()
        self.lock = threading.Lock()
        self.ended = None

    def run(self):
        while time.monotonic() < self.deadline and not self.soak.stopping.is_set():
            try:
                if queued_rows() > MAX_BACKLOG:
                    self.soak.stopping.wait(1)
                    continue
                self.submit_one()
            except Exception as exc:  # reported in the table; the run goes on
                self.errors.add("submit", exc)
            self.soak.stopping.wait(self.rng.uniform(0.2, 1.2))
        self.ended = time.monotonic()

    def submit_one(self):
        rows, expected_invalid = user_batch_rows(self.rng, self.book)
        user = "user-%02d" % self.rng.randint(1, USERS)
        check_type = self.rng.choice(CHECK_TYPES)
        via = "cli" if self.rng.random() < CLI_SHARE else "library"
        answer = (self.submit_by_cli if via == "cli" else self.submit_by_library)(user, check_type, rows)
        submission = Submission(answer["batch_id"], user, check_type, len(rows), answer["accepted"],
                                answer["invalid"], expected_invalid, answer["duplicates"], via,
                                utcnow())
        with self.lock:
            self.submissions.append(submission)

    def submit_by_library(self, user, check_type, rows):
        with database.connection_context():
            return create_user_batch(user, check_type, rows).as_json()

    def submit_by_cli(self, user, check_type, rows):
        with open(self.soak.dir / "submit-cli.log", "ab") as log:
            done = subprocess.run(
                [sys.executable, "-m", "bouncer", "submit", "-", "--user", user,
                 "--check-type", check_type, "--json"],
                input=("\n".join(rows) + "\n").encode("utf-8"), stdout=subprocess.PIPE,
                stderr=log, cwd=ROOT, env=self.soak.env, timeout=COMMAND_LIMIT)
        if done.returncode != 0:
            raise RuntimeError("`bouncer submit` exited %d; see submit-cli.log" % done.returncode)
        return json.loads(done.stdout)

    def snapshot(self):
        with self.lock:
            return list(self.submissions)


def queued_rows():
    with database.connection_context():
        return UserBatchEmail.select().where(UserBatchEmail.status == QUEUED).count()


def pending_rows():
    with database.connection_context():
        return UserBatchEmail.select().where(UserBatchEmail.status.in_(PENDING_STATES)).count()


# ---------------------------------------------------------------------------------------------
# Watching


class RequestLog:
    """The sandbox's request log, read as it grows. A slow answer is logged when it is sent, with
    the time it arrived, so lines are not in time order: every check sorts the times."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.entries = []

    def read_new(self):
        if not self.path.exists():
            return
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            data = log.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # an unfinished last line waits for the next read
        self.entries += [json.loads(line) for line in lines if line.strip()]

    def times(self):
        return [entry["time"] for entry in self.entries]


class HealthSampler(threading.Thread):
    """GET /health every few seconds; each answer is kept in health.jsonl, checked for secrets
    at the end."""

    def __init__(self, soak):
        super().__init__(name="health", daemon=True)
        self.soak = soak
        self.url = "http://127.0.0.1:%d/health" % soak.web_port
        self.statuses = collections.Counter()

    def run(self):
        while not self.soak.stopping.wait(HEALTH_EVERY):
            self.sample()

    def sample(self):
        status, body = None, ""
        try:
            with urllib.request.urlopen(self.url, timeout=HTTP_TIMEOUT) as answer:
                status, body = answer.status, answer.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode("utf-8", "replace")
        except OSError as exc:
            body = "no answer: %s" % exc
        self.statuses[status or "no answer"] += 1
        with open(self.soak.dir / "health.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps({"time": time.time(), "status": status, "body": body}) + "\n")


class WorkerKiller:
    """About every `every` seconds a worker dies with SIGKILL and a new one takes its place.
    Cycles take milliseconds, so a worker picked at random is nearly always idle: the victim is
    the one running a creation cycle while a reservation is in flight (the window invariant 6
    is about), if that moment comes within half an interval; otherwise any worker."""

    def __init__(self, soak):
        self.soak = soak
        self.every = soak.options.kill_every
        self.rng = random.Random(soak.options.seed + 1)
        self.due = time.monotonic() + self.every
        self.redis = redis_lib.Redis.from_url(soak.env["REDIS_URL"], socket_connect_timeout=5)
        self.kills = []

    def is_due(self):
        return bool(self.every) and time.monotonic() >= self.due

    def maybe_kill(self):
        now = time.monotonic()
        if not self.is_due():
            return
        name, moment = self.worker_mid_reservation(), "mid-reservation"
        if name is None:
            if now < self.due + self.every / 2:
                return
            name, moment = self.rng.choice(self.worker_names()), "at random"
        self.due = now + self.every
        self.soak.services.kill_and_restart(name, "worker")
        self.kills.append(moment)
        self.soak.out.say("killed %s (%s) with SIGKILL at %s and started it again"
                          % (name, moment, iso(time.time())))

    def worker_names(self):
        return sorted(n for n in self.soak.services.running if n.startswith("worker"))

    def worker_mid_reservation(self):
        """The worker whose horse runs a creation cycle while a reservation is in flight."""
        with database.connection_context():
            reserving = {t for (t,) in BouncerBatch.select(BouncerBatch.check_type)
                         .where(BouncerBatch.status == "reserved").tuples()}
        jobs = tuple("batch_creator_%s" % check_type for check_type in reserving)
        if not jobs:
            return None
        by_pid = {self.soak.services.running[n].pid: n for n in self.worker_names()}
        for worker in Worker.all(connection=self.redis):
            # The scheduled job, or the one a trigger queued (`..._now`).
            if (worker.get_current_job_id() or "").startswith(jobs) and worker.pid in by_pid:
                return by_pid[worker.pid]
        return None


class Checker:
    """The invariants checked while the system runs, about once a second."""

    def __init__(self, soak):
        self.soak = soak
        self.requests = RequestLog(soak.dir / "requests.jsonl")
        self.fifo_checked = set()
        self.max_sampled = dict.fromkeys(CHECK_TYPES, 0)
        self.errors = Errors()
        self.crashes = {}

    def check(self):
        for check in (self.check_in_flight, self.check_fifo, self.check_request_budget):
            try:
                with database.connection_context():
                    check()
            except Exception as exc:  # a busy database must not end the run; reported at the end
                self.errors.add(check.__name__, exc)
        self.check_processes()

    def pending(self):
        """Rows still queued or sent; None when the database did not answer."""
        try:
            return pending_rows()
        except Exception as exc:
            self.errors.add("pending", exc)
            return None

    def check_in_flight(self):
        record = self.soak.violations.record
        for message in invariants.no_address_in_two_in_flight_batches():
            record(2, message)
        for message in invariants.at_most_max_outstanding(MAX_OUTSTANDING):
            record(3, message)
        counts = dict(BouncerBatch.select(BouncerBatch.check_type, fn.COUNT(BouncerBatch.id))
                      .where(BouncerBatch.status.in_(IN_FLIGHT_STATES))
                      .group_by(BouncerBatch.check_type).tuples())
        for check_type in CHECK_TYPES:
            self.max_sampled[check_type] = max(self.max_sampled[check_type], counts.get(check_type, 0))

    def check_fifo(self):
        """Each Bouncer batch once, as soon as its id is stored: the check needs nothing that
        happens later (see invariants.fifo_violations_of_sent_batch)."""
        visible_at = {s.batch_id: s.visible_at for s in self.soak.submitter.snapshot()}
        stored = (BouncerBatch.select(BouncerBatch.id)
                  .where(BouncerBatch.bouncer_id.is_null(False)).order_by(BouncerBatch.id))
        for (ledger_id,) in stored.tuples():
            if ledger_id in self.fifo_checked:
                continue
            for message in invariants.fifo_violations_of_sent_batch(ledger_id, visible_at, FIFO_SAME_CYCLE):
                self.soak.violations.record(5, message)
            self.fifo_checked.add(ledger_id)

    def check_request_budget(self):
        self.requests.read_new()
        window = 60.0 - self.soak.options.transit_tolerance
        for moment in invariants.requests_over_budget(self.requests.times(), RATE_LIMIT_BUFFER, window):
            self.soak.violations.record(
                4, "a request arrived at the sandbox at %s with %d or more in the %g s before it"
                % (iso(moment), RATE_LIMIT_BUFFER, window), when=moment)

    def check_processes(self):
        for name, code in self.soak.services.died().items():
            if name not in self.crashes:
                self.crashes[name] = code
                self.soak.out.say("!! %s exited by itself with code %s at %s; see %s.log"
                                  % (name, code, iso(time.time()), name))


# ---------------------------------------------------------------------------------------------
# The run


class Run:
    def __init__(self, options):
        self.options = options
        self.dir = Path(options.run_dir or tempfile.mkdtemp(prefix="bouncer-soak-")).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = Output(self.dir / "soak.log")
        self.violations = Violations(self.dir / "violations.log")
        self.api_key = "sk-soak-%s" % secrets.token_hex(12)
        self.callback_secret = secrets.token_hex(24)
        self.sandbox_port, self.web_port = free_port(), free_port()
        self.stopping = threading.Event()
        self.services = None
        self.submitter = None
        self.health = None
        self.checker = None
        self.env = None
        self.started = time.monotonic()
        self.drained = None
        # Filled by final_checks, read by the report.
        self.max_history, self.tracker_max, self.counts = {}, 0, {}

    def environment(self, database_url, redis_url):
        env = {name: value for name, value in os.environ.items() if name not in DEFAULTED_SETTINGS}
        env.update(SERVICE_SETTINGS)
        env.update({
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "BOUNCER_API_URL": "http://127.0.0.1:%d" % self.sandbox_port,
            "BOUNCER_API_KEY": self.api_key,
            "PUBLIC_URL": "http://127.0.0.1:%d" % self.web_port,
            "CALLBACK_SECRET": self.callback_secret,
            "PORT": str(self.web_port),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",   # a log read after a crash holds the last lines
        })
        return env

    # -- phases --

    def start_services(self):
        options, services = self.options, self.services
        third = "%.4f" % (options.fault_rate / 3)
        sandbox_env = dict(self.env, SANDBOX_API_KEY=self.api_key)
        sandbox = services.start(
            "sandbox", "sandbox", "--port", str(self.sandbox_port),
            "--processing-time", str(PROCESSING_SECONDS), "--fail-rate", third,
            "--rate-limit-rate", third, "--slow-rate", third, "--slow-seconds", str(SLOW_SECONDS),
            "--seed", str(options.seed), "--request-log", str(self.dir / "requests.jsonl"),
            env=sandbox_env)
        wait_for_port(self.sandbox_port, sandbox, "the sandbox", self.dir / "sandbox.log")
        services.run("init-db", "init-db")
        web = services.start("web", "web", "--port", str(self.web_port))
        wait_for_port(self.web_port, web, "the web process", self.dir / "web.log")
        for number in range(1, options.workers + 1):
            services.start("worker-%d" % number, "worker")
        for number in range(1, options.schedulers + 1):
            services.start("scheduler-%d" % number, "scheduler")

    def exercise(self):
        """Submit during the first part of the run, check all along, until the duration ends."""
        duration = self.options.duration
        begin = time.monotonic()
        self.submitter = Submitter(self, begin + duration * SUBMIT_SHARE)
        self.killer = WorkerKiller(self)
        self.health = HealthSampler(self)
        self.checker = Checker(self)
        self.submitter.start()
        self.health.start()
        self.out.say("submitting for %.0f s, checking for %.0f s" % (duration * SUBMIT_SHARE, duration))
        self.check_until(begin + duration)
        self.submitter.join(timeout=COMMAND_LIMIT + 5)

    def drain(self):
        """Faults stay on: the queue must empty through them, within DRAIN_LIMIT."""
        self.out.say("run over; waiting up to %d s for the queue to drain" % DRAIN_LIMIT)
        deadline = time.monotonic() + DRAIN_LIMIT
        while time.monotonic() < deadline:
            self.checker.check()
            if self.note_drained():
                self.out.say("queue empty %.0f s after the last submission" % self.drained)
                return
            time.sleep(CHECK_EVERY)
        self.out.say("!! the queue did not drain in %d s" % DRAIN_LIMIT)

    def note_drained(self):
        """Whether nothing is pending since the submitter stopped; remembers how long after."""
        if self.drained is None and self.submitter.ended is not None and self.checker.pending() == 0:
            self.drained = time.monotonic() - self.submitter.ended
        return self.drained is not None

    def check_until(self, deadline):
        next_report = time.monotonic() + 15
        while time.monotonic() < deadline:
            tick = time.monotonic()
            self.checker.check()
            self.note_drained()
            if tick >= next_report:
                self.report_progress()
                next_report = tick + 15
            self.kill_until(min(tick + CHECK_EVERY, deadline))

    def kill_until(self, until):
        """Sleep until `until`; while a kill is due, look for its moment every KILL_POLL s (a
        reservation is in flight for milliseconds). Kills happen here, on the main thread:
        a process it starts dies with the thread that started it (die_with_parent)."""
        while time.monotonic() < until:
            self.killer.maybe_kill()
            pause = KILL_POLL if self.killer.is_due() else until - time.monotonic()
            time.sleep(max(0.0, min(pause, until - time.monotonic())))

    def report_progress(self):
        submissions = self.submitter.snapshot()
        self.out.say("%5.0f s: %d user batches, %d rows submitted; %s pending; %d requests seen"
                     % (time.monotonic() - self.started, len(submissions),
                        sum(s.rows for s in submissions), self.checker.pending(),
                        len(self.checker.requests.entries)))

    def stop_services(self):
        """Schedulers first (no new jobs), then workers and web; the sandbox last, so a cycle
        finishing its call still gets an answer."""
        self.stopping.set()
        names = list(self.services.running)
        self.services.stop([n for n in names if n.startswith("scheduler")])
        self.services.stop([n for n in names if n.startswith(("worker", "web"))])
        self.services.stop(["sandbox"], grace=KILL_GRACE)
        self.health.join(timeout=HTTP_TIMEOUT + 1)
        self.killer.redis.close()

    # -- final checks --

    def final_checks(self):
        """One last look once everything stopped: what the live checks saw, plus invariant 1
        and the whole history of the ledger and the request log."""
        self.checker.check()
        submissions = self.submitter.snapshot()
        with database.connection_context():
            for message in invariants.every_email_finished() + rows_accounted_for(submissions):
                self.violations.record(1, message)
            self.max_history = {t: invariants.max_in_flight_from_ledger(t) for t in CHECK_TYPES}
            for check_type, highest in self.max_history.items():
                if highest > MAX_OUTSTANDING:
                    self.violations.record(3, "%d %s batches in flight at once (ledger history)"
                                           % (highest, check_type))
            self.check_recorded_budget()
            self.counts = database_counts()

    def check_recorded_budget(self):
        """Invariant 4 as the service counts, strictly: the slots its processes took together
        (rate_limit_tracker keeps an hour, longer than any soak run)."""
        slots = [stamp.replace(tzinfo=datetime.timezone.utc).timestamp() for (stamp,) in
                 RateLimitTracker.select(RateLimitTracker.requested_at).tuples()]
        self.tracker_max = invariants.max_requests_in_window(slots)[0]
        for moment in invariants.requests_over_budget(slots, RATE_LIMIT_BUFFER):
            self.violations.record(4, "the service took a request slot at %s with %d or more "
                                      "taken in the 60 s before it" % (iso(moment), RATE_LIMIT_BUFFER))

    def leaked_secrets(self, extra_text=""):
        """Files of the run directory (logs, request log, /health answers, the soak's own
        output) holding the API key or the callback secret."""
        needles = (self.api_key.encode(), self.callback_secret.encode())
        leaks = []
        for path in sorted(self.dir.iterdir()):
            if path.is_file() and not path.name.startswith("soak.db"):
                data = path.read_bytes()
                leaks += ["%s holds the %s" % (path.name, what) for needle, what
                          in zip(needles, ("API key", "callback secret")) if needle in data]
        leaks += ["the report holds the %s" % what for needle, what
                  in zip(needles, ("API key", "callback secret")) if needle.decode() in extra_text]
        return leaks


def rows_accounted_for(submissions):
    """Invariant 1's other half: every row submitted is stored, counted and kept."""
    problems = []
    stored = UserBatchEmail.select().count()
    if stored != sum(s.rows for s in submissions):
        problems.append("%d rows stored, %d submitted" % (stored, sum(s.rows for s in submissions)))
    totals = dict(UserBatch.select(UserBatch.id, UserBatch.total).tuples())
    for s in submissions:
        if not totals.get(s.batch_id) == s.accepted + s.invalid == s.rows:
            problems.append("user batch %s: %d rows submitted, %d counted (accepted + invalid), "
                            "%s stored" % (s.batch_id, s.rows, s.accepted + s.invalid,
                                           totals.get(s.batch_id)))
    return problems


def database_counts():
    Row = UserBatchEmail
    failed = collections.Counter()
    for (reason,) in Row.select(Row.failure_reason).where(Row.status == "failed").tuples():
        failed[re.sub(r"\b[0-9a-f]{12,}\b", "<id>", reason or "(no reason)")] += 1
    ledger = collections.Counter(s for (s,) in BouncerBatch.select(BouncerBatch.status).tuples())
    abandoned = [q for (q,) in BouncerBatch.select(BouncerBatch.quantity)
                 .where(BouncerBatch.status == "abandoned").tuples()]
    return {
        "rows": collections.Counter(s for (s,) in Row.select(Row.status).tuples()),
        "failed": failed,
        "ledger": ledger,
        "stored_ids": BouncerBatch.select().where(BouncerBatch.bouncer_id.is_null(False)).count(),
        "mailboxes": Row.select(fn.COUNT(Row.email_global.distinct())).scalar(),
        "addresses_sent": BouncerBatch.select(fn.COALESCE(fn.SUM(BouncerBatch.quantity), 0))
        .where(BouncerBatch.bouncer_id.is_null(False)).scalar(),
        "abandoned": abandoned,
        "user_batches": collections.Counter(s for (s,) in UserBatch.select(UserBatch.status).tuples()),
    }


# ---------------------------------------------------------------------------------------------
# The report


def report(run, leaks):
    """The table, and whether the run passed."""
    options, counts = run.options, run.counts
    submissions = run.submitter.snapshot()
    entries = run.checker.requests.entries
    kinds = collections.Counter(request_kind(e["method"], parse_route(e["path"])[0]) for e in entries)
    faults = collections.Counter(e["fault"] for e in entries if e["fault"])
    created_at_sandbox = sum(1 for e in entries if e["status"] == 200
                             and request_kind(e["method"], parse_route(e["path"])[0]) == "create")
    arrivals = [e["time"] for e in entries]
    busiest, busiest_start = invariants.max_requests_in_window(arrivals)
    strictly_over = len(invariants.requests_over_budget(arrivals, RATE_LIMIT_BUFFER))
    rows, ledger = counts["rows"], counts["ledger"]
    exits_ok = all(code == 0 for name, code in run.services.exit_codes.items()
                   if name.startswith(SERVICE_NAMES))
    lines = []

    def line(label, value):
        lines.append("%-36s %s" % (label, value))

    lines.append("=" * 78)
    line("soak run", "%s s, %s, %d workers, %d schedulers, fault rate %s, seed %d" % (
        options.duration, "PostgreSQL" if options.database_url and "postgres" in options.database_url
        else "SQLite", options.workers, options.schedulers, options.fault_rate, options.seed))
    line("run directory", run.dir)
    line("emails submitted", "%d rows in %d user batches (%d through the CLI); %d accepted, "
         "%d duplicates" % (sum(s.rows for s in submissions), len(submissions),
                            sum(1 for s in submissions if s.via == "cli"),
                            sum(s.accepted for s in submissions),
                            sum(s.duplicates for s in submissions)))
    line("mailboxes", "%d distinct among the accepted rows; %d addresses in batches Bouncer "
         "accepted" % (counts["mailboxes"], counts["addresses_sent"]))
    if run.submitter.errors.summary():
        line("submissions that failed", run.submitter.errors.summary())
    line("emails verified", rows["done"])
    line("emails failed", rows["failed"])
    for reason, number in counts["failed"].most_common():
        line("  %d x" % number, reason)
    expected_invalid = sum(s.expected_invalid for s in submissions)
    line("emails invalid", "%d (%d invalid rows generated)" % (rows["invalid"], expected_invalid))
    line("emails still pending", rows["queued"] + rows["sent"])
    line("user batches", ", ".join("%s %d" % item for item in sorted(counts["user_batches"].items())))
    line("Bouncer batches created", "%d (completed %d, failed %d, still outstanding %d)" % (
        counts["stored_ids"], ledger["completed"], ledger["failed"], ledger["outstanding"]))
    line("Bouncer calls rejected", ledger["rejected"])
    if run.killer.kills:
        line("workers killed (SIGKILL, restarted)", ", ".join(
            "%d %s" % (count, moment)
            for moment, count in sorted(collections.Counter(run.killer.kills).items())))
    line("abandoned (possible orphans)", "%d%s" % (len(counts["abandoned"]), (
        ", sizes " + ", ".join(map(str, counts["abandoned"]))) if counts["abandoned"] else ""))
    line("created at the sandbox, not followed", "%d (a create answered after the client timed out)"
         % max(0, created_at_sandbox - counts["stored_ids"]))
    line("faults injected", ", ".join("%s %d" % item for item in sorted(faults.items())) or "none")
    line("requests by kind", ", ".join("%s %d" % (k, kinds[k]) for k in ("create", "status", "download", "other")))
    line("max in flight (ledger / sampled)", ", ".join(
        "%s %d / %d of %d" % (t, run.max_history[t], run.checker.max_sampled[t], MAX_OUTSTANDING)
        for t in CHECK_TYPES))
    line("max requests in a rolling 60 s", "%d at the sandbox%s, %d counted by the service; buffer %d" % (
        busiest, " (from %s)" % iso(busiest_start) if busiest_start else "", run.tracker_max,
        RATE_LIMIT_BUFFER))
    line("  arrivals over it in a strict 60 s", "%d (invariant 4 allows %g s of transit: "
         "--transit-tolerance)" % (strictly_over, options.transit_tolerance))
    line("completion callbacks accepted", callbacks_answered(run.dir))
    line("health samples", ", ".join("%s: %d" % (k, v) for k, v in sorted(
        run.health.statuses.items(), key=lambda item: str(item[0]))) or "none")
    line("queue empty after last submission", "%.0f s" % run.drained if run.drained is not None
         else "never, within the run and %d s after it" % DRAIN_LIMIT)
    longest = longest_creation_cycle(run.dir)
    line("longest creation cycle", "%.1f s (FIFO excuse window %d s%s)" % (
        longest, FIFO_SAME_CYCLE.total_seconds(),
        "" if longest < FIFO_SAME_CYCLE.total_seconds() else ": TOO SHORT, FIFO verdict unsure"))
    for number, name in INVARIANTS.items():
        found = run.violations.count(number)
        line("invariant %d (%s)" % (number, name), "VIOLATED (%d)" % found if found else "held")
    line("secrets in logs and /health", "LEAKED: " + "; ".join(leaks) if leaks else "none")
    line("process exits", describe_exits(run, exits_ok))
    if run.checker.errors.summary():
        line("checks that could not run", run.checker.errors.summary())
    lines.append("=" * 78)
    for number, name in INVARIANTS.items():
        for when, message in run.violations.examples(number):
            lines.append("invariant %d at %s: %s" % (number, iso(when), message))
    if any(run.violations.count(n) for n in INVARIANTS):
        lines.append("every violation: %s" % (run.dir / "violations.log"))
    passed = (not any(run.violations.count(n) for n in INVARIANTS) and not leaks and exits_ok
              and not run.checker.crashes)
    return "\n".join(lines), passed


# ---------------------------------------------------------------------------------------------


def describe_exits(run, exits_ok):
    if exits_ok and not run.checker.crashes:
        return "all 0 after SIGTERM"
    stops = ["%s: %s" % item for item in sorted(run.services.exit_codes.items())
             if item[0].startswith(SERVICE_NAMES) and item[1] != 0]
    crashes = ["%s died by itself (%s)" % item for item in sorted(run.checker.crashes.items())]
    return "; ".join(crashes + stops)


def longest_creation_cycle(run_dir):
    """The longest creation cycle the workers logged, in seconds: the FIFO check's excuse
    window must exceed it."""
    longest = 0.0
    for path in run_dir.glob("worker-*.log"):
        for seconds in re.findall(r"Job batch_creator_\w+ done in ([0-9.]+)s", path.read_text(errors="replace")):
            longest = max(longest, float(seconds))
    return longest


def callbacks_answered(run_dir):
    """Completion callbacks the web process accepted (its log masks the secret as ***)."""
    path = run_dir / "web.log"
    if not path.exists():
        return 0
    return len(re.findall(r"POST /bouncer/callback/\*\*\*/\w+ 202", path.read_text(errors="replace")))


def stop_on_signal(signum, frame):
    # The finally blocks stop every process and drop the run's database.
    raise SystemExit(128 + signum)


def main(argv=None):
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, stop_on_signal)
    run = Run(options)
    run.out.say("soak run directory: %s (seed %d)" % (run.dir, options.seed))
    # Long enough for the claim to outlive the run, short enough to lapse if the soak is killed.
    claim_seconds = options.duration + DRAIN_LIMIT + 600
    with fresh_database(options, run.dir) as database_url, \
            claimed_redis(options.redis_url, claim_seconds) as redis_url:
        run.env = run.environment(database_url, redis_url)
        open_database(database_url)
        run.services = Services(run.dir, run.env)
        try:
            run.start_services()
            run.exercise()
            run.drain()
            run.stop_services()
            run.final_checks()
        finally:
            run.stopping.set()
            run.services.kill_all()
            if not database.is_closed():
                database.close()
    table, passed = report(run, [])
    leaks = run.leaked_secrets(table)
    if leaks:
        table, passed = report(run, leaks)
    run.out.say(table)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
