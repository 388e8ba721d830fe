"""schemathesis hooks for scripts/schemathesis.sh (loaded through SCHEMATHESIS_HOOKS).

The positive-data check (ST202 "schema-valid data must be accepted") stays on for every
operation. A few rules between fields cannot be written in OpenAPI 3.1; for the operations that
have them, the *positive* cases schemathesis generates are narrowed here to requests those rules
allow, changing as little of the generated case as possible (negative cases are left alone):

PUT /api/v1/users/{user_id}/tokens
  - a conditional header generated as `null` (the schema types them as nullable strings) is not
    sent: an absent header is what null means;
  - `If-Match` and `If-None-Match` are each valid, but not together (422): If-None-Match is
    dropped when both were generated;
  - `garth_dump` must decode to garth's two token objects (base64 of a JSON array): a generated
    string is replaced by a real dump (of generated objects when the case has them);
  - `garth_dump` and the two objects are alternatives: the dump is dropped when both came.
POST /api/v1/mfa/challenges
  - `destination` must suit `method` (an e-mail address for `email`; an e-mail address or a
    phone number of 4-20 digits for `sms`): a generated destination that does not is replaced;
  - `code` is only for `verifier: service`: dropped for `external`.
"""

import base64
import json
import re

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


@schemathesis.hook
def map_case(context, case):
    if not _positive(case):
        return case
    op = _op(context)
    if op == PUT_TOKENS:
        headers = case.headers or {}
        for name in [k for k in headers if k.lower() in ("if-match", "if-none-match") and headers[k] == "null"]:
            # the headers are `Option<String>` (nullable) in the schema: null means "not sent"
            del headers[name]
        names = {k.lower(): k for k in headers}
        if "if-match" in names and "if-none-match" in names:
            del headers[names["if-none-match"]]
        body = case.body
        if isinstance(body, dict) and "garth_dump" in body:
            if "oauth1_token" in body or "oauth2_token" in body:
                del body["garth_dump"]
            else:
                body["garth_dump"] = base64.b64encode(json.dumps([OAUTH1, OAUTH2]).encode()).decode()
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
