"""The Python libraries GarminSync uses, against the real binary: each library's own dumps() goes
in through the README's snippet, comes back out, and its loads() + dumps() give the same string.
No network access to Garmin: the clients are built from token objects."""

import base64
import dataclasses
import json
import secrets
import time

import requests


def unique_user(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def jwt(exp: int, tag: str) -> str:
    b64 = lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).rstrip(b"=").decode()
    return f"{b64({'alg': 'RS256'})}.{b64({'exp': exp, 'sub': tag})}.sig-{tag}"


def metadata(server, user: str) -> dict:
    r = requests.get(
        f"{server['base']}/users/{user}/tokens/metadata", headers={"Authorization": f"Bearer {server['api_key']}"}
    )
    r.raise_for_status()
    return r.json()


def rfc3339_to_unix(s: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp())


# ---- garth 0.8.0 ---------------------------------------------------------------------------


def garth08_client(tag: str):
    import garth
    from garth.auth_tokens import OAuth1Token, OAuth2Token

    now = int(time.time())
    client = garth.Client()
    client.oauth1_token = OAuth1Token(
        oauth_token=f"o1-{tag}", oauth_token_secret=f"o1s-{tag}", mfa_token=None, domain="garmin.com"
    )
    client.oauth2_token = OAuth2Token(
        scope="CONNECT_READ CONNECT_WRITE", jti=f"jti-{tag}", token_type="Bearer",
        access_token=f"acc-{tag}", refresh_token=f"ref-{tag}", expires_in=3600, expires_at=now + 3600,
        refresh_token_expires_in=2592000, refresh_token_expires_at=now + 2592000,
    )
    return client


def test_garth_dump_round_trips_through_the_readme_snippet(needs, server, snippets):
    needs("garth")
    ns = snippets("garth")
    user = unique_user("garth")
    client = garth08_client("a")
    written = client.dumps()
    assert len(json.loads(base64.b64decode(written))) == 2
    assert ns["save_garth"](user, client) == '"1"'
    loaded, etag = ns["load_garth"](user)
    assert etag == '"1"'
    assert loaded.dumps() == written
    # A refresh written back with If-Match, then read again.
    refreshed = garth08_client("b")
    assert ns["save_garth"](user, refreshed, etag) == '"2"'
    assert ns["load_garth"](user)[0].dumps() == refreshed.dumps()
    meta = metadata(server, user)
    assert rfc3339_to_unix(meta["access_expires_at"]) == refreshed.oauth2_token.expires_at


def test_garth_objects_come_back_as_written(needs, server, snippets):
    needs("garth")
    ns = snippets("garth")
    user = unique_user("garth-obj")
    client = garth08_client("o")
    body = {"kind": "garth", "oauth1_token": dataclasses.asdict(client.oauth1_token),
            "oauth2_token": dataclasses.asdict(client.oauth2_token)}
    ns["http"].put(f"{ns['CDB']}/users/{user}/tokens", json=body).raise_for_status()
    got = ns["http"].get(f"{ns['CDB']}/users/{user}/tokens").json()
    assert got["oauth1_token"] == body["oauth1_token"]
    assert got["oauth2_token"] == body["oauth2_token"]
    assert ns["load_garth"](user)[0].dumps() == client.dumps()


# ---- garth-ng 1.1.0 ------------------------------------------------------------------------


def garth_ng_client(tag: str):
    import garth
    from garth.auth_tokens import OAuth2Token

    client = garth.Client()
    # expires_at and refresh_token_expires_at become time.time() sums: non-integral floats.
    client.oauth2_token = OAuth2Token(
        access_token=f"ng-acc-{tag}", refresh_token=f"ng-ref-{tag}", expires_in=3600,
        refresh_token_expires_in=7776000, scope="CONNECT_READ", jti=f"jti-{tag}", client_id="GCM_ANDROID_DARK",
    )
    return client


def test_garth_ng_dump_round_trips_through_the_same_snippet(needs, server, snippets):
    needs("garth-ng")
    ns = snippets("garth")
    user = unique_user("ng")
    client = garth_ng_client("a")
    written = client.dumps()
    assert len(json.loads(base64.b64decode(written))) == 1, "garth-ng's one-element form"
    assert ns["save_garth"](user, client) == '"1"'
    loaded, etag = ns["load_garth"](user)  # garth-ng's loads() refuses a two-element dump
    assert loaded.dumps() == written
    meta = metadata(server, user)
    assert rfc3339_to_unix(meta["access_expires_at"]) == int(client.oauth2_token.expires_at)
    assert rfc3339_to_unix(meta["refresh_expires_at"]) == int(client.oauth2_token.refresh_token_expires_at)
    # The refresh token rotates: write back every refresh, with If-Match.
    rotated = garth_ng_client("b")
    assert ns["save_garth"](user, rotated, etag) == '"2"'
    assert ns["load_garth"](user)[0].dumps() == rotated.dumps()
    r = ns["http"].put(f"{ns['CDB']}/users/{user}/tokens", headers={"If-Match": etag},
                       json={"kind": "garth", "garth_dump": client.dumps()})
    assert r.status_code == 412, "a stale write-back is refused"


def test_garth_ng_objects_snippet_round_trips(needs, server, snippets):
    needs("garth-ng")
    ns = snippets("garth", "garth-ng-objects")
    user = unique_user("ng-obj")
    client = garth_ng_client("o")
    ns["save_garth_ng_objects"](user, client)
    loaded, _ = ns["load_garth_ng_objects"](user)
    assert loaded.dumps() == client.dumps()
    got = ns["http"].get(f"{ns['CDB']}/users/{user}/tokens").json()
    assert got["oauth2_token"] == dataclasses.asdict(client.oauth2_token)
    assert "oauth1_token" not in got
    # The dump representation of an objects-form garth-ng bundle loads too.
    assert ns["load_garth"](user)[0].dumps() == client.dumps()


# ---- python-garminconnect 0.3.x ------------------------------------------------------------


def garminconnect_client(tag: str, refresh: bool = True):
    from garminconnect import Garmin

    now = int(time.time())
    garmin = Garmin()
    garmin.client.di_token = jwt(now + 3600, f"di-{tag}")
    garmin.client.di_refresh_token = jwt(now + 86400 * 30, f"dir-{tag}") if refresh else None
    garmin.client.di_client_id = "GARMIN_CONNECT_MOBILE_ANDROID_DI" if refresh else None
    return garmin, now


def test_garminconnect_dump_round_trips_through_the_readme_snippet(needs, server, snippets):
    needs("garminconnect")
    ns = snippets("garminconnect")
    user = unique_user("gc")
    garmin, now = garminconnect_client("a")
    written = garmin.client.dumps()
    assert ns["save_garminconnect"](user, garmin) == '"1"'
    loaded, etag, refreshable = ns["load_garminconnect"](user)
    assert loaded.client.dumps() == written
    assert refreshable is True
    meta = metadata(server, user)
    assert rfc3339_to_unix(meta["access_expires_at"]) == now + 3600
    assert rfc3339_to_unix(meta["refresh_expires_at"]) == now + 86400 * 30
    rotated, _ = garminconnect_client("b")
    assert ns["save_garminconnect"](user, rotated, etag) == '"2"'
    assert ns["load_garminconnect"](user)[0].client.dumps() == rotated.client.dumps()


def test_garminconnect_without_refresh_token(needs, server, snippets):
    needs("garminconnect")
    ns = snippets("garminconnect")
    user = unique_user("gc-jwt")
    garmin, now = garminconnect_client("w", refresh=False)
    written = garmin.client.dumps()
    assert json.loads(written)["di_refresh_token"] is None
    ns["save_garminconnect"](user, garmin)
    loaded, _, refreshable = ns["load_garminconnect"](user)
    assert loaded.client.dumps() == written
    assert refreshable is False
    meta = metadata(server, user)
    assert rfc3339_to_unix(meta["refresh_expires_at"]) == now + 3600, "the login ends with the access token"
