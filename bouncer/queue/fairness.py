"""Fair share between users (QUEUE_POLICY=fair): the turn each row in line takes.

Packing walks the line in order of (check type, turn, place in line, position). Under `fifo`
every turn is 0, so the walk is the original plan's FIFO. Under `fair` the turns come from
start-time fair queueing (SFQ: Goyal, Vin and Cheng, SIGCOMM 1996) over users, a row being one
unit of work, computed when rows join the line:
- a row of user u takes the turn max(V, F_u + 1/w_u) and each next one of u 1/w_u more, where V
  (the line's virtual time) is the smallest turn in line and F_u the turn of u's last row in
  line: the rows of the users with rows in line interleave in proportion to their weights w,
  each user's own rows keep their order, and a user with nothing in line starts from V, with no
  credit for the time it had nothing queued;
- rows going back in line (their Bouncer call failed) take turns just below V, in their order:
  they lead the next batch, as under FIFO;
- rows older than some of their user's rows already in line (written late into an earlier
  batch; two batches of one user admitted side by side) number that user's rows anew from their
  place, so the user's own order holds;
- a creation cycle that runs with another QUEUE_POLICY than the line is ordered by, or finds a
  weight changed, numbers what is still in line anew, in one statement and one transaction,
  under the reservation's lock (`order_line`).

Why SFQ and not deficit round robin (DRR): DRR decides while packing, round by round over the
users with rows in line, with a deficit per user carried from batch to batch. Packing would walk
one list per user (a query per user for every batch, thousands of them with many small users)
instead of one index in order, and the deficits would be state of their own for a dead cycle to
leave half written. SFQ numbers each row once, in the statement that puts it in line anyway;
packing, its kill -9 recovery, the cap and the rate limit work as under FIFO. Its unit is a row
walked: a repeat of an address or a cached verdict costs its user a turn but no slot, so
shares are of rows, which are addresses sent but for those.

Locks (PostgreSQL; SQLite serializes every writer anyway): an admitter holds `line:<check type>`
shared and, under `fair`, `line:<check type>:<user>`, so two admitters of one user number in
turn; rows going back in line and `order_line` hold `line:<check type>` alone.
"""

import datetime
import logging
import math

from peewee import JOIN, SQL, Case, Tuple, fn

from bouncer.errors import InputError
from bouncer.names import FAIR, FIFO
from bouncer.store.bulk import among, insert_tuples
from bouncer.store.database import database, serialize_on, utcnow, write_transaction
from bouncer.store.models import LineOrder, LineWeight, QueuedEmail, SentShare, UserWeight

log = logging.getLogger(__name__)

Line = QueuedEmail
DEFAULT_WEIGHT = 1.0
# Weights a person may set; one a host writes outside them counts as the nearest bound (a
# weight of 1e-300 would push its user's turns past what a float holds).
MIN_WEIGHT, MAX_WEIGHT = 0.001, 1000.0
MAX_USER_ID = 200
# The users' shares of what was sent are kept as long as the request history.
KEEP_SHARES = datetime.timedelta(hours=24)


# -- weights --

def weight_of(user_id):
    """The user's weight (1 when none is stored), within the bounds."""
    return weights_of([user_id])[user_id]


def stored_weight(user_id):
    """The user's weight as stored, None when none is."""
    return UserWeight.select(UserWeight.weight).where(UserWeight.user_id == user_id).scalar()


def weights_of(user_ids):
    """{user id: its weight, 1 when none is stored, within the bounds} for `user_ids`."""
    found = dict(UserWeight.select(UserWeight.user_id, UserWeight.weight)
                 .where(among(UserWeight.user_id, list(user_ids))).tuples()) if user_ids else {}
    return {user_id: bounded(found.get(user_id, DEFAULT_WEIGHT)) for user_id in user_ids}


def set_weight(user_id, weight):
    """Store the user's weight (what a host's INSERT ... ON CONFLICT does). InputError for a user
    id or a weight out of bounds; the database itself refuses a weight not above 0."""
    user_id, weight = checked_user(user_id), checked_weight(weight)
    (UserWeight.insert(user_id=user_id, weight=weight)
     .on_conflict(conflict_target=[UserWeight.user_id], update={UserWeight.weight: weight}).execute())
    return weight


def checked_user(user_id):
    text = "" if user_id is None else str(user_id)
    if not text.strip() or len(text) > MAX_USER_ID:
        raise InputError("a user id is 1 to %d characters, not blank" % MAX_USER_ID)
    return text


def checked_weight(weight):
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise InputError("weight %r is not a number; give one from %g to %g"
                         % (weight, MIN_WEIGHT, MAX_WEIGHT)) from None
    if not (math.isfinite(value) and MIN_WEIGHT <= value <= MAX_WEIGHT):
        raise InputError("weight %s is out of bounds; give one from %g to %g (1 is everyone's share; "
                         "2 twice that)" % (weight, MIN_WEIGHT, MAX_WEIGHT))
    return value


def bounded(weight):
    """A weight as the line counts it: within the bounds. PostgreSQL takes 'NaN' as above 0 (and
    above every number, so the SQL below makes it the largest); so does this."""
    if math.isnan(weight):
        return MAX_WEIGHT
    return min(max(weight, MIN_WEIGHT), MAX_WEIGHT)


def step_of(user_id):
    """How far apart the turns of a user's rows are: 1 / its weight."""
    return 1.0 / weight_of(user_id)


def bounded_weight_sql(column):
    """`column` (NULL: 1) within MIN_WEIGHT and MAX_WEIGHT, in SQL both databases speak (NaN,
    which PostgreSQL sorts above every number, counts as MAX_WEIGHT)."""
    weight = fn.COALESCE(column, DEFAULT_WEIGHT)
    return Case(None, ((weight < MIN_WEIGHT, MIN_WEIGHT), (weight > MAX_WEIGHT, MAX_WEIGHT)), weight)


# -- the policy the line is ordered by --

def line_policy(check_type):
    """The policy the line of `check_type` is ordered by now (`fifo` until a cycle ordered it
    otherwise)."""
    return LineOrder.select(LineOrder.policy).where(LineOrder.check_type == check_type).scalar() or FIFO


def line_lock(check_type, user_id=None):
    return "line:%s" % check_type if user_id is None else "line:%s:%s" % (check_type, user_id)


# -- rows joining the line --

def turns_for_new_rows(check_type, user_id, place):
    """Inside an admitter's write transaction, before rows of `user_id` join the line, the first
    one at `place` (place in line, position): (the first one's turn, the step between the next
    ones, the place to number the user's rows anew from after they joined, or None)."""
    serialize_on(line_lock(check_type), shared=True)
    if line_policy(check_type) != FAIR:
        return 0.0, 0.0, None
    serialize_on(line_lock(check_type, user_id))
    step = step_of(user_id)
    front, last = front_turn(check_type), last_row_of(check_type, user_id)
    if last is None:
        return front, step, None
    last_turn, last_place = last[0], tuple(last[1:])
    return max(front, last_turn + step), step, place if last_place > tuple(place) else None


def front_turn(check_type):
    """V, the line's virtual time: the smallest turn in line (0 for an empty line)."""
    return Line.select(fn.MIN(Line.turn)).where(Line.check_type == check_type).scalar() or 0.0


def last_row_of(check_type, user_id):
    """(turn, place in line, position) of the user's last row in line, or None."""
    return (Line.select(Line.turn, Line.fifo_order, Line.position)
            .where((Line.check_type == check_type) & (Line.user_id == user_id))
            .order_by(Line.fifo_order.desc(), Line.position.desc()).limit(1).tuples().first())


def keep_user_order(check_type, user_id, renumber_from):
    """After rows joined the line: when they were older than some of the user's rows in line,
    number the user's rows anew from their place (see `turns_for_new_rows`)."""
    if renumber_from is not None:
        renumber(check_type, [user_id], renumber_from)


def turns_for_returning_rows(check_type, rows):
    """Inside the write transaction that puts `rows` (user id, place in line, position) back in
    line: their turns, in the same order. Under `fair`, each user's just below the line's front,
    in their order; a user with an older row in line is numbered anew after (`renumber_users`
    says which)."""
    serialize_on(line_lock(check_type))
    if line_policy(check_type) != FAIR or not rows:
        return [0.0] * len(rows), []
    front = front_turn(check_type)
    steps = {user_id: 1.0 / w for user_id, w in weights_of({r[0] for r in rows}).items()}
    turns, later = {}, {}
    for user_id, fifo_order, position in sorted(rows, reverse=True):
        later[user_id] = later.get(user_id, 0) + 1
        turns[(user_id, fifo_order, position)] = front - later[user_id] * steps[user_id]
    youngest = {}
    for user_id, fifo_order, position in rows:
        youngest[user_id] = max(youngest.get(user_id, (fifo_order, position)), (fifo_order, position))
    disordered = [u for u, place in youngest.items() if has_row_before(check_type, u, place)]
    return [turns[tuple(row)] for row in rows], disordered


def has_row_before(check_type, user_id, place):
    return (Line.select().where((Line.check_type == check_type) & (Line.user_id == user_id)
                                & (Tuple(Line.fifo_order, Line.position) < Tuple(*place))).exists())


def renumber_users(check_type, user_ids):
    """Number the rows in line of `user_ids` anew from their first one (after rows went back in
    line out of their order)."""
    if user_ids:
        renumber(check_type, sorted(user_ids))


# -- numbering the line anew --

def renumber(check_type, user_ids=None, place=None):
    """One statement: the rows in line of `check_type` (of `user_ids`; from `place` on, for one
    user) take, user by user, the turn of the first of them, then 1/weight more each, in their
    order (place in line, position). Returns how many rows it numbered."""
    Ranked = QueuedEmail.alias("ranked")
    order = [Ranked.fifo_order, Ranked.position]
    by_user = [Ranked.user_id]
    turns = (fn.MIN(Ranked.turn).over(partition_by=by_user)
             + (fn.ROW_NUMBER().over(partition_by=by_user, order_by=order) - 1)
             / bounded_weight_sql(UserWeight.weight))
    ranked = (Ranked.select(Ranked.row.alias("row_id"), turns.alias("turn"))
              .join(UserWeight, JOIN.LEFT_OUTER, on=(UserWeight.user_id == Ranked.user_id))
              .where(Ranked.check_type == check_type))
    if user_ids is not None:
        ranked = ranked.where(among(Ranked.user_id, user_ids))
    if place is not None:
        ranked = ranked.where(Tuple(Ranked.fifo_order, Ranked.position) >= Tuple(*place))
    numbered = ranked.alias("numbered")
    return (Line.update(turn=numbered.c.turn).from_(numbered)
            .where(Line.row == numbered.c.row_id).execute())


def order_line(check_type, policy):
    """Order the line of `check_type` by `policy` and by the weights as they are now, if it is
    not: in one transaction under the reservation's lock, so no reservation walks a line half
    numbered and a kill -9 leaves it as it was. Found by reads when there is nothing to do (nearly
    always). Returns how many rows took a new turn (None: nothing to do)."""
    if is_ordered_by(check_type, policy):
        return None
    with write_transaction():
        serialize_on("reservation:%s" % check_type)
        serialize_on(line_lock(check_type))
        if is_ordered_by(check_type, policy):
            return None     # another cycle did it meanwhile (a lost cycle lock)
        before = line_policy(check_type)
        if policy == FIFO:
            moved = Line.update(turn=0.0).where((Line.check_type == check_type) & (Line.turn != 0)).execute()
            LineWeight.delete().where(LineWeight.check_type == check_type).execute()
        else:
            users = changed_weights(check_type) if before == FAIR else None
            moved = renumber(check_type, users)
            keep_weights(check_type, users)
        LineOrder.insert(check_type=check_type, policy=policy).on_conflict(
            conflict_target=[LineOrder.check_type], update={LineOrder.policy: policy}).execute()
    log.info("The %s line is ordered by %s now%s: %d row(s) in line took a new turn", check_type, policy,
                " (it was %s)" % before if before != policy else ", with the weights as they are", moved)
    return moved


def is_ordered_by(check_type, policy):
    return line_policy(check_type) == policy and (policy == FIFO or not changed_weights(check_type))


def changed_weights(check_type):
    """The users whose weight is not the one the line was numbered by (a host or `weight`
    changed it since)."""
    Now, Then = UserWeight, LineWeight
    then = (Then.check_type == check_type) & (Then.user_id == Now.user_id)
    added_or_changed = (Now.select(Now.user_id).join(Then, JOIN.LEFT_OUTER, on=then)
                        .where(Then.weight.is_null() | (Then.weight != Now.weight)))
    removed = (Then.select(Then.user_id)
               .join(Now, JOIN.LEFT_OUTER, on=(Now.user_id == Then.user_id))
               .where((Then.check_type == check_type) & Now.user_id.is_null()))
    return sorted({user_id for (user_id,) in (added_or_changed | removed).tuples()})


def keep_weights(check_type, user_ids=None):
    """Record the weights (of `user_ids`; all) as the ones the line is numbered by now."""
    forget = LineWeight.delete().where(LineWeight.check_type == check_type)
    copy = UserWeight.select(SQL("%s" % database.param, [check_type]), UserWeight.user_id, UserWeight.weight)
    if user_ids is not None:
        forget = forget.where(among(LineWeight.user_id, user_ids))
        copy = copy.where(among(UserWeight.user_id, user_ids))
    forget.execute()
    LineWeight.insert_from(copy, [LineWeight.check_type, LineWeight.user_id, LineWeight.weight]).execute()


# -- the users' shares of what was sent --

def record_shares(ledger_id, check_type, shares, now):
    """`shares`: {user id: new addresses} of a Bouncer batch being reserved."""
    insert_tuples(SentShare, ("bouncer_batch", "check_type", "user_id", "addresses", "reserved_at"),
                  [(ledger_id, check_type, user_id, n, now) for user_id, n in shares.items()])


def forget_shares_of(ledger_id):
    """A reservation undone leaves no share behind."""
    SentShare.delete().where(SentShare.bouncer_batch == ledger_id).execute()


def forget_user(user_id):
    """What fair share holds of a user who is erased: the weight, the weight the line was numbered
    by, the shares of what was sent. Returns how many weights went (0 or 1)."""
    with write_transaction():
        LineWeight.delete().where(LineWeight.user_id == user_id).execute()
        SentShare.delete().where(SentShare.user_id == user_id).execute()
        return UserWeight.delete().where(UserWeight.user_id == user_id).execute()


def forget_old_shares(now=None):
    """Drop the shares older than KEEP_SHARES; a read first, so nothing is locked when none is."""
    old = SentShare.reserved_at < (now or utcnow()) - KEEP_SHARES
    if SentShare.select().where(old).exists():
        SentShare.delete().where(old).execute()
