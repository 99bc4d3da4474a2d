"""Addresses that are valid but awkward (quotes, unicode, SQL and spreadsheet-formula payloads)
travel intact through submit, Bouncer's JSON body, the database and the export, and harm none."""
import csv
import io
import json

from conftest import statuses, submit

from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.reading.batches import iter_results, spreadsheet_safe
from bouncer.states import RowState
from bouncer.store.models import UserBatch, UserBatchEmail

VALID = [
    "o'brien@example.com",                 # a quote, in SQL's eyes
    "x'or'1'='1@example.com",              # the classic injection, valid as an address
    "=cmd|calc@example.com",               # a spreadsheet formula
    "=HYPERLINK1@example.com",
    "+1234@example.com",
    "-dash@example.com",
    "ünïcödé@exämple.com",
    "用户@例子.广告",
    "back`tick{brace}|pipe@example.com",
]
INVALID_ROWS = ['"quoted"@example.com', "back\\slash@example.com", "two@@example.com",
                "x');DROP TABLE user_batches;--@example.com", "@first@example.com"]


def test_awkward_addresses_survive_the_whole_trip(app, bouncer):
    batch = submit("mallory", VALID + INVALID_ROWS)
    assert statuses(batch).get(RowState.INVALID) == len(INVALID_ROWS)
    run_cycle(app, CREATION, "deliverable")
    # Bouncer received exactly the spellings submitted, as JSON strings.
    assert sorted(bouncer.sent_addresses()) == sorted(VALID)
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    rows = list(iter_results(batch))
    assert [r["email"] for r in rows] == VALID + INVALID_ROWS
    assert all(r["status"] != "pending" for r in rows)
    # The tables are all still there, and the row holds the text as it came.
    assert UserBatch.select().count() == 1
    assert UserBatchEmail.get(UserBatchEmail.email == INVALID_ROWS[3]).email == INVALID_ROWS[3]


def test_export_cells_that_a_spreadsheet_would_run_are_defused(app, bouncer):
    batch = submit("mallory", VALID)
    out = io.StringIO()
    writer = csv.writer(out)
    for row in iter_results(batch):
        writer.writerow([spreadsheet_safe(row["email"])])
    cells = [line[0] for line in csv.reader(io.StringIO(out.getvalue()))]
    for cell, original in zip(cells, VALID):
        if original[0] in "=+-@":
            assert cell == "'" + original
        else:
            assert cell == original


def test_request_body_is_json_encoded_not_concatenated(app, bouncer):
    submit("mallory", ['quote"inside@example.com'.replace('"', "'"), "ünï@example.com"])
    run_cycle(app, CREATION, "deliverable")
    [batch] = bouncer.batches.values()
    assert json.loads(json.dumps(batch["emails"])) == batch["emails"]
    assert "ünï@example.com" in batch["emails"]
