"""The greedy packer: which pending emails go into the next Bouncer batch.

The line is read in its order (turn, then place in line, then position: under QUEUE_POLICY
`fifo` every turn is 0, so oldest user batch first; under `fair` the users' rows interleave by
their weights, see fairness.py), a page at a time, rows waiting for a re-check's `retryAfter`
left out by the walk itself, and `plan_batch` decides for each row, without touching the
database:
- its stripped address has a verdict younger than RESULT_CACHE_DAYS: completed from it, free
  (never a greylisted `unknown`, one that carried a `retryAfter`);
- its address is already in flight in another Bouncer batch: the row joins that batch, unless
  that batch is being finished at Bouncer (then the row waits for it to end);
- its address is greylisted and its `retryAfter` has not come (within
  UNKNOWN_RECHECK_MAX_DELAY): the row waits in line, so that every row of the address goes out
  together, on one credit, once the receiving server accepts a try;
- otherwise its address goes into this batch (repeats of an address ride along on one credit),
  until the batch holds `batch_size` distinct addresses: the next new address opens the next
  batch, and everything older has been taken (or waits, as above).
"""

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from peewee import JOIN, Tuple

from bouncer.store.bulk import looked_up
from bouncer.store.database import database
from bouncer.store.models import BouncerBatch, BouncerBatchEmail, QueuedEmail, result_model

MIN_PAGE = 1000


@dataclass
class Plan:
    """What the next Bouncer batch will be."""
    send: dict = field(default_factory=dict)          # email_global id -> spelling to send
    send_rows: list = field(default_factory=list)     # (row id, user batch) riding on those addresses
    attach: dict = field(default_factory=lambda: defaultdict(list))  # in-flight ledger id -> (row id, user batch)
    cached: list = field(default_factory=list)        # row ids a fresh verdict completes
    cached_batches: set = field(default_factory=set)  # their user batches (they may end)
    touched_batches: set = field(default_factory=set)  # user batches of attached/cached rows
    rechecked: set = field(default_factory=set)       # addresses of `send` a re-check put there
    shares: Counter = field(default_factory=Counter)  # user id -> new addresses its rows put in
    span: tuple = None  # (check type, first key, last key): the stretch of the line walked

    @property
    def is_empty(self):
        return not (self.send or self.attach or self.cached)

    @property
    def user_batches(self):
        """Every user batch with a row in the plan."""
        return self.touched_batches | {batch for _, batch in self.send_rows}

    def send_only(self, riders):
        """Keep only `riders` of `send_rows`, {row id: (email_global id, user id)} (the others
        left the line since it was read: a cancel took them), and only the addresses they need,
        each a share of the user of its oldest row left."""
        self.send_rows = [(row_id, batch) for row_id, batch in self.send_rows if row_id in riders]
        needed, shares = set(), Counter()
        for row_id, _ in self.send_rows:      # in the line's order
            global_id, user_id = riders[row_id]
            if global_id not in needed:
                needed.add(global_id)
                shares[user_id] += 1
        self.send = {global_id: email for global_id, email in self.send.items() if global_id in needed}
        self.shares = shares
        self.rechecked &= needed


# A row in line as packing reads it; its key (turn, place in line, position) is the line's order.
ROW_ID, USER_BATCH, EMAIL, GLOBAL_ID, USER_ID, RECHECKS = range(6)
KEY = slice(6, 9)


def plan_batch(check_type, pages, in_flight_of, verdicts_of, batch_size):
    """Plan one Bouncer batch from `pages` (lists of rows in line `(row id, user batch, email,
    email_global id, user id, re-checks, turn, fifo order, position)` in the line's order).
    `in_flight_of(global_ids)` gives {global id: ledger id} of addresses already in flight
    (ledger id None: a batch being finished); `verdicts_of(global_ids)` the subsets (fresh, held)
    with a fresh verdict, and with a greylisted one whose re-check is not yet due. Reads pages
    only as far as it needs to."""
    plan = Plan()
    for page in pages:
        global_ids = {row[GLOBAL_ID] for row in page}
        flying = in_flight_of(global_ids)
        cached, held = verdicts_of(global_ids - flying.keys())
        if plan.span is None:
            plan.span = (check_type, page[0][KEY], None)
        for row in page:
            row_id, user_batch, email, global_id, user_id, rechecks = row[:KEY.start]
            if global_id in cached:
                plan.cached.append(row_id)
                plan.cached_batches.add(user_batch)
            elif global_id in flying:
                if flying[global_id] is None:
                    continue   # its address's batch is being finished: the row waits for it
                plan.attach[flying[global_id]].append((row_id, user_batch))
            elif global_id in held:
                continue       # the receiving server asked to be tried again later
            elif global_id in plan.send or len(plan.send) < batch_size:
                if global_id not in plan.send:
                    plan.send[global_id] = email   # the oldest row's spelling is sent
                    plan.shares[user_id] += 1
                plan.send_rows.append((row_id, user_batch))
                if rechecks:
                    plan.rechecked.add(global_id)
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


def plan_next_batch(check_type, batch_size, cutoff, now, hold_within=None):
    """The plan for `check_type`'s queue as it stands at `now` (inside the reserving
    transaction). `cutoff`: the oldest verdict reused; `hold_within`: how far ahead a greylisted
    address's `retryAfter` may lie and still be waited for (None: never waited for)."""
    return plan_batch(check_type, queued_pages(check_type, max(batch_size, MIN_PAGE), now),
                      lambda ids: in_flight_batches_of(check_type, ids),
                      lambda ids: verdicts_of(check_type, ids, cutoff, now, hold_within),
                      batch_size)


def queued_pages(check_type, page_size, now):
    """Pages of the line in its order: the row's turn, its user batch's place in line (taken
    when it became visible), then the row's position; a row whose re-check is not yet due is not
    read. A walk of the line's index."""
    after = None
    while True:
        page = queued_page(check_type, after, page_size, now)
        if page:
            yield page
        if len(page) < page_size:
            return
        after = page[-1][KEY]


def queued_page(check_type, after, limit, now):
    Row = QueuedEmail
    key = (Row.turn, Row.fifo_order, Row.position)
    query = (Row.select(Row.row, Row.batch_id, Row.email, Row.email_global, Row.user_id, Row.rechecks, *key)
             .where((Row.check_type == check_type) & (Row.not_before.is_null() | (Row.not_before <= now))))
    if after:
        query = query.where(Tuple(*key) > Tuple(*after))
    query = query.order_by(*key).limit(limit)
    # Plain rows straight from the cursor: per-row type conversion would cost more than the query.
    return database.execute_sql(*query.sql()).fetchall()


def in_flight_batches_of(check_type, global_ids):
    """{email_global id: ledger id of the in-flight batch holding it, or None when that batch is
    being finished at Bouncer} for `global_ids`. Looked up apart from the walk of the line, so a planner
    with stale statistics can at worst scan once, never once per row."""
    Sent = BouncerBatchEmail
    if not global_ids or not any_in_flight_between(check_type, min(global_ids), max(global_ids)):
        return {}
    query = (Sent.select(Sent.email_global, Sent.bouncer_batch, BouncerBatch.finish_reason.is_null())
             .join(BouncerBatch, JOIN.INNER, on=(BouncerBatch.id == Sent.bouncer_batch))
             .where((Sent.check_type == check_type) & looked_up(Sent.email_global, global_ids)))
    return {global_id: ledger_id if joinable else None
            for global_id, ledger_id, joinable in database.execute_sql(*query.sql()).fetchall()}


def any_in_flight_between(check_type, first, last):
    """Whether an address with an id from `first` to `last` is in flight: one probe of the
    primary key's range. A page of the line mostly holds addresses first seen together, so
    numbered together and after those already sent: this spares the page one probe per address
    whenever none can be in flight (measured on PostgreSQL, a creation cycle of 15 x 10k: 11 ms
    of probes of a range instead of 138 ms of lookups; on SQLite 1 ms instead of 42 ms)."""
    Sent = BouncerBatchEmail
    return Sent.select().where((Sent.check_type == check_type)
                               & Sent.email_global.between(first, last)).exists()


def verdicts_of(check_type, global_ids, cutoff, now, hold_within=None):
    """(fresh, held) subsets of `global_ids`: with a verdict checked after `cutoff` (none if no
    cutoff) that is not a greylisted `unknown`; with a greylisted one whose `retryAfter` lies
    after `now` and at most `hold_within` ahead (none if None)."""
    if not global_ids or (cutoff is None and hold_within is None):
        return set(), set()
    Result = result_model(check_type)
    if not any_verdict_between(Result, min(global_ids), max(global_ids)):
        return set(), set()
    wanted = []
    if cutoff is not None:
        wanted.append((Result.checked_at > cutoff) & Result.retry_after.is_null())
    if hold_within is not None:
        wanted.append((Result.retry_after > now) & (Result.retry_after <= now + hold_within))
    either = wanted[0] if len(wanted) == 1 else wanted[0] | wanted[1]
    query = Result.select(Result.email_global, Result.retry_after).where(
        looked_up(Result.email_global, global_ids) & either)
    fresh, held = set(), set()
    for global_id, retry_after in database.execute_sql(*query.sql()).fetchall():
        (fresh if retry_after is None else held).add(global_id)
    return fresh, held


def any_verdict_between(Result, first, last):
    """Whether an address with an id from `first` to `last` has a verdict in `Result`: one probe
    of the key's range, which spares a page of addresses never verified (newly seen ones,
    numbered after every verified one) its lookup of each address (measured on SQLite with 5M
    verdicts, a creation cycle of 15 x 10k: 81 ms of lookups)."""
    return Result.select().where(Result.email_global.between(first, last)).exists()
