"""The operator console at `/` (design.md, "Operating it: console and metrics").

Server-rendered pages behind HTTP Basic auth (user `operator`, OPERATOR_PASSWORD; unset: every
console route answers 503 saying so), refreshed in place by a small script that fetches the
page again and swaps its live sections. Every figure comes from the reporting layer that
`status --json` and /metrics read (health.service_state, reports, history), so the three
never disagree.

Actions are POSTs with a CSRF token (Flask-WTF), each recorded in the audit log: pause and
resume batch creation per check type, cancel a user batch, finish a stuck Bouncer batch at
Bouncer (its verified part kept, the rest refunded; failed as before if Bouncer refuses), erase
what the service holds of a user or of an address (an erasure request, confirmed by a tick), set
a user's weight (QUEUE_POLICY=fair). The
session and CSRF key is derived from OPERATOR_PASSWORD, so every web process agrees on it;
only the console's POSTs ask for the token (the API and Bouncer's callback do not).
"""
import hashlib
import hmac
import logging
from itertools import islice

from apiflask import APIBlueprint, HTTPBasicAuth, abort
from flask import Response, flash, redirect, render_template, request, stream_with_context, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect
from markupsafe import Markup

from bouncer.errors import Conflict, Gone, InputError, NotFound
from bouncer.masking import mask_secrets
from bouncer.names import CHECK_TYPES
from bouncer.queue import audit, pauses
from bouncer.reading import activity
from bouncer.reading.batches import batch_with_rows, iter_results, page_of_batches, results_csv, row_states
from bouncer.reading.health import runtime_reasons, service_state
from bouncer.reading.history import DEFAULT_HOURS, WINDOWS, chart_series
from bouncer.reading.overview import rq_backlog
from bouncer.services import batches, erasure, weights
from bouncer.states import ENDED_BATCH_STATES, BatchState
from bouncer.store.database import utcnow
from bouncer.web.charts import line_chart
from bouncer.web.context import batch_status_or_404, bouncer_app, started_at

log = logging.getLogger(__name__)

OPERATOR = "operator"
PAGE = 20                 # user batches per page
PREVIEW_ROWS = 50         # rows of a batch shown on its page
MAX_TEXT = 300            # longest reason an operator may type
REFRESH_SECONDS = 10
SECURITY_HEADERS = {
    # Everything the page needs is served here: no CDN, no inline script or style.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

blueprint = APIBlueprint("console", __name__, enable_openapi=False, template_folder="templates",
                         static_folder="static", static_url_path="/console/static")
auth = HTTPBasicAuth(realm="Bouncer console")
csrf = CSRFProtect()


def register(web):
    settings = web.extensions["bouncer"].settings
    web.config.update(WTF_CSRF_CHECK_DEFAULT=False, SESSION_COOKIE_NAME="bouncer_console",
                      SESSION_COOKIE_SAMESITE="Lax")
    if settings.operator_password:
        web.secret_key = session_key(settings.operator_password)
    csrf.init_app(web)
    web.register_blueprint(blueprint)
    web.jinja_env.filters.update(when=when, duration=duration, figure=figure)


def session_key(password):
    """The key signing the session and its CSRF token: the same in every web process, and no
    use for recovering the password."""
    return hmac.new(password.encode(), b"bouncer console session", hashlib.sha256).hexdigest()


# -- who may see it --

@blueprint.before_request
def console_is_on():
    if not bouncer_app().settings.operator_password:
        abort(503, "the console is off: set OPERATOR_PASSWORD to turn it on")


@blueprint.before_request
@auth.login_required
def operator_only():
    """Every console route, static files included, wants the operator's password."""


@blueprint.before_request
def csrf_on_posts():
    if request.method == "POST":
        csrf.protect()


@blueprint.errorhandler(CSRFError)
def csrf_refused(error):
    return {"error": "refused: %s" % error.description.rstrip(".").lower()}, 400


@auth.verify_password
def verify_password(username, password):
    expected = bouncer_app().settings.operator_password or ""
    # Both compared in constant time, whatever the first said.
    user_ok = hmac.compare_digest((username or "").encode(), OPERATOR.encode())
    password_ok = hmac.compare_digest((password or "").encode(), expected.encode())
    return OPERATOR if user_ok and password_ok and expected else None


@blueprint.after_request
def harden(response):
    response.headers.update(SECURITY_HEADERS)
    if response.mimetype == "text/html" and not response.is_streamed:
        # The last look before a page leaves: no secret of the settings in it, whatever a
        # stored error message may have echoed.
        response.set_data(mask_secrets(response.get_data(as_text=True), bouncer_app().settings.secrets()))
    return response


# -- pages --

@blueprint.context_processor
def page_context():
    return {"now_shown": utcnow().isoformat(sep=" ", timespec="seconds") + " UTC", "refresh": REFRESH_SECONDS}


@blueprint.get("/")
def overview():
    settings = bouncer_app().settings
    user_id, status, before, hours = batch_filters(), status_filter(), int_arg("before"), hours_arg()
    now = utcnow()
    state = service_state(settings, started_at(), now)
    state["reasons"] = runtime_reasons(bouncer_app()) + state["reasons"]     # as `status` says them
    page, next_before = page_of_batches(PAGE, user_id, status, before)
    return render_template(
        "console/overview.html", state=state, overview=state["overview"], redis=redis_figures(),
        charts=charts(chart_series(settings, hours, now)), hours=hours, windows=sorted(WINDOWS),
        batches=page, next_before=next_before, filters={"user": user_id or "", "status": status or ""},
        statuses=list(BatchState), ledger=activity.recent_bouncer_batches(now=now),
        failures=activity.recent_failures(now=now), deliveries=activity.recent_deliveries(),
        audit=audit.recent_audit(), check_types=CHECK_TYPES)


@blueprint.get("/batches/<int:batch_id>")
def batch(batch_id):
    status = batch_status_or_404(batch_id)
    preview = [] if status["pruned_at"] else list(islice(iter_results(batch_id), PREVIEW_ROWS))
    return render_template(
        "console/batch.html", batch=status, rows=row_states(batch_id), preview=preview,
        ledger=activity.bouncer_batches_of(batch_id), deliveries=activity.deliveries_of(batch_id),
        ended=status["status"] in ENDED_BATCH_STATES)


@blueprint.get("/batches/<int:batch_id>/results.csv")
def batch_results(batch_id):
    batch_status_or_404(batch_id)
    try:
        batch_with_rows(batch_id)
    except Gone as exc:
        abort(410, str(exc))
    secrets = bouncer_app().settings.secrets()
    # Pieces end at row boundaries, so each is masked whole.
    pieces = (mask_secrets(piece, secrets) for piece in results_csv(iter_results(batch_id)))
    response = Response(stream_with_context(pieces), content_type="text/csv; charset=utf-8")
    response.headers["Content-Disposition"] = 'attachment; filename="batch-%d-results.csv"' % batch_id
    return response


def charts(series):
    times = series["times"]
    return [
        line_chart("Slot use: Bouncer batches in flight", times, series["slot_use"],
                   ceiling=(series["max_outstanding"], "cap %d" % series["max_outstanding"])),
        line_chart("Bouncer requests per minute", times, {"requests": series["requests_per_minute"]},
                   ceiling=(series["buffer"], "buffer %d" % series["buffer"])),
        line_chart("Emails verified per minute", times, series["verified_per_minute"]),
        line_chart("Completion-to-results delay", times, {"delay": series["results_delay_seconds"]}, unit="s"),
    ]


def redis_figures():
    """The RQ backlog and workers, or None when Redis does not answer (the page still shows)."""
    try:
        return rq_backlog(bouncer_app().redis)
    except Exception as exc:
        log.warning("Console: Redis does not answer (%s)", type(exc).__name__)
        return None


# -- actions --

@blueprint.post("/check-types/<check_type>/pause")
def pause(check_type):
    check_type = known_check_type(check_type)
    reason = form_text("reason") or "paused from the console"
    pauses.pause(check_type, reason, OPERATOR)
    flash("Batch creation paused for %s." % check_type)
    return back()


@blueprint.post("/check-types/<check_type>/resume")
def resume(check_type):
    check_type = known_check_type(check_type)
    resumed = pauses.resume(check_type, OPERATOR)
    flash("Batch creation resumed for %s." % check_type if resumed else "%s was not paused." % check_type)
    return back()


@blueprint.post("/batches/<int:batch_id>/cancel")
def cancel(batch_id):
    try:
        cancelled = batches.cancel_user_batch(bouncer_app(), batch_id, who=OPERATOR)
    except NotFound:
        abort(404)
    except Conflict as exc:
        flash("Not cancelled: %s." % exc, "error")
        return back()
    flash("User batch %d cancelled: %d email(s) not yet sent cancelled; those in flight finish."
          % (batch_id, cancelled))
    return back()


@blueprint.post("/bouncer-batches/<int:ledger_id>/finish")
def finish(ledger_id):
    reason = form_text("reason")
    if not reason:
        abort(400, "say why the Bouncer batch is finished (reason)")
    try:
        asked = batches.finish_bouncer_batch(bouncer_app(), ledger_id, reason, who=OPERATOR)
    except NotFound:
        abort(404)
    if not asked:
        flash("Bouncer batch %d is not outstanding, or is being finished already: nothing done." % ledger_id,
              "error")
        return back()
    flash("Bouncer batch %d is being finished at Bouncer: what it verified is kept, the rest is refunded and "
          "fails with your reason." % ledger_id)
    return back()


@blueprint.post("/erasure/user")
def forget_user():
    return erase(erasure.forget_user, form_value("user"), "user")


@blueprint.post("/erasure/email")
def forget_email():
    return erase(erasure.forget_email, form_value("email"), "address")


def erase(action, value, kind):
    """An erasure request from the console: confirmed by its tick, done, said in one line."""
    if request.form.get("confirm") != "yes":
        abort(400, "tick the box to confirm: an erasure cannot be undone")
    try:
        outcome = action(bouncer_app(), value, who=OPERATOR)
    except (InputError, NotFound, Conflict) as exc:
        flash("Nothing erased: %s." % exc, "error")
        return back()
    flash("The %s was erased: %s." % (kind, outcome.erased.summary()))
    return back()


@blueprint.post("/weights")
def set_weight():
    user_id = form_text("user_id")
    try:
        before, after = weights.set_user_weight(user_id, form_text("weight"), who=OPERATOR)
    except InputError as exc:
        abort(400, str(exc))
    flash("User %s weighs %g now (was %g); the rows in line take it at the next creation cycle."
          % (user_id, after, before))
    return back()


def back():
    """To the page the form was on (a path of this site only), else the overview."""
    target = request.form.get("next", "")
    return redirect(target if is_own_path(target) else url_for("console.overview"), code=303)


def is_own_path(target):
    """Whether `target` is a path of this site: `/`, then no second `/` or `\\` at once, and no
    control character or space anywhere (a browser drops tabs and line breaks from a URL, so
    `/\t/evil.example` is `//evil.example` to it, and a line break cannot go in a header)."""
    return (target[:1] == "/" and target[1:2] not in ("/", "\\") and "\\" not in target
            and not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in target))


# -- reading the request --

def batch_filters():
    user_id = request.args.get("user", "").strip()
    if len(user_id) > MAX_TEXT:
        abort(400, "user: at most %d characters" % MAX_TEXT)
    return user_id or None


def status_filter():
    status = request.args.get("status", "").strip()
    if status and status not in list(BatchState):
        abort(400, "status must be one of %s" % ", ".join(BatchState))
    return status or None


def int_arg(name):
    value = request.args.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or len(value) > 18:
        abort(400, "%s must be a whole number" % name)
    return int(value)


def hours_arg():
    hours = int_arg("hours") or DEFAULT_HOURS
    if hours not in WINDOWS:
        abort(400, "hours must be one of %s" % ", ".join(map(str, sorted(WINDOWS))))
    return hours


def known_check_type(check_type):
    if check_type not in CHECK_TYPES:
        abort(404)
    return check_type


def form_value(name):
    """A value as typed (a user id, an address), without the spaces around it."""
    value = request.form.get(name, "").strip()
    if len(value) > MAX_TEXT:
        abort(400, "%s: at most %d characters" % (name, MAX_TEXT))
    return value


def form_text(name):
    text = " ".join(request.form.get(name, "").split())
    if len(text) > MAX_TEXT:
        abort(400, "%s: at most %d characters" % (name, MAX_TEXT))
    return text


# -- template filters --

def when(iso):
    """'2026-12-01T13:58:29.123456Z' -> '13:58:29' today, '12-01 13:58' before; in full on hover."""
    if not iso:
        return "–"
    full = iso[:19].replace("T", " ")
    shown = full[11:] if full.startswith(utcnow().date().isoformat()) else full[5:16]
    return Markup('<span class="time" title="%s UTC">%s</span>') % (full, shown)


def duration(seconds):
    if seconds is None:
        return "–"
    seconds = round(seconds)
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % (seconds // 60)
    if seconds < 172800:
        return "%d h %02d min" % (seconds // 3600, seconds // 60 % 60)
    return "%d days" % (seconds // 86400)


def figure(value):
    """A count as the page shows it: 12,345."""
    return "{:,}".format(value) if isinstance(value, int) and not isinstance(value, bool) else value
