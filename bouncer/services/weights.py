"""Users' weights under QUEUE_POLICY=fair, for the CLI and the console (a host may write
`user_weights` with SQL itself). A change is audited, and takes effect for the rows in line at
the next creation cycle."""
import logging

from bouncer.queue import fairness
from bouncer.queue.audit import audit
from bouncer.store.database import write_transaction

log = logging.getLogger(__name__)


def set_user_weight(user_id, weight, who):
    """Store the user's weight (InputError for one out of bounds); returns (before, after)."""
    with write_transaction():
        before = fairness.weight_of(fairness.checked_user(user_id))
        after = fairness.set_weight(user_id, weight)
        audit(who, "weight", "user %s" % user_id, "from %g to %g" % (before, after))
    log.info("User %r weighs %g now (was %g), set by the %s", user_id, after, before, who)
    return before, after
