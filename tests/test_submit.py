"""Submitting user batches, through the library and through `python -m bouncer submit`:
counts, file formats, invalid rows, and bad input that writes nothing (invariant 8)."""
import datetime
import json
import os
import pty
import subprocess
import sys

import pytest
from clirun import invoke
from conftest import assert_clean_failure

import bouncer.store.dialect
from bouncer.cycles.runner import run_cycle
from bouncer.doors.admission import SLICE
from bouncer.doors.loading import create_user_batch
from bouncer.errors import InputError
from bouncer.names import CREATION
from bouncer.states import RowState
from bouncer.store.models import EmailGlobal, UserBatch, UserBatchEmail


def row_counts():
    return {"user_batches": UserBatch.select().count(),
            "user_batch_emails": UserBatchEmail.select().count(),
            "emails_global": EmailGlobal.select().count()}


def stored_rows(batch_id):
    """(position, email, status) of one batch, in submission order."""
    return list(UserBatchEmail.select(UserBatchEmail.position, UserBatchEmail.email,
                                      UserBatchEmail.status)
                .where(UserBatchEmail.batch == batch_id)
                .order_by(UserBatchEmail.position).tuples())


def run_submit(database_url, *args, input=None):
    return invoke(["submit", *args], input=input, env={"DATABASE_URL": database_url})


def submit_file(database_url, path, *extra, user="alice", check_type="deliverable"):
    return run_submit(database_url, str(path), "--user", user, "--check-type", check_type, *extra)


def submitted_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write_bytes(tmp_path, data, name="emails.txt"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- the library --

def test_create_user_batch_counts_accepted_invalid_duplicates(db):
    summary = create_user_batch("alice", "deliverable",
                                ["a@x.com", "A@X.com", "not an address", "b@x.com", "a@x.com"])
    assert summary.as_json() == {"batch_id": summary.batch_id, "accepted": 4, "invalid": 1,
                                 "duplicates": 2}
    assert stored_rows(summary.batch_id) == [
        (1, "a@x.com", RowState.QUEUED), (2, "A@X.com", RowState.QUEUED), (3, "not an address", RowState.INVALID),
        (4, "b@x.com", RowState.QUEUED), (5, "a@x.com", RowState.QUEUED)]
    batch = UserBatch.get_by_id(summary.batch_id)
    assert (batch.user_id, batch.check_type, batch.status, batch.total, batch.invalid,
            batch.duplicates) == ("alice", "deliverable", "queued", 5, 1, 2)


@pytest.mark.parametrize("emails, duplicates", [
    (["john.doe@gmail.com", "johndoe@gmail.com", "J.O.H.N.Doe+promo@googlemail.com"], 2),
    (["first+a@outlook.com", "first+b@outlook.com", "first@outlook.com"], 2),
    (["a+x@example.com", "a+y@example.com"], 0),           # other domains keep their +tags
    (["a.b@example.com", "ab@example.com"], 0),            # and their dots
    (["x@example.com", "y@example.com", "z@example.com"], 0),
])
def test_create_user_batch_duplicates_use_stripped_address(db, emails, duplicates):
    summary = create_user_batch("alice", "deliverable", emails)
    assert (summary.accepted, summary.duplicates) == (len(emails), duplicates)
    assert EmailGlobal.select().count() == len(emails) - duplicates


@pytest.mark.parametrize("rows", [SLICE, 2 * SLICE])
def test_a_batch_of_whole_slices_counts_its_duplicates_too(db, rows):
    emails = ["u%d@example.com" % i for i in range(rows - 1)] + ["U0@Example.com"]
    summary = create_user_batch("alice", "deliverable", emails)
    assert (summary.accepted, summary.duplicates) == (rows, 1)
    assert UserBatch.get_by_id(summary.batch_id).duplicates == 1


def test_create_user_batch_invalid_rows_stored_with_reason_and_line(db):
    summary = create_user_batch("alice", "catchall",
                                [(2, "ok@example.com"), (5, "bad..dots@example.com"), (9, "")])
    assert summary.invalid == 2
    assert [line for line, _, _ in summary.invalid_examples] == [5, 9]
    rows = list(UserBatchEmail.select().where(UserBatchEmail.status == RowState.INVALID)
                .order_by(UserBatchEmail.position))
    assert [r.email for r in rows] == ["bad..dots@example.com", ""]
    assert all(r.failure_reason and r.email_global_id is None and r.completed_at for r in rows)
    assert all(r.check_type == "catchall" for r in rows)


def test_create_user_batch_checks_each_valid_address_once(db, monkeypatch):
    import bouncer.doors.admission
    checked = []
    real = bouncer.doors.admission.row_problem
    monkeypatch.setattr(bouncer.doors.admission, "row_problem", lambda text: checked.append(text) or real(text))
    emails = ["a%d@example.com" % n for n in range(bouncer.doors.admission.SLICE + 5)] + ["not an address"]
    summary = create_user_batch("alice", "deliverable", emails)
    assert (summary.accepted, summary.invalid) == (len(emails) - 1, 1)
    # once each as it is written, and the invalid one again at admission for its reason
    assert sorted(checked) == sorted(emails + ["not an address"])
    assert UserBatchEmail.get(UserBatchEmail.email == "not an address").failure_reason
    assert UserBatchEmail.select().where(UserBatchEmail.status == RowState.QUEUED).count() == len(emails) - 1


def test_create_user_batch_global_rows_shared_across_batches(db):
    create_user_batch("alice", "deliverable", ["Shared@Example.com", "a@example.com"])
    create_user_batch("bob", "catchall", ["shared@example.com"])
    assert EmailGlobal.select().count() == 2
    ids = {r.email_global_id for r in UserBatchEmail.select()
           if r.email.lower() == "shared@example.com"}
    assert len(ids) == 1


def test_create_user_batch_times_are_utc(db):
    summary = create_user_batch("alice", "deliverable", ["a@example.com", "bad"])
    now = datetime.datetime.utcnow()
    batch = UserBatch.get_by_id(summary.batch_id)
    assert abs(batch.created_at - now) < datetime.timedelta(seconds=60)
    assert abs(EmailGlobal.get().created_at - now) < datetime.timedelta(seconds=60)
    invalid = UserBatchEmail.get(UserBatchEmail.status == RowState.INVALID)
    assert abs(invalid.completed_at - now) < datetime.timedelta(seconds=60)


@pytest.mark.parametrize("user, check_type, emails, fragment", [
    ("alice", "bogus", ["a@example.com"], "unknown check type"),
    ("", "deliverable", ["a@example.com"], "user"),
    ("  ", "deliverable", ["a@example.com"], "user"),
    ("alice", "deliverable", [], "empty"),
    ("alice", "deliverable", ["bad", "worse@", ""], "no valid address"),
])
def test_create_user_batch_refused_writes_nothing(db, user, check_type, emails, fragment):
    before = row_counts()
    with pytest.raises(InputError, match=fragment):
        create_user_batch(user, check_type, emails)
    assert row_counts() == before


def test_create_user_batch_failure_midway_writes_nothing(db):
    create_user_batch("bob", "deliverable", ["kept@example.com"])
    before = row_counts()

    def rows():
        for i in range(12000):                     # past two SUBMIT_CHUNKs of 5,000
            yield "user%d@example.com" % i
        raise InputError("emails.txt: line 12001: broken")

    with pytest.raises(InputError, match="line 12001"):
        create_user_batch("alice", "deliverable", rows())
    assert row_counts() == before


# -- the CLI: formats --

FORMATS = {
    "text": b"a@example.com\nb@example.com\nc@example.com\n",
    "text_no_final_newline": b"a@example.com\nb@example.com\nc@example.com",
    "crlf": b"a@example.com\r\nb@example.com\r\nc@example.com\r\n",
    "bom": b"\xef\xbb\xbfa@example.com\nb@example.com\nc@example.com\n",
    "bom_crlf": b"\xef\xbb\xbfa@example.com\r\nb@example.com\r\nc@example.com\r\n",
    "blank_lines": b"\n\na@example.com\n\n   \nb@example.com\n\t\nc@example.com\n\n",
    "surrounding_spaces": b"  a@example.com  \n\tb@example.com\nc@example.com \n",
    "csv_email_only": b"email\na@example.com\nb@example.com\nc@example.com\n",
    "csv_Email_among_others": b"name,Email,company\nAnn,a@example.com,Acme\n"
                              b"Bo,b@example.com,\"Big, Inc\"\nCy,c@example.com,Co\n",
    "csv_EMAIL_last": b"id,name,EMAIL\n1,Ann,a@example.com\n2,Bo,b@example.com\n3,Cy,c@example.com\n",
    "csv_bom_crlf_blank": b"\xef\xbb\xbf\"Name\",\"E-Mail Id\",\" email \"\r\n"
                          b"Ann,x,a@example.com\r\n\r\nBo,y,b@example.com\r\n,,\r\nCy,z,c@example.com\r\n",
    "csv_quoted_multiline": b"email,note\na@example.com,\"two\nlines\"\nb@example.com,x\n"
                            b"\"c@example.com\",y\n",
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_submit_file_formats(app, database_url, tmp_path, name):
    path = write_bytes(tmp_path, FORMATS[name])
    answer = submitted_json(submit_file(database_url, path, "--json"))
    assert answer == {"batch_id": answer["batch_id"], "accepted": 3, "invalid": 0, "duplicates": 0}
    assert stored_rows(answer["batch_id"]) == [
        (1, "a@example.com", RowState.QUEUED), (2, "b@example.com", RowState.QUEUED),
        (3, "c@example.com", RowState.QUEUED)]


def test_submit_stdin(app, database_url):
    result = run_submit(database_url, "-", "--user", "carol", "--check-type", "catchall", "--json",
                        input="\ufeffa@example.com\r\n\r\nbad\r\nA@Example.com\r\n")
    answer = submitted_json(result)
    assert answer == {"batch_id": answer["batch_id"], "accepted": 2, "invalid": 1, "duplicates": 1}
    batch = UserBatch.get_by_id(answer["batch_id"])
    assert (batch.user_id, batch.check_type) == ("carol", "catchall")
    assert [email for _, email, _ in stored_rows(batch.id)] == ["a@example.com", "bad", "A@Example.com"]
    assert "line 3" in result.stderr


def test_submit_stdin_csv(app, database_url):
    answer = submitted_json(run_submit(database_url, "-", "--user", "carol", "--check-type",
                                       "deliverable", "--json",
                                       input="Name,Email\nAnn,a@example.com\nBo,b@example.com\n"))
    assert (answer["accepted"], answer["invalid"]) == (2, 0)


def test_submit_plain_output_prints_id_then_counts(app, database_url, tmp_path):
    path = write_bytes(tmp_path, b"a@example.com\nA@example.com\nnope\n")
    result = submit_file(database_url, path)
    assert result.exit_code == 0, result.output
    batch_id = UserBatch.get().id
    assert result.stdout.splitlines() == [
        "batch %s" % batch_id, "accepted 2", "invalid 1", "duplicates 1"]


def test_submit_json_prints_exactly_the_contract_object(app, database_url, tmp_path):
    path = write_bytes(tmp_path, b"a@example.com\nb@example.com\nbad address\nB@EXAMPLE.COM\n")
    result = submit_file(database_url, path, "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1
    answer = json.loads(result.stdout)
    assert list(answer) == ["batch_id", "accepted", "invalid", "duplicates"]
    assert answer == {"batch_id": UserBatch.get().id, "accepted": 3, "invalid": 1, "duplicates": 1}


def test_submit_invalid_rows_counted_reported_stored_and_never_sent(app, database_url, bouncer,
                                                                    tmp_path):
    lines = ["good1@example.com", "", "bad one@example.com", "good2@example.com", "",
             "no-at-sign", "double..dot@example.com", "good3@example.com", '"q"@example.com',
             "x@nodot", "good4@example.com", "@example.com"]
    path = write_bytes(tmp_path, ("\n".join(lines) + "\n").encode())
    result = submit_file(database_url, path, "--json")
    answer = submitted_json(result)
    assert (answer["accepted"], answer["invalid"], answer["duplicates"]) == (4, 6, 0)
    # The first five invalid rows, each with its physical line number; then how many more.
    reported = [line for line in result.stderr.splitlines() if line.startswith("invalid:")]
    for line_number, text in [(3, "bad one@example.com"), (6, "no-at-sign"),
                              (7, "double..dot@example.com"), (9, '"q"@example.com'),
                              (10, "x@nodot")]:
        assert any(("line %d:" % line_number) in line and repr(text) in line and str(path) in line
                   for line in reported), (line_number, result.stderr)
    assert any("1 more" in line for line in reported)
    assert [s for _, _, s in stored_rows(answer["batch_id"])] == [
        "queued", "invalid", "queued", "invalid", "invalid", "queued", "invalid", "invalid", "queued", "invalid"]
    report = run_cycle(app, CREATION, "deliverable")
    assert report.created
    assert sorted(bouncer.sent_addresses()) == [
        "good1@example.com", "good2@example.com", "good3@example.com", "good4@example.com"]
    assert UserBatchEmail.select().where(UserBatchEmail.status == RowState.INVALID).count() == 5 + 1


def test_submit_invalid_rows_in_csv_report_physical_lines(app, database_url, tmp_path):
    path = write_bytes(tmp_path, b"name,email\r\n\r\nAnn,a@example.com\r\nBo,\"not valid\"\r\n"
                                 b"Cy,\"c@example.com\"\r\nDi\r\n")
    result = submit_file(database_url, path, "--json")
    answer = submitted_json(result)
    assert (answer["accepted"], answer["invalid"]) == (2, 2)
    assert "line 4:" in result.stderr and "line 6:" in result.stderr


@pytest.mark.parametrize("content, accepted, duplicates", [
    (b"a@x.com\nA@X.com\n", 2, 1),
    (b"john.doe@gmail.com\njohndoe@gmail.com\nJohn.Doe+list@googlemail.com\nother@gmail.com\n", 4, 2),
    (b"a+1@outlook.com\na+2@outlook.com\na+1@example.com\na+2@example.com\n", 4, 1),
    (b"email\na@x.com\nbad\na@x.com\na@x.com\n", 3, 2),
])
def test_submit_duplicates_counted(app, database_url, tmp_path, content, accepted, duplicates):
    answer = submitted_json(submit_file(database_url, write_bytes(tmp_path, content), "--json"))
    assert (answer["accepted"], answer["duplicates"]) == (accepted, duplicates)
    assert UserBatchEmail.select().count() == content.count(b"\n") - content.startswith(b"email")


@pytest.mark.parametrize("when", [datetime.datetime(2026, 1, 2, 3, 4, 5, 678901),
                                  datetime.datetime(2026, 1, 2, 3, 4, 5)])
def test_a_new_address_keeps_the_time_it_was_registered_at(db, when):
    """The time every new address of an admission shares is written once for all of them (on
    SQLite, as its adapter would write it): it reads back as it was given, to the microsecond."""
    from bouncer.doors.admission import register_addresses
    from bouncer.store.database import write_transaction
    with write_transaction():
        register_addresses(["a@example.com", "b@example.com"], when)
    assert [a.created_at for a in EmailGlobal.select()] == [when, when]


def test_submit_times_stored_in_utc(app, database_url, tmp_path):
    submitted_json(submit_file(database_url, write_bytes(tmp_path, b"a@example.com\n"), "--json"))
    now = datetime.datetime.utcnow()
    assert abs(UserBatch.get().created_at - now) < datetime.timedelta(seconds=60)
    assert abs(EmailGlobal.get().created_at - now) < datetime.timedelta(seconds=60)


# -- the CLI: bad input writes nothing --

def make_bad_input(tmp_path, kind):
    """(path argument, fragments the one error line must contain)."""
    if kind == "missing":
        return str(tmp_path / "nope.txt"), ["nope.txt", "no such file"]
    if kind == "directory":
        (tmp_path / "adir").mkdir()
        return str(tmp_path / "adir"), ["adir", "directory"]
    if kind == "csv_without_email_column":
        path = write_bytes(tmp_path, b"\nname,address,company\nAnn,a@example.com,Acme\n", "c.csv")
        return str(path), ["c.csv", "line 2", "email"]
    if kind == "not_utf8":
        path = write_bytes(tmp_path, "café@example.com\n".encode("latin-1"), "l1.txt")
        return str(path), ["l1.txt", "UTF-8"]
    if kind == "utf16":
        path = write_bytes(tmp_path, "a@example.com\nb@example.com\n".encode("utf-16"), "u16.txt")
        return str(path), ["u16.txt", "UTF-8"]
    if kind == "no_valid_address":
        path = write_bytes(tmp_path, b"nope\n\nstill nope\n", "bad.txt")
        return str(path), ["no valid address", "line 1"]
    if kind == "empty":
        return str(write_bytes(tmp_path, b"", "empty.txt")), ["empty"]
    if kind == "only_blank_lines":
        return str(write_bytes(tmp_path, b"\n  \r\n\t\n", "blank.txt")), ["empty"]
    if kind == "csv_header_only":
        return str(write_bytes(tmp_path, b"name,email\n", "h.csv")), ["empty"]
    raise AssertionError(kind)


BAD_INPUTS = ["missing", "directory", "csv_without_email_column", "not_utf8", "utf16",
              "no_valid_address", "empty", "only_blank_lines", "csv_header_only"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_submit_bad_input_one_line_exit_1_nothing_written(app, database_url, tmp_path, kind):
    submit_file(database_url, write_bytes(tmp_path, b"earlier@example.com\n", "earlier.txt"))
    before = row_counts()
    path, fragments = make_bad_input(tmp_path, kind)
    result = submit_file(database_url, path)
    assert_clean_failure(result, *fragments)
    assert result.stdout == ""
    assert row_counts() == before


def test_submit_unknown_check_type_is_usage_error_nothing_written(app, database_url, tmp_path):
    before = row_counts()
    result = submit_file(database_url, write_bytes(tmp_path, b"a@example.com\n"), check_type="bogus")
    assert result.exit_code in (1, 2)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "check-type" in result.stderr and "bogus" in result.stderr
    assert row_counts() == before


def test_submit_empty_user_refused_nothing_written(app, database_url, tmp_path):
    before = row_counts()
    result = submit_file(database_url, write_bytes(tmp_path, b"a@example.com\n"), user=" ")
    assert_clean_failure(result, "user")
    assert row_counts() == before


def many_lines(n, bad_line, bad):
    lines = [b"user%d@example.com" % i for i in range(1, n + 1)]
    lines[bad_line - 1] = bad
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("bad, fragments", [
    (b"caf\xe9@example.com", ["UTF-8"]),
    (b"x\xff\xfe@example.com", ["UTF-8"]),
])
def test_submit_mid_file_bad_encoding_writes_nothing(app, db, database_url, tmp_path, monkeypatch,
                                                     bad, fragments):
    # Line 5,900 of 6,000: the first chunk of 5,000 rows is already inserted when it fails.
    path = write_bytes(tmp_path, many_lines(6000, 5900, bad))
    before = row_counts()
    statements = count_statements(monkeypatch, db)
    assert_clean_failure(submit_file(database_url, path), str(path), *fragments)
    monkeypatch.undo()
    assert any(s.startswith('INSERT INTO "user_batch_emails"') for s in statements)
    assert row_counts() == before


def test_submit_mid_file_csv_error_names_line_writes_nothing(app, db, database_url, tmp_path,
                                                            monkeypatch):
    lines = [b"email,name"] + [b"user%d@example.com,n%d" % (i, i) for i in range(1, 6000)]
    lines[5899] = b'user5899@example.com,"broken"quote'
    path = write_bytes(tmp_path, b"\n".join(lines) + b"\n", "big.csv")
    before = row_counts()
    statements = count_statements(monkeypatch, db)
    assert_clean_failure(submit_file(database_url, path), "big.csv", "line 5900")
    monkeypatch.undo()
    assert any(s.startswith('INSERT INTO "user_batch_emails"') for s in statements)
    assert row_counts() == before


@pytest.mark.parametrize("content", [b"ok@example.com\na\x00b@example.com\n",
                                     b"email,name\nok@example.com,1\na\x00b@example.com,2\n"])
def test_submit_nul_byte_row_kept_as_invalid(app, database_url, tmp_path, content):
    result = submit_file(database_url, write_bytes(tmp_path, content), "--json")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    answer = submitted_json(result)
    assert (answer["accepted"], answer["invalid"]) == (1, 1)
    assert "line %d:" % content.count(b"\n") in result.stderr
    assert UserBatchEmail.select().where(UserBatchEmail.status == RowState.INVALID).count() == 1


def test_submit_mid_file_bad_encoding_names_line(app, database_url, tmp_path):
    path = write_bytes(tmp_path, many_lines(6000, 5900, b"caf\xe9@example.com"))
    assert_clean_failure(submit_file(database_url, path), "line 5900")


# -- bulk --

def count_statements(monkeypatch, db):
    real = db.obj.execute_sql
    statements = []

    def counting(sql, params=None, *args, **kwargs):
        statements.append(sql)
        return real(sql, params, *args, **kwargs)

    monkeypatch.setattr(db.obj, "execute_sql", counting)
    # On Postgres, bulk rows go in by COPY, which does not pass through execute_sql.
    real_copy = bouncer.store.dialect.copy_in

    def counting_copy(db, table, columns, text, tail=""):
        statements.append('INSERT INTO "%s" (by COPY)' % table)
        return real_copy(db, table, columns, text, tail)

    monkeypatch.setattr(bouncer.store.dialect, "copy_in", counting_copy)
    return statements


def test_submit_20000_lines_in_a_bounded_number_of_statements(app, db, database_url, tmp_path,
                                                              monkeypatch):
    content = "".join("Person.%d+tag@gmail.com\n" % i if i % 10 == 0 else "p%d@example.com\n" % i
                      for i in range(20000))
    path = write_bytes(tmp_path, ("email\n" + content + "bad\n").encode())
    statements = count_statements(monkeypatch, db)
    answer = submitted_json(submit_file(database_url, path, "--json"))
    assert (answer["accepted"], answer["invalid"], answer["duplicates"]) == (20000, 1, 0)
    # A write transaction on SQLite sets its wait for the write lock aside and back (three
    # PRAGMAs, in-process calls): per transaction, not per row.
    statements = [sql for sql in statements if not sql.startswith("PRAGMA busy_timeout")]
    assert 0 < len(statements) < 100, len(statements)
    monkeypatch.undo()
    assert UserBatchEmail.select().count() == 20001
    assert EmailGlobal.select().count() == 20000


def test_submit_at_a_terminal_shows_a_progress_bar_on_stderr(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, DATABASE_URL="sqlite:///%s" % (tmp_path / "x.db"))
    subprocess.run([sys.executable, "-m", "bouncer", "init-db"], cwd=root, env=env, check=True,
                   capture_output=True, timeout=60)
    path = write_bytes(tmp_path, b"".join(b"a%d@example.com\n" % i for i in range(50)))
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "bouncer", "submit", str(path), "--user", "u",
                               "--check-type", "deliverable", "--json"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=follower, timeout=60)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:   # the terminal's other end is closed: everything was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0
    assert json.loads(done.stdout)["accepted"] == 50
    assert b"submitting" in shown and b"100%" in shown
