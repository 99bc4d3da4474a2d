"""`python -m bouncer <command>`: a thin layer over the library; every command has an example.

The command line is read by the standard library's argparse: a command starts without paying
for a parser library (click took 10-18 ms of each command's imports, measured beside peewee and
email-validator), and each command imports only what it uses. Expected failures are one line on
stderr, `Error: ...`, and exit code 1; a command line that does not parse gets argparse's usage
line and exit code 2.
"""
import argparse
import json
import os
import sys
from textwrap import dedent

from bouncer import __version__
from bouncer.errors import ConfigError, DatabaseUnavailable, InputError, NotFound
from bouncer.names import CHECK_TYPES

EXPECTED_ERRORS = (InputError, NotFound, ConfigError, DatabaseUnavailable)
MAX_INVALID_SHOWN = 5
COMMANDS = {}   # name -> Command, in the order `--help` lists them


class Command:
    """One command: its function (the docstring is its help, the first line its summary) and
    its arguments, `(flags, argparse settings)` pairs, or a function giving them when they cost
    something to build (the sandbox's come from its options' dataclass)."""

    def __init__(self, name, run, arguments):
        self.name, self.run, self.arguments = name, run, arguments
        self.help = cleandoc(run.__doc__)
        self.summary = self.help.split("\n\n", 1)[0].replace("\n", " ")

    def add_to(self, subparsers):
        parser = subparsers.add_parser(self.name, help=shortened(self.summary), description=self.help,
                                       formatter_class=Formatter)
        arguments = self.arguments() if callable(self.arguments) else self.arguments
        for flags, settings in arguments:
            parser.add_argument(*flags, **settings)
        parser.set_defaults(command=self)
        return parser


def cleandoc(doc):
    """A docstring without its indentation (inspect's cleandoc would cost its import, 9 ms)."""
    first, _, rest = doc.strip("\n").partition("\n")
    return (first.strip() + "\n" + dedent(rest)).strip()


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help as written in the docstrings, as wide as the terminal. The width is read here, not
    by argparse's default (which imports shutil for it when any argument is added: 4 ms)."""

    def __init__(self, prog, **settings):
        settings.setdefault("width", terminal_width() - 2)
        super().__init__(prog, **settings)


def terminal_width():
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 80


def command(name, *arguments):
    """Register the decorated function as the command `name`, taking `arguments`."""
    def register(run):
        COMMANDS[name] = Command(name, run, arguments[0] if arguments and callable(arguments[0]) else arguments)
        return run
    return register


def argument(*flags, **settings):
    if "help" in settings:
        settings["help"] = literal(settings["help"])
    return flags, settings


def literal(text):
    """Help text as argparse prints it: it %-formats help, so a `%` of ours is doubled."""
    return text.replace("%", "%%")


def shortened(summary, width=60):
    summary = summary if len(summary) <= width else summary[:width - 3].rsplit(" ", 1)[0] + "..."
    return literal(summary)


def build_parser(prog, wanted=None):
    """The parser; only the command `wanted` gets its arguments built (the others are listed,
    by name and summary), so that no command pays for building another's."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=Formatter,
        description=cleandoc("""
            Bouncer verification queue: greedy batches out, verdicts back.

            Settings come from the environment (see README); `.env` is read by honcho."""))
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, each in COMMANDS.items():
        if name == wanted:
            each.add_to(subparsers)
        else:
            subparsers.add_parser(name, help=shortened(each.summary), formatter_class=Formatter)
    return parser


def main(args=None):
    """Run the command line `args` (sys.argv's when None); exits with the command's code."""
    skip_unused_postgres_driver()
    args = sys.argv[1:] if args is None else [str(a) for a in args]
    prog = "bouncer" if os.path.basename(sys.argv[0]) == "bouncer" else "python -m bouncer"
    wanted = next((a for a in args if not a.startswith("-")), None)
    parser = build_parser(prog, wanted if wanted in COMMANDS else None)
    options = vars(parser.parse_args(args))
    chosen = options.pop("command", None)
    if chosen is None:   # no command named: what there is to run
        parser.print_help()
        return
    try:
        chosen.run(**options)
    except KeyboardInterrupt:
        print("Aborted.", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        message = str(exc) if isinstance(exc, EXPECTED_ERRORS) else describe_failure(exc)
        if message is None:
            raise
        if options.get("as_json"):
            # For the program reading --json output: the error on stdout too.
            print(json.dumps({"error": message}))
        print("Error: %s" % message, file=sys.stderr)
        sys.exit(1)


def describe_failure(exc):
    """One line for a database or Redis failure, or None for anything else. Only libraries the
    command already imported are asked: a command that never touched Redis cannot fail in it."""
    if "peewee" in sys.modules:
        from peewee import InterfaceError, OperationalError, ProgrammingError
        if isinstance(exc, (OperationalError, ProgrammingError, InterfaceError)):
            return describe_database_error(exc)
    if "redis" in sys.modules:
        from redis.exceptions import RedisError
        if isinstance(exc, RedisError):
            return "Redis is not reachable (REDIS_URL): %s" % exc
    return None


def describe_database_error(exc):
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "no such table" in text or ("relation" in text and "does not exist" in text):
        return "the database has no schema yet: run `python -m bouncer init-db` (%s)" % text
    return "database error: %s" % text


def app_from_env():
    from bouncer.app import current_app
    from bouncer.logs import setup_logging
    app = current_app()
    setup_logging(app.settings)
    return app


CHECK_TYPE_CHOICE = argument("--check-type", dest="check_types", action="append", choices=CHECK_TYPES,
                             help="Check type (repeatable); all of them when omitted.")
JSON_FLAG = argument("--json", dest="as_json", action="store_true", help="Print one JSON object only.")


@command("init-db")
def init_db():
    """Create or migrate the schema; safe to run any number of times.

    Example: python -m bouncer init-db
    """
    from bouncer.store.migrations import create_schema
    app_from_env()
    print(create_schema())


@command("release")
def release():
    """The Procfile's release step: create or migrate the schema. In Heroku's release phase
    (DYNO=release.*) it then ends, as Heroku waits for it to; anywhere else (`honcho start`, which
    runs every Procfile line as a process and stops them all when one ends) it stays up, idle,
    until it is stopped, so that the rest of the service keeps running.

    Example: python -m bouncer release     (the Procfile's line: release: python -m bouncer release)
    """
    import signal

    from bouncer.store.migrations import create_schema
    app_from_env()
    print(create_schema(), flush=True)
    if os.environ.get("DYNO", "").startswith("release"):
        return
    print("release: schema ready; staying up while the other processes run (Ctrl-C stops)", flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass


@command("submit",
         argument("file", help="The file; `-` reads stdin."),
         argument("--user", required=True, help="Who the batch belongs to."),
         argument("--check-type", required=True, choices=CHECK_TYPES),
         JSON_FLAG)
def submit(file, user, check_type, as_json):
    """Create one user batch from FILE: one address a line, or a CSV with an `email` column.
    `-` reads stdin.

    Example: python -m bouncer submit leads.csv --user alice --check-type deliverable
    """
    from bouncer.doors.loading import create_user_batch
    from bouncer.doors.reader import read_addresses
    app_from_env()
    rows = read_addresses(file)
    with submit_progress(file) as advance:
        summary = create_user_batch(user, check_type, rows, on_progress=advance, source="cli")
    if as_json:
        print(json.dumps(summary.as_json()))
    else:
        print("batch %s\naccepted %s\ninvalid %s\nduplicates %s" % (
            summary.batch_id, summary.accepted, summary.invalid, summary.duplicates))
    for line, text, problem in summary.invalid_examples[:MAX_INVALID_SHOWN]:
        print("invalid: %s: line %s: %r: %s" % (file, line, text, problem), file=sys.stderr)
    shown = min(len(summary.invalid_examples), MAX_INVALID_SHOWN)
    if summary.invalid > shown:
        print("invalid: ... and %d more" % (summary.invalid - shown), file=sys.stderr)


class submit_progress:
    """A progress bar on stderr when it is a terminal and the input a regular file (click's, so
    only a submit at a terminal imports click)."""

    def __init__(self, file):
        self.bar = None
        if file != "-" and sys.stderr.isatty() and os.path.isfile(file):
            from click import progressbar
            self.bar = progressbar(length=count_lines(file), label="submitting", file=sys.stderr)

    def __enter__(self):
        if self.bar is None:
            return None
        bar = self.bar.__enter__()
        return bar.update

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def count_lines(path):
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) or 1


def cycle_command(name, kind, summary):
    """A command running one cycle of `kind` now, the very code the scheduled job runs."""
    def run(check_types):
        from bouncer.cycles.runner import run_cycle
        app = app_from_env()
        for check_type in check_types or CHECK_TYPES:
            print(run_cycle(app, kind, check_type).summary(), flush=True)
    run.__doc__ = "%s\n\nExample: python -m bouncer %s --check-type deliverable" % (summary, name)
    return command(name, CHECK_TYPE_CHOICE)(run)


create_batches = cycle_command("create-batches", "creation",
                               "Run one creation cycle now (the very code the scheduled job runs).")
check_batches = cycle_command("check-batches", "status", "Run one status cycle now: check outstanding "
                              "Bouncer batches, ingest completed ones.")


@command("status",
         argument("batch_id", type=int, nargs="?", help="One user batch's status instead."),
         argument("--json", dest="as_json", action="store_true", help="Machine-readable output on stdout."))
def status(batch_id, as_json):
    """Progress of user batches, outstanding Bouncer batches, queued emails, rate-limit use, and
    the jobs' health with the reasons it is degraded (as /health says, Redis aside).

    Example: python -m bouncer status 42 --json
    """
    from bouncer.reading.batches import batch_status, recent_batches
    from bouncer.reading.health import service_state
    from bouncer.store.database import connection
    app = app_from_env()
    with connection():
        if batch_id is not None:
            answer = batch_status(batch_id)
            print(json.dumps(answer) if as_json else format_batch(answer))
            return
        state = service_state(app.settings)
        overview = dict(state["overview"], status="degraded" if state["reasons"] else "ok",
                        reasons=state["reasons"], jobs=state["jobs"], paused=state["paused"],
                        user_batches=recent_batches())
    print(json.dumps(overview, indent=2) if as_json else format_overview(overview))


def format_batch(b):
    counts = ", ".join("%s %d" % (k, v) for k, v in b["counts"].items() if v)
    text = "batch %s (%s, %s): %s, %d/%d done: %s" % (
        b["batch_id"], b["user_id"], b["check_type"], b["status"], b["done"], b["total"], counts)
    if b["failure_reason"]:
        text += "\nfailure: %s" % b["failure_reason"]
    hook = b.get("webhook")
    if hook:
        text += "\nwebhook %s: %s after %d attempt(s)%s" % (
            hook["event"], hook["state"], hook["attempts"],
            "; last: %s" % (hook["last_error"] or "HTTP %s" % hook["last_status"]) if hook["attempts"] and
            hook["state"] != "delivered" else "")
    return text


def format_overview(o):
    lines = ["service: %s" % o["status"]] + ["  - %s" % reason for reason in o["reasons"]]
    lines += ["%s: batch creation paused (%s)" % (t, p["reason"]) for t, p in o["paused"].items()]
    lines += ["%-12s %8s %8s %8s %16s" % ("check type", "new", "queued", "sent", "Bouncer batches")]
    for check_type, c in o["check_types"].items():
        lines.append("%-12s %8d %8d %8d %12d/%-3d" % (
            check_type, c["new_emails"], c["queued_emails"], c["sent_emails"],
            c["in_flight_batches"], c["max_outstanding"]))
    r = o["rate_limit"]
    lines.append("requests in the last 60 s: %d (buffer %d, Bouncer's limit %d)" % (
        r["requests_last_60s"], r["buffer"], r["bouncer_limit"]))
    if o["possible_orphans"]:
        lines.append("possible orphan batches at Bouncer: %d" % o["possible_orphans"])
    lines.append("")
    lines.append("%6s  %-16s %-11s %-10s %s" % ("batch", "user", "check type", "status", "done/total"))
    for b in o["user_batches"]:
        lines.append("%6d  %-16s %-11s %-10s %d/%d" % (
            b["batch_id"], b["user_id"][:16], b["check_type"], b["status"], b["done"], b["total"]))
    return "\n".join(lines)


@command("results",
         argument("batch_id", type=int),
         argument("--format", dest="fmt", choices=("csv", "json"), default="csv", help="Default: csv."),
         argument("-o", "--output", help="Write to this file (complete or not at all) instead of stdout."))
def results(batch_id, fmt, output):
    """One row per submitted row, in submission order, with its verdict.

    Example: python -m bouncer results 42 --format csv -o results.csv
    """
    from bouncer.reading.batches import get_user_batch, iter_results
    from bouncer.store.database import connection
    app_from_env()
    with connection():
        get_user_batch(batch_id)  # a wrong id fails before any output is started
        if output:
            write_atomically(output, lambda stream: write_results(stream, iter_results(batch_id), fmt))
        else:
            write_results(sys.stdout, iter_results(batch_id), fmt)


def write_results(stream, rows, fmt):
    from bouncer.reading.batches import results_csv
    if fmt == "json":
        stream.write("[")
        for i, row in enumerate(rows):
            stream.write(("," if i else "") + "\n" + json.dumps(row, ensure_ascii=False))
        stream.write("\n]\n")
        return
    for piece in results_csv(rows):
        stream.write(piece)


def write_atomically(path, write):
    import tempfile
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError("%s: is a directory; name a file to write" % path)
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".results-")
    except OSError as exc:
        raise InputError("%s: cannot write here: %s" % (path, exc.strerror or exc)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as stream:
            write(stream)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


ARGUMENT_TYPES = {"int": int, "float": float, "str": str, "path": str}


def sandbox_arguments():
    """One argument per field of SandboxOptions (help, kind, range and environment variable in
    each field's metadata). Ranges are checked by the dataclass itself, so a value out of range
    is one clean line, as every expected failure."""
    from dataclasses import fields

    from bouncer.sandbox.options import SandboxOptions, describe_range, flag_of
    found = []
    for f in fields(SandboxOptions):
        meta, span = f.metadata, describe_range(f)
        notes = ["Range: %s." % span] if span else []
        default = f.default
        if meta["envvar"]:
            default = os.environ.get(meta["envvar"], default)
            notes.append("[env var: %s]" % meta["envvar"])
        if f.default is not None:
            notes.append("[default: %s]" % f.default)
        found.append(argument(flag_of(f), dest=f.name, type=ARGUMENT_TYPES[meta["kind"]], default=default,
                              metavar=meta["kind"].upper(),
                              help=" ".join([meta["help"]] + notes)))
    return found


@command("sandbox", sandbox_arguments)
def sandbox(**values):
    """A local Bouncer speaking the documented batch API, for running with no account.

    Example: python -m bouncer sandbox --port 8025 --processing-time 5 --fail-rate 0.02 --seed 7
    """
    from bouncer.logs import setup_logging
    from bouncer.sandbox import Sandbox
    from bouncer.sandbox.options import SandboxOptions
    options = SandboxOptions(**values)
    setup_logging()
    Sandbox(options).serve_forever()


@command("worker")
def worker():
    """Run an RQ worker on `bouncer-queue` (clean shutdown on SIGTERM, as Heroku and Render send).

    Example: python -m bouncer worker
    """
    from bouncer.runtime.worker import run_worker
    run_worker(app_from_env())


@command("scheduler")
def scheduler():
    """Register the four repeating jobs (idempotently), then run the scheduler loop.

    Example: python -m bouncer scheduler
    """
    from bouncer.runtime.schedule import run_scheduler
    run_scheduler(app_from_env())


@command("web", argument("--port", type=int, help="Port to serve on; default $PORT or 8000."))
def web(port):
    """Serve the operator console (/), /metrics, the HTTP API (/api/v1), /health and the Bouncer
    completion callback.

    Example: PORT=8000 python -m bouncer web
    """
    from bouncer.web.server import serve
    app = app_from_env()
    serve(app, port or app.settings.port)


def skip_unused_postgres_driver():
    """On SQLite a command never talks to PostgreSQL, yet peewee imports psycopg2 (and with it
    libpq and ssl, 11 ms of a 100 ms start) whenever it is installed: it is marked absent for
    this process, so peewee passes it by. Only before peewee is imported, and only when
    DATABASE_URL names SQLite (or nothing: SQLite is the default)."""
    url = os.environ.get("DATABASE_URL", "").strip().lower()
    if (not url or url.startswith("sqlite")) and "peewee" not in sys.modules:
        sys.modules.setdefault("psycopg2", None)
