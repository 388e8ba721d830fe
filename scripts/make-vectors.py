#!/usr/bin/env python3
"""Known-answer vectors for centraldb-mfa, computed independently of the Rust code.

Writes tests/fixtures/envelope-vectors.json and tests/fixtures/audit-chain-vectors.json from the
formats as documented (src/crypto/keyring.rs, src/services/audit.rs), using only Python's
hmac/hashlib and `cryptography`'s AESGCM (pip install cryptography). Everything is
deterministic (fixed keys, nonces and events): running it again must reproduce the committed
files byte for byte (`scripts/make-vectors.py --check`).

Envelope: [0x01][key id length: u8][key id][96-bit nonce][AES-256-GCM ciphertext || 128-bit tag];
the GCM associated data is the header (0x01, length, key id) followed by the context parts,
each as a big-endian u32 byte length and the UTF-8 bytes (`Aad::new(parts)`).

Audit chain: the chain key is HMAC-SHA256(raw keyring key, "centraldb-mfa/" + "audit-chain/v1")
(`Keyring::derive`); each event's seal is HMAC-SHA256(chain key, previous seal || canonical),
the previous seal of the first event being 32 zero bytes. canonical is the concatenation of the
fields tag "centraldb-mfa/audit-event/v1", seq (i64 big-endian, 8 bytes), id (16 UUID bytes),
at (RFC 3339, microseconds, "Z"), type, outcome, user_id, actor, request_id, source_ip, details,
chain key id; a field is 0x00 when NULL, else 0x01, its byte length as a big-endian u32, and
its bytes.
"""

import base64
import hashlib
import hmac
import json
import struct
import sys
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def fixed_key(label: str) -> bytes:
    return hashlib.sha256(b"centraldb-mfa test vector key: " + label.encode()).digest()


def fixed_nonce(label: str) -> bytes:
    return hashlib.sha256(b"centraldb-mfa test vector nonce: " + label.encode()).digest()[:12]


def aad_parts(parts):
    out = b""
    for p in parts:
        b = p.encode("utf-8")
        out += struct.pack(">I", len(b)) + b
    return out


def envelope(key: bytes, key_id: str, nonce: bytes, plaintext: bytes, parts) -> bytes:
    kid = key_id.encode("ascii")
    header = bytes([1, len(kid)]) + kid
    ct = AESGCM(key).encrypt(nonce, plaintext, header + aad_parts(parts))
    return header + nonce + ct


def envelope_vectors():
    cases = [
        ("k1", "token bundle, garth", ["token_bundle", "alice", "garth"],
         json.dumps({"oauth1_token": {"oauth_token": "o1", "oauth_token_secret": "s1"},
                     "oauth2_token": {"access_token": "a", "refresh_token": "r"}}, separators=(",", ":")).encode()),
        ("k1", "empty plaintext", ["token_bundle", "bob", "garminconnect"], b""),
        ("key-2026_b", "no parts", [], b"\x00\x01\x02 binary \xff"),
        ("k1", "empty and unicode parts", ["", "\u00e9l\u00e8ve@example.com", "\u6771\u4eac"], b"x" * 100),
        ("k", "parts that would collide without lengths", ["ab", "c"], b"same plaintext"),
        ("k", "parts that would collide without lengths (2)", ["a", "bc"], b"same plaintext"),
    ]
    out = []
    for i, (kid, name, parts, pt) in enumerate(cases):
        key = fixed_key(f"envelope-{kid}")
        nonce = fixed_nonce(f"envelope-{i}")
        env = envelope(key, kid, nonce, pt, parts)
        out.append({
            "name": name,
            "key_spec": f"{kid}:{base64.b64encode(key).decode()}",
            "aad_parts": parts,
            "plaintext_hex": pt.hex(),
            "envelope_hex": env.hex(),
        })
    return {"about": "AES-256-GCM envelopes made by scripts/make-vectors.py", "vectors": out}


def field(v):
    if v is None:
        return b"\x00"
    return b"\x01" + struct.pack(">I", len(v)) + v


def canonical(e, chain_key_id: str) -> bytes:
    s = lambda x: None if x is None else x.encode("utf-8")  # noqa: E731
    return b"".join([
        field(b"centraldb-mfa/audit-event/v1"),
        field(struct.pack(">q", e["seq"])),
        field(uuid.UUID(e["id"]).bytes),
        field(e["at"].encode()),
        field(s(e["type"])),
        field(s(e["outcome"])),
        field(s(e["user_id"])),
        field(s(e["actor"])),
        field(s(e["request_id"])),
        field(s(e["source_ip"])),
        field(s(e["details"])),
        field(chain_key_id.encode()),
    ])


def audit_vectors():
    key_id = "k1"
    raw = fixed_key("audit-chain")
    chain_key = hmac.new(raw, b"centraldb-mfa/" + b"audit-chain/v1", hashlib.sha256).digest()
    events = [
        {"seq": 1, "id": "01937a4e-6f00-7000-8000-000000000001", "at": "2026-09-21T14:13:20.123456Z",
         "type": "token.write", "outcome": "success", "user_id": "alice", "actor": "key:01937a4e-0000-7000-8000-0000000000aa",
         "request_id": "req-1", "source_ip": "10.1.2.3",
         "details": json.dumps({"kind": "garth", "version": 1, "created": True}, separators=(",", ":"))},
        {"seq": 2, "id": "01937a4e-6f00-7000-8000-000000000002", "at": "2026-09-21T14:13:21.000000Z",
         "type": "auth.denied", "outcome": "denied", "user_id": None, "actor": None,
         "request_id": "req-2", "source_ip": "2001:db8::42",
         "details": json.dumps({"reason": "missing_key", "method": "GET", "path": "/api/v1/users/alice/tokens"},
                               separators=(",", ":"))},
        {"seq": 3, "id": "01937a4e-6f00-7000-8000-000000000003", "at": "2026-09-21T14:13:22.000001Z",
         "type": "token.read", "outcome": "success", "user_id": "", "actor": "", "request_id": None,
         "source_ip": None, "details": "{}"},
        {"seq": 4, "id": "01937a4e-6f00-7000-8000-000000000004", "at": "2026-12-31T23:59:59.999999Z",
         "type": "session.transition", "outcome": "success", "user_id": "b\u00f6b", "actor": "sweeper",
         "request_id": None, "source_ip": None,
         "details": json.dumps({"from": "started", "to": "expired"}, separators=(",", ":"))},
    ]
    prev = bytes(32)
    for e in events:
        seal = hmac.new(chain_key, prev + canonical(e, key_id), hashlib.sha256).digest()
        e["hmac_hex"] = seal.hex()
        prev = seal
    return {
        "about": "audit chain seals made by scripts/make-vectors.py",
        "key_spec": f"{key_id}:{base64.b64encode(raw).decode()}",
        "chain_key_id": key_id,
        "label": "audit-chain/v1",
        "chain_key_hex": chain_key.hex(),
        "events": events,
    }


def main():
    check = "--check" in sys.argv[1:]
    files = {
        FIXTURES / "envelope-vectors.json": envelope_vectors(),
        FIXTURES / "audit-chain-vectors.json": audit_vectors(),
    }
    stale = []
    for path, doc in files.items():
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("stale: " + ", ".join(stale) + " (run scripts/make-vectors.py)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
