"""The second half of an external-verifier login, in a process of its own (as a web request
handler of another GarminSync worker would be): submit CODE for CHALLENGE_ID; "Garmin" (stubbed:
accepts 654321, logs every call it gets to LOG) finishes the stored login; on success the tokens
are stored, the challenge consumed and the session authenticated. Prints the outcome as JSON.

    python mfa_handler.py URL API_KEY USER_ID SESSION_ID CHALLENGE_ID CODE LOG
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from centraldb_mfa import CentralDB, ExternalMFA, ProblemError


class GarminRefused(Exception):
    pass


def main() -> int:
    url, key, user_id, session_id, challenge_id, code, log = sys.argv[1:8]

    def finish(state: Any, code: str) -> dict[str, Any]:
        with Path(log).open("a") as f:
            f.write(json.dumps({"code": code, "csrf": state["signin"]["csrf"]}) + "\n")
        if code != "654321":
            raise GarminRefused("Garmin: wrong code")
        return {"kind": "garminconnect", "di_token": f"di-{state['signin']['csrf']}", "di_refresh_token": "r",
                "di_client_id": "c"}

    with CentralDB(url, key) as db:
        mfa = ExternalMFA(db)
        try:
            result = mfa.submit_code(challenge_id, code, finish, refused=(GarminRefused,))
        except ProblemError as err:  # this login cannot go on: the page asks to start over
            print(json.dumps({"error": type(err).__name__, "status": err.status}))
            return 0
        out: dict[str, Any] = {"status": result.status, "attempts_remaining": result.attempts_remaining}
        if result.ok:
            assert result.value is not None
            out["version"] = mfa.complete((user_id, session_id, challenge_id), result.value)["version"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
