"""`python -m bouncer <command>`: click commands, a thin layer over the library; every command has
an example.

Each command imports the modules it uses inside its function, so that a command (and `--help`)
starts without the libraries of the others. Expected failures are one line on stderr, `Error: ...`,
and exit code 1 (with `--json`, `{"error": ...}` on stdout too); a command line that does not parse
gets click's usage error and exit code 2.
"""
import gc
import json
import os
import sys

import click

from bouncer import __version__
from bouncer.errors import ConfigError, Conflict, DatabaseUnavailable, Gone, InputError, NotFound
from bouncer.names import CHECK_TYPES

EXPECTED_ERRORS = (InputError, NotFound, Gone, Conflict, ConfigError, DatabaseUnavailable)
MAX_INVALID_SHOWN = 5
INTERRUPTED = 130   # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


class Command(click.Command):
    """A command whose expected failures end as one line and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("Aborted.", err=True)
            ctx.exit(INTERRUPTED)
        except Exception as exc:
            message = failure_message(exc)
            if message is None:
                raise
            if ctx.params.get("as_json"):
                # For the program reading --json output: the error on stdout too.
                click.echo(json.dumps({"error": message}))
            raise click.ClickException(message) from None


class Commands(click.Group):
    """The commands, listed in the order they are declared (the order an operator meets them)."""
    command_class = Command

    def list_commands(self, ctx):
        return list(self.commands)


def failure_message(exc):
    """The line an expected failure is reported with, or None for a failure nobody expected."""
    return str(exc) if isinstance(exc, EXPECTED_ERRORS) else describe_failure(exc)


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
    set_aside_what_was_loaded()
    return app


def set_aside_what_was_loaded():
    """What the command has loaded by now (modules, classes, functions: 20,000 to 40,000 objects)
    lives as long as the process, so the garbage collector is told to leave it alone: its full
    passes during the work walk only what the work made. Measured as whole processes, paired
    with and without it: on PostgreSQL a creation cycle of 15 x 10k took 0.96x its time (CPU
    0.93x) and a status cycle of 150k verdicts 0.97x (CPU 0.91x); on SQLite both were the same
    within the noise."""
    gc.freeze()


# Help as wide as the terminal up to 120 columns (click's default stops at 80), so that each
# command's summary in `--help` is cut less.
HELP_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


@click.group(cls=Commands, invoke_without_command=True, context_settings=HELP_SETTINGS)
@click.version_option(__version__, message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx):
    """Bouncer verification queue: greedy batches out, verdicts back.

    Settings come from the environment (see README); `.env` is read by honcho.
    """
    if ctx.invoked_subcommand is None:   # no command named: what there is to run
        click.echo(ctx.get_help())


check_type_option = click.option(
    "--check-type", "check_types", type=click.Choice(CHECK_TYPES), multiple=True,
    help="Check type (repeatable); all of them when omitted.")


@cli.command("init-db")
def init_db():
    """Create or migrate the schema; safe to run any number of times.

    \b
    Example: python -m bouncer init-db
    """
    from bouncer.store.migrations import create_schema
    app_from_env()
    click.echo(create_schema())


@cli.command()
def release():
    """The Procfile's release step: create or migrate the schema. In Heroku's release phase
    (DYNO=release.*) it then ends, as Heroku waits for it to; anywhere else (`honcho start`, which
    runs every Procfile line as a process and stops them all when one ends) it stays up, idle,
    until it is stopped, so that the rest of the service keeps running.

    \b
    Example: python -m bouncer release
    (the Procfile's line: release: python -m bouncer release)
    """
    import signal

    from bouncer.store.migrations import create_schema
    app_from_env()
    click.echo(create_schema())
    if os.environ.get("DYNO", "").startswith("release"):
        return
    click.echo("release: schema ready; staying up while the other processes run (Ctrl-C stops)")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass


@cli.command()
@click.argument("file")
@click.option("--user", required=True, help="Who the batch belongs to.")
@click.option("--check-type", required=True, type=click.Choice(CHECK_TYPES))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object only.")
def submit(file, user, check_type, as_json):
    """Create one user batch from FILE: one address a line, or a CSV with an `email` column.
    `-` reads stdin.

    \b
    Example: python -m bouncer submit leads.csv --user alice --check-type deliverable
    """
    from bouncer.doors.loading import create_user_batch
    from bouncer.doors.reader import read_addresses
    app_from_env()
    rows = read_addresses(file)
    with submit_progress(file) as advance:
        summary = create_user_batch(user, check_type, rows, on_progress=advance, source="cli")
    if as_json:
        click.echo(json.dumps(summary.as_json()))
    else:
        click.echo("batch %s\naccepted %s\ninvalid %s\nduplicates %s" % (
            summary.batch_id, summary.accepted, summary.invalid, summary.duplicates))
    for line, text, problem in summary.invalid_examples[:MAX_INVALID_SHOWN]:
        click.echo("invalid: %s: line %s: %r: %s" % (file, line, text, problem), err=True)
    shown = min(len(summary.invalid_examples), MAX_INVALID_SHOWN)
    if summary.invalid > shown:
        click.echo("invalid: ... and %d more" % (summary.invalid - shown), err=True)


class submit_progress:
    """A progress bar on stderr when it is a terminal and the input a regular file (whose lines
    are counted first, for the bar's length); otherwise nothing."""

    def __init__(self, file):
        self.bar = None
        if file != "-" and sys.stderr.isatty() and os.path.isfile(file):
            self.bar = click.progressbar(length=count_lines(file), label="submitting", file=sys.stderr)

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
    @cli.command(name, help="%s\n\n\b\nExample: python -m bouncer %s --check-type deliverable" % (summary, name))
    @check_type_option
    def run(check_types):
        from bouncer.cycles.runner import run_cycle
        app = app_from_env()
        for check_type in check_types or CHECK_TYPES:
            click.echo(run_cycle(app, kind, check_type).summary())
    return run


create_batches = cycle_command("create-batches", "creation",
                               "Run one creation cycle now (the very code the scheduled job runs).")
check_batches = cycle_command("check-batches", "status", "Run one status cycle now: check outstanding "
                              "Bouncer batches, ingest completed ones.")


@cli.command()
@click.argument("batch_id", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def status(batch_id, as_json):
    """Progress of user batches, outstanding Bouncer batches, queued emails, rate-limit use, and
    the service's health with the reasons it is degraded: what /health says (the database,
    Redis, the jobs), and whether a worker runs. With BATCH_ID, that user batch's status instead.

    \b
    Example: python -m bouncer status 42 --json
    """
    from bouncer.reading.batches import batch_status, recent_batches
    from bouncer.reading.health import runtime_reasons, service_state
    from bouncer.store.database import connection
    app = app_from_env()
    with connection():
        if batch_id is not None:
            answer = batch_status(batch_id)
            click.echo(json.dumps(answer) if as_json else format_batch(answer))
            return
        state = service_state(app.settings)
        reasons = runtime_reasons(app) + state["reasons"]
        overview = dict(state["overview"], status="degraded" if reasons else "ok",
                        reasons=reasons, jobs=state["jobs"], paused=state["paused"],
                        user_batches=recent_batches())
    click.echo(json.dumps(overview, indent=2) if as_json else format_overview(overview))


def format_batch(b):
    counts = ", ".join("%s %d" % (k, v) for k, v in b["counts"].items() if v)
    text = "batch %s (%s, %s): %s, %d/%d done: %s" % (
        b["batch_id"], b["user_id"], b["check_type"], b["status"], b["done"], b["total"], counts)
    if b.get("rechecking"):
        text += "\n%d greylisted email(s) waiting for a re-check" % b["rechecking"]
    if b["failure_reason"]:
        text += "\nfailure: %s" % b["failure_reason"]
    if b.get("place_in_line") is not None:
        text += "\nin line: %s address(es) ahead of its next one; it goes to Bouncer %s (estimated)" % (
            format(b["place_in_line"], ","), "at about %s" % b["estimated_start_at"][:19].replace("T", " ") + " UTC"
            if b["estimated_start_at"] else "when the pace is known")
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
    lines += ["%-12s %8s %8s %10s %8s %16s" % ("check type", "new", "queued", "rechecking", "sent", "Bouncer batches")]
    for check_type, c in o["check_types"].items():
        lines.append("%-12s %8d %8d %10d %8d %12d/%-3d" % (
            check_type, c["new_emails"], c["queued_emails"], c["rechecking_emails"], c["sent_emails"],
            c["in_flight_batches"], c["max_outstanding"]))
    for check_type, c in o["check_types"].items():
        lines.append("%s credits: %d spent (%d today), %d refunded by finishes, %d on re-checks; %d batch(es) "
                     "being finished" % (check_type, c["credits_spent_total"], c["credits_spent_today"],
                                         c["credits_refunded_total"], c["credits_rechecks_total"],
                                         c["finishing_batches"]))
    lines.append("line order (QUEUE_POLICY): %s" % ", ".join(
        "%s %s" % (t, c["queue_policy"]) for t, c in o["check_types"].items()))
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


@cli.command()
@click.argument("batch_id", type=int)
@click.option("--format", "fmt", type=click.Choice(("csv", "json")), default="csv", show_default=True)
@click.option("-o", "--output", help="Write to this file (complete or not at all) instead of stdout.")
def results(batch_id, fmt, output):
    """One row per submitted row, in submission order, with its verdict.

    \b
    Example: python -m bouncer results 42 --format csv -o results.csv
    """
    from bouncer.reading.batches import batch_with_rows, iter_results
    from bouncer.store.database import connection
    app_from_env()
    with connection():
        batch_with_rows(batch_id)  # a wrong id, or pruned rows, fail before any output is started
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


@cli.command()
@click.option("--user", "user_id", metavar="USER", help="Erase every user batch of this user.")
@click.option("--email", "address", metavar="ADDRESS",
              help="Erase this address in every spelling that strips to the same mailbox.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object only.")
def forget(user_id, address, as_json):
    """Erase what the service holds of a person, on request; audited without the erased value.

    --user: every user batch of USER goes, with its rows, webhook deliveries and idempotency
    records; rows still in line or riding on a Bouncer batch are cancelled first. An address only
    this user submitted goes with its verdicts; one another user still holds stays, and is sent
    and stored under a spelling of theirs from then on.

    --email: every row holding ADDRESS, in any spelling that strips to the same mailbox, is
    blanked in place: it keeps its position, loses its address and ends `failed` with the reason
    "erased on request", so its batch's positions and counts still add up; the address goes with
    its verdicts. Pending rows are cancelled first.

    An unknown user or address, or a malformed address: one line, exit 1, nothing erased.

    \b
    Example: python -m bouncer forget --email Jane.Doe+news@gmail.com
    """
    from bouncer.services import erasure
    from bouncer.store.database import connection
    if (user_id is None) == (address is None):
        raise click.UsageError("give --user USER or --email ADDRESS, one of them")
    app = app_from_env()
    with connection():
        if user_id is not None:
            outcome = erasure.forget_user(app, user_id, who=cli_operator())
        else:
            outcome = erasure.forget_email(app, address, who=cli_operator())
    if as_json:
        click.echo(json.dumps({"erased": vars(outcome.erased), "audit": outcome.fingerprint, "note": outcome.note}))
        return
    click.echo(outcome.summary())
    click.echo("audit: %s" % (outcome.fingerprint or "kept without a hash (ERASURE_AUDIT_KEY is unset)"))
    if outcome.note:
        click.echo("note: %s" % outcome.note, err=True)


def cli_operator():
    """Who ran a command, for the audit log: the login of the process."""
    import getpass
    try:
        return "cli:%s" % getpass.getuser()
    except (KeyError, OSError):   # no name for this uid (a bare container)
        return "cli:uid %d" % os.getuid()


@cli.command()
@click.option("--older-than", "days", type=click.IntRange(min=0), metavar="DAYS",
              help="Days; default RETENTION_DAYS (0 there: rows and verdicts are kept forever).")
def prune(days):
    """Remove the rows of user batches that ended more than DAYS ago, keeping each batch's status
    and counts (its `results` then exit 1 saying so); the verdicts checked that long ago that no
    row needs; addresses left with no row and no verdict; webhook deliveries ended that long ago;
    and idempotency records past their 24 h. In short slices, safe beside running cycles: the
    daily job `retention_pruner` runs the same with RETENTION_DAYS.

    \b
    Example: python -m bouncer prune --older-than 90
    """
    from bouncer.services import erasure
    from bouncer.store.database import connection
    app = app_from_env()
    with connection():
        report = erasure.prune(app, who=cli_operator(), days=days)
    click.echo(report.summary())
# A negative WEIGHT is refused with its reason, not taken for an unknown option.
@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("user")
@click.argument("new_weight", metavar="[WEIGHT]", required=False)
def weight(user, new_weight):
    """Show USER's weight under QUEUE_POLICY=fair (1 unless set), or set it to WEIGHT (0.001 to
    1000; 2 is twice everyone's share). The rows in line take it at the next creation cycle.

    \b
    Example: python -m bouncer weight alice 3
    """
    from bouncer.queue.fairness import DEFAULT_WEIGHT, checked_user, stored_weight
    from bouncer.services.weights import set_user_weight
    from bouncer.store.database import connection
    app_from_env()
    with connection():
        if new_weight is None:
            stored = stored_weight(checked_user(user))
            click.echo("%s: weight %g" % (user, stored) if stored is not None
                       else "%s: weight %g (the default)" % (user, DEFAULT_WEIGHT))
            return
        before, after = set_user_weight(user, new_weight, who=cli_operator())
    click.echo("%s: weight %g (was %g)" % (user, after, before))


class SandboxCommand(Command):
    """The sandbox command, whose options are made from SandboxOptions' fields when it is parsed
    or its help shown, not when the commands are listed: no other command loads its options."""

    def get_params(self, ctx):
        if not self.params:
            self.params = sandbox_options()
        return super().get_params(ctx)


CLICK_TYPES = {"int": click.INT, "float": click.FLOAT, "str": click.STRING,
               "path": click.Path(dir_okay=False)}


def sandbox_options():
    """One option per field of SandboxOptions (help, kind, range and environment variable in
    each field's metadata). Ranges are checked by the dataclass itself, so a value out of range
    is one clean line, as every expected failure."""
    from dataclasses import fields

    from bouncer.sandbox.options import SandboxOptions, describe_range, flag_of
    return [click.Option([flag_of(f)], **option_settings(f, describe_range(f))) for f in fields(SandboxOptions)]


def option_settings(f, span):
    """click's settings for the option of field `f`, whose range is `span` in words. A default
    of None is not shown, so neither is a secret taken from the environment."""
    meta = f.metadata
    settings = {"type": CLICK_TYPES[meta["kind"]], "default": f.default,
                "show_default": f.default is not None,
                "help": meta["help"] + (" Range: %s." % span if span else "")}
    if meta["envvar"]:
        settings.update(envvar=meta["envvar"], show_envvar=True)
    return settings


@cli.command(cls=SandboxCommand)
def sandbox(**values):
    """A local Bouncer speaking the documented batch API, for running with no account.

    \b
    Example: python -m bouncer sandbox --port 8025 --processing-time 5 --fail-rate 0.02 --seed 7
    """
    from bouncer.logs import setup_logging
    from bouncer.sandbox import Sandbox
    from bouncer.sandbox.options import SandboxOptions
    options = SandboxOptions(**values)
    setup_logging()
    Sandbox(options).serve_forever()


@cli.command()
def worker():
    """Run an RQ worker on `bouncer-queue` (clean shutdown on SIGTERM, as Heroku and Render send).

    \b
    Example: python -m bouncer worker
    """
    from bouncer.runtime.worker import run_worker
    run_worker(app_from_env())


@cli.command()
def scheduler():
    """Register the six repeating jobs (four cycles, the webhook sender, the retention pruner),
    idempotently, then run the scheduler loop.

    \b
    Example: python -m bouncer scheduler
    """
    from bouncer.runtime.schedule import run_scheduler
    run_scheduler(app_from_env())


@cli.command()
@click.option("--port", type=int, help="Port to serve on; default $PORT or 8000.")
@click.option("--host", help="Address to listen on; default $HOST or 0.0.0.0 (every interface).")
def web(port, host):
    """Serve the operator console (/), /metrics, the HTTP API (/api/v1), /health and the Bouncer
    completion callback.

    \b
    Example: HOST=127.0.0.1 PORT=8000 python -m bouncer web
    """
    from bouncer.config import check_host
    from bouncer.web.server import serve
    app = app_from_env()
    if host is not None:
        check_host(host)
    serve(app, port or app.settings.port, host or app.settings.host)


def main():
    """`bouncer` and `python -m bouncer`: the commands, named as they were called."""
    skip_unused_drivers()
    cli.main(prog_name="bouncer" if os.path.basename(sys.argv[0]) == "bouncer" else "python -m bouncer")


# Database extensions playhouse.db_url tries to import, none of which the service uses (6 ms of a
# command's start, with their own imports).
UNUSED_EXTENSIONS = ("playhouse.apsw_ext", "playhouse.cockroachdb", "playhouse.cysqlite_ext",
                     "playhouse.mysql_ext", "playhouse.postgres_ext")


def skip_unused_drivers():
    """Mark absent, for this process, what peewee and playhouse.db_url import when installed but a
    command never uses: database extensions, and on SQLite the PostgreSQL driver (psycopg2, with
    libpq and ssl: 11 ms of a 100 ms start). Only before peewee is imported; psycopg2 only when
    DATABASE_URL names SQLite (or nothing: SQLite is the default)."""
    if "peewee" in sys.modules:
        return
    for name in UNUSED_EXTENSIONS:
        sys.modules.setdefault(name, None)
    url = os.environ.get("DATABASE_URL", "").strip().lower()
    if not url or url.startswith("sqlite"):
        sys.modules.setdefault("psycopg2", None)
