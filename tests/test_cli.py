"""`python -m bouncer`: status and results as other code and people read them, clean failures,
and an example in every command's help."""
import csv
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from clirun import invoke
from conftest import addresses, assert_clean_failure, submit
from rq import Worker

from bouncer.app import App, set_current_app
from bouncer.cli import cli, cli_operator
from bouncer.cycles.runner import run_cycle
from bouncer.doors.loading import create_user_batch
from bouncer.names import CREATION, STATUS, job_intervals
from bouncer.sandbox.simulator import build_record
from bouncer.store.database import database
from bouncer.store.schema import VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNT_KEYS = {"deliverable", "risky", "undeliverable", "unknown", "invalid", "failed", "pending"}
CONTRACT_COLUMNS = ["email", "status", "reason", "score", "accept_all", "disposable", "free", "role"]

ROWS = ["a1@example.com", "bad address", "a2@example.com", "A1@Example.com", "=cmd@example.com",
        "+plus@example.com", "-dash@example.com", "no-at-sign", "a3@example.com"]
INVALID_ROWS = {"bad address", "no-at-sign"}


def run(database_url, *args):
    return invoke([str(a) for a in args], env={"DATABASE_URL": database_url})


def ok(result):
    assert result.exit_code == 0, result.output
    assert result.exception is None
    return result.stdout


def status_json(database_url, batch_id):
    return json.loads(ok(run(database_url, "status", batch_id, "--json")))


def results_csv(database_url, batch_id, *extra):
    return list(csv.DictReader(io.StringIO(ok(run(database_url, "results", batch_id, *extra)))))


def complete_everything(app, bouncer, check_type="deliverable"):
    run_cycle(app, CREATION, check_type)
    bouncer.complete_now()
    run_cycle(app, STATUS, check_type)


# -- status --

def test_status_json_shape_queued_processing_completed(app, database_url, bouncer):
    batch_id = create_user_batch("alice", "deliverable", ROWS).batch_id
    seen = []
    for step in ("queued", "processing", "completed"):
        if step == "processing":
            run_cycle(app, CREATION, "deliverable")
        elif step == "completed":
            bouncer.complete_now()
            run_cycle(app, STATUS, "deliverable")
        answer = status_json(database_url, batch_id)
        assert {"batch_id", "user_id", "check_type", "status", "total", "done", "counts"} <= set(answer)
        assert COUNT_KEYS <= set(answer["counts"])
        assert (answer["batch_id"], answer["user_id"], answer["check_type"], answer["total"]) == (
            batch_id, "alice", "deliverable", len(ROWS))
        assert answer["status"] == step
        assert answer["counts"]["invalid"] == 2
        assert answer["done"] == len(ROWS) - answer["counts"]["pending"]
        seen.append((answer["done"], answer["counts"]["pending"]))
    assert seen == [(2, 7), (2, 7), (9, 0)]
    verdicts = sum(answer["counts"][k] for k in ("deliverable", "risky", "undeliverable", "unknown"))
    assert verdicts == 7


def test_status_json_stdout_is_one_object(app, database_url):
    batch_id = submit("alice", ["a@example.com"])
    out = ok(run(database_url, "status", batch_id, "--json"))
    assert out.count("\n") == 1 and isinstance(json.loads(out), dict)


def test_status_with_id_plain_text(app, database_url):
    batch_id = submit("alice", ["a@example.com", "bad"])
    out = ok(run(database_url, "status", batch_id))
    assert "batch %s" % batch_id in out and "alice" in out and "queued" in out and "1/2" in out
    behind = submit("bob", addresses("b", 3))
    out = ok(run(database_url, "status", behind))
    assert "in line: 1 address(es) ahead of its next one; it goes to Bouncer when the pace is known" in out


def test_status_overview_without_id(app, database_url, bouncer):
    submit("alice", addresses("a", 35))
    submit("bob", ["b@example.com"], check_type="catchall")
    run_cycle(app, CREATION, "deliverable")
    out = ok(run(database_url, "status"))
    assert "queued" in out and "Bouncer batches" in out
    assert "line order (QUEUE_POLICY): deliverable fifo, catchall fifo" in out
    assert "requests in the last 60 s: 3" in out
    assert "deliverable" in out and "catchall" in out
    assert "alice" in out and "bob" in out


def test_status_overview_empty_database(app, database_url):
    out = ok(run(database_url, "status"))
    assert "requests in the last 60 s: 0" in out


def test_status_overview_json(app, database_url, bouncer):
    submit("alice", addresses("a", 35))
    run_cycle(app, CREATION, "deliverable")
    overview = json.loads(ok(run(database_url, "status", "--json")))
    assert overview["check_types"]["deliverable"]["queued_emails"] == 5
    assert overview["check_types"]["deliverable"]["outstanding_batches"] == 3
    assert overview["rate_limit"]["requests_last_60s"] == 3
    assert len(overview["user_batches"]) == 1


def test_status_says_what_health_would_with_redis_down(app, database_url):
    set_current_app(App(app.settings.replace(redis_url="redis://127.0.0.1:1/0")))   # nothing listens there
    out = ok(run(database_url, "status"))
    assert out.startswith("service: degraded\n  - redis: unreachable\n")
    overview = json.loads(ok(run(database_url, "status", "--json")))
    assert overview["status"] == "degraded" and overview["reasons"][0] == "redis: unreachable"


def test_status_says_when_no_worker_runs_the_jobs(app, database_url, redis_conn):
    out = ok(run(database_url, "status"))
    assert out.startswith("service: degraded\n  - no worker is running: the jobs wait in Redis")
    worker = Worker(["bouncer-queue"], connection=redis_conn)
    worker.register_birth()              # a worker alive, as `python -m bouncer worker` registers one
    try:
        assert ok(run(database_url, "status")).startswith("service: ok\n")
    finally:
        worker.register_death()


@pytest.mark.parametrize("args", [["status", "999"], ["status", "999", "--json"],
                                  ["results", "999"], ["results", "999", "--format", "json"]])
def test_unknown_batch_id_exit_1_one_line(app, database_url, args):
    submit("alice", ["a@example.com"])
    result = run(database_url, *args)
    assert_clean_failure(result, "999")
    # With --json the program reading stdout gets the error as JSON too.
    assert result.stdout == ('{"error": "no user batch with id 999"}\n' if "--json" in args else "")


def test_results_unknown_batch_id_writes_no_file(app, database_url, tmp_path):
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "r.csv"
    assert_clean_failure(run(database_url, "results", 999, "-o", out), "999")
    assert os.listdir(tmp_path / "out") == []


def test_commands_on_database_without_schema_say_run_init_db(tmp_path):
    # No fixture database: the command opens DATABASE_URL itself, as in production.
    set_current_app(None)
    env = {"DATABASE_URL": "sqlite:///%s" % (tmp_path / "fresh.db")}
    try:
        for args in (["status"], ["status", "1", "--json"], ["results", "1"]):
            result = invoke(args, env=env)
            assert_clean_failure(result, "init-db")
        result = invoke(["init-db"], env=env)
        assert ok(result) == "schema created (version %d)\n" % VERSION
        assert ok(invoke(["init-db"], env=env)) == "schema up to date (version %d)\n" % VERSION
        assert "requests in the last 60 s: 0" in ok(invoke(["status"], env=env))
    finally:
        set_current_app(None)
        database.close()


# -- results --

def test_results_csv_pending_and_invalid_in_submission_order(app, database_url):
    batch_id = create_user_batch("alice", "deliverable", ROWS).batch_id
    out = ok(run(database_url, "results", batch_id))
    header = out.splitlines()[0].split(",")
    assert header[:len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["email"].lstrip("'") for r in rows] == ROWS
    assert [r["status"] for r in rows] == [
        "invalid" if r in INVALID_ROWS else "pending" for r in ROWS]
    assert all(r["reason"] for r in rows if r["status"] == "invalid")
    assert all(r["score"] == "" for r in rows)


def test_results_csv_verdicts_after_completion(app, database_url, bouncer):
    batch_id = create_user_batch("alice", "deliverable", ROWS).batch_id
    complete_everything(app, bouncer)
    rows = results_csv(database_url, batch_id, "--format", "csv")
    assert len(rows) == len(ROWS)
    for submitted, row in zip(ROWS, rows):
        assert row["email"].lstrip("'") == submitted
        if submitted in INVALID_ROWS:
            assert row["status"] == "invalid"
            continue
        record = build_record({"email": submitted.lower()})
        assert (row["status"], row["reason"], row["score"], row["accept_all"], row["disposable"],
                row["free"], row["role"]) == (record["status"], record["reason"],
                                              str(record["score"]), record["domain"]["acceptAll"],
                                              "no", "no", "no")


@pytest.mark.parametrize("address", ["=cmd@example.com", "+plus@example.com", "-dash@example.com"])
def test_results_csv_formula_like_address_gets_leading_quote(app, database_url, address):
    batch_id = create_user_batch("alice", "deliverable", ["a@example.com", address]).batch_id
    rows = results_csv(database_url, batch_id)
    assert rows[1]["email"] == "'" + address
    assert rows[1]["status"] == "pending"      # valid syntax: queued, not invalid
    assert rows[0]["email"] == "a@example.com"


def test_results_csv_at_sign_first_gets_leading_quote(app, database_url):
    # No address with valid syntax starts with `@`; the invalid row is still exported safely.
    batch_id = create_user_batch("alice", "deliverable", ["a@example.com", "@cmd"]).batch_id
    rows = results_csv(database_url, batch_id)
    assert (rows[1]["email"], rows[1]["status"]) == ("'@cmd", "invalid")


def test_results_json_list_of_objects(app, database_url, bouncer):
    batch_id = create_user_batch("alice", "deliverable", ROWS + addresses("z", 30)).batch_id
    # 10 x 3 distinct addresses go out; the rest stay pending.
    complete_everything(app, bouncer)
    out = ok(run(database_url, "results", batch_id, "--format", "json"))
    rows = json.loads(out)
    assert isinstance(rows, list) and len(rows) == len(ROWS) + 30
    assert [r["email"] for r in rows] == ROWS + addresses("z", 30)     # JSON is not quoted
    assert list(rows[0])[:len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS
    statuses = [r["status"] for r in rows]
    assert statuses.count("invalid") == 2
    assert statuses.count("pending") == 6     # 6 distinct valid + 30 = 36, 30 sent (A1 joins a1)
    done = [r for r in rows if r["status"] not in ("invalid", "pending")]
    for row in done:
        record = build_record({"email": row["email"].lower()})
        assert (row["status"], row["score"]) == (record["status"], record["score"])


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_results_output_file(app, database_url, tmp_path, fmt):
    batch_id = create_user_batch("alice", "deliverable", ROWS).batch_id
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / ("results." + fmt)
    result = run(database_url, "results", batch_id, "--format", fmt, "-o", path)
    assert ok(result) == ""
    text = path.read_text(encoding="utf-8")
    if fmt == "json":
        assert [r["email"] for r in json.loads(text)] == ROWS
    else:
        assert [r["email"].lstrip("'") for r in csv.DictReader(io.StringIO(text))] == ROWS
    assert os.listdir(path.parent) == [path.name]    # no temporary file left behind


def test_results_output_file_replaces_existing(app, database_url, tmp_path):
    batch_id = submit("alice", ["a@example.com"])
    path = tmp_path / "out.csv"
    path.write_text("old contents\n" * 100)
    ok(run(database_url, "results", batch_id, "-o", path))
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [r["email"] for r in rows] == ["a@example.com"]


def test_results_output_in_missing_directory_one_line(app, database_url, tmp_path):
    batch_id = submit("alice", ["a@example.com"])
    result = run(database_url, "results", batch_id, "-o", tmp_path / "missing" / "r.csv")
    assert_clean_failure(result, "missing")


def test_results_bad_format_is_usage_error(app, database_url):
    batch_id = submit("alice", ["a@example.com"])
    result = run(database_url, "results", batch_id, "--format", "xml")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)


# -- help --

def test_every_command_help_has_an_example():
    names = list(cli.commands)
    assert {"init-db", "submit", "create-batches", "check-batches", "status", "results",
            "worker", "scheduler", "web", "sandbox"} <= set(names)
    for name in names:
        assert "Example:" in cli.commands[name].help, name
        result = invoke([name, "--help"])
        assert result.exit_code == 0, name
        assert "Example:" in result.output, name
        assert "python -m bouncer %s" % name in " ".join(result.output.split()), name


def test_help_lists_every_command_with_its_summary():
    result = invoke(["--help"])
    assert result.exit_code == 0
    listed = {line.split()[0]: " ".join(line.split()[1:]) for line in result.output.splitlines()
              if line.startswith("  ") and line.split()}
    for name, command in cli.commands.items():
        first_words = " ".join(command.help.split()[:3])
        assert listed.get(name, "").startswith(first_words), name


def test_no_command_prints_the_help_and_exits_0():
    result = invoke([])
    assert result.exit_code == 0 and result.stdout == invoke(["--help"]).stdout


def test_scheduler_help_counts_the_jobs_it_registers():
    every = SimpleNamespace(batch_create_interval=5, status_check_interval=30)
    assert len(job_intervals(every)) == 6
    assert "six repeating jobs" in cli.commands["scheduler"].help


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(monkeypatch):
    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr("bouncer.cli.app_from_env", interrupted)
    result = invoke(["status"])
    assert (result.exit_code, result.stderr, result.stdout) == (130, "Aborted.\n", "")


def test_python_m_bouncer_help_subprocess():
    env = dict(os.environ, PYTHONPATH=ROOT)
    completed = subprocess.run([sys.executable, "-m", "bouncer", "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert "Usage: python -m bouncer" in completed.stdout
    for name in ("init-db", "submit", "status", "results", "create-batches", "check-batches"):
        assert name in completed.stdout
    assert completed.stderr == ""


@pytest.mark.parametrize("url, loaded", [("sqlite:///x.db", False), ("", False),
                                         ("postgresql://u@127.0.0.1/db", True)])
def test_a_command_on_sqlite_does_not_load_the_postgres_driver(url, loaded):
    probe = ("import sys; from bouncer.cli import skip_unused_drivers as skip; skip(); "
             "import peewee; print(peewee.psycopg2 is not None)")
    env = dict(os.environ, DATABASE_URL=url)
    completed = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == str(loaded)


# Loaded by no command below: another command's work (the cycles, Redis, Bouncer's client, the
# web stack, the sandbox itself, the API's JSON reader) or the other database's driver.
NOT_FOR_THESE_COMMANDS = (
    "redis", "rq", "rq_scheduler", "requests", "urllib3", "flask", "apiflask", "werkzeug", "jinja2",
    "waitress", "prometheus_client", "standardwebhooks", "ijson", "psycopg2",
    "bouncer.client", "bouncer.cycles", "bouncer.runtime", "bouncer.web", "bouncer.reading.history",
    "bouncer.sandbox.server", "bouncer.sandbox.simulator")
# Run as `python -m bouncer ARGS` is, writing the modules it loaded to the file named first (a
# module marked absent, as the PostgreSQL driver on SQLite, was not loaded).
MODULES_PROBE = """
import atexit, runpy, sys
out, sys.argv[1:] = sys.argv[1], sys.argv[2:]
atexit.register(lambda: open(out, "w").write("\\n".join(m for m, v in sys.modules.items() if v is not None)))
runpy.run_module("bouncer", run_name="__main__", alter_sys=True)
"""


def initialised_database_and_a_file(tmp_path):
    """The environment of a command on a SQLite database `init-db` made, and a one-line file."""
    addresses_file = tmp_path / "one.txt"
    addresses_file.write_text("a@example.com\n")
    env = dict(os.environ, PYTHONPATH=ROOT, DATABASE_URL="sqlite:///%s" % (tmp_path / "x.db"))
    init = subprocess.run([sys.executable, "-m", "bouncer", "init-db"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    return env, addresses_file


@pytest.mark.parametrize("args, loaded, not_loaded", [
    (["--help"], ["click"], ["peewee", "email_validator", "bouncer.store", "bouncer.sandbox.options"]),
    (["sandbox", "--help"], ["bouncer.sandbox.options"], ["peewee", "email_validator"]),
    # The overview asks Redis, as /health does.
    (["status", "--json"], ["peewee", "bouncer.reading.overview", "bouncer.reading.health", "redis", "rq"],
     ["email_validator", "bouncer.doors", "bouncer.cycles.ingest", "bouncer.sandbox.options"]),
    (["submit", "{file}", "--user", "u", "--check-type", "deliverable", "--json"],
     ["email_validator", "bouncer.doors.loading", "bouncer.doors.reader"],
     ["bouncer.reading", "bouncer.queue.ledger", "bouncer.runtime", "bouncer.cycles",
      "bouncer.queue.packing", "bouncer.sandbox.options"]),
])
def test_a_command_loads_only_what_it_uses(tmp_path, args, loaded, not_loaded):
    env, addresses_file = initialised_database_and_a_file(tmp_path)
    out = tmp_path / "modules.txt"
    command = [a.format(file=addresses_file) for a in args]
    completed = subprocess.run([sys.executable, "-c", MODULES_PROBE, str(out)] + command, cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    modules = set(out.read_text().split())
    assert set(loaded) <= modules
    unwanted = (set(NOT_FOR_THESE_COMMANDS) - set(loaded)) | set(not_loaded)
    assert sorted(m for m in modules if any(m == u or m.startswith(u + ".") for u in unwanted)) == []



# Run as `python -m bouncer ARGS` is, writing to the file named first how many objects the
# garbage collector had been told to leave alone when the command ended.
FROZEN_PROBE = """
import atexit, gc, runpy, sys
out, sys.argv[1:] = sys.argv[1], sys.argv[2:]
atexit.register(lambda: open(out, "w").write(str(gc.get_freeze_count())))
runpy.run_module("bouncer", run_name="__main__", alter_sys=True)
"""


def test_a_command_sets_what_it_loaded_aside_from_the_garbage_collector(tmp_path):
    """The modules a command loaded are left out of the collector's passes over its work."""
    env, addresses_file = initialised_database_and_a_file(tmp_path)
    out = tmp_path / "frozen.txt"
    completed = subprocess.run([sys.executable, "-c", FROZEN_PROBE, str(out), "submit", str(addresses_file),
                                "--user", "u", "--check-type", "deliverable"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert int(out.read_text()) > 10000   # the command's modules, classes and functions


# -- weight --

def test_weight_shows_the_default_sets_and_shows_a_users_weight_audited(db, database_url):
    from bouncer.store.models import AuditEntry, UserWeight
    assert ok(run(database_url, "weight", "alice")) == "alice: weight 1 (the default)\n"
    assert ok(run(database_url, "weight", "alice", "2.5")) == "alice: weight 2.5 (was 1)\n"
    assert ok(run(database_url, "weight", "alice")) == "alice: weight 2.5\n"
    assert ok(run(database_url, "weight", "alice", "0.5")) == "alice: weight 0.5 (was 2.5)\n"
    assert [(w.user_id, w.weight) for w in UserWeight.select()] == [("alice", 0.5)]
    assert [(a.who, a.action, a.target, a.detail) for a in AuditEntry.select().order_by(AuditEntry.id)] == [
        (cli_operator(), "weight", "user alice", "from 1 to 2.5"),
        (cli_operator(), "weight", "user alice", "from 2.5 to 0.5")]


@pytest.mark.parametrize("value,words", [("0", "out of bounds"), ("-1", "out of bounds"), ("abc", "not a number"),
                                         ("nan", "out of bounds"), ("1e9", "out of bounds")])
def test_weight_refuses_a_weight_out_of_bounds_in_one_line_writing_nothing(db, database_url, value, words):
    from bouncer.store.models import AuditEntry, UserWeight
    line = assert_clean_failure(run(database_url, "weight", "alice", value), words, "0.001", "1000")
    assert "weight" in line
    assert UserWeight.select().count() == 0 and AuditEntry.select().count() == 0
