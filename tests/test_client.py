import json
import logging
import pickle
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from requests.exceptions import ConnectionError, ConnectTimeout, ReadTimeout

from bouncer import __version__
from bouncer.client import DEFAULT_BATCH_PATH, BouncerClient, BouncerError

BASE = "https://api.bouncer.test"
KEY = "sk-secret-xyz"
BATCH_URL = BASE + DEFAULT_BATCH_PATH
CATCHALL_PATH = "/v1.1/email/verify/catchall/batch"
CREATED = {"batchId": "4d5fdf6b5ee97c4dbbccbfe1", "created": "2023-03-26T18:08:15.033Z",
           "status": "queued", "quantity": 2, "duplicates": 0}
STATUS = {"batchId": "4d5fdf6b5ee97c4dbbccbfe1", "status": "completed", "quantity": 2, "processed": 2,
          "stats": {"deliverable": 1, "risky": 0, "undeliverable": 1, "unknown": 0}}
RECORD = {"email": "john@usebouncer.com", "status": "deliverable", "reason": "accepted_email",
          "domain": {"name": "usebouncer.com", "acceptAll": "no", "disposable": "no", "free": "no"}}


@pytest.fixture
def api():
    with responses.RequestsMock() as mock:
        yield mock


@pytest.fixture
def client():
    return BouncerClient(BASE, KEY, timeout=30, catchall_path=CATCHALL_PATH)


def sent(api, index=0):
    return api.calls[index].request


def query(request):
    return parse_qs(urlsplit(request.url).query)


def path(request):
    return urlsplit(request.url).path


# The three calls, each with the URL it hits and a good answer, so error cases run against all of them.
CALLS = {
    "create": (responses.POST, BATCH_URL, lambda c: c.create_batch("deliverable", ["a@x.com"])),
    "status": (responses.GET, BATCH_URL + "/b1", lambda c: c.get_batch("deliverable", "b1")),
    "download": (responses.GET, BATCH_URL + "/b1/download", lambda c: c.download_batch("deliverable", "b1")),
}


def failing_call(api, client, operation, **answer):
    method, url, call = CALLS[operation]
    api.add(method, url, **answer)
    with pytest.raises(BouncerError) as caught:
        call(client)
    return caught.value


def test_create_batch_sends_json_body_path_and_headers(api, client):
    api.add(responses.POST, BATCH_URL, json=CREATED)
    answer = client.create_batch("deliverable", ["a@x.com", "b@y.com"])
    request = sent(api)
    assert answer["batchId"] == "4d5fdf6b5ee97c4dbbccbfe1"
    assert path(request) == DEFAULT_BATCH_PATH
    assert json.loads(request.body) == [{"email": "a@x.com"}, {"email": "b@y.com"}]
    assert request.headers["x-api-key"] == KEY
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"] == "bouncer-queue/%s" % __version__
    assert request.headers["Content-Type"] == "application/json"
    assert query(request) == {}


def test_create_batch_passes_callback_as_query(api, client):
    api.add(responses.POST, BATCH_URL, json=CREATED)
    callback = "https://queue.example.com/callback?check=deliverable&token=abc"
    client.create_batch("deliverable", ["a@x.com"], callback_url=callback)
    assert query(sent(api)) == {"callback": [callback]}


@pytest.mark.parametrize("email", [
    'quote"d@x.com',
    "back\\slash@x.com",
    "trailing\\@x.com",
    "ünïcødé@bücher.de",
    "用户@例子.广告",
    "emoji😀@x.com",
    "tab\tand\nnewline@x.com",
])
def test_create_batch_keeps_awkward_addresses_intact(api, client, email):
    api.add(responses.POST, BATCH_URL, json=CREATED)
    client.create_batch("deliverable", [email, "plain@x.com"])
    assert json.loads(sent(api).body.decode("utf-8")) == [{"email": email}, {"email": "plain@x.com"}]


@pytest.mark.parametrize("check_type, expected_path", [
    ("deliverable", DEFAULT_BATCH_PATH),
    ("catchall", CATCHALL_PATH),
])
def test_create_batch_uses_the_check_types_path(api, client, check_type, expected_path):
    api.add(responses.POST, BASE + expected_path, json=CREATED)
    client.create_batch(check_type, ["a@x.com"])
    assert path(sent(api)) == expected_path


def test_batch_path_catchall_defaults_to_batch_path():
    client = BouncerClient(BASE, KEY)
    assert client.batch_path("catchall") == DEFAULT_BATCH_PATH
    assert client.batch_path("deliverable") == DEFAULT_BATCH_PATH


@pytest.mark.parametrize("check_type", ["", "Deliverable", "risky", None])
def test_batch_path_rejects_unknown_check_type(client, check_type):
    with pytest.raises(ValueError):
        client.batch_path(check_type)


@pytest.mark.parametrize("call", [
    lambda c: c.create_batch("bogus", ["a@x.com"]),
    lambda c: c.get_batch("bogus", "b1"),
    lambda c: c.download_batch("bogus", "b1"),
])
def test_calls_reject_unknown_check_type_before_any_request(api, client, call):
    with pytest.raises(ValueError):
        call(client)
    assert len(api.calls) == 0


@pytest.mark.parametrize("emails", [[], ["a@x.com", 7]])
def test_create_batch_rejects_unusable_email_lists(api, client, emails):
    with pytest.raises(ValueError):
        client.create_batch("deliverable", emails)
    assert len(api.calls) == 0


def test_create_batch_tolerates_trailing_slash_in_base_url(api):
    api.add(responses.POST, BATCH_URL, json=CREATED)
    BouncerClient(BASE + "/", KEY).create_batch("deliverable", ["a@x.com"])
    assert sent(api).url == BATCH_URL


def test_create_batch_omits_key_header_without_key(api):
    api.add(responses.POST, BATCH_URL, json=CREATED)
    BouncerClient(BASE, None).create_batch("deliverable", ["a@x.com"])
    assert "x-api-key" not in sent(api).headers


@pytest.mark.parametrize("answer", [
    {"status": "queued"},
    {"batchId": ""},
    {"batchId": 12345},
    {"batchId": None},
    [CREATED],
])
def test_create_batch_answer_without_batch_id(api, client, answer):
    api.add(responses.POST, BATCH_URL, json=answer)
    with pytest.raises(BouncerError) as caught:
        client.create_batch("deliverable", ["a@x.com"])
    assert caught.value.status == 200
    assert caught.value.operation == "create"
    assert "no batchId" in str(caught.value)


@pytest.mark.parametrize("check_type, prefix", [
    ("deliverable", DEFAULT_BATCH_PATH),
    ("catchall", CATCHALL_PATH),
])
def test_get_batch_path_and_stats_query(api, client, check_type, prefix):
    api.add(responses.GET, BASE + prefix + "/4d5f", json=STATUS)
    answer = client.get_batch(check_type, "4d5f")
    request = sent(api)
    assert answer == STATUS
    assert path(request) == prefix + "/4d5f"
    assert query(request) == {"with-stats": ["true"]}
    assert request.headers["x-api-key"] == KEY
    assert request.headers["Accept"] == "application/json"


def test_get_batch_quotes_batch_id(api, client):
    api.add(responses.GET, BATCH_URL + "/a%2Fb%20c%3Fd", json=STATUS)
    client.get_batch("deliverable", "a/b c?d")
    assert urlsplit(sent(api).url).path == DEFAULT_BATCH_PATH + "/a%2Fb%20c%3Fd"


def test_get_batch_passes_unknown_status_through(api, client):
    api.add(responses.GET, BATCH_URL + "/b1", json={"batchId": "b1", "status": "paused"})
    assert client.get_batch("deliverable", "b1")["status"] == "paused"


@pytest.mark.parametrize("answer", [{"batchId": "b1"}, {"status": 3}, ["completed"], "completed"])
def test_get_batch_answer_without_status(api, client, answer):
    api.add(responses.GET, BATCH_URL + "/b1", json=answer)
    with pytest.raises(BouncerError) as caught:
        client.get_batch("deliverable", "b1")
    assert caught.value.status == 200
    assert caught.value.operation == "status"


@pytest.mark.parametrize("batch_id", ["", "   ", None])
def test_get_batch_rejects_empty_batch_id(api, client, batch_id):
    with pytest.raises(ValueError):
        client.get_batch("deliverable", batch_id)


@pytest.mark.parametrize("check_type, prefix", [
    ("deliverable", DEFAULT_BATCH_PATH),
    ("catchall", CATCHALL_PATH),
])
def test_download_batch_path_and_query(api, client, check_type, prefix):
    api.add(responses.GET, BASE + prefix + "/4d5f/download", json=[RECORD, RECORD])
    records = client.download_batch(check_type, "4d5f")
    request = sent(api)
    assert records == [RECORD, RECORD]
    assert path(request) == prefix + "/4d5f/download"
    assert query(request) == {"download": ["all"]}
    assert request.headers["x-api-key"] == KEY


def test_download_batch_leaves_out_items_that_are_not_objects(api, client, caplog):
    api.add(responses.GET, BATCH_URL + "/b1/download", json=[RECORD, "junk", None, 3, [RECORD], RECORD])
    with caplog.at_level(logging.WARNING, logger="bouncer.client"):
        records = client.download_batch("deliverable", "b1")
    assert records == [RECORD, RECORD]
    assert "left out 4 items" in caplog.text


def test_download_batch_empty_list(api, client):
    api.add(responses.GET, BATCH_URL + "/b1/download", json=[])
    assert client.download_batch("deliverable", "b1") == []


@pytest.mark.parametrize("answer", [{"records": [RECORD]}, RECORD, "done", 3, None])
def test_download_batch_body_not_a_list(api, client, answer):
    api.add(responses.GET, BATCH_URL + "/b1/download", body=json.dumps(answer))
    with pytest.raises(BouncerError) as caught:
        client.download_batch("deliverable", "b1")
    assert caught.value.status == 200
    assert caught.value.operation == "download"
    assert "not a list" in str(caught.value)


# status: out_of_credits, not_found, not_ready, ends_cycle
FLAGS = {
    400: (False, False, False, False),
    401: (False, False, False, True),
    402: (True, False, False, True),
    404: (False, True, False, False),
    405: (False, False, True, False),
    429: (False, False, False, True),
    500: (False, False, False, False),
    503: (False, False, False, False),
}


def flags(error):
    return (error.is_out_of_credits, error.is_not_found, error.is_not_ready, error.ends_cycle)


@pytest.mark.parametrize("operation", sorted(CALLS))
@pytest.mark.parametrize("body_status", [int, str])
@pytest.mark.parametrize("code", sorted(FLAGS))
def test_calls_raise_bouncer_error_for_error_status(api, client, operation, body_status, code):
    body = {"status": body_status(code), "error": "Some Error", "message": "something went wrong"}
    error = failing_call(api, client, operation, json=body, status=code)
    assert error.status == code
    assert error.operation == operation
    assert flags(error) == FLAGS[code]
    assert str(error).startswith(
        "Bouncer %s failed: HTTP %d Some Error: something went wrong" % (operation, code))


@pytest.mark.parametrize("code, hint", [
    (401, " (check BOUNCER_API_KEY)"),
    (402, " (out of Bouncer credits: buy more credits)"),
    (429, " (rate limited by Bouncer)"),
    (400, ""),
    (503, ""),
])
def test_create_batch_error_message_carries_hint(api, client, code, hint):
    error = failing_call(api, client, "create", status=code,
                         json={"status": str(code), "error": "Err", "message": "detail"})
    assert str(error) == "Bouncer create failed: HTTP %d Err: detail%s" % (code, hint)


def test_create_batch_out_of_credits_message(api, client):
    error = failing_call(api, client, "create", status=402,
                         json={"status": "402", "error": "Payment Required", "message": "1 credits left"})
    assert str(error) == ("Bouncer create failed: HTTP 402 Payment Required: 1 credits left "
                          "(out of Bouncer credits: buy more credits)")
    assert error.message == str(error)


def test_download_batch_not_ready(api, client):
    error = failing_call(api, client, "download", status=405,
                         json={"status": "405", "error": "Method Not Allowed", "message": "batch is not completed"})
    assert error.is_not_ready
    assert str(error) == "Bouncer download failed: HTTP 405 Method Not Allowed: batch is not completed"


@pytest.mark.parametrize("body, content_type, expected", [
    ("", "text/plain", "Bouncer status failed: HTTP 503 Service Unavailable"),
    ("upstream   connect\nerror", "text/plain", "Bouncer status failed: HTTP 503 Service Unavailable: "
                                                 "upstream connect error"),
    ("<html><head><title>502 Bad Gateway</title></head>\n<body><h1>Bad Gateway</h1></body></html>",
     "text/html", "Bouncer status failed: HTTP 503 Service Unavailable: 502 Bad Gateway Bad Gateway"),
    ('{"status": 503}', "application/json", "Bouncer status failed: HTTP 503 Service Unavailable"),
    ('{"detail": "overloaded"}', "application/json",
     'Bouncer status failed: HTTP 503 Service Unavailable: {"detail": "overloaded"}'),
    ('["odd"]', "application/json", 'Bouncer status failed: HTTP 503 Service Unavailable: ["odd"]'),
])
def test_get_batch_error_with_unusual_body(api, client, body, content_type, expected):
    error = failing_call(api, client, "status", status=503, body=body, content_type=content_type)
    assert error.status == 503 and not error.ends_cycle
    assert str(error) == expected


def test_get_batch_long_error_body_is_cut_to_one_line(api, client):
    error = failing_call(api, client, "status", status=500, body="line\n" * 500, content_type="text/plain")
    message = str(error)
    assert "\n" not in message
    assert len(message) < 300
    assert message.endswith("...")


def test_calls_do_not_follow_redirects(api, client):
    api.add(responses.GET, BATCH_URL + "/b1", status=301,
            headers={"Location": "https://elsewhere.test/v1.1/email/verify/batch/b1?x=1"})
    with pytest.raises(BouncerError) as caught:
        client.get_batch("deliverable", "b1")
    assert caught.value.status == 301
    assert "redirected to https://elsewhere.test/v1.1/email/verify/batch/b1;" in str(caught.value)
    assert len(api.calls) == 1


@pytest.mark.parametrize("status_value", [400, "400"])
def test_get_batch_error_body_inside_200(api, client, status_value):
    api.add(responses.GET, BATCH_URL + "/b1",
            json={"status": status_value, "error": "Bad Request", "message": "batch has to be running"})
    with pytest.raises(BouncerError) as caught:
        client.get_batch("deliverable", "b1")
    assert caught.value.status == 400
    assert str(caught.value) == ("Bouncer status failed: HTTP 400 Bad Request: batch has to be running "
                                 "(carried in an HTTP 200 answer)")


@pytest.mark.parametrize("operation", sorted(CALLS))
def test_calls_timeout(api, client, operation):
    error = failing_call(api, client, operation, body=ReadTimeout("read timed out"))
    assert error.status is None and not error.ends_cycle
    assert not error.ends_cycle
    assert str(error) == "Bouncer %s call timed out after 30s" % operation


@pytest.mark.parametrize("operation", sorted(CALLS))
def test_calls_read_timeout_may_have_acted_connect_timeout_never_left(api, client, operation):
    # A read timeout: Bouncer got the request and may have acted on it (a create: a possible
    # orphan). A connect timeout: nothing reached Bouncer, so sending again is safe.
    assert failing_call(api, client, operation, body=ReadTimeout("read timed out")).timed_out
    error = failing_call(api, client, operation, body=ConnectTimeout("connect timed out"))
    assert not error.timed_out and error.status is None
    assert str(error) == "Bouncer %s failed: cannot connect to %s within 5s" % (operation, BASE)


def test_get_batch_timeout_message_uses_configured_timeout(api):
    api.add(responses.GET, BATCH_URL + "/b1", body=ReadTimeout("read timed out"))
    with pytest.raises(BouncerError) as caught:
        BouncerClient(BASE, KEY, timeout=2.5).get_batch("deliverable", "b1")
    assert str(caught.value) == "Bouncer status call timed out after 2.5s"


@pytest.mark.parametrize("operation", sorted(CALLS))
def test_calls_connection_error(api, client, operation):
    error = failing_call(api, client, operation, body=ConnectionError("[Errno 111] Connection refused"))
    assert error.status is None and not error.ends_cycle
    assert error.operation == operation
    assert str(error) == "Bouncer %s failed: cannot connect to %s: [Errno 111] Connection refused" % (
        operation, BASE)


def test_create_batch_connection_error_is_short_and_hides_callback():
    # A real refused connection, for the shape of urllib3's nested exception text.
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment in the way
    client = BouncerClient("http://127.0.0.1:9", KEY, timeout=5, session=session)
    with pytest.raises(BouncerError) as caught:
        client.create_batch("deliverable", ["a@x.com"], callback_url="https://q.test/cb?token=hush-hush")
    message = str(caught.value)
    assert message.startswith("Bouncer create failed: cannot connect to http://127.0.0.1:9: ")
    assert "hush-hush" not in message
    assert "\n" not in message
    assert caught.value.status is None


def test_create_batch_connection_error_drops_query_strings(api, client):
    echo = ("HTTPSConnectionPool(host='api.bouncer.test', port=443): Max retries exceeded with url: "
            "/v1.1/email/verify/batch?callback=https%3A%2F%2Fq.test%2Fcb%3Ftoken%3Dhush-hush")
    error = failing_call(api, client, "create", body=ConnectionError(echo))
    assert "hush-hush" not in str(error)
    assert "Max retries exceeded with url: /v1.1/email/verify/batch" in str(error)


@pytest.mark.parametrize("operation", sorted(CALLS))
@pytest.mark.parametrize("body", ["not json at all", "<html>oops</html>", ""])
def test_calls_2xx_body_not_json(api, client, operation, body):
    error = failing_call(api, client, operation, body=body, status=200, content_type="text/html")
    assert error.status == 200
    assert error.operation == operation
    assert "answered with a body that is not JSON" in str(error)


@pytest.mark.parametrize("answer", [
    dict(status=401, json={"status": 401, "error": "Unauthorized", "message": "key %s is not valid" % KEY}),
    dict(status=401, json={"status": 401, "error": "bad key " + KEY, "message": "no"}),
    dict(status=401, json={"status": 401, "error": "Unauthorized", "message": "x" * 195 + KEY}),
    dict(status=500, body="<html><body>header x-api-key: %s</body></html>" % KEY, content_type="text/html"),
    dict(status=500, body="y" * 196 + KEY, content_type="text/plain"),
    dict(status=200, body="echo " + KEY, content_type="text/plain"),
    dict(status=200, json={"message": "hello " + KEY}),
    dict(status=200, json={"status": "400", "error": "Bad " + KEY, "message": KEY}),
    dict(body=ConnectionError("Connection refused, sent x-api-key: %s" % KEY)),
    dict(body=requests.exceptions.ChunkedEncodingError("broke mid-body " + KEY)),
])
def test_create_batch_error_never_shows_api_key(api, client, caplog, answer):
    with caplog.at_level(logging.DEBUG):
        error = failing_call(api, client, "create", **answer)
    for text in (str(error), repr(error), error.message, caplog.text, *[r.getMessage() for r in caplog.records]):
        # "sk-se" also catches a key cut in half by truncation.
        assert "sk-se" not in text
    assert "***" in str(error)
    assert "sk-se" not in repr(client)


def test_calls_never_log_the_key_or_headers(api, client, caplog):
    api.add(responses.POST, BATCH_URL, json=CREATED)
    api.add(responses.GET, BATCH_URL + "/b1", json=STATUS)
    api.add(responses.GET, BATCH_URL + "/b1/download", json=[RECORD, "junk"])
    with caplog.at_level(logging.DEBUG):
        client.create_batch("deliverable", ["a@x.com"], callback_url="https://q.test/cb?token=hush-hush")
        client.get_batch("deliverable", "b1")
        client.download_batch("deliverable", "b1")
    assert caplog.records
    assert KEY not in caplog.text
    assert "x-api-key" not in caplog.text.lower()
    assert "hush-hush" not in caplog.text


class RecordingSession(requests.Session):
    def __init__(self):
        super().__init__()
        self.seen = []

    def request(self, method, url, **kwargs):
        self.seen.append(kwargs)
        return super().request(method, url, **kwargs)


@pytest.mark.parametrize("timeout", [30, 7.5])
def test_calls_pass_timeout_every_time(api, timeout):
    session = RecordingSession()
    client = BouncerClient(BASE, KEY, timeout=timeout, session=session)
    api.add(responses.POST, BATCH_URL, json=CREATED)
    api.add(responses.GET, BATCH_URL + "/b1", json=STATUS)
    api.add(responses.GET, BATCH_URL + "/b1/download", json=[RECORD])
    api.add(responses.GET, BATCH_URL + "/b2", status=503)
    client.create_batch("deliverable", ["a@x.com"])
    client.get_batch("deliverable", "b1")
    client.download_batch("deliverable", "b1")
    with pytest.raises(BouncerError):
        client.get_batch("deliverable", "b2")
    # (connect, read): a connect timeout means nothing was sent, so it is kept short.
    assert [kwargs["timeout"] for kwargs in session.seen] == [(min(5, timeout), timeout)] * 4
    assert len(api.calls) == 4


def test_bouncer_error_defaults_and_pickling():
    error = BouncerError("Bouncer status failed: HTTP 404 Not Found: gone", status=404, operation="status")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.status, copy.operation) == (error.message, 404, "status")
    assert copy.is_not_found
    bare = BouncerError("boom")
    assert bare.status is None and bare.operation == "" and not bare.ends_cycle and str(bare) == "boom"


# -- download bodies --

RECORD = {"email": "a@x.com", "status": "deliverable", "domain": {"name": "x.com", "acceptAll": "no"},
          "reason": "a ], a , and a \" in a string", "tags": [1, [2, {"k": "]"}]], "none": None}
RECORDS_BODIES = [
    "[]", " [ ] ", "\t[\r\n]\n",
    json.dumps([RECORD]), json.dumps([RECORD, RECORD]), json.dumps([RECORD], indent=2),
    json.dumps([RECORD, 3, "text", None, [RECORD]], separators=(",", ":")),
    "\n [ %s ,\t%s\r\n] \n" % (json.dumps(RECORD), json.dumps(dict(RECORD, email="b@x.com"))),
    json.dumps([{"email": "é@x.com"}], ensure_ascii=False), json.dumps([{"email": "é@x.com"}]),
    json.dumps({"not": "a list"}), "42", '"text"',
]


@pytest.mark.parametrize("body", RECORDS_BODIES)
def test_parse_records_reads_what_json_reads_and_keeps_each_record_text(body):
    from bouncer.client import parse_records
    records = parse_records(body.encode())
    assert records == json.loads(body)
    for record in records if isinstance(records, list) else ():
        if isinstance(record, dict):
            assert json.loads(record.raw) == record
            assert record.raw in body and record.raw.strip() == record.raw


@pytest.mark.parametrize("body", [
    "[", "[1,]", "[1 2]", "[1,,2]", "[,1]", "[1] 2", "[1]]", '[{"a": 1}', '[{"a": }]', "[1,\n",
    '[{"a": 1} {"b": 2}]', "", "   "])
def test_parse_records_refuses_what_json_refuses(body):
    from bouncer.client import parse_records
    with pytest.raises(ValueError):
        json.loads(body)
    with pytest.raises(ValueError):
        parse_records(body.encode())


# -- finish and delete --

FINISH_URL = BATCH_URL + "/b1/finish"
NOT_RUNNING = {"status": "400", "error": "Bad Request", "message": "batch has to be running to finish"}
NOT_DELETABLE = {"status": "405", "error": "Method Not Allowed", "message": "batch cannot be deleted in current state"}
UNKNOWN_BATCH = {"status": "404", "error": "Not Found", "message": "request b1 does not exist"}
# The two calls, each with the request it makes, so their shared failures run against both.
ENDINGS = {
    "finish": (responses.POST, FINISH_URL, lambda c: c.finish_batch("deliverable", "b1")),
    "delete": (responses.DELETE, BATCH_URL + "/b1", lambda c: c.delete_batch("deliverable", "b1")),
}


def ending_call(api, client, operation, **answer):
    method, url, call = ENDINGS[operation]
    api.add(method, url, **answer)
    return call(client)


@pytest.mark.parametrize("check_type, prefix", [("deliverable", DEFAULT_BATCH_PATH), ("catchall", CATCHALL_PATH)])
def test_finish_batch_posts_to_the_finish_path_and_takes_a_202(api, client, check_type, prefix):
    api.add(responses.POST, BASE + prefix + "/b%2F1/finish", status=202, json={})
    assert client.finish_batch(check_type, "b/1") is None
    request = sent(api)
    assert (request.method, path(request)) == ("POST", prefix + "/b%2F1/finish")
    assert request.headers["x-api-key"] == KEY and request.body is None and query(request) == {}


@pytest.mark.parametrize("answer", [dict(status=202, body=b""), dict(status=200, json={})])
def test_finish_batch_takes_an_empty_or_200_answer(api, client, answer):
    assert ending_call(api, client, "finish", **answer) is None


@pytest.mark.parametrize("answer", [
    dict(status=400, json=NOT_RUNNING),
    dict(status=200, json=NOT_RUNNING),    # as Bouncer's own OpenAPI file documents it
])
def test_finish_batch_refused_when_not_running(api, client, answer):
    with pytest.raises(BouncerError) as caught:
        ending_call(api, client, "finish", **answer)
    error = caught.value
    assert (error.status, error.operation, error.is_not_running) == (400, "finish", True)
    assert not (error.is_not_found or error.ends_cycle)
    assert "batch has to be running to finish" in str(error)


def test_finish_batch_404_is_a_batch_bouncer_does_not_know(api, client):
    with pytest.raises(BouncerError) as caught:
        ending_call(api, client, "finish", status=404, json=UNKNOWN_BATCH)
    assert caught.value.is_not_found and not caught.value.is_not_running
    assert str(caught.value) == "Bouncer finish failed: HTTP 404 Not Found: request b1 does not exist"


@pytest.mark.parametrize("check_type, prefix", [("deliverable", DEFAULT_BATCH_PATH), ("catchall", CATCHALL_PATH)])
def test_delete_batch_deletes_and_says_so(api, client, check_type, prefix):
    api.add(responses.DELETE, BASE + prefix + "/b1", status=200, json={})
    assert client.delete_batch(check_type, "b1") is True
    request = sent(api)
    assert (request.method, path(request), request.headers["x-api-key"]) == ("DELETE", prefix + "/b1", KEY)


def test_delete_batch_404_counts_as_deleted(api, client):
    assert ending_call(api, client, "delete", status=404, json=UNKNOWN_BATCH) is False


def test_delete_batch_405_while_it_runs(api, client):
    with pytest.raises(BouncerError) as caught:
        ending_call(api, client, "delete", status=405, json=NOT_DELETABLE)
    error = caught.value
    assert (error.status, error.operation, error.is_not_deletable_yet) == (405, "delete", True)
    assert str(error) == ("Bouncer delete failed: HTTP 405 Method Not Allowed: batch cannot be deleted in "
                          "current state")


def test_a_405_of_another_call_is_not_a_delete_refused():
    assert not BouncerError("x", status=405, operation="download").is_not_deletable_yet
    assert not BouncerError("x", status=400, operation="status").is_not_running


@pytest.mark.parametrize("operation", sorted(ENDINGS))
@pytest.mark.parametrize("answer, status, ends_cycle", [
    (dict(status=401, json={"status": 401, "error": "Unauthorized", "message": "key %s is bad" % KEY}), 401, True),
    (dict(status=429, json={"status": 429, "error": "Too Many Requests", "message": "too many requests"}), 429,
     True),
    (dict(status=503, body="<html>down</html>", content_type="text/html"), 503, False),
    (dict(body=ReadTimeout("read timed out")), None, False),
    (dict(body=ConnectionError("[Errno 111] Connection refused")), None, False),
])
def test_finish_and_delete_fail_as_one_bouncer_error_without_the_key(api, client, operation, answer, status,
                                                                     ends_cycle):
    with pytest.raises(BouncerError) as caught:
        ending_call(api, client, operation, **answer)
    error = caught.value
    assert (error.status, error.operation, error.ends_cycle) == (status, operation, ends_cycle)
    assert KEY not in str(error) and "\n" not in str(error)
    assert not (error.is_not_running or error.is_not_deletable_yet)
