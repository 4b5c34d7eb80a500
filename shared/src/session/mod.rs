//! One client connection from accept to close.
//!
//! The states, in order:
//!
//! 1. **Negotiating** (`startup::negotiate`): SSLRequest (TLS handshake),
//!    GSSENCRequest (declined), CancelRequest (forwarded, connection done),
//!    StartupMessage (parameters screened).
//! 2. **Authenticating** (`startup::authenticate`): the token arrives as the
//!    password and becomes an [`Identity`]; the target named by the client's
//!    database is looked up and the identity mapped to an upstream role.
//! 3. **Connecting upstream** (`crate::upstream`): login as that role; the
//!    client then gets AuthenticationOk, the server's parameter statuses, its
//!    real process id with the gateway's cancel key, and ReadyForQuery.
//! 4. **Proxying** (`proxy`): until either side ends or the gateway shuts down.
//!
//! Steps 1 and 2 must finish within `server.auth_timeout`. Every failure before
//! step 4 ends with a FATAL ErrorResponse that says what was wrong.

mod executes;
mod guard;
mod pending;
mod proxy;
mod remembered;
mod results;
mod startup;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, field};

use crate::cancel::CancelRegistry;
use crate::config::{AccessRule, Config};
use crate::conn::Connection;
use crate::gate::StatementGate;
use crate::identity::{Identity, Verifier};
use crate::net::Stream;
use crate::protocol::TxStatus;
use crate::protocol::backend::{ErrorFields, Severity};
use crate::shutdown::{Shutdown, ShutdownListener};
use crate::tls::UpstreamTlsConnector;
use crate::upstream::{self, Login};

pub use pending::{Expect, PendingQueue};
use startup::{Failure, Opening};

/// What every session of one gateway shares.
pub(crate) struct Shared {
    pub config: Config,
    pub verifier: Verifier,
    pub gate: Arc<dyn StatementGate>,
    pub tls: Option<TlsAcceptor>,
    /// Per target name: its TLS connector, `None` for `tls = "disable"`.
    pub upstream_tls: HashMap<String, Option<UpstreamTlsConnector>>,
    pub cancels: Arc<CancelRegistry>,
    /// Tells sessions when the gateway drains and when its grace period ends.
    pub shutdown: Arc<Shutdown>,
    /// Per target: the masking rules' catalog snapshot, read by the first
    /// session after it expires (`masking.catalog_ttl`).
    pub catalogs: std::sync::Mutex<HashMap<String, Arc<crate::mask::catalog::Catalog>>>,
    /// The audit trail; `None` when auditing is off.
    pub auditor: Option<crate::audit::Auditor>,
    /// The sessions running now.
    pub live: crate::live::LiveSessions,
    /// Sessions per identity (`server.max_sessions_per_identity`).
    pub identity_slots: crate::live::IdentitySlots,
    /// Statements held for approval.
    pub approvals: crate::approvals::Approvals,
    /// Counters for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// Cancelled when the control API stops (its event streams end).
    pub api_stopping: tokio_util::sync::CancellationToken,
}

/// A new session id: time-ordered, so ids sort by start.
fn session_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Serves one accepted connection. Without a `permit` the gateway is at its
/// connection limit: the client is told so once it has said hello.
pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, permit: Option<OwnedSemaphorePermit>) {
    let id = session_id();
    let span = tracing::info_span!(
        "session",
        id = %id,
        peer = %peer,
        client_user = field::Empty,
        identity = field::Empty,
        target = field::Empty,
    );
    async move {
        let admitted = permit.is_some();
        let _permit = permit;
        let started = Instant::now();
        let mut shutdown = shared.shutdown.listener();
        let conn = Connection::new(Stream::Tcp(tcp));
        let opening = tokio::select! {
            opening = tokio::time::timeout(shared.config.server.auth_timeout, open(&shared, &id, conn, peer, admitted)) => opening,
            _ = shutdown.stopping() => {
                tracing::debug!("gateway shutting down during startup");
                return;
            }
        };
        let (conn, identity, params) = match opening {
            Err(_) => {
                tracing::warn!(after = ?shared.config.server.auth_timeout, "authentication timed out");
                let who = Who::new(&id, peer);
                who.record_refusal(&shared, "08006", "authentication timed out");
                return;
            }
            Ok(Err(())) | Ok(Ok(None)) => return,
            Ok(Ok(Some(session))) => session,
        };
        run_session(&shared, &id, peer, conn, identity, params, started, &mut shutdown).await;
    }
    .instrument(span)
    .await
}

/// Who a session is, as far as it got: what its audit events name.
struct Who<'a> {
    session: &'a str,
    peer: SocketAddr,
    user: &'a str,
    identity: Option<&'a str>,
    target: Option<&'a str>,
}

impl<'a> Who<'a> {
    fn new(session: &'a str, peer: SocketAddr) -> Who<'a> {
        Who {
            session,
            peer,
            user: "",
            identity: None,
            target: None,
        }
    }

    fn event(&self, detail: crate::audit::Detail) -> crate::audit::Event {
        let mut event = crate::audit::Event::now(detail).in_session(self.session);
        event.identity = self.identity.map(str::to_string);
        event.target = self.target.map(str::to_string);
        event
    }

    /// Records a refused login or session start.
    fn record_refusal(&self, shared: &Shared, code: &str, reason: &str) {
        if let Some(auditor) = &shared.auditor {
            auditor.record(self.event(crate::audit::Detail::SessionRefused {
                client: self.peer.to_string(),
                user: self.user.to_string(),
                code: code.to_string(),
                reason: reason.to_string(),
            }));
        }
    }
}

/// Steps 1 and 2. `Ok(None)` when the connection was a cancel request.
async fn open(
    shared: &Shared,
    id: &str,
    conn: Connection,
    peer: SocketAddr,
    admitted: bool,
) -> Result<Option<(Connection, Identity, startup::StartupParams)>, ()> {
    let mut who = Who::new(id, peer);
    let (mut conn, params) = match startup::negotiate(conn, shared).await {
        Ok(Opening::Cancel { process_id, secret_key }) => {
            forward_cancel(shared, process_id, secret_key).await;
            return Ok(None);
        }
        Ok(Opening::Session { conn, params }) => {
            tracing::Span::current().record("client_user", params.user.as_str());
            (conn, params)
        }
        Err((failure, conn)) => {
            report(shared, &who, failure, conn).await;
            return Err(());
        }
    };
    who.user = &params.user;
    if !admitted {
        let limit = shared.config.server.max_connections;
        tracing::warn!(limit, "connection refused: at the connection limit");
        let error = ErrorFields::new(
            Severity::Fatal,
            "53300",
            format!("too many connections: the gateway serves at most {limit} sessions"),
        );
        report(shared, &who, Failure::Refuse(error), Some(conn)).await;
        return Err(());
    }
    match startup::authenticate(&mut conn, shared, peer).await {
        Ok(identity) => {
            let identity = identity.with_application_name(params.application_name.as_deref());
            Ok(Some((conn, identity, params)))
        }
        Err(failure) => {
            report(shared, &who, failure, Some(conn)).await;
            Err(())
        }
    }
}

/// Sends a startup failure to the client (if it is still there), records
/// it, and closes.
async fn report(shared: &Shared, who: &Who<'_>, failure: Failure, conn: Option<Connection>) {
    match failure {
        Failure::Gone(reason) => tracing::debug!(%reason, "client left during startup"),
        Failure::Refuse(error) => {
            tracing::info!(code = error.code, reason = %error.message, "session refused");
            who.record_refusal(shared, error.code, &error.message);
            if let Some(mut conn) = conn {
                let mut out = BytesMut::new();
                error.encode(&mut out);
                let _ = conn.send(&out).await;
                conn.close().await;
            }
        }
    }
}

/// The access rule that maps this identity on the target, first match wins.
fn access_rule<'c>(rules: &'c [AccessRule], identity: &Identity) -> Option<&'c AccessRule> {
    rules.iter().find(|rule| {
        rule.identities.iter().any(|name| identity.matches_name(name))
            || rule.groups.iter().any(|group| group == "*" || identity.in_group(group))
    })
}

/// Steps 3 and 4.
#[allow(clippy::too_many_arguments)]
async fn run_session(
    shared: &Shared,
    id: &str,
    peer: SocketAddr,
    mut conn: Connection,
    identity: Identity,
    params: startup::StartupParams,
    started: Instant,
    shutdown: &mut ShutdownListener,
) {
    let span = tracing::Span::current();
    span.record("identity", identity.name());
    span.record("target", params.target.as_str());

    let who = Who {
        session: id,
        peer,
        user: &params.user,
        identity: Some(identity.name()),
        target: Some(&params.target),
    };
    let refuse = |code: &'static str, message: String| ErrorFields::new(Severity::Fatal, code, message);
    let Some(target) = shared.config.target(&params.target) else {
        let error = refuse("3D000", format!("target \"{}\" does not exist", params.target))
            .with_hint("the database name you connect to selects a Sluice target");
        return report(shared, &who, Failure::Refuse(error), Some(conn)).await;
    };
    if let Some(auditor) = &shared.auditor
        && !auditor.available()
        && shared.config.audit.on_failure == crate::config::OnAuditFailure::Refuse
    {
        auditor.refused_while_unavailable();
        let error = refuse(
            "58000",
            "the gateway's audit trail cannot record sessions right now, and this gateway runs nothing it cannot record"
                .into(),
        )
        .with_hint("try again shortly; the gateway's log says why the trail cannot be written");
        return report(shared, &who, Failure::Refuse(error), Some(conn)).await;
    }
    let Some(rule) = access_rule(&target.access, &identity) else {
        let error = refuse(
            "28000",
            format!("{} may not use target \"{}\"", identity.name(), target.name),
        )
        .with_hint("ask an administrator for access (a [[targets.access]] entry for you or your group)");
        return report(shared, &who, Failure::Refuse(error), Some(conn)).await;
    };
    // Before the upstream connection opens: each session holds one, and
    // one identity must not take all the target has.
    let limit = shared.config.server.max_sessions_per_identity;
    let Some(_slot) = shared.identity_slots.take(identity.name(), limit) else {
        let error = refuse(
            "53300",
            format!(
                "{} has {limit} sessions through the gateway already, the most one identity may have",
                identity.name()
            ),
        )
        .with_hint("close one of them, or ask the gateway's operator (server.max_sessions_per_identity)");
        return report(shared, &who, Failure::Refuse(error), Some(conn)).await;
    };
    let tls = shared.upstream_tls.get(&target.name).and_then(Option::as_ref);
    let login = Login {
        target,
        tls,
        role: &rule.role,
        password: rule.password.as_ref(),
        params: &params.forward,
    };
    let upstream = match upstream::connect(login).await {
        Ok(upstream) => upstream,
        Err(err) => {
            // The details are for the operator; the client learns that the
            // target is unavailable, never the upstream credentials or role.
            tracing::error!(error = %err, role = %rule.role, "cannot open upstream session");
            let error = refuse(
                "08001",
                format!("the gateway could not connect to target \"{}\"", target.name),
            )
            .with_hint("the gateway's log has the details; try again or contact its operator");
            return report(shared, &who, Failure::Refuse(error), Some(conn)).await;
        }
    };

    let mut upstream = upstream;
    let unmask_grant = shared.gate.unmask_grant(&identity, &target.name);
    let Ok(catalog) = target_catalog(shared, &target.name, &mut upstream.conn).await else {
        let error = refuse(
            "XX000",
            format!(
                "the gateway could not read which columns of target \"{}\" are masked or tagged, so it cannot mask or record your results",
                target.name
            ),
        )
        .with_hint("try again; the gateway's log has the details");
        return report(shared, &who, Failure::Refuse(error), Some(conn)).await;
    };
    let origins = catalog.as_ref().map(|c| c.origins.clone());
    let masker = if let Some(grant) = &unmask_grant {
        // The same event path as statements: the audit trail records it.
        tracing::info!(identity = %identity, target = %target.name, %grant, "unmask grant used: this session sees clear values");
        None
    } else {
        let masking = &shared.config.masking;
        let rules = catalog
            .as_ref()
            .map(|c| c.for_identity(&masking.rules, identity.groups()))
            .unwrap_or_default();
        (!masking.detectors.is_empty() || !rules.is_empty())
            .then(|| crate::mask::RowMasker::new(masking.detectors, rules))
    };

    // The session is on the record before the client can use it.
    if let Some(auditor) = &shared.auditor {
        let opened = who.event(crate::audit::Detail::SessionOpened {
            client: peer.to_string(),
            application: params.application_name.clone().unwrap_or_default(),
            tls: conn.is_tls(),
            upstream_role: rule.role.clone(),
            subject: identity.subject().to_string(),
            email: identity.email().map(str::to_string),
            groups: identity.groups().to_vec(),
            labels: identity.labels().clone(),
        });
        if let Err(err) = auditor.write_ahead(opened).await
            && shared.config.audit.on_failure == crate::config::OnAuditFailure::Refuse
        {
            tracing::warn!(error = %err, "session refused: the audit trail cannot record it");
            auditor.refused_while_unavailable();
            let error = refuse(
                "58000",
                "the gateway's audit trail cannot record sessions right now, and this gateway runs nothing it cannot record"
                    .into(),
            );
            return report(shared, &who, Failure::Refuse(error), Some(conn)).await;
        }
        if let Some(grant) = &unmask_grant {
            auditor.record(who.event(crate::audit::Detail::UnmaskGrantUsed { grant: grant.clone() }));
        }
    }

    let (client_key, _cancel_guard) = shared.cancels.register(&target.name, id, upstream.key);
    let mut greeting = BytesMut::with_capacity(upstream.greeting.len() + 64);
    proxy::encode_greeting(&upstream.greeting, client_key, upstream.status, &mut greeting);
    if let Err(err) = conn.send(&greeting).await {
        tracing::debug!(error = %err, "client left before the session began");
        return;
    }
    tracing::info!(
        application = params.application_name.as_deref().unwrap_or(""),
        tls = conn.is_tls(),
        upstream_role = %rule.role,
        backend_pid = upstream.key.process_id,
        "session opened"
    );

    let registered = shared.live.register(crate::live::SessionInfo {
        id: id.to_string(),
        identity: identity.name().to_string(),
        target: target.name.clone(),
        application: params.application_name.clone().unwrap_or_default(),
        client: peer.to_string(),
    });
    let (client, client_in) = conn.into_parts();
    let (server, server_in) = upstream.conn.into_parts();
    let ctx = proxy::ProxyContext {
        gate: shared.gate.as_ref(),
        identity: &identity,
        target: &target.name,
        session_id: id,
        max_message_size: shared.config.server.max_message_size,
        masker,
        origins,
        catalogs: &shared.catalogs,
        auditor: shared.auditor.as_ref(),
        audit_continue: shared.config.audit.on_failure == crate::config::OnAuditFailure::Continue,
        audit_sample_rows: shared.config.audit.sample_rows,
        live: &registered.session,
        approvals: &shared.approvals,
        metrics: &shared.metrics,
        audit_tags: &shared.config.audit.tags,
        token_expiry: identity.expires_at().map(|at| proxy::TokenExpiry {
            at,
            mode: shared.config.identity.on_token_expiry,
            grace: shared.config.identity.token_expiry_grace,
        }),
        upstream_cancel: proxy::UpstreamCancel {
            target,
            tls: shared.upstream_tls.get(&target.name).and_then(Option::as_ref),
            key: upstream.key,
        },
    };
    let mut proxy = proxy::Proxy::new(ctx, client, client_in, server, server_in, upstream.status);
    let end = proxy.run(shutdown).await;
    proxy.release(&format!("the session ended ({})", end.reason()));
    let counters = proxy.counters();
    tracing::info!(
        reason = end.reason(),
        detail = end.detail(),
        statements = counters.statements,
        refused = counters.refused,
        rows = counters.rows,
        masked = counters.masked,
        duration_ms = started.elapsed().as_millis() as u64,
        "session closed"
    );
    if let Some(auditor) = &shared.auditor {
        auditor.record(who.event(crate::audit::Detail::SessionClosed {
            reason: end.reason().to_string(),
            detail: end.detail().to_string(),
            statements: counters.statements,
            refused: counters.refused,
        }));
    }
}

/// Passes a client's CancelRequest to the right backend with its real key.
/// Unknown keys are ignored silently, as PostgreSQL does.
async fn forward_cancel(shared: &Shared, process_id: i32, secret_key: i32) {
    let Some(entry) = shared.cancels.lookup(process_id, secret_key) else {
        tracing::info!(process_id, "cancel request with an unknown key ignored");
        return;
    };
    // A statement held for approval is the gateway's to cancel; sent on,
    // the cancel could reach the server after the hold ended and cancel
    // the client's next statement instead.
    if shared.live.cancel(&entry.session) {
        tracing::info!(process_id, "cancel request taken by a statement held for approval");
        return;
    }
    let Some(target) = shared.config.target(&entry.target) else {
        return;
    };
    let cancel = proxy::UpstreamCancel {
        target,
        tls: shared.upstream_tls.get(&target.name).and_then(Option::as_ref),
        key: entry.upstream,
    };
    match cancel.send().await {
        Ok(()) => tracing::info!(process_id, target = %target.name, "cancel request forwarded"),
        Err(err) => tracing::warn!(error = %err, "cannot forward cancel request"),
    }
}

/// The target's catalog snapshot: which columns masking rules name, and the
/// origins of the columns the trail describes (tagged and masked ones). It
/// is read on this session's own upstream connection (before the client's
/// first statement) when it is missing or older than
/// `masking.catalog_ttl`; `None` when nothing is masked or tagged. If it
/// cannot be read, the session is refused (`Err`): a client could
/// otherwise make the read fail (a tiny statement_timeout) to get its
/// results masked by detectors only.
async fn target_catalog(
    shared: &Shared,
    target: &str,
    conn: &mut Connection,
) -> Result<Option<Arc<crate::mask::catalog::Catalog>>, ()> {
    use crate::mask::catalog;
    let masking = &shared.config.masking;
    let tags: &[crate::config::TagRule] = if shared.auditor.is_some() {
        &shared.config.audit.tags
    } else {
        &[]
    };
    let rules_query = catalog::query(&masking.rules);
    // Origins are for the trail only.
    let origins_query = if shared.auditor.is_some() {
        catalog::origins_query(tags, &masking.rules)
    } else {
        None
    };
    if rules_query.is_none() && origins_query.is_none() {
        return Ok(None);
    }
    let cached = shared
        .catalogs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(target)
        .cloned();
    if let Some(catalog) = cached
        && catalog.loaded.elapsed() < masking.catalog_ttl
    {
        return Ok(Some(catalog));
    }
    let mut queries = Vec::new();
    if let Some(query) = &rules_query {
        queries.push(query.as_str());
        queries.push(catalog::FUNCTIONS_QUERY);
    }
    if let Some(query) = &origins_query {
        queries.push(query.as_str());
    }
    let loaded = catalog_lookup(conn, &queries, shared.config.server.max_message_size)
        .await
        .and_then(|mut results| {
            let origins = match origins_query {
                Some(_) => results.pop().unwrap_or_default(),
                None => Vec::new(),
            };
            let (rules, functions) = match rules_query {
                Some(_) => {
                    let functions = results.pop().unwrap_or_default();
                    (results.pop().unwrap_or_default(), functions)
                }
                None => Default::default(),
            };
            let fields = |rows: &[Vec<String>], want: usize, what: &str| {
                rows.iter()
                    .find(|r| r.len() != want)
                    .map_or(Ok(()), |r| Err(format!("{what} row with {} fields", r.len())))
            };
            fields(&rules, catalog::FIELDS, "catalog")?;
            fields(&functions, 1, "function")?;
            fields(&origins, catalog::ORIGIN_FIELDS, "origin")?;
            let mut snapshot = catalog::from_rows(
                rules.iter().map(|r| std::array::from_fn(|i| r[i].as_str())),
                functions.iter().map(|r| r[0].as_str()),
            )?;
            snapshot.origins = Arc::new(catalog::origins_from_rows(
                origins.iter().map(|r| std::array::from_fn(|i| r[i].as_str())),
                tags,
            )?);
            Ok(snapshot)
        });
    match loaded {
        Ok(snapshot) => {
            let snapshot = Arc::new(snapshot);
            shared
                .catalogs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(target.to_string(), snapshot.clone());
            Ok(Some(snapshot))
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the target's catalog (masked and tagged columns); the session is refused");
            Err(())
        }
    }
}

/// How many times the catalog lookup is tried while the server cancels it.
const CATALOG_ATTEMPTS: u32 = 10;

/// The catalog lookup's transaction and settings: the session's own
/// settings (from its startup packet) must not change the lookup, so no
/// timeout to trip (an idle-in-transaction timeout would otherwise end the
/// session between this query and the lookup), and names resolved in
/// pg_catalog only.
const CATALOG_SETUP: &str = "BEGIN READ ONLY; SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0; \
                             SET LOCAL idle_in_transaction_session_timeout = 0; \
                             SET LOCAL search_path = pg_catalog, pg_temp";

/// [`catalog_rows`], tried again while the server cancels it (SQLSTATE
/// 57014). The session's own statement_timeout (from its startup packet,
/// as small as 1 ms) is in force until [`CATALOG_SETUP`] lifts it: it can
/// fire on those first statements on a busy server, or late, on a later
/// one. The client cannot make the lookup fail this way, only slower; a
/// lookup cancelled every time refuses the session, as any failed lookup
/// does.
async fn catalog_lookup(
    conn: &mut Connection,
    queries: &[&str],
    max_message_size: usize,
) -> Result<Vec<Vec<Vec<String>>>, String> {
    let mut attempt = 1;
    loop {
        match catalog_rows(conn, queries, max_message_size).await {
            Ok(rows) => return Ok(rows),
            Err(failure) if failure.cancelled && attempt < CATALOG_ATTEMPTS => {
                tracing::debug!(attempt, error = %failure.reason, "the catalog lookup was cancelled; trying again");
                // A moment for whatever held the server up to pass.
                tokio::time::sleep(std::time::Duration::from_millis(5 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(failure) if failure.cancelled => {
                return Err(format!(
                    "{} (cancelled {attempt} times: the session's statement_timeout may be too short for the lookup)",
                    failure.reason
                ));
            }
            Err(failure) => return Err(failure.reason),
        }
    }
}

/// Why [`catalog_rows`] failed.
#[derive(Debug)]
struct LookupFailure {
    reason: String,
    /// The server cancelled a statement of the lookup (57014), and the
    /// connection is idle again: the lookup can be tried again.
    cancelled: bool,
}

impl From<String> for LookupFailure {
    fn from(reason: String) -> LookupFailure {
        LookupFailure {
            reason,
            cancelled: false,
        }
    }
}

/// Runs catalog queries in one read-only transaction on an idle upstream
/// connection; the rows of each query, as text (NULL as empty). The
/// transaction and its settings ([`CATALOG_SETUP`]) go first, in a query of
/// their own: the session's timeout, in force until they have run, then
/// covers the parse of a short text, not of the whole lookup. The lookup
/// follows once they are in force, never pipelined with them: run under
/// the session's search_path, it could read other tables than the
/// catalog's. If the server reports an error, the transaction is rolled
/// back, so that the connection is idle again.
async fn catalog_rows(
    conn: &mut Connection,
    queries: &[&str],
    max_message_size: usize,
) -> Result<Vec<Vec<Vec<String>>>, LookupFailure> {
    let setup = exchange(conn, CATALOG_SETUP, max_message_size).await?;
    let answer = if setup.error.is_none() && setup.status == TxStatus::InTransaction {
        let lookup = format!("{}; COMMIT", queries.join("; "));
        exchange(conn, &lookup, max_message_size).await?
    } else {
        setup
    };
    // A failed statement leaves the transaction aborted (the rest of the
    // query string, COMMIT included, is skipped): end it.
    let idle = answer.status == TxStatus::Idle || rolled_back(conn, max_message_size).await;
    match answer.error {
        Some(error) => Err(LookupFailure {
            reason: format!("the catalog query failed: {}", error.text),
            cancelled: error.cancelled && idle,
        }),
        None if !idle => Err("the catalog lookup left a transaction open".to_string().into()),
        None if answer.results.len() != queries.len() => Err(format!(
            "the catalog lookup answered {} queries of {}",
            answer.results.len(),
            queries.len()
        )
        .into()),
        None => Ok(answer.results),
    }
}

/// The server's answer to one simple query.
struct Answered {
    /// The rows of each statement that returned rows, as text.
    results: Vec<Vec<Vec<String>>>,
    /// The error that ended it, if one did.
    error: Option<ServerError>,
    /// ReadyForQuery's transaction status.
    status: TxStatus,
}

struct ServerError {
    text: String,
    /// SQLSTATE 57014: a timeout or a cancel request.
    cancelled: bool,
}

/// Sends `sql` as one simple query and reads the answer up to
/// ReadyForQuery. `Err` when the connection cannot be used any more.
async fn exchange(conn: &mut Connection, sql: &str, max_message_size: usize) -> Result<Answered, String> {
    use crate::protocol::backend::tag;
    let mut out = BytesMut::new();
    crate::protocol::frontend::Query::encode(sql, &mut out);
    conn.send(&out)
        .await
        .map_err(|e| format!("sending the catalog query: {e}"))?;
    // Each statement's rows start with its RowDescription.
    let mut results: Vec<Vec<Vec<String>>> = Vec::new();
    let mut error = None;
    loop {
        let message = conn
            .read_message(max_message_size)
            .await
            .map_err(|e| format!("reading the catalog: {e}"))?;
        match message.tag {
            tag::ROW_DESCRIPTION => results.push(Vec::new()),
            tag::DATA_ROW => {
                let Some(rows) = results.last_mut() else {
                    return Err("a catalog row before its description".into());
                };
                let mut cur = crate::protocol::Cursor::new(&message.body);
                let count = cur.count16("field count").map_err(|e| e.to_string())?;
                let mut fields = Vec::with_capacity(count);
                for _ in 0..count {
                    let value = cur
                        .nullable_value("field")
                        .map_err(|e| e.to_string())?
                        .unwrap_or_default();
                    fields.push(String::from_utf8_lossy(value).into_owned());
                }
                rows.push(fields);
            }
            tag::ERROR_RESPONSE => {
                let received = crate::protocol::backend::ReceivedError::decode(&message.body);
                error = Some(ServerError {
                    cancelled: matches!(&received, Ok(e) if e.code == "57014"),
                    text: received
                        .map(|e| format!("{} {}", e.code, e.message))
                        .unwrap_or_else(|e| e.to_string()),
                });
            }
            tag::READY_FOR_QUERY => {
                let status = crate::protocol::backend::decode_ready_for_query(&message.body)
                    .map_err(|e| format!("reading the catalog: {e}"))?;
                return Ok(Answered { results, error, status });
            }
            _ => {}
        }
    }
}

/// Sends ROLLBACK on a connection in a transaction, again while the
/// session's timeout cancels it; whether it is idle afterwards.
async fn rolled_back(conn: &mut Connection, max_message_size: usize) -> bool {
    for _ in 0..CATALOG_ATTEMPTS {
        match exchange(conn, "ROLLBACK", max_message_size).await {
            Ok(answer) if answer.status == TxStatus::Idle => return true,
            Ok(Answered {
                error: Some(ServerError { cancelled: true, .. }),
                ..
            }) => {}
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::{encode_ready_for_query, tag};
    use crate::protocol::codec::MessageBuilder;

    /// How the scripted server answers a query.
    #[derive(Clone, Copy)]
    enum Answer {
        /// [`CATALOG_SETUP`]'s: a transaction is open.
        Began,
        /// The lookup's (of one query): one row of one column, committed.
        Row(&'static str),
        /// An error with this SQLSTATE, in this transaction state.
        Error(&'static str, TxStatus),
        /// ROLLBACK's.
        RolledBack,
    }

    /// Runs `catalog_lookup` of one query against a server that answers in
    /// the order of `answers`; the lookup's result and the queries the
    /// server received.
    async fn lookup(answers: &[Answer]) -> (Result<Vec<Vec<Vec<String>>>, String>, Vec<String>) {
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let answers = answers.to_vec();
        let server = tokio::spawn(async move {
            let mut server = Connection::new(Stream::Unix(theirs));
            let mut received = Vec::new();
            for answer in answers {
                let Ok(query) = server.read_message(1 << 20).await else {
                    break;
                };
                assert_eq!(query.tag, b'Q');
                received.push(String::from_utf8_lossy(&query.body).trim_end_matches('\0').to_string());
                let mut out = BytesMut::new();
                let complete = |out: &mut BytesMut, tag: &str| {
                    MessageBuilder::new(out, tag::COMMAND_COMPLETE).cstr(tag).finish();
                };
                let status = match answer {
                    Answer::Began => {
                        for done in ["BEGIN", "SET", "SET", "SET"] {
                            complete(&mut out, done);
                        }
                        TxStatus::InTransaction
                    }
                    Answer::Row(value) => {
                        MessageBuilder::new(&mut out, tag::ROW_DESCRIPTION)
                            .i16(1)
                            .cstr("c")
                            .i32(0)
                            .i16(0)
                            .i32(25)
                            .i16(-1)
                            .i32(-1)
                            .i16(0)
                            .finish();
                        MessageBuilder::new(&mut out, tag::DATA_ROW)
                            .i16(1)
                            .i32(value.len() as i32)
                            .bytes(value.as_bytes())
                            .finish();
                        complete(&mut out, "SELECT 1");
                        complete(&mut out, "COMMIT");
                        TxStatus::Idle
                    }
                    Answer::Error(code, status) => {
                        ErrorFields::new(Severity::Error, code, "scripted error").encode(&mut out);
                        status
                    }
                    Answer::RolledBack => {
                        complete(&mut out, "ROLLBACK");
                        TxStatus::Idle
                    }
                };
                encode_ready_for_query(status, &mut out);
                server.send(&out).await.unwrap();
            }
            received
        });
        let mut conn = Connection::new(Stream::Unix(ours));
        let result = catalog_lookup(&mut conn, &["SELECT c FROM scripted"], 1 << 20).await;
        drop(conn);
        (result, server.await.unwrap())
    }

    const LOOKUP: &str = "SELECT c FROM scripted; COMMIT";

    fn found(result: Result<Vec<Vec<Vec<String>>>, String>) -> Vec<Vec<Vec<String>>> {
        result.unwrap_or_else(|err| panic!("the lookup failed: {err}"))
    }

    #[tokio::test]
    async fn the_lookup_runs_only_once_its_settings_are_in_force() {
        use Answer::*;
        let (result, received) = lookup(&[Began, Row("a")]).await;
        assert_eq!(found(result), vec![vec![vec!["a".to_string()]]]);
        assert_eq!(received, [CATALOG_SETUP, LOOKUP]);

        // Settings that failed: the lookup is not sent after them.
        let (result, received) = lookup(&[Error("42501", TxStatus::Failed), RolledBack, Row("a")]).await;
        let err = result.unwrap_err();
        assert!(err.contains("42501 scripted error"), "{err}");
        assert_eq!(received, [CATALOG_SETUP, "ROLLBACK"]);
    }

    /// A client may set timeouts at startup; each that could end or cancel
    /// the lookup inside its transaction is lifted for it. (An
    /// `idle_session_timeout` applies only outside a transaction, where
    /// the lookup never waits.)
    #[test]
    fn the_lookup_lifts_every_timeout_a_client_may_set() {
        let timeouts: Vec<&str> = startup::ALLOWED_PARAMETERS
            .iter()
            .copied()
            .filter(|name| name.ends_with("_timeout") && *name != "idle_session_timeout")
            .collect();
        assert!(timeouts.len() >= 3, "{timeouts:?}");
        for name in timeouts {
            assert!(CATALOG_SETUP.contains(&format!("SET LOCAL {name} = 0;")), "{name}");
        }
    }

    #[tokio::test]
    async fn a_lookup_cancelled_before_its_transaction_is_tried_again() {
        use Answer::*;
        let (result, received) = lookup(&[Error("57014", TxStatus::Idle), Began, Row("a")]).await;
        assert_eq!(found(result), vec![vec![vec!["a".to_string()]]]);
        assert_eq!(received, [CATALOG_SETUP, CATALOG_SETUP, LOOKUP]);
    }

    #[tokio::test]
    async fn a_lookup_cancelled_inside_its_transaction_is_rolled_back_and_tried_again() {
        use Answer::*;
        let (result, received) = lookup(&[Began, Error("57014", TxStatus::Failed), RolledBack, Began, Row("a")]).await;
        assert_eq!(found(result), vec![vec![vec!["a".to_string()]]]);
        assert_eq!(received, [CATALOG_SETUP, LOOKUP, "ROLLBACK", CATALOG_SETUP, LOOKUP]);
    }

    #[tokio::test]
    async fn a_cancelled_rollback_is_sent_again() {
        use Answer::*;
        let cancelled = Error("57014", TxStatus::Failed);
        let (result, received) = lookup(&[cancelled, cancelled, RolledBack, Began, Row("a")]).await;
        assert_eq!(found(result), vec![vec![vec!["a".to_string()]]]);
        assert_eq!(received, [CATALOG_SETUP, "ROLLBACK", "ROLLBACK", CATALOG_SETUP, LOOKUP]);
    }

    #[tokio::test]
    async fn other_failures_are_not_tried_again() {
        use Answer::*;
        let (result, received) = lookup(&[Began, Error("42501", TxStatus::Failed), RolledBack, Began, Row("a")]).await;
        let err = result.unwrap_err();
        assert!(err.contains("42501 scripted error"), "{err}");
        assert_eq!(received, [CATALOG_SETUP, LOOKUP, "ROLLBACK"]);
    }

    #[tokio::test]
    async fn a_lookup_cancelled_every_time_fails_and_says_why() {
        let answers = vec![Answer::Error("57014", TxStatus::Idle); CATALOG_ATTEMPTS as usize + 1];
        let (result, received) = lookup(&answers).await;
        let err = result.unwrap_err();
        assert!(err.contains("57014"), "{err}");
        assert!(err.contains("statement_timeout"), "{err}");
        assert_eq!(received.len(), CATALOG_ATTEMPTS as usize);
    }
}
