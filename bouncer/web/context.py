"""What every route reads of its web process: the App (settings, Redis, the Bouncer client) and
when the process came up (/health counts a job never seen to succeed from then)."""
from flask import current_app


def bouncer_app():
    return current_app.extensions["bouncer"]


def started_at():
    return current_app.extensions["bouncer.started_at"]
