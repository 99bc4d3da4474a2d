"""Logging for every process: one line per event on stderr, secrets masked at the last moment.

`LOG_FORMAT=text` (default): `time LEVEL logger: message`. `LOG_FORMAT=json`: one JSON object a
line, with the ids a line is about (`ledger_id`, `bouncer_id`, `user_batch_id`, `job_id`,
`check_type`) as fields of their own, passed by the code as `extra=ids(...)`.
"""
import datetime
import json
import logging
import sys

from bouncer.masking import mask_secrets

ID_FIELDS = ("ledger_id", "bouncer_id", "user_batch_id", "job_id", "check_type", "cycle")
# Per-request chatter from libraries is noise next to the cycle's own lines.
QUIET_LIBRARIES = ("urllib3", "peewee", "waitress.queue")
# rq and rq-scheduler say at INFO what every job does (three lines a run, every few seconds);
# the service says it once, for a cycle that did something. Heard again at LOG_LEVEL=DEBUG.
QUIET_UNLESS_DEBUG = ("rq.worker", "rq_scheduler")


def ids(**values):
    """`extra` for a log call: the ids the line is about, for JSON logs."""
    return {name: value for name, value in values.items() if value is not None}


class MaskingFormatter(logging.Formatter):
    """Masks every secret of the settings in each formatted line, tracebacks included, whatever
    code (ours or a library's) produced it."""

    def __init__(self, secrets, fmt=None):
        super().__init__(fmt)
        self.secrets = [s for s in secrets if s]

    def format(self, record):
        return mask_secrets(self.render(record), self.secrets)

    def render(self, record):
        return super().format(record)


class JsonFormatter(MaskingFormatter):
    def render(self, record):
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((name, getattr(record, name)) for name in ID_FIELDS if hasattr(record, name))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup_logging(settings=None):
    """Send every logger's lines to stderr, in the settings' format and level."""
    level = settings.log_level if settings else "INFO"
    secrets = settings.secrets() if settings else ()
    handler = logging.StreamHandler(sys.stderr)
    if settings is not None and settings.log_format == "json":
        handler.setFormatter(JsonFormatter(secrets))
    else:
        handler.setFormatter(MaskingFormatter(secrets, "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in QUIET_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for chatty in QUIET_UNLESS_DEBUG:
        logging.getLogger(chatty).setLevel(logging.NOTSET if level == "DEBUG" else logging.WARNING)
