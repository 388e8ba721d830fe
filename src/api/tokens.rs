//! `/api/v1/users/{user_id}/tokens` and `/auth-status`.

use axum::{
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    api::error::{ApiError, Problem},
    domain::mfa::SessionState,
    domain::{
        TokenBundle,
        tokens::{BundleKind, garminconnect_dump, garth_dump},
    },
    services::{
        leases::{MAX_WAIT_SECS, Waited},
        tokens::{Precondition, TokenMetadata, TokenStatus},
    },
    state::AppState,
};

use super::extract::{ApiJson, ApiQuery, Auth, TokensRead, TokensWrite, UserPath};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(put_tokens, get_tokens, delete_tokens))
        .routes(routes!(get_metadata))
        .routes(routes!(invalidate_tokens))
        .routes(routes!(auth_status))
}

// ---- documented shapes -------------------------------------------------------------------

/// garth's OAuth1 token. Unknown fields are kept and returned as given.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct GarthOAuth1Token {
    pub oauth_token: String,
    pub oauth_token_secret: String,
    pub mfa_token: Option<String>,
    pub mfa_expiration_timestamp: Option<Value>,
    pub domain: Option<String>,
}

/// garth's OAuth2 token. Unknown fields are kept and returned as given.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct GarthOAuth2Token {
    pub scope: String,
    pub jti: String,
    pub token_type: String,
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: i64,
    /// Unix seconds (a float is truncated); becomes `access_expires_at`.
    pub expires_at: f64,
    pub refresh_token_expires_in: i64,
    /// Unix seconds (a float is truncated); becomes `refresh_expires_at`.
    pub refresh_token_expires_at: f64,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GarthKind {
    Garth,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GarminConnectKind {
    Garminconnect,
}

/// garth 0.8.0: the OAuth1 + OAuth2 token pair (form 1 in the README).
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(title = "garth pair")]
pub struct GarthPair {
    pub kind: GarthKind,
    pub oauth1_token: GarthOAuth1Token,
    pub oauth2_token: GarthOAuth2Token,
}

/// The string `garth.Client.dumps()` returns: base64 of the JSON array `[oauth1, oauth2]` (garth
/// 0.8) or `[oauth2]` (garth-ng) (forms 2 and 4 in the README).
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(title = "garth dump")]
pub struct GarthDump {
    pub kind: GarthKind,
    pub garth_dump: String,
}

/// python-garminconnect's DI token set. `exp` claims of JWTs give the expiry times. All three
/// keys are required; `di_refresh_token` and `di_client_id` may be null (no refresh possible:
/// `refresh_expires_at` is then the access token's expiry and `refreshable` is false) (form 3 in
/// the README).
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(title = "garminconnect DI tokens")]
pub struct GarminConnectDiTokens {
    pub kind: GarminConnectKind,
    pub di_token: String,
    pub di_refresh_token: Option<String>,
    pub di_client_id: Option<String>,
}

/// garth-ng's OAuth2 token (the fork keeps no OAuth1 token). Unknown fields are kept and returned
/// as given.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct GarthNgOAuth2Token {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: i64,
    /// Unix seconds, integer or float (truncated); becomes `access_expires_at`.
    pub expires_at: f64,
    pub refresh_token_expires_in: Option<i64>,
    /// Unix seconds, integer or float (truncated); becomes `refresh_expires_at`.
    pub refresh_token_expires_at: Option<f64>,
    pub token_type: Option<String>,
    pub scope: Option<String>,
    pub jti: Option<String>,
    pub client_id: Option<String>,
}

/// garth-ng 1.1.0: the OAuth2 token alone (form 4 in the README).
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(title = "garth-ng")]
pub struct GarthNg {
    pub kind: GarthKind,
    pub oauth2_token: GarthNgOAuth2Token,
}

/// The string python-garminconnect's `Client.dumps()` returns (JSON `{"di_token",
/// "di_refresh_token", "di_client_id"}`); kept and returned byte for byte (form 5 in the README).
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(title = "garminconnect dump")]
pub struct GarminConnectDump {
    pub kind: GarminConnectKind,
    pub garminconnect_dump: String,
}

/// A token bundle in one of the five forms the three libraries write: garth pair, garth dump,
/// garminconnect DI tokens, garth-ng, garminconnect dump. Exactly one form matches a body (unknown
/// top-level members are refused).
///
/// Documentation only: the handler parses the body itself, to name the field at fault.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)]
pub enum PutTokensRequest {
    GarthPair(GarthPair),
    GarthDump(GarthDump),
    GarminConnectDiTokens(GarminConnectDiTokens),
    GarthNg(GarthNg),
    GarminConnectDump(GarminConnectDump),
}

/// Metadata plus the secret fields exactly as stored (garth's two objects, garth-ng's
/// `oauth2_token` alone, or the three DI fields), or with `?representation=` the `garth_dump` /
/// `garminconnect_dump` string the writing library loads.
#[derive(Serialize, ToSchema)]
pub struct TokenBundleResponse {
    #[serde(flatten)]
    pub metadata: TokenMetadata,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub oauth1_token: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub oauth2_token: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub garth_dump: Option<String>,
    /// With `?representation=garminconnect_dump`: the string garminconnect's `Client.loads()`
    /// accepts (byte for byte the one written as `garminconnect_dump`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub garminconnect_dump: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub di_token: Option<Value>,
    /// Null when the login has no refresh token.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, nullable)]
    pub di_refresh_token: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, nullable)]
    pub di_client_id: Option<Value>,
}

#[derive(Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetTokensQuery {
    /// `garth_dump` returns the string `garth.Client.loads()` accepts (garth's two-element or
    /// garth-ng's one-element form, as written) instead of the objects (`objects`, the default);
    /// `garminconnect_dump` the string garminconnect's `Client.loads()` accepts.
    #[param(value_type = Option<Representation>, inline)]
    pub representation: Option<String>,
    /// Answer only once the stored version is greater than this (else 304 when the wait ends).
    pub newer_than: Option<i64>,
    /// How long to wait for a newer version, 0-30 seconds (default 0); only with `newer_than`.
    #[param(minimum = 0, maximum = 30)]
    pub wait_seconds: Option<u64>,
}

/// Documentation only: the values of `representation`.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "snake_case")]
pub enum Representation {
    Objects,
    GarthDump,
    GarminconnectDump,
}

#[derive(Deserialize, Serialize, ToSchema, Default)]
pub struct InvalidateRequest {
    /// Why the login is no longer usable (1-200 characters, no control characters); default
    /// `invalidated`.
    #[schema(min_length = 1, max_length = 200, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")]
    pub reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthStatusValue {
    Valid,
    Missing,
    Expired,
    MfaPending,
}

#[derive(Serialize, ToSchema)]
pub struct AuthStatus {
    pub user_id: String,
    /// `VALID` (usable; refresh if `tokens.status` is `access_expired`), `MFA_PENDING` (no
    /// usable tokens, and a login session waits for or has passed MFA), `MISSING`, `EXPIRED`
    /// (a new login is needed).
    pub status: AuthStatusValue,
    pub tokens: Option<TokenMetadata>,
    /// The user's newest active login session, when there is one.
    pub session: Option<crate::services::sessions::SessionView>,
}

// ---- helpers -----------------------------------------------------------------------------

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

fn with_etag(status: StatusCode, version: i64, body: impl Serialize) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    resp.headers_mut().insert(header::ETAG, etag(version));
    resp
}

/// `If-Match` / `If-None-Match` into a write condition.
fn write_condition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    let text = |name: header::HeaderName| -> Result<Option<String>, ApiError> {
        headers
            .get(&name)
            .map(|v| {
                v.to_str()
                    .map(|s| s.trim().to_string())
                    .map_err(|_| ApiError::field(name.as_str(), "must be visible ASCII"))
            })
            .transpose()
    };
    match (text(header::IF_MATCH)?, text(header::IF_NONE_MATCH)?) {
        (Some(_), Some(_)) => Err(ApiError::validation("send either If-Match or If-None-Match, not both")),
        (None, Some(v)) if v == "*" => Ok(Precondition::Absent),
        (None, Some(_)) => Err(ApiError::field("if-none-match", "only `If-None-Match: *` is supported on PUT")),
        (Some(v), None) if v == "*" => Ok(Precondition::Exists),
        (Some(v), None) => {
            let inner = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(&v);
            inner.parse::<i64>().ok().filter(|n| *n >= 1).map(Precondition::VersionIs).ok_or_else(|| {
                ApiError::field("if-match", "must be a version ETag such as \"3\" (weak ETags are not accepted)")
            })
        }
        (None, None) => Ok(Precondition::None),
    }
}

/// `If-Match` of invalidate and DELETE (they take no `If-None-Match`).
fn if_match_condition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    if headers.contains_key(header::IF_NONE_MATCH) {
        return Err(ApiError::field("if-none-match", "is not supported here (only If-Match)"));
    }
    write_condition(headers)
}

/// `X-Lease-Fence: <fence>`, when present.
pub fn lease_fence(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    headers
        .get("x-lease-fence")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|f| *f >= 1)
                .ok_or_else(|| ApiError::field("x-lease-fence", "must be a positive integer (the lease's fence)"))
        })
        .transpose()
}

// ---- handlers ----------------------------------------------------------------------------

/// Store or replace a token bundle
///
/// The bundle is encrypted at rest. Send one of the five forms (see the examples).
#[utoipa::path(
    put, path = "/users/{user_id}/tokens", tag = "tokens",
    params(
        ("user_id" = String, Path, description = "1-128 characters of [A-Za-z0-9._@:-]", min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._@:-]+$"),
        ("If-Match" = Option<String>, Header, pattern = r#"^(\*|"[1-9][0-9]{0,17}")$"#, description = "`\"<version>\"`: write only if the stored version is this; `*`: only if a bundle exists. Not together with If-None-Match"),
        ("If-None-Match" = Option<String>, Header, pattern = r"^\*$", description = "`*`: write only if no bundle is stored. Not together with If-Match"),
        ("X-Lease-Fence" = Option<i64>, Header, minimum = 1, description = "The fence of the caller's refresh lease: the write is accepted only while it is the live lease, and releases it"),
    ),
    request_body = PutTokensRequest,
    responses(
        (status = 201, description = "Created (no usable bundle was stored)", body = TokenMetadata, headers(("ETag" = String))),
        (status = 200, description = "Replaced", body = TokenMetadata, headers(("ETag" = String))),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`lease_held` (another holder's lease is live; with `holder`, `expires_at`, Retry-After) or `lease_lost` (the fence is not the live lease); nothing written", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`version_conflict` (with `current_version`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body exceeds CENTRALDB_BODY_LIMIT_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not `Content-Type: application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` naming the `field`", body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["tokens:write"]))
)]
async fn put_tokens(
    auth: Auth<TokensWrite>,
    UserPath(user): UserPath,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let cond = write_condition(&headers)?;
    let bundle = TokenBundle::from_body(body)
        .map_err(|e| ApiError::field(e.field.clone(), format!("{} {}", e.field, e.message)))?;
    let fence = lease_fence(&headers)?;
    let (meta, created) = state.vault.put(&auth.ctx, &user, bundle, cond, fence).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(with_etag(status, meta.version, meta))
}

/// Read a token bundle
///
/// Decrypted; with `newer_than` and `wait_seconds`, a long poll for the next version.
#[utoipa::path(
    get, path = "/users/{user_id}/tokens", tag = "tokens",
    params(
        ("user_id" = String, Path, description = "1-128 characters of [A-Za-z0-9._@:-]", min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._@:-]+$"),
        GetTokensQuery
    ),
    responses(
        (status = 200, description = "The bundle; `ETag` is its version", body = TokenBundleResponse, headers(("ETag" = String))),
        (status = 304, description = "`newer_than` given and no newer version appeared within `wait_seconds`; `ETag` is the stored version", headers(("ETag" = String))),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`tokens_not_found` (a wait ends at once, also when the bundle is deleted while it waits)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`reauth_required` (with `reason`; a wait ends at once, also when the bundle is invalidated while it waits)", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "stored data failed to decrypt (audited)", body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["tokens:read"]))
)]
async fn get_tokens(
    auth: Auth<TokensRead>,
    UserPath(user): UserPath,
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<GetTokensQuery>,
) -> Result<Response, ApiError> {
    let representation = match q.representation.as_deref() {
        None | Some("objects") => None,
        Some("garth_dump") => Some(BundleKind::Garth),
        Some("garminconnect_dump") => Some(BundleKind::GarminConnect),
        Some(_) => {
            return Err(ApiError::field("representation", "must be objects, garth_dump or garminconnect_dump"));
        }
    };
    if let Some(newer_than) = q.newer_than {
        let wait = q.wait_seconds.unwrap_or(0);
        if wait > MAX_WAIT_SECS {
            return Err(ApiError::field("wait_seconds", format!("must be between 0 and {MAX_WAIT_SECS}")));
        }
        let waited =
            state.notifier.wait_newer(&state.db, &user, newer_than, std::time::Duration::from_secs(wait)).await?;
        if let Waited::NotModified(stored) = waited {
            let mut resp = StatusCode::NOT_MODIFIED.into_response();
            resp.headers_mut().insert(header::ETAG, etag(stored));
            return Ok(resp);
        }
    } else if q.wait_seconds.is_some() {
        return Err(ApiError::field("wait_seconds", "only applies together with newer_than"));
    }
    let opened = state.vault.get(&auth.ctx, &user, representation).await?;
    let mut secrets: Map<String, Value> = opened.secrets;
    let mut body = TokenBundleResponse {
        metadata: opened.metadata,
        oauth1_token: None,
        oauth2_token: None,
        garth_dump: None,
        garminconnect_dump: None,
        di_token: None,
        di_refresh_token: None,
        di_client_id: None,
    };
    match representation {
        Some(BundleKind::Garth) => body.garth_dump = garth_dump(&secrets),
        Some(BundleKind::GarminConnect) => body.garminconnect_dump = garminconnect_dump(&secrets),
        None => {
            body.oauth1_token = secrets.remove("oauth1_token");
            body.oauth2_token = secrets.remove("oauth2_token");
            // The DI fields as stored (null when there is none).
            if secrets.contains_key("di_token") {
                body.di_token = secrets.remove("di_token");
                body.di_refresh_token = Some(secrets.remove("di_refresh_token").unwrap_or(Value::Null));
                body.di_client_id = Some(secrets.remove("di_client_id").unwrap_or(Value::Null));
            }
        }
    }
    let version = body.metadata.version;
    Ok(with_etag(StatusCode::OK, version, body))
}

/// Read a bundle's metadata
///
/// No decryption, no secret.
#[utoipa::path(
    get, path = "/users/{user_id}/tokens/metadata", tag = "tokens",
    params(
        ("user_id" = String, Path, description = "1-128 characters of [A-Za-z0-9._@:-]", min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._@:-]+$")
    ),
    responses(
        (status = 200, description = "The metadata; `ETag` is the version", body = TokenMetadata, headers(("ETag" = String))),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`tokens_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["tokens:read"]))
)]
async fn get_metadata(
    auth: Auth<TokensRead>,
    UserPath(user): UserPath,
    State(state): State<AppState>,
) -> Result<Response, ApiError> {
    let meta =
        state.vault.metadata(&auth.ctx, &user, "token.metadata_read").await?.ok_or_else(ApiError::tokens_not_found)?;
    Ok(with_etag(StatusCode::OK, meta.version, meta))
}

/// Invalidate a token bundle
///
/// Destroys the ciphertext; the user must log in again (`reauth_required` with the reason).
#[utoipa::path(
    post, path = "/users/{user_id}/tokens/invalidate", tag = "tokens",
    params(
        ("user_id" = String, Path, description = "1-128 characters of [A-Za-z0-9._@:-]", min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._@:-]+$"),
        ("If-Match" = Option<String>, Header, pattern = r#"^(\*|"[1-9][0-9]{0,17}")$"#, description = "`\"<version>\"`: invalidate only if the stored version is this; `*`: any stored bundle"),
        ("X-Lease-Fence" = Option<i64>, Header, minimum = 1, description = "The fence of the caller's refresh lease: required while a lease is live; the invalidation ends it"),
    ),
    request_body(content = Option<InvalidateRequest>, description = "Optional; an empty body means reason `invalidated`"),
    responses(
        (status = 204, description = "Invalidated"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`tokens_not_found` (whatever the preconditions)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`lease_held` (another holder's lease is live; with `holder`, `expires_at`, Retry-After) or `lease_lost` (the fence is not the live lease); nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`version_conflict` (with `current_version`); nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body exceeds CENTRALDB_BODY_LIMIT_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["tokens:write"]))
)]
async fn invalidate_tokens(
    auth: Auth<TokensWrite>,
    UserPath(user): UserPath,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let cond = if_match_condition(&headers)?;
    let fence = lease_fence(&headers)?;
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::validation("request body could not be read")
        }
    })?;
    // An empty body, or JSON `null`, means no reason given.
    let body: InvalidateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InvalidateRequest::default()
    } else {
        serde_json::from_slice::<Option<InvalidateRequest>>(&body).map(Option::unwrap_or_default).map_err(|_| {
            ApiError::validation("request body must be empty or a JSON object like {\"reason\": \"...\"}")
        })?
    };
    let reason = body.reason.unwrap_or_else(|| "invalidated".into());
    if reason.is_empty() || reason.chars().count() > 200 || reason.chars().any(char::is_control) {
        return Err(ApiError::field("reason", "must be 1-200 characters without control characters"));
    }
    state.vault.invalidate(&auth.ctx, &user, &reason, cond, fence).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Delete a token bundle (logout)
///
/// Removes the bundle (SQLite overwrites freed pages), cancels the user's login sessions and
/// challenges, and ends the lease. 204 also when nothing was stored (unless `If-Match` asked for
/// one).
#[utoipa::path(
    delete, path = "/users/{user_id}/tokens", tag = "tokens",
    params(
        ("user_id" = String, Path, description = "1-128 characters of [A-Za-z0-9._@:-]", min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._@:-]+$"),
        ("If-Match" = Option<String>, Header, pattern = r#"^(\*|"[1-9][0-9]{0,17}")$"#, description = "`\"<version>\"`: delete only if the stored version is this; `*`: only if a bundle is stored (else 412, also when nothing is stored)"),
        ("X-Lease-Fence" = Option<i64>, Header, minimum = 1, description = "The fence of the caller's refresh lease: required while a lease is live; the delete ends it"),
    ),
    responses(
        (status = 204, description = "Removed (or nothing was stored)"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`lease_held` (another holder's lease is live; with `holder`, `expires_at`, Retry-After) or `lease_lost` (the fence is not the live lease); nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`version_conflict` (with `current_version`, null when nothing is stored); nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["tokens:write"]))
)]
async fn delete_tokens(
    auth: Auth<TokensWrite>,
    UserPath(user): UserPath,
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let cond = if_match_condition(&headers)?;
    let fence = lease_fence(&headers)?;
    state.vault.delete(&auth.ctx, &user, cond, fence).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Read a user's login status
///
/// Whether the user has a usable login.
#[utoipa::path(
    get, path = "/users/{user_id}/auth-status", tag = "tokens",
    params(
        ("user_id" = String, Path, description = "1-128 characters of [A-Za-z0-9._@:-]", min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._@:-]+$")
    ),
    responses(
        (status = 200, description = "The status, the bundle's metadata and the current login session", body = AuthStatus),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["tokens:read"]))
)]
async fn auth_status(
    auth: Auth<TokensRead>,
    UserPath(user): UserPath,
    State(state): State<AppState>,
) -> Result<axum::Json<AuthStatus>, ApiError> {
    let meta = state.vault.metadata(&auth.ctx, &user, "auth_status.read").await?;
    let session = state.sessions.current(&user).await?;
    let in_mfa =
        session.as_ref().is_some_and(|s| matches!(s.state, SessionState::MfaRequired | SessionState::MfaVerified));
    let status = match meta.as_ref().map(|m| m.status) {
        Some(TokenStatus::Valid | TokenStatus::AccessExpired) => AuthStatusValue::Valid,
        _ if in_mfa => AuthStatusValue::MfaPending,
        None => AuthStatusValue::Missing,
        Some(TokenStatus::ReauthRequired) => AuthStatusValue::Expired,
    };
    Ok(axum::Json(AuthStatus { user_id: user.to_string(), status, tokens: meta, session }))
}
