"""Settings: read once from the environment, validated, with messages that say how to fix them.

Every setting of the design card lives here; nothing else in the package reads os.environ.
"""
import os
from dataclasses import dataclass
from urllib.parse import urlparse

CHECK_TYPES = ("deliverable", "catchall")


class ConfigError(Exception):
    """A setting has a value the service cannot run with."""


def env_int(env, name, default, minimum=0):
    raw = env.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError("%s=%r is not a whole number; set it to e.g. %s" % (name, raw, default))
    if value < minimum:
        raise ConfigError("%s=%s is too small; it must be at least %s" % (name, value, minimum))
    return value


def env_str(env, name, default):
    value = env.get(name, "").strip()
    return value or default


def check_url(name, value, schemes):
    parsed = urlparse(value)
    scheme = parsed.scheme.split("+")[0]
    if scheme not in schemes:
        raise ConfigError("%s=%r must start with one of %s" % (
            name, redact_url(value), ", ".join("%s://" % s for s in schemes)))
    if scheme in ("http", "https", "redis", "rediss", "postgres", "postgresql") and not parsed.hostname:
        raise ConfigError("%s=%r has no host name" % (name, redact_url(value)))


def redact_url(url):
    """The URL with any password replaced, safe for logs and answers."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(":%s@" % parsed.password, ":***@", 1)
    return url


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///bouncer.db"
    redis_url: str = "redis://localhost:6379/0"
    api_key: str | None = None
    api_url: str = "https://api.usebouncer.com"
    batch_create_interval: int = 5
    status_check_interval: int = 30
    batch_size: int = 10000
    max_outstanding: int = 15
    rate_limit_per_minute: int = 200
    rate_limit_buffer: int = 180
    bouncer_timeout: int = 30
    reservation_timeout: int = 600
    batch_timeout: int = 86400
    result_cache_days: int = 30
    catchall_path: str = "/v1.1/email/verify/batch"
    public_url: str | None = None
    callback_secret: str | None = None
    port: int = 8000

    def __repr__(self):
        # The key and the secret must never reach a log line through a repr.
        return "Settings(database_url=%r, redis_url=%r, api_url=%r, api_key=%s)" % (
            redact_url(self.database_url), redact_url(self.redis_url), self.api_url,
            "set" if self.api_key else "unset")

    def validate(self):
        check_url("DATABASE_URL", self.database_url, ("sqlite", "postgres", "postgresql"))
        check_url("REDIS_URL", self.redis_url, ("redis", "rediss", "unix"))
        check_url("BOUNCER_API_URL", self.api_url, ("http", "https"))
        if self.rate_limit_buffer > self.rate_limit_per_minute:
            raise ConfigError(
                "RATE_LIMIT_BUFFER=%s exceeds RATE_LIMIT_PER_MINUTE=%s; lower the buffer so the "
                "service stays under Bouncer's limit" % (self.rate_limit_buffer, self.rate_limit_per_minute))
        if self.reservation_timeout <= self.bouncer_timeout:
            raise ConfigError(
                "RESERVATION_TIMEOUT=%s must exceed BOUNCER_TIMEOUT=%s, or a slow but live Bouncer "
                "call would have its emails queued again" % (self.reservation_timeout, self.bouncer_timeout))
        for name, secret in (("BOUNCER_API_KEY", self.api_key), ("CALLBACK_SECRET", self.callback_secret)):
            if secret and len(secret) < 8:
                raise ConfigError("%s is too short to be real (fewer than 8 characters); check it" % name)
        if not self.catchall_path.startswith("/"):
            raise ConfigError("BOUNCER_CATCHALL_PATH=%r must start with '/'" % self.catchall_path)
        if self.public_url:
            check_url("PUBLIC_URL", self.public_url, ("http", "https"))
            if not self.callback_secret:
                raise ConfigError("PUBLIC_URL is set but CALLBACK_SECRET is not; set CALLBACK_SECRET "
                                  "to a long random string (it is part of the callback URL)")
        return self


def load_settings(env=None):
    """Settings from `env` (default: the process environment), validated."""
    env = os.environ if env is None else env
    return Settings(
        database_url=env_str(env, "DATABASE_URL", Settings.database_url),
        redis_url=env_str(env, "REDIS_URL", Settings.redis_url),
        api_key=env.get("BOUNCER_API_KEY", "").strip() or None,
        api_url=env_str(env, "BOUNCER_API_URL", Settings.api_url).rstrip("/"),
        batch_create_interval=env_int(env, "BATCH_CREATE_INTERVAL", 5, minimum=1),
        status_check_interval=env_int(env, "STATUS_CHECK_INTERVAL", 30, minimum=1),
        batch_size=env_int(env, "BOUNCER_BATCH_SIZE", 10000, minimum=1),
        max_outstanding=env_int(env, "BOUNCER_MAX_OUTSTANDING", 15, minimum=1),
        rate_limit_per_minute=env_int(env, "RATE_LIMIT_PER_MINUTE", 200, minimum=1),
        rate_limit_buffer=env_int(env, "RATE_LIMIT_BUFFER", 180, minimum=1),
        bouncer_timeout=env_int(env, "BOUNCER_TIMEOUT", 30, minimum=1),
        reservation_timeout=env_int(env, "RESERVATION_TIMEOUT", 600, minimum=1),
        batch_timeout=env_int(env, "BATCH_TIMEOUT", 86400, minimum=1),
        result_cache_days=env_int(env, "RESULT_CACHE_DAYS", 30, minimum=0),
        catchall_path=env_str(env, "BOUNCER_CATCHALL_PATH", Settings.catchall_path),
        public_url=env_str(env, "PUBLIC_URL", "").rstrip("/") or None,
        callback_secret=env.get("CALLBACK_SECRET", "").strip() or None,
        port=env_int(env, "PORT", 8000, minimum=1),
    ).validate()
