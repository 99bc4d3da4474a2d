"""Settings: read once from the environment, validated, with messages that say how to fix them.

Every setting is one field of `Settings`, declared with its environment variable and its range;
`load_settings` reads them all from those declarations. Nothing else in the package reads
os.environ. A value out of its range stops the process with one line naming the variable.
"""

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

from bouncer.errors import ConfigError
from bouncer.masking import redact_url
from bouncer.names import FIFO, QUEUE_POLICIES

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


MIN_SECRET_LENGTH = 8
# The longest interval rq-scheduler and Python's timers take without overflowing (2^31 ms).
MAX_INTERVAL = 86400
MAX_BATCH_EMAILS = 100_000          # Bouncer's own ceiling for one batch


# Bouncer creates a batch within a few seconds; a read that takes longer than this is a timeout.
# A worker stopped by the platform (SIGTERM, then SIGKILL 30 s later) lets a call in flight
# finish, so no Bouncer call may outlast that grace (see bouncer.worker.SHUTDOWN_GRACE).
MAX_BOUNCER_TIMEOUT = 25


def setting(env, default=None, kind="str", minimum=None, maximum=None, secret=False, choices=None):
    """A field of Settings read from environment variable `env`."""
    return field(default=default, metadata={
        "env": env, "kind": kind, "minimum": minimum, "maximum": maximum, "secret": secret,
        "choices": choices})


@dataclass(frozen=True)
class Settings:
    database_url: str = setting("DATABASE_URL", "sqlite:///bouncer.db", kind="url")
    redis_url: str = setting("REDIS_URL", "redis://localhost:6379/0", kind="url")
    api_key: str | None = setting("BOUNCER_API_KEY", secret=True)
    api_url: str = setting("BOUNCER_API_URL", "https://api.usebouncer.com", kind="base_url")
    batch_create_interval: int = setting("BATCH_CREATE_INTERVAL", 5, "int", 1, MAX_INTERVAL)
    status_check_interval: int = setting("STATUS_CHECK_INTERVAL", 30, "int", 1, MAX_INTERVAL)
    batch_size: int = setting("BOUNCER_BATCH_SIZE", 10000, "int", 1, MAX_BATCH_EMAILS)
    max_outstanding: int = setting("BOUNCER_MAX_OUTSTANDING", 15, "int", 1, 100)
    rate_limit_per_minute: int = setting("RATE_LIMIT_PER_MINUTE", 200, "int", 1, 100_000)
    rate_limit_buffer: int = setting("RATE_LIMIT_BUFFER", 180, "int", 1, 100_000)
    bouncer_timeout: int = setting("BOUNCER_TIMEOUT", 20, "int", 1, MAX_BOUNCER_TIMEOUT)
    bouncer_connect_timeout: int = setting("BOUNCER_CONNECT_TIMEOUT", 5, "int", 1, MAX_BOUNCER_TIMEOUT)
    reservation_timeout: int = setting("RESERVATION_TIMEOUT", 600, "int", 1, 7 * 86400)
    batch_timeout: int = setting("BATCH_TIMEOUT", 86400, "int", 1, 30 * 86400)
    result_cache_days: int = setting("RESULT_CACHE_DAYS", 30, "int", 0, 3650)
    retention_days: int = setting("RETENTION_DAYS", 0, "int", 0, 36500)
    queue_policy: str = setting("QUEUE_POLICY", FIFO, choices=QUEUE_POLICIES)
    catchall_path: str = setting("BOUNCER_CATCHALL_PATH", "/v1.1/email/verify/batch")
    public_url: str | None = setting("PUBLIC_URL", kind="base_url")
    callback_secret: str | None = setting("CALLBACK_SECRET", secret=True)
    port: int = setting("PORT", 8000, "int", 1, 65535)
    log_level: str = setting("LOG_LEVEL", "INFO", choices=LOG_LEVELS)
    log_format: str = setting("LOG_FORMAT", "text", choices=LOG_FORMATS)
    api_tokens: tuple = setting("API_TOKENS", (), kind="list", secret=True)
    api_max_emails: int = setting("API_MAX_EMAILS", 1_000_000, "int", 1, 10_000_000)
    webhook_url: str | None = setting("WEBHOOK_URL", kind="url")
    webhook_secret: str | None = setting("WEBHOOK_SECRET", secret=True)
    webhook_retry_schedule: tuple = setting("WEBHOOK_RETRY_SCHEDULE", (5, 300, 1800, 7200, 18000, 36000),
                                            kind="int_list", minimum=1, maximum=MAX_INTERVAL)
    webhook_timeout: int = setting("WEBHOOK_TIMEOUT", 10, "int", 1, 60)
    operator_password: str | None = setting("OPERATOR_PASSWORD", secret=True)
    metrics_token: str | None = setting("METRICS_TOKEN", secret=True)
    erasure_audit_key: str | None = setting("ERASURE_AUDIT_KEY", secret=True)
    unknown_rechecks: int = setting("UNKNOWN_RECHECKS", 1, "int", 0, 10)
    unknown_recheck_max_delay: int = setting("UNKNOWN_RECHECK_MAX_DELAY", 3600, "int", 0, 86400)
    delete_results: bool = setting("BOUNCER_DELETE_RESULTS", False, kind="bool")
    # Tokens of the API that see every batch (the SQL door's and the CLI's too); API_TOKENS see
    # only the batches they created.
    api_operator_tokens: tuple = setting("API_OPERATOR_TOKENS", (), kind="list", secret=True)
    webhook_allow_private: bool = setting("WEBHOOK_ALLOW_PRIVATE", False, kind="bool")
    host: str = setting("HOST", "0.0.0.0", kind="host")

    def __repr__(self):
        # No secret may reach a log line through a repr: passwords in URLs are masked, secrets
        # are only said to be set or not.
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"]:
                shown.append("%s=%s" % (f.name, "set" if value else "unset"))
            elif f.metadata["kind"] in URL_KINDS and value:
                shown.append("%s=%r" % (f.name, redact_url(value)))
            else:
                shown.append("%s=%r" % (f.name, value))
        return "Settings(%s)" % ", ".join(shown)

    __str__ = __repr__

    def replace(self, **changes):
        """A copy with some fields changed, validated."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values).validate()

    @property
    def keyless_for_bouncer(self):
        """Whether the service would call Bouncer's own API with no key: it then sends nothing
        (a local sandbox, which takes any key, is another URL)."""
        return not self.api_key and (urlsplit(self.api_url).hostname or "").endswith(BOUNCER_DOMAIN)

    @property
    def every_api_token(self):
        """Every token the API takes: API_TOKENS and API_OPERATOR_TOKENS."""
        return self.api_tokens + self.api_operator_tokens

    def secrets(self):
        """Every secret these settings hold: keys, tokens, and passwords inside URLs."""
        found = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"]:
                found.extend(value if isinstance(value, tuple) else [value])
            elif f.metadata["kind"] in URL_KINDS and value:
                found.append(urlsplit(value).password)
        return [s for s in found if s]

    def validate(self):
        for f in fields(self):
            check_range(f, getattr(self, f.name))
        check_url("DATABASE_URL", self.database_url, ("sqlite", "postgres", "postgresql"))
        check_redis_url(self.redis_url)
        check_url("BOUNCER_API_URL", self.api_url, ("http", "https"))
        if self.rate_limit_buffer > self.rate_limit_per_minute:
            raise ConfigError(
                "RATE_LIMIT_BUFFER=%s exceeds RATE_LIMIT_PER_MINUTE=%s; lower the buffer so the "
                "service stays under Bouncer's limit" % (self.rate_limit_buffer, self.rate_limit_per_minute))
        if self.reservation_timeout <= self.bouncer_timeout:
            raise ConfigError(
                "RESERVATION_TIMEOUT=%s must exceed BOUNCER_TIMEOUT=%s, or a slow but live Bouncer "
                "call would have its emails queued again" % (self.reservation_timeout, self.bouncer_timeout))
        for f in fields(self):
            value = getattr(self, f.name)
            for secret in (value if isinstance(value, tuple) else [value]):
                if f.metadata["secret"] and secret and len(secret) < MIN_SECRET_LENGTH:
                    raise ConfigError("%s is too short to be real (fewer than %d characters); check it"
                                      % (f.metadata["env"], MIN_SECRET_LENGTH))
        check_host(self.host)
        if not self.catchall_path.startswith("/"):
            raise ConfigError("BOUNCER_CATCHALL_PATH=%r must start with '/'" % self.catchall_path)
        self.check_callback()
        self.check_webhooks()
        self.check_erasure_key()
        return self

    def check_callback(self):
        if not self.public_url:
            return
        check_url("PUBLIC_URL", self.public_url, ("http", "https"))
        if not self.callback_secret:
            raise ConfigError("PUBLIC_URL is set but CALLBACK_SECRET is not; set CALLBACK_SECRET "
                              "to a long random string (it is part of the callback URL)")
        if not URL_SAFE_SECRET.fullmatch(self.callback_secret):
            raise ConfigError("CALLBACK_SECRET may hold only letters, digits, '-', '_', '.' and '~' "
                              "(it is part of the callback URL); make one with "
                              "`python -c \"import secrets; print(secrets.token_urlsafe(32))\"`")

    def check_webhooks(self):
        if self.webhook_url:
            check_url("WEBHOOK_URL", self.webhook_url, ("http", "https"))
            if not self.webhook_secret:
                raise ConfigError("WEBHOOK_URL is set but WEBHOOK_SECRET is not; set WEBHOOK_SECRET "
                                  "to a Standard Webhooks secret (whsec_ followed by base64)")
        if self.webhook_secret and not WEBHOOK_SECRET_FORM.fullmatch(self.webhook_secret):
            raise ConfigError("WEBHOOK_SECRET must be whsec_ followed by base64 (at least 24 bytes); "
                              "make one with `python -c \"import base64, os; "
                              "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\"`")


    def check_erasure_key(self):
        # It is all that stands between an audit entry and a guess at the address it hashes.
        if self.erasure_audit_key and len(self.erasure_audit_key) < MIN_ERASURE_KEY_LENGTH:
            raise ConfigError("ERASURE_AUDIT_KEY is shorter than %d characters; make one with "
                              "`python -c \"import secrets; print(secrets.token_urlsafe(32))\"`"
                              % MIN_ERASURE_KEY_LENGTH)


MIN_ERASURE_KEY_LENGTH = 16
URL_KINDS = ("url", "base_url")
BOUNCER_DOMAIN = "usebouncer.com"
NO_KEY = ("BOUNCER_API_KEY is not set: nothing is sent to Bouncer. To run without an account, start the "
          "local sandbox (`python -m bouncer sandbox --port 8025`) and set BOUNCER_API_URL=http://127.0.0.1:8025 "
          "(the README's local run does both)")
BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
URL_SAFE_SECRET = re.compile(r"[A-Za-z0-9._~-]+")


WEBHOOK_SECRET_FORM = re.compile(r"whsec_[A-Za-z0-9+/]{32,}={0,2}")


def check_range(f, value):
    meta = f.metadata
    name = meta["env"]
    if meta["kind"] == "int_list":
        if not 1 <= len(value) <= 20:
            raise ConfigError("%s must list from 1 to 20 delays" % name)
        for item in value:
            if not meta["minimum"] <= item <= meta["maximum"]:
                raise ConfigError("%s=%s: each delay must be from %s to %s seconds"
                                  % (name, ",".join(map(str, value)), meta["minimum"], meta["maximum"]))
    if meta["kind"] == "int":
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise ConfigError("%s=%s is too small; it must be at least %s" % (name, value, meta["minimum"]))
        if meta["maximum"] is not None and value > meta["maximum"]:
            raise ConfigError("%s=%s is too large; it must be at most %s" % (name, value, meta["maximum"]))
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError("%s=%r is not one of %s" % (name, value, ", ".join(meta["choices"])))


def check_url(name, value, schemes):
    parsed = urlsplit(value)
    scheme = parsed.scheme.split("+")[0]
    if scheme not in schemes:
        raise ConfigError("%s=%r must start with one of %s" % (
            name, redact_url(value), ", ".join("%s://" % s for s in schemes)))
    if scheme in ("http", "https", "redis", "rediss", "postgres", "postgresql") and not parsed.hostname:
        raise ConfigError("%s=%r has no host name" % (name, redact_url(value)))
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError("%s=%r has a port outside 1-65535" % (name, redact_url(value)))


def check_redis_url(value):
    check_url("REDIS_URL", value, ("redis", "rediss", "unix"))
    parsed = urlsplit(value)
    if parsed.scheme == "unix":
        return
    number = parsed.path.strip("/") or "0"
    if not number.isdigit() or int(number) > 15:
        raise ConfigError("REDIS_URL=%r names database %r; use a database number from 0 to 15"
                          % (redact_url(value), number))


def check_host(value):
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if not HOST_NAME.fullmatch(value):
        raise ConfigError("HOST=%r is not an address to listen on; use 0.0.0.0 (every interface), "
                          "127.0.0.1 (this machine only) or another address of this machine" % value)


def read_value(f, env):
    """The value of field `f` from `env`, or its default when unset or empty. A secret of blank
    space is refused, not taken as unset: it is a mistake, and the service would start silently
    without what it guards (the console, the API)."""
    meta = f.metadata
    raw = env.get(meta["env"], "").strip()
    if raw == "":
        if meta["secret"] and env.get(meta["env"]):
            raise ConfigError("%s is blank space; set it to the secret, or leave it out to keep it unset"
                              % meta["env"])
        return f.default
    kind = meta["kind"]
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError("%s=%r is not a whole number; set it to e.g. %s"
                              % (meta["env"], raw, f.default)) from None
    if kind == "list":
        return tuple(list_items(meta, raw))
    if kind == "int_list":
        try:
            return tuple(int(part) for part in list_items(meta, raw))
        except ValueError:
            raise ConfigError("%s=%r must be whole numbers of seconds separated by commas, e.g. %s"
                              % (meta["env"], raw, ",".join(map(str, f.default)))) from None
    if kind == "bool":
        return read_bool(meta["env"], raw)
    if kind == "base_url":
        return raw.rstrip("/")
    for choice in meta["choices"] or ():
        if raw.lower() == choice.lower():
            return choice
    return raw


def read_bool(name, raw):
    try:
        return BOOLEANS[raw.lower()]
    except KeyError:
        raise ConfigError("%s=%r must be true or false" % (name, raw)) from None


def list_items(meta, raw):
    """The items of a comma-separated value; an empty one (`a,,b`, `,,,`) is refused, a trailing
    comma is harmless. A secret list is never echoed."""
    items = [part.strip() for part in raw.split(",")]
    if len(items) > 1 and items[-1] == "":
        items.pop()
    if "" in items:
        shown = meta["env"] if meta["secret"] else "%s=%r" % (meta["env"], raw)
        raise ConfigError("%s has an empty item between commas; separate the items with single commas" % shown)
    return items


def load_settings(env=None):
    """Settings from `env` (default: the process environment), validated."""
    env = os.environ if env is None else env
    return Settings(**{f.name: read_value(f, env) for f in fields(Settings)}).validate()

