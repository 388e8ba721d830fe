#!/usr/bin/env python3
"""Scans the logs of a test run for secrets.

    scripts/scan-logs.py <log-dir>
    scripts/scan-logs.py --self-test     (plants leaks and look-alikes in a temp dir)

<log-dir> is the `CENTRALDB_TEST_LOG_DIR` of a test run (`./scripts/test` makes one under
target/). It holds `*.log` files (the in-process trace subscriber's output and the real binary's
output) and `secrets-*.txt` files (one JSON string per line: every token, API key, encryption key,
MFA code and resume state the tests created or sent, registered by tests/api/helpers.rs).

Every log line is searched for every registered secret (and for its JSON-escaped form), plus
generic patterns: a full-length API key (`cdbm_` and more than the 7-character display prefix),
`Bearer ` followed by anything but a placeholder, and JWT-like `eyJ….eyJ…` strings.

False positives avoided:
- secrets shorter than 6 characters are skipped;
- secrets shorter than 10 characters (MFA codes) match whole words only, and not as the
  fraction of a decimal number (`latency_ms=1.123456`) or the integer part of one;
- timestamps are removed from each line before matching.

Prints the number of log lines scanned, secrets checked and occurrences, and each occurrence
(file:line, what matched, masked). Exit 0 when there are none, 1 when there are, 2 on usage errors.
"""

import glob
import json
import os
import re
import sys

sys.setrecursionlimit(20000)

MIN_LEN = 6
WORD_LEN = 10  # secrets shorter than this match as whole words only

TIMESTAMP = re.compile(
    r'"timestamp":"[^"]*",?|\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?'
)

GENERIC = [
    ("api-key-format", re.compile(r"cdbm_[A-Za-z0-9_\-]{8,}")),
    # `Bearer <key>` (the placeholder in a problem's detail) and masked forms are allowed.
    ("bearer-value", re.compile(r"[Bb]earer\s+(?!<key>|\*{3}|\[redacted\]|\[REDACTED\]|…)[^\s\"'\\,;)]+")),
    ("jwt-like", re.compile(r"eyJ[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{4,}")),
]


def mask(s):
    s = str(s)
    if len(s) <= 8:
        return s[:2] + "…" + f"({len(s)} chars)"
    return s[:4] + "…" + s[-2:] + f" ({len(s)} chars)"


def trie_regex(words):
    """One regex matching any of `words`, built as a trie so that Python's re does not try every
    alternative at every position."""

    def build(group):
        # `group`: suffixes sharing the prefix already emitted; "" marks a word ending here.
        end = "" in group
        rest = sorted(w for w in group if w)
        if not rest:
            return ""
        if len(rest) == 1:
            body = re.escape(rest[0])
        else:
            by_first = {}
            for w in rest:
                by_first.setdefault(w[0], []).append(w[1:])
            branches = [re.escape(ch) + build(set(ws)) for ch, ws in sorted(by_first.items())]
            body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return "(?:" + body + ")?" if end else body

    return build(set(words))


def forms(secret):
    """The secret and the ways a log line could spell it."""
    out = {secret}
    escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
    out.add(escaped)
    out.add(json.dumps(secret)[1:-1])  # \\u-escaped non-ASCII
    out.add(json.dumps(escaped)[1:-1])  # JSON in a JSON string (a logged body)
    return out


def self_test():
    """The scanner must find planted leaks and must not flag look-alikes."""
    import contextlib
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "secrets-1.txt"), "w") as f:
            for s in ["123456", "o1tok-t-SECRET", 'quote"d-SECRET', "abc"]:
                f.write(json.dumps(s) + "\n")
        clean = [
            'INFO request finished latency_ms=1.123456 status=200 elapsed=123456.7µs seq=1234567',
            '{"timestamp":"2026-01-01T00:00:00.123456Z","level":"INFO","fields":{"message":"ok"}}',
            'WARN detail="an API key is required: Authorization: Bearer <key>" prefix=cdbm_AbCdEfG abc',
        ]
        leaks = [
            'DEBUG body code=123456',
            '{"fields":{"token":"o1tok-t-SECRET"}}',
            '{"fields":{"v":"quote\\"d-SECRET"}}',
            'TRACE authorization: Bearer sk-something',
            'TRACE key=cdbm_0123456789abcdefghij',
            'DEBUG t=eyJhbGciOi.eyJleHAiOj.sig',
        ]
        with open(os.path.join(d, "a.log"), "w") as f:
            f.write("\n".join(clean + leaks) + "\n")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["scan-logs", d])
        found = {int(line.split(":")[1]) for line in out.getvalue().splitlines() if line.startswith("LEAK ")}
        expected = set(range(len(clean) + 1, len(clean) + len(leaks) + 1))
        if rc != 1 or found != expected:
            print(out.getvalue())
            print(f"scan-logs self-test FAILED: flagged lines {sorted(found)}, expected {sorted(expected)}")
            return 1
    print(f"scan-logs self-test ok: {len(leaks)} planted leaks found, {len(clean)} look-alikes not flagged")
    return 0


def main(argv):
    if len(argv) == 2 and argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if len(argv) == 2 and argv[1] == "--self-test":
        return self_test()
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    root = argv[1]
    if not os.path.isdir(root):
        print(f"scan-logs: {root} is not a directory", file=sys.stderr)
        return 2

    secrets = set()
    skipped_short = set()
    for path in sorted(glob.glob(os.path.join(root, "**", "secrets-*.txt"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                s = json.loads(line)
                (secrets if len(s) >= MIN_LEN else skipped_short).add(s)

    word_secrets = {s for s in secrets if len(s) < WORD_LEN}
    long_secrets = secrets - word_secrets
    patterns = []  # (compiled regex, original secret per matched form)
    form_of = {}
    for s in long_secrets:
        for f in forms(s):
            form_of.setdefault(f, s)
    if form_of:
        patterns.append(re.compile(trie_regex(form_of)))
    word_form_of = {}
    for s in word_secrets:
        for f in forms(s):
            word_form_of.setdefault(f, s)
    if word_form_of:
        # not inside a word, not a decimal's fraction (`.123456`) or integer part (`123456.7`)
        patterns.append(
            re.compile(r"(?<![0-9A-Za-z_.])(?:" + trie_regex(word_form_of) + r")(?![0-9A-Za-z_]|\.[0-9])")
        )
        form_of.update(word_form_of)

    logs = sorted(glob.glob(os.path.join(root, "**", "*.log"), recursive=True))
    lines = 0
    nbytes = 0
    hits = []
    for path in logs:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                lines += 1
                nbytes += len(line)
                text = TIMESTAMP.sub("", line)
                found = []
                for p in patterns:
                    found += [(m.span(), "secret", form_of.get(m.group(0), m.group(0))) for m in p.finditer(text)]
                for name, p in GENERIC:
                    found += [(m.span(), name, m.group(0)) for m in p.finditer(text)]
                if not found:
                    continue
                # the line as shown: every match masked
                shown, last = [], 0
                for (a, b), _, what in sorted(found):
                    if a >= last:
                        shown += [text[last:a], "<" + mask(text[a:b]) + ">"]
                        last = b
                shown = ("".join(shown) + text[last:]).strip()
                for _, kind, what in found:
                    hits.append((path, n, kind, what, shown))

    for path, n, kind, what, shown in hits[:200]:
        print(f"LEAK {os.path.relpath(path, root)}:{n}: {kind} {mask(what)}: {shown[:400]}")
    if len(hits) > 200:
        print(f"... and {len(hits) - 200} more")
    print(
        f"scan-logs: {lines} log lines ({nbytes / 1e6:.1f} MB in {len(logs)} files) scanned, "
        f"{len(secrets)} secrets checked ({len(skipped_short)} shorter than {MIN_LEN} skipped) "
        f"+ {len(GENERIC)} generic patterns: {len(hits)} occurrences"
    )
    if not logs:
        print("scan-logs: no log files found", file=sys.stderr)
        return 1
    if not secrets:
        print("scan-logs: no secrets registered", file=sys.stderr)
        return 1
    return 1 if hits else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
