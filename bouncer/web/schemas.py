"""The API's schemas: its OpenAPI description (GET /api/v1/openapi.json) is made from them."""


from apiflask import Schema
from apiflask.fields import Dict, Float, Integer, List, Nested, String
from apiflask.validators import OneOf

from bouncer.names import CHECK_TYPES
from bouncer.states import BatchState

RESULT_FORMATS = ("json", "csv")


class Counts(Schema):
    deliverable = Integer()
    risky = Integer()
    undeliverable = Integer()
    unknown = Integer()
    invalid = Integer()
    failed = Integer()
    cancelled = Integer()
    pending = Integer()


class StatusObject(Schema):
    batch_id = Integer()
    user_id = String()
    check_type = String(metadata={"enum": list(CHECK_TYPES)})
    status = String(metadata={"enum": list(BatchState)})
    total = Integer()
    done = Integer()
    counts = Nested(Counts)
    rechecking = Integer(metadata={"description": "pending rows whose greylisted verdict is being tried again"})
    created_at = String(metadata={"format": "date-time"})
    completed_at = String(allow_none=True, metadata={"format": "date-time"})
    failure_reason = String(allow_none=True)
    pruned_at = String(allow_none=True, metadata={"format": "date-time",
                                                  "description": "when its rows were removed after the retention "
                                                                 "period (its counts remain)"})
    weight = Float(metadata={"description": "the user's share under QUEUE_POLICY=fair (1 unless set)"})
    place_in_line = Integer(allow_none=True, metadata={
        "description": "an estimate: addresses in line ahead of this batch's next one; null when none of its "
                       "addresses is in line"})
    estimated_start_at = String(allow_none=True, metadata={
        "format": "date-time", "description": "an estimate: when its next address goes to Bouncer, from the "
                                              "pace of the last hour; null when unknown or none is in line"})
    webhook = Dict(allow_none=True, metadata={"description": "the latest webhook delivery, if any"})


class InvalidLine(Schema):
    line = Integer()
    email = String()
    error = String()


class Submitted(Schema):
    batch_id = Integer()
    accepted = Integer()
    invalid = Integer()
    duplicates = Integer()
    invalid_lines = List(Nested(InvalidLine), metadata={"description": "the first 10"})


class SubmitBody(Schema):
    user_id = String(required=True)
    check_type = String(required=True, metadata={"enum": list(CHECK_TYPES)})
    emails = List(String(), required=True)
    callback_url = String(metadata={"format": "uri"})


class SubmitQuery(Schema):
    user_id = String(metadata={"description": "required with a text/plain or text/csv body"})
    check_type = String(metadata={"enum": list(CHECK_TYPES)})
    callback_url = String(metadata={"format": "uri"})


class ListQuery(Schema):
    user_id = String()
    limit = Integer(load_default=50, metadata={"minimum": 1, "maximum": 500})
    before = Integer()


class ListedBatch(StatusObject):
    """A status object in a listing (a schema of its own: apispec would otherwise meet
    StatusObject twice, once nested, once as an answer)."""


class BatchList(Schema):
    batches = List(Nested(ListedBatch))
    next_before = Integer(allow_none=True)


class ResultsQuery(Schema):
    format = String(validate=OneOf(RESULT_FORMATS), metadata={"enum": list(RESULT_FORMATS)})


class Error(Schema):
    error = String()


ERRORS = {401: "no or wrong bearer token", 503: "the API is off (API_TOKENS unset)"}


def errors(*codes):
    described = {400: "malformed", 404: "no such batch", 409: "conflict", 410: "its rows were removed after the "
                 "retention period", 413: "too many rows", 422: "refused"}
    return {**{code: {"description": ERRORS.get(code) or described[code],
                      "content": {"application/json": {"schema": Error}}} for code in (401, 503, *codes)}}


def describe_submit_body(spec):
    """The submit route reads its body as a stream, so its three forms are described here."""
    operation = spec["paths"]["/api/v1/batches"]["post"]
    operation["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/SubmitBody"}},
        "text/plain": {"schema": {"type": "string", "description": "one address a line"}},
        "text/csv": {"schema": {"type": "string", "description": "a CSV with an `email` column"}},
    }}
    spec.setdefault("components", {}).setdefault("schemas", {})["SubmitBody"] = {
        "type": "object", "required": ["user_id", "check_type", "emails"], "properties": {
            "user_id": {"type": "string"}, "check_type": {"type": "string", "enum": list(CHECK_TYPES)},
            "emails": {"type": "array", "items": {"type": "string"}},
            "callback_url": {"type": "string", "format": "uri"}}}
    return spec


