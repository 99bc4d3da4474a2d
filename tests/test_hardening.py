"""What a probe of the running service found (hostile input, nonsense settings), each pinned by
a test that failed before its fix."""
import json
import os
import subprocess
import sys

import pytest
from clirun import invoke
from conftest import assert_clean_failure

from bouncer.store.models import UserBatch, UserBatchEmail
from support.processes import ROOT


def run(database_url, *args, input=None, **env):
    return invoke(list(args), input=input, env={"DATABASE_URL": database_url, **env})


def test_a_5_mb_line_is_neither_echoed_whole_nor_stored_whole(db, database_url, tmp_path):
    huge = "x" * (5 * 1024 * 1024)
    path = tmp_path / "leads.txt"
    path.write_text("ok@example.com\n%s@example.com\n" % huge)
    result = run(database_url, "submit", str(path), "--user", "alice", "--check-type", "deliverable")
    assert result.exit_code == 0, result.output
    assert len(result.output) + len(result.stderr) < 2000
    stored = UserBatchEmail.get(UserBatchEmail.position == 2)
    assert stored.status == "invalid" and len(stored.email) <= 330 and len(stored.failure_reason) < 300


@pytest.mark.parametrize("user", ["alice\n2026-12-01 INFO forged line", "tab\there", "x" * 201])
def test_a_user_id_with_control_characters_or_too_long_is_refused(db, database_url, user):
    result = run(database_url, "submit", "-", "--user", user, "--check-type", "deliverable",
                 input="a@example.com\n")
    line = assert_clean_failure(result, "user id")
    assert "\n" not in line.strip() and len(line) < 200
    assert UserBatch.select().count() == 0


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_semicolon_or_tab_csv_is_read_by_its_header(db, database_url, delimiter):
    body = delimiter.join(["Name", "Email", "Phone"]) + "\n" + delimiter.join(["Ann", "ann@example.com", "1"]) + "\n"
    result = run(database_url, "submit", "-", "--user", "alice", "--check-type", "deliverable", "--json",
                 input=body)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accepted"] == 1


def test_a_failing_json_command_prints_a_json_error_on_stdout(db, database_url):
    result = run(database_url, "status", "999", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"error": "no user batch with id 999"}
    assert_clean_failure(result, "no user batch")
    result = run(database_url, "submit", "-", "--user", "a", "--check-type", "deliverable", "--json", input="nope\n")
    assert json.loads(result.stdout)["error"].startswith("no valid address")


@pytest.mark.parametrize("name, value, fragment", [
    ("LOG_LEVEL", "verbose", "LOG_LEVEL="),
    ("BOUNCER_BATCH_SIZE", "200000", "at most 100000"),
    ("RESULT_CACHE_DAYS", "999999", "at most 3650"),
    ("BATCH_TIMEOUT", "99999999999", "at most"),
    ("STATUS_CHECK_INTERVAL", str(2 ** 31), "at most 86400"),
    ("PORT", "70000", "at most 65535"),
    ("REDIS_URL", "redis://localhost:99999/0", "port outside"),
    ("REDIS_URL", "redis://localhost:6379/999", "database"),
])
def test_a_setting_out_of_range_stops_every_command_in_one_line(database_url, tmp_path, name, value, fragment):
    env = dict(os.environ, DATABASE_URL=database_url, **{name: value})
    for command in (["status"], ["init-db"]):
        done = subprocess.run([sys.executable, "-m", "bouncer", *command], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert lines[0].startswith("Error: %s" % name) and fragment in lines[0] and "Traceback" not in done.stderr
