//! The control API: HTTP + JSON on its own listener, for the console, the
//! bot and operators' scripts.
//!
//! Callers authenticate with the same tokens as database clients (a bearer
//! token: a service token or an OIDC ID token) and act in a role that
//! `[api]` grants by group: `viewer` (sessions, events, metrics), `approver`
//! (decide approvals, when they land) and `admin` (end sessions); each role
//! includes the ones before it. `/health` needs no token. Errors are JSON
//! objects with an `error` a person can act on.
//!
//! | method | path                          | role   |
//! |--------|-------------------------------|--------|
//! | GET    | `/health`                     | none   |
//! | GET    | `/metrics` (Prometheus text)  | viewer |
//! | GET    | `/v1/sessions`                | viewer |
//! | GET    | `/v1/sessions/past?limit=N`   | viewer |
//! | GET    | `/v1/sessions/{id}/timeline`  | viewer |
//! | POST   | `/v1/sessions/{id}/kill`      | admin  |
//! | GET    | `/v1/events?since=ID|tail=N` | viewer |
//! | GET    | `/v1/lineage?relation=&tag=&identity=` (30 days) | viewer |
//! | GET    | `/v1/approvals`               | viewer |
//! | GET    | `/v1/approvals/{id}`          | viewer, or its requester |
//! | POST   | `/v1/approvals/{id}/approve`  | approver |
//! | POST   | `/v1/approvals/{id}/deny`     | approver |
//! | POST   | `/v1/access-requests`         | any identity the policy lets ask |
//! | GET    | `/v1/grants`                  | viewer: all; others: their own |
//! | POST   | `/v1/grants/{request}/revoke` | approver, or the grant's holder |

pub mod client;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::approvals::Channel;
use crate::audit::{EventFilter, SessionSummary, SqliteStore, StoredEvent};
use crate::config::ApiRole;
use crate::identity::Identity;
use crate::session::Shared;

/// An API error: a status and a message for a person.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

/// The JSON body of every error.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { error: self.message })).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Serves the API on `listener` until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let app = router(shared);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(err) = result {
        tracing::error!(error = %err, "the control API stopped");
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/sessions", get(sessions))
        .route("/v1/sessions/past", get(past_sessions))
        .route("/v1/sessions/{id}/timeline", get(timeline))
        .route("/v1/sessions/{id}/kill", post(kill))
        .route("/v1/events", get(events))
        .route("/v1/lineage", get(lineage))
        .route("/v1/approvals", get(approvals))
        .route("/v1/approvals/{id}", get(approval))
        .route("/v1/approvals/{id}/approve", post(approve))
        .route("/v1/approvals/{id}/deny", post(deny))
        .route("/v1/access-requests", post(request_access))
        .route("/v1/grants", get(grants))
        .route("/v1/grants/{request}/revoke", post(revoke))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint; see /health and /v1/sessions") })
        .with_state(shared)
}

/// The caller's identity, checked against the role the endpoint needs.
async fn caller(shared: &Shared, headers: &HeaderMap, needs: ApiRole) -> ApiResult<Identity> {
    let identity = authenticated(shared, headers).await?;
    let role = shared.config.api.role_of(identity.groups());
    // A chat bot reads what viewers read: it follows requests to post them.
    let bot_reads = needs == ApiRole::Viewer && delegate_of(shared, &identity).is_some();
    if role < Some(needs) && !bot_reads {
        return Err(forbidden(shared, &identity, needs));
    }
    Ok(identity)
}

fn forbidden(shared: &Shared, identity: &Identity, needs: ApiRole) -> ApiError {
    let role = shared.config.api.role_of(identity.groups());
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "{} may not do this: it needs the {} role ({}), and {} has {}",
            identity.name(),
            needs.name(),
            shared.config.api.who_has(needs),
            identity.name(),
            role.map_or("no role".to_string(), |r| format!("the {} role", r.name()))
        ),
    )
}

/// The caller's verified identity, whatever its role.
async fn authenticated(shared: &Shared, headers: &HeaderMap) -> ApiResult<Identity> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "no token: send Authorization: Bearer <your Sluice token>",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the Authorization header must be \"Bearer <token>\"",
            )
        })?;
    shared
        .verifier
        .verify(token)
        .await
        .map_err(|err| ApiError::new(StatusCode::UNAUTHORIZED, format!("token refused: {err}")))
}

fn is_viewer(shared: &Shared, identity: &Identity) -> bool {
    shared.config.api.role_of(identity.groups()) >= Some(ApiRole::Viewer) || delegate_of(shared, identity).is_some()
}

/// `/health`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    /// "ok", or "degraded" when the audit trail cannot be written.
    pub status: String,
    pub sessions: usize,
    pub audit: Option<AuditHealth>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AuditHealth {
    pub available: bool,
    pub error: Option<String>,
    pub written: u64,
    pub queued: u64,
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let audit = shared.auditor.as_ref().map(|a| {
        let h = a.health();
        AuditHealth {
            available: h.available,
            error: h.error,
            written: h.written,
            queued: h.queued,
        }
    });
    let degraded = audit.as_ref().is_some_and(|a| !a.available);
    let body = Health {
        status: if degraded { "degraded" } else { "ok" }.into(),
        sessions: shared.live.len(),
        audit,
    };
    let status = if degraded {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> ApiResult<Response> {
    caller(&shared, &headers, ApiRole::Viewer).await?;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    };
    let live = shared.live.list();
    metric(
        "sluice_sessions_open",
        "gauge",
        "Sessions running now.",
        live.len() as u64,
    );
    metric(
        "sluice_sessions_running",
        "gauge",
        "Sessions with a statement in progress.",
        live.iter()
            .filter(|s| s.state == crate::live::SessionState::Running)
            .count() as u64,
    );
    if let Some(auditor) = &shared.auditor {
        let h = auditor.health();
        metric(
            "sluice_audit_available",
            "gauge",
            "1 while the audit trail can be written.",
            u64::from(h.available),
        );
        metric(
            "sluice_audit_events_written_total",
            "counter",
            "Events written to the audit trail since start.",
            h.written,
        );
        metric(
            "sluice_audit_queue_depth",
            "gauge",
            "Events waiting to be written.",
            h.queued,
        );
    }
    metric(
        "sluice_approvals_pending",
        "gauge",
        "Approval requests waiting for a decision.",
        shared
            .approvals
            .list()
            .iter()
            .filter(|r| r.state == crate::approvals::RequestState::Pending)
            .count() as u64,
    );
    metric(
        "sluice_access_grants_active",
        "gauge",
        "Grants from approved access requests that hold now.",
        shared.approvals.grants().len() as u64,
    );
    shared.metrics.write(&mut out);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

async fn sessions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<crate::live::LiveSummary>>> {
    caller(&shared, &headers, ApiRole::Viewer).await?;
    Ok(Json(shared.live.list()))
}

#[derive(Debug, Deserialize)]
struct Limit {
    limit: Option<u64>,
}

/// Reads the trail on a blocking thread with its own read-only connection.
async fn read_trail<T: Send + 'static>(
    shared: &Shared,
    read: impl FnOnce(&SqliteStore) -> Result<T, crate::audit::AuditError> + Send + 'static,
) -> ApiResult<T> {
    let Some(auditor) = &shared.auditor else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "auditing is off on this gateway ([audit] enabled = false): there is no trail to read",
        ));
    };
    // The writer moves journaled events into SQLite a few milliseconds
    // after they happen: a reader sees everything recorded before its
    // request.
    auditor.flush().await;
    let path = shared.config.audit.path.clone();
    tokio::task::spawn_blocking(move || {
        let store = SqliteStore::open_read_only(&path)?;
        read(&store)
    })
    .await
    .map_err(|err| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the trail failed: {err}"),
        )
    })?
    .map_err(|err| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the trail failed: {err}"),
        )
    })
}

async fn past_sessions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<Limit>,
) -> ApiResult<Json<Vec<SessionSummary>>> {
    caller(&shared, &headers, ApiRole::Viewer).await?;
    let limit = query.limit.unwrap_or(100).min(10_000);
    Ok(Json(read_trail(&shared, move |store| store.sessions(limit)).await?))
}

async fn timeline(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<StoredEvent>>> {
    caller(&shared, &headers, ApiRole::Viewer).await?;
    let session = id.clone();
    let events = read_trail(&shared, move |store| {
        store.events(&EventFilter {
            session: Some(session),
            ..EventFilter::default()
        })
    })
    .await?;
    if events.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no session {id:?} in the trail (see /v1/sessions/past)"),
        ));
    }
    Ok(Json(events))
}

/// What a kill answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Killed {
    pub session: String,
    pub by: String,
}

async fn kill(State(shared): State<Arc<Shared>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Response> {
    let admin = caller(&shared, &headers, ApiRole::Admin).await?;
    if !shared.live.kill(&id, admin.name()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no running session {id:?} (see /v1/sessions)"),
        ));
    }
    tracing::info!(session = %id, by = %admin.name(), "session kill requested");
    Ok((
        StatusCode::ACCEPTED,
        Json(Killed {
            session: id,
            by: admin.name().to_string(),
        }),
    )
        .into_response())
}

/// How far back `/v1/lineage` looks (the CLI reads the whole trail).
const LINEAGE_DAYS: i64 = 30;

async fn lineage(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<crate::audit::LineageQuery>,
) -> ApiResult<Json<Vec<crate::audit::LineageRow>>> {
    caller(&shared, &headers, ApiRole::Viewer).await?;
    if query.relation.is_none() && query.tag.is_none() && query.identity.is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "say what to trace: ?relation=customers, ?tag=pii or ?identity=alice (or several)",
        ));
    }
    // The last 30 days: the whole trail could be too much to read at once.
    let since = (chrono::Utc::now() - chrono::Duration::days(LINEAGE_DAYS))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let rows = read_trail(&shared, move |store| {
        let events = store.events(&EventFilter {
            since: Some(since),
            ..EventFilter::default()
        })?;
        Ok(crate::audit::lineage(&events, &query))
    })
    .await?;
    Ok(Json(rows))
}

async fn approvals(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<crate::approvals::RequestView>>> {
    caller(&shared, &headers, ApiRole::Viewer).await?;
    Ok(Json(shared.approvals.list()))
}

async fn approval(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult<Json<crate::approvals::RequestView>> {
    let identity = authenticated(&shared, &headers).await?;
    if !is_viewer(&shared, &identity) && !shared.approvals.is_requester(id, &identity) {
        return Err(forbidden(&shared, &identity, ApiRole::Viewer));
    }
    shared.approvals.get(id).map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no approval request {id} (recent and pending ones are at /v1/approvals)"),
        )
    })
}

/// The body of a decision (optional for an approval).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DecisionBody {
    #[serde(default)]
    pub reason: Option<String>,
    /// Where the approver decided: "api" (the default) or "console"; for a
    /// chat bot, "slack" or "discord".
    #[serde(default)]
    pub via: Option<String>,
    /// Chat bots only (`[[api.delegates]]`): the person the bot decides for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
    /// Chat bots only: the chat user who clicked, for the trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_user: Option<String>,
}

async fn decide(
    shared: Arc<Shared>,
    headers: HeaderMap,
    id: u64,
    body: &[u8],
    approve: bool,
) -> ApiResult<Json<crate::approvals::RequestView>> {
    let caller = authenticated(&shared, &headers).await?;
    let body = decision_body(body)?;
    let delegated;
    let (approver, channel) = match delegate_of(&shared, &caller) {
        Some(bot) => {
            delegated = on_behalf(bot, &body)?;
            let channel = Channel {
                via: body.via.as_deref().unwrap_or_default(),
                delegate: Some(bot.identity.as_str()),
                chat_user: body.chat_user.as_deref(),
            };
            (&delegated, channel)
        }
        None => {
            if shared.config.api.role_of(caller.groups()) < Some(ApiRole::Approver) {
                return Err(forbidden(&shared, &caller, ApiRole::Approver));
            }
            if body.on_behalf_of.is_some() || body.chat_user.is_some() {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "{} decides as itself: only a chat bot listed in [[api.delegates]] decides on behalf of someone",
                        caller.name()
                    ),
                ));
            }
            let via = body.via.as_deref().unwrap_or("api");
            if !matches!(via, "api" | "console") {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("via = {via:?}: write \"api\" or \"console\" (chat decisions come through the bot)"),
                ));
            }
            (&caller, Channel::direct(via))
        }
    };
    use crate::approvals::DecideError;
    shared
        .approvals
        .decide_via(id, approver, approve, body.reason.clone(), channel)
        .map(Json)
        .map_err(|err| {
            let status = match err {
                DecideError::NotFound(_) => StatusCode::NOT_FOUND,
                DecideError::Forbidden(_) => StatusCode::FORBIDDEN,
                DecideError::NotPending { .. } => StatusCode::CONFLICT,
            };
            ApiError::new(status, err.to_string())
        })
}

/// The `[[api.delegates]]` entry of a chat bot's machine identity. Only a
/// service token or an OIDC service (client credentials) can be one: a
/// person whose email or subject happens to equal the name is not the bot.
fn delegate_of<'a>(shared: &'a Shared, identity: &Identity) -> Option<&'a crate::config::Delegate> {
    match identity.source() {
        crate::identity::IdentitySource::StaticToken | crate::identity::IdentitySource::OidcService { .. } => {
            shared.config.api.delegate(identity.name())
        }
        _ => None,
    }
}

/// The person a chat bot decides for, as `[[api.delegates]]` knows them.
fn on_behalf(bot: &crate::config::Delegate, body: &DecisionBody) -> ApiResult<Identity> {
    let name = &bot.identity;
    let Some(person) = body.on_behalf_of.as_deref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{name} is a chat bot: it decides only on behalf of a person (on_behalf_of), never as itself"),
        ));
    };
    let via = body.via.as_deref().unwrap_or_default();
    if !bot.via.iter().any(|v| v == via) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{name} decides through {}, not {via:?}", bot.via.join(" and ")),
        ));
    }
    let Some((person, groups)) = bot.person(person) else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{name} may not decide on behalf of {person:?}: the gateway's [[api.delegates]] entry for it does not list them"
            ),
        ));
    };
    match body.chat_user.as_deref() {
        Some(user)
            if !user.is_empty()
                && user.len() <= 64
                && user.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {}
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "a chat bot's decision names the chat user who clicked (chat_user: their Slack or Discord user id)",
            ));
        }
    }
    Ok(Identity::delegated(person, groups, name))
}

async fn approve(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    body: axum::body::Bytes,
) -> ApiResult<Json<crate::approvals::RequestView>> {
    decide(shared, headers, id, &body, true).await
}

async fn deny(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    body: axum::body::Bytes,
) -> ApiResult<Json<crate::approvals::RequestView>> {
    decide(shared, headers, id, &body, false).await
}

/// The body of `POST /v1/access-requests`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AccessRequestBody {
    pub target: String,
    /// The grant's name in the policy.
    pub grant: String,
    /// How long it should hold once approved: "30m", "2h", "900" (seconds).
    pub duration: String,
    /// Why: recorded, and shown to approvers.
    pub reason: String,
}

/// Asks for a time-bound grant. Answers 201 with the new request, or 200
/// with the caller's pending request for the same grant and target.
async fn request_access(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<crate::approvals::RequestView>)> {
    let requester = authenticated(&shared, &headers).await?;
    let body: AccessRequestBody = serde_json::from_slice(&body).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the body must be JSON like {{\"target\": \"shop\", \"grant\": \"writer\", \"duration\": \"30m\", \"reason\": \"...\"}}: {err}"
            ),
        )
    })?;
    let reason = body.reason.trim();
    check_reason(reason)?;
    if reason.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "say why you need it: the reason is recorded and shown to the approvers",
        ));
    }
    let duration = crate::config::parse_duration(&body.duration)
        .map_err(|err| ApiError::new(StatusCode::BAD_REQUEST, format!("duration: {err}")))?;
    let ask = shared
        .gate
        .requestable_grant(&requester, &body.target, &body.grant)
        .map_err(|err| match err {
            crate::gate::GrantRefusal::Unknown(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            crate::gate::GrantRefusal::Forbidden(m) => ApiError::new(StatusCode::FORBIDDEN, m),
        })?;
    if duration < Duration::from_secs(1) || duration > ask.max_duration {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "grant \"{}\" may be asked for from 1s up to {}; ask for less",
                body.grant,
                crate::config::human_duration(ask.max_duration)
            ),
        ));
    }
    if let Some(pending) = shared.approvals.pending_access(&requester, &body.grant, &body.target) {
        return Ok((StatusCode::OK, Json(pending)));
    }
    if let Some(message) = shared.approvals.too_many_pending(&requester) {
        return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, message));
    }
    let (view, _answer) = shared.approvals.open(crate::approvals::NewRequest {
        requester,
        target: body.target.clone(),
        session: String::new(),
        statement: String::new(),
        rule: body.grant.clone(),
        reason: Some(reason.to_string()),
        approvers: ask.approvers,
        needed: ask.approvals,
        timeout: ask.timeout,
        retry: None,
        access: Some(crate::audit::AccessAsk {
            grant: body.grant,
            seconds: duration.as_secs(),
        }),
        statements: Vec::new(),
        approve_via: ask.approve_via,
    });
    tracing::info!(request = view.id, grant = %view.rule, identity = %view.requester, target = %view.target, "access requested");
    Ok((StatusCode::CREATED, Json(view)))
}

/// Grants from approved access requests that hold now.
async fn grants(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<crate::approvals::GrantView>>> {
    let identity = authenticated(&shared, &headers).await?;
    let mut grants = shared.approvals.grants();
    if !is_viewer(&shared, &identity) {
        grants.retain(|g| g.subject == identity.subject());
    }
    Ok(Json(grants))
}

/// A decision's optional JSON body (`{"reason": "..."}`).
fn decision_body(body: &[u8]) -> ApiResult<DecisionBody> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DecisionBody::default());
    }
    let body: DecisionBody = serde_json::from_slice(body).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body must be JSON like {{\"reason\": \"...\"}}: {err}"),
        )
    })?;
    if let Some(reason) = &body.reason {
        check_reason(reason)?;
    }
    Ok(body)
}

/// The longest reason a decision or request may give.
const MAX_REASON: usize = 1000;

/// A reason is shown to people (in the requester's client, the console, the
/// trail): no control characters or direction overrides, which could make
/// it show something else, and a length a person reads.
fn check_reason(reason: &str) -> ApiResult<()> {
    if reason.chars().count() > MAX_REASON {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the reason is longer than {MAX_REASON} characters: say it shorter"),
        ));
    }
    if let Some(c) = reason.chars().find(|c| crate::text::is_invisible(*c)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the reason holds an invisible character (U+{:04X}): write it as plain text on one line",
                c as u32
            ),
        ));
    }
    Ok(())
}

/// Ends a grant before its time: its holder, or an approver or admin.
async fn revoke(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(request): Path<u64>,
    body: axum::body::Bytes,
) -> ApiResult<Json<crate::approvals::GrantView>> {
    let identity = authenticated(&shared, &headers).await?;
    let not_held = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no grant from access request {request} holds now (see /v1/grants)"),
        )
    };
    let grant = shared.approvals.grant(request).ok_or_else(not_held)?;
    let approver = shared.config.api.role_of(identity.groups()) >= Some(ApiRole::Approver);
    if !approver && grant.subject != identity.subject() {
        return Err(forbidden(&shared, &identity, ApiRole::Approver));
    }
    let body = decision_body(&body)?;
    shared
        .approvals
        .revoke(request, &identity, body.reason.as_deref())
        .map(Json)
        .ok_or_else(not_held)
}

#[derive(Debug, Deserialize)]
struct Since {
    since: Option<u64>,
    /// Without `since`: start this many events before the newest, rather
    /// than at the trail's beginning (what a console opening wants).
    tail: Option<u64>,
}

/// Events as they are written: first those after `since` from the trail,
/// then live ones. Each SSE message has the event's id as its `id`, so a
/// client that reconnects with `since` = the last id misses nothing. A
/// client too slow for the live stream gets an `error` message and is
/// disconnected, and reconnects with `since`.
async fn events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<Since>,
) -> ApiResult<Sse<impl futures_core::Stream<Item = Result<SseEvent, Infallible>>>> {
    caller(&shared, &headers, ApiRole::Viewer).await?;
    let Some(auditor) = shared.auditor.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "auditing is off on this gateway: there is no event stream",
        ));
    };
    // Subscribe before reading the backlog, so nothing falls in between.
    let mut live = auditor.subscribe();
    let since = match (query.since, query.tail) {
        (Some(since), _) => {
            // A cursor past the end belongs to another trail (this one was
            // replaced or reset): following it would show nothing, ever.
            let last = read_trail(&shared, |store| store.last_id()).await?;
            if since > last {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "since={since} is past this trail's newest event ({last}): the trail was replaced or reset; \
                         start again with tail=N or since=0"
                    ),
                ));
            }
            since
        }
        (None, Some(tail)) => read_trail(&shared, |store| store.last_id()).await?.saturating_sub(tail),
        (None, None) => 0,
    };
    let stopping = shared.api_stopping.clone();
    let stream = async_stream(move |tx| async move {
        // The backlog in pages, so that a client starting from 0 on a large
        // trail does not make the gateway read it all at once.
        const PAGE: u64 = 1000;
        let mut last = since;
        loop {
            let after = last;
            let page = read_trail(&shared, move |store| {
                store.rows(&EventFilter {
                    after_id: Some(after),
                    limit: Some(PAGE),
                    ..EventFilter::default()
                })
            })
            .await;
            let page = match page {
                Ok(page) => page,
                Err(err) => {
                    let _ = tx.send(SseEvent::default().event("error").data(err.message)).await;
                    return;
                }
            };
            let full = page.len() as u64 == PAGE;
            for stored in page {
                last = stored.id;
                if tx.send(sse(&stored)).await.is_err() {
                    return;
                }
            }
            if !full {
                break;
            }
        }
        loop {
            let received = tokio::select! {
                received = live.recv() => received,
                _ = stopping.cancelled() => return,
            };
            match received {
                Ok(stored) if stored.id <= last => continue,
                Ok(stored) => {
                    last = stored.id;
                    if tx.send(sse(&stored)).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    let message =
                        format!("this client fell {missed} events behind the live stream; reconnect with since={last}");
                    let _ = tx.send(SseEvent::default().event("error").data(message)).await;
                    return;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn sse(stored: &StoredEvent) -> SseEvent {
    SseEvent::default()
        .id(stored.id.to_string())
        .event(stored.event.detail.kind())
        .data(serde_json::to_string(stored).unwrap_or_default())
}

/// A stream fed by a task through a small channel: the task ends when the
/// client goes away (its sends fail).
fn async_stream<F, Fut>(produce: F) -> impl futures_core::Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    ReceiverStream(rx)
}

struct ReceiverStream(tokio::sync::mpsc::Receiver<SseEvent>);

impl futures_core::Stream for ReceiverStream {
    type Item = Result<SseEvent, Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|event| event.map(Ok))
    }
}
