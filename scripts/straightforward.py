"""A straightforward implementation of the service's contract, the benchmark's yardstick: what a
competent engineer writes first. Peewee queries, one prepared `executemany` upsert, a regex
syntax check, no bulk tricks; its own small schema in its own database, Bouncer over HTTP with
`requests`.

    python -m scripts.straightforward init-db
    python -m scripts.straightforward submit FILE --user U --check-type T [--json]
    python -m scripts.straightforward create-batches --check-type T
    python -m scripts.straightforward check-batches --check-type T
    python -m scripts.straightforward status [--json]

Settings come from the environment, as the service's do: DATABASE_URL, BOUNCER_API_URL,
BOUNCER_API_KEY, BOUNCER_BATCH_SIZE, BOUNCER_MAX_OUTSTANDING, RATE_LIMIT_BUFFER.
"""
import argparse
import csv
import datetime
import json
import os
import re

import requests
from peewee import (
    CompositeKey, DatabaseProxy, DateTimeField, ForeignKeyField, IntegerField, Model, PostgresqlDatabase,
    TextField, fn,
)
from playhouse.db_url import connect

BATCH_PATH = "/v1.1/email/verify/batch"
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
IN_FLIGHT = ("reserved", "outstanding")
INSERT_CHUNK = 1000

db = DatabaseProxy()


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class Base(Model):
    class Meta:
        database = db


class UserBatch(Base):
    user = TextField()
    check_type = TextField()
    status = TextField(default="queued")        # queued -> completed
    created_at = DateTimeField(default=utcnow)


class BouncerBatch(Base):
    check_type = TextField()
    status = TextField(default="reserved")      # reserved -> outstanding -> completed
    bouncer_id = TextField(null=True)
    created_at = DateTimeField(default=utcnow)


class Email(Base):
    user_batch = ForeignKeyField(UserBatch)
    position = IntegerField()
    email = TextField()
    stripped = TextField()
    check_type = TextField()
    status = TextField()                        # queued | invalid -> sent -> done | failed
    bouncer_batch = ForeignKeyField(BouncerBatch, null=True)

    class Meta:
        indexes = ((("check_type", "status", "id"), False),)   # the FIFO walk


class Result(Base):
    check_type, email, status = TextField(), TextField(), TextField()
    reason, score = TextField(null=True), IntegerField(null=True)
    accept_all, disposable, free = TextField(null=True), TextField(null=True), TextField(null=True)
    role, disabled, full_mailbox = TextField(null=True), TextField(null=True), TextField(null=True)
    provider, raw, checked_at = TextField(null=True), TextField(), DateTimeField()

    class Meta:
        primary_key = CompositeKey("check_type", "email")


class Request(Base):
    at = DateTimeField(index=True)


TABLES = [UserBatch, BouncerBatch, Email, Result, Request]
RESULT_FIELDS = ["check_type", "email", "status", "reason", "score", "accept_all", "disposable",
                 "free", "role", "disabled", "full_mailbox", "provider", "raw", "checked_at"]


def open_db(url=None):
    url = url or os.environ.get("DATABASE_URL", "sqlite:///straightforward.db")
    options = {"pragmas": {"journal_mode": "wal"}} if url.startswith("sqlite") else {}
    db.initialize(connect(url, **options))
    return db


def setting(name, default):
    return int(os.environ.get(name, default))


def strip(address):
    """The mailbox an address reaches: lowercased; Gmail ignores dots and +tags."""
    local, _, domain = address.lower().rpartition("@")
    if domain in ("gmail.com", "googlemail.com"):
        local, domain = local.split("+", 1)[0].replace(".", ""), "gmail.com"
    return "%s@%s" % (local, domain) if local else address.lower()


# -- submit ---------------------------------------------------------------------------------

def read_lines(path):
    with open(path, encoding="utf-8-sig") as f:
        lines = [line.strip() for line in f if line.strip()]
    if lines and "email" in [c.strip().lower() for c in lines[0].split(",")]:
        rows = csv.DictReader(lines)
        rows.fieldnames = [c.strip().lower() for c in rows.fieldnames]
        return [(row["email"] or "").strip() for row in rows]
    return lines


def submit(path, user, check_type):
    emails = read_lines(path)
    seen, invalid, duplicates, rows = set(), 0, 0, []
    with db.atomic():
        batch = UserBatch.create(user=user, check_type=check_type)
        for position, email in enumerate(emails, start=1):
            stripped = strip(email)
            if not EMAIL.fullmatch(email):
                status, invalid = "invalid", invalid + 1
            else:
                status = "queued"
                duplicates += stripped in seen
                seen.add(stripped)
            rows.append((batch.id, position, email, stripped, check_type, status))
        fields = [Email.user_batch, Email.position, Email.email, Email.stripped, Email.check_type,
                  Email.status]
        for start in range(0, len(rows), INSERT_CHUNK):
            Email.insert_many(rows[start:start + INSERT_CHUNK], fields=fields).execute()
    return {"batch_id": batch.id, "accepted": len(emails) - invalid, "invalid": invalid,
            "duplicates": duplicates}


# -- Bouncer --------------------------------------------------------------------------------

session = requests.Session()


def bouncer(method, path, **kwargs):
    url = os.environ.get("BOUNCER_API_URL", "https://api.usebouncer.com").rstrip("/") + path
    response = session.request(method, url, headers={"x-api-key": os.environ["BOUNCER_API_KEY"]},
                               timeout=30, **kwargs)
    response.raise_for_status()
    return response.json()


def take_request_slot():
    """At most RATE_LIMIT_BUFFER Bouncer requests in any 60 s."""
    with db.atomic():
        since = utcnow() - datetime.timedelta(seconds=60)
        if Request.select().where(Request.at > since).count() >= setting("RATE_LIMIT_BUFFER", 180):
            return False
        Request.create(at=utcnow())
    return True


# -- creation cycle -------------------------------------------------------------------------

def create_batches(check_type):
    """Fill the free slots with the oldest queued emails, FIFO, one stripped address once."""
    in_flight = BouncerBatch.select().where((BouncerBatch.check_type == check_type)
                                            & BouncerBatch.status.in_(IN_FLIGHT)).count()
    busy = {s for (s,) in Email.select(Email.stripped).where(
        (Email.check_type == check_type) & (Email.status == "sent")).tuples()}
    created = []
    for _ in range(setting("BOUNCER_MAX_OUTSTANDING", 15) - in_flight):
        batch = reserve(check_type, setting("BOUNCER_BATCH_SIZE", 10000), busy)
        if batch is None or not take_request_slot():
            if batch is not None:
                release(batch)
            break
        emails = addresses_of(batch)
        try:
            answer = bouncer("POST", BATCH_PATH, json=[{"email": e} for e in emails])
        except requests.RequestException as exc:
            print("%s: Bouncer refused a batch, its emails wait: %s" % (check_type, exc))
            release(batch)
            break
        batch.bouncer_id, batch.status = answer["batchId"], "outstanding"
        batch.save()
        created.append(len(emails))
    print("%s: %d Bouncer batch(es) created (%d addresses)" % (check_type, len(created), sum(created)))
    return created


def reserve(check_type, size, busy):
    """The oldest queued emails whose address is not `busy` (in flight), up to `size` distinct
    addresses, marked sent on a new ledger row; None when nothing is queued. Their addresses
    become busy."""
    candidates = (Email.select(Email.id, Email.stripped)
                  .where((Email.check_type == check_type) & (Email.status == "queued"))
                  .order_by(Email.id).limit(size * 2))
    picked, addresses = [], set()
    with db.atomic():
        for email_id, stripped in candidates.tuples():
            if stripped in busy or (stripped not in addresses and len(addresses) == size):
                continue
            addresses.add(stripped)
            picked.append(email_id)
        if not picked:
            return None
        batch = BouncerBatch.create(check_type=check_type)
        Email.update(status="sent", bouncer_batch=batch).where(Email.id.in_(picked)).execute()
    busy |= addresses
    return batch


def addresses_of(batch):
    """Each stripped address once, spelled as its oldest row."""
    spelling = {}
    for email, stripped in (Email.select(Email.email, Email.stripped)
                            .where(Email.bouncer_batch == batch).order_by(Email.id).tuples()):
        spelling.setdefault(stripped, email)
    return list(spelling.values())


def release(batch):
    with db.atomic():
        Email.update(status="queued", bouncer_batch=None).where(Email.bouncer_batch == batch).execute()
        batch.delete_instance()


# -- status cycle ---------------------------------------------------------------------------

def check_batches(check_type):
    """Check each outstanding batch; download and store the completed ones."""
    checked, ingested, verified = 0, 0, 0
    outstanding = BouncerBatch.select().where((BouncerBatch.check_type == check_type)
                                              & (BouncerBatch.status == "outstanding"))
    for batch in outstanding.order_by(BouncerBatch.id):
        if not take_request_slot():
            break
        path = "%s/%s" % (BATCH_PATH, batch.bouncer_id)
        checked += 1
        if bouncer("GET", path).get("status") != "completed" or not take_request_slot():
            continue
        verified += ingest(batch, bouncer("GET", path + "/download", params={"download": "all"}))
        ingested += 1
    print("%s: %d Bouncer batch(es) checked, %d ingested (%d emails verified)"
          % (check_type, checked, ingested, verified))


def ingest(batch, records):
    now = utcnow()
    rows = [result_row(batch.check_type, record, now) for record in records]
    with db.atomic():
        upsert = "INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (check_type, email) DO UPDATE SET %s" % (
            Result._meta.table_name, ", ".join(RESULT_FIELDS), ", ".join([db.param] * len(RESULT_FIELDS)),
            ", ".join("%s = excluded.%s" % (f, f) for f in RESULT_FIELDS[2:]))
        executemany(upsert, rows)
        answered = {row[1] for row in rows}
        Email.update(status="done").where(Email.bouncer_batch == batch).execute()
        missing = [s for (s,) in Email.select(Email.stripped).where(Email.bouncer_batch == batch).tuples()
                   if s not in answered]
        if missing:
            Email.update(status="failed").where((Email.bouncer_batch == batch)
                                                & Email.stripped.in_(missing)).execute()
        batch.status = "completed"
        batch.save()
        touched = Email.select(Email.user_batch).where(Email.bouncer_batch == batch).distinct()
        pending = Email.select().where((Email.user_batch == UserBatch.id)
                                       & Email.status.in_(("queued", "sent")))
        (UserBatch.update(status="completed")
         .where(UserBatch.id.in_(touched) & ~fn.EXISTS(pending)).execute())
    return len(rows)


def executemany(sql, rows):
    cursor = db.cursor()
    if isinstance(db.obj, PostgresqlDatabase):
        # psycopg2's own executemany makes one round trip a row; its documentation points here.
        from psycopg2.extras import execute_batch
        execute_batch(cursor, sql, rows, page_size=1000)
    else:
        cursor.executemany(sql, rows)


def result_row(check_type, record, now):
    domain, account = record.get("domain") or {}, record.get("account") or {}
    return (check_type, strip(record["email"]), record.get("status"), record.get("reason"),
            record.get("score"), domain.get("acceptAll"), domain.get("disposable"),
            domain.get("free"), account.get("role"), account.get("disabled"),
            account.get("fullMailbox"), record.get("provider"), json.dumps(record), now)


# -- status and the command line ------------------------------------------------------------

def overview():
    counts = dict(Email.select(Email.status, fn.COUNT(Email.id)).group_by(Email.status).tuples())
    outstanding = BouncerBatch.select().where(BouncerBatch.status.in_(IN_FLIGHT)).count()
    return {"emails": counts, "outstanding_batches": outstanding,
            "user_batches": UserBatch.select().count()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m scripts.straightforward")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("init-db", help="create the tables")
    add = commands.add_parser("submit", help="create one user batch from a file of addresses")
    add.add_argument("file")
    add.add_argument("--user", required=True)
    add.add_argument("--check-type", required=True, choices=("deliverable", "catchall"))
    add.add_argument("--json", action="store_true")
    for name in ("create-batches", "check-batches"):
        cycle = commands.add_parser(name, help="run one %s cycle" % name.split("-")[0])
        cycle.add_argument("--check-type", required=True, choices=("deliverable", "catchall"))
    status = commands.add_parser("status", help="counts of emails by status")
    status.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    open_db()
    if args.command == "init-db":
        db.create_tables(TABLES)
    elif args.command == "submit":
        summary = submit(args.file, args.user, args.check_type)
        print(json.dumps(summary) if args.json else "\n".join("%s %s" % kv for kv in summary.items()))
    elif args.command == "status":
        print(json.dumps(overview()))
    else:
        {"create-batches": create_batches, "check-batches": check_batches}[args.command](args.check_type)


if __name__ == "__main__":
    main()
