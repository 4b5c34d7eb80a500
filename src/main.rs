//! The `sluice` command: a thin CLI over `sluice-core`.

mod audit_cmd;
mod connect_cmd;
mod demo;
mod login_cmd;
mod policy_cmd;
mod request_cmd;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_core::api::client::SharedToken;
use sluice_core::{Config, Gateway, PolicyGate};
use tokio_util::sync::CancellationToken;

/// Identity-aware access gateway for PostgreSQL.
#[derive(Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file.
        #[arg(long, short, default_value = "config/sluice.toml")]
        config: PathBuf,
    },
    /// Start a throwaway PostgreSQL with demo data and a gateway in front of it.
    Demo {
        /// Print how to connect and wait for ctrl-c instead of opening the
        /// console (also when the terminal is not interactive).
        #[arg(long)]
        no_console: bool,
        /// Where the gateway listens for PostgreSQL clients.
        #[arg(long, default_value = "127.0.0.1:7432")]
        listen: std::net::SocketAddr,
        /// Where the control API listens.
        #[arg(long, default_value = "127.0.0.1:7480")]
        api_listen: std::net::SocketAddr,
    },
    /// Check a configuration file without starting anything.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Explain and test the statement policy.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Verify, browse and export the audit trail.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// The operator console: live sessions, activity, approvals, a masked
    /// query shell and session replay, in the terminal.
    Console {
        /// The gateway's control API.
        #[arg(long, env = "SLUICE_API", default_value = "http://127.0.0.1:7480")]
        api: String,
        /// Your Sluice token (for the API and the shell's connection);
        /// without it, the ID token of `sluice login`, renewed as it runs
        /// out.
        #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The gateway's PostgreSQL listener, for the shell.
        #[arg(long, env = "SLUICE_PG", default_value = "127.0.0.1:7432")]
        pg: String,
        /// The shell's target (the database name clients use); `\c NAME` in
        /// the shell changes it.
        #[arg(long, default_value = "")]
        target: String,
        /// The CA that signed the gateway's certificate (PEM). The shell
        /// uses TLS (verifying the gateway's certificate and name, against
        /// this CA or the system's) unless the gateway is on loopback and
        /// no CA is given.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
    },
    /// The approval bot: posts held statements and access requests to Slack
    /// and/or Discord with Approve and Deny buttons, and forwards clicks to
    /// the gateway on behalf of the mapped approver.
    Bot {
        /// The bot's configuration (see config/bot-slack.toml and
        /// config/bot-discord.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Ask for a time-bound grant (policy [[grants]] with approvers) and
    /// wait for approvers: exits 0 once approved, 1 if denied or expired.
    Request {
        /// The target the grant is for.
        #[arg(long)]
        target: String,
        /// The grant's name in the policy.
        #[arg(long)]
        grant: String,
        /// How long it should hold once approved: 30m, 2h...
        #[arg(long = "for", value_name = "DURATION", default_value = "30m")]
        duration: String,
        /// Why: recorded and shown to approvers.
        #[arg(long)]
        reason: String,
        /// The gateway's control API.
        #[arg(long, env = "SLUICE_API", default_value = "http://127.0.0.1:7480")]
        api: String,
        /// Your Sluice token.
        #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Print the request id and return without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Sign in with OpenID Connect in a browser (authorization code with
    /// PKCE, redirect to a loopback port); the tokens are cached for
    /// `sluice token`, `whoami` and `connect`, readable only by you.
    Login {
        /// The identity provider (the issuer the gateway trusts); default:
        /// the one you signed in to last.
        #[arg(long, env = "SLUICE_ISSUER")]
        issuer: Option<String>,
        /// Sluice's client id at the provider (the gateway's `audience`).
        /// Default: the one used at the last sign-in to this issuer, else
        /// "sluice".
        #[arg(long, env = "SLUICE_CLIENT_ID")]
        client_id: Option<String>,
        /// The device flow, for a machine without a browser: sign in on
        /// another device with the code shown.
        #[arg(long)]
        device: bool,
    },
    /// Open a tunnel on loopback for one target: psql, DBeaver or a JDBC
    /// app connect to it with no password, and it logs them in to the
    /// gateway with your token (renewed when it runs out). Only your local
    /// user may use it.
    Connect {
        /// The target: the database name at the gateway.
        target: String,
        /// The local port (on 127.0.0.1); 0 picks a free one.
        #[arg(long, default_value_t = 6543)]
        port: u16,
        /// The gateway's PostgreSQL listener, HOST:PORT.
        #[arg(long, env = "SLUICE_GATEWAY", default_value = "127.0.0.1:7432")]
        gateway: String,
        /// The CA that signed the gateway's certificate (PEM). The tunnel
        /// uses TLS to the gateway (verifying its certificate and name,
        /// against this CA or the system's) unless the gateway is on
        /// loopback and no CA is given.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        #[arg(long, env = "SLUICE_ISSUER")]
        issuer: Option<String>,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Forget the cached tokens of an issuer.
    Logout {
        #[arg(long, env = "SLUICE_ISSUER")]
        issuer: Option<String>,
    },
    /// Show who you are signed in as: identity, groups, expiry.
    Whoami {
        #[arg(long, env = "SLUICE_ISSUER")]
        issuer: Option<String>,
    },
    /// Print a fresh ID token (renewed first when it runs out), for clients
    /// that take it as their password; use it over TLS. With
    /// --client-credentials, a service's access token instead (the client
    /// secret comes from SLUICE_CLIENT_SECRET, never the command line).
    Token {
        #[arg(long, env = "SLUICE_ISSUER")]
        issuer: Option<String>,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Print the SHA-256 to configure for a service token read from stdin
    /// (or for a new random token with --generate).
    HashToken {
        /// Generate a new random token and print it with its hash.
        #[arg(long)]
        generate: bool,
    },
}

/// A service signing in with the OAuth client credentials grant (the
/// secret from SLUICE_CLIENT_SECRET, never the command line).
#[derive(clap::Args)]
struct ServiceFlags {
    /// Sign in as a service with the OAuth client credentials grant
    /// instead of as the person of `sluice login`.
    #[arg(long, requires = "client_id")]
    client_credentials: bool,
    /// The service's client id at the provider.
    #[arg(long, env = "SLUICE_CLIENT_ID")]
    client_id: Option<String>,
    /// The resource to ask a token for: the gateway's `service_audience`
    /// (RFC 8707).
    #[arg(long, env = "SLUICE_RESOURCE")]
    resource: Option<String>,
    /// Scopes to ask for (comma-separated or repeated), as the provider
    /// wants them.
    #[arg(long = "scope", value_delimiter = ',')]
    scopes: Vec<String>,
}

impl ServiceFlags {
    /// The service's sign-in, when --client-credentials is given.
    fn service(self, issuer: Option<String>) -> Option<login_cmd::ServiceArgs> {
        self.client_credentials.then(|| login_cmd::ServiceArgs {
            issuer,
            client_id: self.client_id.unwrap_or_default(),
            resource: self.resource,
            scopes: self.scopes,
        })
    }
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Classify a statement and show every matching rule and the decision.
    /// Exits 0 when allowed, 1 when denied, 2 when it needs approval.
    Check {
        #[arg(long, short, default_value = "config/sluice.toml")]
        config: PathBuf,
        /// The identity's name.
        #[arg(long)]
        user: String,
        /// The identity's groups (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Identity labels, key=value (repeatable): --label kind=agent.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// The target, as a client would name it in dbname.
        #[arg(long)]
        target: String,
        /// Assume these requested grants approved (comma-separated or
        /// repeated): what an approved `sluice request` changes.
        #[arg(long = "grant", value_delimiter = ',')]
        grants: Vec<String>,
        /// The statement text.
        sql: String,
    },
    /// Run a table of cases (identity, target, statement, expected decision).
    Test {
        #[arg(long, short, default_value = "config/sluice.toml")]
        config: PathBuf,
        /// The case file (TOML).
        file: PathBuf,
    },
}

/// Where the trail is: `--path` (with `--key-file` / `--head-file`), or
/// the `[audit]` section of `--config`.
#[derive(clap::Args)]
struct TrailArgs {
    #[arg(long, short, default_value = "config/sluice.toml")]
    config: PathBuf,
    /// The audit database, instead of the configuration's.
    #[arg(long)]
    path: Option<PathBuf>,
    /// The signing key file (its public half checks the signatures).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// The head file kept beside the trail.
    #[arg(long)]
    head_file: Option<PathBuf>,
}

impl TrailArgs {
    fn files(self) -> anyhow::Result<audit_cmd::TrailFiles> {
        audit_cmd::TrailFiles::resolve(&self.config, self.path, self.key_file, self.head_file)
    }
}

#[derive(Subcommand)]
enum AuditAction {
    /// Walk the hash chain and check its signatures; exits 1 and names the
    /// first broken event if anything was edited, removed, reordered or
    /// re-signed.
    Verify {
        #[command(flatten)]
        trail: TrailArgs,
        /// The gateway's public key (64 hex digits, from `sluice audit
        /// public-key`); without it, taken from the signing key file.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Print the public key that verifies the trail (hand it to auditors).
    PublicKey {
        #[command(flatten)]
        trail: TrailArgs,
    },
    /// List sessions, newest first.
    Sessions {
        #[command(flatten)]
        trail: TrailArgs,
        #[arg(long, default_value_t = 50)]
        limit: u64,
    },
    /// Show one session's events in order.
    Show {
        #[command(flatten)]
        trail: TrailArgs,
        /// The session id (from `sluice audit sessions`).
        session: String,
    },
    /// Who touched a relation or tagged data (read or write, masked or
    /// clear), or what an identity touched.
    Lineage {
        #[command(flatten)]
        trail: TrailArgs,
        /// A relation: customers or public.customers.
        #[arg(long)]
        relation: Option<String>,
        /// A tag from [[audit.tags]]: pii, finance...
        #[arg(long)]
        tag: Option<String>,
        /// An identity's name.
        #[arg(long)]
        identity: Option<String>,
    },
    /// Write the evidence pack for a period (Markdown and JSON): who accessed
    /// what, approvals, refusals, unmask grant uses, tagged data seen masked
    /// or clear, and the chain's verification. Exits 1 if the chain is broken.
    Report {
        #[command(flatten)]
        trail: TrailArgs,
        #[arg(long)]
        public_key: Option<String>,
        /// From: 2026-11-01, an RFC 3339 time, or an age like 30d.
        #[arg(long, default_value = "30d")]
        since: String,
        #[arg(long)]
        until: Option<String>,
        /// Directory for sluice-evidence.md and sluice-evidence.json.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Write events as JSON lines or CSV, for a SIEM.
    Export {
        #[command(flatten)]
        trail: TrailArgs,
        /// From: 2026-11-01, 2026-11-01T10:00:00Z, or an age like 30d.
        #[arg(long)]
        since: Option<String>,
        /// Until (exclusive), in the same forms.
        #[arg(long)]
        until: Option<String>,
        /// jsonl or csv.
        #[arg(long, default_value = "jsonl")]
        format: String,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate a configuration file and report every problem with its line.
    Check {
        #[arg(long, short, default_value = "config/sluice.toml")]
        config: PathBuf,
    },
}

/// mimalloc, not glibc's malloc. A gateway's memory is made on one thread
/// and freed on another all the time: a session's events are built on its
/// runtime worker and freed by the audit writer thread in batches of
/// thousands (statement events' buffers mostly go back to the sessions
/// for reuse instead), and a task's buffers move between workers. Past a small
/// per-thread cache, glibc takes each such free back to the arena that made
/// it, under that arena's lock, while the sessions allocate from it;
/// mimalloc pushes it onto its page's lock-free list, which the owning
/// thread collects in one go. Side by side in `bench/pgbench.sh`
/// (bench/README.md, "The allocator"), the gateway with its trail on takes
/// less CPU per transaction with it; with the trail off, no less and no
/// more. The price is memory kept resident: 91 MB against 69 at `-c 50`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    // The console draws on the terminal: its logs (and those of a demo
    // running it) go to a file instead.
    if !matches!(cli.command, Command::Console { .. } | Command::Demo { .. }) {
        init_logging();
    }
    // Commands that print listings end quietly when their reader goes
    // away (`sluice audit sessions | head`), as other Unix tools do, rather
    // than panic on the closed pipe. (Rust ignores SIGPIPE; the gateway
    // needs that, and keeps it.)
    if matches!(cli.command, Command::Audit { .. } | Command::Policy { .. }) {
        // SAFETY: restores the default disposition before any thread
        // starts; nothing else handles SIGPIPE in these commands.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(err) = run(cli) {
        eprintln!("sluice: {err:#}");
        std::process::exit(1);
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            runtime(config.server.worker_threads)?.block_on(serve(config))
        }
        Command::Demo {
            listen,
            api_listen,
            no_console,
        } => {
            let console = !no_console
                && std::io::IsTerminal::is_terminal(&std::io::stdin())
                && std::io::IsTerminal::is_terminal(&std::io::stdout());
            if !console {
                init_logging();
            }
            runtime(0)?.block_on(demo::run(listen, api_listen, console))
        }
        Command::Console {
            api,
            token,
            pg,
            target,
            ca,
        } => {
            let runtime = runtime(2)?;
            let (token, renewal) = match token {
                Some(token) => (SharedToken::new(&token), None),
                None => {
                    let (token, renewal) = runtime
                        .block_on(login_cmd::renewed_token())
                        .context("no token: pass --token, set SLUICE_TOKEN, or sign in with sluice login")?;
                    (token, Some(renewal))
                }
            };
            let postgres = postgres_address(&pg, token.clone(), ca.as_deref())?;
            runtime.block_on(async move {
                // Ends with the runtime, when the console quits.
                if let Some(renewal) = renewal {
                    tokio::spawn(renewal);
                }
                sluice_console::run(sluice_console::Options {
                    api,
                    token,
                    postgres,
                    target,
                    log_file: state_dir().join("console.log"),
                    history_file: Some(state_dir().join("shell_history")),
                    footer: Vec::new(),
                    confirm_quit: false,
                })
                .await
            })
        }
        Command::Login {
            issuer,
            client_id,
            device,
        } => runtime(1)?.block_on(login_cmd::login(issuer, client_id, device)),
        Command::Connect {
            target,
            port,
            gateway,
            ca,
            issuer,
            service,
        } => runtime(1)?.block_on(connect_cmd::run(
            connect_cmd::ConnectArgs {
                target: &target,
                port,
                gateway: &gateway,
                ca: ca.as_deref(),
                issuer: issuer.clone(),
            },
            service.service(issuer),
        )),
        Command::Logout { issuer } => runtime(1)?.block_on(login_cmd::logout(issuer)),
        Command::Whoami { issuer } => runtime(1)?.block_on(login_cmd::whoami(issuer)),
        Command::Token { issuer, service } => match service.service(issuer.clone()) {
            Some(service) => runtime(1)?.block_on(login_cmd::service_token(service)),
            None => runtime(1)?.block_on(login_cmd::token(issuer)),
        },
        Command::Bot { config } => {
            let config = sluice_bot::BotConfig::load(&config)?;
            runtime(2)?.block_on(async {
                let bot = sluice_bot::Bot::bind(config).await?;
                for addr in bot.local_addrs() {
                    tracing::info!(%addr, "listening for chat interactions");
                }
                bot.run(shutdown_on_signal()?).await
            })
        }
        Command::Config {
            action: ConfigAction::Check { config },
        } => {
            let loaded = Config::load(&config)?;
            sluice_core::server::check_files(&loaded)?;
            println!(
                "{}: OK ({} target{}, {} service token{}, OIDC {})",
                config.display(),
                loaded.targets.len(),
                if loaded.targets.len() == 1 { "" } else { "s" },
                loaded.identity.tokens.len(),
                if loaded.identity.tokens.len() == 1 { "" } else { "s" },
                if loaded.identity.oidc.is_some() { "on" } else { "off" },
            );
            Ok(())
        }
        Command::Policy {
            action:
                PolicyAction::Check {
                    config,
                    user,
                    groups,
                    labels,
                    target,
                    grants,
                    sql,
                },
        } => {
            let code = policy_cmd::check(policy_cmd::CheckArgs {
                config: &config,
                user: &user,
                groups: &groups,
                labels: &labels,
                target: &target,
                sql: &sql,
                grants: &grants,
            })?;
            std::process::exit(code)
        }
        Command::Policy {
            action: PolicyAction::Test { config, file },
        } => {
            let code = policy_cmd::test(&config, &file)?;
            std::process::exit(code)
        }
        Command::Audit { action } => match action {
            AuditAction::Verify { trail, public_key } => {
                let code = audit_cmd::verify(&trail.files()?, public_key.as_deref())?;
                std::process::exit(code)
            }
            AuditAction::PublicKey { trail } => audit_cmd::print_public_key(&trail.files()?),
            AuditAction::Sessions { trail, limit } => audit_cmd::sessions(&trail.files()?, limit),
            AuditAction::Show { trail, session } => audit_cmd::show(&trail.files()?, &session),
            AuditAction::Report {
                trail,
                public_key,
                since,
                until,
                out,
            } => {
                let code = audit_cmd::report(&trail.files()?, public_key.as_deref(), &since, until.as_deref(), &out)?;
                std::process::exit(code)
            }
            AuditAction::Lineage {
                trail,
                relation,
                tag,
                identity,
            } => audit_cmd::lineage(
                &trail.files()?,
                &sluice_core::audit::LineageQuery {
                    relation,
                    tag,
                    identity,
                },
            ),
            AuditAction::Export {
                trail,
                since,
                until,
                format,
            } => audit_cmd::export(&trail.files()?, since.as_deref(), until.as_deref(), &format),
        },
        Command::Request {
            target,
            grant,
            duration,
            reason,
            api,
            token,
            no_wait,
        } => {
            let code = runtime(1)?.block_on(request_cmd::run(request_cmd::RequestArgs {
                api,
                token,
                target,
                grant,
                duration,
                reason,
                wait: !no_wait,
            }))?;
            std::process::exit(code)
        }
        Command::HashToken { generate } => {
            let token = if generate {
                let bytes: [u8; 32] = rand::random();
                let token = format!("slc_{}", hex::encode(bytes));
                println!("token:  {token}");
                token
            } else {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("reading the token from stdin")?;
                line.trim().to_string()
            };
            anyhow::ensure!(!token.is_empty(), "no token on stdin: pipe one in, or use --generate");
            println!("sha256: {}", hex::encode(sluice_core::identity::hash_token(&token)));
            Ok(())
        }
    }
}

/// The async runtime: one worker per core unless `worker_threads` says otherwise.
fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder.enable_all().build().context("starting the async runtime")
}

/// Runs a gateway until ctrl-c or SIGTERM.
async fn serve(config: Config) -> anyhow::Result<()> {
    let gate = Arc::new(PolicyGate::new(&config));
    let gateway = Gateway::bind(config, gate).await?;
    let shutdown = shutdown_on_signal()?;
    gateway.run(shutdown).await;
    Ok(())
}

/// Where the console keeps its log and the shell's history:
/// `$XDG_STATE_HOME/sluice`, else `~/.local/state/sluice`.
pub(crate) fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("sluice");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/sluice"),
        None => std::env::temp_dir().join("sluice"),
    }
}

/// `HOST:PORT` of the gateway's PostgreSQL listener (given as `flag`) and
/// how to reach it: TLS with verification, except plaintext to a loopback
/// address when no CA is given.
pub(crate) fn gateway_address(
    address: &str,
    flag: &str,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<(String, u16, Option<Arc<rustls::ClientConfig>>)> {
    let (host, port) = address
        .rsplit_once(':')
        .with_context(|| format!("{flag} {address:?}: write HOST:PORT, e.g. 127.0.0.1:7432"))?;
    let port = port
        .parse()
        .with_context(|| format!("{flag} {address:?}: {port:?} is not a port number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let tls = if sluice_core::net::is_loopback_host(&host) && ca.is_none() {
        None
    } else {
        // The error says what and why in one line (its source is in it).
        let config = sluice_core::tls::client_config(ca)
            .map_err(|err| anyhow::anyhow!("setting up TLS to the gateway: {err}"))?;
        Some(Arc::new(config))
    };
    Ok((host, port, tls))
}

/// The console shell's connection to the gateway.
pub(crate) fn postgres_address(
    address: &str,
    token: SharedToken,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<sluice_console::effects::Postgres> {
    let (host, port, tls) = gateway_address(address, "--pg", ca)?;
    Ok(sluice_console::effects::Postgres {
        host,
        port,
        user: std::env::var("USER").unwrap_or_else(|_| "console".into()),
        token,
        tls,
    })
}

/// A token cancelled on the first ctrl-c or SIGTERM.
pub(crate) fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("ctrl-c received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
        cancel.cancel();
    });
    Ok(token)
}
