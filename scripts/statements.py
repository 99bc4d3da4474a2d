"""Where a cycle's time goes, statement by statement: 200k addresses queued (written as a host
writes them, then admitted), then one creation cycle filling 15 x 10k against a stub Bouncer
that answers at once, in a process of its own, every statement timed (its fetches and COPY
included) and every commit; the rest of the cycle's time is Python's, between statements. With
`--cycle status`, the creation cycle runs untimed and the ingest of its 15 batches (150k
results, the download bodies made and parsed beforehand) is what is timed. With `--cycle
submit`, one `submit` of the bench's 5,000-line file is timed instead (the loader's slice,
admission and the line, on the same 200k queued), beside the syntax check and the stripping of
its lines alone.

    python -m scripts.statements [--cycle creation|status|submit] [--database-url URL]... [--reps N]

Give --database-url twice (SQLite and PostgreSQL) for both side by side; the queue is seeded once
per database and each repetition starts from a copy of it, the databases in turn. Prints one
table of medians: statements grouped by what they do, calls, milliseconds on each database.
"""
import argparse
import collections
import json
import os
import re
import statistics
import tempfile
import time

from bouncer.addresses import strip_email_modifiers
from bouncer.app import App
from bouncer.client import parse_records
from bouncer.config import Settings
from bouncer.cycles.creation import create_batches
from bouncer.cycles.ingest import ingest_download, read_download
from bouncer.cycles.runner import Cycle
from bouncer.doors.admission import row_problem
from bouncer.doors.loading import create_user_batch
from bouncer.doors.reader import read_addresses
from bouncer.names import CREATION
from bouncer.queue.ledger import batches_to_check
from bouncer.store.database import database, open_database
from bouncer.store.migrations import create_schema
from scripts import bench, endtoend, workloads

QUEUED, FILES = 200000, 40
USER_BATCHES_LOCKED = r'^SELECT "t1"."id" FROM "user_batches" AS "t1" WHERE .*ORDER BY "t1"."id"'
CREATION_GROUPS = (
    ("read the line, a page at a time", r'FROM "queued_emails" AS "t1" WHERE'),
    ("take the rows out of the line (DELETE ... RETURNING)", r'^DELETE FROM "queued_emails"'),
    ("write the batch's addresses in flight", r'"bouncer_batch_emails" \("bouncer_batch_id"'),
    ("addresses of the page in flight?", r'FROM "bouncer_batch_emails" AS "t1"'),
    ("fresh verdicts of the page", r'FROM "email_(deliverable|catchall)_results"'),
    ("rows riding on the batch", r'"riding_rows" \("bouncer_batch_id"'),
    ("ledger row", r'^INSERT INTO "bouncer_batches"'),
    ("the user batches locked (in order of id)", USER_BATCHES_LOCKED),
    ("commits", r"^COMMIT$"),
    ("advisory locks", r"pg_advisory"),
)
STATUS_GROUPS = (   # the first pattern a statement matches names its group
    ("claim the batch, and mark it completed (ledger)", r'^(SELECT .* FROM|UPDATE) "bouncer_batches"'),
    ("the batch's addresses out of flight", r'^DELETE FROM "bouncer_batch_emails"'),
    ("the batch's addresses sent, and their spellings", r'FROM "bouncer_batch_emails"'),
    ("any verdict stored already?", r'^SELECT EXISTS\(SELECT 1 FROM "email_(deliverable|catchall)_results"'),
    ("verdicts written (COPY or INSERT)", r'(COPY|INSERT INTO) "?email_(deliverable|catchall)_results'),
    ("rows completed (UPDATE to done)", r'^UPDATE "user_batch_emails" SET "status" = \S+ "bouncer_batch_id"'),
    ("the user batches locked (in order of id)", USER_BATCHES_LOCKED),
    ("user batches ended", r'^UPDATE "user_batches"'),
    ("counts of the ended user batches (status objects)", r'^SELECT "t1"."batch_id", "t1"."status", "t2"."status"'),
    ("user batches riding, and rows no longer riding", r'"riding_rows"'),
    ("webhook deliveries written", r'"webhook_deliveries"'),
    ("commits", r"^COMMIT$"),
)
SUBMIT_GROUPS = (
    ("rows written as a host writes them (COPY or INSERT)", r'(COPY|INSERT INTO) "?user_batch_emails'),
    ("rows read back for admission", r'^SELECT "t1"."id", "t1"."position", "t1"."email" FROM "user_batch_emails"'),
    ("addresses registered (emails_global)", r'emails_global'),
    ("rows admitted, and their line rows written", r'^(WITH admitted AS|UPDATE user_batch_emails|'
                                                   r'INSERT INTO queued_emails)'),
    ("duplicates counted", r'COUNT\(DISTINCT'),
    ("the user batch's row (created, heartbeat, visible, counts, ended?)", r'"user_batches"'),
    ("the place-in-line counter", r'fifo_counter'),
    ("advisory locks", r"pg_advisory"),
    ("commits", r"^COMMIT$"),
)
SUBMIT_FILE_LINES = endtoend.SUBMIT_LINES


def group_of(sql, groups):
    for name, pattern in groups:
        if re.search(pattern, sql.strip()):
            return name
    return "other statements"


class Timed:
    """Every statement of the open database timed, fetches included; COPY and commits too, each
    in the first of `groups` (name, pattern) whose pattern its SQL matches."""

    def __init__(self, db, groups):
        self.db, self.groups = db, groups
        self.spent, self.calls = collections.Counter(), collections.Counter()

    def __enter__(self):
        timed = self
        real_execute, real_cursor, real_commit = self.db.execute_sql, self.db.cursor, self.db.commit

        class Cursor:
            def __init__(self, cursor, group):
                self.cursor, self.group = cursor, group

            def __getattr__(self, name):
                return getattr(self.cursor, name)

            def __iter__(self):
                return iter(self.fetchall())

            def fetchone(self):
                return timed.add(self.group, self.cursor.fetchone, count=False)

            def fetchall(self):
                return timed.add(self.group, self.cursor.fetchall, count=False)


        class Copying:
            """A cursor of the driver's own, its COPY timed (PostgreSQL)."""

            def __init__(self, cursor):
                self.cursor = cursor

            def __getattr__(self, name):
                return getattr(self.cursor, name)

            def copy_expert(self, sql, *args, **kwargs):
                return timed.add(group_of(sql, timed.groups), lambda: self.cursor.copy_expert(sql, *args, **kwargs))

        def execute_sql(sql, params=None, *args, **kwargs):
            group = group_of(sql, self.groups)
            return Cursor(self.add(group, lambda: real_execute(sql, params, *args, **kwargs)), group)

        self.db.execute_sql = execute_sql
        self.db.cursor = lambda *args, **kwargs: Copying(real_cursor(*args, **kwargs))
        self.db.commit = lambda: self.add("commits", real_commit)
        return self

    def add(self, group, call, count=True):
        started = time.perf_counter()
        try:
            return call()
        finally:
            self.spent[group] += time.perf_counter() - started
            self.calls[group] += count

    def __exit__(self, *exc):
        for name in ("execute_sql", "cursor", "commit"):
            self.db.__dict__.pop(name, None)


def seed(url):
    """200k distinct addresses in 40 user batches, written as a host writes them, admitted."""
    workloads.fresh_database(url)
    endtoend.in_child(init_db, url)
    per_file = QUEUED // FILES
    for n in range(FILES):
        workloads.host_write_batch(url, "user%d" % n, (workloads.queued_address(i)
                                                       for i in range(n * per_file, (n + 1) * per_file)))
    endtoend.in_child(endtoend.admit_everything, url)
    # As autovacuum leaves it: otherwise the first statement to read the index of rows not yet
    # admitted steps over every entry the seed's admission left there (200k), once.
    workloads.analyze(url, vacuum=True)


def init_db(url):
    open_database(url)
    database.connect()
    create_schema()
    database.close()


def run_creation_cycle(url):
    """One creation cycle filling 15 x 10k against the stub, the database connected already."""
    settings = Settings(database_url=url, api_key="sk-bench-stub", batch_size=bench.BATCH,
                        max_outstanding=bench.SLOTS, rate_limit_buffer=180)
    cycle = Cycle(App(settings, redis=None, client=bench.StubBouncer()), CREATION, "deliverable")
    create_batches(cycle)
    return cycle.report


def check_filled(report):
    assert sum(n for _, _, n in report.created) == bench.SLOTS * bench.BATCH, report.summary()


def one_cycle(url):
    """One creation cycle, every statement timed: ({group: (calls, seconds)}, seconds in all, {})."""
    db = open_database(url)
    with Timed(db, CREATION_GROUPS) as timed:
        started = time.perf_counter()
        database.connect()
        report = run_creation_cycle(url)
        seconds = time.perf_counter() - started
    database.close()
    check_filled(report)
    return {group: (timed.calls[group], timed.spent[group]) for group in timed.spent}, seconds, {}


def one_ingest(url):
    """One creation cycle (untimed), then the ingest of its 15 batches, every statement timed:
    ({group: (calls, seconds)}, seconds in all, {})."""
    db = open_database(url)
    database.connect()
    check_filled(run_creation_cycle(url))
    downloads = [(ledger.id, read_download(parse_records(json.dumps(bench.download_for(ledger.id)).encode())))
                 for ledger in batches_to_check("deliverable")]
    verified = 0
    with Timed(db, STATUS_GROUPS) as timed:
        started = time.perf_counter()
        for ledger_id, download in downloads:
            verified += ingest_download(ledger_id, download).verified
        seconds = time.perf_counter() - started
    database.close()
    assert verified == bench.SLOTS * bench.BATCH, verified
    return {group: (timed.calls[group], timed.spent[group]) for group in timed.spent}, seconds, {}


def one_submit(url):
    """One `submit` of a 5,000-line file (the bench's), every statement timed, and the syntax
    check and the stripping of its lines alone: ({group: (calls, seconds)}, seconds in all,
    {what was timed alone: seconds})."""
    with tempfile.TemporaryDirectory() as directory:
        path = workloads.write_file(os.path.join(directory, "submit.txt"), SUBMIT_FILE_LINES)
        db = open_database(url)
        with Timed(db, SUBMIT_GROUPS) as timed:
            started = time.perf_counter()
            database.connect()
            summary = create_user_batch("bench", "deliverable", read_addresses(path), source="cli")
            seconds = time.perf_counter() - started
        database.close()
        lines = [text for _, text in read_addresses(path)]
    assert summary.accepted + summary.invalid == SUBMIT_FILE_LINES, summary
    alone = {}
    started = time.perf_counter()
    valid = [text for text in lines if row_problem(text) is None]
    alone["alone: the syntax check of the 5,000 lines (email-validator)"] = time.perf_counter() - started
    started = time.perf_counter()
    for text in valid:
        strip_email_modifiers(text)
    alone["alone: the stripping of their valid addresses"] = time.perf_counter() - started
    return {group: (timed.calls[group], timed.spent[group]) for group in timed.spent}, seconds, alone


CYCLES = {"creation": (one_cycle, CREATION_GROUPS), "status": (one_ingest, STATUS_GROUPS),
          "submit": (one_submit, SUBMIT_GROUPS)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycle", choices=sorted(CYCLES), default="creation")
    parser.add_argument("--database-url", action="append", default=None)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    measure, groups = CYCLES[args.cycle]
    urls = args.database_url or ["sqlite:///%s" % os.path.join(tempfile.mkdtemp(), "statements.db")]
    seeded = {url: workloads.side_url(url, "seeded") for url in urls}
    found = {url: [] for url in urls}
    try:
        for url in urls:
            seed(url)
            workloads.snapshot(url, seeded[url])
        for rep in range(args.reps):
            for url in endtoend.in_turn(urls, rep):
                workloads.restore(seeded[url], url)
                workloads.settle(url)
                found[url].append(endtoend.in_child(measure, url))
    finally:
        for url in seeded.values():
            workloads.drop_database(url)
    print_table(found, groups)


def print_table(found, groups):
    names = [url.split(":")[0] for url in found]
    print("| step (median of %d) | %s |" % (len(next(iter(found.values()))),
                                          " | ".join("calls, ms on %s" % name for name in names)))
    print("|---|%s" % ("---:|" * len(names)))
    for group in [name for name, _ in groups] + ["other statements"]:
        cells = []
        for runs in found.values():
            calls = statistics.median(run[0].get(group, (0, 0))[0] for run in runs)
            ms = statistics.median(run[0].get(group, (0, 0))[1] * 1000 for run in runs)
            cells.append("%d, %.0f" % (calls, ms))
        print("| %s | %s |" % (group, " | ".join(cells)))
    cells, python = [], []
    for runs in found.values():
        sql = [sum(s for _, s in run[0].values()) for run in runs]
        cells.append("%.0f" % (statistics.median(sql) * 1000))
        python.append("%.0f" % (statistics.median(run[1] - s for run, s in zip(runs, sql)) * 1000))
    print("| SQL in all | %s |" % " | ".join(cells))
    print("| Python between statements | %s |" % " | ".join(python))
    print("| the step in all | %s |" % " | ".join(
        "%.0f" % (statistics.median(run[1] for run in runs) * 1000) for runs in found.values()))
    for name in next(iter(found.values()))[0][2]:
        print("| %s | %s |" % (name, " | ".join(
            "%.0f" % (statistics.median(run[2][name] for run in runs) * 1000) for runs in found.values())))


if __name__ == "__main__":
    main()
