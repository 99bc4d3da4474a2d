"""Benchmark of the service on SQLite and PostgreSQL, measured side by side in one run, ending
with one table of the targets.

    python -m scripts.bench [--quick] [--database-url URL]... [--redis-url URL] [--out DIR]
                            [--parts steps,intakes,history,imports,in-process] [--reps N]
                            [--queued 150000,1000000] [--naive] [--erasure] [--submit N]

Parts (all by default; `bash scripts/bench` gives a SQLite file and a PostgreSQL database):
- steps (scripts/endtoend.py): submit 200k lines as 40 processes, one creation cycle of 15 x 10k
  from 200k queued, one status cycle of 150k results, each a process against the sandbox over
  HTTP, on every database in turn, beside a straightforward implementation (scripts/
  straightforward.py) and the floor of each step;
- intakes (scripts/endtoend.py): a host-written batch admitted alone and with creation cycles
  beside it, a large `submit` of each side (with a raw `psql \\copy` of the same lines on
  PostgreSQL), a streamed submit to the web process; the longest wait of a creation cycle on the
  database meanwhile;
- history (scripts/history.py): a database filled with a long history, the three steps on it
  against an empty database;
- imports: start-up of three commands;
- in-process: the creation cycle that fills 15 x 10k (time, SQL statements) with each backlog
  size, under QUEUE_POLICY=fifo and, for the largest, under fair too, with what switching to fair
  costs there (numbering the whole line anew) and what a status object's place in line costs
  behind it; ingesting the 15 batches that fair cycle made (150k results, each batch a row of
  every user batch in line) against the floor of one raw bulk insert of the same rows; with
  --naive, the naive per-row designs beside them; with --erasure, a prune and a `forget --user`
  of 150k rows, with the longest transaction each held (what a cycle may wait on them). Bouncer
  is replaced by an in-process stub, so only our own work is timed.
Every process's peak RSS is read beside its time. Each database's measurements go to
<out>/<database>.json after every part (a part that fails is recorded and the run goes on), and
scripts/targets.py prints the targets table from them.
"""
import argparse
import compileall
import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import uuid

from peewee import fn

from bouncer.app import App
from bouncer.client import parse_records
from bouncer.config import Settings
from bouncer.cycles.creation import create_batches
from bouncer.cycles.ingest import ingest_download, read_download
from bouncer.cycles.runner import Cycle
from bouncer.names import CREATION
from bouncer.queue import fairness, waiting
from bouncer.queue.ledger import batches_to_check
from bouncer.states import BatchState, RowState
from bouncer.store.bulk import bulk_insert
from bouncer.store.database import database, dialect, open_database, utcnow
from bouncer.store.migrations import create_schema, move_rows_into_line
from bouncer.store.models import (
    BouncerBatch, BouncerBatchEmail, DeliverableResult, EmailGlobal, QueuedEmail, RidingRows, UserBatch,
    UserBatchEmail,
)
from scripts import endtoend, history, targets, workloads
from support.processes import ROOT, bouncer_command

BATCH, SLOTS = 10000, 15


class StubBouncer:
    """Answers instantly, so the cycle's time is the service's own."""

    def create_batch(self, check_type, emails, callback_url=None):
        return {"batchId": uuid.uuid4().hex}


class StatementCounter:
    """Counts SQL statements sent to the database."""

    def __init__(self, db):
        self.db, self.count = db, 0
        self.real = db.execute_sql

    def __enter__(self):
        def counted(*args, **kwargs):
            self.count += 1
            return self.real(*args, **kwargs)
        self.db.execute_sql = counted
        return self

    def __exit__(self, *exc):
        self.db.execute_sql = self.real


def peak_rss_mb():
    """This program's peak RSS: VmHWM belongs to the address space exec made, whereas
    ru_maxrss carries the parent's high-water mark across fork and exec."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_database(url):
    if database.obj is not None:
        database.close()
    workloads.fresh_database(url)
    db = open_database(url)
    create_schema()
    db.connect(reuse_if_open=True)
    return db


def seed_queue(total, user_batches):
    """`total` queued distinct addresses in `user_batches` user batches, in bulk (seeding is not
    what is measured; `submit` has its own benchmark)."""
    now = utcnow()
    per_batch = total // user_batches
    with database.atomic():
        bulk_insert(EmailGlobal, [{"email": "u%d@example.com" % i, "created_at": now}
                                  for i in range(total)])
        bulk_insert(UserBatch, [{"user_id": "user%d" % b, "check_type": "deliverable",
                                 "status": BatchState.QUEUED, "fifo_order": b + 1, "created_at": now,
                                 "total": per_batch} for b in range(user_batches)])
        first_global = EmailGlobal.select(fn.MIN(EmailGlobal.id)).scalar()
        first_batch = UserBatch.select(fn.MIN(UserBatch.id)).scalar()
        rows = ({"batch": first_batch + i // per_batch, "position": i % per_batch + 1,
                 "email": "u%d@example.com" % i, "email_global": first_global + i,
                 "check_type": "deliverable", "status": RowState.QUEUED, "fifo_order": i // per_batch + 1}
                for i in range(total))
        chunk = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == 50000:
                bulk_insert(UserBatchEmail, chunk)
                chunk = []
        bulk_insert(UserBatchEmail, chunk)
        move_rows_into_line()
    analyze()


def analyze():
    database.execute_sql("ANALYZE")


def measure_creation(url, queued, settings):
    reset_database(url)
    # Seeding runs in a child too: this process stays small, and so do the children it forks.
    in_child_process(seed_in_child, url, queued)
    return in_child_process(run_one_creation_cycle, url, settings)


def seed_in_child(url, queued):
    open_database(url)
    database.connect(reuse_if_open=True)
    seed_queue(queued, max(1, queued // 100))


def run_one_creation_cycle(url, settings):
    """One creation cycle in a fresh process, like a worker. (seconds, statements, RSS MB)."""
    open_database(url)
    database.connect(reuse_if_open=True)
    cycle = Cycle(App(settings, redis=None, client=StubBouncer()), CREATION, "deliverable")
    report = cycle.report
    with StatementCounter(database.obj) as counter:
        started = time.perf_counter()
        create_batches(cycle)
        seconds = time.perf_counter() - started
    assert sum(n for _, _, n in report.created) == SLOTS * BATCH, report.summary()
    return seconds, counter.count, peak_rss_mb()


def measure_fair_share(url, queued, settings):
    """On a line of `queued` rows in user batches of 100, each of its own user (fifo): (seconds
    of the status object's place in line of the last user batch, every row but its own ahead of
    it; seconds to number the line anew for fair; seconds of one creation cycle under fair
    after it, each Bouncer batch holding a row of every user)."""
    reset_database(url)
    in_child_process(seed_in_child, url, queued)
    return in_child_process(switch_to_fair_and_create, url, settings.replace(queue_policy="fair"))


def switch_to_fair_and_create(url, settings):
    open_database(url)
    database.connect(reuse_if_open=True)
    last = UserBatch.select().order_by(UserBatch.fifo_order.desc()).first()
    started = time.perf_counter()
    ahead = waiting.place_in_line(last)
    placing = time.perf_counter() - started
    assert ahead == QueuedEmail.select().count() - last.total, ahead
    started = time.perf_counter()
    numbered = fairness.order_line("deliverable", "fair")
    ordering = time.perf_counter() - started
    assert numbered == QueuedEmail.select().count(), numbered
    analyze()
    cycle = Cycle(App(settings, redis=None, client=StubBouncer()), CREATION, "deliverable")
    started = time.perf_counter()
    create_batches(cycle)
    creating = time.perf_counter() - started
    assert sum(n for _, _, n in cycle.report.created) == SLOTS * BATCH, cycle.report.summary()
    return placing, ordering, creating


def measure_ingest(url):
    """In a fresh process, like a worker: each download body is built (untimed), then parsed as
    the client does and ingested (timed). Returns (seconds, statements, peak RSS in MB)."""
    return in_child_process(ingest_outstanding_batches, url)


def ingest_outstanding_batches(url):
    open_database(url)
    database.connect(reuse_if_open=True)
    seconds, verified, statements = 0.0, 0, 0
    for ledger in batches_to_check("deliverable"):
        body = json.dumps(download_for(ledger.id)).encode()
        with StatementCounter(database.obj) as counter:
            started = time.perf_counter()
            verified += ingest_download(ledger.id, read_download(parse_records(body))).verified
            seconds += time.perf_counter() - started
        statements += counter.count
        del body
    assert verified == SLOTS * BATCH, verified
    return seconds, statements, peak_rss_mb()


def download_for(ledger_id):
    """What Bouncer would answer for one batch: a record per address sent."""
    verdicts = ("deliverable", "risky", "undeliverable", "unknown")
    sent = BouncerBatchEmail.select(BouncerBatchEmail.email_sent).where(
        BouncerBatchEmail.bouncer_batch == ledger_id).tuples()
    return [{"email": email, "status": verdicts[i % 4], "reason": "accepted_email", "score": 90,
             "domain": {"name": "example.com", "acceptAll": "no", "disposable": "no", "free": "no"},
             "account": {"role": "no", "disabled": "no", "fullMailbox": "no"},
             "dns": {"type": "MX", "record": "mx.example.com."}, "provider": "example.com",
             "toxic": "unknown", "toxicity": 0, "didYouMean": None, "retryAfter": None}
            for i, (email,) in enumerate(sent)]


def in_child_process(function, *args):
    """Run `function` in a fresh interpreter, so its peak RSS is its own."""
    database.close()
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:   # a child that hangs is ended with the pool, the run goes on
        result = pool.apply_async(function, args).get(timeout=endtoend.COMMAND_TIMEOUT)
    database.connect(reuse_if_open=True)
    return result


def measure_raw_insert_floor(rows):
    """One raw multi-row INSERT of `rows` result-shaped rows into a scratch table, in one
    transaction: what the database needs at least to take this much data."""
    database.execute_sql("DROP TABLE IF EXISTS bench_floor")
    database.execute_sql(
        "CREATE TABLE bench_floor (email_global_id INTEGER PRIMARY KEY, status TEXT, reason TEXT,"
        " score INTEGER, accept_all TEXT, disposable TEXT, free TEXT, role TEXT, disabled TEXT,"
        " full_mailbox TEXT, provider TEXT, raw TEXT, checked_at TIMESTAMP, bouncer_batch_id INTEGER)")
    now = utcnow()
    values = [(i, "deliverable", "accepted_email", 90, "no", "no", "no", "no", "no", "no",
               "example.com", '{"email": "u%d@example.com"}' % i, now, 1) for i in range(rows)]
    marks = "(%s)" % ",".join([database.param] * 14)
    started = time.perf_counter()
    with database.atomic():
        if dialect().name == "postgres":   # the fastest raw path there is COPY
            dialect().insert_rows(database, "bench_floor", list(FLOOR_COLUMNS), values)
        else:
            for start in range(0, rows, 2000):
                part = values[start:start + 2000]
                database.execute_sql("INSERT INTO bench_floor VALUES " + ",".join([marks] * len(part)),
                                     [v for row in part for v in row])
    return time.perf_counter() - started


FLOOR_COLUMNS = ("email_global_id", "status", "reason", "score", "accept_all", "disposable", "free",
                 "role", "disabled", "full_mailbox", "provider", "raw", "checked_at",
                 "bouncer_batch_id")


def measure_submit(url, lines):
    """`python -m bouncer submit` of a `lines`-line file, as a user runs it: (seconds, peak RSS
    in MB of that process, an upper bound: ru_maxrss starts from this small parent's). The file
    has repeats and Gmail spellings, and a few invalid lines."""
    reset_database(url)
    database.close()
    path = os.path.join(tempfile.mkdtemp(), "addresses.txt")
    with open(path, "w") as f:
        for i in range(lines):
            if i % 1000 == 999:
                f.write("not an address %d\n" % i)
            elif i % 10 == 0:
                f.write("First.Last%d+tag@gmail.com\n" % (i // 2))
            else:
                f.write("user%d@example.com\n" % i)
    env = dict(os.environ, DATABASE_URL=url, LOG_LEVEL="WARNING")
    started = time.perf_counter()
    # Popen and wait4, not support.processes: the child's own resource usage is the measure.
    child = subprocess.Popen(bouncer_command("submit", path, "--user", "bench", "--check-type",
                                             "deliverable", "--json"),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    answer = json.loads(child.stdout.read())
    assert status == 0 and answer["accepted"] + answer["invalid"] == lines, answer
    os.unlink(path)
    database.connect(reuse_if_open=True)
    return seconds, usage.ru_maxrss / 1024


def measure_erasure(url, total):
    """A prune of 16 user batches that ended 40 days ago (`total` rows of one user, half as many
    of another), their `total` verdicts as old; then a `forget --user` of the first user's rows
    (half of its addresses held by the other user too), each in a fresh process: rows of the
    table, the longest write transaction noted."""
    rows = []
    for what, days in (("prune", 40), ("forget", 0)):
        reset_database(url)
        in_child_process(seed_ended, url, total, days)
        seconds, longest, statements, rss = in_child_process(run_erasure, url, what)
        name = ("prune 16 ended batches, %s rows, %s verdicts" % (format(total * 3 // 2, ","), format(total, ","))
                if what == "prune" else
                "forget --user with %s rows in 15 batches (half its addresses shared)" % format(total, ","))
        rows.append((name, seconds, statements, rss, "longest transaction %.0f ms" % (longest * 1000)))
    return rows


def seed_ended(url, total, days):
    """`total` done rows in 15 completed batches of user `alice` (ended `days` ago), a verdict
    each (checked then); a second user holding every other address too."""
    open_database(url)
    database.connect(reuse_if_open=True)
    then = utcnow() - datetime.timedelta(days=days)
    per_batch = total // SLOTS
    with database.atomic():
        bulk_insert(EmailGlobal, [{"email": "u%d@example.com" % i, "created_at": then} for i in range(total)])
        first_global = EmailGlobal.select(fn.MIN(EmailGlobal.id)).scalar()
        for b in range(SLOTS + 1):
            user = "alice" if b < SLOTS else "bob"
            batch = UserBatch.create(user_id=user, check_type="deliverable", status=BatchState.COMPLETED,
                                     created_at=then, completed_at=then, fifo_order=b + 1, total=per_batch)
            span = list(range(b * per_batch, (b + 1) * per_batch) if b < SLOTS else range(0, total, 2))
            for start in range(0, len(span), 50000):
                bulk_insert(UserBatchEmail, [
                    {"batch": batch.id, "position": start + n + 1, "email": "u%d@example.com" % i,
                     "email_global": first_global + i, "check_type": "deliverable", "status": RowState.DONE,
                     "fifo_order": b + 1, "completed_at": then} for n, i in enumerate(span[start:start + 50000])])
        for start in range(0, total, 50000):
            bulk_insert(DeliverableResult, [{"email_global": first_global + i, "status": "deliverable",
                                             "raw": '{"email": "u%d@example.com"}' % i, "checked_at": then}
                                            for i in range(start, min(total, start + 50000))])
    analyze()


def run_erasure(url, what):
    """In a fresh process: prune (everything ended over 30 days ago) or forget alice, timing each
    write transaction. (seconds, longest transaction, statements, peak RSS)."""
    open_database(url)
    database.connect(reuse_if_open=True)
    from bouncer.services import erasure
    app = App(Settings(database_url=url, retention_days=30), redis=None, client=StubBouncer())
    longest = [0.0]
    with timed_transactions(longest), StatementCounter(database.obj) as counter:
        started = time.perf_counter()
        if what == "prune":
            report = erasure.prune(app, who="bench")
            assert report.rows == SLOTS * BATCH * 3 // 2 and report.verdicts == SLOTS * BATCH, report.summary()
        else:
            outcome = erasure.forget_user(app, "alice", who="bench")
            assert outcome.erased.rows == SLOTS * BATCH, outcome.summary()
        seconds = time.perf_counter() - started
    return seconds, longest[0], counter.count, peak_rss_mb()


@contextlib.contextmanager
def timed_transactions(longest):
    """Every write transaction's duration, the longest kept in `longest[0]`."""
    kind = type(dialect())
    opened = kind.write_transaction

    @contextlib.contextmanager
    def timed(self, db):
        started = time.perf_counter()
        with opened(self, db):
            yield
        longest[0] = max(longest[0], time.perf_counter() - started)

    kind.write_transaction = timed
    try:
        yield
    finally:
        kind.write_transaction = opened


def measure_naive_claim(url, queued):
    """One batch of 10k claimed the naive way: per row, find the oldest row in line, take it out
    and record it riding."""
    reset_database(url)
    in_child_process(seed_in_child, url, queued)
    with StatementCounter(database.obj) as counter:
        started = time.perf_counter()
        with database.atomic():
            ledger = BouncerBatch.create(check_type="deliverable", quantity=BATCH, reserved_at=utcnow())
            for _ in range(BATCH):
                row = (QueuedEmail.select().where(QueuedEmail.check_type == "deliverable")
                       .order_by(QueuedEmail.fifo_order, QueuedEmail.position).first())
                QueuedEmail.delete().where(QueuedEmail.row == row.row_id).execute()
                RidingRows.create(bouncer_batch=ledger.id, batch_id=row.batch_id, row_ids="[%d]" % row.row_id, rows=1)
        seconds = time.perf_counter() - started
    return seconds, counter.count


def measure_naive_upsert(rows):
    """The same results written one upsert per row."""
    now = utcnow()
    ids = [gid for (gid,) in EmailGlobal.select(EmailGlobal.id).limit(rows).tuples()]
    with StatementCounter(database.obj) as counter:
        started = time.perf_counter()
        with database.atomic():
            for gid in ids:
                (DeliverableResult.insert(email_global=gid, status="deliverable", raw="{}", checked_at=now)
                 .on_conflict(conflict_target=[DeliverableResult.email_global],
                              preserve=[DeliverableResult.status, DeliverableResult.checked_at])
                 .execute())
        seconds = time.perf_counter() - started
    return seconds, counter.count


PARTS = ("steps", "intakes", "history", "imports", "in-process")


# The packages whose modules the measured processes import: both sides' (the straightforward
# implementation is scripts/straightforward.py) and the bench's own.
SOURCES = ("bouncer", "scripts", "support")


def compile_sources():
    """Every measured process reads its modules' bytecode, as it would once installed (pip writes
    it at install; a checkout, at the first run). Where the environment says not to write it
    (PYTHONDONTWRITEBYTECODE), each process would compile every module of its side anew: 30 ms
    of a `submit`, most of it on the side with more modules, which no user pays."""
    for package in SOURCES:
        compileall.compile_dir(os.path.join(ROOT, package), quiet=1)


def main():
    args = parse_arguments()
    compile_sources()
    urls = args.database_url or ["sqlite:///%s" % os.path.join(tempfile.mkdtemp(), "bench.db")]
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit("unknown part(s) %s: choose among %s" % (", ".join(sorted(unknown)), ",".join(PARTS)))
    args.out = args.out or tempfile.mkdtemp(prefix="bouncer-bench-out-")
    os.makedirs(args.out, exist_ok=True)
    plan = endtoend.QUICK if args.quick else endtoend.Plan()
    if args.reps:
        plan = dataclasses.replace(plan, reps=args.reps, large_reps=args.reps)
    records = {url: Record(args.out, url, plan) for url in urls}
    if set(parts) & {"steps", "intakes", "history", "imports"}:
        with claimed_redis(args.redis_url) as redis_url:
            run_end_to_end(urls, redis_url, plan, parts, records)
    if "in-process" in parts:
        queued = [int(q) for q in (args.queued or ("150000" if args.quick else "150000,1000000")).split(",")]
        for url in urls:
            records[url].part("in-process", run_in_process, url, queued, args.naive, args.submit,
                              records[url].backend, args.erasure)
    for record in records.values():
        record.finish()
    print()
    targets.print_table([record.path for record in records.values()])
    print("\nMeasurements: %s" % " ".join(record.path for record in records.values()))
    if any(record.data["errors"] for record in records.values()):
        raise SystemExit(1)


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", action="append", default=None,
                        help="a database to measure on; give it twice for SQLite and PostgreSQL in one run, "
                             "the three steps measured on both in turn (default: a SQLite file in a "
                             "temporary directory)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6390/0",
                        help="a Redis server; the end-to-end parts claim a database number of their own")
    parser.add_argument("--out", default=None,
                        help="where each database's measurements go (<out>/sqlite.json, <out>/postgresql.json; "
                             "default: a new directory under the temporary one)")
    parser.add_argument("--quick", action="store_true",
                        help="one repetition of each row, 10 files, 200k-row intakes, a tenth of the long "
                             "history, 150k queued in-process")
    parser.add_argument("--reps", type=int, default=0,
                        help="repetitions of every end-to-end row (default 3, 1 with --quick)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="what to measure, comma-separated, among %s (default: all)" % ",".join(PARTS))
    parser.add_argument("--queued", default=None,
                        help="in-process backlog sizes for the creation cycle, comma-separated "
                             "(default 150000,1000000; 150000 with --quick)")
    parser.add_argument("--naive", action="store_true",
                        help="in-process, the naive per-row designs too (the straightforward "
                             "implementation end to end is the yardstick now)")
    parser.add_argument("--erasure", action="store_true",
                        help="in-process, a prune and a forget of 150k rows too")
    parser.add_argument("--submit", type=int, default=0,
                        help="lines for the in-process submit measure (0, the default, skips it: "
                             "the end-to-end rows measure submit)")
    return parser.parse_args()


class Record:
    """One database's measurements, written to <out>/<backend>.json after every part, so what was
    measured survives a later part's failure. A part that fails is recorded with its error, the
    run goes on, and the targets table says what was not measured."""

    def __init__(self, out, url, plan):
        self.url = url
        self.backend = "PostgreSQL" if workloads.is_postgres_url(url) else "SQLite"
        self.path = os.path.join(out, "%s.json" % self.backend.lower())
        self.data = {"backend": self.backend, "quick": plan.quick, "plan": plan.__dict__,
                     "machine": machine(), "errors": {}}
        self.save()

    def part(self, name, function, *args):
        """data[name] = function(*args), printed as it comes; its error recorded instead."""
        started = time.monotonic()
        try:
            self.data[name] = function(*args)
        except Exception as exc:
            self.fail(name, exc)
        self.data.setdefault("seconds", {})[name] = time.monotonic() - started
        self.save()

    def fail(self, name, exc):
        traceback.print_exc()
        self.data["errors"][name] = ("%s: %s" % (type(exc).__name__, exc)).splitlines()[0][:300]
        print("==> %s: %s failed: %s" % (self.backend, name, self.data["errors"][name]), file=sys.stderr)

    def finish(self):
        self.data["machine"]["load_at_the_end"] = load_average()
        self.save()

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)


def machine():
    with open("/proc/meminfo") as meminfo:
        memory = int(meminfo.readline().split()[1]) / 1048576
    return {"cores": os.cpu_count(), "memory_gib": int(memory), "started": utc_now_text(),
            "load_at_the_start": load_average()}


def load_average():
    with open("/proc/loadavg") as loadavg:
        return " ".join(loadavg.read().split()[:3])


def utc_now_text():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@contextlib.contextmanager
def claimed_redis(redis_url):
    """A Redis database number of the bench's own (the tests' claims are kept)."""
    from support.servers import RedisClaims
    owner = "bench-%d" % os.getpid()
    with RedisClaims(redis_url) as claims:
        number = claims.claim_any(owner, seconds=6 * 3600)
        if number is None:
            raise SystemExit("no free Redis database number on %s" % redis_url)
        try:
            yield "%s/%d" % (redis_url.rsplit("/", 1)[0], number)
        finally:
            claims.release(number, owner)


def run_end_to_end(urls, redis_url, plan, parts, records):
    """The end-to-end parts: the three steps on every database in turn, then each database's
    large intakes, long history and start-up."""
    benches = {url: endtoend.Bench(url, redis_url, plan) for url in urls}
    try:
        if "steps" in parts:
            run_steps(benches, plan, records)
        for part, function in (("intakes", measure_intakes), ("history", measure_history),
                               ("imports", measure_imports)):
            if part in parts:
                for url, bench in benches.items():
                    records[url].part(part, function, bench, plan)
    finally:
        for bench in benches.values():
            bench.close()


def run_steps(benches, plan, records):
    started = time.monotonic()
    try:
        found = endtoend.measure_steps(list(benches.values()), plan)
    except Exception as exc:
        for url in benches:
            records[url].fail("steps", exc)
            records[url].save()
        return
    for url, bench in benches.items():
        rows = [row.as_json() for row in found[bench.backend]]
        records[url].data["steps"] = rows
        records[url].data.setdefault("seconds", {})["steps"] = time.monotonic() - started
        records[url].save()
        endtoend.print_steps_table(bench.backend, rows, plan.reps)
    sys.stdout.flush()


def measure_intakes(bench, plan):
    found = endtoend.measure_intakes(bench)
    endtoend.print_intakes_table(bench.backend, found)
    return found


def measure_history(bench, plan):
    found = history.measure(bench, history.QUICK if plan.quick else history.Size())
    history.print_table(bench.backend, found, plan.reps)
    return found


def measure_imports(bench, plan):
    found = bench.measure_imports()
    endtoend.print_imports_table(bench.backend, found, plan.import_runs)
    return found


def run_in_process(url, backlogs, naive, submit_lines, backend, erasure=False):
    # The stub answers whatever key: a key is set only because the cycle sends nothing without one.
    settings = Settings(database_url=url, api_key="sk-bench-stub", batch_size=BATCH, max_outstanding=SLOTS,
                        rate_limit_buffer=180, result_cache_days=30)
    random.seed(1)
    rows = []
    creation = {}
    for queued in backlogs:
        seconds, statements, rss = measure_creation(url, queued, settings)
        creation[queued] = seconds
        rows.append(("creation cycle, 15 x 10k, %s queued" % format(queued, ","), seconds,
                     statements, rss, ""))
    largest = max(backlogs)
    placing, ordering, creating = measure_fair_share(url, largest, settings)
    rows.append(("creation cycle, 15 x 10k, %s queued, QUEUE_POLICY=fair, %s users interleaved"
                 % (format(largest, ","), format(largest // 100, ",")), creating, None, None,
                 "%.2fx fifo" % (creating / creation[largest])))
    rows.append(("switching to fair: %s rows in line numbered anew (one transaction)" % format(largest, ","),
                 ordering, None, None, ""))
    rows.append(("a status object's place in line, %s rows ahead" % format(largest, ","), placing, None, None, ""))
    ingest_seconds, ingest_statements, ingest_rss = measure_ingest(url)
    floor = measure_raw_insert_floor(SLOTS * BATCH)
    rows.append(("ingest of the 15 batches of the cycle under fair (150k results, each batch a row of "
                 "%s user batches)" % format(largest // 100, ","), ingest_seconds, ingest_statements, ingest_rss,
                 "%.2fx the floor" % (ingest_seconds / floor)))
    rows.append(("floor: raw bulk insert of 150k rows", floor, 75, None, ""))
    sizes = sorted(creation)
    if len(sizes) > 1:
        rows[len(sizes) - 1] = rows[len(sizes) - 1][:4] + ("%.2fx the %s case" % (
            creation[sizes[-1]] / creation[sizes[0]], format(sizes[0], ",")),)
    if naive:
        naive_upsert, naive_upsert_statements = measure_naive_upsert(BATCH)
        rows.append(("naive: per-row upserts, 10k results", naive_upsert, naive_upsert_statements,
                     None, "x15 = %.1f s for 150k (%.0fx ingest)" % (
                         naive_upsert * SLOTS, naive_upsert * SLOTS / ingest_seconds)))
        naive_claim, naive_claim_statements = measure_naive_claim(url, sizes[0])
        rows.append(("naive: per-row claims, 1 batch of 10k", naive_claim, naive_claim_statements,
                     None, "x15 = %.1f s for a cycle (%.0fx ours)" % (
                         naive_claim * SLOTS, naive_claim * SLOTS / creation[sizes[0]])))
    if erasure:
        rows += measure_erasure(url, SLOTS * BATCH)
    if submit_lines:
        submit_seconds, submit_rss = measure_submit(url, submit_lines)
        rows.append(("submit %s lines (`python -m bouncer submit`)" % format(submit_lines, ","),
                     submit_seconds, 0, submit_rss, "%.0f lines/s" % (submit_lines / submit_seconds)))
    print("\n#### %s, in-process (stub Bouncer), %d cores\n" % (backend, os.cpu_count()))
    print("| measure | seconds | SQL statements | peak RSS (MB) | ratio |")
    print("|---|---:|---:|---:|---|")
    for name, seconds, statements, rss, note in rows:
        print("| %s | %.2f | %s | %s | %s |" % (name, seconds, statements or "",
                                               "%.0f" % rss if rss else "", note))
    sys.stdout.flush()
    return [{"name": name, "seconds": seconds, "statements": statements, "rss_mb": rss, "note": note}
            for name, seconds, statements, rss, note in rows]

if __name__ == "__main__":
    main()
