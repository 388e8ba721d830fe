//! Property tests of every parser of untrusted bytes: user ids, scopes, MFA codes and
//! destinations, token bundles (`garth_dump`, garth objects, DI tokens), JWT `exp`, keyring
//! specs, AES-GCM envelopes, and (through the real router) `X-Request-Id`, `If-Match` /
//! `If-None-Match`, `X-Lease-Fence`, the `{user_id}` path segment, `Authorization` and the
//! audit events query (`after` cursor, `limit`, filters).
//!
//! Each property runs a modest number of cases by default so the suite stays fast; set
//! `PROPTEST_CASES=N` to run every property N times, e.g.
//! `PROPTEST_CASES=100000 cargo test --release --test props`.

use std::sync::OnceLock;

use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, Request, StatusCode},
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD},
};
use centraldb_mfa::{
    api,
    crypto::api_keys::{PREFIX, display_prefix},
    crypto::{Aad, CryptoError, Keyring},
    domain::{
        Scope, Scopes, TokenBundle, UserId,
        mfa::{ChallengeStatus, Method, SessionState, Verifier, mask_destination, validate_code},
        tokens::{BundleKind, garth_dump, jwt_exp, secrets_from_plaintext},
    },
    services::audit::Outcome,
};
use helpers::TestApp;
use proptest::{
    prelude::*,
    test_runner::{Config as ProptestConfig, TestRunner},
};
use secrecy::SecretString;
use serde_json::{Map, Value, json};

/// The API suite's harness (tests/api/helpers.rs): the same app, database and secret registry.
#[path = "api/helpers.rs"]
mod helpers;

/// Latest expiry the service accepts (9999-12-31T23:59:59Z).
const MAX_UNIX: i64 = 253_402_300_799;
/// Cases per property when `PROPTEST_CASES` is not set: pure functions, and router round trips.
const PURE_CASES: u32 = 256;
const HTTP_CASES: u32 = 64;

/// `PROPTEST_CASES` when set, else `default_cases`. No strategy here filters, so no rejection
/// limit is reached however many cases run. Failures are not persisted to files: regressions
/// are kept as plain `#[test]`s.
fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default_cases);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

// ---- strategies --------------------------------------------------------------------------

/// Strings near the user id rules: valid ones of every length around the limit, one bad
/// character among valid ones, and anything at all.
fn user_id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._@:-]{0,140}",
        "[A-Za-z0-9._@:-]{126,130}",
        "[A-Za-z0-9._@:-]{0,10}[^A-Za-z0-9._@:-][A-Za-z0-9._@:-]{0,10}",
        any::<String>(),
        ".{0,140}",
    ]
}

/// The documented rule, written independently of the implementation.
fn user_id_model(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._@:-".contains(&b))
}

/// A JSON value of any shape (no floats, so that text round trips compare exactly).
fn json_value(with_floats: bool) -> impl Strategy<Value = Value> {
    let float = any::<f64>().prop_map(move |f| {
        if with_floats { serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number) } else { Value::Null }
    });
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        float,
        ".{0,12}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((json_key(), inner), 0..5).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Object keys: mostly the field names the parsers look for, sometimes anything.
fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "kind", "garth_dump", "oauth1_token", "oauth2_token", "oauth_token", "oauth_token_secret", "mfa_token",
            "domain", "access_token", "refresh_token", "token_type", "scope", "jti", "expires_in", "expires_at",
            "refresh_token_expires_in", "refresh_token_expires_at", "di_token", "di_refresh_token", "di_client_id",
            "exp",
        ])
        .prop_map(str::to_string),
        1 => ".{0,8}",
    ]
}

/// Extra (unknown) members of a garth token object: names that are not known fields.
fn extras(known: &'static [&'static str]) -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec(("x_[a-z_]{0,10}|[A-Z][a-zA-Z]{0,10}", json_value(false)), 0..4).prop_map(move |v| {
        let mut seen = Vec::<String>::new();
        v.into_iter()
            .filter(|(k, _)| {
                let fresh = !known.contains(&k.as_str()) && !seen.contains(k);
                seen.push(k.clone());
                fresh
            })
            .collect()
    })
}

const O1_FIELDS: &[&str] = &["oauth_token", "oauth_token_secret", "mfa_token", "domain"];
const O2_FIELDS: &[&str] = &[
    "scope",
    "jti",
    "token_type",
    "access_token",
    "refresh_token",
    "expires_in",
    "expires_at",
    "refresh_token_expires_in",
    "refresh_token_expires_at",
];

/// A valid `oauth1_token` object, with unknown members kept in order.
fn oauth1() -> impl Strategy<Value = Map<String, Value>> {
    (".{1,40}", ".{1,40}", prop::option::of(".{0,20}"), prop::option::of(".{0,20}"), extras(O1_FIELDS)).prop_map(
        |(tok, secret, mfa, domain, extra)| {
            let mut m = Map::new();
            m.insert("oauth_token".into(), tok.into());
            m.insert("oauth_token_secret".into(), secret.into());
            m.insert("mfa_token".into(), mfa.map_or(Value::Null, Value::from));
            if let Some(d) = domain {
                m.insert("domain".into(), d.into());
            }
            m.extend(extra);
            m
        },
    )
}

/// A valid `oauth2_token` object (times within the accepted range), with unknown members.
fn oauth2() -> impl Strategy<Value = Map<String, Value>> {
    ((".{0,20}", ".{0,20}", ".{0,10}", ".{1,60}", ".{1,60}"), prop::array::uniform4(0..=MAX_UNIX), extras(O2_FIELDS))
        .prop_map(|((scope, jti, tt, access, refresh), ints, extra)| {
            let mut m = Map::new();
            for (k, v) in [("scope", scope), ("jti", jti), ("token_type", tt), ("access_token", access)] {
                m.insert(k.into(), v.into());
            }
            m.insert("refresh_token".into(), refresh.into());
            for (k, v) in ["expires_in", "expires_at", "refresh_token_expires_in", "refresh_token_expires_at"]
                .into_iter()
                .zip(ints)
            {
                m.insert(k.into(), v.into());
            }
            m.extend(extra);
            m
        })
}

/// Whether member `f` is a non-empty string.
fn non_empty(o: &Map<String, Value>, f: &str) -> bool {
    o.get(f).and_then(Value::as_str).is_some_and(|s| !s.is_empty())
}

/// The documented integer fields (`expires_in`, ...): an integer in 0..=MAX_UNIX, spelled `3` or
/// `3.0` (JSON Schema's integer; garth-ng writes floats).
fn int_model(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() <= MAX_UNIX as f64).map(|f| f as i64))
        .filter(|n| (0..=MAX_UNIX).contains(n))
}

/// The documented expiry fields (`expires_at`, ...): a number of seconds in 0..=MAX_UNIX, a
/// fraction truncated.
fn expiry_model(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| {
            v.as_f64().filter(|x| x.is_finite() && (0.0..=MAX_UNIX as f64).contains(x)).map(|x| x.trunc() as i64)
        })
        .filter(|n| (0..=MAX_UNIX).contains(n))
}

/// A garth object with some members replaced, removed or retyped.
fn mutated(obj: Map<String, Value>, edits: Vec<(prop::sample::Index, Option<Value>)>) -> Map<String, Value> {
    let mut obj = obj;
    for (idx, v) in edits {
        if obj.is_empty() {
            break;
        }
        let key = obj.keys().nth(idx.index(obj.len())).cloned().unwrap_or_default();
        match v {
            Some(v) => {
                obj.insert(key, v);
            }
            None => {
                obj.remove(&key);
            }
        }
    }
    obj
}

fn b64_any_padding(bytes: &[u8], url: bool, pad: bool) -> String {
    match (url, pad) {
        (false, true) => STANDARD.encode(bytes),
        (false, false) => STANDARD_NO_PAD.encode(bytes),
        (true, true) => URL_SAFE.encode(bytes),
        (true, false) => URL_SAFE_NO_PAD.encode(bytes),
    }
}

/// The `exp` claim in many forms: in range, any i64, u64 beyond i64, floats, strings, nothing.
fn exp_claim() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        (0..=MAX_UNIX).prop_map(|n| Some(Value::from(n))),
        any::<i64>().prop_map(|n| Some(Value::from(n))),
        any::<u64>().prop_map(|n| Some(Value::from(n))),
        (-10.0f64..=(MAX_UNIX as f64 + 10.0)).prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number)),
        Just(Some(json!(MAX_UNIX))),
        Just(Some(json!(MAX_UNIX + 1))),
        Just(Some(json!(-1))),
        json_value(true).prop_map(Some),
        Just(None),
    ]
}

/// What `exp` should give, from the documented rule: whole seconds (floats rounded down) from
/// 1970 up to 9999-12-31T23:59:59Z; anything else is no expiry.
fn exp_model(exp: Option<&Value>) -> Option<i64> {
    let n = match exp? {
        Value::Number(n) => n,
        _ => return None,
    };
    if let Some(i) = n.as_i64() {
        return (0..=MAX_UNIX).contains(&i).then_some(i);
    }
    if n.is_u64() {
        return None; // beyond i64, so beyond 9999
    }
    let f = n.as_f64()?.floor();
    (f >= 0.0 && f <= MAX_UNIX as f64).then_some(f as i64)
}

/// The documented `garth_dump`, built here rather than by the service: standard (padded)
/// base64 of the compact JSON array `[oauth1_token, oauth2_token]`, objects as given.
fn garth_dump_model(o1: &Value, o2: &Value) -> String {
    let mut json = b"[".to_vec();
    json.extend(serde_json::to_vec(o1).unwrap());
    json.push(b',');
    json.extend(serde_json::to_vec(o2).unwrap());
    json.push(b']');
    STANDARD.encode(json)
}

/// A JWT-like `header.payload.sig` whose payload holds `exp` and other random claims.
fn jwt_like() -> impl Strategy<Value = (String, Option<i64>)> {
    (
        "[A-Za-z0-9_-]{0,24}",
        exp_claim(),
        prop::collection::vec((".{0,6}", json_value(true)), 0..3),
        any::<bool>(),
        "[A-Za-z0-9_-]{0,24}",
    )
        .prop_map(|(header, exp, others, pad, sig)| {
            let mut claims = Map::new();
            for (k, v) in others {
                if k != "exp" {
                    claims.insert(k, v);
                }
            }
            if let Some(e) = &exp {
                claims.insert("exp".into(), e.clone());
            }
            let expected = exp_model(exp.as_ref());
            let payload = b64_any_padding(&serde_json::to_vec(&Value::Object(claims)).unwrap(), true, pad);
            (format!("{header}.{payload}.{sig}"), expected)
        })
}

/// A keyring with two known keys (`k1` active, `old`), from fixed key bytes.
fn ring() -> &'static Keyring {
    static RING: OnceLock<Keyring> = OnceLock::new();
    RING.get_or_init(|| {
        // Fixed keys that look random (all-equal keys are refused as weak).
        let k1 = hex::decode("96bea704b8400b9102b85f76e4982d0e200925e7d8c2d43abcd1effd8204da28").unwrap();
        let old = hex::decode("ef4b77b84c85b74ced724118ea826e0f9ea800b8fd4aa04a0e9b2defe2b30561").unwrap();
        let spec = format!("k1:{},old:{}", STANDARD.encode(k1), STANDARD.encode(old));
        Keyring::parse(&SecretString::from(spec)).unwrap()
    })
}

// ---- user ids, scopes, MFA vocabulary --------------------------------------------------------

proptest! {
    #![proptest_config(config(PURE_CASES))]

    #[test]
    fn user_id_accepts_exactly_the_documented_alphabet_and_length(s in user_id_like()) {
        let parsed = UserId::parse(&s);
        prop_assert_eq!(parsed.is_ok(), user_id_model(&s), "{:?}", s);
        if let Ok(u) = parsed {
            prop_assert_eq!(u.as_str(), s.as_str());
            prop_assert_eq!(u.to_string(), s);
        }
    }

    #[test]
    fn user_id_never_panics_on_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..300)) {
        let s = String::from_utf8_lossy(&b);
        prop_assert_eq!(UserId::parse(&s).is_ok(), user_id_model(&s));
    }

    #[test]
    fn scopes_parse_only_known_words_and_round_trip(
        s in prop_oneof![
            any::<String>(),
            prop::collection::vec(
                prop_oneof![
                    prop::sample::select(Scope::ALL.to_vec()).prop_map(|s| s.as_str().to_string()),
                    "[a-z:]{0,12}",
                ],
                0..8,
            )
            .prop_flat_map(|words| {
                let n = words.len();
                (Just(words), prop::collection::vec("[ ,]{1,3}", n))
            })
            .prop_map(|(words, seps)| words.into_iter().zip(seps).map(|(w, s)| w + &s).collect::<String>()),
        ]
    ) {
        let words: Vec<&str> = s.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        let all_known = words.iter().all(|w| Scope::ALL.iter().any(|sc| sc.as_str() == *w));
        match Scopes::parse_list(&s) {
            Ok(scopes) => {
                prop_assert!(all_known, "{:?}", s);
                let stored = scopes.to_stored();
                prop_assert_eq!(Scopes::parse_list(&stored), Ok(scopes.clone()));
                for w in &words {
                    prop_assert!(scopes.allows(Scope::parse(w).unwrap()));
                }
            }
            Err(m) => {
                prop_assert!(!all_known, "{:?}", s);
                prop_assert!(m.starts_with("unknown scope"));
            }
        }
    }

    #[test]
    fn string_enums_parse_only_their_own_spelling(s in prop_oneof![
        any::<String>(),
        prop::sample::select(vec![
            "email", "sms", "totp", "push", "service", "external", "pending", "verified", "consumed", "failed",
            "expired", "cancelled", "started", "mfa_required", "mfa_verified", "authenticated", "superseded",
            "garth", "garminconnect", "admin", "tokens:read", "success", "failure", "denied", "error", "Email", "SMS",
            " sms", "sms ",
        ]).prop_map(str::to_string),
    ]) {
        if let Some(m) = Method::parse(&s) { prop_assert_eq!(m.as_str(), s.as_str()); }
        if let Some(v) = Verifier::parse(&s) { prop_assert_eq!(v.as_str(), s.as_str()); }
        if let Some(c) = ChallengeStatus::parse(&s) { prop_assert_eq!(c.as_str(), s.as_str()); }
        if let Some(st) = SessionState::parse(&s) { prop_assert_eq!(st.as_str(), s.as_str()); }
        if let Some(k) = BundleKind::parse(&s) { prop_assert_eq!(k.as_str(), s.as_str()); }
        if let Some(sc) = Scope::parse(&s) { prop_assert_eq!(sc.as_str(), s.as_str()); }
        if let Some(o) = Outcome::parse(&s) { prop_assert_eq!(o.as_str(), s.as_str()); }
    }

    #[test]
    fn api_key_listings_show_at_most_a_prefix(
        key in prop_oneof![any::<String>(), "cdbm_[A-Za-z0-9_-]{38,48}", "cdbm_.{40,46}"]
    ) {
        let shown = display_prefix(&key);
        if shown != "(custom)" {
            prop_assert!(key.starts_with(PREFIX) && key.len() >= PREFIX.len() + 43);
            prop_assert_eq!(shown, key.chars().take(PREFIX.len() + 7).collect::<String>());
        }
    }

    #[test]
    fn codes_are_four_to_sixteen_ascii_letters_or_digits(
        s in prop_oneof![any::<String>(), "[A-Za-z0-9]{0,20}", "[A-Za-z0-9]{2,8}.[A-Za-z0-9]{0,8}", "\\PC{3,17}"]
    ) {
        let model = (4..=16).contains(&s.chars().count()) && s.chars().all(|c| c.is_ascii_alphanumeric());
        prop_assert_eq!(validate_code(&s).is_ok(), model, "{:?}", s);
    }

    #[test]
    fn destinations_are_masked_without_leaking(
        method in prop::sample::select(vec![Method::Email, Method::Sms, Method::Totp, Method::Push]),
        raw in prop_oneof![
            any::<String>(),
            "[^@\\s]{0,20}@[^@\\s]{0,20}",
            " ?\\+?[0-9 ().-]{0,30} ?",
            "[0-9]{0,25}",
            ".{0,300}",
            "[a-zA-Z0-9 ]{1,20}",
        ]
    ) {
        match mask_destination(method, &raw) {
            Ok(masked) => {
                let t = raw.trim();
                prop_assert!(!t.is_empty() && t.chars().count() <= 254 && !t.chars().any(char::is_control));
                if let Some((local, domain)) = t.split_once('@') {
                    let first: String = local.chars().take(1).collect();
                    prop_assert_eq!(masked, format!("{first}***@{domain}"));
                } else {
                    prop_assert!(method != Method::Email);
                    let digits: String = t.chars().filter(char::is_ascii_digit).collect();
                    if t.chars().all(|c| c.is_ascii_digit() || " +-().".contains(c)) {
                        // A phone number: stars for all but the last four digits (so a number
                        // of exactly four digits is shown whole, as documented).
                        prop_assert!((4..=20).contains(&digits.len()));
                        let (hidden, last4) = digits.split_at(digits.len() - 4);
                        prop_assert_eq!(masked, format!("{}{last4}", "*".repeat(hidden.len())));
                    } else {
                        prop_assert!(method != Method::Sms);
                        let first: String = t.chars().take(1).collect();
                        prop_assert_eq!(masked, format!("{first}***"));
                    }
                }
            }
            Err(m) => prop_assert!(m.starts_with("destination"), "{}", m),
        }
    }
}

// ---- token bundles and JWT expiry ------------------------------------------------------------

proptest! {
    #![proptest_config(config(PURE_CASES))]

    #[test]
    fn jwt_exp_never_panics_on_arbitrary_strings(s in prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_=.-]{0,80}",
        "[^.]{0,10}\\.[A-Za-z0-9_+/=-]{0,60}\\.[^.]{0,10}",
    ]) {
        let _ = jwt_exp(&s);
    }

    #[test]
    fn jwt_exp_reads_exactly_the_documented_exp((jwt, expected) in jwt_like()) {
        prop_assert_eq!(jwt_exp(&jwt).map(|t| t.timestamp()), expected, "{}", jwt);
    }

    #[test]
    fn jwt_exp_ignores_payloads_over_16_kib(exp in 0..=MAX_UNIX, filler in 11_500usize..13_000, pad in any::<bool>()) {
        let claims = json!({"exp": exp, "filler": "x".repeat(filler)});
        let payload = b64_any_padding(claims.to_string().as_bytes(), true, pad);
        let expected = (payload.len() <= 16 * 1024).then_some(exp);
        prop_assert_eq!(jwt_exp(&format!("h.{payload}.s")).map(|t| t.timestamp()), expected);
    }

    #[test]
    fn jwt_exp_is_none_for_non_object_or_non_json_payloads(
        payload in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            json_value(true)
                .prop_map(|v| serde_json::to_vec(&if v.is_object() { json!([v]) } else { v }).unwrap()),
        ],
        pad in any::<bool>(),
        extra_dots in 0usize..3,
    ) {
        let body = b64_any_padding(&payload, true, pad);
        let jwt = format!("h.{body}.s{}", ".x".repeat(extra_dots));
        let as_object = serde_json::from_slice::<Value>(&payload).ok().filter(Value::is_object);
        let expected = if extra_dots == 0 { as_object.as_ref().and_then(|o| exp_model(o.get("exp"))) } else { None };
        prop_assert_eq!(jwt_exp(&jwt).map(|t| t.timestamp()), expected);
    }

    #[test]
    fn bundle_parsing_never_panics_on_arbitrary_json(v in json_value(true)) {
        if let Err(e) = TokenBundle::from_body(v.clone()) {
            prop_assert!(!e.field.is_empty());
        }
        if let Value::Object(mut m) = v {
            for kind in ["garth", "garminconnect"] {
                m.insert("kind".into(), kind.into());
                let _ = TokenBundle::from_body(Value::Object(m.clone()));
            }
        }
    }

    #[test]
    fn garth_objects_with_wrong_members_are_refused_naming_the_field(
        o1 in oauth1(),
        o2 in oauth2(),
        e1 in prop::collection::vec((any::<prop::sample::Index>(), prop::option::of(json_value(true))), 0..3),
        e2 in prop::collection::vec((any::<prop::sample::Index>(), prop::option::of(json_value(true))), 0..3),
    ) {
        let (o1, o2) = (mutated(o1, e1), mutated(o2, e2));
        let ok1 = ["oauth_token", "oauth_token_secret"].iter().all(|f| non_empty(&o1, f))
            && ["mfa_token", "domain"].iter().all(|f| o1.get(*f).is_none_or(|v| v.is_null() || v.is_string()));
        let ok2 = ["access_token", "refresh_token"].iter().all(|f| non_empty(&o2, f))
            && ["token_type", "scope", "jti"].iter().all(|f| o2.get(*f).is_some_and(Value::is_string))
            && ["expires_in", "refresh_token_expires_in"].iter().all(|f| o2.get(*f).and_then(int_model).is_some())
            && ["expires_at", "refresh_token_expires_at"].iter().all(|f| o2.get(*f).and_then(expiry_model).is_some());
        let result = TokenBundle::from_body(json!({"kind": "garth", "oauth1_token": o1, "oauth2_token": o2}));
        match result {
            Ok(b) => {
                prop_assert!(ok1 && ok2);
                prop_assert_eq!(b.access_expires_at.map(|t| t.timestamp()), expiry_model(&o2["expires_at"]));
                prop_assert_eq!(
                    b.refresh_expires_at.map(|t| t.timestamp()),
                    expiry_model(&o2["refresh_token_expires_at"])
                );
            }
            Err(e) => {
                prop_assert!(!(ok1 && ok2), "{:?}", e);
                let expected_parent = if ok1 { "oauth2_token." } else { "oauth1_token." };
                prop_assert!(e.field.starts_with(expected_parent), "{:?}", e);
            }
        }
    }

    #[test]
    fn garth_dump_round_trips(
        o1 in oauth1(),
        o2 in oauth2(),
        pad in any::<bool>(),
        ws in prop::sample::select(vec!["", " ", "\n", "\t ", "\r\n"]),
    ) {
        let objects = json!([o1, o2]);
        let b1 = TokenBundle::from_body(json!({"kind": "garth", "oauth1_token": o1, "oauth2_token": o2})).unwrap();
        let secrets = secrets_from_plaintext(&b1.plaintext).unwrap();
        prop_assert_eq!(&Value::Object(secrets.clone()), &json!({"oauth1_token": o1, "oauth2_token": o2}));
        // garth's own dump (padded) and hand-made ones (no padding, surrounding whitespace).
        let dump = garth_dump_model(&Value::Object(o1.clone()), &Value::Object(o2.clone()));
        prop_assert_eq!(garth_dump(&secrets), Some(dump.clone()));
        prop_assert_eq!(serde_json::from_slice::<Value>(&STANDARD.decode(&dump).unwrap()).unwrap(), objects);
        let bytes = STANDARD.decode(&dump).unwrap();
        let given = format!("{ws}{}{ws}", b64_any_padding(&bytes, false, pad));
        let b2 = TokenBundle::from_body(json!({"kind": "garth", "garth_dump": given})).unwrap();
        prop_assert_eq!(b2.kind, BundleKind::Garth);
        prop_assert_eq!(b2.plaintext.as_slice(), b1.plaintext.as_slice());
        prop_assert_eq!(b2.access_expires_at, b1.access_expires_at);
        prop_assert_eq!(b2.refresh_expires_at, b1.refresh_expires_at);
        prop_assert_eq!(garth_dump(&secrets_from_plaintext(&b2.plaintext).unwrap()), Some(dump));
    }

    #[test]
    fn garth_dump_decoding_never_panics(
        dump in prop_oneof![
            any::<String>(),
            "[A-Za-z0-9+/=]{0,200}",
            prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| STANDARD.encode(b)),
            json_value(true).prop_map(|v| STANDARD.encode(serde_json::to_vec(&v).unwrap())),
            prop::collection::vec(json_value(true), 0..4)
                .prop_map(|v| STANDARD_NO_PAD.encode(serde_json::to_vec(&v).unwrap())),
            (json_value(true), json_value(true))
                .prop_map(|(a, b)| STANDARD.encode(serde_json::to_vec(&json!([a, b])).unwrap())),
        ]
    ) {
        match TokenBundle::from_body(json!({"kind": "garth", "garth_dump": dump})) {
            Ok(b) => prop_assert!(secrets_from_plaintext(&b.plaintext).is_ok()),
            Err(e) => prop_assert!(
                e.field == "garth_dump" || e.field.starts_with("oauth1_token") || e.field.starts_with("oauth2_token"),
                "{:?}",
                e
            ),
        }
    }

    #[test]
    fn di_bundles_take_their_expiry_from_the_jwt(
        (access, access_exp) in jwt_like(),
        (refresh, refresh_exp) in prop_oneof![
            jwt_like(),
            // Not a JWT (one or two dot-separated parts): no expiry.
            "[^.]{1,40}".prop_map(|s| (s, None)),
            "[^.]{0,20}\\.[^.]{0,20}".prop_map(|s| (s, None)),
        ],
        client in ".{1,20}",
    ) {
        let b = TokenBundle::from_body(json!({"kind": "garminconnect", "di_token": access,
            "di_refresh_token": refresh, "di_client_id": client})).unwrap();
        prop_assert_eq!(b.kind, BundleKind::GarminConnect);
        prop_assert_eq!(b.access_expires_at.map(|t| t.timestamp()), access_exp);
        prop_assert_eq!(b.refresh_expires_at.map(|t| t.timestamp()), refresh_exp);
        let secrets = secrets_from_plaintext(&b.plaintext).unwrap();
        let expected = json!({"di_token": access, "di_refresh_token": refresh, "di_client_id": client});
        prop_assert_eq!(Value::Object(secrets), expected);
    }

    #[test]
    fn stored_plaintext_parsing_never_panics(b in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        json_value(true).prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ]) {
        if let Ok(m) = secrets_from_plaintext(&b) {
            let _ = garth_dump(&m);
        }
    }
}

// ---- keyring specs and envelopes -------------------------------------------------------------

proptest! {
    #![proptest_config(config(PURE_CASES))]

    #[test]
    fn key_specs_never_panic(s in prop_oneof![any::<String>(), "[a-z0-9:,= +/A-Z_-]{0,120}"]) {
        let _ = Keyring::parse(&SecretString::from(s));
    }

    #[test]
    fn key_specs_are_accepted_exactly_when_valid(
        entries in prop::collection::vec(
            (
                prop_oneof![
                    4 => "[A-Za-z0-9_-]{1,8}",
                    1 => "[A-Za-z0-9_-]{30,34}",
                    1 => "[^,:]{0,6}",
                    1 => " [a-z]{1,4} ",
                ],
                prop_oneof![4 => Just(32usize), 1 => 0usize..70],
                prop::array::uniform32(any::<u8>()),
                0u8..3,
            ),
            0..4,
        ),
        sep in prop::sample::select(vec![",", ", ", " ,", ",,"]),
    ) {
        let mut spec = Vec::new();
        for (id, len, seed, style) in &entries {
            let key: Vec<u8> = seed.iter().cycle().take(*len).copied().collect();
            let b64 = match style {
                0 => STANDARD.encode(&key),
                1 => format!(" {} ", STANDARD.encode(&key)),
                _ => STANDARD_NO_PAD.encode(&key),
            };
            spec.push(format!("{id}:{b64}"));
        }
        let spec = spec.join(sep);
        let ids: Vec<&str> = entries.iter().map(|e| e.0.trim()).collect();
        let valid_id = |id: &str| {
            (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let padded_ok = |len: usize, style: u8| style != 2 || len.is_multiple_of(3); // strict padding
        let model = !entries.is_empty()
            && entries.iter().all(|(id, len, seed, style)| {
                valid_id(id.trim())
                    && *len == 32
                    && padded_ok(*len, *style)
                    && centraldb_mfa::crypto::keyring::weak_aes_key(seed).is_none()
            })
            && (0..ids.len()).all(|i| !ids[..i].contains(&ids[i]));
        match Keyring::parse(&SecretString::from(spec.clone())) {
            Ok(k) => {
                prop_assert!(model, "{}", spec);
                prop_assert_eq!(k.key_ids(), ids.clone());
                prop_assert_eq!(k.active_key_id(), ids[0]);
            }
            Err(e) => prop_assert!(!model, "{} -> {}", spec, e),
        }
    }

    #[test]
    fn envelopes_round_trip(
        plaintext in prop::collection::vec(any::<u8>(), 0..2048),
        parts in prop::collection::vec(".{0,12}", 0..4),
        use_old in any::<bool>(),
    ) {
        let k = ring();
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let env = if use_old {
            k.encrypt_with_key_id("old", &plaintext, &Aad::new(&refs)).unwrap()
        } else {
            k.encrypt(&plaintext, &Aad::new(&refs))
        };
        prop_assert_eq!(Keyring::envelope_key_id(&env), Ok(if use_old { "old" } else { "k1" }));
        prop_assert_eq!(env.len(), 2 + if use_old { 3 } else { 2 } + 12 + plaintext.len() + 16);
        let decrypted = k.decrypt(&env, &Aad::new(&refs)).unwrap();
        prop_assert_eq!(decrypted.as_slice(), plaintext.as_slice());
    }

    #[test]
    fn any_single_byte_change_truncation_or_extension_fails(
        plaintext in prop::collection::vec(any::<u8>(), 0..512),
        user in user_id_like(),
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
        cut in any::<prop::sample::Index>(),
        tail in prop::collection::vec(any::<u8>(), 1..40),
    ) {
        let k = ring();
        let aad = Aad::token_bundle(&user, "garth");
        let env = k.encrypt(&plaintext, &aad);
        let mut flipped = env.clone();
        flipped[at.index(env.len())] ^= mask;
        prop_assert!(k.decrypt(&flipped, &aad).is_err());
        prop_assert!(k.decrypt(&env[..cut.index(env.len())], &aad).is_err());
        let mut longer = env.clone();
        longer.extend_from_slice(&tail);
        prop_assert!(k.decrypt(&longer, &aad).is_err());
        let decrypted = k.decrypt(&env, &aad).unwrap();
        prop_assert_eq!(decrypted.as_slice(), plaintext.as_slice());
    }

    #[test]
    fn another_context_fails_to_decrypt(
        plaintext in prop::collection::vec(any::<u8>(), 0..256),
        a in prop::collection::vec("[ab]{0,3}", 0..4),
        b in prop::collection::vec("[ab]{0,3}", 0..4),
        users in (user_id_like(), user_id_like()),
        kinds in prop::sample::subsequence(vec!["garth", "garminconnect"], 1..=2),
    ) {
        let k = ring();
        let ra: Vec<&str> = a.iter().map(String::as_str).collect();
        let rb: Vec<&str> = b.iter().map(String::as_str).collect();
        let env = k.encrypt(&plaintext, &Aad::new(&ra));
        // Parts are length-prefixed: ["ab", "a"] and ["a", "ba"] are different contexts.
        let result = k.decrypt(&env, &Aad::new(&rb));
        if a == b {
            let decrypted = result.unwrap();
            prop_assert_eq!(decrypted.as_slice(), plaintext.as_slice());
        } else {
            prop_assert_eq!(result, Err(CryptoError::Authentication));
        }
        let (u1, u2) = users;
        let (k1, k2) = (kinds[0], kinds[kinds.len() - 1]);
        let env = k.encrypt(&plaintext, &Aad::token_bundle(&u1, k1));
        let result = k.decrypt(&env, &Aad::token_bundle(&u2, k2));
        prop_assert_eq!(result.is_ok(), u1 == u2 && k1 == k2);
    }

    #[test]
    fn arbitrary_envelopes_never_decrypt_or_panic(b in prop::collection::vec(any::<u8>(), 0..200), user in ".{0,10}") {
        let k = ring();
        let _ = Keyring::envelope_key_id(&b);
        prop_assert!(k.decrypt(&b, &Aad::token_bundle(&user, "garth")).is_err());
    }

    #[test]
    fn envelopes_with_a_valid_prefix_and_random_tail_fail_with_the_right_error(
        id in prop_oneof![Just("k1".to_string()), Just("old".to_string()), "[a-z0-9]{1,32}", "\\PC{0,5}"],
        tail in prop_oneof![prop::collection::vec(any::<u8>(), 0..80), prop::collection::vec(any::<u8>(), 26..=29)],
        len_delta in prop_oneof![8 => Just(0i16), 1 => -3i16..=3, 1 => any::<u8>().prop_map(i16::from)],
        version in prop_oneof![8 => Just(1u8), 1 => any::<u8>()],
    ) {
        let k = ring();
        let id_bytes = id.as_bytes();
        let mut env = vec![version, (id_bytes.len() as i16 + len_delta).clamp(0, 255) as u8];
        env.extend_from_slice(id_bytes);
        env.extend_from_slice(&tail);
        let result = k.decrypt(&env, &Aad::token_bundle("u", "garth"));
        if version == 1 && len_delta == 0 && id_bytes.len() <= 255 {
            let expected = if tail.len() < 12 + 16 {
                CryptoError::Malformed
            } else if k.has_key(&id) {
                CryptoError::Authentication
            } else {
                CryptoError::UnknownKey(id.clone())
            };
            prop_assert_eq!(Keyring::envelope_key_id(&env), Ok(id.as_str()));
            prop_assert_eq!(result, Err(expected));
        } else {
            prop_assert!(result.is_err());
            if version != 1 {
                prop_assert_eq!(Keyring::envelope_key_id(&env), Err(CryptoError::Malformed));
            }
        }
    }
}

// ---- header parsers that are public: X-Lease-Fence ---------------------------------------------

/// Header value bytes: visible ASCII, tab, and obs-text (bytes >= 0x80); all valid `HeaderValue`s.
fn header_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            8 => 0x20u8..=0x7e,
            1 => Just(b'\t'),
            1 => 0x80u8..=0xff,
        ],
        0..max,
    )
}

/// Near-miss integers: signs, spaces, quotes, leading zeros, huge values.
fn int_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0i64..5).prop_map(|n| n.to_string()),
        "[ \t]{0,2}[+-]?0{0,3}[0-9]{1,20}[ \t]{0,2}",
        "\"?W?/?\"?[0-9]{1,4}\"?",
        Just(i64::MAX.to_string()),
        Just("9223372036854775808".to_string()),
        "[0-9a-fx.eE_+-]{0,8}",
    ]
}

/// A decimal integer with an optional sign, fitting in 64 bits (what the headers and query
/// parameters document: "an integer"), written independently of the parser under test.
fn decimal_model(s: &str) -> Option<i64> {
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.bytes().try_fold(0i64, |acc, b| {
        let d = i64::from(b - b'0');
        if negative { acc.checked_mul(10)?.checked_sub(d) } else { acc.checked_mul(10)?.checked_add(d) }
    })
}

fn trim_ows(s: &str) -> &str {
    s.trim_matches(|c| c == ' ' || c == '\t')
}

proptest! {
    #![proptest_config(config(PURE_CASES))]

    #[test]
    fn lease_fence_is_a_positive_integer_or_refused(
        v in prop_oneof![header_bytes(40), int_like().prop_map(String::into_bytes)]
    ) {
        let mut headers = HeaderMap::new();
        prop_assert_eq!(api::tokens::lease_fence(&headers).ok(), Some(None));
        headers.insert("x-lease-fence", HeaderValue::from_bytes(&v).unwrap());
        let model = std::str::from_utf8(&v)
            .ok()
            .filter(|s| s.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)))
            .and_then(|s| decimal_model(trim_ows(s)))
            .filter(|n| *n >= 1);
        match api::tokens::lease_fence(&headers) {
            Ok(got) => prop_assert_eq!(got, model, "{:?}", v),
            Err(e) => {
                prop_assert!(model.is_none(), "{:?}", v);
                let problem = e.to_problem();
                prop_assert_eq!(problem.extra.get("field"), Some(&Value::from("x-lease-fence")));
            }
        }
    }
}

// ---- through the router: X-Request-Id, If-Match, user id path, Authorization, audit query -------

const ADMIN_KEY: &str = "props-bootstrap-admin-key-0123456789abcdef";

/// One in-process app (`helpers::TestApp`: a fresh database, SQLite unless
/// `CENTRALDB_TEST_BACKEND` says otherwise), driven with `oneshot` from synchronous properties.
struct App {
    rt: tokio::runtime::Runtime,
    app: Option<TestApp>,
}

impl Drop for App {
    /// The app's pooled connections go back to their pool (or close) inside the runtime.
    fn drop(&mut self) {
        let _inside = self.rt.enter();
        self.app = None;
    }
}

impl App {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let app = rt.block_on(TestApp::spawn_with(|vars| {
            // The properties below spell this key (and near misses of it) out.
            vars.insert("CENTRALDB_BOOTSTRAP_ADMIN_KEY".into(), ADMIN_KEY.into());
            // The properties send refusals by the thousand from one source; the refusal
            // budget's 429 is tested in tests/api/auth.rs, here every refusal must be a 401.
            vars.insert("CENTRALDB_REFUSAL_BUDGET".into(), "10000000".into());
        }));
        Self { rt, app: Some(app) }
    }

    /// Sends a request; the status, response headers and the body as JSON (`Null` if not JSON).
    fn send(&self, req: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let app = self.app.as_ref().expect("the app lives until drop");
        let r = self.rt.block_on(app.send_request(req));
        (r.status, r.headers, r.json)
    }
}

fn runner(default_cases: u32) -> TestRunner {
    TestRunner::new(config(default_cases))
}

/// Percent-encodes every byte that is not a letter or digit.
fn pct(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| if b.is_ascii_alphanumeric() { (*b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

#[test]
fn request_id_is_echoed_exactly_when_acceptable() {
    let app = App::new();
    let strategy = prop_oneof![header_bytes(140), "[A-Za-z0-9_.:-]{0,130}".prop_map(String::into_bytes)];
    runner(HTTP_CASES)
        .run(&strategy, |v| {
            let req = Request::get("/healthz")
                .header("x-request-id", HeaderValue::from_bytes(&v).unwrap())
                .body(Body::empty());
            let (status, headers, _) = app.send(req.unwrap());
            prop_assert_eq!(status, StatusCode::OK);
            let echoed = headers.get("x-request-id").unwrap().to_str().unwrap().to_string();
            let acceptable =
                (1..=128).contains(&v.len()) && v.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b));
            if acceptable {
                prop_assert_eq!(echoed.as_bytes(), v.as_slice());
            } else {
                let id = uuid::Uuid::parse_str(&echoed).unwrap();
                prop_assert_eq!(id.get_version_num(), 7);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn if_match_and_if_none_match_are_parsed_or_refused() {
    let app = App::new();
    let value = || {
        prop_oneof![
            header_bytes(30),
            int_like().prop_map(String::into_bytes),
            "[ \t]{0,2}(\\*|W/)?\"?[+-]?[0-9]{0,20}\"?[ \t]{0,2}".prop_map(String::into_bytes),
            Just(b"*".to_vec()),
        ]
    };
    let strategy = (prop::option::of(value()), prop::option::of(value()));
    runner(HTTP_CASES)
        .run(&strategy, |(if_match, if_none_match)| {
            let mut req = Request::put("/api/v1/users/props-user/tokens")
                .header("authorization", format!("Bearer {ADMIN_KEY}"))
                .header("content-type", "application/json");
            for (name, v) in [("if-match", &if_match), ("if-none-match", &if_none_match)] {
                if let Some(v) = v {
                    req = req.header(name, HeaderValue::from_bytes(v).unwrap());
                }
            }
            // An empty body: a header that parses gets as far as the body check (`kind`), so no
            // case writes anything.
            let (status, _, problem) = app.send(req.body(Body::from("{}")).unwrap());
            prop_assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
            let text = |v: &Vec<u8>| {
                std::str::from_utf8(v)
                    .ok()
                    .filter(|s| s.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)))
                    .map(|s| trim_ows(s).to_string())
            };
            let expected_field = match (&if_match, &if_none_match) {
                (Some(m), _) if text(m).is_none() => Some("if-match"),
                (_, Some(n)) if text(n).is_none() => Some("if-none-match"),
                (Some(_), Some(_)) => None,
                (None, Some(n)) if text(n).as_deref() == Some("*") => Some("kind"),
                (None, Some(_)) => Some("if-none-match"),
                (Some(m), None) => {
                    let m = text(m).unwrap_or_default();
                    let inner = m.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(&m);
                    if m == "*" || decimal_model(inner).is_some_and(|n| n >= 1) {
                        Some("kind")
                    } else {
                        Some("if-match")
                    }
                }
                (None, None) => Some("kind"),
            };
            prop_assert_eq!(problem.get("field").and_then(Value::as_str), expected_field, "{:?}", problem);
            Ok(())
        })
        .unwrap();
}

#[test]
fn user_id_path_segment_is_validated() {
    let app = App::new();
    let strategy = prop_oneof![
        // (An empty segment would not reach this route.)
        user_id_like().prop_map(|s| if s.is_empty() { b"/".to_vec() } else { s.into_bytes() }),
        prop::collection::vec(any::<u8>(), 1..40),
    ];
    runner(HTTP_CASES)
        .run(&strategy, |raw| {
            let uri = format!("/api/v1/users/{}/auth-status", pct(&raw));
            let req = Request::get(&uri).header("authorization", format!("Bearer {ADMIN_KEY}")).body(Body::empty());
            let (status, _, problem) = app.send(req.unwrap());
            let valid = std::str::from_utf8(&raw).is_ok_and(user_id_model);
            if valid {
                prop_assert_eq!(status, StatusCode::OK, "{:?} {:?}", raw, problem);
            } else {
                prop_assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
                prop_assert_eq!(problem.get("field").and_then(Value::as_str), Some("user_id"));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn authorization_header_authenticates_only_the_key() {
    let app = App::new();
    let strategy = prop_oneof![
        header_bytes(80),
        "(Bearer|bearer|Basic|BEARER)? {0,2}[A-Za-z0-9_-]{0,60}".prop_map(String::into_bytes),
        "(Bearer|bearer|BEARER|Bearer:)[ \t]{0,2}props-bootstrap-admin-key-0123456789abcde[a-z.]?[ \t]{0,2}"
            .prop_map(String::into_bytes),
    ];
    runner(HTTP_CASES)
        .run(&strategy, |v| {
            let req = Request::get("/api/v1/audit/events?limit=1")
                .header("authorization", HeaderValue::from_bytes(&v).unwrap())
                .body(Body::empty());
            let (status, _, problem) = app.send(req.unwrap());
            // `Bearer <key>` (or `bearer`), the key with optional whitespace around it.
            let presented = std::str::from_utf8(&v)
                .ok()
                .filter(|s| s.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)))
                .and_then(|s| s.strip_prefix("Bearer ").or_else(|| s.strip_prefix("bearer ")))
                .map(trim_ows);
            if presented == Some(ADMIN_KEY) {
                prop_assert_eq!(status, StatusCode::OK, "{:?} {:?}", v, problem);
            } else {
                prop_assert_eq!(status, StatusCode::UNAUTHORIZED, "{:?} {:?}", v, problem);
                prop_assert_eq!(problem.get("code").and_then(Value::as_str), Some("unauthenticated"));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn audit_cursor_and_limit_are_parsed_or_refused() {
    let app = App::new();
    let strategy = (prop::option::of(int_like()), prop::option::of(int_like()));
    runner(HTTP_CASES)
        .run(&strategy, |(after, limit)| {
            let mut query = vec![];
            if let Some(a) = &after {
                query.push(format!("after={}", pct(a.as_bytes())));
            }
            if let Some(l) = &limit {
                query.push(format!("limit={}", pct(l.as_bytes())));
            }
            let uri = format!("/api/v1/audit/events?{}", query.join("&"));
            let req = Request::get(&uri).header("authorization", format!("Bearer {ADMIN_KEY}")).body(Body::empty());
            let (status, _, body) = app.send(req.unwrap());
            let limit_ok = limit.as_deref().is_none_or(|l| decimal_model(l).is_some_and(|n| (1..=1000).contains(&n)));
            let after_ok = after.as_deref().is_none_or(|a| decimal_model(a).is_some_and(|n| n >= 0));
            if limit_ok && after_ok {
                prop_assert_eq!(status, StatusCode::OK, "{:?} {:?} {:?}", after, limit, body);
                prop_assert!(body["events"].is_array());
            } else {
                prop_assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
                let field = if limit_ok { "after" } else { "limit" };
                prop_assert_eq!(body.get("field").and_then(Value::as_str), Some(field));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn audit_query_filters_never_fail_the_server() {
    let app = App::new();
    let time = || {
        prop_oneof![
            "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|z|[+-][0-9]{2}:[0-9]{2})",
            "(0000|9999|1970)-(01|12|13|00)-(01|31|32)T(00|23|24):(00|59|60):(00|59|60)(Z|[+-](23:59|00:00|24:00))",
            ".{0,30}",
        ]
    };
    let strategy = (
        prop::option::of(user_id_like()),
        prop::option::of(prop_oneof!["[a-z._:-]{0,12}", ".{0,110}"]),
        prop::option::of(prop_oneof![
            prop::sample::select(vec!["success", "failure", "denied", "error"]).prop_map(str::to_string),
            ".{0,10}"
        ]),
        prop::option::of(time()),
        prop::option::of(time()),
        prop::collection::vec(("[a-z_]{0,8}", ".{0,8}"), 0..3),
    );
    runner(HTTP_CASES)
        .run(&strategy, |(user, type_, outcome, since, until, others)| {
            let mut query = vec![];
            for (k, v) in
                [("user_id", &user), ("type", &type_), ("outcome", &outcome), ("since", &since), ("until", &until)]
            {
                if let Some(v) = v {
                    query.push(format!("{k}={}", pct(v.as_bytes())));
                }
            }
            for (k, v) in &others {
                query.push(format!("{}={}", pct(k.as_bytes()), pct(v.as_bytes())));
            }
            let uri = format!("/api/v1/audit/events?{}", query.join("&"));
            let req = Request::get(&uri).header("authorization", format!("Bearer {ADMIN_KEY}")).body(Body::empty());
            let (status, _, body) = app.send(req.unwrap());
            match status {
                StatusCode::OK => prop_assert!(body["events"].is_array()),
                StatusCode::UNPROCESSABLE_ENTITY => {
                    let field = body.get("field").and_then(Value::as_str);
                    prop_assert!(
                        field.is_none_or(
                            |f| ["user_id", "type", "outcome", "since", "until", "limit", "after"].contains(&f)
                        ),
                        "{:?}",
                        body
                    );
                }
                other => prop_assert!(false, "{} for {} ({:?})", other, uri, body),
            }
            if user.as_deref().is_some_and(|u| !user_id_model(u)) {
                prop_assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
            }
            Ok(())
        })
        .unwrap();
}

/// A value that must not be echoed: segments that each start with the marker `Zq`, joined by
/// `separators` (quotes, backticks and backslashes are what a redactor can trip on).
fn secret_value(separators: Vec<&'static str>) -> impl Strategy<Value = String> {
    prop::collection::vec(("Zq[a-z0-9]{0,6}", prop::sample::select(separators)), 1..4)
        .prop_map(|parts| parts.into_iter().map(|(seg, sep)| format!("{seg}{sep}")).collect())
}

/// POSTs a challenge whose `field` is `value` (whole, and truncated at `cut`): a 422 that does not show
/// the marker `Zq`.
fn assert_not_echoed(
    app: &App,
    field: &str,
    value: Value,
    cut: Option<prop::sample::Index>,
) -> Result<(), TestCaseError> {
    let mut body = json!({"user_id": "props-user", "method": "email", "verifier": "service",
                          "destination": "a@example.com"});
    body[field] = value;
    let text = serde_json::to_string(&body).unwrap();
    let truncated = cut.map(|c| text[..c.index(text.len())].to_string());
    for payload in std::iter::once(text.clone()).chain(truncated) {
        let req = Request::post("/api/v1/mfa/challenges")
            .header("authorization", format!("Bearer {ADMIN_KEY}"))
            .header("content-type", "application/json")
            .body(Body::from(payload.clone()));
        let (status, _, problem) = app.send(req.unwrap());
        prop_assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{} {:?}", payload, problem);
        let shown = problem.to_string();
        prop_assert!(!shown.contains("Zq"), "{} echoed in {}", payload, shown);
    }
    Ok(())
}

/// A string where the schema wants an enum, an integer or a UUID; or an array holding it where
/// a string is wanted.
fn misplaced_string(field: &str, secret: String, nested: bool) -> Value {
    if nested || ["user_id", "code", "resume_state"].contains(&field) { json!([secret]) } else { json!(secret) }
}

const BODY_FIELDS: [&str; 8] =
    ["method", "verifier", "ttl_seconds", "max_attempts", "session_id", "user_id", "code", "resume_state"];

#[test]
fn json_body_errors_never_echo_string_values() {
    let app = App::new();
    let strategy = (
        prop::sample::select(BODY_FIELDS.to_vec()),
        secret_value(vec!["", " ", "'", "-"]),
        any::<bool>(),
        any::<prop::sample::Index>(),
    );
    runner(HTTP_CASES)
        .run(&strategy, |(field, secret, nested, cut)| {
            assert_not_echoed(&app, field, misplaced_string(field, secret, nested), Some(cut))
        })
        .unwrap();
}

/// Regression (a leak found by these properties, fixed in `api::extract::redact_quoted`): a value
/// with an escaped `\"` or a backtick inside was echoed from there on, and integers were echoed
/// whole (an MFA `code` sent as a JSON number).
#[test]
fn json_body_errors_never_echo_values_with_quotes_backticks_or_numbers() {
    let app = App::new();
    for (field, value) in [
        ("method", json!("Zq`Zq")),
        ("ttl_seconds", json!("Zq\"Zq")),
        ("ttl_seconds", json!("Zq\\\"Zq")),
        ("code", json!(987_654)),
    ] {
        assert_not_echoed(&app, field, value.clone(), None).unwrap_or_else(|e| panic!("{field}={value}: {e}"));
    }
    let strategy = (
        prop::sample::select(BODY_FIELDS.to_vec()),
        secret_value(vec!["", "\"", "`", "\\", "'", " ", "\\\""]),
        any::<bool>(),
        any::<prop::sample::Index>(),
    );
    runner(HTTP_CASES)
        .run(&strategy, |(field, secret, nested, cut)| {
            assert_not_echoed(&app, field, misplaced_string(field, secret, nested), Some(cut))
        })
        .unwrap();
}

/// A valid garth pair whose refresh token is still valid (so the vault hands it out).
fn live_garth_pair() -> impl Strategy<Value = (Map<String, Value>, Map<String, Value>)> {
    let now = chrono::Utc::now().timestamp();
    (oauth1(), oauth2(), now + 86_400..=MAX_UNIX).prop_map(|(o1, mut o2, refresh_at)| {
        o2.insert("refresh_token_expires_at".into(), refresh_at.into());
        (o1, o2)
    })
}

/// A DI refresh token that is still valid: a JWT expiring after tomorrow, or opaque.
fn live_refresh_token() -> impl Strategy<Value = String> {
    let now = chrono::Utc::now().timestamp();
    prop_oneof![
        (now + 86_400..=MAX_UNIX, "[A-Za-z0-9_-]{0,10}")
            .prop_map(|(exp, sig)| format!("h.{}.{sig}", URL_SAFE_NO_PAD.encode(json!({"exp": exp}).to_string()))),
        "[^.]{1,40}",
    ]
}

#[test]
fn tokens_round_trip_through_the_vault() {
    let app = App::new();
    let strategy = (
        "[A-Za-z0-9._@:-]{1,128}",
        prop_oneof![
            live_garth_pair().prop_map(|(o1, o2)| {
                let dump = STANDARD.encode(serde_json::to_vec(&json!([o1, o2])).unwrap());
                (json!({"kind": "garth", "garth_dump": dump}), json!({"oauth1_token": o1, "oauth2_token": o2}))
            }),
            live_garth_pair().prop_map(|(o1, o2)| {
                let secrets = json!({"oauth1_token": o1, "oauth2_token": o2});
                (json!({"kind": "garth", "oauth1_token": o1, "oauth2_token": o2}), secrets)
            }),
            (jwt_like(), live_refresh_token(), ".{1,20}").prop_map(|((access, _), refresh, client)| {
                let secrets = json!({"di_token": access, "di_refresh_token": refresh, "di_client_id": client});
                let mut body = secrets.clone();
                body["kind"] = "garminconnect".into();
                (body, secrets)
            }),
        ],
    );
    runner(HTTP_CASES)
        .run(&strategy, |(user, (body, secrets))| {
            let auth = format!("Bearer {ADMIN_KEY}");
            let uri = format!("/api/v1/users/{}/tokens", pct(user.as_bytes()));
            let req = Request::put(&uri)
                .header("authorization", &auth)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()));
            let (status, headers, meta) = app.send(req.unwrap());
            prop_assert!(status == StatusCode::CREATED || status == StatusCode::OK, "{} {:?}", status, meta);
            prop_assert_eq!(&meta["user_id"], &json!(user));
            let etag = headers.get("etag").unwrap().to_str().unwrap().to_string();
            prop_assert_eq!(etag, format!("\"{}\"", meta["version"]));
            let kind = body["kind"].as_str().unwrap();
            let rep = if kind == "garth" { "?representation=garth_dump" } else { "" };
            let req = Request::get(format!("{uri}{rep}")).header("authorization", &auth).body(Body::empty());
            let (status, _, got) = app.send(req.unwrap());
            prop_assert_eq!(status, StatusCode::OK, "{:?}", got);
            if kind == "garth" {
                let dump = got["garth_dump"].as_str().unwrap();
                let decoded: Value = serde_json::from_slice(&STANDARD.decode(dump).unwrap()).unwrap();
                prop_assert_eq!(decoded, json!([secrets["oauth1_token"], secrets["oauth2_token"]]));
                let expected_dump = garth_dump_model(&secrets["oauth1_token"], &secrets["oauth2_token"]);
                prop_assert_eq!(dump, expected_dump.as_str());
                let req = Request::get(&uri).header("authorization", &auth).body(Body::empty());
                let (_, _, objects) = app.send(req.unwrap());
                prop_assert_eq!(&objects["oauth1_token"], &secrets["oauth1_token"]);
                prop_assert_eq!(&objects["oauth2_token"], &secrets["oauth2_token"]);
            } else {
                for f in ["di_token", "di_refresh_token", "di_client_id"] {
                    prop_assert_eq!(&got[f], &secrets[f]);
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn token_writes_refuse_arbitrary_bodies_cleanly() {
    let app = App::new();
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        json_value(true).prop_map(|v| serde_json::to_vec(&v).unwrap()),
        prop::collection::vec((json_key(), json_value(true)), 0..6).prop_map(|kv| {
            let mut m: Map<String, Value> = kv.into_iter().collect();
            m.insert("kind".into(), if m.len().is_multiple_of(2) { "garth" } else { "garminconnect" }.into());
            serde_json::to_vec(&m).unwrap()
        }),
    ];
    runner(HTTP_CASES)
        .run(&strategy, |body| {
            let req = Request::put("/api/v1/users/props-arbitrary/tokens")
                .header("authorization", format!("Bearer {ADMIN_KEY}"))
                .header("content-type", "application/json")
                .body(Body::from(body.clone()));
            let (status, _, problem) = app.send(req.unwrap());
            let allowed = [StatusCode::OK, StatusCode::CREATED, StatusCode::UNPROCESSABLE_ENTITY];
            prop_assert!(
                allowed.contains(&status),
                "{} {:?} for {:?}",
                status,
                problem,
                String::from_utf8_lossy(&body)
            );
            Ok(())
        })
        .unwrap();
}

#[test]
fn path_ids_and_attempt_numbers_are_parsed_or_refused() {
    let app = App::new();
    let id = prop_oneof![
        any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).hyphenated().to_string()),
        any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).simple().to_string()),
        any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).braced().to_string().to_uppercase()),
        any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).urn().to_string()),
        "[0-9a-fA-F-]{30,40}",
        ".{1,40}",
    ];
    runner(HTTP_CASES)
        .run(&(id, int_like()), |(id, n)| {
            let uri = format!("/api/v1/mfa/challenges/{}/attempts/{}/result", pct(id.as_bytes()), pct(n.as_bytes()));
            let req = Request::post(&uri)
                .header("authorization", format!("Bearer {ADMIN_KEY}"))
                .header("content-type", "application/json")
                .body(Body::from(r#"{"success": true}"#));
            let (status, _, problem) = app.send(req.unwrap());
            let id_ok = uuid::Uuid::parse_str(&id).is_ok();
            let n_ok = decimal_model(&n).is_some_and(|n| n >= 1);
            let field = problem.get("field").and_then(Value::as_str);
            if !id_ok {
                prop_assert_eq!((status, field), (StatusCode::UNPROCESSABLE_ENTITY, Some("id")), "{:?}", problem);
                prop_assert!(api::extract::parse_uuid("id", &id).is_err());
            } else if !n_ok {
                prop_assert_eq!((status, field), (StatusCode::UNPROCESSABLE_ENTITY, Some("n")), "{:?}", problem);
            } else {
                prop_assert_eq!(status, StatusCode::NOT_FOUND, "{:?}", problem);
                prop_assert_eq!(api::extract::parse_uuid("id", &id).ok(), uuid::Uuid::parse_str(&id).ok());
            }
            Ok(())
        })
        .unwrap();
}
