//! The OpenAPI document of the routes: the route modules' routers merged, then completed in one
//! place (security scheme, wire names of the string enums, idempotency headers, response
//! descriptions, examples). `openapi.json` must equal [`openapi`]; the idempotency layer reads
//! the list of write operations from it.

use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};
use utoipa_axum::router::OpenApiRouter;

use super::{audit, examples, extract, leases, mfa, ops, sessions, tokens};
use crate::{api::error::Problem, state::AppState};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "centraldb-mfa",
        description = "Keeps GarminSync users' Garmin login credentials safe and usable: an encrypted \
                       token vault, MFA challenge tracking, login-flow sessions and a tamper-evident audit trail.",
        license(name = "MIT")
    ),
    components(schemas(Problem)),
    modifiers(&BearerAuth),
    tags(
        (name = "tokens", description = "Encrypted token bundles (garth, python-garminconnect)"),
        (name = "mfa", description = "MFA challenges, checked here (argon2id) or by Garmin"),
        (name = "sessions", description = "Login flows and their state machine"),
        (name = "audit", description = "The tamper-evident audit log: events and the HMAC chain check"),
        (name = "operations", description = "Health, readiness, metrics (no auth)"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "API key (`cdbm_...`). Scopes: tokens:read, tokens:write, mfa, sessions, audit:read, admin (implies all).",
                    ))
                    .build(),
            ),
        );
    }
}

/// The string enums of `domain::mfa` are declared by a macro whose per-variant
/// `#[serde(rename = ...)]` utoipa does not see, so it documents the Rust names (`MfaRequired`)
/// instead of the wire names (`mfa_required`). This puts the wire names in, each one checked
/// against the type's own parser (`tests/api/ops.rs` checks every value round-trips).
struct WireEnumNames;

impl Modify for WireEnumNames {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use crate::domain::mfa::{ChallengeStatus, Method, SessionState, Verifier};
        wire_enum(openapi, "SessionState", |s| SessionState::parse(s).map(SessionState::as_str));
        wire_enum(openapi, "ChallengeStatus", |s| ChallengeStatus::parse(s).map(ChallengeStatus::as_str));
        wire_enum(openapi, "Method", |s| Method::parse(s).map(Method::as_str));
        wire_enum(openapi, "Verifier", |s| Verifier::parse(s).map(Verifier::as_str));
    }
}

fn wire_enum(openapi: &mut utoipa::openapi::OpenApi, name: &str, wire: impl Fn(&str) -> Option<&'static str>) {
    use utoipa::openapi::{RefOr, Schema};
    let Some(components) = openapi.components.as_mut() else { return };
    let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(name) else { return };
    for value in object.enum_values.iter_mut().flatten() {
        let Some(rust_name) = value.as_str() else { continue };
        let mut snake = String::with_capacity(rust_name.len() + 4);
        for (i, c) in rust_name.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                snake.push('_');
            }
            snake.push(c.to_ascii_lowercase());
        }
        if let Some(w) = wire(&snake) {
            *value = serde_json::Value::from(w);
        }
    }
}

/// Every write operation takes `Idempotency-Key` (see `idempotency`), so the header and its
/// two answers (409 `idempotency_key_in_use`, 422 `idempotency_key_reused`) are documented on
/// all of them here, in one place, rather than on each handler.
struct IdempotencyDocs;

impl Modify for IdempotencyDocs {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{
            ContentBuilder, ObjectBuilder, Ref, RefOr, Required, ResponseBuilder, Type,
            path::{ParameterBuilder, ParameterIn},
        };
        const IN_USE: &str =
            "`idempotency_key_in_use` (with Retry-After): a request with this Idempotency-Key is still running";
        const REUSED: &str = "`idempotency_key_reused`: this Idempotency-Key was used for a different request";
        let parameter = ParameterBuilder::new()
            .name("Idempotency-Key")
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(
                "Makes a retry safe: the same key with the same request answers what the first answered (status, \
                 body, ETag) without acting again, with `Idempotent-Replayed: true`. Kept per API key for \
                 CENTRALDB_IDEMPOTENCY_TTL_SECS (default 24 h).",
            ))
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(255))
                    .pattern(Some("^[!-~]+$")),
            ))
            .build();
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten() {
                op.parameters.get_or_insert_with(Vec::new).push(RefOr::T(parameter.clone()));
                for (status, extra) in [("409", IN_USE), ("422", REUSED)] {
                    match op.responses.responses.get_mut(status) {
                        Some(RefOr::T(r)) if !r.description.is_empty() => {
                            r.description = format!("{}; or {extra}", r.description);
                        }
                        Some(RefOr::T(r)) => r.description = format!("`validation_failed`; or {extra}"),
                        _ => {
                            let response = ResponseBuilder::new()
                                .description(extra)
                                .content(
                                    "application/problem+json",
                                    ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build(),
                                )
                                .build();
                            op.responses.responses.insert(status.to_string(), RefOr::T(response));
                        }
                    }
                }
            }
        }
    }
}

/// OpenAPI requires a description on every response. The answers most operations share are
/// described here, once, by status; every other response is described on its handler
/// (`tests/api/ops.rs` checks that none is left without).
struct ResponseDescriptions;

impl Modify for ResponseDescriptions {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        for item in openapi.paths.paths.values_mut() {
            for op in
                [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
            {
                for (status, response) in op.responses.responses.iter_mut() {
                    let RefOr::T(response) = response else { continue };
                    if !response.description.is_empty() {
                        continue;
                    }
                    let shared = match status.as_str() {
                        "401" => {
                            "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key \
                             (with `WWW-Authenticate: Bearer`)"
                        }
                        "403" => "`forbidden`: the API key lacks the scope (with `required_scope`)",
                        "413" => "`payload_too_large`: the body exceeds CENTRALDB_BODY_LIMIT_BYTES",
                        "415" => "`unsupported_media_type`: the body is not `Content-Type: application/json`",
                        "422" => "`validation_failed` (with `field` when one is at fault)",
                        "503" => {
                            "`unavailable` (with Retry-After): the database is unreachable, or the request timed out"
                        }
                        _ => continue,
                    };
                    response.description = shared.to_string();
                }
            }
        }
    }
}

fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", tokens::router())
        .nest("/api/v1", leases::router())
        .nest("/api/v1", mfa::router())
        .nest("/api/v1", sessions::router())
        .nest("/api/v1", audit::router())
        .merge(ops::router())
}

/// The routes and their OpenAPI document, completed.
pub(super) fn parts() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut openapi) = routes().split_for_parts();
    // After the nested routers' schemas are merged in: a modifier on `ApiDoc` runs before.
    WireEnumNames.modify(&mut openapi);
    extract::RefusalBudgetResponses.modify(&mut openapi);
    ResponseDescriptions.modify(&mut openapi);
    IdempotencyDocs.modify(&mut openapi);
    examples::Examples.modify(&mut openapi);
    (router, openapi)
}

/// The OpenAPI document of the running code (what `openapi.json` must equal).
pub fn openapi() -> utoipa::openapi::OpenApi {
    parts().1
}
