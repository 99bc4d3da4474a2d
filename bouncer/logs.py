"""Logging for every process: one line per event on stderr, secrets masked at the last moment."""
import logging
import os
import sys

MASK = "***"
MIN_SECRET_LENGTH = 8


class SecretMaskingFormatter(logging.Formatter):
    """Masks the API key and the callback secret in every formatted line, tracebacks included,
    whatever code (ours or a library's) produced it."""

    def __init__(self, fmt, secrets):
        super().__init__(fmt)
        # A secret shorter than this would mask pieces of ordinary words; config refuses them.
        self.secrets = [s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH]

    def format(self, record):
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text


def setup_logging(settings=None, level=None):
    secrets = (settings.api_key, settings.callback_secret) if settings else ()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SecretMaskingFormatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s", secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("LOG_LEVEL", "INFO").upper())
    # Per-request chatter from libraries is noise next to the cycle's own lines.
    for noisy in ("urllib3", "peewee"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
