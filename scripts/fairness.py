"""Fair share against FIFO, with the real processes: how long a small batch waits behind one
user's large backlog.

    python -m scripts.fairness [--backlog 1000000] [--rate 18000000] [--small 20] [--small-size 100]
                               [--every 5] [--policies fifo,fair] [--database-url URL] [--redis-url URL]

For each policy, on a database of its own: the sandbox with Bouncer's pace (`--throughput`, an
account rate shared by the batches it processes at once, up to 25 at a time), the web process
(the API, and Bouncer's completion callback), two workers and the scheduler, all `python -m
bouncer` processes over real HTTP on loopback. One user submits a backlog (`submit` of a file of
`--backlog` distinct addresses); once it is in line, `--small` other users each submit
`--small-size` addresses over the API, one every `--every` seconds (a tenth of them addresses of
the backlog, and Gmail spellings of each other's, so that credits per address means something).
The run ends when every address has its verdict.

Time is compressed: the sandbox verifies `--rate` addresses an hour where Bouncer does about
150,000, and the intervals and the request budget are scaled alike (as scripts/throughput.py
does), so latencies are given in seconds, in slot turnovers (the mean time from one Bouncer
batch's completion to the completion of the batch that took its slot: the run's own unit of
time), and in the real time they stand for at 150,000 addresses an hour. Printed per policy: the
small batches' completion latency (submitted to completed: median, p95, worst), the slot
turnover, the whole run's throughput (addresses verified per second, from the first batch sent
to the last completed), and the credits spent per distinct stripped address.
"""
import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time

import redis
import requests

from bouncer.store.database import database, open_database
from bouncer.store.models import BouncerBatch, EmailGlobal, UserBatch, UserBatchEmail
from scripts import workloads
from support.ports import free_port, wait_for_port
from support.processes import Supervisor, service_env
from support.servers import RedisClaims

SLOTS, BATCH = 15, 10000
REAL_RATE = 150000          # addresses an hour: the middle of what Bouncer's docs say
WORKERS = 2
STOP_GRACE = 15
API_KEY = "sk-fairness-" + secrets.token_hex(8)
API_TOKEN = "tok-fairness-" + secrets.token_hex(8)
SUBMIT_TIMEOUT = 600        # seconds for the backlog's submit
DRAIN_SLACK = 3.0           # the run may take this many times its ideal length before it gives up


def run_policy(policy, args, workdir):
    """One run; returns its figures."""
    url = database_url(args.database_url, policy, workdir)
    logs = os.path.join(workdir, policy)
    os.makedirs(logs, exist_ok=True)
    sandbox_port, web_port = free_port(), free_port()
    scale = args.rate / REAL_RATE
    env = service_env(url, args.redis_url, "http://127.0.0.1:%d" % sandbox_port, API_KEY,
                      QUEUE_POLICY=policy, BOUNCER_BATCH_SIZE=str(BATCH), BOUNCER_MAX_OUTSTANDING=str(SLOTS),
                      STATUS_CHECK_INTERVAL=str(max(1, round(30 / scale))), BATCH_CREATE_INTERVAL="1",
                      RATE_LIMIT_BUFFER=str(int(180 * scale)), RATE_LIMIT_PER_MINUTE=str(int(200 * scale)),
                      PORT=str(web_port), PUBLIC_URL="http://127.0.0.1:%d" % web_port,
                      CALLBACK_SECRET=secrets.token_hex(16), API_TOKENS=API_TOKEN,
                      API_MAX_EMAILS=str(max(args.small_size, 1000)),
                      LOG_LEVEL=os.environ.get("LOG_LEVEL", "WARNING"))
    redis.Redis.from_url(args.redis_url).flushdb()
    processes = Supervisor(logs, env)
    requests_log = os.path.join(logs, "sandbox-requests.jsonl")
    try:
        assert processes.run("init-db", log="init-db").returncode == 0, processes.log_path("init-db")
        open_database(url)
        sandbox = processes.start("sandbox", "sandbox", "--port", sandbox_port, "--throughput", args.rate,
                                  "--parallel-batches", 25, "--request-log", requests_log)
        wait_for_port(sandbox_port, sandbox)
        for i, name in enumerate(["web"] + ["worker"] * WORKERS + ["scheduler"]):
            processes.start("%s-%d" % (name, i), name)
        wait_for_port(web_port, processes.running["web-0"])
        submit_backlog(processes, args.backlog, workdir)
        small = submit_small_batches(web_port, args)
        wait_until_drained(args, small, processes)
    finally:
        processes.stop_all(grace=STOP_GRACE)
    return figures(url, small, requests_log, scale)


def database_url(base, policy, workdir):
    """An empty database of the run's own: a SQLite file in `workdir`, or one beside `base`."""
    if base is None:
        return "sqlite:///%s" % os.path.join(workdir, "fairness-%s.db" % policy)
    workloads.drop_database(workloads.side_url(base, "fairness_%s" % policy))
    return workloads.side_url(base, "fairness_%s" % policy)     # made again, empty


def submit_backlog(processes, count, workdir):
    """One user's file of `count` distinct addresses, submitted as a user does."""
    path = workloads.write_file(os.path.join(workdir, "backlog.txt"), count, line=workloads.queued_address)
    started = time.monotonic()
    done = processes.run("submit", path, "--user", "big", "--check-type", "deliverable", "--json",
                         log="submit", timeout=SUBMIT_TIMEOUT)
    assert done.returncode == 0, "submit failed; see %s" % processes.log_path("submit")
    print("backlog of %s submitted in %.1f s" % (format(count, ","), time.monotonic() - started), file=sys.stderr)


def small_batch(n, size, backlog):
    """User n's addresses: its own, a tenth of them the backlog's, one a Gmail spelling of the
    user before's."""
    own = ["small%d-%d@example-%d.com" % (n, i, i % 7) for i in range(size - size // 10 - 1)]
    known = [workloads.queued_address(i * 997 % backlog) for i in range(n * size, n * size + size // 10)]
    return own + known + ["first.last%d+news@gmail.com" % (n // 2)]


def submit_small_batches(web_port, args):
    """A small batch of another user every `--every` seconds, over the API; their ids."""
    ids = []
    for n in range(args.small):
        due = time.monotonic() + args.every
        answer = requests.post("http://127.0.0.1:%d/api/v1/batches" % web_port, timeout=30,
                               headers={"Authorization": "Bearer %s" % API_TOKEN},
                               json={"user_id": "small-%02d" % n, "check_type": "deliverable",
                                     "emails": small_batch(n, args.small_size, args.backlog)})
        answer.raise_for_status()
        ids.append(answer.json()["batch_id"])
        time.sleep(max(0.0, due - time.monotonic()))
    return ids


def wait_until_drained(args, small, processes):
    """Until every row has its verdict (or the run took DRAIN_SLACK times its ideal length)."""
    ideal = 3600 * (args.backlog + args.small * args.small_size) / args.rate
    deadline = time.monotonic() + DRAIN_SLACK * ideal + 120
    while time.monotonic() < deadline:
        if processes.any_exited():
            raise RuntimeError("a process stopped: %s" % processes.exited())
        with database.connection_context():
            pending = UserBatchEmail.select().where(UserBatchEmail.status.in_(("new", "queued"))).exists()
        if not pending:
            return
        time.sleep(1)
    raise RuntimeError("the run did not drain in %.0f s; logs in %s" % (DRAIN_SLACK * ideal, processes.directory))


def figures(url, small, requests_log, scale):
    open_database(url)
    with database.connection_context():
        latencies = sorted((b.completed_at - b.created_at).total_seconds()
                           for b in UserBatch.select().where(UserBatch.id.in_(small)))
        turnover = mean_slot_turnover()
        completed = BouncerBatch.select().where(BouncerBatch.status == "completed")
        verified = sum(b.quantity for b in completed)
        span = (max(b.finished_at for b in completed) - min(b.sent_at for b in completed)).total_seconds()
        distinct = EmailGlobal.select().count()
    return {"latencies": latencies, "turnover": turnover, "throughput": verified / span, "verified": verified,
            "credits": credits_spent(requests_log), "distinct": distinct, "scale": scale}


def mean_slot_turnover():
    """Seconds from one Bouncer batch's completion to the completion of the batch that took its
    slot, averaged over the run after the first wave."""
    finished = [f for (f,) in BouncerBatch.select(BouncerBatch.finished_at)
                .where(BouncerBatch.status == "completed").order_by(BouncerBatch.finished_at).tuples()]
    turnovers = [(finished[i + SLOTS] - finished[i]).total_seconds() for i in range(SLOTS, len(finished) - SLOTS)]
    if not turnovers:
        raise RuntimeError("too few Bouncer batches to measure a slot turnover: a --backlog of 400,000 at least")
    return sum(turnovers) / len(turnovers)


def credits_spent(requests_log):
    """Bouncer's count, from the sandbox's own log: each batch created costs its distinct addresses."""
    with open(requests_log) as log:
        entries = [json.loads(line) for line in log]
    return sum(e.get("credits", 0) for e in entries if e["kind"] == "create" and e["status"] == 200)


def percentile(values, share):
    return values[min(len(values) - 1, int(round(share * (len(values) - 1))))]


def print_table(results, args):
    print("| policy | small batches' latency: median / p95 / worst | worst, in slot turnovers | worst, at %s "
          "addresses an hour | slot turnover | throughput | credits per address |" % format(REAL_RATE, ","))
    print("|---|---:|---:|---:|---:|---:|---:|")
    for policy, r in results.items():
        lat = r["latencies"]
        worst = lat[-1]
        print("| %s | %.0f / %.0f / %.0f s | %.2f | %s | %.1f s | %s addresses/s | %.2f (%s / %s) |" % (
            policy, statistics.median(lat), percentile(lat, 0.95), worst, worst / r["turnover"],
            real_time(worst * r["scale"]), r["turnover"], format(round(r["throughput"]), ","),
            r["credits"] / r["distinct"], format(r["credits"], ","), format(r["distinct"], ",")))
    if {"fifo", "fair"} <= set(results):
        ratio = results["fair"]["throughput"] / results["fifo"]["throughput"]
        print("\nThroughput, fair / fifo: %.3f. Backlog %s addresses of one user, then %d users of %d addresses, "
              "one every %g s; the sandbox verifies %s addresses an hour (%gx Bouncer's %s), %d batches at once;"
              " %d x %s per batch." % (ratio, format(args.backlog, ","), args.small, args.small_size, args.every,
                                      format(int(args.rate), ","), args.rate / REAL_RATE, format(REAL_RATE, ","),
                                      25, SLOTS, format(BATCH, ",")))


def real_time(seconds):
    return "%.0f min" % (seconds / 60) if seconds < 5400 else "%.1f h" % (seconds / 3600)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=18_000_000, help="the sandbox's addresses an hour")
    parser.add_argument("--small", type=int, default=20, help="small batches, each of another user")
    parser.add_argument("--small-size", type=int, default=100)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between two small batches")
    parser.add_argument("--policies", default="fifo,fair")
    parser.add_argument("--database-url", default=None, help="default: SQLite files in a temporary directory")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6390/0",
                        help="a Redis server; the run claims a database number of its own on it")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bouncer-fairness-")
    print("logs and databases in %s" % workdir, file=sys.stderr)
    owner = "fairness-%d" % os.getpid()
    with RedisClaims(args.redis_url) as claims:
        number = claims.claim_any(owner, seconds=3 * 3600)
        if number is None:
            raise SystemExit("no free Redis database number on %s" % args.redis_url)
        args.redis_url = "%s/%d" % (args.redis_url.rsplit("/", 1)[0], number)
        try:
            print_table(run_policies(args, workdir), args)
        finally:
            claims.release(number, owner)


def run_policies(args, workdir):
    results = {}
    for policy in args.policies.split(","):
        results[policy] = run_policy(policy, args, workdir)
        print("%s: %s" % (policy, json.dumps({k: v for k, v in results[policy].items() if k != "latencies"})),
              file=sys.stderr)
        print("%s latencies (s): %s" % (policy, " ".join("%.1f" % x for x in results[policy]["latencies"])),
              file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
