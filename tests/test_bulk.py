"""Bulk writes (multi-row INSERT on SQLite, COPY on PostgreSQL) store every value as given:
text with the characters COPY's format escapes, None, integers, times; a replace keeps one row
per key, the new one. A lookup of many values at once (`among`) finds exactly those values."""
import datetime

from bouncer.store.bulk import among, insert_tuples
from bouncer.store.models import DeliverableResult, EmailGlobal, WebhookDelivery

COLUMNS = ("email_global", "status", "reason", "score", "raw", "checked_at")
TRICKY = ["tab\there", "line\nbreak", "carriage\rreturn", "back\\slash", "\\N", "all \\\t\n\r",
          "naïve ünïcode ✓", "", " spaces "]


def stored(ids):
    return {row[0]: row[1:] for row in DeliverableResult.select(
        DeliverableResult.email_global, DeliverableResult.status, DeliverableResult.reason,
        DeliverableResult.score, DeliverableResult.raw, DeliverableResult.checked_at)
        .where(DeliverableResult.email_global.in_(ids)).tuples()}


def test_every_value_comes_back_as_it_went_in(db):
    when = datetime.datetime(2026, 12, 1, 14, 30, 5, 123000)
    rows = [(i + 1, "deliverable", text if i % 2 else None, i if i % 3 else None, text, when)
            for i, text in enumerate(TRICKY)]
    insert_tuples(DeliverableResult, COLUMNS, rows)
    assert stored([r[0] for r in rows]) == {r[0]: r[1:] for r in rows}


def test_a_column_of_plain_text_beside_one_that_needs_escapes(db):
    when = datetime.datetime(2026, 12, 1)
    rows = [(i, "risky", "plain", 1, "x\ty" if i == 500 else "plain %d" % i, when) for i in range(1, 1001)]
    insert_tuples(DeliverableResult, COLUMNS, rows)
    assert stored(list(range(1, 1001))) == {r[0]: r[1:] for r in rows}


def test_replace_keeps_the_new_row(db):
    when = datetime.datetime(2026, 12, 1)
    insert_tuples(DeliverableResult, COLUMNS, [(1, "unknown", "old", 1, "{}", when)])
    insert_tuples(DeliverableResult, COLUMNS, [(1, "deliverable", "new\t", 2, "{\"a\": 1}", when),
                                               (2, "risky", None, None, "{}", when)],
                  replace_on=DeliverableResult.email_global)
    assert stored([1, 2]) == {1: ("deliverable", "new\t", 2, "{\"a\": 1}", when),
                              2: ("risky", None, None, "{}", when)}


def test_fields_left_out_take_their_defaults(db):
    when = datetime.datetime(2026, 12, 1)
    insert_tuples(WebhookDelivery, ("batch_id", "event", "message_id", "payload", "next_attempt_at",
                                    "created_at"), [(7, "batch.completed", "msg_1", "{}", when, when)])
    delivery = WebhookDelivery.get()
    assert (delivery.state, delivery.attempts, delivery.url) == ("pending", 0, None)


def test_among_finds_text_with_the_characters_an_array_literal_quotes(db):
    when = datetime.datetime(2026, 12, 1)
    texts = TRICKY[:1] + TRICKY[3:] + ['quo"te', "it's", "com,ma", "{brace}", "NULL", 'x\\"y']
    insert_tuples(EmailGlobal, ("email", "created_at"), [(text, when) for text in texts + ["other"]])
    found = [email for (email,) in EmailGlobal.select(EmailGlobal.email)
             .where(among(EmailGlobal.email, texts)).tuples()]
    assert sorted(found) == sorted(texts)


def test_among_takes_ids_past_the_32_bit_range_and_an_empty_list(db):
    when = datetime.datetime(2026, 12, 1)
    ids = [1, 2 ** 31 - 1]
    insert_tuples(DeliverableResult, COLUMNS, [(i, "risky", None, None, "{}", when) for i in ids + [7]])
    found = [gid for (gid,) in DeliverableResult.select(DeliverableResult.email_global)
             .where(among(DeliverableResult.email_global, ids + [2 ** 31, 2 ** 40])).tuples()]
    assert sorted(found) == ids
    assert not DeliverableResult.select().where(among(DeliverableResult.email_global, [])).exists()
