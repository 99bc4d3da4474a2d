"""Throughput against the physical limit, and credits per mailbox, with the real processes.

    python -m scripts.throughput [--processing-time 20] [--duration 90] [--skip-slots] [--skip-credits]
    python -m scripts.throughput --latency [--batches 6] [--batch-size 300]

Slot use: the sandbox completes every batch in exactly T seconds; a worker and a scheduler run
with time compressed by 600/T (a Bouncer batch taken to last 10 minutes): the status interval
is 30 s / compression, and the request budget per minute is multiplied by it too, so that it
binds as it would in real time; emails verified per second in steady state are compared with the
limit BOUNCER_MAX_OUTSTANDING x BOUNCER_BATCH_SIZE / T, first polling only, then with the
callback.

Latency (--latency, about 2 minutes, run alone): how long a user waits for results once Bouncer has
finished. Real time, the default intervals (creation every 5 s, status every 30 s), a worker pair
and a scheduler, polling only and then with the callback (PUBLIC_URL, CALLBACK_SECRET and the web
process). One user batch at a time arrives, is sent, and is completed by the sandbox at a chosen
moment, (30 + 5) / batches seconds after the previous one, so the completions fall at evenly spread
phases of both intervals. Per batch: the ledger's finished_at minus Bouncer's own `completed` time
(stored by the status cycle; checked to be the sandbox's completion moment, both naive UTC), and
the first moment a reader polling the database every 50 ms saw the user batch completed. Prints
mean and worst per mode; the per-batch values go to stderr.

Credits: user batches with cross-user repeats, Gmail spellings and case variants go through the
cycles against the sandbox; credits spent (Bouncer's count: distinct addresses per batch) are
divided by the distinct stripped addresses. Then a batch of already-verified addresses: 0.
"""
import argparse
import datetime
import os
import secrets
import sys
import tempfile
import time

import redis

from bouncer.app import App
from bouncer.config import Settings
from bouncer.cycles.runner import run_cycle
from bouncer.doors.loading import create_user_batch
from bouncer.names import CREATION, STATUS
from bouncer.sandbox import Sandbox
from bouncer.store.database import open_database
from bouncer.store.migrations import create_schema
from bouncer.store.models import BouncerBatch, EmailGlobal, UserBatch, UserBatchEmail
from support.ports import free_port, wait_for_port
from support.processes import Supervisor, service_env

SLOTS, BATCH = 15, 1000
REAL_BATCH_SECONDS = 600   # what T stands for in real time
WORKERS = 2
STOP_GRACE = 15            # seconds after SIGTERM before what is left of a process is killed
API_KEY = "sk-throughput-" + secrets.token_hex(8)
# Latency runs in real time with the default intervals.
LATENCY_CREATE_INTERVAL, LATENCY_STATUS_INTERVAL = 5, 30
LATENCY_WARM_UP = 15       # seconds for the processes to start and the scheduler to register
LATENCY_LEAD = 10          # a user batch is submitted this long before its Bouncer batch completes
READ_INTERVAL = 0.05       # how often the measurement reads, as a user would, whether results are in


def measure_slot_use(processing_time, duration, callback, redis_url, workdir):
    """Emails verified per second in steady state, and the limit."""
    url = "sqlite:///%s" % os.path.join(workdir, "slots-%s.db" % ("callback" if callback else "polling"))
    sandbox_port, web_port = free_port(), free_port()
    compression = REAL_BATCH_SECONDS / processing_time
    status_interval = max(1, round(30 / compression))
    env = service_env(url, redis_url, "http://127.0.0.1:%d" % sandbox_port, API_KEY,
                      RATE_LIMIT_BUFFER=str(int(180 * compression)),
                      RATE_LIMIT_PER_MINUTE=str(int(200 * compression)),
                      STATUS_CHECK_INTERVAL=str(status_interval), BOUNCER_BATCH_SIZE=str(BATCH),
                      BOUNCER_MAX_OUTSTANDING=str(SLOTS), PORT=str(web_port),
                      LOG_LEVEL=os.environ.get("LOG_LEVEL", "WARNING"))
    if callback:
        env.update(PUBLIC_URL="http://127.0.0.1:%d" % web_port, CALLBACK_SECRET=secrets.token_hex(16))
    open_database(url)
    create_schema()
    expected = int(SLOTS * BATCH * (duration + 2 * processing_time + 30) / processing_time)
    for start_at in range(0, expected, 50000):
        create_user_batch("bench", "deliverable", ("s%d@example.com" % i for i in
                                                  range(start_at, min(expected, start_at + 50000))))
    redis.Redis.from_url(redis_url).flushdb()
    logs = os.path.join(workdir, "slots-%s" % ("callback" if callback else "polling"))
    os.makedirs(logs, exist_ok=True)
    processes = Supervisor(logs, env)
    try:
        sandbox = processes.start("sandbox", "sandbox", "--port", sandbox_port,
                                  "--processing-time", processing_time)
        wait_for_port(sandbox_port, sandbox)
        names = ["worker"] * WORKERS + ["scheduler"] + (["web"] if callback else [])
        for i, name in enumerate(names):
            processes.start("%s-%d" % (name, i), name)
        # At least two slot turnovers after the first one (the warm-up), whatever --duration says.
        time.sleep(processing_time + 10 + max(duration, 2.5 * processing_time))
    finally:
        processes.stop_all(grace=STOP_GRACE)
    return SLOTS * BATCH / mean_slot_turnover(skip=SLOTS), SLOTS * BATCH / processing_time, status_interval


def measure_latency(callback, batches, size, redis_url, workdir):
    """Seconds from Bouncer completing a batch to its results being readable, for each batch:
    [(ledger finished_at - Bouncer's completed time, first moment a reader saw the user batch
    completed - Bouncer's completed time)], in real time with the default intervals."""
    name = "latency-%s" % ("callback" if callback else "polling")
    url = "sqlite:///%s" % os.path.join(workdir, name + ".db")
    web_port = free_port()
    # Batches complete only when told to: each at a moment chosen to fall at its own phase of
    # the status and creation intervals.
    sandbox = Sandbox(port=0, processing_time=3600).start()
    env = service_env(url, redis_url, sandbox.url, API_KEY, PORT=str(web_port),
                      BATCH_CREATE_INTERVAL=str(LATENCY_CREATE_INTERVAL),
                      STATUS_CHECK_INTERVAL=str(LATENCY_STATUS_INTERVAL),
                      LOG_LEVEL=os.environ.get("LOG_LEVEL", "INFO"))
    if callback:
        env.update(PUBLIC_URL="http://127.0.0.1:%d" % web_port, CALLBACK_SECRET=secrets.token_hex(16))
    open_database(url)
    create_schema()
    redis.Redis.from_url(redis_url).flushdb()
    logs = os.path.join(workdir, name)
    os.makedirs(logs, exist_ok=True)
    processes = Supervisor(logs, env)
    # Completions (LATENCY_STATUS_INTERVAL + LATENCY_CREATE_INTERVAL) / batches apart: their
    # phases spread evenly over both intervals.
    spacing = (LATENCY_STATUS_INTERVAL + LATENCY_CREATE_INTERVAL) / batches
    pending = {}        # user batch id: (bouncer id, completed at, epoch)
    seen = {}           # user batch id: epoch a reader first saw it completed
    try:
        names = ["worker"] * WORKERS + ["scheduler"] + (["web"] if callback else [])
        for i, process in enumerate(names):
            processes.start("%s-%d" % (process, i), process)
        if callback:
            wait_for_port(web_port, processes.running["web-%d" % (len(names) - 1)])
        first = time.time() + LATENCY_WARM_UP
        for k in range(batches):
            due = first + k * spacing
            sleep_reading(due - LATENCY_LEAD, pending, seen)
            known = set(sandbox.batches)
            summary = create_user_batch("latency", "deliverable",
                                        ("lat%d-%d@example.com" % (k, i) for i in range(size)))
            bouncer_id = wait_for_new_batch(sandbox, known, pending, seen)
            sleep_reading(due, pending, seen)
            sandbox.complete_now(bouncer_id)
            pending[summary.batch_id] = (bouncer_id, sandbox.batches[bouncer_id]["completed_at"])
        deadline = time.time() + LATENCY_STATUS_INTERVAL + 15
        while len(seen) < len(pending) and time.time() < deadline:
            sleep_reading(time.time() + 0.5, pending, seen)
    finally:
        processes.stop_all(grace=STOP_GRACE)
        sandbox.stop()
    if len(seen) < len(pending):
        raise RuntimeError("%d batch(es) not readable %ds after completing; logs in %s"
                           % (len(pending) - len(seen), LATENCY_STATUS_INTERVAL + 15, logs))
    latencies = []
    for user_batch_id, (bouncer_id, completed) in pending.items():
        ledger = BouncerBatch.get(BouncerBatch.bouncer_id == bouncer_id)
        # Bouncer's own completed time, as the status cycle stored it, is the sandbox's moment
        # (to its millisecond), in the same clock (naive UTC) as finished_at.
        as_utc = datetime.datetime.fromtimestamp(completed, datetime.timezone.utc).replace(tzinfo=None)
        if abs((ledger.bouncer_completed_at - as_utc).total_seconds()) > 0.001:
            raise RuntimeError("stored completion %s is not the sandbox's %s" % (ledger.bouncer_completed_at, as_utc))
        latencies.append(((ledger.finished_at - ledger.bouncer_completed_at).total_seconds(),
                          seen[user_batch_id] - completed))
    return latencies


def wait_for_new_batch(sandbox, known, pending, seen, timeout=30):
    """The Bouncer id of the batch created after `known`, once the creation cycle sent it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = set(sandbox.batches) - known
        if new:
            (bouncer_id,) = new
            return bouncer_id
        sleep_reading(time.time() + 0.05, pending, seen)
    raise RuntimeError("no Bouncer batch created within %ds" % timeout)


def sleep_reading(until, pending, seen):
    """Until `until` (epoch), reading the user batches whose Bouncer batch completed, as a
    user would, every READ_INTERVAL: `seen` gets the moment each is first read completed."""
    while True:
        waiting = [b for b in pending if b not in seen]
        if waiting:
            now = time.time()
            for (batch_id,) in (UserBatch.select(UserBatch.id).where(
                    UserBatch.id.in_(waiting) & (UserBatch.status == "completed")).tuples()):
                seen[batch_id] = now
        left = until - time.time()
        if left <= 0:
            return
        time.sleep(min(READ_INTERVAL, left))


def mean_slot_turnover(skip):
    """Seconds from one batch's completion to the completion of the batch that took its slot,
    averaged after the first `skip` batches. Emails per second = slots x batch size / this.
    (Counting completions in a fixed window would not do: slots turn over in waves, and a
    window catches a whole number of them.)"""
    finished = [f for (f,) in BouncerBatch.select(BouncerBatch.finished_at)
                .where(BouncerBatch.status == "completed").order_by(BouncerBatch.id).tuples()]
    turnovers = [(finished[i + SLOTS] - finished[i]).total_seconds()
                 for i in range(skip, len(finished) - SLOTS)]
    if not turnovers:
        raise RuntimeError("too few batches completed to measure; run longer")
    return sum(turnovers) / len(turnovers)


def measure_credits(redis_url, workdir):
    """(credits spent, distinct stripped addresses, credits for an already-verified batch)."""
    url = "sqlite:///%s" % os.path.join(workdir, "credits.db")
    open_database(url)
    create_schema()
    sandbox = Sandbox(port=0, processing_time=0).start()
    settings = Settings(database_url=url, redis_url=redis_url, api_key=API_KEY, api_url=sandbox.url,
                        batch_size=1000, max_outstanding=15)
    app = App(settings, redis=redis.Redis.from_url(redis_url))
    base = ["person%d@example.com" % i for i in range(3000)]
    gmail = ["first.last%d@gmail.com" % i for i in range(500)]
    try:
        create_user_batch("alice", "deliverable", base + gmail)
        create_user_batch("bob", "deliverable", [a.upper() for a in base[:1500]]
                          + ["firstlast%d+promo@googlemail.com" % i for i in range(500)]
                          + ["new%d@example.com" % i for i in range(1500)] + base[:100])
        create_user_batch("carol", "deliverable", base[1000:2000] + base[1000:1200])
        drain(app)
        spent = credits(sandbox)
        distinct = EmailGlobal.select().count()
        create_user_batch("dave", "deliverable", base[:2000] + ["FirstLast%d@gmail.com" % i for i in range(500)])
        drain(app)
        cached = credits(sandbox) - spent
    finally:
        sandbox.stop()
    return spent, distinct, cached


def drain(app):
    for _ in range(100):
        run_cycle(app, CREATION, "deliverable")
        run_cycle(app, STATUS, "deliverable")
        if not UserBatchEmail.select().where(UserBatchEmail.status.in_(("queued", "sent"))).exists():
            return
    raise RuntimeError("did not drain")


def credits(sandbox):
    """Bouncer's count: each batch costs its distinct addresses."""
    return sum(len(batch["distinct"]) for batch in sandbox.batches.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processing-time", type=float, default=20)
    parser.add_argument("--duration", type=float, default=90)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6390/13")
    parser.add_argument("--skip-slots", action="store_true")
    parser.add_argument("--skip-credits", action="store_true")
    parser.add_argument("--latency", action="store_true",
                        help="measure only the latency from Bouncer completing a batch to its results")
    parser.add_argument("--batches", type=int, default=6, help="batches per latency run")
    parser.add_argument("--batch-size", type=int, default=300, help="addresses per latency batch")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bouncer-throughput-")
    print("logs and databases in %s" % workdir, file=sys.stderr)
    if args.latency:
        print_latency(args.batches, args.batch_size, args.redis_url, workdir)
        return
    print("| measure | value | target |")
    print("|---|---|---|")
    if not args.skip_credits:
        spent, distinct, cached = measure_credits(args.redis_url, workdir)
        print("| credits per distinct stripped address | %.2f (%d / %d) | 1.00 |" % (spent / distinct, spent, distinct))
        print("| credits for 2,500 already-verified addresses | %d | 0 |" % cached)
    if not args.skip_slots:
        for callback in (False, True):
            achieved, limit, interval = measure_slot_use(args.processing_time, args.duration, callback,
                                                         args.redis_url, workdir)
            print("| slot use, %s (T=%gs, status every %ds, %d workers) | %.0f of %.0f emails/s = %.1f%% | %s |" % (
                "with callbacks" if callback else "polling", args.processing_time, interval, WORKERS,
                achieved, limit, 100 * achieved / limit, ">= 99%" if callback else ">= 95%"))
            sys.stdout.flush()


def print_latency(batches, size, redis_url, workdir):
    print("| mode | batches | mean | worst | worst seen by a reader |")
    print("|---|---|---|---|---|")
    for callback in (False, True):
        latencies = measure_latency(callback, batches, size, redis_url, workdir)
        stored = [stored for stored, _ in latencies]
        read = [read for _, read in latencies]
        print("| %s (status every %ds, creation every %ds) | %d x %d addresses | %.2f s | %.2f s | %.2f s |" % (
            "with the callback" if callback else "polling only", LATENCY_STATUS_INTERVAL,
            LATENCY_CREATE_INTERVAL, len(latencies), size, sum(stored) / len(stored), max(stored), max(read)))
        print("%s, per batch (stored/read, s): %s" % ("callback" if callback else "polling",
                                   ", ".join("%.2f/%.2f" % pair for pair in latencies)), file=sys.stderr)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
