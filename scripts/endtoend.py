"""End to end: the service as a user meets it, side by side with a straightforward implementation
of the same contract (scripts/straightforward.py), on SQLite and PostgreSQL in one run.

Every step is a process of its own (`python -m bouncer ...`, `python -m scripts.straightforward
...`) talking to the sandbox over HTTP on loopback, answering at once, its peak RSS read beside
its time. The three steps of the targets (submit, a creation cycle, a status cycle) are measured
for every side of every database in turn (SQLite ours, SQLite straightforward, PostgreSQL ours,
PostgreSQL straightforward, then back the other way), each side in a database of its own made
anew for every repetition, and each timed on a quiet server (on PostgreSQL: checkpointed, no
autovacuum running; see workloads.settle). Beside each row, its floor: what the same work costs
at least (a raw bulk insert of the same rows, interpreter starts, the same HTTP requests and
`json.loads` of the same bodies). A cycle's floor adds the writes this service's schema makes it
do (rows marked sent, then done; addresses in and out of flight; verdicts), done in plain SQL on
a database `init-db` made: the bound of this design, which the straightforward one (no state per
row) does not share.

Then, per database: the large intakes (a host-written batch admitted alone and with creation
cycles beside it; a large `submit` of each side, with the raw `psql \\copy` floor on PostgreSQL; a
streamed submit to the web process), the longest wait of a creation cycle on the database during
them, and start-up imports.
"""
import json
import multiprocessing
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from scripts import workloads
from support.ports import free_port, wait_for_port
from support.processes import ROOT, Supervisor, service_env

CHECK_TYPE = "deliverable"
BATCH, SLOTS = 10000, 15
QUEUED = 200000               # the backlog a creation cycle packs from
SUBMIT_LINES = 5000           # lines in each submitted file
API_KEY = "sk-bench-" + secrets.token_hex(8)
API_TOKEN = "bench-token-" + secrets.token_hex(8)
BATCH_PATH = "/v1.1/email/verify/batch"
PROBE_PAUSE = 1.0             # seconds between two creation cycles during a large intake (the tests' interval)
COMMAND_TIMEOUT = 1800
RSS_POLL = 0.005              # seconds between two readings of a child's peak RSS


@dataclass
class Plan:
    """How much to measure: repetitions of each row and the size of the intakes."""
    reps: int = 3
    submit_files: int = 40
    large: int = 1000000
    large_reps: int = 3
    web_lines: int = 200000
    web_reps: int = 2
    import_runs: int = 5
    quick: bool = False


QUICK = Plan(reps=1, submit_files=10, large=200000, large_reps=1, web_lines=100000, web_reps=1,
             import_runs=3, quick=True)


@dataclass
class Run:
    """A process run to completion: its wall time, its peak RSS, what it printed."""
    seconds: float
    rss_mb: float
    out: str
    err: str


@dataclass
class Side:
    """One implementation: its CLI module and its own database."""
    name: str
    module: str
    url: str
    env: dict

    def command(self, *args, python_options=()):
        return [sys.executable, *python_options, "-m", self.module, *[str(a) for a in args]]

    def run(self, *args, python_options=()):
        """Run to completion, its peak RSS read meanwhile. A failure stops the bench, saying why."""
        try:
            return run_with_peak_rss(self.command(*args, python_options=python_options), self.env)
        except RuntimeError as exc:
            raise RuntimeError("%s: %s" % (self.name, exc)) from None

    def fresh(self):
        workloads.fresh_database(self.url)
        self.run("init-db")
        workloads.settle(self.url)

    @property
    def is_ours(self):
        return self.module == "bouncer"


@dataclass
class Row:
    """One line of a table: the seconds of each side and of the floor, the sides' peak RSS."""
    name: str
    key: str = ""
    values: dict = field(default_factory=lambda: {"ours": [], "straightforward": [], "floor": []})
    rss: dict = field(default_factory=lambda: {"ours": [], "straightforward": []})

    def add(self, key, value, rss=None):
        self.values[key].append(value)
        if rss is not None:
            self.rss[key].append(rss)

    def as_json(self):
        return {"name": self.name, **{side: {"seconds": self.values[side], "rss_mb": self.rss.get(side, [])}
                                      for side in self.values}}


class Bench:
    """One database: the two sides, the sandbox's port, a scratch directory."""

    def __init__(self, database_url, redis_url, plan, workdir=None):
        self.plan = plan
        self.backend = "PostgreSQL" if workloads.is_postgres_url(database_url) else "SQLite"
        self.workdir = workdir or tempfile.mkdtemp(prefix="bouncer-bench-")
        self.port = free_port()
        self.api_url = "http://127.0.0.1:%d" % self.port
        settings = dict(BOUNCER_BATCH_SIZE=str(BATCH), BOUNCER_MAX_OUTSTANDING=str(SLOTS),
                        RATE_LIMIT_BUFFER="180", LOG_LEVEL="INFO")
        self.redis_url = redis_url
        self.sides = [Side(name, module, workloads.side_url(database_url, name),
                           service_env(workloads.side_url(database_url, name), redis_url, self.api_url,
                                       API_KEY, **settings))
                      for name, module in (("ours", "bouncer"), ("straightforward", "scripts.straightforward"))]
        self.floor_url = workloads.side_url(database_url, "floor")
        self.floor_side = Side("floor", "bouncer", self.floor_url,
                               service_env(self.floor_url, redis_url, self.api_url, API_KEY, **settings))
        self.ours = self.sides[0]
        self.scratch = [side.url for side in self.sides] + [self.floor_url]   # removed by close()

    def close(self):
        for url in self.scratch:
            workloads.drop_database(url)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.workdir, name)

    def copy_of(self, url, name):
        """A database beside `url` for a snapshot, removed with the bench."""
        copy = workloads.side_url(url, name)
        self.scratch.append(copy)
        return copy

    def sandbox(self):
        from bouncer.sandbox import Sandbox
        return Sandbox(port=self.port, processing_time=0).start()

    # -- the three steps of the targets ---------------------------------------------------------

    def submit_rows(self):
        count = self.plan.submit_files
        return [Row("submit %dk lines as %d files of 5,000 (%d processes)" % (count * 5, count, count), "submit"),
                Row("floor: raw bulk insert of the %dk rows" % (count * 5)),
                Row("floor: %d bare interpreter starts" % count)]

    def submit_files(self, side, files, fresh=True):
        """Every file through `submit`, a process each, in turn: (seconds in all, largest peak
        RSS of one)."""
        if fresh:
            side.fresh()
        runs = [self.submit_file(side, path, "user%d" % n) for n, path in enumerate(files)]
        return sum(run.seconds for run in runs), max(run.rss_mb for run in runs)

    def submit_file(self, side, path, user):
        run = side.run("submit", path, "--user", user, "--check-type", CHECK_TYPE, "--json")
        answer = json.loads(run.out)
        lines = sum(1 for _ in open(path))
        if answer["accepted"] + answer["invalid"] != lines:
            raise RuntimeError("%s: submit of %s answered %s" % (side.name, path, answer))
        return run

    def submit_floors(self, rows, insert, starts):
        """The floor of a submit: a raw bulk insert of the same rows, and as many bare
        interpreter starts as processes."""
        workloads.fresh_database(self.floor_url)
        insert.add("floor", workloads.raw_bulk_insert(self.floor_url, workloads.SUBMIT_COLUMNS, rows))
        starts.add("floor", interpreter_starts(self.plan.submit_files))

    def cycle_rows(self):
        return [Row("one creation cycle filling 15 x 10k, 200k queued (1 process)", "creation"),
                Row("one status cycle: 15 statuses, 15 downloads, 150k results ingested (1 process)", "status"),
                *(Row(name) for name in FLOOR_ROWS)]

    def seed_cycles(self):
        """Every side's queue of 200k, seeded once, untimed; each repetition starts from a copy.
        Returns {side name: the copy's URL}."""
        files = workloads.write_files(self.path("queue"), QUEUED // BATCH, BATCH, workloads.queued_address)
        seeded = {}
        for side in self.sides:
            self.seed_queue(side, files)
            seeded[side.name] = self.copy_of(side.url, "seeded")
            workloads.snapshot(side.url, seeded[side.name])
        return seeded

    def seed_queue(self, side, files):
        """200k distinct addresses queued, untimed: ours written as a host writes them and
        admitted; the straightforward side through its own submit."""
        side.fresh()
        if side.is_ours:
            for n, path in enumerate(files):
                workloads.host_write_batch(side.url, "user%d" % n, (line.strip() for line in open(path)))
            in_child(admit_everything, side.url)
        else:
            in_child(submit_in_process, side.url, files)
        workloads.analyze(side.url)

    def run_cycles(self, side, seeded, rows):
        """One creation cycle and one status cycle of `side` from its seeded queue; ours adds the
        floors of both from the same sandbox."""
        creation, status, *floors = rows
        workloads.restore(seeded, side.url)
        workloads.settle(side.url)
        sandbox = self.sandbox()
        try:
            run = self.creation_cycle(side, sandbox)
            creation.add(side.name, run.seconds, run.rss_mb)
            run = self.status_cycle(side, sandbox)
            status.add(side.name, run.seconds, run.rss_mb)
            if side.is_ours:
                self.measure_loopback_floors(sandbox, dict(zip(FLOOR_ROWS, floors)))
        finally:
            sandbox.stop()

    def creation_cycle(self, side, sandbox):
        run = side.run("create-batches", "--check-type", CHECK_TYPE)
        found = re.search(r"(\d+) Bouncer batch\(es\) created \((\d+) addresses\)", run.out)
        if not found or (int(found[1]), int(found[2])) != (SLOTS, SLOTS * BATCH) \
                or sandbox.count("create") != SLOTS:
            raise RuntimeError("%s: the creation cycle did not fill 15 x 10k: %s" % (side.name, run.out))
        return run

    def status_cycle(self, side, sandbox, rows=SLOTS * BATCH):
        """One status cycle ingesting the 15 batches the sandbox holds, `rows` rows verified
        (more when repeated addresses ride along: None)."""
        ids = list(sandbox.batches)
        for batch_id in ids:   # the download bodies are made once, before the clock starts
            sandbox.answer("GET", "%s/%s/download" % (BATCH_PATH, batch_id), {"download": ["all"]},
                           API_KEY, b"")
        before = (sandbox.count("status"), sandbox.count("download"))
        run = side.run("check-batches", "--check-type", CHECK_TYPE)
        found = re.search(r"(\d+) ingested \((\d+) emails verified\)", run.out)
        calls = (sandbox.count("status") - before[0], sandbox.count("download") - before[1])
        if not found or int(found[1]) != SLOTS or int(found[2]) != (rows or max(int(found[2]), SLOTS * BATCH)) \
                or calls != (SLOTS, SLOTS):
            raise RuntimeError("%s: the status cycle did not ingest 15 batches of 10k addresses (%s calls): %s"
                               % (side.name, calls, run.out))
        return run

    def measure_loopback_floors(self, sandbox, floors):
        creates, downloads, loads = in_child(loopback_floor, self.api_url, list(sandbox.batches)[:SLOTS])
        floors[CREATE_FLOOR].add("floor", creates)
        floors[DOWNLOAD_FLOOR].add("floor", downloads)
        floors[PARSE_FLOOR].add("floor", loads)
        workloads.fresh_database(self.floor_url)
        floors[INSERT_FLOOR].add("floor", workloads.raw_bulk_insert(
            self.floor_url, workloads.RESULT_COLUMNS, workloads.result_rows(SLOTS * BATCH)))
        workloads.fresh_database(self.floor_url)
        self.floor_side.run("init-db")
        claim, ingest = workloads.queue_write_floors(self.floor_url, SLOTS, BATCH)
        floors[CLAIM_FLOOR].add("floor", claim)
        floors[INGEST_FLOOR].add("floor", ingest)

    # -- large intakes --------------------------------------------------------------------------

    def host_rows(self):
        """`plan.large` rows written by a host with plain SQL into ours' database, once, untimed:
        the URL of a copy each admission starts from."""
        rows = self.plan.large
        self.ours.fresh()
        workloads.host_write_batch(self.ours.url, "host", (workloads.submitted_line(i) for i in range(rows)))
        written = self.copy_of(self.ours.url, "hostrows")
        workloads.snapshot(self.ours.url, written)
        return written

    def measure_admission(self, written, with_cycles):
        """The host-written rows admitted by the product (the admission's own time), alone or
        with creation cycles running meanwhile in another process (they admit too)."""
        side, rows = self.ours, self.plan.large
        workloads.restore(written, side.url)
        workloads.settle(side.url)
        if not with_cycles:
            seconds, rss = in_child(admit_everything, side.url)
            return {"rows_per_s": rows / seconds, "seconds": seconds, "rss_mb": rss}
        sandbox = self.sandbox()
        try:
            with CycleProbe(side) as probe:
                admitter = Child(admit_on_signal, side.url, probe.go)
                probe.go.set()   # the admitter and the cycles start together
                seconds, rss = admitter.result()
        finally:
            sandbox.stop()
        return {"rows_per_s": rows / seconds, "seconds": seconds, "rss_mb": rss, "probe": probe.result}

    def large_file(self):
        path = self.path("large.txt")
        if not os.path.exists(path):
            workloads.write_file(path, self.plan.large)
        return path

    def measure_large_submit(self, side):
        """One `submit` of the large file, creation cycles running meanwhile in another process."""
        path = self.large_file()
        side.fresh()
        sandbox = self.sandbox()
        try:
            with CycleProbe(side) as probe:
                probe.go.set()
                run = side.run("submit", path, "--user", "large", "--check-type", CHECK_TYPE, "--json")
        finally:
            sandbox.stop()
        answer = json.loads(run.out)
        if answer["accepted"] + answer["invalid"] != self.plan.large:
            raise RuntimeError("%s: the large submit answered %s" % (side.name, answer))
        return {"rows_per_s": self.plan.large / run.seconds, "seconds": run.seconds, "rss_mb": run.rss_mb,
                "probe": probe.result}

    def measure_copy_floor(self):
        """PostgreSQL: a raw `psql \\copy` of the large file into a one-column table, same server."""
        workloads.fresh_database(self.floor_url)
        return workloads.copy_floor(self.floor_url, self.large_file())

    def measure_web_submit(self):
        """A streamed text/plain submit to the real web process; its wall time and peak RSS."""
        import requests
        side, lines = self.ours, self.plan.web_lines
        body = [("".join(workloads.submitted_line(i) + "\n" for i in range(start, min(lines, start + 5000)))
                 ).encode() for start in range(0, lines, 5000)]
        results = []
        for _ in range(self.plan.web_reps):
            side.fresh()
            port = free_port()
            processes = Supervisor(self.workdir, dict(side.env, API_TOKENS=API_TOKEN, PORT=str(port)))
            try:
                web = processes.start("web", "web")
                wait_for_port(port, web)
                started = time.perf_counter()
                response = requests.post(
                    "http://127.0.0.1:%d/api/v1/batches" % port, data=iter(body),
                    params={"user_id": "web", "check_type": CHECK_TYPE}, timeout=COMMAND_TIMEOUT,
                    headers={"Authorization": "Bearer " + API_TOKEN, "Content-Type": "text/plain"})
                seconds = time.perf_counter() - started
                answer = response.json()
                if response.status_code != 201 or answer["accepted"] + answer["invalid"] != lines:
                    raise RuntimeError("web submit answered %s: %s" % (response.status_code, answer))
                results.append({"seconds": seconds, "rss_mb": vm_hwm_mb(web.pid)})
            finally:
                processes.stop_all()
        return results

    # -- start-up -------------------------------------------------------------------------------

    def measure_imports(self):
        """Sum of the top-level imports (`python -X importtime`), and the wall time, of three
        commands: the least of several runs of each."""
        path = workloads.write_file(self.path("small.txt"), SUBMIT_LINES)
        commands = {"--help": ("--help",), "status": ("status", "--json"),
                    "submit FILE": ("submit", path, "--user", "u", "--check-type", CHECK_TYPE, "--json")}
        found = {}
        for side in self.sides:
            side.fresh()
            for label, args in commands.items():
                runs = [side.run(*args, python_options=("-X", "importtime")) for _ in range(self.plan.import_runs)]
                found["%s | %s" % (label, side.name)] = {
                    "imports": min(import_seconds(run.err) for run in runs),
                    "wall": min(run.seconds for run in runs), "rss_mb": max(run.rss_mb for run in runs)}
        return found


FLOOR_ROWS = (CREATE_FLOOR, CLAIM_FLOOR, DOWNLOAD_FLOOR, PARSE_FLOOR, INSERT_FLOOR, INGEST_FLOOR) = (
    "floor: 15 creates of 10k addresses over loopback (encode and POST)",
    "floor: this schema's writes of 15 claims in plain SQL (150k rows out of the line, 150k addresses "
    "in flight, 150k rows riding)",
    "floor: the 15 downloads alone over loopback",
    "floor: `json.loads` of the 15 download bodies",
    "floor: raw bulk insert of 150k result rows (into a bare table)",
    "floor: this schema's writes of 15 ingests in plain SQL (150k verdicts, 150k rows marked done, "
    "150k addresses out of flight, 150k rows no longer riding)")
# A cycle's floor: what it must send and receive, plus what its own schema makes it write.
CREATION_FLOORS = (CREATE_FLOOR, CLAIM_FLOOR)
STATUS_FLOORS = (DOWNLOAD_FLOOR, PARSE_FLOOR, INGEST_FLOOR)


def sum_of(*rows):
    """The floors of `rows` added up, repetition by repetition."""
    return [sum(parts) for parts in zip(*(row.values["floor"] for row in rows))]


def in_turn(items, rep):
    """`items` in order on even repetitions, the other way round on odd ones, so that neither
    side always runs first (A B A B, then B A)."""
    return list(items) if rep % 2 == 0 else list(reversed(items))


def measure_steps(benches, plan):
    """The three steps on every side of every database, in turn: {backend: [rows]}."""
    sides = [(bench, side) for bench in benches for side in bench.sides]
    files = {bench: workloads.write_files(bench.path("submit"), plan.submit_files, SUBMIT_LINES)
             for bench in benches}
    lines = workloads.submitted_rows(plan.submit_files * SUBMIT_LINES)
    submits = {bench: bench.submit_rows() for bench in benches}
    cycles = {bench: bench.cycle_rows() for bench in benches}
    seeded = {bench: bench.seed_cycles() for bench in benches}
    for rep in range(plan.reps):
        for bench, side in in_turn(sides, rep):
            submits[bench][0].add(side.name, *bench.submit_files(side, files[bench]))
        for bench in benches:
            bench.submit_floors(lines, *submits[bench][1:])
        for bench, side in in_turn(sides, rep):
            bench.run_cycles(side, seeded[bench][side.name], cycles[bench])
        progress("repetition %d of %d of the three steps" % (rep + 1, plan.reps))
    found = {}
    for bench in benches:
        submit, creation, status = submits[bench][0], cycles[bench][0], cycles[bench][1]
        submit.values["floor"] = sum_of(*submits[bench][1:])
        creation.values["floor"] = sum_of(*(row for row in cycles[bench] if row.name in CREATION_FLOORS))
        status.values["floor"] = sum_of(*(row for row in cycles[bench] if row.name in STATUS_FLOORS))
        found[bench.backend] = submits[bench] + cycles[bench]
    return found


def measure_intakes(bench):
    """The large intakes on one database, each side and each kind in turn, repetition by
    repetition: {"admission": {"alone": [...], "with_cycles": [...]}, "submit": {side: [...]},
    "copy_floor": [...], "web": [...]}."""
    plan, found = bench.plan, {"rows": bench.plan.large, "web_lines": bench.plan.web_lines}
    written = bench.host_rows()
    admission = found["admission"] = {"alone": [], "with_cycles": []}
    for rep in range(plan.large_reps):
        for with_cycles in in_turn((False, True), rep):
            admission["with_cycles" if with_cycles else "alone"].append(
                bench.measure_admission(written, with_cycles))
    progress("%s: admission of %s host-written rows" % (bench.backend, format(plan.large, ",")))
    submits, floors = {side.name: [] for side in bench.sides}, []
    found["submit"] = submits
    for rep in range(plan.large_reps):
        for side in in_turn(bench.sides, rep):
            submits[side.name].append(bench.measure_large_submit(side))
        if workloads.is_postgres_url(bench.ours.url):
            floors.append(bench.measure_copy_floor())
    if floors:
        found["copy_floor"] = floors
    progress("%s: submit of %s lines" % (bench.backend, format(plan.large, ",")))
    found["web"] = bench.measure_web_submit()
    return found


def progress(what):
    print("==> %s done at %s" % (what, time.strftime("%H:%M:%S")), file=sys.stderr, flush=True)


# -- in child processes -----------------------------------------------------------------------

def in_child(function, *args):
    """`function(*args)` in a fresh interpreter (spawned, so it inherits nothing of this one)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:   # a child that hangs is ended with the pool
        return pool.apply_async(function, args).get(timeout=COMMAND_TIMEOUT)


def wait_ready(process, ready, timeout=60):
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if not process.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("child process %s did not start (exit code %s)" % (process.name, process.exitcode))


class Child:
    """`function(*args, ready, answers)` in a fresh interpreter, started and waited for until it
    sets `ready`; `result()` is what it puts in `answers`."""

    def __init__(self, function, *args):
        context = multiprocessing.get_context("spawn")
        self.ready, self.answers = context.Event(), context.Queue()
        self.process = context.Process(target=function, args=(*args, self.ready, self.answers))
        self.process.start()
        wait_ready(self.process, self.ready)

    def result(self):
        try:
            return self.answers.get(timeout=COMMAND_TIMEOUT)
        finally:
            self.process.join(30)


def admit_everything(url):
    """Admit every new row, as the creation cycles would; (seconds, peak RSS in MB)."""
    return admitter(url)()


def admit_on_signal(url, go, ready, answers):
    """admit_everything, started when `go` is set (set `ready` once imported and connected)."""
    admit = admitter(url)
    ready.set()
    go.wait()
    answers.put(admit())


def admitter(url):
    from bouncer.doors.admission import admit
    from bouncer.queue.line import not_admitted
    from bouncer.store.database import database, open_database
    from bouncer.store.models import UserBatchEmail
    open_database(url)
    database.connect()

    def admit_all():
        started = time.perf_counter()
        admit(CHECK_TYPE)
        while UserBatchEmail.select().where(not_admitted()).exists():
            time.sleep(0.01)   # what a creation cycle is admitting meanwhile
            admit(CHECK_TYPE)
        return time.perf_counter() - started, own_vm_hwm_mb()
    return admit_all


def submit_in_process(url, files):
    from scripts import straightforward
    straightforward.open_db(url)
    for n, path in enumerate(files):
        straightforward.submit(path, "user%d" % n, CHECK_TYPE)


def loopback_floor(api_url, batch_ids):
    """Seconds for 15 creates of 10k addresses (encoded and posted), for the 15 downloads of
    the batches `batch_ids`, and for `json.loads` of their bodies: what any client pays."""
    import requests
    session = requests.Session()
    headers = {"x-api-key": API_KEY}
    started = time.perf_counter()
    for n in range(SLOTS):
        emails = [{"email": workloads.queued_address(n * BATCH + i)} for i in range(BATCH)]
        session.post(api_url + BATCH_PATH, data=json.dumps(emails), headers=headers).raise_for_status()
    creates = time.perf_counter() - started
    started = time.perf_counter()
    bodies = [session.get("%s%s/%s/download" % (api_url, BATCH_PATH, batch_id), headers=headers,
                          params={"download": "all"}).content for batch_id in batch_ids]
    downloads = time.perf_counter() - started
    started = time.perf_counter()
    for body in bodies:
        json.loads(body)
    return creates, downloads, time.perf_counter() - started


def interpreter_starts(count):
    """Seconds for `count` bare starts of this interpreter, one after another."""
    started = time.perf_counter()
    for _ in range(count):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


# -- creation cycles during a large intake ----------------------------------------------------

class CycleProbe:
    """Creation cycles in another process, one every PROBE_PAUSE seconds from when `go` is set
    until the block ends: how long the longest took, and the longest single call into the
    database inside one (a statement, a BEGIN or a COMMIT: a wait for another writer's lock
    shows there, so it bounds the longest wait), and the process's peak RSS."""

    def __init__(self, side):
        context = multiprocessing.get_context("spawn")
        self.go, self.stop, self.ready = context.Event(), context.Event(), context.Event()
        self.answers = context.Queue()
        self.process = context.Process(target=probe_cycles, args=(
            side.module, side.env, self.go, self.stop, self.ready, self.answers))
        self.result = {}

    def __enter__(self):
        self.process.start()
        wait_ready(self.process, self.ready)
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        self.result = self.answers.get(timeout=COMMAND_TIMEOUT)
        self.process.join(30)
        return False


def probe_cycles(module, env, go, stop, ready, answers):
    os.environ.update(env)
    run, database = cycle_runner(module)
    timer = StatementTimer(database)
    if module == "bouncer":
        # On SQLite a BEGIN that finds the write lock taken asks again every millisecond: the
        # whole wait, its retries and the sleeps between them, is one call.
        from bouncer.store import dialect
        dialect.begin_when_free = timer.timed("begin", dialect.begin_when_free)
    cycles, errors = [], []
    ready.set()
    go.wait()
    while not stop.is_set():
        started = time.perf_counter()
        try:
            run()
        except Exception as exc:   # a cycle that failed (a lock waited on too long) is a finding
            errors.append("%s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:120]))
        cycles.append(time.perf_counter() - started)
        stop.wait(PROBE_PAUSE)
    answers.put({"cycles": len(cycles), "longest_cycle": max(cycles, default=0.0), "longest_wait": timer.longest,
                 "longest_statement": timer.statement, "errors": errors, "rss_mb": own_vm_hwm_mb()})


def cycle_runner(module):
    """A function running one creation cycle of `module`'s implementation, and its database."""
    if module == "bouncer":
        from bouncer.app import current_app
        from bouncer.cycles.runner import run_cycle
        from bouncer.names import CREATION
        from bouncer.store.database import database
        app = current_app()
        return (lambda: run_cycle(app, CREATION, CHECK_TYPE)), database.obj
    from scripts import straightforward
    straightforward.open_db()
    sys.stdout = open(os.devnull, "w")
    return (lambda: straightforward.create_batches(CHECK_TYPE)), straightforward.db.obj


class StatementTimer:
    """The longest single call into the database (execute, BEGIN, COMMIT), and what it was."""

    def __init__(self, database):
        self.longest, self.statement = 0.0, ""
        for name in ("execute_sql", "begin", "commit"):
            setattr(database, name, self.timed(name, getattr(database, name)))

    def timed(self, name, method):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - started
                if seconds > self.longest:
                    sql = args[0] if name == "execute_sql" and args else name.upper()
                    self.longest, self.statement = seconds, " ".join(str(sql).split())[:100]
        return call


# -- memory and imports -----------------------------------------------------------------------

def vm_hwm_mb(pid):
    """A process's peak resident memory so far (VmHWM), in MB; None once it is gone."""
    try:
        with open("/proc/%d/status" % pid) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def own_vm_hwm_mb():
    return vm_hwm_mb(os.getpid())


def run_with_peak_rss(argv, env):
    """Run to completion, reading the child's VmHWM every RSS_POLL seconds (the kernel keeps it
    rising only, so the last reading is its peak but for its last moments): a Run. Not wait4's
    ru_maxrss: after fork and exec it starts from the parent's size."""
    peak = [0.0]
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, encoding="utf-8")
    done = threading.Event()

    def watch():
        while not done.wait(RSS_POLL):
            peak[0] = max(peak[0], vm_hwm_mb(child.pid) or 0.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, err = child.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()   # an unattended run goes on without it
        child.communicate()
        raise RuntimeError("%s did not end within %d s" % (" ".join(argv[2:]), COMMAND_TIMEOUT)) from None
    finally:
        done.set()
        watcher.join()
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError("%s failed (exit %s): %s" % (" ".join(argv[2:]), child.returncode, err[-2000:]))
    return Run(seconds, peak[0], out, err)


def import_seconds(importtime_output):
    """The sum of the top-level imports in `python -X importtime` output, in seconds."""
    total = 0
    for line in importtime_output.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if name.startswith(" ") and not name.startswith("  ") and cumulative.strip().isdigit():
            total += int(cumulative)
    return total / 1e6


# -- tables -----------------------------------------------------------------------------------

def spread(values, unit="s", digits=2):
    """'median unit (min-max)', or '' when nothing was measured."""
    if not values:
        return ""
    median = ("%.*f %s" % (digits, statistics.median(values), unit)).strip()
    if len(values) == 1:
        return median
    return "%s (%.*f-%.*f)" % (median, digits, min(values), digits, max(values))


def ratio(a, b):
    if not a or not b:
        return ""
    return "%.2f" % (statistics.median(a) / statistics.median(b))


def mb(values):
    """'largest MB', or '' when nothing was read."""
    return "%.0f MB" % max(values) if values else ""


def print_steps_table(backend, rows, reps):
    """The three steps and their floors on one database (rows as_json)."""
    print("\n#### %s, end to end (median of %d, min-max; peak RSS: the largest of a process)\n" % (backend, reps))
    print("| row | ours | straightforward | floor | ours / straightforward | ours / floor "
          "| straightforward / floor | ours: peak RSS | straightforward: peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ours, plain, floor = (row[side]["seconds"] for side in ("ours", "straightforward", "floor"))
        print("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            row["name"], spread(ours), spread(plain), spread(floor), ratio(ours, plain), ratio(ours, floor),
            ratio(plain, floor), mb(row["ours"]["rss_mb"]), mb(row["straightforward"]["rss_mb"])))


def print_intakes_table(backend, found):
    """The large intakes on one database (measure_intakes)."""
    rows = format(found["rows"], ",")
    print("\n#### %s, large intakes (median, min-max)\n" % backend)
    print("| intake | side | rows/s | seconds | peak RSS | creation cycles meanwhile "
          "| longest cycle | longest database call in a cycle | the probe's peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    admission = found["admission"]
    print_intake_row("admission of %s host-written rows (one batch), alone" % rows, "ours", admission["alone"])
    print_intake_row("admission of %s host-written rows (one batch), creation cycles beside it" % rows, "ours",
                     admission["with_cycles"])
    for side, runs in found["submit"].items():
        print_intake_row("`submit` of %s lines (one process)" % rows, side, runs)
    if found.get("copy_floor"):
        seconds = found["copy_floor"]
        print("| floor: psql `\\copy` of the same %s lines into a one-column table | | %s | %s | | | | | |" % (
            rows, format(round(found["rows"] / statistics.median(seconds)), ","), spread(seconds, "s", 2)))
    web = found["web"]
    seconds = [w["seconds"] for w in web]
    print("| streamed text/plain submit of %s lines over HTTP to `bouncer web` | ours | %s | %s | %s "
          "(the web process) | | | | |" % (
              format(found["web_lines"], ","), format(round(found["web_lines"] / statistics.median(seconds)), ","),
              spread(seconds, "s", 1), mb([w["rss_mb"] for w in web if w["rss_mb"]])))
    print("\nThe longest database call of a cycle holds any wait for another writer's lock (SQLite: "
          "in BEGIN IMMEDIATE or a write; PostgreSQL: a row or advisory lock):")
    for name, runs in [("admission", admission["with_cycles"])] + [("`submit`, " + side, runs)
                                                                   for side, runs in found["submit"].items()]:
        worst = max((run["probe"] for run in runs), key=lambda probe: probe["longest_wait"])
        errors = sum((run["probe"]["errors"] for run in runs), [])
        print("- %s: %.2f s in `%s`%s" % (name, worst["longest_wait"], worst["longest_statement"],
                                          "; %d cycle(s) failed: %s" % (len(errors), errors[0]) if errors else ""))


def print_intake_row(name, side, runs):
    probes = [run["probe"] for run in runs if "probe" in run]
    rates, seconds = [run["rows_per_s"] for run in runs], [run["seconds"] for run in runs]
    cells = [name, side, format(round(statistics.median(rates)), ","), spread(seconds, "s", 1),
             mb([run["rss_mb"] for run in runs])]
    if probes:
        cells += ["%d" % sum(p["cycles"] for p in probes), "%.2f s" % max(p["longest_cycle"] for p in probes),
                  "%.2f s" % max(p["longest_wait"] for p in probes), mb([p["rss_mb"] for p in probes])]
    else:
        cells += ["", "", "", ""]
    print("| %s |" % " | ".join(cells))


def print_imports_table(backend, found, runs):
    print("\n#### %s, start-up: `python -X importtime -m ...` (sum of top-level imports) and wall time\n" % backend)
    print("| command (least of %d runs) | ours: imports | ours: wall | straightforward: imports "
          "| straightforward: wall |" % runs)
    print("|---|---:|---:|---:|---:|")
    for label in ("--help", "status", "submit FILE"):
        ours, plain = found["%s | ours" % label], found["%s | straightforward" % label]
        print("| `%s` | %.0f ms | %.0f ms | %.0f ms | %.0f ms |" % (
            label, ours["imports"] * 1000, ours["wall"] * 1000, plain["imports"] * 1000, plain["wall"] * 1000))
