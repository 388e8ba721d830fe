"""The external-verifier MFA login across processes: one process stores the half-finished login,
other processes (web handlers) submit codes; a duplicate code never reaches Garmin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from centraldb_mfa import ChallengeLocked, ExternalMFA, pack_state, unpack_state

HERE = Path(__file__).parent


def handler(server, user, login, code: str, log: Path) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / "mfa_handler.py"), server["url"], server["api_key"], user,
         login.session_id, login.challenge_id, code, str(log)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def garmin_calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_login_started_here_is_finished_by_other_processes(db, server, user, tmp_path):
    log = tmp_path / "garmin.log"
    state = {"signin": {"csrf": "abc123", "ticket_url": "https://sso.garmin.com/..."}, "cookies": {"a": "b" * 2000}}
    assert unpack_state(pack_state(state)) == state
    login = ExternalMFA(db).start(user, state, destination="bob@example.com", max_attempts=3)
    assert db.get_session(login.session_id)["state"] == "mfa_required"
    assert db.auth_status(user)["status"] == "MFA_PENDING"

    assert handler(server, user, login, "111111", log) == {"status": "wrong_code", "attempts_remaining": 2}
    # The same code again (a double click, a replay) never reaches Garmin and uses no attempt.
    assert handler(server, user, login, "111111", log)["status"] == "duplicate_code"
    assert [c["code"] for c in garmin_calls(log)] == ["111111"]
    assert db.get_challenge(login.challenge_id)["attempts"] == 1

    done = handler(server, user, login, "654321", log)
    assert done["status"] == "verified" and done["version"] == 1
    assert [c["code"] for c in garmin_calls(log)] == ["111111", "654321"]
    assert all(c["csrf"] == "abc123" for c in garmin_calls(log)), "the stored state came back"
    assert db.get_challenge(login.challenge_id)["status"] == "consumed"
    assert db.get_session(login.session_id)["state"] == "authenticated"
    assert db.get_tokens(user)["di_token"] == "di-abc123"
    assert db.auth_status(user)["status"] == "VALID"
    # A late resend of the right code is refused by the service (the login is consumed).
    assert handler(server, user, login, "654321", log) == {"error": "ChallengeNotPending", "status": 409}
    assert len(garmin_calls(log)) == 2


def test_the_last_wrong_code_fails_the_login(db, user):
    mfa = ExternalMFA(db)
    login = mfa.start(user, {"x": 1}, max_attempts=1)
    calls = []

    def finish(state, code):
        calls.append(code)
        raise RuntimeError("refused")

    result = mfa.submit_code(login.challenge_id, "222222", finish)
    assert (result.status, result.attempts_remaining, result.ok) == ("wrong_code", 0, False)
    assert db.get_challenge(login.challenge_id)["status"] == "failed"
    assert db.get_session(login.session_id)["state"] == "failed"
    with pytest.raises(ChallengeLocked):
        mfa.submit_code(login.challenge_id, "333333", finish)
    assert calls == ["222222"]


def test_abandon_cancels_challenge_and_session(db, user):
    mfa = ExternalMFA(db)
    login = mfa.start(user, "opaque", packed=True)
    mfa.abandon(login)
    assert db.get_challenge(login.challenge_id)["status"] == "cancelled"
    assert db.get_session(login.session_id)["state"] == "cancelled"
