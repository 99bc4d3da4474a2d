"""`/api/v1`: the HTTP door, for host applications in any language (design.md, "The HTTP door").

Every call carries `Authorization: Bearer <token>` (API_TOKENS, API_OPERATOR_TOKENS); no or a
wrong token is the same 401 on every route, so an answer never says whether a batch exists. Each
token is a tenant: it sees only the batches it created (tenants.py). A submit is read as a stream
(submission.py); the OpenAPI description is made from the schemas (schemas.py).
"""
import json
import logging
from contextlib import contextmanager

from apiflask import APIBlueprint, abort
from flask import Response, request, stream_with_context

from bouncer.errors import Conflict, Gone, NotFound
from bouncer.reading.batches import batch_status, batch_with_rows, iter_results, page_of_batches, results_csv
from bouncer.services import batches, erasure
from bouncer.web.auth import bearer_token, token_matches
from bouncer.web.context import bouncer_app
from bouncer.web.schemas import (
    BatchList, ListQuery, ResultsQuery, StatusObject, SubmitQuery, Submitted, describe_submit_body, errors,
)
from bouncer.web.submission import Submission
from bouncer.web.tenants import caller, own_batch_or_404, set_caller

log = logging.getLogger(__name__)

DESCRIPTION = ("Submit lists of addresses to verify, follow them, fetch their results. Batches are "
               "verified by the queue in large, cheap batches at Bouncer; when one ends, a Standard "
               "Webhooks signed POST goes to its callback_url (or WEBHOOK_URL).")
blueprint = APIBlueprint("api", __name__, url_prefix="/api/v1", tag="Batches")


def register(web):
    web.register_blueprint(blueprint)
    web.spec_processor(describe_submit_body)


# -- authentication --

@blueprint.before_request
def authenticate():
    settings = bouncer_app().settings
    if not settings.every_api_token:
        abort(503, "the HTTP API is off: set API_TOKENS to turn it on")
    token = bearer_token(request.headers.get("Authorization"))
    if not token_matches(token, settings.every_api_token):
        abort(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
    set_caller(token, sees_all=token_matches(token, settings.api_operator_tokens))


# -- routes --

@blueprint.get("/batches/<int:batch_id>")
@blueprint.output(StatusObject)
@blueprint.doc(summary="One user batch's status", security="BearerAuth", responses=errors(404))
def status(batch_id):
    own_batch_or_404(batch_id)
    return batch_status(batch_id)


@blueprint.post("/batches")
@blueprint.input(SubmitQuery, location="query", arg_name="query", validation=False)
@blueprint.output(Submitted, status_code=201, description="created (200: a retry with the same Idempotency-Key)")
@blueprint.doc(summary="Submit a user batch", security="BearerAuth", responses=errors(400, 409, 413, 422))
def submit(query):
    """JSON `{"user_id", "check_type", "emails": [...], "callback_url"?}`, or a text/plain or
    text/csv body with the fields as query parameters. Read as a stream."""
    return Submission(bouncer_app().settings).run()


@blueprint.get("/batches/<int:batch_id>/results")
@blueprint.input(ResultsQuery, location="query", arg_name="query")
@blueprint.doc(summary="One row per submitted row, in position order", security="BearerAuth",
               responses={200: {"description": "JSON list, or CSV with ?format=csv or Accept: text/csv",
                                "headers": {"X-Batch-Status": {"schema": {"type": "string"}}}},
                          **errors(404, 410)})
def results(batch_id, query):
    own_batch_or_404(batch_id)
    try:
        batch = batch_with_rows(batch_id)
    except Gone as exc:
        abort(410, str(exc))
    csv_wanted = query.get("format") == "csv" or (
        query.get("format") is None and request.accept_mimetypes.best == "text/csv")
    rows = iter_results(batch_id)
    body = results_csv(rows) if csv_wanted else json_lines(rows)
    response = Response(stream_with_context(body), content_type="text/csv; charset=utf-8" if csv_wanted
                        else "application/json")
    response.headers["X-Batch-Status"] = batch.status
    return response


@blueprint.get("/batches")
@blueprint.input(ListQuery, location="query", arg_name="query")
@blueprint.output(BatchList)
@blueprint.doc(summary="User batches, newest first", security="BearerAuth")
def list_batches(query):
    limit = max(1, min(query.get("limit", 50), 500))
    page, next_before = page_of_batches(limit, user_id=query.get("user_id"), before=query.get("before"),
                                        with_webhooks=True, api_token_digest=caller().listing_filter)
    return {"batches": page, "next_before": next_before}


@blueprint.post("/batches/<int:batch_id>/cancel")
@blueprint.output(StatusObject)
@blueprint.doc(summary="Cancel a user batch", security="BearerAuth", responses=errors(404, 409),
               description="Emails not yet sent end cancelled; those in flight finish with their "
                           "verdicts (a Bouncer batch left with no other user's emails is finished at "
                           "Bouncer: what it had not verified ends cancelled, its credits refunded); the "
                           "batch becomes cancelled when its last email ends.")
def cancel(batch_id):
    own_batch_or_404(batch_id)
    with refusals_as_http():
        batches.cancel_user_batch(bouncer_app(), batch_id)
    return batch_status(batch_id)


@blueprint.delete("/batches/<int:batch_id>")
@blueprint.output({}, status_code=204, description="erased")
@blueprint.doc(summary="Erase a user batch", security="BearerAuth", responses=errors(404, 409),
               description="The batch, its rows, its webhook deliveries and idempotency records are removed; rows "
                           "still in line or in flight are cancelled first. An address only this batch held goes "
                           "with its verdicts. Audited without the erased data. 409 while it is still being "
                           "written (a submit under way).")
def erase(batch_id):
    own_batch_or_404(batch_id)
    with refusals_as_http():
        erasure.erase_user_batch(bouncer_app(), batch_id, who="api:token %s" % caller().token_digest[:12])
    return ""


@contextmanager
def refusals_as_http():
    """A service's refusal as the API's answer: no such batch, 404; not now, 409 with the reason."""
    try:
        yield
    except NotFound:
        abort(404)
    except Conflict as exc:
        abort(409, str(exc))


def json_lines(rows):
    yield "["
    for i, row in enumerate(rows):
        yield ("," if i else "") + "\n" + json.dumps(row, ensure_ascii=False)
    yield "\n]\n"


