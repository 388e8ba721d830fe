//! Token bundles: garth's OAuth1 + OAuth2 pair, or python-garminconnect's DI token set.
//!
//! A request body is parsed once into a [`TokenBundle`]: the kind, the canonical plaintext that
//! gets encrypted, and the expiry times derived from it. Unknown fields inside the garth token
//! objects are kept, in the order given.

use base64::{
    Engine,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose},
};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

/// Standard base64 that accepts input with or without padding (garth pads; hand-made dumps may not).
const B64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const B64URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Latest instant we accept as an expiry (9999-12-31T23:59:59Z), so conversions never fail.
const MAX_UNIX: i64 = 253_402_300_799;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    Garth,
    GarminConnect,
}

impl BundleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Garth => "garth",
            Self::GarminConnect => "garminconnect",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "garth" => Some(Self::Garth),
            "garminconnect" => Some(Self::GarminConnect),
            _ => None,
        }
    }
}

/// A validation failure naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// A parsed bundle, ready to be encrypted. The plaintext is zeroized on drop.
pub struct TokenBundle {
    pub kind: BundleKind,
    pub plaintext: Zeroizing<Vec<u8>>,
    pub access_expires_at: Option<DateTime<Utc>>,
    pub refresh_expires_at: Option<DateTime<Utc>>,
    /// False for a garminconnect bundle without `di_refresh_token`: no refresh is possible.
    pub refreshable: bool,
}

impl std::fmt::Debug for TokenBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenBundle")
            .field("kind", &self.kind)
            .field("plaintext", &"[redacted]")
            .field("access_expires_at", &self.access_expires_at)
            .field("refresh_expires_at", &self.refresh_expires_at)
            .finish()
    }
}

impl TokenBundle {
    /// Parses a `PUT /tokens` body.
    pub fn from_body(body: Value) -> Result<Self, FieldError> {
        let Value::Object(mut obj) = body else {
            return Err(FieldError::new("body", "must be a JSON object"));
        };
        let kind = match obj.remove("kind") {
            Some(Value::String(k)) => {
                BundleKind::parse(&k).ok_or_else(|| FieldError::new("kind", "must be one of garth, garminconnect"))?
            }
            Some(_) => return Err(FieldError::new("kind", "must be a string")),
            None => return Err(FieldError::new("kind", "is required")),
        };
        match kind {
            BundleKind::Garth => Self::garth_from_body(obj),
            BundleKind::GarminConnect => Self::garminconnect_from_body(obj),
        }
    }

    fn garth_from_body(mut obj: Map<String, Value>) -> Result<Self, FieldError> {
        let dump = obj.remove("garth_dump");
        let o1 = obj.remove("oauth1_token");
        let o2 = obj.remove("oauth2_token");
        reject_unknown(&obj)?;
        let (oauth1, oauth2) = match (dump, o1, o2) {
            (Some(d), None, None) => {
                let Value::String(d) = d else {
                    return Err(FieldError::new("garth_dump", "must be a string"));
                };
                decode_garth_dump(&d)?
            }
            (None, o1, Some(o2)) => (o1, o2),
            (Some(_), _, _) => {
                return Err(FieldError::new(
                    "garth_dump",
                    "give either garth_dump or the token objects (oauth2_token, with oauth1_token for garth), not both",
                ));
            }
            (None, _, None) => return Err(FieldError::new("oauth2_token", "is required")),
        };
        match oauth1 {
            Some(o1) => Self::garth(o1, oauth2),
            None => Self::garth_ng(oauth2),
        }
    }

    /// garth-ng (the maintained fork): one OAuth2 token with a rotating `refresh_token`, no
    /// OAuth1 token. Stored as `{"oauth2_token": ...}`; the missing `oauth1_token` is how the
    /// bundle remembers to be returned in garth-ng's one-element form.
    pub fn garth_ng(oauth2: Value) -> Result<Self, FieldError> {
        let Value::Object(o2) = oauth2 else {
            return Err(FieldError::new("oauth2_token", "must be an object"));
        };
        for f in ["access_token", "refresh_token"] {
            required_string(&o2, "oauth2_token", f, true)?;
        }
        for f in ["token_type", "scope", "jti", "client_id", "mfa_token"] {
            optional_string(&o2, "oauth2_token", f)?;
        }
        required_int(&o2, "oauth2_token", "expires_in")?;
        optional_int(&o2, "oauth2_token", "refresh_token_expires_in")?;
        let access_expires_at = unix_to_time(required_expiry(&o2, "oauth2_token", "expires_at")?);
        // garth-ng leaves it null when Garmin gave no refresh expiry.
        let refresh_expires_at = match o2.get("refresh_token_expires_at") {
            None | Some(Value::Null) => None,
            Some(_) => unix_to_time(required_expiry(&o2, "oauth2_token", "refresh_token_expires_at")?),
        };
        let mut canonical = Map::new();
        canonical.insert("oauth2_token".into(), Value::Object(o2));
        Ok(Self {
            kind: BundleKind::Garth,
            plaintext: to_plaintext(&Value::Object(canonical)),
            access_expires_at,
            refresh_expires_at,
            refreshable: true,
        })
    }

    /// Validates garth's two token objects and builds the bundle.
    pub fn garth(oauth1: Value, oauth2: Value) -> Result<Self, FieldError> {
        let Value::Object(o1) = oauth1 else {
            return Err(FieldError::new("oauth1_token", "must be an object"));
        };
        let Value::Object(o2) = oauth2 else {
            return Err(FieldError::new("oauth2_token", "must be an object"));
        };
        for f in ["oauth_token", "oauth_token_secret"] {
            required_string(&o1, "oauth1_token", f, true)?;
        }
        for f in ["mfa_token", "domain"] {
            optional_string(&o1, "oauth1_token", f)?;
        }
        for (f, non_empty) in
            [("access_token", true), ("refresh_token", true), ("token_type", false), ("scope", false), ("jti", false)]
        {
            required_string(&o2, "oauth2_token", f, non_empty)?;
        }
        required_int(&o2, "oauth2_token", "expires_in")?;
        let expires_at = required_expiry(&o2, "oauth2_token", "expires_at")?;
        required_int(&o2, "oauth2_token", "refresh_token_expires_in")?;
        let refresh_expires_at = required_expiry(&o2, "oauth2_token", "refresh_token_expires_at")?;
        let access_expires_at = unix_to_time(expires_at);
        let refresh_expires_at = unix_to_time(refresh_expires_at);
        let mut canonical = Map::new();
        canonical.insert("oauth1_token".into(), Value::Object(o1));
        canonical.insert("oauth2_token".into(), Value::Object(o2));
        Ok(Self {
            kind: BundleKind::Garth,
            plaintext: to_plaintext(&Value::Object(canonical)),
            access_expires_at,
            refresh_expires_at,
            refreshable: true,
        })
    }

    fn garminconnect_from_body(mut obj: Map<String, Value>) -> Result<Self, FieldError> {
        if let Some(dump) = obj.remove("garminconnect_dump") {
            reject_unknown(&obj)?;
            let Value::String(dump) = dump else {
                return Err(FieldError::new("garminconnect_dump", "must be a string"));
            };
            return Self::garminconnect_dump(dump);
        }
        let mut canonical = Map::new();
        for f in ["di_token", "di_refresh_token", "di_client_id"] {
            if f == "di_token" {
                required_string(&obj, "", f, true)?;
            } else {
                present_string_or_null(&obj, "", f)?;
            }
            canonical.insert(f.into(), obj.remove(f).unwrap_or(Value::Null));
        }
        reject_unknown(&obj)?;
        Ok(Self::garminconnect(canonical))
    }

    /// The string python-garminconnect's `Client.dumps()` returns: a JSON object with the three
    /// DI fields. The string itself is kept (next to the fields) so it is returned byte for byte.
    fn garminconnect_dump(dump: String) -> Result<Self, FieldError> {
        let field = "garminconnect_dump";
        let value: Value = serde_json::from_str(&dump).map_err(|_| {
            FieldError::new(field, "is not JSON (expected the output of garminconnect's Client.dumps())")
        })?;
        if let Some(key) = super::json::duplicate_key(dump.as_bytes()) {
            return Err(FieldError::new(field, format!("decodes to JSON with the key {key} twice")));
        }
        let Value::Object(mut obj) = value else {
            return Err(FieldError::new(
                field,
                "must be a JSON object {\"di_token\", \"di_refresh_token\", \"di_client_id\"}",
            ));
        };
        let mut canonical = Map::new();
        for f in ["di_token", "di_refresh_token", "di_client_id"] {
            if f == "di_token" {
                required_string(&obj, field, f, true)?;
            } else {
                present_string_or_null(&obj, field, f)?;
            }
            canonical.insert(f.into(), obj.remove(f).unwrap_or(Value::Null));
        }
        if let Some(k) = obj.keys().next() {
            return Err(FieldError::new(path(field, k), "unknown field"));
        }
        canonical.insert(field.into(), Value::String(dump));
        Ok(Self::garminconnect(canonical))
    }

    /// Builds a garminconnect bundle from its validated DI fields. Without a refresh token
    /// (a login that fell back to the web JWT) the login ends when the access token does.
    fn garminconnect(canonical: Map<String, Value>) -> Self {
        let access_expires_at = canonical.get("di_token").and_then(Value::as_str).and_then(jwt_exp);
        let refresh_token = canonical.get("di_refresh_token").and_then(Value::as_str);
        let refreshable = refresh_token.is_some();
        let refresh_expires_at = match refresh_token {
            Some(t) => jwt_exp(t),
            None => access_expires_at,
        };
        Self {
            kind: BundleKind::GarminConnect,
            plaintext: to_plaintext(&Value::Object(canonical)),
            access_expires_at,
            refresh_expires_at,
            refreshable,
        }
    }
}

/// The decrypted secret fields of a stored bundle, as returned by `GET /tokens`.
pub fn secrets_from_plaintext(plaintext: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(plaintext) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("stored plaintext is not a JSON object".into()),
        Err(e) => Err(format!("stored plaintext is not JSON: {e}")),
    }
}

/// Whether decrypted secrets can be refreshed (false for a garminconnect bundle without
/// `di_refresh_token`).
pub fn refreshable(secrets: &Map<String, Value>) -> bool {
    match secrets.get("di_token") {
        Some(_) => matches!(secrets.get("di_refresh_token"), Some(Value::String(_))),
        None => true,
    }
}

/// `garth.Client.dumps()` form: base64 of the JSON array `[oauth1, oauth2]` (garth), or of the
/// one-element array `[oauth2]` (garth-ng, whose bundles have no OAuth1 token).
pub fn garth_dump(secrets: &Map<String, Value>) -> Option<String> {
    let o2 = secrets.get("oauth2_token")?;
    let json = Zeroizing::new(match secrets.get("oauth1_token") {
        Some(o1) => serde_json::to_vec(&[o1, o2]).ok()?,
        None => serde_json::to_vec(&[o2]).ok()?,
    });
    Some(general_purpose::STANDARD.encode(json.as_slice()))
}

/// python-garminconnect's `Client.dumps()` form: the string written, when the bundle was written
/// as `garminconnect_dump`, else the three DI fields as Python's `json.dumps` writes them.
pub fn garminconnect_dump(secrets: &Map<String, Value>) -> Option<String> {
    if let Some(Value::String(d)) = secrets.get("garminconnect_dump") {
        return Some(d.clone());
    }
    let mut parts = Vec::with_capacity(3);
    for f in ["di_token", "di_refresh_token", "di_client_id"] {
        let v = secrets.get(f).cloned().unwrap_or(Value::Null);
        parts.push(format!("{}: {}", Value::String(f.into()), python_json(&v)?));
    }
    Some(format!("{{{}}}", parts.join(", ")))
}

/// A string or null as Python's `json.dumps` (ensure_ascii) writes it.
fn python_json(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some("null".into()),
        Value::String(s) => {
            let mut out = String::with_capacity(s.len() + 2);
            out.push('"');
            for ch in s.chars() {
                match ch {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    '\u{8}' => out.push_str("\\b"),
                    '\u{c}' => out.push_str("\\f"),
                    c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                        let mut buf = [0u16; 2];
                        for unit in c.encode_utf16(&mut buf) {
                            out.push_str(&format!("\\u{unit:04x}"));
                        }
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
            Some(out)
        }
        _ => None,
    }
}

fn decode_garth_dump(dump: &str) -> Result<(Option<Value>, Value), FieldError> {
    let err = |m: &str| FieldError::new("garth_dump", m);
    let bytes = Zeroizing::new(B64_LENIENT.decode(dump.trim().as_bytes()).map_err(|_| err("is not valid base64"))?);
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|_| err("does not decode to JSON (expected the output of garth.Client.dumps())"))?;
    if let Some(key) = super::json::duplicate_key(&bytes) {
        return Err(FieldError::new("garth_dump", format!("decodes to JSON with the key {key} twice")));
    }
    match value {
        Value::Array(mut items) if items.len() == 2 => {
            let o2 = items.pop().unwrap_or(Value::Null);
            let o1 = items.pop().unwrap_or(Value::Null);
            Ok((Some(o1), o2))
        }
        // garth-ng: `[oauth2_token]`.
        Value::Array(mut items) if items.len() == 1 => Ok((None, items.pop().unwrap_or(Value::Null))),
        _ => Err(err("must decode to a JSON array [oauth1_token, oauth2_token] (garth) or [oauth2_token] (garth-ng)")),
    }
}

/// The `exp` claim of a JWT, if the string is one; never fails, never verifies.
pub fn jwt_exp(token: &str) -> Option<DateTime<Utc>> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > 16 * 1024 {
        return None;
    }
    let bytes = Zeroizing::new(B64URL_LENIENT.decode(payload).ok()?);
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    let secs = exp.as_i64().or_else(|| exp.as_f64().filter(|f| f.is_finite()).map(|f| f.floor() as i64))?;
    unix_to_time(secs)
}

fn unix_to_time(secs: i64) -> Option<DateTime<Utc>> {
    if (0..=MAX_UNIX).contains(&secs) { DateTime::from_timestamp(secs, 0) } else { None }
}

fn to_plaintext(v: &Value) -> Zeroizing<Vec<u8>> {
    // Serialising a Value into a Vec cannot fail.
    Zeroizing::new(serde_json::to_vec(v).unwrap_or_default())
}

fn path(parent: &str, field: &str) -> String {
    if parent.is_empty() { field.to_string() } else { format!("{parent}.{field}") }
}

fn reject_unknown(obj: &Map<String, Value>) -> Result<(), FieldError> {
    match obj.keys().next() {
        Some(k) => Err(FieldError::new(k.clone(), "unknown field")),
        None => Ok(()),
    }
}

fn required_string(obj: &Map<String, Value>, parent: &str, f: &str, non_empty: bool) -> Result<(), FieldError> {
    match obj.get(f) {
        None | Some(Value::Null) => Err(FieldError::new(path(parent, f), "is required")),
        Some(Value::String(s)) if non_empty && s.is_empty() => {
            Err(FieldError::new(path(parent, f), "must not be empty"))
        }
        Some(Value::String(_)) => Ok(()),
        Some(_) => Err(FieldError::new(path(parent, f), "must be a string")),
    }
}

fn optional_string(obj: &Map<String, Value>, parent: &str, f: &str) -> Result<(), FieldError> {
    match obj.get(f) {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
        Some(_) => Err(FieldError::new(path(parent, f), "must be a string or null")),
    }
}

/// A key that must be present, holding a string or null (garminconnect writes all three DI keys).
fn present_string_or_null(obj: &Map<String, Value>, parent: &str, f: &str) -> Result<(), FieldError> {
    match obj.get(f) {
        None => Err(FieldError::new(path(parent, f), "is required (null when there is none)")),
        Some(_) => optional_string(obj, parent, f),
    }
}

fn optional_int(obj: &Map<String, Value>, parent: &str, f: &str) -> Result<(), FieldError> {
    match obj.get(f) {
        None | Some(Value::Null) => Ok(()),
        Some(_) => required_int(obj, parent, f).map(|_| ()),
    }
}

/// An expiry in Unix seconds: an integer, or a float (garth-ng writes `time.time()` sums such as
/// `1790000000.5`), truncated to whole seconds. The stored text stays as written.
fn required_expiry(obj: &Map<String, Value>, parent: &str, f: &str) -> Result<i64, FieldError> {
    match obj.get(f) {
        None | Some(Value::Null) => Err(FieldError::new(path(parent, f), "is required")),
        Some(v) => v
            .as_i64()
            .or_else(|| {
                v.as_f64().filter(|x| x.is_finite() && *x >= 0.0 && *x <= MAX_UNIX as f64).map(|x| x.trunc() as i64)
            })
            .filter(|n| (0..=MAX_UNIX).contains(n))
            .ok_or_else(|| FieldError::new(path(parent, f), "must be a non-negative number of seconds")),
    }
}

fn required_int(obj: &Map<String, Value>, parent: &str, f: &str) -> Result<i64, FieldError> {
    match obj.get(f) {
        None | Some(Value::Null) => Err(FieldError::new(path(parent, f), "is required")),
        // JSON Schema counts `3.0` as the integer 3 (and garth-ng writes float expiries): a
        // number without a fractional part is accepted in either spelling.
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() <= MAX_UNIX as f64).map(|f| f as i64))
            .filter(|n| (0..=MAX_UNIX).contains(n))
            .ok_or_else(|| FieldError::new(path(parent, f), "must be a non-negative integer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub fn oauth1() -> Value {
        json!({"oauth_token": "o1-token", "oauth_token_secret": "o1-secret", "mfa_token": null,
               "mfa_expiration_timestamp": null, "domain": "garmin.com", "extra_field": [1, 2]})
    }
    pub fn oauth2() -> Value {
        json!({"scope": "CONNECT_READ", "jti": "jti-1", "token_type": "Bearer",
               "access_token": "acc", "refresh_token": "ref", "expires_in": 86400,
               "expires_at": 1_790_000_000, "refresh_token_expires_in": 2_592_000,
               "refresh_token_expires_at": 1_792_000_000})
    }

    #[test]
    fn garth_objects_parse_and_keep_unknown_fields_in_order() {
        let b = TokenBundle::from_body(json!({"kind": "garth", "oauth1_token": oauth1(), "oauth2_token": oauth2()}))
            .unwrap();
        assert_eq!(b.kind, BundleKind::Garth);
        assert_eq!(b.access_expires_at.unwrap().timestamp(), 1_790_000_000);
        assert_eq!(b.refresh_expires_at.unwrap().timestamp(), 1_792_000_000);
        let secrets = secrets_from_plaintext(&b.plaintext).unwrap();
        assert_eq!(secrets["oauth1_token"], oauth1());
        let keys: Vec<_> = secrets["oauth1_token"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.last().unwrap(), "extra_field");
    }

    #[test]
    fn integral_float_expiries_are_integers_and_kept_as_written() {
        let o2: Value = serde_json::from_str(
            r#"{"scope": "S", "jti": "j", "token_type": "Bearer", "access_token": "a", "refresh_token": "r",
                "expires_in": 3.0, "expires_at": 1790000000.0, "refresh_token_expires_in": 2592000,
                "refresh_token_expires_at": 1792000000.0}"#,
        )
        .unwrap();
        let b = TokenBundle::from_body(json!({"kind": "garth", "oauth1_token": oauth1(), "oauth2_token": o2})).unwrap();
        assert_eq!(b.access_expires_at.unwrap().timestamp(), 1_790_000_000);
        assert_eq!(b.refresh_expires_at.unwrap().timestamp(), 1_792_000_000);
        let secrets = secrets_from_plaintext(&b.plaintext).unwrap();
        assert_eq!(secrets["oauth2_token"]["expires_at"].to_string(), "1790000000.0");
        let mut half = oauth2();
        half["expires_in"] = serde_json::from_str("3.5").unwrap();
        let e = TokenBundle::from_body(json!({"kind": "garth", "oauth1_token": oauth1(), "oauth2_token": half}))
            .unwrap_err();
        assert_eq!(e.field, "oauth2_token.expires_in");
    }

    #[test]
    fn garth_dump_round_trips() {
        let json = serde_json::to_vec(&json!([oauth1(), oauth2()])).unwrap();
        let dump = general_purpose::STANDARD.encode(json);
        let b = TokenBundle::from_body(json!({"kind": "garth", "garth_dump": dump})).unwrap();
        let secrets = secrets_from_plaintext(&b.plaintext).unwrap();
        let again = garth_dump(&secrets).unwrap();
        let decoded: Value = serde_json::from_slice(&general_purpose::STANDARD.decode(again).unwrap()).unwrap();
        assert_eq!(decoded, json!([oauth1(), oauth2()]));
    }

    #[test]
    fn missing_and_wrong_fields_are_named() {
        let mut o2 = oauth2();
        o2.as_object_mut().unwrap().remove("refresh_token");
        let e =
            TokenBundle::from_body(json!({"kind": "garth", "oauth1_token": oauth1(), "oauth2_token": o2})).unwrap_err();
        assert_eq!(e.field, "oauth2_token.refresh_token");
        let mut o2 = oauth2();
        o2["expires_at"] = json!("soon");
        let e =
            TokenBundle::from_body(json!({"kind": "garth", "oauth1_token": oauth1(), "oauth2_token": o2})).unwrap_err();
        assert_eq!(e.field, "oauth2_token.expires_at");
        let e = TokenBundle::from_body(json!({"kind": "nope"})).unwrap_err();
        assert_eq!(e.field, "kind");
        let e = TokenBundle::from_body(json!({"kind": "garminconnect", "di_token": "a", "di_refresh_token": "b"}))
            .unwrap_err();
        assert_eq!(e.field, "di_client_id");
        let e = TokenBundle::from_body(json!({"kind": "garth", "garth_dump": "!!!"})).unwrap_err();
        assert_eq!(e.field, "garth_dump");
        let e = TokenBundle::from_body(json!({"kind": "garth", "garth_dump": "W10="})).unwrap_err();
        assert_eq!(e.field, "garth_dump");
        let e = TokenBundle::from_body(json!({"kind": "garminconnect", "di_token": "a",
            "di_refresh_token": "b", "di_client_id": "c", "surprise": 1}))
        .unwrap_err();
        assert_eq!(e.field, "surprise");
    }

    /// Plaintexts stored before numbers kept their text (f64 renderings such as
    /// `1.2345678901234568e20`) read back with the same values and digits; only the exponent
    /// gains its sign (`e+20`), as every exponent is written now.
    #[test]
    fn plaintexts_stored_before_exact_numbers_read_back_unchanged() {
        let stored = br#"{"oauth1_token":{"oauth_token":"t","oauth_token_secret":"s","n":1.2345678901234568e20,"d":1.5},"oauth2_token":{"expires_at":1790000000,"f":0.1}}"#;
        let secrets = secrets_from_plaintext(stored).unwrap();
        let again = String::from_utf8(serde_json::to_vec(&secrets).unwrap()).unwrap();
        assert_eq!(again, String::from_utf8_lossy(stored).replace("e20", "e+20"));
        assert_eq!(secrets["oauth2_token"]["expires_at"].as_i64(), Some(1_790_000_000));
        let dump = general_purpose::STANDARD.decode(garth_dump(&secrets).unwrap()).unwrap();
        assert_eq!(
            String::from_utf8(dump).unwrap(),
            r#"[{"oauth_token":"t","oauth_token_secret":"s","n":1.2345678901234568e+20,"d":1.5},{"expires_at":1790000000,"f":0.1}]"#
        );
    }

    /// The three DI fields come back as Python's `json.dumps` writes them (what garminconnect's
    /// `Client.dumps()` returns), escapes included; a written dump comes back byte for byte.
    #[test]
    fn garminconnect_dump_is_spelled_like_python_json_dumps() {
        let b = TokenBundle::from_body(
            json!({"kind": "garminconnect", "di_token": "\u{e9}\u{2028}\u{1f600}\u{7f}\u{1}\"\\/\n",
            "di_refresh_token": null, "di_client_id": "c"}),
        )
        .unwrap();
        assert!(!b.refreshable);
        let secrets = secrets_from_plaintext(&b.plaintext).unwrap();
        // Python: json.dumps({"di_token": "\u00e9\u2028\U0001f600\x7f\x01\"\\/\n", ...})
        assert_eq!(
            garminconnect_dump(&secrets).unwrap(),
            r#"{"di_token": "\u00e9\u2028\ud83d\ude00\u007f\u0001\"\\/\n", "di_refresh_token": null, "di_client_id": "c"}"#
        );
        let written = r#"{"di_token":"a",  "di_refresh_token": "r", "di_client_id": null}"#;
        let b = TokenBundle::from_body(json!({"kind": "garminconnect", "garminconnect_dump": written})).unwrap();
        assert!(b.refreshable);
        assert_eq!(garminconnect_dump(&secrets_from_plaintext(&b.plaintext).unwrap()).unwrap(), written);
    }

    #[test]
    fn jwt_exp_is_extracted_or_none() {
        let payload = B64URL_LENIENT.encode(br#"{"exp":1790000000,"sub":"x"}"#);
        let jwt = format!("eyJhbGciOiJIUzI1NiJ9.{payload}.sig");
        assert_eq!(jwt_exp(&jwt).unwrap().timestamp(), 1_790_000_000);
        for not_jwt in
            ["", "abc", "a.b", "a.b.c.d", "a.!!.c", "a.e30.c", &format!("a.{}.c", B64URL_LENIENT.encode(b"[1]"))]
        {
            assert!(jwt_exp(not_jwt).is_none(), "{not_jwt}");
        }
        let huge = format!("a.{}.c", B64URL_LENIENT.encode(br#"{"exp":1e300}"#));
        assert!(jwt_exp(&huge).is_none());
    }
}
