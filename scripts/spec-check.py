#!/usr/bin/env python3
"""Checks openapi.json beyond what the validator does (scripts/spec-check runs both).

    spec-check.py openapi.json

- every response has a description;
- every request and response body has an example (media type `example`/`examples`), and each
  example is valid against its schema (JSON Schema 2020-12 as OpenAPI 3.1 uses it, `$ref`s
  resolved in the document); the token PUT body's named examples each match exactly one `oneOf`
  variant;
- every summary is one line of plain text (no markdown: Swagger UI shows summaries verbatim);
- no example holds an expiry in the past (the token examples must store a usable bundle).

Needs openapi-schema-validator (installed with openapi-spec-validator).
"""

import datetime
import json
import re
import sys

from jsonschema.validators import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

METHODS = ("get", "put", "post", "delete", "patch")
NOW = datetime.datetime.now(datetime.timezone.utc)


def main(path):
    doc = json.load(open(path, encoding="utf-8"))
    resource = Resource.from_contents(doc, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:openapi", resource)
    errors = []
    examples = 0

    def validator(schema):
        # local `#/components/...` references point into the document
        schema = json.loads(json.dumps(schema).replace('"#/components/', '"urn:openapi#/components/'))
        return Draft202012Validator(schema, registry=registry)

    def check(where, schema, value):
        nonlocal examples
        examples += 1
        for err in validator(schema).iter_errors(value):
            errors.append(f"{where}: example invalid at {list(err.absolute_path)}: {err.message[:200]}")
        check_future(where, value)

    def check_future(where, value):
        if isinstance(value, dict):
            for k, v in value.items():
                if k in ("expires_at", "refresh_token_expires_at", "access_expires_at", "refresh_expires_at"):
                    when = None
                    if isinstance(v, (int, float)):
                        when = datetime.datetime.fromtimestamp(v, datetime.timezone.utc)
                    elif isinstance(v, str):
                        when = datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
                    if when is not None and when <= NOW:
                        errors.append(f"{where}: `{k}` {v} is in the past")
                check_future(where, v)
        elif isinstance(value, list):
            for v in value:
                check_future(where, v)

    def check_content(where, content):
        for media, c in content.items():
            schema = c.get("schema")
            w = f"{where} {media}"
            if "example" in c:
                if schema is not None:
                    check(w, schema, c["example"])
            elif c.get("examples"):
                for name, ex in c["examples"].items():
                    if schema is not None:
                        check(f"{w} example '{name}'", schema, ex["value"])
                        one_of = resolve(doc, schema).get("oneOf")
                        if one_of:
                            hits = [s for s in one_of if validator(s).is_valid(ex["value"])]
                            if len(hits) != 1:
                                errors.append(f"{w} example '{name}' matches {len(hits)} oneOf variants, not 1")
            else:
                errors.append(f"{w}: no example")

    operations = 0
    for path, item in doc["paths"].items():
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            operations += 1
            where = f"{method.upper()} {path}"
            summary = op.get("summary", "")
            if not summary or "\n" in summary or re.search(r"[`*_\[\]#]", summary) or summary.endswith("."):
                errors.append(f"{where}: summary {summary!r} is not one line of plain text")
            if "requestBody" in op:
                check_content(f"{where} request", op["requestBody"].get("content", {}))
            for status, resp in op["responses"].items():
                if not resp.get("description"):
                    errors.append(f"{where} {status}: no description")
                check_content(f"{where} {status}", resp.get("content", {}))

    for e in errors:
        print(f"spec-check: {e}")
    print(f"spec-check: {operations} operations, {examples} examples checked, {len(errors)} problems")
    return 1 if errors else 0


def resolve(doc, schema):
    while "$ref" in schema:
        node = doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "openapi.json"))
