"""The sandbox's options, declared once: each field carries its help text and its range.

The `sandbox` command builds its click options from these fields, and `Sandbox` takes the
dataclass itself, so a new option is one line here. A value out of its range is refused when the
options are made, with one line naming the option and its range.
"""
from dataclasses import dataclass, field, fields

from bouncer.errors import ConfigError

KINDS = ("int", "float", "str", "path")


def option(default, help, kind, minimum=None, maximum=None, envvar=None, secret=False):
    """A field of SandboxOptions: its default, help text, kind and range."""
    return field(default=default, metadata={
        "help": help, "kind": kind, "minimum": minimum, "maximum": maximum, "envvar": envvar,
        "secret": secret})


@dataclass(frozen=True)
class SandboxOptions:
    port: int = option(8025, "Port to listen on (127.0.0.1); 0 picks a free one.", "int", 0, 65535)
    processing_time: float = option(
        5.0, "Seconds a batch takes to complete; 0 completes it at once. Unused with --throughput.",
        "float", 0)
    throughput: float = option(
        0.0, "Addresses the account verifies an hour, shared equally by the batches it processes at "
             "once, so a batch's time depends on the load (Bouncer: 100,000 to 200,000); 0: every batch "
             "takes --processing-time.", "float", 0)
    parallel_batches: int = option(
        25, "With --throughput: batches processed at once; the others wait, queued, in order "
            "(Bouncer's docs: up to 25).", "int", 1, 1000)
    fail_rate: float = option(0.0, "Share of requests answered 500/503.", "float", 0, 1)
    rate_limit_rate: float = option(0.0, "Share of requests answered 429.", "float", 0, 1)
    slow_rate: float = option(
        0.0, "Share of requests answered only after --slow-seconds.", "float", 0, 1)
    slow_seconds: float = option(
        5.0, "How late a slow answer comes; above BOUNCER_TIMEOUT it is a client timeout.",
        "float", 0)
    seed: int = option(
        0, "Seed of the random faults, so a run's fault sequence can be replayed.", "int")
    api_key: str | None = option(
        None, "Accept only this x-api-key (any non-empty key when unset). The environment "
              "variable keeps it off the command line, where `ps` would show it.", "str",
        envvar="SANDBOX_API_KEY", secret=True)
    request_log: str | None = option(None, "Append each request as JSON here.", "path")
    greylist_rate: float = option(
        0.0, "Share of addresses whose receiving server greylists them: the first try answers "
             "unknown/timeout with a retryAfter; a try after it gets the real verdict.", "float", 0, 1)
    greylist_seconds: float = option(
        60.0, "How far ahead a greylisted address's retryAfter lies.", "float", 0, 86400)
    credits: int | None = option(
        None, "Credits the account holds: a create spends one per distinct address and is "
              "answered 402 when the balance cannot cover it. Unlimited when unset.", "int", 0)

    def __post_init__(self):
        for f in fields(self):
            check_option(f, getattr(self, f.name))

    def __repr__(self):
        # The key must never reach a log line through a repr.
        shown = ("%s=%s" % (f.name, shown_value(f, getattr(self, f.name))) for f in fields(self))
        return "SandboxOptions(%s)" % ", ".join(shown)

    __str__ = __repr__


def shown_value(f, value):
    if f.metadata["secret"]:
        return "set" if value else "unset"
    return repr(value)


def flag_of(f):
    """The command-line flag of a field: `processing_time` is `--processing-time`."""
    return "--" + f.name.replace("_", "-")


def describe_range(f):
    """The field's range in words ("between 0 and 1", "at least 0"), or "" when it has none."""
    low, high = f.metadata["minimum"], f.metadata["maximum"]
    if low is not None and high is not None:
        return "between %s and %s" % (low, high)
    if low is not None:
        return "at least %s" % low
    if high is not None:
        return "at most %s" % high
    return ""


def check_option(f, value):
    """Refuse a value of the wrong type or out of the field's range, naming the option."""
    if value is None:
        if f.default is None:
            return
        raise ConfigError("sandbox option %s (%s) must be set" % (f.name, flag_of(f)))
    kind = f.metadata["kind"]
    if kind in ("int", "float") and not is_number(value, whole=kind == "int"):
        raise ConfigError("sandbox option %s (%s) must be a %s, got %r"
                          % (f.name, flag_of(f), "whole number" if kind == "int" else "number", value))
    if kind in ("str", "path") and not isinstance(value, str):
        raise ConfigError("sandbox option %s (%s) must be text, got %r" % (f.name, flag_of(f), value))
    low, high = f.metadata["minimum"], f.metadata["maximum"]
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError("sandbox option %s (%s) is %s; it must be %s"
                          % (f.name, flag_of(f), value, describe_range(f)))


def is_number(value, whole):
    # bool is an int to Python, never a count or a rate to a person.
    if isinstance(value, bool):
        return False
    if whole:
        return isinstance(value, int)
    # NaN passes every range check (all its comparisons are false), so it is refused here.
    return isinstance(value, (int, float)) and value == value
