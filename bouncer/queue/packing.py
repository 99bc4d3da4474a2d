"""The greedy packer: which pending emails go into the next Bouncer batch.

The line is read in its order (turn, then place in line, then position: under QUEUE_POLICY
`fifo` every turn is 0, so oldest user batch first; under `fair` the users' rows interleave by
their weights, see fairness.py), a page at a time, and `plan_batch` decides for each row,
without touching the database:
- its stripped address has a verdict younger than RESULT_CACHE_DAYS: completed from it, free;
- its address is already in flight in another Bouncer batch: the row joins that batch;
- otherwise its address goes into this batch (repeats of an address ride along on one credit),
  until the batch holds `batch_size` distinct addresses: the next new address opens the next
  batch, and everything older has been taken.
"""

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from peewee import Tuple

from bouncer.store.bulk import among
from bouncer.store.database import database
from bouncer.store.models import BouncerBatchEmail, QueuedEmail, result_model

MIN_PAGE = 1000


@dataclass
class Plan:
    """What the next Bouncer batch will be."""
    send: dict = field(default_factory=dict)          # email_global id -> spelling to send
    send_rows: list = field(default_factory=list)     # (row id, user batch) riding on those addresses
    attach: dict = field(default_factory=lambda: defaultdict(list))  # in-flight ledger id -> (row id, user batch)
    cached: list = field(default_factory=list)        # row ids a fresh verdict completes
    touched_batches: set = field(default_factory=set)  # user batches of attached/cached rows
    shares: Counter = field(default_factory=Counter)  # user id -> new addresses its rows put in
    span: tuple = None  # (check type, first key, last key): the stretch of the line walked

    @property
    def is_empty(self):
        return not (self.send or self.attach or self.cached)


# A row in line as packing reads it; its key (turn, place in line, position) is the line's order.
ROW_ID, USER_BATCH, EMAIL, GLOBAL_ID, USER_ID = range(5)
KEY = slice(5, 8)


def plan_batch(check_type, pages, in_flight_of, fresh_of, batch_size):
    """Plan one Bouncer batch from `pages` (lists of rows in line `(row id, user batch, email,
    email_global id, user id, turn, fifo order, position)` in the line's order).
    `in_flight_of(global_ids)` gives {global id: ledger id} of addresses already in flight;
    `fresh_of(global_ids)` the subset with a fresh verdict. Reads pages only as far as it needs
    to."""
    plan = Plan()
    for page in pages:
        global_ids = {row[GLOBAL_ID] for row in page}
        flying = in_flight_of(global_ids)
        cached = fresh_of(global_ids - flying.keys())
        if plan.span is None:
            plan.span = (check_type, page[0][KEY], None)
        for row in page:
            row_id, user_batch, email, global_id, user_id = row[:KEY.start]
            if global_id in cached:
                plan.cached.append(row_id)
            elif global_id in flying:
                plan.attach[flying[global_id]].append((row_id, user_batch))
            elif global_id in plan.send or len(plan.send) < batch_size:
                if global_id not in plan.send:
                    plan.send[global_id] = email   # the oldest row's spelling is sent
                    plan.shares[user_id] += 1
                plan.send_rows.append((row_id, user_batch))
                continue
            else:
                return walked_to(plan, row)  # full: this row opens the next batch
            plan.touched_batches.add(user_batch)
        if len(plan.send) >= batch_size:
            return walked_to(plan, row)
    return walked_to(plan, row) if plan.span else plan


def walked_to(plan, row):
    """The plan, its span ending at `row` (the last row it read; it may not take it)."""
    check_type, first, _ = plan.span
    plan.span = (check_type, first, row[KEY])
    return plan


def plan_next_batch(check_type, batch_size, cutoff):
    """The plan for `check_type`'s queue as it stands (inside the reserving transaction)."""
    return plan_batch(check_type, queued_pages(check_type, max(batch_size, MIN_PAGE)),
                      lambda ids: in_flight_batches_of(check_type, ids),
                      lambda ids: fresh_verdicts_of(check_type, ids, cutoff),
                      batch_size)


def queued_pages(check_type, page_size):
    """Pages of the line in its order: the row's turn, its user batch's place in line (taken
    when it became visible), then the row's position. A walk of the line's index."""
    after = None
    while True:
        page = queued_page(check_type, after, page_size)
        if page:
            yield page
        if len(page) < page_size:
            return
        after = page[-1][KEY]


def queued_page(check_type, after, limit):
    Row = QueuedEmail
    key = (Row.turn, Row.fifo_order, Row.position)
    query = (Row.select(Row.row, Row.batch_id, Row.email, Row.email_global, Row.user_id, *key)
             .where(Row.check_type == check_type))
    if after:
        query = query.where(Tuple(*key) > Tuple(*after))
    query = query.order_by(*key).limit(limit)
    # Plain rows straight from the cursor: per-row type conversion would cost more than the query.
    return database.execute_sql(*query.sql()).fetchall()


def in_flight_batches_of(check_type, global_ids):
    """{email_global id: ledger id of the in-flight batch holding it} for `global_ids`.
    Looked up apart from the FIFO walk, so a planner with stale statistics can at worst scan
    once, never once per row."""
    Sent = BouncerBatchEmail
    if not global_ids:
        return {}
    query = Sent.select(Sent.email_global, Sent.bouncer_batch).where(
        (Sent.check_type == check_type) & among(Sent.email_global, global_ids))
    return dict(database.execute_sql(*query.sql()).fetchall())


def fresh_verdicts_of(check_type, global_ids, cutoff):
    """The subset of `global_ids` with a verdict checked after `cutoff` (none if no cutoff)."""
    if cutoff is None or not global_ids:
        return set()
    Result = result_model(check_type)
    query = Result.select(Result.email_global).where(
        among(Result.email_global, global_ids) & (Result.checked_at > cutoff))
    return {gid for (gid,) in database.execute_sql(*query.sql()).fetchall()}

