"""A batch's callback_url never makes the service a door into its own host or network: a URL
resolving to a loopback, private, link-local, multicast or reserved address, in any spelling, is
refused at submit (422 naming the rule, nothing written) and again before each delivery (a name
may resolve elsewhere by then), unless WEBHOOK_ALLOW_PRIVATE=true; credentials in it are refused,
not stored; the operator's WEBHOOK_URL is trusted as set. Nothing is sent anywhere but loopback:
names resolve through the `dns` fixture."""
import json

import pytest
from conftest import PUBLIC_ADDRESS, addresses, with_settings

from bouncer.doors.loading import create_user_batch
from bouncer.news import targets, webhooks
from bouncer.queue import progress
from bouncer.reading.batches import batch_status
from bouncer.states import DeliveryState
from bouncer.store.models import UserBatch, UserBatchEmail, WebhookAttempt, WebhookDelivery
from bouncer.web import create_web_app
from support.receiver import Receiver

TOKEN = "tok-host-app-3f9a2c71"
SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaA=="
RULE = targets.RULE

REFUSED = [
    "http://127.0.0.1:6390/",                  # the service's own Redis
    "http://localhost:5433/",                  # a name for loopback
    "http://2130706433/",                      # 127.0.0.1 as one decimal number
    "http://0x7f000001/",                      # ... in hexadecimal
    "http://0177.0.0.1/",                      # ... in octal
    "http://127.1/",                           # ... shortened
    "http://[::1]:8000/",                      # IPv6 loopback
    "http://[::ffff:127.0.0.1]/",              # IPv4 loopback inside IPv6
    "http://[::ffff:7f00:1]/",                 # ... spelled in hexadecimal
    "http://0.0.0.0:8000/",                    # unspecified: this host on Linux
    "http://10.0.0.5/hooks",                   # private
    "http://192.168.1.1/", "http://172.16.0.1/", "http://[fd00::1]/",
    "http://169.254.169.254/latest/meta-data/",  # link-local: a cloud's metadata service
    "http://[fe80::1]/",
    "http://224.0.0.1/", "http://[ff02::1]/",  # multicast
    "http://240.0.0.1/", "http://255.255.255.255/",   # reserved
    "http://100.64.0.1/",                      # shared address space (carrier NAT)
    "http://internal.example/",                # a name resolving to a private address
    "http://mixed.example/",                   # one public address and one loopback
    "http://nowhere.example/",                 # a name that does not resolve
]


@pytest.fixture
def api_app(app, dns):
    dns.update({"internal.example": ["10.0.0.7"], "mixed.example": [PUBLIC_ADDRESS, "127.0.0.1"]})
    return with_settings(app, api_tokens=(TOKEN,), webhook_secret=SECRET)


def submit(app, callback_url):
    client = create_web_app(app).test_client()
    return client.post("/api/v1/batches", headers={"Authorization": "Bearer %s" % TOKEN},
                       content_type="application/json", data=json.dumps({
                           "user_id": "mallory", "check_type": "deliverable", "emails": ["a@example.com"],
                           "callback_url": callback_url}))


def nothing_written():
    return UserBatch.select().count() == 0 and UserBatchEmail.select().count() == 0


@pytest.mark.parametrize("url", REFUSED)
def test_submit_refuses_a_callback_url_that_reaches_inside(api_app, url):
    response = submit(api_app, url)
    assert (response.status_code, response.get_json()) == (422, {"error": RULE})
    assert nothing_written()


@pytest.mark.parametrize("url", ["https://hooks.example.com/bouncer", "http://%s:8080/h" % PUBLIC_ADDRESS,
                                 "https://[2001:4860:4860::8888]/h"])
def test_submit_takes_a_callback_url_that_resolves_to_public_addresses(api_app, url):
    response = submit(api_app, url)
    assert response.status_code == 201, response.get_json()
    assert UserBatch.get_by_id(response.get_json()["batch_id"]).callback_url == url


@pytest.mark.parametrize("url", ["http://127.0.0.1:6390/", "http://2130706433/", "http://[::1]/", "http://internal.example/"])
def test_webhook_allow_private_lets_a_callback_url_name_a_private_address(api_app, url):
    assert submit(with_settings(api_app, webhook_allow_private=True), url).status_code == 201


@pytest.mark.parametrize("url", ["https://user:pw-9f9f9f@hooks.example.com/h", "https://:pw-9f9f9f@hooks.example.com/h",
                                 "https://user@hooks.example.com/h"])
def test_credentials_in_a_callback_url_are_refused_and_not_stored(api_app, url):
    response = submit(with_settings(api_app, webhook_allow_private=True), url)
    assert response.status_code == 422
    assert response.get_json()["error"].startswith("callback_url must not hold credentials")
    assert "pw-9f9f9f" not in response.get_data(as_text=True)
    assert nothing_written()


# -- at delivery --

@pytest.fixture
def hooks(settings, db):
    """The settings of a sender, with no `responses` in the way: real HTTP, to loopback only."""
    return settings.replace(webhook_secret=SECRET, webhook_retry_schedule=(1, 1, 1))


def ended_batch(callback_url):
    """A user batch with a callback_url, ended (cancelled before anything was sent)."""
    batch_id = create_user_batch("alice", "deliverable", addresses("a", 2), callback_url=callback_url).batch_id
    progress.cancel_batch(batch_id)
    return batch_id


def test_a_name_that_resolves_to_loopback_by_delivery_time_is_given_up_with_nothing_sent(hooks, dns):
    with Receiver(SECRET) as receiver:
        port = receiver.server.server_address[1]
        batch_id = ended_batch("http://hooks.example.com:%d/hooks" % port)   # public at submit
        dns["hooks.example.com"] = ["127.0.0.1"]                            # ... and now not
        assert webhooks.send_due(hooks) == {DeliveryState.GIVEN_UP: 1}
        assert receiver.received == []
    delivery = batch_status(batch_id)["webhook"]
    assert delivery["state"] == "given up" and delivery["last_error"] == "refused, nothing sent: %s" % RULE
    assert WebhookAttempt.select().count() == 0


def test_a_name_that_changes_between_the_check_and_the_connection_is_not_reached(hooks, dns, monkeypatch):
    """The address checked is the address connected to: a resolver that answers a public
    address to the check and loopback to the next question gets nothing through."""
    with Receiver(SECRET) as receiver:
        port = receiver.server.server_address[1]
        ended_batch("http://rebind.example:%d/hooks" % port)
        answers = iter([[PUBLIC_ADDRESS], ["127.0.0.1"]])
        monkeypatch.setattr(targets, "resolve", lambda host, port: next(answers))
        assert webhooks.send_due(hooks) == {DeliveryState.PENDING: 1}
        assert receiver.received == []
    attempt = WebhookAttempt.get()
    assert attempt.status_code is None and attempt.error == "refused, nothing sent: %s" % RULE


def test_a_name_that_does_not_resolve_at_delivery_is_an_attempt_retried(hooks, dns):
    ended_batch("https://hooks.example.com/h")
    del dns["hooks.example.com"]
    assert webhooks.send_due(hooks) == {DeliveryState.PENDING: 1}
    delivery = WebhookDelivery.get()
    assert delivery.attempts == 1 and "does not resolve" in delivery.last_error


def test_webhook_url_is_trusted_as_set(hooks):
    with Receiver(SECRET) as receiver:
        ended_batch(None)
        assert webhooks.send_due(hooks.replace(webhook_url=receiver.url)) == {
            DeliveryState.DELIVERED: 1}
        assert len(receiver.verified()) == 1


def test_with_webhook_allow_private_a_loopback_callback_url_is_delivered(hooks):
    with Receiver(SECRET) as receiver:
        ended_batch(receiver.url)
        assert webhooks.send_due(hooks.replace(webhook_allow_private=True)) == {
            DeliveryState.DELIVERED: 1}
        assert len(receiver.verified()) == 1
