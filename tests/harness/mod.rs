//! The shared harness: one throwaway PostgreSQL per test binary, a database
//! per test, and a gateway per test running in the test's own runtime on
//! port 0, configured through the same TOML loader as `sluice serve`.

pub mod events;
pub mod issuer;
pub mod provider;
pub mod raw;

use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sluice_core::devcluster::{ClusterOptions, DevCluster, DevPki};
use sluice_core::gate::StatementGate;
use sluice_core::{Config, Gateway, PolicyGate};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Tokens of the test identities (the password a client sends).
pub const ALICE: &str = "alice-test-token";
pub const BOB: &str = "bob-test-token";
pub const AGENT: &str = "agent-test-token";

/// How long a test waits for something that takes well under a second on
/// an idle machine (a process to start, an event to arrive) before calling
/// it hung. Generous on purpose: CI machines share two cores among the
/// tests running in parallel, and a test that fails for the machine's load
/// says nothing about the gateway.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Upstream roles the test cluster has, each behind a different pg_hba method.
pub const APP_ROLE: &str = "sluice_app"; // scram-sha-256
pub const APP_PASSWORD: &str = "app-pw";

/// The cluster every test of this binary shares.
pub struct Cluster {
    pub dev: DevCluster,
    /// The test CA, which issued the certificate (for 127.0.0.1 and
    /// localhost) that PostgreSQL and the test gateways present.
    pub ca_path: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let pki = DevPki::generate("Sluice test CA", &["localhost", "127.0.0.1"]).expect("test PKI");
        let options = ClusterOptions {
            hba: vec![
                "hostssl all sluice_tls 127.0.0.1/32 scram-sha-256".into(),
                "host all sluice_tls 127.0.0.1/32 reject".into(),
                "host all sluice_md5 127.0.0.1/32 md5".into(),
                "host all sluice_trust 127.0.0.1/32 trust".into(),
                "host all sluice_plain 127.0.0.1/32 password".into(),
            ],
            settings: vec![],
            tls: Some((pki.server_cert.clone(), pki.server_key.clone())),
        };
        let dev = DevCluster::start(&options).expect("starting the test PostgreSQL");
        let setup = r#"
            CREATE ROLE sluice_app LOGIN PASSWORD 'app-pw';
            CREATE ROLE sluice_tls LOGIN PASSWORD 'tls-pw';
            CREATE ROLE sluice_trust LOGIN;
            CREATE ROLE sluice_plain LOGIN PASSWORD 'plain-pw';
            SET password_encryption = 'md5';
            CREATE ROLE sluice_md5 LOGIN PASSWORD 'md5-pw';
        "#;
        dev.psql("postgres", setup).expect("creating test roles");
        let (ca_path, cert_path, key_path) = pki.write_to(dev.dir()).expect("writing test certificates");
        Cluster {
            dev,
            ca_path,
            cert_path,
            key_path,
        }
    })
}

/// A fresh database owned by [`APP_ROLE`], named after the test.
pub async fn database(test: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = format!("t_{test}_{}", COUNTER.fetch_add(1, Ordering::Relaxed));
    let sql = format!("CREATE DATABASE {name} OWNER {APP_ROLE};");
    let db = name.clone();
    tokio::task::spawn_blocking(move || cluster().dev.psql("postgres", &sql))
        .await
        .expect("join")
        .unwrap_or_else(|err| panic!("creating database {db}: {err}"));
    name
}

/// Runs setup SQL as the application role, so what it creates belongs to
/// the role the gateway logs in as.
pub async fn setup(db: &str, sql: &str) {
    let admin = superuser(db).await;
    admin
        .batch_execute(&format!("SET ROLE {APP_ROLE}; {sql}; RESET ROLE"))
        .await
        .unwrap_or_else(|err| panic!("setup failed: {err}\n{sql}"));
}

/// Starts the real binary with `sluice serve --config PATH` and waits until
/// it is ready: the child, the rest of its log, and the port it listens on.
pub async fn serve_binary(
    config: &std::path::Path,
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    u16,
) {
    let (child, lines, port, _) = serve_binary_with_api(config).await;
    (child, lines, port)
}

/// Like [`serve_binary`], with the control API's base URL when it is on.
pub async fn serve_binary_with_api(
    config: &std::path::Path,
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    u16,
    Option<String>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(config)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("sluice serve");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let mut api = None;
    let port = loop {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("startup log")
            .expect("reading the log")
            .expect("sluice exited before it was ready");
        if let Some(addr) = line.split("control API ready listen=").nth(1) {
            api = Some(format!("http://{}", addr.trim()));
        }
        if let Some(addr) = line.split("gateway ready listen=").nth(1) {
            break addr
                .trim()
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("a port");
        }
    };
    (child, lines, port, api)
}

/// How many rows `table` of database `db` has, asked of PostgreSQL directly.
pub async fn count_rows(db: &str, table: &str) -> i64 {
    superuser(db)
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// How many backends of `direct`'s database are running exactly `query`
/// (asked over `direct`, a connection straight to PostgreSQL).
pub async fn running(direct: &tokio_postgres::Client, query: &str) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND state = 'active' AND query = $1",
            &[&query],
        )
        .await
        .unwrap()
        .get(0)
}

/// A superuser connection straight to PostgreSQL, for setup and checks.
pub async fn superuser(db: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&cluster().dev.superuser_url(db), tokio_postgres::NoTls)
        .await
        .expect("superuser connection");
    tokio::spawn(connection);
    client
}

/// How to configure a test gateway.
pub struct Spec {
    pub tls: bool,
    pub allow_plaintext: bool,
    pub max_connections: Option<usize>,
    pub max_sessions_per_identity: Option<usize>,
    pub max_message_size: Option<&'static str>,
    pub shutdown_grace: &'static str,
    /// An `[identity.oidc]` section.
    pub oidc: Option<String>,
    /// The access entries of the test database's target (TOML).
    pub access: String,
    /// Further TOML appended as is (more targets).
    pub extra: String,
    /// A `[policy]` section (inline rules); none means the permissive
    /// default (allow what is understood, refuse what is not: `unknown`
    /// requires approval, and no rule names approvers).
    pub policy: Option<String>,
    /// A statement gate to use instead of the configured policy.
    pub gate: Option<Arc<dyn StatementGate>>,
}

impl Default for Spec {
    fn default() -> Spec {
        Spec {
            tls: true,
            allow_plaintext: true,
            max_connections: None,
            max_sessions_per_identity: None,
            max_message_size: None,
            shutdown_grace: "30s",
            oidc: None,
            access: format!(
                "[[targets.access]]\nidentities = [\"*\"]\nrole = \"{APP_ROLE}\"\npassword = \"{APP_PASSWORD}\"\n"
            ),
            extra: String::new(),
            policy: None,
            gate: None,
        }
    }
}

/// A gateway serving one test database.
pub struct TestGateway {
    pub addr: std::net::SocketAddr,
    pub db: String,
    pub shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    /// The gateway's audit configuration (its trail's files).
    pub audit: sluice_core::config::AuditConfig,
    /// The control API's base URL, when it is on.
    pub api: Option<String>,
}

fn sha256_hex(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The configuration text for a spec, as an operator would write it.
pub fn config_text(spec: &Spec, db: &str) -> String {
    let c = cluster();
    let mut text = String::from("[server]\nlisten = \"127.0.0.1:0\"\n");
    text.push_str(&format!("allow_plaintext = {}\n", spec.allow_plaintext));
    text.push_str(&format!("shutdown_grace = \"{}\"\n", spec.shutdown_grace));
    if let Some(max) = spec.max_sessions_per_identity {
        text.push_str(&format!("max_sessions_per_identity = {max}\n"));
    }
    if let Some(max) = spec.max_connections {
        text.push_str(&format!("max_connections = {max}\n"));
    }
    if let Some(size) = spec.max_message_size {
        text.push_str(&format!("max_message_size = \"{size}\"\n"));
    }
    if spec.tls {
        text.push_str(&format!(
            "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            c.cert_path.display(),
            c.key_path.display()
        ));
    }
    for (name, token, groups, labels) in [
        ("alice", ALICE, "[\"engineering\"]", "{ kind = \"human\" }"),
        ("bob", BOB, "[\"oncall\"]", "{ kind = \"human\" }"),
        (
            "agent",
            AGENT,
            "[\"analytics\"]",
            "{ kind = \"agent\", model = \"test-model\" }",
        ),
    ] {
        text.push_str(&format!(
            "\n[[identity.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\ngroups = {groups}\nlabels = {labels}\n",
            sha256_hex(token)
        ));
    }
    if let Some(oidc) = &spec.oidc {
        text.push('\n');
        text.push_str(oidc);
        text.push('\n');
    }
    text.push_str(&format!(
        "\n[[targets]]\nname = \"{db}\"\nhost = \"127.0.0.1\"\nport = {}\ndatabase = \"{db}\"\ntls = \"disable\"\n\n{}\n",
        c.dev.port(),
        spec.access
    ));
    text.push_str(&spec.extra);
    if !spec.extra.contains("[audit]") {
        // Each gateway its own trail (a trail has one writer), in the
        // cluster's throwaway directory.
        static TRAILS: AtomicUsize = AtomicUsize::new(0);
        let n = TRAILS.fetch_add(1, Ordering::Relaxed);
        let path = c.dev.dir().join(format!("audit-{db}-{n}.db"));
        text.push_str(&format!(
            "\n[audit]\npath = \"{}\"\nsync = \"normal\"\n",
            path.display()
        ));
    }
    if !spec.extra.contains("[api]") {
        text.push_str(
            "\n[api]\nlisten = \"127.0.0.1:0\"\nviewer_groups = [\"engineering\"]\nadmin_groups = [\"oncall\"]\n",
        );
    }
    if let Some(policy) = &spec.policy {
        text.push('\n');
        text.push_str(policy);
        text.push('\n');
    }
    text
}

impl TestGateway {
    /// Starts a gateway for a fresh database named after the test.
    pub async fn start(test: &str, spec: Spec) -> TestGateway {
        let db = database(test).await;
        TestGateway::start_for(db, spec).await
    }

    /// Starts a gateway for an existing database.
    pub async fn start_for(db: String, spec: Spec) -> TestGateway {
        events::install();
        let text = config_text(&spec, &db);
        let config = Config::from_toml(&text, std::path::Path::new("test.toml"))
            .unwrap_or_else(|err| panic!("test configuration invalid: {err}\n{text}"));
        let gate = spec
            .gate
            .unwrap_or_else(|| Arc::new(PolicyGate::new(&config)) as Arc<dyn StatementGate>);
        let audit = config.audit.clone();
        let gateway = Gateway::bind(config, gate).await.expect("binding the gateway");
        let addr = gateway.local_addr();
        let api = gateway.api_addr().map(|a| format!("http://{a}"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gateway.run(shutdown.clone()));
        TestGateway {
            addr,
            db,
            shutdown,
            task: Some(task),
            audit,
            api,
        }
    }

    /// A libpq connection string for this gateway's database.
    pub fn conn_str(&self, user: &str, token: &str, extra: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={} user={user} password={token} {extra}",
            self.addr.port(),
            self.db
        )
    }

    /// A tokio-postgres client for another target of this gateway.
    pub async fn connect_target(
        &self,
        target: &str,
        token: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let conn = format!(
            "host=127.0.0.1 port={} dbname={target} user=tester password={token}",
            self.addr.port()
        );
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// A tokio-postgres client through the gateway (plaintext on loopback).
    pub async fn connect(&self, token: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.connect_with(token, "").await
    }

    pub async fn connect_with(
        &self,
        token: &str,
        extra: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.conn_str("tester", token, extra), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Runs psql against this gateway with `args` after the connection string.
    pub async fn psql(&self, token: &str, conn_extra: &str, args: &[&str]) -> Output {
        psql(&self.conn_str("tester", token, conn_extra), args, None).await
    }

    /// Waits for the gateway's run loop to finish (after `shutdown`).
    pub async fn finished(&mut self) {
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("gateway did not stop")
                .expect("gateway task panicked");
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs psql non-interactively: no psqlrc, stop on error, unaligned output.
pub async fn psql(conn: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new("psql");
    cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", conn])
        .args(args)
        .env_remove("PGPASSWORD")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("running psql");
    let mut input = child.stdin.take().expect("psql stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.expect("writing to psql");
    }
    drop(input);
    tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("psql did not finish")
        .expect("psql output")
}

/// stdout of a successful command, or a panic showing its stderr.
pub fn stdout_ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The SQLSTATE and message of a tokio-postgres error from the server.
pub fn db_error(err: &tokio_postgres::Error) -> (String, String) {
    match err.as_db_error() {
        Some(db) => (db.code().code().to_string(), db.message().to_string()),
        None => ("".into(), err.to_string()),
    }
}

/// Polls `check` until it returns true or [`PATIENCE`] passes. For waiting
/// on effects in other processes (a query becoming active), where no event
/// can be awaited.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, PATIENCE, check).await
}

/// [`eventually`] with a bound of its own, for a test whose point is that
/// it happens sooner than something else would make it happen.
pub async fn eventually_within<F, Fut>(what: &str, bound: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + bound;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
