"""The end of a soak run: what the database holds, the one table, whether the run passed, and
whether a secret reached any file of the run."""
import collections
import re

from peewee import fn

from bouncer.sandbox import parse_route, request_kind
from bouncer.store.models import BouncerBatch, UserBatch, UserBatchEmail
from support import invariants
from support.soak.records import iso
from support.soak.settings import (
    CHECK_TYPES, DRAIN_LIMIT, FIFO_SAME_CYCLE, INVARIANTS, MAX_OUTSTANDING, RATE_LIMIT_BUFFER, SERVICE_NAMES,
)

RULE = "=" * 78


def database_counts():
    """What the table shows of the database, read once everything stopped."""
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
        "followed": {b for (b,) in BouncerBatch.select(BouncerBatch.bouncer_id).where(
            BouncerBatch.bouncer_id.is_null(False) & BouncerBatch.status.not_in(("abandoned", "rejected"))).tuples()},
        "user_batches": collections.Counter(s for (s,) in UserBatch.select(UserBatch.status).tuples()),
    }


class Table:
    """Lines of `label value`, the labels in one column."""

    def __init__(self):
        self.lines = []

    def line(self, label, value):
        self.lines.append("%-36s %s" % (label, value))

    def text(self):
        return "\n".join(self.lines)


def report(run, leaks):
    """The table, and whether the run passed."""
    table = Table()
    table.lines.append(RULE)
    for describe in (describe_run, describe_emails, describe_batches, describe_requests,
                     describe_pace):
        describe(table, run)
    describe_verdicts(table, run, leaks)
    table.lines.append(RULE)
    list_violations(table, run)
    return table.text(), passed(run, leaks)


def passed(run, leaks):
    return not run.violations.any() and not leaks and exits_ok(run) and not run.checker.crashes


def describe_run(table, run):
    options = run.options
    backend = ("PostgreSQL" if options.database_url and "postgres" in options.database_url
               else "SQLite")
    table.line("soak run", "%s s, %s, %d workers, %d schedulers, fault rate %s, seed %d" % (
        options.duration, backend, options.workers, options.schedulers, options.fault_rate,
        options.seed))
    table.line("run directory", run.dir)


def describe_emails(table, run):
    submissions, counts = run.submitter.snapshot(), run.counts
    rows = counts["rows"]
    table.line("emails submitted", "%d rows in %d user batches (%d through the CLI); %d accepted, "
               "%d duplicates" % (sum(s.rows for s in submissions), len(submissions),
                                  sum(1 for s in submissions if s.via == "cli"),
                                  sum(s.accepted for s in submissions),
                                  sum(s.duplicates for s in submissions)))
    table.line("mailboxes", "%d distinct among the accepted rows; %d addresses in batches Bouncer "
               "accepted" % (counts["mailboxes"], counts["addresses_sent"]))
    if run.submitter.errors.summary():
        table.line("submissions that failed", run.submitter.errors.summary())
    table.line("emails verified", rows["done"])
    table.line("emails failed", rows["failed"])
    for reason, number in counts["failed"].most_common():
        table.line("  %d x" % number, reason)
    expected_invalid = sum(s.expected_invalid for s in submissions)
    table.line("emails invalid", "%d (%d invalid rows generated)" % (rows["invalid"], expected_invalid))
    table.line("emails still pending", rows["queued"] + rows["sent"])


def describe_batches(table, run):
    counts, ledger = run.counts, run.counts["ledger"]
    table.line("user batches", ", ".join("%s %d" % item for item in sorted(counts["user_batches"].items())))
    table.line("Bouncer batches created", "%d (completed %d, failed %d, still outstanding %d)" % (
        counts["stored_ids"], ledger["completed"], ledger["failed"], ledger["outstanding"]))
    table.line("Bouncer calls rejected", ledger["rejected"])
    if run.killer.kills:
        table.line("workers stopped and restarted", ", ".join(
            "%d %s %s" % (count, signal_name, moment)
            for (signal_name, moment), count in sorted(collections.Counter(run.killer.kills).items())))
        table.line("exit codes after SIGTERM", ", ".join(map(str, run.killer.term_exits)) or "-")
    abandoned = counts["abandoned"]
    table.line("abandoned (possible orphans)", "%d%s" % (len(abandoned), (
        ", sizes " + ", ".join(map(str, abandoned))) if abandoned else ""))
    created = {e["batch_id"]: e["credits"] for e in run.checker.requests.entries if e.get("batch_id")}
    orphans = {b: credits for b, credits in created.items() if b not in counts["followed"]}
    spent = sum(created.values())
    table.line("orphans (created at the sandbox, not followed)", "%d of %d batches; %d extra credits of %d "
               "spent = %.2f%%" % (len(orphans), len(created), sum(orphans.values()), spent,
                                   100.0 * sum(orphans.values()) / spent if spent else 0.0))


def describe_requests(table, run):
    entries = run.checker.requests.entries
    kinds = collections.Counter(kind_of(e) for e in entries)
    faults = collections.Counter(e["fault"] for e in entries if e["fault"])
    arrivals = [e["time"] for e in entries]
    busiest, busiest_start = invariants.max_requests_in_window(arrivals)
    strictly_over = len(invariants.requests_over_budget(arrivals, RATE_LIMIT_BUFFER))
    table.line("faults injected", ", ".join("%s %d" % item for item in sorted(faults.items())) or "none")
    table.line("requests by kind", ", ".join("%s %d" % (k, kinds[k])
                                             for k in ("create", "status", "download", "finish", "delete",
                                                       "other")))
    table.line("max in flight (ledger / sampled)", ", ".join(
        "%s %d / %d of %d" % (t, run.max_history[t], run.checker.max_sampled[t], MAX_OUTSTANDING)
        for t in CHECK_TYPES))
    table.line("max requests in a rolling 60 s", "%d at the sandbox%s, %d counted by the service; "
               "buffer %d" % (busiest, " (from %s)" % iso(busiest_start) if busiest_start else "",
                              run.tracker_max, RATE_LIMIT_BUFFER))
    table.line("  arrivals over it in a strict 60 s", "%d (invariant 4 allows %g s of transit: "
               "--transit-tolerance)" % (strictly_over, run.options.transit_tolerance))


def kind_of(entry):
    """create, status, download, finish, delete or other: what a request of the sandbox's log asked for."""
    return request_kind(entry["method"], parse_route(entry["path"])[0])


def describe_pace(table, run):
    table.line("completion callbacks accepted", callbacks_answered(run.dir))
    table.line("health samples", ", ".join("%s: %d" % (k, v) for k, v in sorted(
        run.health.statuses.items(), key=lambda item: str(item[0]))) or "none")
    table.line("queue empty after last submission", "%.0f s" % run.drained if run.drained is not None
               else "never, within the run and %d s after it" % DRAIN_LIMIT)
    longest, window = longest_creation_cycle(run.dir), FIFO_SAME_CYCLE.total_seconds()
    table.line("longest creation cycle", "%.1f s (FIFO excuse window %d s%s)" % (
        longest, window, "" if longest < window else ": TOO SHORT, FIFO verdict unsure"))


def describe_verdicts(table, run, leaks):
    for number, name in INVARIANTS.items():
        found = run.violations.count(number)
        table.line("invariant %d (%s)" % (number, name), "VIOLATED (%d)" % found if found else "held")
    table.line("secrets in logs and /health", "LEAKED: " + "; ".join(leaks) if leaks else "none")
    table.line("process exits", describe_exits(run))
    if run.checker.errors.summary():
        table.line("checks that could not run", run.checker.errors.summary())


def list_violations(table, run):
    for number in INVARIANTS:
        for when, message in run.violations.examples(number):
            table.lines.append("invariant %d at %s: %s" % (number, iso(when), message))
    if run.violations.any():
        table.lines.append("every violation: %s" % (run.dir / "violations.log"))


def exits_ok(run):
    """Whether every service process (not the sandbox) exited 0 when asked to stop, at the end
    and in the middle of the run alike."""
    return all(code == 0 for name, code in run.services.exit_codes.items()
               if name.startswith(SERVICE_NAMES)) and all(code == 0 for code in run.killer.term_exits)


def describe_exits(run):
    if exits_ok(run) and not run.checker.crashes:
        return "all 0 after SIGTERM"
    stops = ["%s: %s" % item for item in sorted(run.services.exit_codes.items())
             if item[0].startswith(SERVICE_NAMES) and item[1] != 0]
    stops += ["a worker stopped mid-run: %s" % code for code in run.killer.term_exits if code != 0]
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
    return len(re.findall(r"POST /bouncer/callback/\*\*\* 202", path.read_text(errors="replace")))


def leaked_secrets(run, report_text=""):
    """Files of the run directory (logs, request log, /health answers, the soak's own output)
    holding the API key or the callback secret, and the report itself."""
    secrets = ((run.api_key, "API key"), (run.callback_secret, "callback secret"))
    leaks = []
    for path in sorted(run.dir.iterdir()):
        if path.is_file() and not path.name.startswith("soak.db"):
            data = path.read_bytes()
            leaks += ["%s holds the %s" % (path.name, what) for secret, what in secrets
                      if secret.encode() in data]
    leaks += ["the report holds the %s" % what for secret, what in secrets if secret in report_text]
    return leaks
