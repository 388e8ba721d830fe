"""Garmin's token endpoints stubbed at the HTTP layer of each library (no network):

- garth 0.8: a requests transport adapter mounted on ``Client.sess`` for ``https://`` answers
  the OAuth1 → OAuth2 exchange (``connectapi.garmin.com/oauth-service/oauth/exchange/user/2.0``);
  garth's cached OAuth consumer (normally fetched from S3 once per process) is preset.
- garth-ng 1.1: the ``Client(session=...)`` HTTP session answers the DI token grant
  (``diauth.garmin.com/di-oauth2-service/oauth/token``).
- garminconnect 0.3: the client's ``_http_post`` (its one POST to ``diauth.garmin.com``) answers
  the DI refresh grant.

Every call is appended to a log file (one JSON line, O_APPEND, so several processes can share
it): ``{"event": "start"|"issued", "pid", "access_token", "refresh_token"}``. ``delay`` holds the
answer back (to make calls overlap, or to be frozen/killed mid-refresh).
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

LIB_REPRESENTATION = {"garth": "garth_dump", "garth-ng": "garth_dump", "garminconnect": "garminconnect_dump"}


def jwt(exp: int, tag: str, **claims: Any) -> str:
    def b64(v: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(v).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'RS256'})}.{b64({'exp': exp, 'sub': tag, **claims})}.sig-{tag}"


class FakeGarmin:
    def __init__(self, log: Path, delay: float = 0.0, fail: bool = False, expires_in: int = 86400) -> None:
        self.log = Path(log)
        self.delay = delay
        self.fail = fail
        self.expires_in = expires_in

    def _append(self, entry: dict[str, Any]) -> None:
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(entry) + "\n").encode())
        finally:
            os.close(fd)

    def calls(self, event: str = "issued") -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [e for e in map(json.loads, self.log.read_text().splitlines()) if e["event"] == event]

    def token_answer(self, grant: dict[str, list[str]], jwt_tokens: bool = False) -> tuple[int, dict[str, Any]]:
        """One call to Garmin's token endpoint: (status, JSON body)."""
        self._append({"event": "start", "pid": os.getpid(), "grant": {k: v[0] for k, v in grant.items()}})
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            self._append({"event": "refused", "pid": os.getpid()})
            return 400, {"error": "invalid_grant"}
        tag = uuid.uuid4().hex[:10]
        now = int(time.time())
        access = jwt(now + self.expires_in, f"acc-{tag}") if jwt_tokens else f"acc-{tag}"
        refresh = jwt(now + 86400 * 30, f"ref-{tag}") if jwt_tokens else f"ref-{tag}"
        body = {
            "scope": "CONNECT_READ CONNECT_WRITE",
            "jti": f"jti-{tag}",
            "token_type": "Bearer",
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": self.expires_in,
            "refresh_token_expires_in": 86400 * 30,
        }
        self._append({"event": "issued", "pid": os.getpid(), "access_token": access, "refresh_token": refresh})
        return 200, body


# ---- garth 0.8 (requests) --------------------------------------------------------------------


def garth08_factory(fake: FakeGarmin):
    import garth
    import garth.sso
    import requests
    from requests.adapters import BaseAdapter

    garth.sso.OAUTH_CONSUMER = {"consumer_key": "stub-key", "consumer_secret": "stub-secret"}

    class GarminAdapter(BaseAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:
            resp = requests.Response()
            resp.request = request
            resp.url = request.url
            if request.url.startswith("https://connectapi.garmin.com/oauth-service/oauth/exchange/user/2.0"):
                auth = request.headers.get("Authorization") or b""
                assert b"oauth_signature" in (auth if isinstance(auth, bytes) else auth.encode()), "not OAuth1-signed"
                body = request.body or ""
                grant = parse_qs(body.decode() if isinstance(body, bytes) else body)
                status, payload = fake.token_answer(grant)
            else:
                status, payload = 404, {"error": f"no stub for {request.url}"}
            resp.status_code = status
            resp._content = json.dumps(payload).encode()
            resp.headers["Content-Type"] = "application/json"
            resp.encoding = "utf-8"
            return resp

        def close(self) -> None:
            pass

    class GarminSession(requests.Session):
        # garth's configure() (run by loads()) mounts a fresh HTTPAdapter: keep the stub instead.
        def mount(self, prefix: str, adapter: Any) -> None:
            super().mount(prefix, GarminAdapter() if prefix == "https://" else adapter)

    def factory() -> Any:
        return garth.Client(session=GarminSession())

    return factory


# ---- garth-ng 1.1 (curl_cffi session) --------------------------------------------------------


class _Resp:
    def __init__(self, status: int, payload: dict[str, Any]) -> None:
        self.status_code = status
        self.ok = status < 400
        self._payload = payload
        self.text = json.dumps(payload)

    def json(self) -> Any:
        return self._payload

    def raise_for_status(self) -> None:
        if not self.ok:
            from curl_cffi.requests.exceptions import HTTPError

            raise HTTPError(f"HTTP Error {self.status_code}")


def garth_ng_factory(fake: FakeGarmin):
    import garth

    class GarminSession:
        def __init__(self) -> None:
            self.headers: dict[str, str] = {}
            self.proxies: dict[str, str] = {}
            self.verify = True

        def post(self, url: str, data: dict[str, str] | None = None, **kwargs: Any) -> _Resp:
            if url != "https://diauth.garmin.com/di-oauth2-service/oauth/token":
                return _Resp(404, {"error": f"no stub for {url}"})
            assert kwargs["headers"]["Authorization"].startswith("Basic ")
            grant = {k: [v] for k, v in (data or {}).items()}
            assert grant["grant_type"] == ["refresh_token"]
            return _Resp(*fake.token_answer(grant))

    def factory() -> Any:
        return garth.Client(session=GarminSession())

    return factory


# ---- garminconnect 0.3 -------------------------------------------------------------------------


def garminconnect_factory(fake: FakeGarmin):
    from garminconnect.client import Client

    def factory() -> Any:
        client = Client()

        def http_post(url: str, **kwargs: Any) -> _Resp:
            if url != "https://diauth.garmin.com/di-oauth2-service/oauth/token":
                return _Resp(404, {"error": f"no stub for {url}"})
            grant = {k: [v] for k, v in kwargs["data"].items()}
            assert grant["grant_type"] == ["refresh_token"]
            return _Resp(*fake.token_answer(grant, jwt_tokens=True))

        client._http_post = http_post  # type: ignore[method-assign]
        return client

    return factory


FACTORIES = {"garth": garth08_factory, "garth-ng": garth_ng_factory, "garminconnect": garminconnect_factory}


def adapter(lib: str) -> Any:
    if lib == "garminconnect":
        from centraldb_mfa.adapters import garminconnect as mod
    else:
        from centraldb_mfa.adapters import garth as mod
    return mod


def seed_body(lib: str, expires_in: int, tag: str = "seed") -> dict[str, Any]:
    """A PUT body in the library's own dump form whose access token expires in ``expires_in``."""
    now = int(time.time())
    if lib == "garth":
        import garth
        from garth.auth_tokens import OAuth1Token, OAuth2Token

        client = garth.Client()
        client.oauth1_token = OAuth1Token(oauth_token=f"o1-{tag}", oauth_token_secret=f"o1s-{tag}", domain="garmin.com")
        client.oauth2_token = OAuth2Token(
            scope="CONNECT_READ", jti=f"jti-{tag}", token_type="Bearer", access_token=f"acc-{tag}",
            refresh_token=f"ref-{tag}", expires_in=expires_in, expires_at=now + expires_in,
            refresh_token_expires_in=2592000, refresh_token_expires_at=now + 2592000,
        )
        return {"kind": "garth", "garth_dump": client.dumps()}
    if lib == "garth-ng":
        import garth
        from garth.auth_tokens import OAuth2Token

        client = garth.Client()
        client.oauth2_token = OAuth2Token(
            access_token=f"acc-{tag}", refresh_token=f"ref-{tag}", expires_in=expires_in,
            refresh_token_expires_in=2592000, client_id="GARMIN_CONNECT_MOBILE_ANDROID_DI_2025Q2",
        )
        return {"kind": "garth", "garth_dump": client.dumps()}
    from garminconnect.client import Client

    c = Client()
    c.di_token = jwt(now + expires_in, f"acc-{tag}")
    c.di_refresh_token = jwt(now + 86400 * 30, f"ref-{tag}")
    c.di_client_id = "GARMIN_CONNECT_MOBILE_ANDROID_DI"
    return {"kind": "garminconnect", "garminconnect_dump": c.dumps()}


def access_token(lib: str, bundle: dict[str, Any]) -> str:
    """The access token inside a bundle read with the library's representation."""
    if lib == "garminconnect":
        return str(json.loads(bundle["garminconnect_dump"])["di_token"])
    data = json.loads(base64.b64decode(bundle["garth_dump"]))
    return str(data[-1]["access_token"])
