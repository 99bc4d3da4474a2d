"""What a cycle needs to run: settings, the database, Redis and the Bouncer client, built once
per process from the environment (or handed in by a test)."""

import logging
from functools import cached_property

from bouncer.config import load_settings
from bouncer.store.database import open_database

log = logging.getLogger(__name__)


class App:
    def __init__(self, settings, redis=None, client=None):
        self.settings = settings
        if redis is not None:
            self.redis = redis
        if client is not None:
            self.client = client

    @cached_property
    def redis(self):
        from redis import Redis
        return Redis.from_url(self.settings.redis_url, socket_timeout=10, socket_connect_timeout=5)

    @cached_property
    def client(self):
        from bouncer.client import BouncerClient
        s = self.settings
        return BouncerClient(s.api_url, s.api_key, timeout=s.bouncer_timeout,
                             connect_timeout=s.bouncer_connect_timeout, catchall_path=s.catchall_path)

    def callback_url(self, check_type, reservation=None):
        """Where Bouncer should say a batch is done, when the web process is reachable. It names
        the reservation, so that the callback of a batch whose create went unanswered can be
        recognised, and that batch followed instead of its emails sent again."""
        s = self.settings
        if not (s.public_url and s.callback_secret):
            return None
        url = "%s/bouncer/callback/%s/%s" % (s.public_url, s.callback_secret, check_type)
        return url + ("?reservation=%d" % reservation if reservation is not None else "")


_current = None


def current_app():
    """The process's App, created (and its database opened) on first use."""
    global _current
    if _current is None:
        settings = load_settings()
        open_database(settings.database_url)
        _current = App(settings)
    return _current


def set_current_app(app):
    global _current
    _current = app

