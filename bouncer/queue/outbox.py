"""The outbox: a webhook delivery written for each user batch that ends, in the very transaction
that ends it (progress.py), so none is missed and none is told twice. The news layer
(news/webhooks.py) delivers them."""
import json
import logging
import os

from bouncer.queue.outcomes import count_outcomes_of, status_object
from bouncer.queue.waiting import waiting_of
from bouncer.store.bulk import among, chunked, insert_tuples
from bouncer.store.models import UserBatch, WebhookDelivery

log = logging.getLogger(__name__)


ENDINGS_PER_STATEMENT = 1000   # user batches whose endings are written by one statement
DELIVERY_COLUMNS = ("batch_id", "event", "message_id", "payload", "next_attempt_at", "created_at")


def record_endings(ended, now):
    """Inside the transaction that ended them: one delivery for each (batch, status) that ended,
    its payload the status object at that moment. A few statements for any number of endings."""
    if not ended:
        return
    timestamp = now.isoformat(timespec="seconds") + "Z"
    for part in chunked(ended, ENDINGS_PER_STATEMENT):
        status_of = dict(part)
        batches = list(UserBatch.select().where(among(UserBatch.id, status_of)).order_by(UserBatch.id))
        counts, waiting = count_outcomes_of(batches), waiting_of(batches, now)
        rows = []
        for batch in batches:
            event = "batch.%s" % status_of[batch.id]
            payload = {"type": event, "timestamp": timestamp,
                       "data": status_object(batch, counts[batch.id], waiting[batch.id])}
            rows.append((batch.id, event, "msg_%s" % os.urandom(12).hex(),
                         json.dumps(payload, separators=(",", ":")), now, now))
        insert_tuples(WebhookDelivery, DELIVERY_COLUMNS, rows)

