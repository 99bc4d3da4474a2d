"""End to end: the service as a user meets it, side by side with a straightforward implementation
of the same contract (scripts/straightforward.py), on one database.

Every step is a process of its own (`python -m bouncer ...`, `python -m scripts.straightforward
...`) talking to the sandbox over HTTP on loopback, answering at once; each row is measured for
both sides in turn (A B A B ...) in one run, each side in a database of its own made anew for
every repetition, and each timed on a quiet server (on PostgreSQL: checkpointed, no autovacuum
running; see workloads.settle). Beside each row, its floor: what the same work costs at least
(a raw bulk insert of the same rows, interpreter starts, the same HTTP requests and `json.loads`
of the same bodies). A cycle's floor adds the writes this service's schema makes it do (rows marked sent,
then done; addresses in and out of flight; verdicts), done in plain SQL on a database `init-db`
made: the bound of this design, which the straightforward one (no state per row) does not share.
"""
import contextlib
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
COMMAND_TIMEOUT = 1200


@dataclass
class Plan:
    """How much to measure: repetitions of each row and the size of the intakes."""
    reps: int = 3
    submit_files: int = 40
    large: int = 1000000
    web_lines: int = 200000
    web_reps: int = 2
    import_runs: int = 5


QUICK = Plan(reps=1, submit_files=10, large=100000, web_lines=100000, web_reps=1, import_runs=3)


@dataclass
class Side:
    """One implementation: its CLI module and its own database."""
    name: str
    module: str
    url: str
    env: dict

    def command(self, *args, python_options=()):
        return [sys.executable, *python_options, "-m", self.module, *[str(a) for a in args]]

    def run(self, *args, python_options=(), input=None):
        """Run to completion; (seconds, stdout, stderr). A failure stops the bench, saying why."""
        started = time.perf_counter()
        done = subprocess.run(self.command(*args, python_options=python_options), cwd=ROOT,
                              env=self.env, input=input, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError("%s: %s failed (exit %s): %s" % (
                self.name, " ".join(map(str, args)), done.returncode, done.stderr[-2000:]))
        return seconds, done.stdout, done.stderr

    def fresh(self):
        workloads.fresh_database(self.url)
        self.run("init-db")
        workloads.settle(self.url)

    @property
    def is_ours(self):
        return self.module == "bouncer"


@dataclass
class Row:
    """One line of a table: the measurements of each side and of the floor."""
    name: str
    values: dict = field(default_factory=lambda: {"ours": [], "straightforward": [], "floor": []})
    unit: str = "s"

    def add(self, key, value):
        self.values[key].append(value)


class Bench:
    """One run on one database: the two sides, the sandbox's port, a scratch directory."""

    def __init__(self, database_url, redis_url, plan, workdir=None):
        self.plan = plan
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

    def sandbox(self):
        from bouncer.sandbox import Sandbox
        return Sandbox(port=self.port, processing_time=0).start()

    # -- the three rows of the issue ------------------------------------------------------------

    def measure_submits(self):
        """40 files of 5,000 lines, each through `submit` as a process of its own, in turn; the
        floor: a raw bulk insert of the 200k rows, and 40 bare interpreter starts."""
        count = self.plan.submit_files
        files = workloads.write_files(self.path("submit"), count, SUBMIT_LINES)
        row = Row("submit %dk lines as %d files of 5,000 (%d processes)" % (count * 5, count, count))
        insert = Row("floor: raw bulk insert of the %dk rows" % (count * 5))
        starts = Row("floor: %d bare interpreter starts" % count)
        rows = workloads.submitted_rows(count * SUBMIT_LINES)
        for _ in range(self.plan.reps):
            for side in self.sides:
                side.fresh()
                row.add(side.name, sum(self.submit_file(side, path, "user%d" % n)[0]
                                       for n, path in enumerate(files)))
            workloads.fresh_database(self.floor_url)
            insert.add("floor", workloads.raw_bulk_insert(self.floor_url, workloads.SUBMIT_COLUMNS, rows))
            starts.add("floor", interpreter_starts(count))
        row.values["floor"] = sum_of(insert, starts)
        return [row, insert, starts]

    def submit_file(self, side, path, user):
        seconds, out, _ = side.run("submit", path, "--user", user, "--check-type", CHECK_TYPE, "--json")
        answer = json.loads(out)
        lines = sum(1 for _ in open(path))
        if answer["accepted"] + answer["invalid"] != lines:
            raise RuntimeError("%s: submit of %s answered %s" % (side.name, path, answer))
        return seconds, answer

    def measure_cycles(self):
        """One creation cycle filling 15 x 10k from 200k queued, then one status cycle ingesting
        the 15 completed batches; their floors from the same sandbox."""
        creation = Row("one creation cycle filling 15 x 10k, 200k queued (1 process)")
        status = Row("one status cycle: 15 statuses, 15 downloads, 150k results ingested (1 process)")
        floors = {name: Row(name) for name in FLOOR_ROWS}
        files = workloads.write_files(self.path("queue"), QUEUED // BATCH, BATCH, workloads.queued_address)
        seeded = {}
        for side in self.sides:   # seeded once, untimed; each repetition starts from a copy
            self.seed_queue(side, files)
            seeded[side.name] = workloads.side_url(side.url, "seeded")
            workloads.snapshot(side.url, seeded[side.name])
            self.scratch.append(seeded[side.name])
        for _ in range(self.plan.reps):
            for side in self.sides:
                workloads.restore(seeded[side.name], side.url)
                workloads.settle(side.url)
                sandbox = self.sandbox()
                try:
                    creation.add(side.name, self.creation_cycle(side, sandbox))
                    status.add(side.name, self.status_cycle(side, sandbox))
                    if side.is_ours:
                        self.measure_loopback_floors(sandbox, floors)
                finally:
                    sandbox.stop()
        creation.values["floor"] = sum_of(*(floors[name] for name in CREATION_FLOORS))
        status.values["floor"] = sum_of(*(floors[name] for name in STATUS_FLOORS))
        return [creation, status, *floors.values()]

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

    def creation_cycle(self, side, sandbox):
        seconds, out, _ = side.run("create-batches", "--check-type", CHECK_TYPE)
        found = re.search(r"(\d+) Bouncer batch\(es\) created \((\d+) addresses\)", out)
        if not found or (int(found[1]), int(found[2])) != (SLOTS, SLOTS * BATCH) \
                or sandbox.count("create") != SLOTS:
            raise RuntimeError("%s: the creation cycle did not fill 15 x 10k: %s" % (side.name, out))
        return seconds

    def status_cycle(self, side, sandbox):
        ids = list(sandbox.batches)
        for batch_id in ids:   # the download bodies are made once, before the clock starts
            sandbox.answer("GET", "%s/%s/download" % (BATCH_PATH, batch_id), {"download": ["all"]},
                           API_KEY, b"")
        before = (sandbox.count("status"), sandbox.count("download"))
        seconds, out, _ = side.run("check-batches", "--check-type", CHECK_TYPE)
        found = re.search(r"(\d+) ingested \((\d+) emails verified\)", out)
        calls = (sandbox.count("status") - before[0], sandbox.count("download") - before[1])
        if not found or (int(found[1]), int(found[2])) != (SLOTS, SLOTS * BATCH) or calls != (SLOTS, SLOTS):
            raise RuntimeError("%s: the status cycle did not ingest 15 x 10k (%s calls): %s"
                               % (side.name, calls, out))
        return seconds

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

    # -- large intakes (issue 11) ---------------------------------------------------------------

    def measure_admission(self):
        """1M rows written by a host with plain SQL, then admitted by the product (the time of
        the admission alone), creation cycles running meanwhile in another process."""
        side, rows = self.ours, self.plan.large
        side.fresh()
        workloads.host_write_batch(side.url, "host", (workloads.submitted_line(i) for i in range(rows)))
        sandbox = self.sandbox()
        try:
            with CycleProbe(side) as probe:
                admitter = Child(admit_on_signal, side.url, probe.go)
                probe.go.set()   # the admitter and the cycles start together
                seconds, rss = admitter.result()
        finally:
            sandbox.stop()
        return {"rows_per_s": rows / seconds, "seconds": seconds, "rss_mb": rss, **probe.result}

    def measure_large_submit(self, side):
        """One `submit` of 1M lines, creation cycles running meanwhile in another process."""
        path = self.path("large.txt")
        if not os.path.exists(path):
            workloads.write_file(path, self.plan.large)
        side.fresh()
        sandbox = self.sandbox()
        try:
            with CycleProbe(side) as probe:
                probe.go.set()
                seconds, rss, out = run_with_peak_rss(
                    side.command("submit", path, "--user", "large", "--check-type", CHECK_TYPE, "--json"),
                    side.env)
        finally:
            sandbox.stop()
        answer = json.loads(out)
        if answer["accepted"] + answer["invalid"] != self.plan.large:
            raise RuntimeError("%s: the large submit answered %s" % (side.name, answer))
        return {"rows_per_s": self.plan.large / seconds, "seconds": seconds, "rss_mb": rss, **probe.result}

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
                results.append((seconds, vm_hwm_mb(web.pid)))
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
                found[label, side.name] = (min(import_seconds(err) for _, _, err in runs),
                                           min(seconds for seconds, _, _ in runs))
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


# -- in child processes -----------------------------------------------------------------------

def in_child(function, *args):
    """`function(*args)` in a fresh interpreter (spawned, so it inherits nothing of this one)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


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
    shows there)."""

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
                 "longest_statement": timer.statement, "errors": errors})


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
    """Run to completion, reading the child's VmHWM every few milliseconds (the kernel keeps it
    rising only, so the last reading is its peak but for the last moments): (seconds, MB,
    stdout). Not wait4's ru_maxrss: after fork and exec it starts from the parent's size."""
    peak = [0.0]
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = threading.Event()

    def watch():
        while not done.wait(0.005):
            peak[0] = max(peak[0], vm_hwm_mb(child.pid) or 0.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = child.communicate(timeout=COMMAND_TIMEOUT)
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    if child.returncode != 0:
        raise RuntimeError("%s failed (exit %s): %s" % (" ".join(argv), child.returncode, err[-2000:]))
    return seconds, peak[0], out


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


def print_timing_table(rows):
    print("| row | ours | straightforward | floor | ours / straightforward | ours / floor "
          "| straightforward / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        v = row.values
        print("| %s | %s | %s | %s | %s | %s | %s |" % (
            row.name, spread(v["ours"]), spread(v["straightforward"]), spread(v["floor"]),
            ratio(v["ours"], v["straightforward"]), ratio(v["ours"], v["floor"]),
            ratio(v["straightforward"], v["floor"])))


def print_intake_table(large, web, lines):
    print("| intake | side | rows/s | seconds | peak RSS (MB) | creation cycles meanwhile "
          "| longest cycle (s) | longest database call in a cycle (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, side, found in large:
        notes = " (%d failed: %s)" % (len(found["errors"]), found["errors"][0]) if found["errors"] else ""
        print("| %s | %s | %s | %.1f | %.0f | %d%s | %.2f | %.2f |" % (
            name, side, format(round(found["rows_per_s"]), ","), found["seconds"], found["rss_mb"],
            found["cycles"], notes, found["longest_cycle"], found["longest_wait"]))
    seconds, rss = [s for s, _ in web], [r for _, r in web]
    print("| streamed text/plain submit of %s lines over HTTP to `bouncer web` | ours | %s | %s "
          "| %s (the web process) | | | |" % (
              format(lines, ","), format(round(lines / statistics.median(seconds)), ","),
              spread(seconds, "", 1), spread(rss, "", 0)))
    print("\nThe longest database call of a cycle holds any wait for another writer's lock (SQLite: "
          "in BEGIN IMMEDIATE or a write; PostgreSQL: a row lock):")
    for name, side, found in large:
        print("- %s (%s): %.2f s in `%s`"
              % (name.split(" (")[0], side, found["longest_wait"], found["longest_statement"]))


def print_import_table(found, runs):
    print("| command (least of %d runs) | ours: imports | ours: wall | straightforward: imports "
          "| straightforward: wall |" % runs)
    print("|---|---:|---:|---:|---:|")
    for label in ("--help", "status", "submit FILE"):
        ours, plain = found[label, "ours"], found[label, "straightforward"]
        print("| `%s` | %.0f ms | %.0f ms | %.0f ms | %.0f ms |" % (
            label, ours[0] * 1000, ours[1] * 1000, plain[0] * 1000, plain[1] * 1000))


@contextlib.contextmanager
def step(what, backend):
    """Progress on stderr: what was measured, in how long."""
    started = time.monotonic()
    yield
    print("==> %s: %s measured in %.0f s" % (backend, what, time.monotonic() - started), file=sys.stderr)


def run(database_url, redis_url, plan, backend):
    """Every end-to-end row on one database, printed as three markdown tables."""
    bench = Bench(database_url, redis_url, plan)
    try:
        measured = measure_everything(bench, plan, backend)
    finally:
        bench.close()
    print_tables(backend, plan, *measured)


def measure_everything(bench, plan, backend):
    with step("submits of %d files" % plan.submit_files, backend):
        timing = bench.measure_submits()
    with step("creation and status cycles", backend):
        timing += bench.measure_cycles()
    rows = format(plan.large, ",")
    with step("admission of %s rows" % rows, backend):
        large = [("admission of %s host-written rows (one batch)" % rows, "ours", bench.measure_admission())]
    for side in bench.sides:
        with step("submit of %s lines, %s" % (rows, side.name), backend):
            large.append(("`submit` of %s lines (one process)" % rows, side.name, bench.measure_large_submit(side)))
    with step("web submit", backend):
        web = bench.measure_web_submit()
    with step("imports", backend):
        imports = bench.measure_imports()
    return timing, large, web, imports


def print_tables(backend, plan, timing, large, web, imports):
    print("\n#### %s, end to end (median of %d, min-max)\n" % (backend, plan.reps))
    print_timing_table(timing)
    print("\n#### %s, large intakes\n" % backend)
    print_intake_table(large, web, plan.web_lines)
    print("\n#### Start-up: `python -X importtime -m ...` (sum of top-level imports) and wall time\n")
    print_import_table(imports, plan.import_runs)
    sys.stdout.flush()
