"""The v1 contract through CentralDB / AsyncCentralDB against the real binary: results, typed
problem errors with their extra members, Idempotency-Key on writes and their retries, and the
bounded retries on 503 / 429 honouring Retry-After."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from centraldb_mfa import (
    AsyncCentralDB,
    CentralDB,
    ChallengeNotPending,
    InvalidCode,
    InvalidTransition,
    LeaseHeld,
    LeaseLost,
    ReauthRequired,
    RetryPolicy,
    TokensNotFound,
    TooManyRequests,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
    VersionConflict,
)

GC = {"kind": "garminconnect", "di_token": "di-1", "di_refresh_token": "dir-1", "di_client_id": "cid"}


def test_generated_async_client_is_up_to_date():
    tool = Path(__file__).resolve().parents[1] / "tools" / "unasync.py"
    assert subprocess.run([sys.executable, str(tool), "--check"]).returncode == 0


def test_token_bundle_round_trip_and_compare_and_set(db, user):
    with pytest.raises(TokensNotFound) as info:
        db.get_tokens(user)
    assert info.value.status == 404 and info.value.code == "tokens_not_found"
    meta = db.put_tokens(user, GC, if_none_match=True)
    assert meta["version"] == 1 and "di_token" not in meta
    got = db.get_tokens(user)
    assert (got["di_token"], got["version"], got["kind"]) == ("di-1", 1, "garminconnect")
    assert db.get_token_metadata(user)["version"] == 1
    with pytest.raises(VersionConflict):
        db.put_tokens(user, GC, if_none_match=True)
    assert db.put_tokens(user, {**GC, "di_token": "di-2"}, if_match=1)["version"] == 2
    with pytest.raises(VersionConflict) as info:
        db.put_tokens(user, GC, if_match=1)
    assert info.value.current_version == 2 and info.value.extra["current_version"] == 2
    assert db.get_tokens(user)["di_token"] == "di-2"
    assert db.auth_status(user)["status"] == "VALID"
    db.invalidate_tokens(user, "password_changed", if_match=2)
    with pytest.raises(ReauthRequired) as info:
        db.get_tokens(user)
    assert info.value.reason == "password_changed"
    db.delete_tokens(user)
    assert db.auth_status(user)["status"] == "MISSING"


def test_validation_and_auth_errors_are_typed(db, server, user):
    with pytest.raises(ValidationFailed) as info:
        db.put_tokens("bad user!", GC)
    assert info.value.status == 422 and info.value.field == "user_id"
    with pytest.raises(ValidationFailed):
        db.put_tokens(user, {"kind": "garminconnect"})
    with CentralDB(server["url"], "cdbm_not-a-key") as bad:
        with pytest.raises(Unauthenticated) as info:
            bad.get_tokens(user)
    assert info.value.status == 401


def test_leases_and_long_poll(db, user):
    db.put_tokens(user, GC)
    lease = db.acquire_lease(user, "w1", ttl_seconds=30)
    assert lease["fence"] == 1 and lease["version"] == 1
    with pytest.raises(LeaseHeld) as info:
        db.acquire_lease(user, "w2")
    assert info.value.holder == "w1" and info.value.retry_after is not None
    t0 = time.monotonic()
    assert db.wait_for_tokens(user, 1, wait_seconds=1) is None  # 304
    assert time.monotonic() - t0 >= 0.9
    assert db.put_tokens(user, GC, fence=1, if_match=1)["version"] == 2  # releases the lease
    with pytest.raises(LeaseLost):
        db.put_tokens(user, GC, fence=1)
    got = db.wait_for_tokens(user, 1, wait_seconds=5)
    assert got is not None and got["version"] == 2
    lease = db.acquire_lease(user, "w2", ttl_seconds=5)
    db.release_lease(user, lease["fence"])
    with pytest.raises(LeaseLost):
        db.release_lease(user, lease["fence"])


def test_sessions_challenges_and_audit(db, user):
    session = db.create_session(user, client={"ip": "192.0.2.1", "user_agent": "pytest"})
    assert session["state"] == "started"
    assert [s["id"] for s in db.list_sessions(user)] == [session["id"]]
    with pytest.raises(InvalidTransition):
        db.transition_session(session["id"], "mfa_verified")
    ch = db.create_challenge(user, method="email", verifier="service", session_id=session["id"], max_attempts=3)
    code = ch["code"]
    with pytest.raises(InvalidCode) as info:
        db.verify_challenge(ch["id"], "000000" if code != "000000" else "111111")
    assert info.value.attempts_remaining == 2
    assert db.verify_challenge(ch["id"], code)["status"] == "verified"
    assert db.get_session(session["id"])["state"] == "mfa_verified"
    assert db.consume_challenge(ch["id"])["status"] == "consumed"
    with pytest.raises(ChallengeNotPending) as info:
        db.consume_challenge(ch["id"])
    assert info.value.challenge_status == "consumed" and info.value.status == 409
    assert db.transition_session(session["id"], "authenticated")["state"] == "authenticated"
    other = db.create_session(user)
    db.cancel_session(other["id"])
    assert db.get_session(other["id"])["state"] == "cancelled"
    events = list(db.iter_audit_events(user_id=user, limit=2))
    assert len(events) >= 5 and len({e["seq"] for e in events}) == len(events)
    assert all(e["user_id"] == user for e in events)
    assert db.verify_audit()["ok"] is True
    checkpoint = db.audit_checkpoint()
    assert checkpoint["partitions"] == len([h for h in checkpoint["heads"] if h["chain"] >= 0]) == 256
    assert any(h["seq"] >= events[0]["seq"] for h in checkpoint["heads"])
    keys = db.audit_public_keys()["keys"]
    assert keys[0]["key_id"] == checkpoint["key_id"] and keys[0]["algorithm"] == "Ed25519"
    assert db.healthz() is not None and "centraldb" in db.metrics()


class LoseFirstAnswer(httpx.BaseTransport):
    """Sends every request; the first write's answer is lost on the way back (a reset)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.keys: list[str | None] = []
        self.lost = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method != "GET":
            self.keys.append(request.headers.get("Idempotency-Key"))
            if not self.lost:
                self.lost = True
                response.read()
                raise httpx.ReadError("connection reset", request=request)
        return response


def test_a_write_whose_answer_was_lost_is_retried_with_the_same_key_and_acts_once(server, user):
    transport = LoseFirstAnswer()
    with CentralDB(server["url"], server["api_key"], http=httpx.Client(transport=transport)) as db:
        meta = db.put_tokens(user, GC)
        assert meta["version"] == 1, "the retry acted a second time"
        assert len(transport.keys) == 2 and transport.keys[0] == transport.keys[1] and transport.keys[0]
        db.put_tokens(user, GC)
        assert transport.keys[2] != transport.keys[0], "each write gets its own key"
        assert db.get_tokens(user)["version"] == 2


def test_the_same_key_twice_is_answered_once(db, user):
    a = db.put_tokens(user, GC, idempotency_key="k-1")
    b = db.put_tokens(user, GC, idempotency_key="k-1")
    assert a == b and db.get_token_metadata(user)["version"] == 1


def scripted(answers: list[tuple[int, dict[str, str]]]) -> tuple[httpx.Client, list[float], list[str | None]]:
    times: list[float] = []
    keys: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        times.append(time.monotonic())
        keys.append(request.headers.get("Idempotency-Key"))
        status, headers = answers[min(len(times) - 1, len(answers) - 1)]
        if status >= 400:
            code = {503: "unavailable", 429: "too_many_requests"}[status]
            return httpx.Response(
                status, headers={**headers, "Content-Type": "application/problem+json"},
                json={"type": "about:blank", "title": "x", "status": status, "detail": "busy", "code": code},
            )
        return httpx.Response(status, json={"version": 7}, headers={"ETag": '"7"'})

    return httpx.Client(transport=httpx.MockTransport(handler)), times, keys


def test_503_and_429_are_retried_honouring_retry_after_and_bounded():
    http, times, keys = scripted([(503, {"Retry-After": "1"}), (429, {"Retry-After": "1"}), (200, {})])
    db = CentralDB("http://cdb.invalid", "k", http=http)
    assert db.put_tokens("u", GC)["version"] == 7
    assert len(times) == 3 and times[1] - times[0] >= 1.0 and times[2] - times[1] >= 1.0
    assert len(set(keys)) == 1 and keys[0], "retries reuse the write's Idempotency-Key"
    # A Retry-After beyond the bound is not waited for.
    http, times, _ = scripted([(503, {"Retry-After": "600"})])
    with pytest.raises(Unavailable) as info:
        CentralDB("http://cdb.invalid", "k", http=http).get_tokens("u")
    assert len(times) == 1 and info.value.retry_after == 600
    # The number of attempts is bounded.
    http, times, _ = scripted([(429, {})])
    with pytest.raises(TooManyRequests):
        CentralDB("http://cdb.invalid", "k", http=http, retry=RetryPolicy(attempts=3, base_delay=0.01)).get_tokens("u")
    assert len(times) == 3


def test_async_client(server, user):
    async def main() -> dict[str, Any]:
        async with AsyncCentralDB(server["url"], server["api_key"]) as db:
            await db.put_tokens(user, {**GC, "di_token": "eyJhbGciOiJub25lIn0.eyJleHAiOjEwMDB9.sig"})
            with pytest.raises(VersionConflict):
                await db.put_tokens(user, GC, if_match=5)
            calls: list[int] = []

            async def refresh(bundle: dict[str, Any]) -> dict[str, Any]:
                calls.append(bundle["version"])
                await asyncio.sleep(0.2)
                return {**GC, "di_token": "di-async"}

            results = await asyncio.gather(*[db.ensure_fresh(user, refresh) for _ in range(8)])
            assert calls == [1], "exactly one refresh"
            assert {r["version"] for r in results} == {2}
            assert {r["di_token"] for r in results} == {"di-async"}
            events = [e async for e in db.iter_audit_events(user_id=user)]
            assert events
            session = await db.create_session(user)
            assert [s["id"] for s in await db.list_sessions(user)] == [session["id"]]
            assert "centraldb" in await db.metrics()
            return await db.get_tokens(user)

    assert asyncio.run(main())["di_token"] == "di-async"
