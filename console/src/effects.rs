//! The runner: carries out [`Command`]s (API calls through the typed
//! client, queries through the gateway's PostgreSQL port, files) in tasks
//! of their own, and posts what came of them back as [`Action`]s. The
//! state never waits on the network.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::StreamExt as _;
use sluice_core::api::client::ApiClient;
use tokio::sync::mpsc::Sender;
use tokio_postgres::{AsyncMessage, CancelToken, NoTls, SimpleQueryMessage};

use crate::action::{Action, Command, QueryError, QueryOutcome};

/// Rows a shell result keeps (the rest are counted, not kept).
pub const MAX_ROWS: usize = 10_000;

/// How long the shell waits for the gateway to accept a connection.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Where the shell connects: the gateway's PostgreSQL port.
#[derive(Debug, Clone)]
pub struct Postgres {
    pub host: String,
    pub port: u16,
    /// Informational for the gateway (the token says who); sent as user.
    pub user: String,
    pub token: sluice_core::api::client::SharedToken,
    /// TLS to the gateway, verifying its certificate and name; `None`:
    /// plaintext (only sensible on loopback, where the gateway may allow it).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Postgres {
    fn connector(&self) -> Option<tokio_postgres_rustls::MakeRustlsConnect> {
        self.tls
            .as_ref()
            .map(|config| tokio_postgres_rustls::MakeRustlsConnect::new((**config).clone()))
    }
}

#[derive(Clone)]
pub struct Runner {
    api: ApiClient,
    postgres: Postgres,
    tx: Sender<Action>,
    session: Arc<tokio::sync::Mutex<Option<(String, tokio_postgres::Client)>>>,
    cancel: Arc<Mutex<Option<CancelToken>>>,
    /// Woken by a cancel while the shell is still connecting.
    give_up: Arc<tokio::sync::Notify>,
    history: Option<PathBuf>,
    export_dir: PathBuf,
}

impl Runner {
    pub fn new(
        api: ApiClient,
        postgres: Postgres,
        tx: Sender<Action>,
        history: Option<PathBuf>,
        export_dir: PathBuf,
    ) -> Runner {
        Runner {
            api,
            postgres,
            tx,
            session: Arc::default(),
            cancel: Arc::default(),
            give_up: Arc::default(),
            history,
            export_dir,
        }
    }

    /// Hands an answer to the loop (waiting while its queue is full: the
    /// loop drains it between frames).
    async fn post(&self, action: Action) {
        let _ = self.tx.send(action).await;
    }

    /// Starts `command`; its answer arrives as an action.
    pub fn run(&self, command: Command) {
        let this = self.clone();
        tokio::spawn(async move { this.execute(command).await });
    }

    /// Carries out `command` and posts its answer (tests await this).
    pub async fn execute(&self, command: Command) {
        let api = &self.api;
        match command {
            Command::Decide { id, approve, reason } => {
                let result = api
                    .decide(id, approve, reason.as_deref())
                    .await
                    .map(Box::new)
                    .map_err(|e| e.to_string());
                self.post(Action::Decided {
                    id,
                    approve,
                    reason,
                    result,
                })
                .await;
            }
            Command::Kill { session } => {
                let result = api.kill(&session).await.map(|_| ()).map_err(|e| e.to_string());
                self.post(Action::Killed { session, result }).await;
            }
            Command::Refresh => {
                self.refresh().await;
            }
            Command::LoadTimeline { session } => {
                let result = api.timeline(&session).await.map_err(|e| e.to_string());
                self.post(Action::Timeline { session, result }).await;
            }
            Command::LoadPastSessions => {
                let result = api.past_sessions(500).await.map_err(|e| e.to_string());
                self.post(Action::PastSessions(result)).await;
            }
            Command::LoadRecording { session } => {
                let result = api.timeline(&session).await.map_err(|e| e.to_string());
                self.post(Action::Recording { session, result }).await;
            }
            Command::Export { session, events } => {
                let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
                let path = self.export_dir.join(format!("sluice-session-{session}-{stamp}.jsonl"));
                let mut body = String::new();
                for event in &events {
                    body.push_str(&serde_json::to_string(event).unwrap_or_default());
                    body.push('\n');
                }
                // A new file only the operator can read (never through a
                // link or over another file): it holds the session's
                // statements and samples.
                let result = write_private(&path, body.as_bytes(), true)
                    .await
                    .map(|()| path.display().to_string())
                    .map_err(|e| format!("{}: {e}", path.display()));
                self.post(Action::Exported(result)).await;
            }
            Command::RunQuery { target, sql } => {
                let result = self.query(&target, &sql).await;
                self.post(Action::QueryDone(result)).await;
            }
            Command::CancelQuery => {
                let token = self.cancel.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if token.is_none() {
                    // Not connected yet: stop waiting for the connection.
                    self.give_up.notify_waiters();
                }
                if let Some(token) = token {
                    let sent = match self.postgres.connector() {
                        Some(tls) => token.cancel_query(tls).await,
                        None => token.cancel_query(NoTls).await,
                    };
                    if let Err(err) = sent {
                        self.post(Action::QueryNotice(format!("could not cancel: {err}"))).await;
                    }
                }
            }
            Command::SaveHistory { entries } => {
                if let Some(path) = &self.history {
                    let text: Vec<String> = entries
                        .iter()
                        .map(|e| serde_json::to_string(e).unwrap_or_default())
                        .collect();
                    if let Some(dir) = path.parent() {
                        let _ = tokio::fs::create_dir_all(dir).await;
                    }
                    if let Err(err) = write_private(path, (text.join("\n") + "\n").as_bytes(), false).await {
                        tracing::warn!(error = %err, path = %path.display(), "cannot save the shell history");
                    }
                }
            }
        }
    }

    /// Live sessions and approvals, now.
    /// Returns whether the gateway refused the token (401/403), so that
    /// the poll can slow down.
    pub async fn refresh(&self) -> bool {
        let (sessions, approvals) = tokio::join!(self.api.sessions(), self.api.approvals());
        let refused = [sessions.as_ref().err(), approvals.as_ref().err()]
            .into_iter()
            .flatten()
            .any(|e| matches!(e.status(), Some(401 | 403)));
        self.post(Action::Sessions(sessions.map_err(|e| e.to_string()))).await;
        self.post(Action::Approvals(approvals.map_err(|e| e.to_string()))).await;
        refused
    }

    async fn connect(&self, target: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let pg = &self.postgres;
        let mut config = tokio_postgres::Config::new();
        config
            .host(&pg.host)
            .port(pg.port)
            .user(&pg.user)
            .password(pg.token.get())
            .dbname(target)
            .application_name("sluice console");
        match pg.connector() {
            Some(tls) => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                let (client, connection) = config.connect(tls).await?;
                self.follow_notices(connection);
                Ok(client)
            }
            None => {
                let (client, connection) = config.connect(NoTls).await?;
                self.follow_notices(connection);
                Ok(client)
            }
        }
    }

    /// Drives the shell's connection, forwarding its notices (a "held for
    /// approval" arrives while the query waits).
    fn follow_notices<S, T>(&self, mut connection: tokio_postgres::Connection<S, T>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
    {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notice(notice)) => {
                        let mut text = format!("{}: {}", notice.severity(), notice.message());
                        if let Some(detail) = notice.detail() {
                            text.push_str(&format!(" ({detail})"));
                        }
                        if let Some(hint) = notice.hint() {
                            text.push_str(&format!(" (hint: {hint})"));
                        }
                        let _ = tx.send(Action::QueryNotice(text)).await;
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::info!(error = %err, "shell connection ended");
                        break;
                    }
                }
            }
        });
    }

    async fn query(&self, target: &str, sql: &str) -> Result<QueryOutcome, QueryError> {
        let started = Instant::now();
        let elapsed = || started.elapsed().as_millis() as u64;
        let mut session = self.session.lock().await;
        if let Some((t, client)) = session.as_ref()
            && (t != target || client.is_closed())
        {
            if t == target {
                // Whatever that session held (a transaction) is gone: say
                // so before the statement runs somewhere new.
                self.post(Action::QueryNotice(format!(
                    "the shell's session on {target} ended (ended by an administrator, or the gateway restarted): \
                     this runs in a new session, outside any transaction begun there"
                )))
                .await;
            }
            *session = None;
        }
        if session.is_none() {
            // A gateway that accepts the connection and never answers must
            // not wedge the shell: a time limit, and ctrl-c gives up too.
            let connected = tokio::select! {
                connected = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(target)) => connected,
                () = self.give_up.notified() => {
                    return Err(QueryError::local("cancelled while connecting to the gateway", elapsed()));
                }
            };
            let client = match connected {
                Ok(connected) => connected.map_err(|e| query_error(&e, elapsed()))?,
                Err(_) => {
                    return Err(QueryError::local(
                        &format!(
                            "the gateway at {}:{} did not answer within {} s",
                            self.postgres.host,
                            self.postgres.port,
                            CONNECT_TIMEOUT.as_secs()
                        ),
                        elapsed(),
                    ));
                }
            };
            *session = Some((target.to_string(), client));
        }
        let Some((_, client)) = session.as_ref() else {
            unreachable!("connected above");
        };
        *self.cancel.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.cancel_token());
        let mut outcome = QueryOutcome::default();
        let result = async {
            let stream = client.simple_query_raw(sql).await?;
            futures_util::pin_mut!(stream);
            while let Some(message) = stream.next().await {
                match message? {
                    SimpleQueryMessage::RowDescription(columns) => {
                        outcome.columns = columns.iter().map(|c| c.name().to_string()).collect();
                        outcome.rows.clear();
                        outcome.truncated = false;
                    }
                    SimpleQueryMessage::Row(row) => {
                        if outcome.rows.len() < MAX_ROWS {
                            outcome
                                .rows
                                .push((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect());
                        } else {
                            outcome.truncated = true;
                        }
                    }
                    SimpleQueryMessage::CommandComplete(n) => {
                        outcome.tags.push(format!("{n} row{}", if n == 1 { "" } else { "s" }));
                    }
                    _ => {}
                }
            }
            Ok::<(), tokio_postgres::Error>(())
        }
        .await;
        *self.cancel.lock().unwrap_or_else(|e| e.into_inner()) = None;
        outcome.elapsed_ms = elapsed();
        match result {
            Ok(()) => Ok(outcome),
            Err(err) => {
                if client.is_closed() {
                    *session = None;
                }
                Err(query_error(&err, outcome.elapsed_ms))
            }
        }
    }
}

fn query_error(err: &tokio_postgres::Error, elapsed_ms: u64) -> QueryError {
    match err.as_db_error() {
        Some(db) => QueryError {
            message: db.message().to_string(),
            detail: db.detail().map(str::to_string),
            hint: db.hint().map(str::to_string),
            code: Some(db.code().code().to_string()),
            elapsed_ms,
        },
        None => {
            use std::error::Error as _;
            let mut message = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            QueryError {
                message,
                detail: None,
                hint: None,
                code: None,
                elapsed_ms,
            }
        }
    }
}

/// Writes a file only its owner can read: `new` refuses to replace
/// anything already there (a file or a link); otherwise an existing file is
/// overwritten and made private too.
async fn write_private(path: &std::path::Path, bytes: &[u8], new: bool) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    use tokio::io::AsyncWriteExt as _;
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if new {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    let mut file = options.open(path).await?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).await?;
    file.write_all(bytes).await?;
    file.flush().await
}

/// Loads the saved shell history (one JSON string per line).
pub fn load_history(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|text| {
            text.lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .collect()
        })
        .unwrap_or_default()
}
