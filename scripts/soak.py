"""A soak run of the whole system on loopback, bounded in time.

    bash scripts/soak [--duration 600] [--database-url URL] [--redis-url URL] [--workers 4]
                      [--schedulers 2] [--fault-rate 0.05] [--seed N] [--run-dir DIR]
    python -m scripts.soak ...      (the same, from the repository root)

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
The run itself lives in support/soak/, whose module doc says how each invariant is judged.
"""
import argparse
import secrets
import sys

from support.soak.run import soak
from support.soak.settings import TRANSIT_TOLERANCE


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
                        help="every this many seconds of the run, stop one worker with the cycle "
                             "it runs and start it again, by turns with SIGTERM (a deploy: the "
                             "cycle ends between steps, a call in flight finishes, the worker "
                             "exits 0) and SIGKILL (invariant 6: a reservation of the dead cycle "
                             "is abandoned after RESERVATION_TIMEOUT; its lock frees itself within "
                             "60 s); 0, the default: never")
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


def main(argv=None):
    return soak(parse_options(argv))


if __name__ == "__main__":
    sys.exit(main())
