"""What every route reads of its web process: the App (settings, Redis, the Bouncer client) and
when the process came up (/health counts a job never seen to succeed from then)."""
from apiflask import abort
from flask import current_app

from bouncer.errors import NotFound
from bouncer.reading.batches import batch_status


def bouncer_app():
    return current_app.extensions["bouncer"]


def started_at():
    return current_app.extensions["bouncer.started_at"]


def batch_status_or_404(batch_id):
    """The status object of a user batch; a 404 when there is none."""
    try:
        return batch_status(batch_id)
    except NotFound:
        abort(404)
