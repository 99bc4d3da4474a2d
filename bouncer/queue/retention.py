"""Retention: what the retention period no longer keeps (design.md, "Personal data").

A user batch that ended before the cutoff, with nothing of it pending, is *pruned*: its counts
are kept on it (`kept_counts`, with `pruned_at`), so its status object still answers, then its
rows go a slice at a time. Then the verdicts checked before the cutoff that no row of their
check type needs (and no Bouncer batch in flight will write again), and every address left with
no row, no verdict and no flight, which each slice removes with the rows or verdicts that held
it. Webhook deliveries that ended before the cutoff go too.

Each slice is a short transaction of its own (measured in docs/performance.md), so a cycle never
waits on a prune for more than one slice; a prune stopped anywhere (its deadline, a kill) is
finished by the next one. Removing an address holds the addresses lock alone, as an erasure
does, so admission never names an address being removed.
"""
import json
import time
from dataclasses import dataclass

from peewee import SQL, fn

from bouncer.names import ADDRESSES_LOCK, CHECK_TYPES
from bouncer.queue.erasure import drop_deliveries
from bouncer.queue.outcomes import count_outcomes
from bouncer.queue.progress import has_pending_rows
from bouncer.states import ENDED_BATCH_STATES, FINAL_ROW_STATES, DeliveryState
from bouncer.store.bulk import among
from bouncer.store.database import serialize_on, write_transaction
from bouncer.store.models import (
    RESULT_MODELS, BouncerBatchEmail, EmailGlobal, UserBatch, UserBatchEmail, WebhookDelivery, result_model,
)

Row = UserBatchEmail
InFlight = BouncerBatchEmail
SLICE = 2000      # rows, verdicts or deliveries removed in one transaction


@dataclass
class Pruned:
    """What a prune removed."""
    batches: int = 0
    rows: int = 0
    verdicts: int = 0
    addresses: int = 0
    deliveries: int = 0
    keys: int = 0              # API idempotency records past their 24 h
    unfinished: bool = False   # stopped at its deadline; the next run goes on
    kept_forever: bool = False  # no retention period (RETENTION_DAYS=0): only expired records go

    def summary(self):
        if self.kept_forever:
            text = "RETENTION_DAYS is 0: rows and verdicts are kept forever"
        else:
            text = ("%d user batch(es) pruned, %d row(s), %d verdict(s), %d address(es), %d webhook delivery(ies)"
                    % (self.batches, self.rows, self.verdicts, self.addresses, self.deliveries))
        text += "; %d expired idempotency record(s)" % self.keys
        return text + ("; stopped at its time bound, the next run goes on" if self.unfinished else "")

    @property
    def removed_anything(self):
        return any((self.batches, self.rows, self.verdicts, self.addresses, self.deliveries, self.keys))


class Deadline:
    """A monotonic time after which the prune stops between two slices (None: never)."""

    def __init__(self, seconds=None):
        self.at = time.monotonic() + seconds if seconds is not None else None

    def passed(self):
        return self.at is not None and time.monotonic() > self.at


def prune(cutoff, now, deadline=None):
    """Remove what ended or was checked before `cutoff` (naive UTC) and nobody needs. Returns
    a Pruned report."""
    deadline = deadline or Deadline()
    report = Pruned()
    steps = ([lambda b=b: prune_batch(b, now, report, deadline) for b in batches_to_prune(cutoff)]
             + [lambda t=t: prune_verdicts(t, cutoff, report, deadline) for t in CHECK_TYPES]
             + [lambda: prune_deliveries(cutoff, report, deadline)])
    for step in steps:
        if deadline.passed() or step() is False:
            report.unfinished = True
            break
    return report


# -- user batches --

def batches_to_prune(cutoff):
    """User batches that ended before `cutoff` with nothing pending, not yet pruned or with rows
    left (a prune stopped midway), oldest first."""
    has_rows = fn.EXISTS(Row.select(SQL("1")).where(Row.batch == UserBatch.id))
    query = (UserBatch.select(UserBatch.id)
             .where(UserBatch.status.in_(ENDED_BATCH_STATES) & (UserBatch.completed_at < cutoff)
                    & (UserBatch.pruned_at.is_null() | has_rows) & ~has_pending_rows())
             .order_by(UserBatch.id))
    return [b for (b,) in query.tuples()]


def prune_batch(batch_id, now, report, deadline):
    """Keep the batch's counts on it, then remove its rows a slice at a time. False when the
    deadline came first."""
    keep_counts(batch_id, now)
    while True:
        if deadline.passed():
            return False
        removed, addresses = remove_rows_slice(batch_id)
        report.rows += removed
        report.addresses += addresses
        if removed < SLICE:
            break
    report.batches += 1
    return True


def keep_counts(batch_id, now):
    """The batch's counts, as they are now, stay on it (counted before the write transaction:
    over a large batch the count takes a while, and no row of it changes any more)."""
    batch = UserBatch.get_by_id(batch_id)
    if batch.pruned_at is not None:
        return
    counts = json.dumps(count_outcomes(batch), separators=(",", ":"))
    with write_transaction():
        (UserBatch.update(pruned_at=now, kept_counts=counts)
         .where((UserBatch.id == batch_id) & UserBatch.pruned_at.is_null()).execute())


def remove_rows_slice(batch_id):
    """One slice of the batch's rows, and the addresses they alone held. Returns (rows,
    addresses). Only ended rows: one a host wrote into the batch since it was chosen is left to
    be verified (its batch is pruned again once it ends)."""
    with write_transaction():
        serialize_on(ADDRESSES_LOCK)
        doomed = (Row.select(Row.id).where((Row.batch == batch_id) & Row.status.in_(FINAL_ROW_STATES))
                  .order_by(Row.position).limit(SLICE))
        named = [gid for (gid,) in Row.delete().where(Row.id.in_(doomed)).returning(Row.email_global).tuples()]
        return len(named), drop_unheld_addresses({gid for gid in named if gid is not None})


# -- verdicts and addresses --

def prune_verdicts(check_type, cutoff, report, deadline):
    """Verdicts checked before `cutoff` that no row of their check type names and no Bouncer
    batch in flight will write again, walked once in address order, a slice at a time. False
    when the deadline came first."""
    Result = result_model(check_type)
    after = 0
    while True:
        if deadline.passed():
            return False
        page = [gid for (gid,) in Result.select(Result.email_global)
                .where((Result.email_global > after) & (Result.checked_at < cutoff))
                .order_by(Result.email_global).limit(SLICE).tuples()]
        if not page:
            return True
        verdicts, addresses = remove_verdicts(check_type, page, cutoff)
        report.verdicts += verdicts
        report.addresses += addresses
        after = page[-1]


def remove_verdicts(check_type, global_ids, cutoff):
    """Of `global_ids`, the verdicts still old and unneeded, and the addresses they alone held,
    removed. Returns (verdicts, addresses)."""
    Result = result_model(check_type)
    needed = (fn.EXISTS(Row.select(SQL("1")).where((Row.email_global == Result.email_global)
                                                    & (Row.check_type == check_type)))
              | fn.EXISTS(InFlight.select(SQL("1")).where((InFlight.check_type == check_type)
                                                          & (InFlight.email_global == Result.email_global))))
    with write_transaction():
        serialize_on(ADDRESSES_LOCK)
        query = (Result.delete()
                 .where(among(Result.email_global, global_ids) & (Result.checked_at < cutoff) & ~needed)
                 .returning(Result.email_global))
        removed = [gid for (gid,) in query.tuples()]
        return len(removed), drop_unheld_addresses(removed)


def drop_unheld_addresses(global_ids):
    """Inside a transaction holding the addresses lock: those of `global_ids` that no row names,
    no verdict is stored for and no Bouncer batch in flight holds, removed. Returns how many."""
    if not global_ids:
        return 0
    Address = EmailGlobal
    held = fn.EXISTS(Row.select(SQL("1")).where(Row.email_global == Address.id))
    for Result in RESULT_MODELS.values():
        held |= fn.EXISTS(Result.select(SQL("1")).where(Result.email_global == Address.id))
    held |= fn.EXISTS(InFlight.select(SQL("1")).where(InFlight.check_type.in_(CHECK_TYPES)
                                                      & (InFlight.email_global == Address.id)))
    return Address.delete().where(among(Address.id, global_ids) & ~held).execute()


# -- webhook deliveries --

def prune_deliveries(cutoff, report, deadline):
    """Deliveries that ended (delivered, given up, no target) before `cutoff`, with their
    attempts, a slice at a time. False when the deadline came first."""
    ended = (WebhookDelivery.state != DeliveryState.PENDING) & (WebhookDelivery.created_at < cutoff)
    while True:
        if deadline.passed():
            return False
        with write_transaction():
            ids = [d for (d,) in WebhookDelivery.select(WebhookDelivery.id).where(ended).limit(SLICE).tuples()]
            removed = drop_deliveries(among(WebhookDelivery.id, ids)) if ids else 0
        report.deliveries += removed
        if removed < SLICE:
            return True
