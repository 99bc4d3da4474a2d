"""Settings: design.md's defaults, and loud, actionable refusals of values the service cannot use."""
import re
from dataclasses import fields
from pathlib import Path

import pytest

from bouncer.config import ConfigError, Settings, load_settings

DEFAULTS = {
    "database_url": "sqlite:///bouncer.db",
    "redis_url": "redis://localhost:6379/0",
    "api_key": None,
    "api_url": "https://api.usebouncer.com",
    "batch_create_interval": 5,
    "status_check_interval": 30,
    "batch_size": 10000,
    "max_outstanding": 15,
    "rate_limit_per_minute": 200,
    "rate_limit_buffer": 180,
    # 20, not the 30 of the first design: a call in flight when the platform stops a worker must
    # end within its 30 s of grace (see config.MAX_BOUNCER_TIMEOUT).
    "bouncer_timeout": 20,
    "bouncer_connect_timeout": 5,
    "reservation_timeout": 600,
    "batch_timeout": 86400,
    "result_cache_days": 30,
    "retention_days": 0,
    "catchall_path": "/v1.1/email/verify/batch",
    "port": 8000,
    "log_level": "INFO",
    "log_format": "text",
    "api_tokens": (),
    "api_max_emails": 1_000_000,
    "webhook_url": None,
    "webhook_secret": None,
    "operator_password": None,
    "metrics_token": None,
    "erasure_audit_key": None,
    "webhook_timeout": 10,
    "webhook_retry_schedule": (5, 300, 1800, 7200, 18000, 36000),
    "unknown_rechecks": 1,
    "unknown_recheck_max_delay": 3600,
    "delete_results": False,
    "api_operator_tokens": (),
    "webhook_allow_private": False,
    "host": "0.0.0.0",
}

INTEGER_SETTINGS = [
    ("BATCH_CREATE_INTERVAL", "batch_create_interval"),
    ("STATUS_CHECK_INTERVAL", "status_check_interval"),
    ("BOUNCER_BATCH_SIZE", "batch_size"),
    ("BOUNCER_MAX_OUTSTANDING", "max_outstanding"),
    ("RATE_LIMIT_PER_MINUTE", "rate_limit_per_minute"),
    ("RATE_LIMIT_BUFFER", "rate_limit_buffer"),
    ("BOUNCER_TIMEOUT", "bouncer_timeout"),
    ("RESERVATION_TIMEOUT", "reservation_timeout"),
    ("BATCH_TIMEOUT", "batch_timeout"),
    ("RESULT_CACHE_DAYS", "result_cache_days"),
    ("RETENTION_DAYS", "retention_days"),
    ("BOUNCER_CONNECT_TIMEOUT", "bouncer_connect_timeout"),
    ("PORT", "port"),
    ("API_MAX_EMAILS", "api_max_emails"),
    ("UNKNOWN_RECHECKS", "unknown_rechecks"),
    ("UNKNOWN_RECHECK_MAX_DELAY", "unknown_recheck_max_delay"),
]
# Each integer's largest accepted value: above it a value passes a type check and then breaks
# something (an overflow in a date, a scheduler crash, a port that wraps around).
MAXIMUMS = {
    "BATCH_CREATE_INTERVAL": 86400, "STATUS_CHECK_INTERVAL": 86400, "BOUNCER_BATCH_SIZE": 100000,
    "BOUNCER_MAX_OUTSTANDING": 100, "RATE_LIMIT_PER_MINUTE": 100000, "RATE_LIMIT_BUFFER": 100000,
    "BOUNCER_TIMEOUT": 25, "BOUNCER_CONNECT_TIMEOUT": 25, "RESERVATION_TIMEOUT": 604800,
    "BATCH_TIMEOUT": 2592000, "RESULT_CACHE_DAYS": 3650, "RETENTION_DAYS": 36500, "PORT": 65535,
    "API_MAX_EMAILS": 10000000, "WEBHOOK_TIMEOUT": 60, "UNKNOWN_RECHECKS": 10, "UNKNOWN_RECHECK_MAX_DELAY": 86400,
}
ENV_NAMES = [name for name, _ in INTEGER_SETTINGS]


def config_error(env):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    return str(info.value)


def test_load_settings_defaults_match_design():
    settings = load_settings({})
    for field, value in DEFAULTS.items():
        assert getattr(settings, field) == value, field


def test_load_settings_blank_values_mean_default():
    settings = load_settings(dict.fromkeys(ENV_NAMES + ["DATABASE_URL", "REDIS_URL"], "  "))
    for field, value in DEFAULTS.items():
        assert getattr(settings, field) == value, field


def test_settings_class_defaults_match_design():
    settings = Settings()
    for field, value in DEFAULTS.items():
        assert getattr(settings, field) == value, field


@pytest.mark.parametrize("name, field", INTEGER_SETTINGS)
def test_load_settings_reads_each_integer(name, field):
    # Values chosen to keep the cross-checks (buffer <= limit, reservation > timeout) satisfied.
    value = {"RATE_LIMIT_BUFFER": 150, "BOUNCER_TIMEOUT": 20, "BOUNCER_CONNECT_TIMEOUT": 3,
             "BOUNCER_MAX_OUTSTANDING": 25, "UNKNOWN_RECHECKS": 3}.get(name, 700)
    assert getattr(load_settings({name: " %s " % value}), field) == value


def test_load_settings_reads_strings_and_trims_api_url():
    settings = load_settings({
        "DATABASE_URL": "postgres://u:pw@db.example.com:5432/bouncer",
        "REDIS_URL": "rediss://cache.example.com:6380/1",
        "BOUNCER_API_URL": "http://127.0.0.1:8025/",
        "BOUNCER_API_KEY": " key-12345678 ",
        "BOUNCER_CATCHALL_PATH": "/v1/catchall/batch",
    })
    assert settings.database_url == "postgres://u:pw@db.example.com:5432/bouncer"
    assert settings.redis_url == "rediss://cache.example.com:6380/1"
    assert settings.api_url == "http://127.0.0.1:8025"
    assert settings.api_key == "key-12345678"
    assert settings.catchall_path == "/v1/catchall/batch"


@pytest.mark.parametrize("name", ENV_NAMES)
@pytest.mark.parametrize("raw", ["abc", "1.5", "10k", "1e3"])
def test_load_settings_non_integer_refused(name, raw):
    message = config_error({name: raw})
    assert name in message
    assert raw in message
    assert "whole number" in message and "set it to" in message


# Settings where 0 means "off": RESULT_CACHE_DAYS (no cache), RETENTION_DAYS (keep forever),
# UNKNOWN_RECHECKS (greylisted verdicts final), UNKNOWN_RECHECK_MAX_DELAY (no retryAfter waited for).
ZERO_ALLOWED = {"RESULT_CACHE_DAYS": "result_cache_days", "RETENTION_DAYS": "retention_days",
                "UNKNOWN_RECHECKS": "unknown_rechecks", "UNKNOWN_RECHECK_MAX_DELAY": "unknown_recheck_max_delay"}


@pytest.mark.parametrize("name", [n for n in ENV_NAMES if n not in ZERO_ALLOWED])
@pytest.mark.parametrize("raw", ["0", "-1"])
def test_load_settings_too_small_refused(name, raw):
    message = config_error({name: raw})
    assert name in message
    assert "at least 1" in message


@pytest.mark.parametrize("name, field", ZERO_ALLOWED.items())
def test_load_settings_zero_turns_off_negative_refused(name, field):
    assert getattr(load_settings({name: "0"}), field) == 0
    assert config_error({name: "-1"}) == "%s=-1 is too small; it must be at least 0" % name


def test_load_settings_result_cache_days_zero_allowed_negative_refused():
    assert load_settings({"RESULT_CACHE_DAYS": "0"}).result_cache_days == 0
    message = config_error({"RESULT_CACHE_DAYS": "-1"})
    assert "RESULT_CACHE_DAYS" in message and "at least 0" in message


def test_load_settings_rate_limit_buffer_above_limit_refused():
    message = config_error({"RATE_LIMIT_BUFFER": "201"})
    assert "RATE_LIMIT_BUFFER" in message and "RATE_LIMIT_PER_MINUTE" in message
    assert "lower" in message
    message = config_error({"RATE_LIMIT_PER_MINUTE": "100"})   # default buffer 180 > 100
    assert "RATE_LIMIT_BUFFER=180" in message


def test_load_settings_rate_limit_buffer_equal_to_limit_allowed():
    settings = load_settings({"RATE_LIMIT_BUFFER": "200", "RATE_LIMIT_PER_MINUTE": "200"})
    assert settings.rate_limit_buffer == settings.rate_limit_per_minute == 200


@pytest.mark.parametrize("env", [
    {"RESERVATION_TIMEOUT": "20"},                               # equal to the default 20
    {"RESERVATION_TIMEOUT": "10"},
    {"BOUNCER_TIMEOUT": "25", "RESERVATION_TIMEOUT": "25"},
    {"BOUNCER_TIMEOUT": "25", "RESERVATION_TIMEOUT": "24"},
])
def test_load_settings_reservation_timeout_not_above_bouncer_timeout_refused(env):
    message = config_error(env)
    assert "RESERVATION_TIMEOUT" in message and "BOUNCER_TIMEOUT" in message
    assert "must exceed" in message


def test_load_settings_reservation_timeout_just_above_allowed():
    settings = load_settings({"BOUNCER_TIMEOUT": "20", "RESERVATION_TIMEOUT": "21"})
    assert settings.reservation_timeout == 21


@pytest.mark.parametrize("name", sorted(MAXIMUMS))
def test_load_settings_too_large_refused(name):
    limit = {} if name == "RATE_LIMIT_PER_MINUTE" else {"RATE_LIMIT_PER_MINUTE": "100000"}
    assert load_settings({name: str(MAXIMUMS[name]), "RESERVATION_TIMEOUT": "604800", **limit})
    for raw in (str(MAXIMUMS[name] + 1), str(2 ** 31), "9" * 30):
        message = config_error({name: raw, **limit})
        assert message == "%s=%s is too large; it must be at most %s" % (name, raw, MAXIMUMS[name])


def test_every_integer_setting_has_a_range():
    from dataclasses import fields
    for f in fields(Settings):
        if f.metadata["kind"] == "int":
            assert f.metadata["env"] in MAXIMUMS and f.metadata["minimum"] is not None, f.name


@pytest.mark.parametrize("raw, value", [("true", True), (" TRUE ", True), ("1", True), ("yes", True), ("on", True),
                                        ("false", False), ("0", False), ("No", False), ("off", False),
                                        ("", False)])
def test_load_settings_reads_a_yes_or_no(raw, value):
    assert load_settings({"BOUNCER_DELETE_RESULTS": raw}).delete_results is value


@pytest.mark.parametrize("raw", ["maybe", "2", "truthy"])
def test_load_settings_refuses_a_yes_or_no_it_cannot_read(raw):
    assert config_error({"BOUNCER_DELETE_RESULTS": raw}) == "BOUNCER_DELETE_RESULTS=%r must be true or false" % raw


@pytest.mark.parametrize("raw", ["verbose", "info2", "10"])
def test_load_settings_unknown_log_level_refused(raw):
    message = config_error({"LOG_LEVEL": raw})
    assert message == "LOG_LEVEL=%r is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL" % raw


def test_load_settings_log_level_and_format_any_case():
    settings = load_settings({"LOG_LEVEL": "debug", "LOG_FORMAT": "JSON"})
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")
    assert "LOG_FORMAT" in config_error({"LOG_FORMAT": "xml"})


@pytest.mark.parametrize("url, fragment", [
    ("redis://localhost:99999/0", "port outside 1-65535"),
    ("redis://localhost:6379/999", "database '999'"),
    ("redis://localhost:6379/db", "database 'db'"),
])
def test_load_settings_redis_url_out_of_range_refused(url, fragment):
    message = config_error({"REDIS_URL": url})
    assert message.startswith("REDIS_URL=") and fragment in message


@pytest.mark.parametrize("secret", ["abc/defghijkl", "abc%2Fdefghij", "abcdefgh?ijk", "abcdefgh#ijk",
                                    "abc def ghijk"])
def test_load_settings_callback_secret_that_breaks_the_url_refused(secret):
    # A base64 secret has a '/' 40% of the time; in a URL path it would split the route.
    message = config_error({"PUBLIC_URL": "https://x.example.com", "CALLBACK_SECRET": secret})
    assert "CALLBACK_SECRET may hold only" in message and secret not in message


def test_load_settings_api_tokens_are_a_list():
    settings = load_settings({"API_TOKENS": " tok-aaaaaaaa , tok-bbbbbbbb ,"})
    assert settings.api_tokens == ("tok-aaaaaaaa", "tok-bbbbbbbb")
    assert "API_TOKENS is too short" in config_error({"API_TOKENS": "tok-aaaaaaaa,short"})


@pytest.mark.parametrize("env, named", [
    ({"OPERATOR_PASSWORD": "   "}, "OPERATOR_PASSWORD is blank space"),
    ({"BOUNCER_API_KEY": "\t "}, "BOUNCER_API_KEY is blank space"),
    ({"METRICS_TOKEN": " "}, "METRICS_TOKEN is blank space"),
    ({"API_TOKENS": ",,,"}, "API_TOKENS has an empty item"),
    ({"API_TOKENS": "tok-aaaaaaaa,,tok-bbbbbbbb"}, "API_TOKENS has an empty item"),
    ({"API_OPERATOR_TOKENS": " , "}, "API_OPERATOR_TOKENS has an empty item"),
    ({"WEBHOOK_RETRY_SCHEDULE": "5,,6"}, "WEBHOOK_RETRY_SCHEDULE='5,,6' has an empty item"),
])
def test_load_settings_blank_secret_or_empty_list_item_stops_naming_it(env, named):
    message = config_error(env)
    assert message.startswith(named) and "\n" not in message
    assert "tok-aaaaaaaa" not in message           # a secret list is never echoed


def test_load_settings_an_empty_secret_is_unset():
    assert load_settings({"OPERATOR_PASSWORD": "", "API_TOKENS": ""}).operator_password is None


@pytest.mark.parametrize("raw, value", [("true", True), ("TRUE", True), ("1", True), ("yes", True),
                                        ("false", False), ("0", False), ("no", False)])
def test_load_settings_reads_a_boolean(raw, value):
    assert load_settings({"WEBHOOK_ALLOW_PRIVATE": raw}).webhook_allow_private is value
    assert "WEBHOOK_ALLOW_PRIVATE='maybe' must be true or false" in config_error({"WEBHOOK_ALLOW_PRIVATE": "maybe"})


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "::1", "localhost", "web.internal"])
def test_load_settings_host_takes_an_address_or_a_name(host):
    assert load_settings({"HOST": host}).host == host


@pytest.mark.parametrize("host", ["http://0.0.0.0", "0.0.0.0:8000", "my host", "-x"])
def test_load_settings_host_that_is_not_an_address_is_refused(host):
    assert config_error({"HOST": host}).startswith("HOST=%r is not an address to listen on" % host)


def test_load_settings_webhook_secret_form_and_url():
    good = "whsec_" + "A" * 43 + "="
    assert load_settings({"WEBHOOK_URL": "https://host.example.com/hooks/", "WEBHOOK_SECRET": good}
                         ).webhook_url == "https://host.example.com/hooks/"
    assert "WEBHOOK_SECRET must be whsec_" in config_error({"WEBHOOK_SECRET": "not-a-secret-at-all"})
    assert "WEBHOOK_SECRET is not" in config_error({"WEBHOOK_URL": "https://host.example.com/h"})


@pytest.mark.parametrize("name, value", [
    ("DATABASE_URL", "mysql://user@host/db"),
    ("DATABASE_URL", "bouncer.db"),
    ("DATABASE_URL", "http://example.com/db"),
    ("REDIS_URL", "http://localhost:6379/0"),
    ("REDIS_URL", "localhost:6379"),
    ("BOUNCER_API_URL", "ftp://api.usebouncer.com"),
    ("BOUNCER_API_URL", "api.usebouncer.com"),
    ("PUBLIC_URL", "myapp.example.com"),
])
def test_load_settings_bad_url_refused(name, value):
    env = {name: value}
    if name == "PUBLIC_URL":
        env["CALLBACK_SECRET"] = "s" * 32
    message = config_error(env)
    assert name in message
    assert "must start with" in message


@pytest.mark.parametrize("name", ["BOUNCER_API_URL", "PUBLIC_URL"])
def test_load_settings_url_without_host_refused(name):
    env = {name: "https://", "CALLBACK_SECRET": "s" * 32}
    message = config_error(env)
    assert name in message


@pytest.mark.parametrize("name, value", [
    ("DATABASE_URL", "sqlite:///bouncer.db"),
    ("DATABASE_URL", "postgres://u:p@h/db"),
    ("DATABASE_URL", "postgresql://u:p@h:5432/db"),
    ("DATABASE_URL", "postgresql+pool://u:p@h:5432/db"),
    ("REDIS_URL", "redis://h:6379/0"),
    ("REDIS_URL", "rediss://h:6380/0"),
    ("REDIS_URL", "unix:///tmp/redis.sock"),
    ("BOUNCER_API_URL", "http://127.0.0.1:8025"),
])
def test_load_settings_good_url_accepted(name, value):
    load_settings({name: value})


def test_load_settings_bad_database_url_message_hides_password():
    message = config_error({"DATABASE_URL": "mysql://bouncer:hunter2secret@db.example.com/x"})
    assert "hunter2secret" not in message
    assert "DATABASE_URL" in message


def test_load_settings_bad_catchall_path_refused():
    message = config_error({"BOUNCER_CATCHALL_PATH": "v1.1/email/verify/batch"})
    assert "BOUNCER_CATCHALL_PATH" in message


def test_load_settings_public_url_without_callback_secret_refused():
    message = config_error({"PUBLIC_URL": "https://myapp.example.com"})
    assert "PUBLIC_URL" in message and "CALLBACK_SECRET" in message
    assert "set CALLBACK_SECRET" in message


def test_load_settings_public_url_with_callback_secret_accepted():
    settings = load_settings({"PUBLIC_URL": "https://myapp.example.com/",
                              "CALLBACK_SECRET": "c" * 40})
    assert settings.public_url == "https://myapp.example.com"
    assert settings.callback_secret == "c" * 40


def secretive_settings():
    return load_settings({
        "BOUNCER_API_KEY": "sk-live-TOPSECRETKEY123",
        "DATABASE_URL": "postgres://bouncer:DbPassw0rd99@db.example.com:5432/bouncer",
        "REDIS_URL": "redis://:RedisPassw0rd77@cache.example.com:6379/0",
        "PUBLIC_URL": "https://myapp.example.com",
        "CALLBACK_SECRET": "CallbackSecretXYZ987",
    })


@pytest.mark.parametrize("render", [repr, str, "{}".format, "%s".__mod__, lambda s: "%r" % (s,)])
def test_settings_repr_hides_secrets(render):
    text = render(secretive_settings())
    for secret in ("sk-live-TOPSECRETKEY123", "DbPassw0rd99", "RedisPassw0rd77",
                   "CallbackSecretXYZ987"):
        assert secret not in text
    assert "db.example.com" in text   # still useful: which database, just not its password


def test_settings_secrets_lists_every_secret_and_url_password():
    settings = secretive_settings()
    assert sorted(settings.secrets()) == sorted(["sk-live-TOPSECRETKEY123", "DbPassw0rd99",
                                                  "RedisPassw0rd77", "CallbackSecretXYZ987"])


def test_settings_repr_says_whether_key_set():
    assert "api_key=set" in repr(secretive_settings())
    assert "api_key=unset" in repr(load_settings({}))


@pytest.mark.parametrize("name", ["BOUNCER_API_KEY", "CALLBACK_SECRET"])
def test_load_settings_too_short_secret_refused(name):
    # Masking a one-letter key in logs would mangle every word holding that letter.
    message = config_error({name: "k", "PUBLIC_URL": "https://x.example.com", "CALLBACK_SECRET": "c" * 32}
                           if name == "BOUNCER_API_KEY" else {name: "k"})
    assert name in message and "too short" in message


def documented_settings():
    """Each setting's name and default as the README's Settings table and .env.example give them."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    table = readme[readme.index("## Settings"):readme.index("## Deploying")]
    in_readme = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", table, re.M))
    in_example = dict(re.findall(r"^# ([A-Z_]+)=(\S*)", (root / ".env.example").read_text(), re.M))
    return in_readme, in_example


def test_every_setting_is_documented_with_its_default():
    in_readme, in_example = documented_settings()
    for f in fields(Settings):
        env, default = f.metadata["env"], f.default
        assert env in in_readme, f"{env} is missing from the README's Settings"
        assert env in in_example, f"{env} is missing from .env.example"
        if isinstance(default, int) and not isinstance(default, bool):
            assert in_readme[env].strip() == str(default), env
            assert in_example[env] == str(default), env
        elif isinstance(default, bool):
            assert in_readme[env].strip() == f"`{str(default).lower()}`", env
            assert in_example[env] == str(default).lower(), env
        elif isinstance(default, tuple) and default:
            shown = ",".join(map(str, default))
            assert in_readme[env].strip() == f"`{shown}`" and in_example[env] == shown, env
        elif isinstance(default, str):
            assert in_readme[env].strip() == f"`{default}`" and in_example[env] == default, env
    known = {f.metadata["env"] for f in fields(Settings)}
    assert set(in_readme) <= known and set(in_example) <= known


def test_erasure_audit_key_must_be_long_enough_to_keep_its_hashes_from_a_guess():
    message = config_error({"ERASURE_AUDIT_KEY": "short-key-123"})
    assert message.startswith("ERASURE_AUDIT_KEY is shorter than 16 characters; make one with")
    assert "short-key-123" not in message
    assert load_settings({"ERASURE_AUDIT_KEY": "k" * 16}).erasure_audit_key == "k" * 16
    assert "erasure_audit_key=set" in repr(load_settings({"ERASURE_AUDIT_KEY": "k" * 16}))
