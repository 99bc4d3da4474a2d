"""The console in a real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium), served over HTTP on loopback by the real web application: the page loads without a
browser console error, shows what `status --json` says and keeps up by itself, filters and the
detail view work, pausing from the page stops the creation cycle and resuming starts it again,
and a POST without its CSRF token is refused. Each test leaves a screenshot in its tmp dir."""
import json
import os
import threading

import pytest
from conftest import addresses, submit, with_settings
from operating import PASSWORD, busy_queue, figure, operator_app, status_json
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from werkzeug.serving import make_server

from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.queue.pauses import pause
from bouncer.store.models import AuditEntry, BouncerBatch, Pause, UserBatch, UserWeight
from bouncer.web import console as console_module
from bouncer.web import create_web_app

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless, as root, and quiet: the machine may have no network, and the page needs none.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--disable-quic", "--window-size=1400,1000")
WAIT = 20


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("Chromium is not installed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument("--user-data-dir=%s" % tmp_path_factory.mktemp("chromium-profile"))
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


class Console:
    """The console as a browser sees it."""

    def __init__(self, driver, port):
        self.driver, self.port = driver, port
        self.origin = "http://127.0.0.1:%d" % port

    def open(self, path="/"):
        # Credentials in the URL, as a person's answer to the browser's prompt: the browser
        # keeps them for the page's own requests (the refresh, the CSV).
        self.driver.get("http://operator:%s@127.0.0.1:%d%s" % (PASSWORD, self.port, path))
        WebDriverWait(self.driver, WAIT).until(lambda d: d.execute_script("return document.readyState") == "complete")

    def figures(self):
        """{path: value} of every figure on the page (data-figure, data-value as JSON)."""
        raw = self.driver.execute_script(
            "return Array.from(document.querySelectorAll('[data-figure]'),"
            " e => [e.dataset.figure, e.dataset.value]);")
        return {path: json.loads(value) for path, value in raw}

    # Read in one script each: the page may swap its sections between two WebDriver calls.
    def texts(self, selector):
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText.trim());", selector)

    def batch_ids(self):
        return [int(i) for i in self.driver.execute_script(
            "return Array.from(document.querySelectorAll('#batches tr[data-batch-id]'), e => e.dataset.batchId);")]

    def fetch(self, path, method="GET", form=None):
        """(status, body) of a request made by the page's own script."""
        return self.driver.execute_async_script(
            "const [url, method, fields, done] = arguments;"
            "const body = fields ? new FormData() : undefined;"
            "if (fields) Object.entries(fields).forEach(([k, v]) => body.append(k, v));"
            "fetch(url, {method, body}).then(r => r.text().then(t => done([r.status, t])),"
            " e => done([0, String(e)]));",
            self.origin + path, method, form)

    def errors(self):
        return [entry for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]

    def click(self, selector):
        """Click what submits a form or follows a link, and wait for the next page (a document
        without the mark this one gets; asked while it loads, the browser may answer an error)."""
        self.driver.execute_script("window.beforeClick = true")
        self.driver.find_element(By.CSS_SELECTOR, selector).click()
        WebDriverWait(self.driver, WAIT, ignored_exceptions=(WebDriverException,)).until(
            lambda d: d.execute_script("return !window.beforeClick && document.readyState === 'complete'"))


@pytest.fixture
def console(app, browser, tmp_path, monkeypatch):
    """The real web application on a loopback port, the console open in Chromium; a screenshot
    of where the test left it goes to its tmp dir."""
    monkeypatch.setattr(console_module, "REFRESH_SECONDS", 3600)   # a test that wants it sets it
    server = make_server("127.0.0.1", 0, create_web_app(operator_app(app)), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    browser.get_log("browser")                     # what earlier tests left behind
    try:
        yield Console(browser, server.server_port)
    finally:
        browser.save_screenshot(str(tmp_path / "console.png"))
        browser.get("about:blank")
        server.shutdown()
        thread.join(10)


def test_console_shows_what_status_json_says_and_keeps_up(console, app, bouncer, monkeypatch):
    monkeypatch.setattr(console_module, "REFRESH_SECONDS", 1)
    busy_queue(app, bouncer)
    pause("catchall", "quota review", "operator")
    console.open("/")
    shown, expected = console.figures(), status_json()
    assert {path: figure(expected, path) for path in shown} == shown
    for path in ("check_types.deliverable.new_emails", "check_types.deliverable.queued_emails",
                 "check_types.catchall.sent_emails", "check_types.deliverable.in_flight_batches",
                 "check_types.deliverable.credits_spent_today", "rate_limit.requests_last_60s", "possible_orphans",
                 "jobs.batch_creator_deliverable.last_success", "jobs.status_checker_catchall.overdue",
                 "paused.catchall.reason", "status"):
        assert path in shown
    assert shown["check_types.deliverable.queued_emails"] == 15 and shown["rate_limit.requests_last_60s"] > 0
    assert console.texts("#health .reasons li") == expected["reasons"]
    assert console.batch_ids() == [b["batch_id"] for b in expected["user_batches"]]
    assert len(console.driver.find_elements(By.CSS_SELECTOR, "#charts svg polyline")) >= 4
    assert console.errors() == []

    # It refreshes itself, without reloading the page.
    console.driver.execute_script("window.sameDocument = true")
    submit("zoe", addresses("zoe", 7))
    WebDriverWait(console.driver, WAIT).until(
        lambda d: console.figures()["check_types.deliverable.queued_emails"] == 22)
    assert console.driver.execute_script("return window.sameDocument") is True
    shown, expected = console.figures(), status_json()
    assert {path: figure(expected, path) for path in shown} == shown
    assert console.batch_ids()[0] == expected["user_batches"][0]["batch_id"]
    assert console.errors() == []


def test_filters_and_the_detail_view(console, app, bouncer):
    ids = busy_queue(app, bouncer)
    console.open("/")
    assert console.batch_ids() == sorted(ids.values(), reverse=True)

    console.driver.find_element(By.NAME, "user").send_keys("alice")
    console.click("#filters button")
    assert console.batch_ids() == [ids["alice"]]
    console.driver.find_element(By.NAME, "user").clear()
    Select(console.driver.find_element(By.NAME, "status")).select_by_value("processing")
    console.click("#filters button")
    processing = [b["batch_id"] for b in status_json()["user_batches"] if b["status"] == "processing"]
    assert console.batch_ids() == processing and len(processing) == 3
    assert console.driver.current_url.endswith("/?user=&status=processing")

    console.driver.find_element(By.LINK_TEXT, str(ids["alice"])).click()
    WebDriverWait(console.driver, WAIT).until(lambda d: d.current_url.endswith("/batches/%d" % ids["alice"]))
    status = status_json(ids["alice"])
    counts = {e.get_attribute("data-count"): int(e.text) for e in
              console.driver.find_elements(By.CSS_SELECTOR, "#outcomes [data-count]")}
    assert counts == status["counts"]
    states = {e.get_attribute("data-row-state"): int(e.text) for e in
              console.driver.find_elements(By.CSS_SELECTOR, "#row-states [data-row-state]")}
    assert (states["done"], states["invalid"], states["sent"], sum(states.values())) == (30, 1, 4, status["total"])
    ledger_ids = console.driver.find_elements(By.CSS_SELECTOR, "#batch-ledger tr[data-ledger-id]")
    assert len(ledger_ids) == 4

    code, body = console.fetch(console.driver.find_element(By.ID, "download").get_dom_attribute("href"))
    from clirun import invoke

    assert code == 200 and body == invoke(["results", str(ids["alice"])]).stdout_bytes.decode()

    console.open("/batches/%d" % ids["dave"])
    assert "batch.cancelled" in console.driver.find_element(By.ID, "batch-webhooks").text
    assert console.errors() == []


def test_pause_then_resume_changes_what_the_creation_cycle_does(console, app, bouncer):
    submit("alice", addresses("a", 25))
    console.open("/")
    cell = '.pause-cell[data-check-type="deliverable"]'
    console.driver.find_element(By.CSS_SELECTOR, cell + " input[name=reason]").send_keys("Bouncer maintenance")
    console.click(cell + " button.pause")
    assert "Batch creation paused for deliverable." in console.texts(".flashes li")
    assert console.figures()["paused.deliverable.reason"] == "Bouncer maintenance"
    assert status_json()["paused"]["deliverable"]["reason"] == "Bouncer maintenance"

    report = run_cycle(app, CREATION, "deliverable")
    assert report.stopped == "paused: Bouncer maintenance" and report.created == []
    assert bouncer.count("create") == 0

    console.click(cell + " button.resume")
    assert "Batch creation resumed for deliverable." in console.texts(".flashes li")
    assert "paused.deliverable.reason" not in console.figures()
    assert len(run_cycle(app, CREATION, "deliverable").created) == 3     # the test cap
    assert bouncer.count("create") == 3
    audit = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")][1:]
             for row in console.driver.find_elements(By.CSS_SELECTOR, "#audit tr[data-audit-action]")]
    assert audit == [["operator", "resume", "deliverable", ""],
                     ["operator", "pause", "deliverable", "Bouncer maintenance"]]
    assert console.errors() == []


def test_cancel_and_finish_from_the_page(console, app, bouncer):
    busy = submit("bob", addresses("b", 10))
    run_cycle(app, CREATION, "deliverable")               # bob's batch
    waiting = submit("alice", addresses("a", 35))
    run_cycle(app, CREATION, "deliverable")               # two of alice's (the test cap is 3), 15 wait
    console.open("/batches/%d" % waiting)
    console.click("#cancel")
    assert "not yet sent cancelled" in console.texts(".flashes li")[0]
    assert UserBatch.get_by_id(waiting).cancelled_at is not None

    stuck = BouncerBatch.select().where(BouncerBatch.status == "outstanding").order_by(BouncerBatch.id).first()
    bouncer.set_processed(stuck.bouncer_id, 7)
    console.open("/")
    row = '#ledger tr[data-ledger-id="%d"]' % stuck.id
    console.driver.find_element(By.CSS_SELECTOR, row + " input[name=reason]").send_keys("stuck at Bouncer")
    console.click(row + " button.danger")
    assert "Bouncer batch %d is being finished at Bouncer" % stuck.id in console.texts(".flashes li")[0]
    assert BouncerBatch.get_by_id(stuck.id).finish_reason == "stuck at Bouncer"
    assert [a.action for a in AuditEntry.select().order_by(AuditEntry.id)] == ["cancel", "finish"]
    assert "finishing" in console.driver.find_element(By.CSS_SELECTOR, row).text
    run_cycle(app, STATUS, "deliverable")                 # Bouncer asked to finish
    run_cycle(app, STATUS, "deliverable")                 # what it verified, ingested
    console.open("/")
    assert "finished: stuck at Bouncer" in console.driver.find_element(By.CSS_SELECTOR, row).text
    assert "(3 refunded)" in console.driver.find_element(By.CSS_SELECTOR, row).text
    # Alice's two batches, left carrying only cancelled rows, were finished too: 10 back each.
    assert console.figures()["check_types.deliverable.credits_refunded_total"] == 3 + 10 + 10
    console.open("/batches/%d" % busy)
    assert "Bouncer batch %s was finished before verifying it (stuck at Bouncer)" % stuck.bouncer_id \
        in console.driver.find_element(By.ID, "preview").text
    assert console.errors() == []


def test_weights_from_the_page_and_the_users_shares(console, app, bouncer):
    app = with_settings(app, queue_policy="fair")
    submit("alice", addresses("a", 30))
    submit("bob", addresses("b", 30))
    run_cycle(app, CREATION, "deliverable")
    console.open("/")
    table = '#fair-share table[data-check-type="deliverable"]'
    assert [" ".join(row.split()) for row in console.texts(table + " tr[data-user]")] == [
        "alice Set 15 15 50.0%", "bob Set 15 15 50.0%"]
    assert console.figures()["check_types.deliverable.queue_policy"] == "fair"
    weight = console.driver.find_element(By.CSS_SELECTOR, table + ' tr[data-user="bob"] input[name=weight]')
    weight.clear()
    weight.send_keys("4")
    console.click(table + ' tr[data-user="bob"] button.set-weight')
    assert "User bob weighs 4 now (was 1)" in console.texts(".flashes li")[0]
    form = "#weight-form"
    console.driver.find_element(By.CSS_SELECTOR, form + " input[name=user_id]").send_keys("carol")
    console.driver.find_element(By.CSS_SELECTOR, form + " input[name=weight]").send_keys("0.5")
    console.click(form + " button.set-weight")
    assert "User carol weighs 0.5 now (was 1)" in console.texts(".flashes li")[0]
    assert {w.user_id: w.weight for w in UserWeight.select()} == {"bob": 4.0, "carol": 0.5}
    assert [a.detail for a in AuditEntry.select().order_by(AuditEntry.id)] == ["from 1 to 4", "from 1 to 0.5"]
    assert console.driver.find_element(
        By.CSS_SELECTOR, table + ' tr[data-user="bob"] input[name=weight]').get_attribute("value") == "4"
    assert console.errors() == []


def test_a_post_without_the_csrf_token_is_refused(console, app):
    console.open("/")
    status, body = console.fetch("/check-types/deliverable/pause", "POST", {"reason": "forged"})
    assert status == 400 and json.loads(body) == {"error": "refused: the csrf token is missing"}
    # The page's own form, its token taken out.
    console.driver.execute_script("document.querySelectorAll('input[name=csrf_token]').forEach(e => e.remove())")
    console.click('.pause-cell[data-check-type="deliverable"] button.pause')
    assert "refused: the csrf token is missing" in console.driver.find_element(By.TAG_NAME, "body").text
    assert Pause.select().count() == 0 and AuditEntry.select().count() == 0


def test_erase_a_user_and_an_address_from_the_page(console, app, bouncer):
    submit("alice", ["Jane.Doe+a@gmail.com", "alice@example.com"])
    bob = submit("bob", ["janedoe@gmail.com", "bob@example.com"])
    console.open("/")
    form = "#forget-user"
    console.driver.find_element(By.CSS_SELECTOR, form + " input[name=user]").send_keys("alice")
    # Without the tick the browser does not send the form (it is required).
    console.driver.execute_script("window.sameDocument = true")
    console.driver.find_element(By.CSS_SELECTOR, form + " button").click()
    assert console.driver.execute_script("return window.sameDocument") is True
    assert UserBatch.select().count() == 2 and AuditEntry.select().count() == 0

    console.driver.find_element(By.CSS_SELECTOR, form + " input[name=confirm]").click()
    console.click(form + " button")
    assert console.texts(".flashes li")[0].startswith("The user was erased: 1 user batch(es), 2 row(s)")
    assert [b.user_id for b in UserBatch.select()] == ["bob"]

    form = "#forget-email"
    console.driver.find_element(By.CSS_SELECTOR, form + " input[name=email]").send_keys("JaneDoe@googlemail.com")
    console.driver.find_element(By.CSS_SELECTOR, form + " input[name=confirm]").click()
    console.click(form + " button")
    assert console.texts(".flashes li")[0].startswith("The address was erased: 1 row(s)")
    audit = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")][1:3]
             for row in console.driver.find_elements(By.CSS_SELECTOR, "#audit tr[data-audit-action]")]
    assert audit == [["operator", "forget address"], ["operator", "forget user"]]
    assert "alice" not in console.driver.find_element(By.ID, "audit").text.lower()
    console.open("/batches/%d" % bob)
    assert console.texts("#preview tbody tr td:first-child") == ["", "bob@example.com"]
    assert console.errors() == []
