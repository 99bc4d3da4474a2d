"""The spelling an address goes by where no row is: the one sent to Bouncer for it while it is in
flight (`bouncer_batch_emails.email_sent`) and the one Bouncer's record echoes in its verdict
(`raw`). Each must be a spelling some row still holds: after an erasure, one of a remaining
holder (their oldest row's, as packing would have sent); after an ingest that matched a record
by its stripped form, the one sent.
"""
import json

from peewee import fn

from bouncer.store.bulk import among
from bouncer.store.models import RESULT_MODELS, BouncerBatchEmail, UserBatchEmail

Row = UserBatchEmail
InFlight = BouncerBatchEmail


def oldest_spellings(global_ids):
    """{address id: the spelling of its oldest row} of those of `global_ids` a row still names."""
    if not global_ids:
        return {}
    oldest = Row.select(fn.MIN(Row.id)).where(among(Row.email_global, global_ids)).group_by(Row.email_global)
    return dict(Row.select(Row.email_global, Row.email).where(Row.id.in_(oldest)).tuples())


def held(pairs):
    """Those of `pairs` (address id, spelling) that a row still holds."""
    pairs = set(pairs)
    if not pairs:
        return set()
    query = (Row.select(Row.email_global, Row.email).distinct()
             .where(among(Row.email_global, {g for g, _ in pairs}) & among(Row.email, {e for _, e in pairs})))
    return pairs & set(query.tuples())


def respell_in_flight(spellings):
    """Addresses in flight sent under a spelling no row holds any more are said, from here on,
    to have been sent as `spellings[address id]` (the record Bouncer sends back still names the
    old one; ingest matches it by its stripped form and stores the new one). Returns how many."""
    if not spellings:
        return 0
    sent = set(InFlight.select(InFlight.email_global, InFlight.email_sent)
               .where(among(InFlight.email_global, spellings)).tuples())
    stale = sent - held(sent)
    for global_id, email in stale:
        (InFlight.update(email_sent=spellings[global_id])
         .where((InFlight.email_global == global_id) & (InFlight.email_sent == email)).execute())
    return len(stale)


def respell_verdicts(spellings, only_unheld=True, check_types=None):
    """The verdicts (of `check_types`, default all) of these addresses whose record names a
    spelling no row holds (any other spelling, when not `only_unheld`) name
    `spellings[address id]` instead. Returns how many."""
    changed = 0
    if not spellings:
        return changed
    for check_type, Result in RESULT_MODELS.items():
        if check_types is not None and check_type not in check_types:
            continue
        records = {gid: json.loads(raw) for gid, raw in Result.select(Result.email_global, Result.raw)
                   .where(among(Result.email_global, spellings)).tuples()}
        named = {(gid, record.get("email")) for gid, record in records.items()
                 if isinstance(record, dict) and isinstance(record.get("email"), str)}
        keep = held(named) if only_unheld else {(gid, spellings[gid]) for gid in spellings}
        for global_id in {gid for gid, _ in named - keep}:
            rewrite_record(Result, global_id, records[global_id], spellings[global_id])
            changed += 1
    return changed


def rewrite_record(Result, global_id, record, spelling):
    """The stored record names `spelling`; Bouncer's suggestion for the old one goes with it."""
    record["email"] = spelling
    if record.get("didYouMean"):
        record["didYouMean"] = None
    Result.update(raw=json.dumps(record, ensure_ascii=False)).where(Result.email_global == global_id).execute()
