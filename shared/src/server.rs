//! The gateway: binds the PostgreSQL listener, accepts clients within the
//! connection limit, and shuts down gracefully.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::gate::StatementGate;
use crate::identity::Verifier;
use crate::session::{self, Shared};
use crate::shutdown::{Phase, Shutdown};
use crate::tls::{self, TlsError, UpstreamTlsConnector};

/// How long sessions get to send their goodbye after the grace period.
const FINAL_WAIT: Duration = Duration::from_secs(5);

/// Connections over the limit are told so (53300) once they have said hello;
/// at most this many at a time, so a flood cannot hold tasks and sockets
/// for `auth_timeout` each. Beyond it, connections are closed at once.
const OVER_LIMIT_HANDSHAKES: usize = 64;

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot load the TLS certificate for clients: {0}")]
    Tls(#[source] TlsError),
    #[error("cannot prepare TLS towards target \"{target}\": {source}")]
    UpstreamTls {
        target: String,
        #[source]
        source: TlsError,
    },
    // The io error is part of the message, not a `source`, so that the
    // CLI's error chain does not print it twice.
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("cannot listen on {addr} for the control API: {error} (set [api] listen, or enabled = false)")]
    BindApi { addr: SocketAddr, error: std::io::Error },
    #[error("cannot open the audit trail: {0}")]
    Audit(#[source] crate::audit::AuditError),
}

/// Request ids continue after the highest the trail holds, so that a
/// request id names one request across restarts.
fn first_request_id(config: &Config) -> u64 {
    if !config.audit.enabled {
        return 1;
    }
    crate::audit::SqliteStore::open_read_only(&config.audit.path)
        .and_then(|store| store.max_request_id())
        .map_or(1, |max| max + 1)
}

/// Requests left pending by a previous run: their clients are gone, so
/// they end, on the record, as expired with the reason.
fn expire_orphaned_requests(config: &Config, auditor: &crate::audit::Auditor) {
    let open = crate::audit::SqliteStore::open_read_only(&config.audit.path).and_then(|store| store.open_requests());
    match open {
        Ok(open) => {
            for open in open {
                let mut event = crate::audit::Event::now(crate::audit::Detail::ApprovalDecided {
                    request: open.request,
                    decision: "expired".into(),
                    by: String::new(),
                    reason: Some("the gateway restarted while it was pending; its client was disconnected".into()),
                    via: "gateway".into(),
                    delegate: None,
                    chat_user: None,
                });
                event.session = open.session;
                event.identity = open.identity;
                event.target = open.target;
                auditor.record(event);
            }
        }
        Err(err) => tracing::warn!(error = %err, "cannot read the approval requests left open by the last run"),
    }
}

/// Grants from access requests approved before a restart hold until they
/// expire; those that expired while the gateway was down end on the record.
///
/// The trail is evidence, not an authority: a grant is restored only if the
/// chain verifies and a signed head covers its event (anyone who can write
/// the database could otherwise append one), its request and approval are
/// on the trail, and it ends no later than the policy's current
/// `max_duration` for that grant allows. After a crash, a grant recorded
/// after the last signed head is not restored: its holder asks again.
fn restore_grants(config: &Config, approvals: &crate::approvals::Approvals) {
    use crate::approvals::GrantView;
    use crate::audit::{Signer, SqliteStore};
    // The grants to restore, and those that end now, with why.
    type Sorted = (Vec<GrantView>, Vec<(GrantView, String)>);
    let read = || -> Result<Sorted, crate::audit::AuditError> {
        let store = SqliteStore::open_read_only(&config.audit.path)?;
        let grants = store.open_grants()?;
        if grants.is_empty() {
            return Ok(Default::default());
        }
        let key = Signer::load_or_create(&config.audit.key_file)?.public_key();
        let head = crate::audit::read_head_file(&config.audit.head_file)?;
        let report = store.verify(&key, head.as_ref())?;
        if !report.ok() {
            tracing::error!(
                broken = ?report.broken,
                "the audit trail does not verify: no access grant is restored from it"
            );
            return Ok(Default::default());
        }
        let signed = report.last_signed.unwrap_or(0);
        let now = chrono::Utc::now();
        let mut restore = Vec::new();
        let mut end = Vec::new();
        for open in grants {
            let max = config
                .policy
                .grants
                .iter()
                .find(|p| p.name == open.grant.grant)
                .and_then(|p| p.request.as_ref())
                .and_then(|r| chrono::Duration::from_std(r.max_duration).ok());
            let why = if open.grant.until <= now {
                Some("expired while the gateway was down".to_string())
            } else if open.id > signed {
                Some("not restored after a restart: no signed head covers it (the gateway stopped before signing); ask again".into())
            } else if max.is_none_or(|max| open.grant.until > open.granted_at + max + chrono::Duration::seconds(1)) {
                Some(
                    "not restored after a restart: the policy no longer lets it be requested, or not for that long"
                        .into(),
                )
            } else {
                None
            };
            match why {
                None => restore.push(open.grant),
                Some(why) => end.push((open.grant, why)),
            }
        }
        Ok((restore, end))
    };
    match read() {
        Ok((live, gone)) => {
            for (grant, why) in gone {
                approvals.end_grant(&grant, why);
            }
            if !live.is_empty() {
                tracing::info!(
                    grants = live.len(),
                    "access grants approved before the restart still hold"
                );
            }
            approvals.restore_grants(live);
        }
        Err(err) => tracing::warn!(error = %err, "cannot read the access grants approved by the last run"),
    }
}

/// Opens the trail, loads (or creates) the signing key and starts the
/// writer; `None` when auditing is off.
fn start_audit(config: &Config) -> Result<Option<crate::audit::Auditor>, GatewayError> {
    use crate::audit::{Auditor, Signer, SqliteStore, WriterOptions};
    let audit = &config.audit;
    if !audit.enabled {
        tracing::warn!("auditing is off ([audit] enabled = false): nothing records what sessions do");
        return Ok(None);
    }
    let store = SqliteStore::open(&audit.path, audit.sync).map_err(GatewayError::Audit)?;
    let signer = Signer::load_or_create(&audit.key_file).map_err(GatewayError::Audit)?;
    tracing::info!(
        path = %audit.path.display(),
        public_key = %signer.public_key().to_hex(),
        "audit trail open"
    );
    let options = WriterOptions {
        sign_every: audit.sign_every,
        sign_interval: audit.sign_interval,
        head_file: audit.head_file.clone(),
        retention: audit.retention,
        journal: crate::audit::journal_path(&audit.path),
        sync: audit.sync,
        gather: crate::audit::GATHER,
    };
    let (auditor, _writer) = Auditor::start(Box::new(store), signer, options).map_err(GatewayError::Audit)?;
    Ok(Some(auditor))
}

/// The TLS material a configuration names, loaded and checked.
struct TlsSetup {
    tls: Option<TlsAcceptor>,
    upstream_tls: HashMap<String, Option<UpstreamTlsConnector>>,
}

impl TlsSetup {
    fn load(config: &Config) -> Result<TlsSetup, GatewayError> {
        let tls = match &config.tls {
            Some(files) => Some(TlsAcceptor::from(tls::server_config(files).map_err(GatewayError::Tls)?)),
            None => None,
        };
        let mut upstream_tls = HashMap::new();
        for target in &config.targets {
            let connector = tls::upstream_connector(target).map_err(|source| GatewayError::UpstreamTls {
                target: target.name.clone(),
                source,
            })?;
            upstream_tls.insert(target.name.clone(), connector);
        }
        Ok(TlsSetup { tls, upstream_tls })
    }
}

/// Checks what `bind` would load from disk (certificates, keys, CAs) without
/// binding or connecting anywhere: `sluice config check` runs this.
pub fn check_files(config: &Config) -> Result<(), GatewayError> {
    TlsSetup::load(config).map(|_| ())
}

/// A bound, not yet running, gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    listener: TcpListener,
    /// The control API's listener, when it is on.
    api: Option<TcpListener>,
}

impl Gateway {
    /// Loads TLS material, prepares the verifiers and binds the listener.
    pub async fn bind(config: Config, gate: Arc<dyn StatementGate>) -> Result<Gateway, GatewayError> {
        let TlsSetup { tls, upstream_tls } = TlsSetup::load(&config)?;
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| GatewayError::Bind { addr, error })?;
        let api = if config.api.enabled {
            let addr = config.api.listen;
            Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|error| GatewayError::BindApi { addr, error })?,
            )
        } else {
            None
        };
        let auditor = start_audit(&config)?;
        let approvals = crate::approvals::Approvals::new(auditor.clone(), first_request_id(&config));
        if let Some(auditor) = &auditor {
            expire_orphaned_requests(&config, auditor);
            restore_grants(&config, &approvals);
        }
        let shared = Shared {
            verifier: Verifier::new(&config.identity),
            config,
            gate,
            tls,
            upstream_tls,
            cancels: Arc::new(CancelRegistry::default()),
            shutdown: Arc::new(Shutdown::default()),
            catalogs: std::sync::Mutex::default(),
            auditor,
            live: crate::live::LiveSessions::default(),
            identity_slots: crate::live::IdentitySlots::default(),
            approvals,
            metrics: crate::metrics::Metrics::default(),
            api_stopping: CancellationToken::new(),
        };
        Ok(Gateway {
            shared: Arc::new(shared),
            listener,
            api,
        })
    }

    /// The address clients connect to (useful when the configuration says port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.shared.config.server.listen)
    }

    /// The control API's address, when it is on.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves clients until `shutdown` is cancelled, then stops accepting,
    /// lets sessions finish for `server.shutdown_grace`, and ends the rest.
    pub async fn run(self, shutdown: CancellationToken) {
        let Gateway { shared, listener, api } = self;
        let api_shutdown = shared.api_stopping.clone();
        let api_task = api.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(listen = %addr, "control API ready");
            }
            tokio::spawn(crate::api::serve(listener, shared.clone(), api_shutdown.clone()))
        });
        let deadlines = {
            let shared = shared.clone();
            let stop = api_shutdown.clone();
            tokio::spawn(async move { shared.approvals.watch_deadlines(stop).await })
        };
        let limit = Arc::new(Semaphore::new(shared.config.server.max_connections));
        let over_limit = Arc::new(Semaphore::new(OVER_LIMIT_HANDSHAKES));
        let sessions = TaskTracker::new();
        // Fetch OIDC keys ahead of the first client. A failure is not fatal:
        // the issuer may come up after the gateway, and tokens are checked
        // (and refused, with the reason) until it does.
        let warm = shared.clone();
        tokio::spawn(async move {
            if let Err(err) = warm.verifier.warm_up().await {
                tracing::warn!(error = %err, "OIDC issuer not reachable yet");
            }
        });
        tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "gateway ready");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        tcp.set_nodelay(true).ok();
                        match limit.clone().try_acquire_owned() {
                            Ok(permit) => {
                                sessions.spawn(session::serve(shared.clone(), tcp, peer, Some(permit)));
                            }
                            Err(_) => match over_limit.clone().try_acquire_owned() {
                                Ok(permit) => {
                                    let shared = shared.clone();
                                    sessions.spawn(async move {
                                        let _permit = permit;
                                        session::serve(shared, tcp, peer, None).await;
                                    });
                                }
                                Err(_) => tracing::debug!(%peer, "connection dropped: over the limit"),
                            },
                        }
                    }
                    Err(err) => {
                        // Out of file descriptors and the like: back off
                        // instead of spinning, and keep serving.
                        tracing::error!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        sessions.close();
        tracing::info!(
            sessions = sessions.len(),
            grace = ?shared.config.server.shutdown_grace,
            "shutting down: no new connections; sessions end when idle"
        );
        shared.shutdown.advance(Phase::Draining);
        if tokio::time::timeout(shared.config.server.shutdown_grace, sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = sessions.len(),
                "grace period over: ending the remaining sessions"
            );
            shared.shutdown.advance(Phase::Deadline);
            let _ = tokio::time::timeout(FINAL_WAIT, sessions.wait()).await;
        }
        // The API stays up while sessions drain, so operators can watch.
        api_shutdown.cancel();
        if let Some(task) = api_task {
            let _ = tokio::time::timeout(FINAL_WAIT, task).await;
        }
        let _ = deadlines.await;
        if let Some(auditor) = &shared.auditor {
            // Everything the sessions recorded is written, and the end of
            // the trail signed, before the gateway says it stopped.
            auditor.sign_now().await;
        }
        tracing::info!("gateway stopped");
    }
}
