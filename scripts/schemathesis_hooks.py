"""schemathesis hooks for scripts/schemathesis.sh (loaded through SCHEMATHESIS_HOOKS).

The positive-data check (ST202 "schema-valid data must be accepted") stays on for every
operation. A few rules between fields cannot be written in OpenAPI 3.1; for the operations that
have them, the *positive* cases schemathesis generates are narrowed here to requests those rules
allow, changing as little of the generated case as possible (negative cases are left alone):

PUT /api/v1/users/{user_id}/tokens
  - a header generated as `null` (the schema types If-Match, If-None-Match and X-Lease-Fence as
    nullable) is not sent: an absent header is what null means;
  - `If-Match` and `If-None-Match` are each valid, but not together (422): If-None-Match is
    dropped when both were generated;
  - `garth_dump` must decode to garth's two token objects (base64 of a JSON array): a generated
    string is replaced by a real dump (of generated objects when the case has them);
  - `garth_dump` and the two objects are alternatives: the dump is dropped when both came;
  - the body takes no field beyond its kind's (422 `unknown field`): extra ones are dropped;
  - the token strings must not be empty, and the four expiry integers must lie in
    0..=253402300799 (year 9999): an empty string or an integer outside is replaced.
    (openapi.json states neither: no minLength, no minimum/maximum, no additionalProperties:
    false; reported as a spec gap.)
POST /api/v1/mfa/challenges
  - `destination` must suit `method` (an e-mail address for `email`; an e-mail address or a
    phone number of 4-20 digits for `sms`): a generated destination that does not is replaced;
  - `code` is only for `verifier: service`: dropped for `external`.
"""

import base64
import json
import re

import uuid

import schemathesis
from schemathesis import GenerationMode

PUT_TOKENS = ("PUT", "/api/v1/users/{user_id}/tokens")
POST_CHALLENGES = ("POST", "/api/v1/mfa/challenges")

OAUTH1 = {"oauth_token": "st-hook-o1", "oauth_token_secret": "st-hook-o1s", "mfa_token": None,
          "mfa_expiration_timestamp": None, "domain": "garmin.com"}
OAUTH2 = {"scope": "CONNECT_READ", "jti": "st-hook", "token_type": "Bearer", "access_token": "st-hook-acc",
          "refresh_token": "st-hook-ref", "expires_in": 86400, "expires_at": 4102444800,
          "refresh_token_expires_in": 2592000, "refresh_token_expires_at": 4102444800}


def _positive(case):
    meta = getattr(case, "meta", None)
    return meta is not None and meta.generation.mode == GenerationMode.POSITIVE


def _op(context):
    op = context.operation
    return (op.method.upper(), op.path) if op is not None else None


def _destination_ok(method, dest):
    """What the service accepts (src/domain/mfa.rs, mask_destination)."""
    dest = dest.strip()
    if not dest or len(dest) > 254 or re.search(r"[\x00-\x1f\x7f-\x9f]", dest):
        return False
    if "@" in dest:
        local, _, domain = dest.partition("@")
        return bool(local) and bool(domain) and "@" not in domain
    if method == "email":
        return False
    if all(c in "0123456789 +-()." for c in dest):
        return 4 <= sum(c in "0123456789" for c in dest) <= 20
    return method != "sms"


MAX_UNIX = 253_402_300_799  # 9999-12-31T23:59:59Z, src/domain/tokens.rs
BODY_FIELDS = {"garth": {"kind", "oauth1_token", "oauth2_token", "garth_dump"},
               "garminconnect": {"kind", "di_token", "di_refresh_token", "di_client_id", "garminconnect_dump"}}
GC_DUMP = json.dumps({"di_token": "st-hook-di", "di_refresh_token": "st-hook-di-ref", "di_client_id": "st-hook-client"})


def _non_empty(obj, fields, tag):
    for f in fields:
        if obj.get(f) == "":
            obj[f] = f"st-{tag}-{f}"


def _token_body(body):
    kind = body.get("kind")
    for k in [k for k in body if k not in BODY_FIELDS.get(kind, body)]:
        del body[k]  # the body objects take no other field (422 `unknown field`)
    if kind == "garth":
        if "garth_dump" in body:
            if "oauth1_token" in body or "oauth2_token" in body:
                del body["garth_dump"]
            else:
                body["garth_dump"] = base64.b64encode(json.dumps([OAUTH1, OAUTH2]).encode()).decode()
        o1, o2 = body.get("oauth1_token"), body.get("oauth2_token")
        if isinstance(o1, dict):
            _non_empty(o1, ("oauth_token", "oauth_token_secret"), "o1")
        if isinstance(o2, dict):
            _non_empty(o2, ("access_token", "refresh_token"), "o2")
            for f in ("expires_in", "expires_at", "refresh_token_expires_in", "refresh_token_expires_at"):
                v = o2.get(f)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not (
                    isinstance(v, int) and 0 <= v <= MAX_UNIX
                ):
                    o2[f] = int(min(max(v, 0), MAX_UNIX))  # also 3.0: JSON's integer may be written so
    elif kind == "garminconnect":
        # garminconnect's Client.dumps() (`garminconnect_dump`) and the three DI fields are
        # alternatives: the dump is dropped when fields came too, and a generated dump (any
        # string) is replaced by a real one; the three-field form needs `di_token`, and names
        # `di_refresh_token` and `di_client_id` (null allowed).
        di = ("di_token", "di_refresh_token", "di_client_id")
        if "garminconnect_dump" in body:
            if any(f in body for f in di):
                del body["garminconnect_dump"]
            else:
                body["garminconnect_dump"] = GC_DUMP
        if "garminconnect_dump" not in body:
            if not isinstance(body.get("di_token"), str):
                body["di_token"] = "st-hook-di"
            body.setdefault("di_refresh_token", None)
            body.setdefault("di_client_id", None)
        _non_empty(body, di, "di")


def _valid_idempotency_key(v):
    return isinstance(v, str) and 1 <= len(v) <= 255 and all(0x21 <= ord(c) <= 0x7E for c in v)


def _stateful(case):
    meta = getattr(case, "meta", None)
    return meta is None or str(meta.phase.name) == "stateful"


@schemathesis.hook
def map_case(context, case):
    # Negative cases are left exactly as generated (changing a header of, say, a "missing
    # Authorization" case would turn it into another case).
    if not (_positive(case) or _stateful(case)):
        return case
    headers = case.headers or {}
    for name in [k for k in headers if k.lower() == "idempotency-key"]:
        # schemathesis sends the same few values ("0") with different requests (the stateful
        # phase too), which the API rightly refuses (422 idempotency_key_reused): a real client
        # uses a fresh key per request.
        if _valid_idempotency_key(headers[name]):
            headers[name] = f"st-{uuid.uuid4()}"
    if not _positive(case):
        return case
    # If-Match, If-None-Match, X-Lease-Fence are nullable in the schema: null is "not sent"
    # (on every operation that takes them: PUT, invalidate and DELETE of tokens, lease release).
    for name in [k for k in headers if headers[k] == "null"]:
        del headers[name]
    op = _op(context)
    if op == PUT_TOKENS:
        headers = case.headers or {}
        names = {k.lower(): k for k in headers}
        if "if-match" in names and "if-none-match" in names:
            del headers[names["if-none-match"]]
        body = case.body
        if isinstance(body, dict):
            _token_body(body)
    elif op == POST_CHALLENGES:
        body = case.body
        if isinstance(body, dict):
            method = body.get("method")
            dest = body.get("destination")
            if isinstance(dest, str) and not _destination_ok(method, dest):
                body["destination"] = {"email": "st@example.com", "sms": "+1 555 123 4567"}.get(method, "st-device")
            if body.get("verifier") == "external":
                body.pop("code", None)
    return case
