"""An API request's Idempotency-Key, per token (a digest of it, never the token), kept 24 h: a
retry of the same request answers with the same batch, another request with the same key is a
conflict. Remembered in the transaction that makes the batch visible, so two requests racing
with one key cannot both make a batch (the unique index refuses the second)."""
import datetime
import json

from bouncer.store.database import write_transaction
from bouncer.store.models import IdempotencyKey

KEPT = datetime.timedelta(hours=24)


def answered_before(token_digest, key, now):
    """The earlier answer under this key within KEPT: (request digest, batch id, invalid lines),
    or None."""
    earlier = IdempotencyKey.get_or_none((IdempotencyKey.token_digest == token_digest)
                                         & (IdempotencyKey.key == key) & (IdempotencyKey.created_at > now - KEPT))
    if earlier is None:
        return None
    return earlier.request_digest, earlier.batch_id, json.loads(earlier.invalid_lines)


def remember(token_digest, key, request_digest, batch_id, invalid_lines, now):
    """Inside the transaction that makes the batch visible: this key answers with this batch."""
    IdempotencyKey.delete().where((IdempotencyKey.token_digest == token_digest) & (IdempotencyKey.key == key)
                                  & (IdempotencyKey.created_at <= now - KEPT)).execute()
    IdempotencyKey.create(token_digest=token_digest, key=key, request_digest=request_digest, batch_id=batch_id,
                          invalid_lines=json.dumps(invalid_lines), created_at=now)


def forget_expired(now, slice_size=2000):
    """Remove the keys past KEPT, a slice per transaction; returns how many."""
    removed = 0
    while True:
        with write_transaction():
            doomed = (IdempotencyKey.select(IdempotencyKey.id).where(IdempotencyKey.created_at <= now - KEPT)
                      .limit(slice_size))
            gone = IdempotencyKey.delete().where(IdempotencyKey.id.in_(doomed)).execute()
        removed += gone
        if gone < slice_size:
            return removed
