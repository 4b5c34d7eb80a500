//! Configuration in two stages: `raw` mirrors the TOML file with serde, and
//! [`Config::load`] validates it into the resolved types below, which the rest
//! of the gateway takes. Every problem names the file, the line and what to
//! write instead; all problems are reported at once.

mod policy;
mod raw;
mod units;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

pub use policy::{
    ApprovalConfig, ApprovalMode, DecisionKind, GrantConfig, GrantKind, GrantRequestConfig, Holders, Pattern,
    PolicyConfig, PolicyMode, RelationPattern, RuleConfig,
};
use raw::{RawAccess, RawConfig, RawIdentity, RawOidc, RawPolicy, RawServer, RawTarget, RawTls};

/// Reads a duration as the configuration writes it: `"30s"`, `"500ms"`,
/// `"5m"`, `"2h"`, or a whole number of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    units::parse_duration(&raw::RawDuration::Text(text.trim().to_string()))
}

/// A duration as a person writes it: `10m`, `1h30m`, `45s`.
pub fn human_duration(duration: std::time::Duration) -> String {
    let secs = duration.as_secs();
    match (secs / 3600, (secs % 3600) / 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

/// The validated configuration of one gateway.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from; relative paths in it were resolved against its directory.
    pub source: PathBuf,
    pub server: ServerConfig,
    pub tls: Option<TlsFiles>,
    pub identity: IdentityConfig,
    pub targets: Vec<Target>,
    pub policy: PolicyConfig,
    pub masking: MaskingConfig,
    pub audit: AuditConfig,
    pub api: ApiConfig,
}

/// What a caller of the control API may do; each role includes the ones
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ApiRole {
    /// Read sessions, events and metrics.
    Viewer,
    /// Also decide approvals.
    Approver,
    /// Also end sessions.
    Admin,
}

impl ApiRole {
    pub fn name(self) -> &'static str {
        match self {
            ApiRole::Viewer => "viewer",
            ApiRole::Approver => "approver",
            ApiRole::Admin => "admin",
        }
    }
}

/// `[api]`, validated.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub viewer_groups: Vec<String>,
    pub approver_groups: Vec<String>,
    pub admin_groups: Vec<String>,
    /// Chat bots that decide on behalf of the people they map.
    pub delegates: Vec<Delegate>,
}

/// `[[api.delegates]]`: a chat bot (`sluice bot`) that decides approvals on
/// behalf of people. It may act only as the people listed, with the groups
/// listed here (never groups the bot claims), only through its channels, and
/// never as itself. It may read what viewers read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegate {
    /// The bot's identity: its service token's name.
    pub identity: String,
    /// "slack", "discord".
    pub via: Vec<String>,
    /// Identity names (people's emails), trimmed, and their groups.
    pub people: BTreeMap<String, Vec<String>>,
}

impl Delegate {
    /// A listed person and their groups, by name in any case.
    pub fn person(&self, name: &str) -> Option<(&str, &[String])> {
        self.people
            .iter()
            .find(|(listed, _)| listed.eq_ignore_ascii_case(name.trim()))
            .map(|(listed, groups)| (listed.as_str(), groups.as_slice()))
    }
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            viewer_groups: Vec::new(),
            approver_groups: Vec::new(),
            admin_groups: Vec::new(),
            delegates: Vec::new(),
        }
    }
}

impl ApiConfig {
    /// The highest role these groups hold (`"*"` in a list means anyone).
    pub fn role_of(&self, groups: &[String]) -> Option<ApiRole> {
        let holds = |list: &[String]| list.iter().any(|g| g == "*" || groups.contains(g));
        if holds(&self.admin_groups) {
            Some(ApiRole::Admin)
        } else if holds(&self.approver_groups) {
            Some(ApiRole::Approver)
        } else if holds(&self.viewer_groups) {
            Some(ApiRole::Viewer)
        } else {
            None
        }
    }

    /// The chat bot a service token named `identity` is, if it is one.
    pub fn delegate(&self, identity: &str) -> Option<&Delegate> {
        self.delegates.iter().find(|d| d.identity == identity)
    }

    /// Who holds a role, for error messages.
    pub fn who_has(&self, role: ApiRole) -> String {
        let mut groups: Vec<&str> = Vec::new();
        let lists: &[&Vec<String>] = match role {
            ApiRole::Viewer => &[&self.viewer_groups, &self.approver_groups, &self.admin_groups],
            ApiRole::Approver => &[&self.approver_groups, &self.admin_groups],
            ApiRole::Admin => &[&self.admin_groups],
        };
        for list in lists {
            for group in list.iter() {
                if !groups.contains(&group.as_str()) {
                    groups.push(group);
                }
            }
        }
        if groups.is_empty() {
            format!("no group holds it; see [api] {}_groups", role.name())
        } else {
            format!("held by groups {}", groups.join(", "))
        }
    }
}

/// What a session does when the audit trail cannot record its statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnAuditFailure {
    /// Refuse them: nothing runs unrecorded.
    Refuse,
    /// Run them anyway, and log that the trail is behind.
    Continue,
}

/// `[audit]`, validated.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub enabled: bool,
    /// The SQLite database of the trail.
    pub path: PathBuf,
    /// The Ed25519 signing key (created, readable only by its owner, when
    /// missing). Outside the database, so that whoever can rewrite the
    /// database cannot sign what they wrote.
    pub key_file: PathBuf,
    /// The newest signed chain head, kept outside the database.
    pub head_file: PathBuf,
    pub sync: crate::audit::SyncMode,
    pub sign_every: u64,
    pub sign_interval: Duration,
    pub on_failure: OnAuditFailure,
    /// Keep events this long; `None` keeps everything.
    pub retention: Option<Duration>,
    /// Result rows kept per statement (masked), for replay.
    pub sample_rows: usize,
    /// Data set tags of relations, for lineage.
    pub tags: Vec<TagRule>,
}

/// `[[audit.tags]]`: relations and columns that carry a tag (`pii`,
/// `finance`...).
#[derive(Debug, Clone)]
pub struct TagRule {
    pub tag: String,
    /// Every column of these relations carries the tag.
    pub relations: Vec<RelationPattern>,
    /// These columns carry it (`customers.email`, `*.ssn`).
    pub columns: Vec<ColumnPattern>,
}

impl AuditConfig {
    /// The defaults for a configuration file in `base`.
    fn defaults(base: &Path) -> AuditConfig {
        AuditConfig {
            enabled: true,
            path: base.join("audit.db"),
            key_file: base.join("audit.key"),
            head_file: base.join("audit.head"),
            // An event survives the gateway's crash (the kill -9 case the
            // write-ahead rule is about) without an fsync per commit, which
            // costs milliseconds on ordinary disks.
            sync: crate::audit::SyncMode::Normal,
            sign_every: 1000,
            sign_interval: Duration::from_secs(10),
            on_failure: OnAuditFailure::Refuse,
            retention: None,
            sample_rows: 3,
            tags: Vec::new(),
        }
    }
}

/// `[masking]`, validated.
#[derive(Debug, Clone)]
pub struct MaskingConfig {
    /// Content detectors run on every value; empty when masking is off.
    pub detectors: crate::mask::DetectorSet,
    /// Column rules, in file order: the first that matches a column and
    /// applies to the identity decides.
    pub rules: Vec<MaskRule>,
    /// How long a target's catalog snapshot (which columns the rules match)
    /// is used before it is read again.
    pub catalog_ttl: Duration,
}

/// One `[[masking.rules]]` entry.
#[derive(Debug, Clone)]
pub struct MaskRule {
    pub columns: Vec<ColumnPattern>,
    pub strategy: std::sync::Arc<crate::mask::Strategy>,
    pub groups: Vec<String>,
}

/// A column pattern: `column`, `table.column` or `schema.table.column`,
/// each part a case-insensitive wildcard (`*`, `?`). Missing parts match any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnPattern {
    pub schema: String,
    pub table: String,
    pub column: String,
}

impl ColumnPattern {
    /// Reads a pattern; `None` if it has more than three parts, an empty
    /// part, or a character the catalog query cannot carry (`\`, `'`).
    pub fn parse(text: &str) -> Option<ColumnPattern> {
        if text.contains(['\\', '\'']) {
            return None;
        }
        let parts: Vec<&str> = text.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        let (schema, table, column) = match parts.as_slice() {
            [column] => ("*", "*", *column),
            [table, column] => ("*", *table, *column),
            [schema, table, column] => (*schema, *table, *column),
            _ => return None,
        };
        Some(ColumnPattern {
            schema: schema.to_string(),
            table: table.to_string(),
            column: column.to_string(),
        })
    }
}

impl MaskRule {
    /// Whether the rule applies to an identity with these groups.
    pub fn applies_to(&self, groups: &[String]) -> bool {
        self.groups.is_empty() || groups.iter().any(|g| self.groups.contains(g))
    }
}

impl Default for MaskingConfig {
    /// Every detector on, nobody unmasked: masking with zero configuration.
    fn default() -> MaskingConfig {
        MaskingConfig {
            detectors: crate::mask::DetectorSet::ALL,
            rules: Vec::new(),
            catalog_ttl: Duration::from_secs(60),
        }
    }
}

/// The PostgreSQL listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Sessions served at once; further clients get SQLSTATE 53300.
    pub max_connections: usize,
    /// Sessions one identity may have at once (0: no limit); further ones
    /// get SQLSTATE 53300, so that one identity cannot take every upstream
    /// connection from the others.
    pub max_sessions_per_identity: usize,
    /// Largest frontend message accepted; a larger one ends the session.
    pub max_message_size: usize,
    /// How long sessions may run on after a shutdown signal.
    pub shutdown_grace: Duration,
    /// How long a client may take from connecting to being authenticated.
    pub auth_timeout: Duration,
    /// Whether tokens may arrive without TLS. Only ever true on a loopback listener.
    pub allow_plaintext: bool,
    /// Threads serving sessions; 0 means one per CPU core.
    pub worker_threads: usize,
}

/// Certificate chain and private key of the client-facing TLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub oidc: Option<OidcConfig>,
    pub tokens: Vec<StaticTokenConfig>,
    /// What happens to a session when its token expires.
    pub on_token_expiry: OnTokenExpiry,
    /// With `FinishTransaction`: how long after expiry an open transaction
    /// may still run before the session ends anyway.
    pub token_expiry_grace: Duration,
}

impl Default for IdentityConfig {
    fn default() -> IdentityConfig {
        IdentityConfig {
            oidc: None,
            tokens: Vec::new(),
            on_token_expiry: OnTokenExpiry::FinishTransaction,
            token_expiry_grace: Duration::from_secs(300),
        }
    }
}

/// What a session does once the token it signed in with expires (static
/// service tokens never do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTokenExpiry {
    /// End it at once, with a FATAL error that says why; an open
    /// transaction is not committed.
    End,
    /// Let an open transaction finish (within the grace period), then end
    /// the session as soon as it is over: statements the client sends after
    /// it are not run, even pipelined ones (only those in the same
    /// simple-query string as the COMMIT are).
    FinishTransaction,
}

/// An OpenID Connect issuer whose ID tokens the gateway accepts.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub issuer: String,
    /// The `aud` the tokens must carry: the client id registered for Sluice.
    pub audience: String,
    /// The claim that lists the user's groups.
    pub groups_claim: String,
    /// Signature algorithms accepted (never `none`, never shared-secret HMAC).
    pub algorithms: Vec<String>,
    /// How often the key set is fetched again even without an unknown `kid`.
    pub jwks_refresh: Duration,
    /// Lower bound between two fetches, so unknown `kid`s cannot flood the issuer.
    pub min_refresh_interval: Duration,
    /// Timeout of each request to the issuer.
    pub http_timeout: Duration,
    /// The `aud` of access tokens that services get with the client
    /// credentials grant (the resource they ask for); `None`: no services.
    pub service_audience: Option<String>,
    /// The clients accepted as services, by client id.
    pub services: Vec<OidcService>,
}

/// A machine that signs in with OAuth client credentials at the issuer.
#[derive(Debug, Clone)]
pub struct OidcService {
    pub client_id: String,
    /// The `sub` its tokens carry: the client id unless the provider uses
    /// another (Keycloak's service account, Entra's service principal).
    pub subject: String,
    /// Its identity's name in policy and the trail.
    pub name: String,
    pub groups: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// A static service token; only its SHA-256 is configured.
#[derive(Debug, Clone)]
pub struct StaticTokenConfig {
    pub name: String,
    pub sha256: [u8; 32],
    pub groups: Vec<String>,
    /// Free-form labels (`kind = "agent"`, `model = "..."`) for auditors.
    pub labels: BTreeMap<String, String>,
}

/// An upstream database that clients reach by its name (their `dbname`).
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub address: UpstreamAddress,
    /// The database name on the upstream server.
    pub database: String,
    pub tls: UpstreamTls,
    /// CA certificates for `verify-ca` / `verify-full`; the system roots when absent.
    pub ca: Option<PathBuf>,
    /// Name checked against the server certificate; the host when absent.
    pub server_name: Option<String>,
    pub connect_timeout: Duration,
    /// Policy decisions here are recorded, not enforced.
    pub monitor: bool,
    /// Who may use this target and as which upstream role; first match wins.
    pub access: Vec<AccessRule>,
}

/// Where an upstream server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddress {
    Tcp {
        host: String,
        port: u16,
    },
    /// A Unix socket directory, as libpq's `host=/path`.
    Unix {
        dir: PathBuf,
        port: u16,
    },
}

impl fmt::Display for UpstreamAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
            UpstreamAddress::Unix { dir, port } => {
                write!(f, "{}/.s.PGSQL.{port}", dir.display())
            }
        }
    }
}

/// TLS towards the upstream server, with libpq's `sslmode` meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    Disable,
    /// Encrypt, do not verify the certificate.
    Require,
    /// Encrypt and verify the chain, not the name.
    VerifyCa,
    /// Encrypt, verify the chain and the host name.
    VerifyFull,
}

/// Maps identities or groups to an upstream role and its credentials.
#[derive(Debug, Clone)]
pub struct AccessRule {
    /// Identity names (token names, emails or subjects); `*` matches anyone.
    pub identities: Vec<String>,
    pub groups: Vec<String>,
    pub role: String,
    pub password: Option<Secret>,
}

/// A credential held by the gateway. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}", render_problems(path, problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

/// One thing wrong in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The included file the problem is in, when not the main file.
    pub file: Option<PathBuf>,
    /// 1-based line, when the problem belongs to one value.
    pub line: Option<usize>,
    pub message: String,
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!(
        "{} has {} problem{}:",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for problem in problems {
        let file = problem.file.as_deref().unwrap_or(path).display();
        match problem.line {
            Some(line) => out.push_str(&format!("\n  {file}:{line}: {}", problem.message)),
            None => out.push_str(&format!("\n  {file}: {}", problem.message)),
        }
    }
    out
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Validates configuration text as if it were read from `path`.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|err| {
            let (line, column) = err.span().map(|span| line_col(text, span.start)).unwrap_or((1, 1));
            ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message: err.message().trim().to_string(),
            }
        })?;
        let mut v = Validator {
            text,
            base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            problems: Vec::new(),
        };
        // Whether any identity source was written at all, valid or not: an
        // invalid one is reported on its own line, not again as "missing".
        let identity_written = raw.identity.oidc.is_some() || !raw.identity.tokens.is_empty();
        let server = v.server(raw.server);
        let tls = raw.tls.map(|tls| v.tls(tls));
        let identity = v.identity(raw.identity);
        let targets = v.targets(raw.targets);
        let policy = match raw.policy {
            None => PolicyConfig::permissive(path.to_path_buf()),
            Some(raw_policy) => v.policy_section(raw_policy, path)?,
        };
        let masking = raw.masking.map(|m| v.masking(m)).unwrap_or_default();
        let audit = v.audit(raw.audit.unwrap_or_default());
        // Machines a bot may be: service tokens and OIDC services.
        let token_names: Vec<&str> = identity
            .tokens
            .iter()
            .map(|t| t.name.as_str())
            .chain(
                identity
                    .oidc
                    .iter()
                    .flat_map(|oidc| oidc.services.iter().map(|s| s.name.as_str())),
            )
            .collect();
        let api = v.api(raw.api.unwrap_or_default(), &token_names);
        if let Some(server) = &server
            && tls.is_none()
            && !server.allow_plaintext
        {
            v.problem(
                None,
                "no [tls] section and allow_plaintext is off, so no client could ever \
                     authenticate: add [tls] with cert and key, or set server.allow_plaintext = true \
                     on a loopback listener",
            );
        }
        if !identity_written {
            v.problem(
                None,
                "no identity source: add [identity.oidc] or at least one [[identity.tokens]]",
            );
        }
        match server {
            Some(server) if v.problems.is_empty() => Ok(Config {
                source: path.to_path_buf(),
                server,
                tls,
                identity,
                targets,
                policy,
                masking,
                audit,
                api,
            }),
            _ => Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems: v.problems,
            }),
        }
    }

    /// The target a client names as its database.
    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

/// Collects problems while resolving raw values.
struct Validator<'a> {
    text: &'a str,
    base: PathBuf,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn problem(&mut self, span: Option<std::ops::Range<usize>>, message: impl Into<String>) {
        let line = span.map(|span| line_col(self.text, span.start).0);
        self.problems.push(Problem {
            file: None,
            line,
            message: message.into(),
        });
    }

    /// `[policy]`: inline, or `file = "..."` naming a policy file that is read
    /// and validated here, its problems reported with its own name and lines.
    fn policy_section(&mut self, raw: RawPolicy, main: &Path) -> Result<PolicyConfig, ConfigError> {
        let Some(file) = raw.file.clone() else {
            return Ok(self.policy(raw, main.to_path_buf()));
        };
        if raw.mode.is_some() || raw.default.is_some() || raw.unknown.is_some() || !raw.rules.is_empty() {
            self.at(
                &file,
                "[policy] names a file and also has policy keys of its own: keep the policy in one place",
            );
        }
        let path = self.path(file.get_ref());
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) => {
                self.at(&file, format!("cannot read the policy file {}: {err}", path.display()));
                return Ok(PolicyConfig::permissive(path));
            }
        };
        let raw: RawPolicy = toml::from_str(&text).map_err(|err| {
            let (line, column) = err.span().map(|span| line_col(&text, span.start)).unwrap_or((1, 1));
            ConfigError::Syntax {
                path: path.clone(),
                line,
                column,
                message: err.message().trim().to_string(),
            }
        })?;
        let mut inner = Validator {
            text: &text,
            base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            problems: Vec::new(),
        };
        if let Some(nested) = &raw.file {
            inner.at(nested, "a policy file cannot name another policy file");
        }
        let policy = inner.policy(raw, path.clone());
        for mut problem in inner.problems {
            problem.file = Some(path.clone());
            self.problems.push(problem);
        }
        Ok(policy)
    }

    /// `[api]`; `tokens`: the machines' names, of service tokens and OIDC
    /// services (a delegate is one).
    fn api(&mut self, raw: raw::RawApi, tokens: &[&str]) -> ApiConfig {
        let mut api = ApiConfig {
            enabled: raw.enabled.unwrap_or(true),
            viewer_groups: raw.viewer_groups,
            approver_groups: raw.approver_groups,
            admin_groups: raw.admin_groups,
            ..ApiConfig::default()
        };
        for raw in raw.delegates {
            let identity = raw.identity.get_ref().trim().to_string();
            if identity.is_empty() {
                self.at(
                    &raw.identity,
                    "api.delegates: identity is the bot's service token name; it cannot be empty",
                );
                continue;
            }
            if api.delegates.iter().any(|d| d.identity == identity) {
                self.at(
                    &raw.identity,
                    format!("api.delegates: \"{identity}\" is listed twice; merge its people into one entry"),
                );
                continue;
            }
            let mut via = Vec::new();
            for channel in raw.via.get_ref() {
                if !matches!(channel.as_str(), "slack" | "discord") {
                    self.at(
                        &raw.via,
                        format!(
                            "api.delegates \"{identity}\": via \"{channel}\" is not a chat channel; write \"slack\" and/or \"discord\""
                        ),
                    );
                } else if !via.contains(channel) {
                    via.push(channel.clone());
                }
            }
            if raw.via.get_ref().is_empty() {
                self.at(
                    &raw.via,
                    format!("api.delegates \"{identity}\": via names no channel; write via = [\"slack\"]"),
                );
            }
            let mut lowered: Vec<String> = raw.people.get_ref().keys().map(|p| p.trim().to_lowercase()).collect();
            lowered.sort();
            if lowered.windows(2).any(|w| w[0] == w[1]) {
                self.at(
                    &raw.people,
                    format!("api.delegates \"{identity}\": a person is listed twice (names compare without case)"),
                );
            }
            if !tokens.contains(&identity.as_str()) {
                self.at(
                    &raw.identity,
                    format!(
                        "api.delegates: \"{identity}\" is not the name of an [[identity.tokens]] entry or an [[identity.oidc.services]] client; a bot decides with its own machine identity"
                    ),
                );
            }
            if raw
                .people
                .get_ref()
                .keys()
                .any(|p| p.trim().is_empty() || p == "*" || p.trim().eq_ignore_ascii_case(&identity))
            {
                self.at(
                    &raw.people,
                    format!(
                        "api.delegates \"{identity}\": people are identity names (emails); \"*\", an empty name and the bot itself are not allowed"
                    ),
                );
            }
            api.delegates.push(Delegate {
                identity,
                via,
                people: raw
                    .people
                    .into_inner()
                    .into_iter()
                    .map(|(name, groups)| (name.trim().to_string(), groups))
                    .collect(),
            });
        }
        if let Some(listen) = &raw.listen {
            match listen.get_ref().parse() {
                Ok(addr) => api.listen = addr,
                Err(_) => self.at(
                    listen,
                    format!(
                        "api.listen = \"{}\" is not an address; write an IP and port such as \"127.0.0.1:7480\"",
                        listen.get_ref()
                    ),
                ),
            }
        }
        api
    }

    /// `[audit]`. The key and head files sit beside the database unless
    /// placed elsewhere.
    fn audit(&mut self, raw: raw::RawAudit) -> AuditConfig {
        let mut audit = AuditConfig::defaults(&self.base);
        audit.enabled = raw.enabled.unwrap_or(true);
        if let Some(path) = &raw.path {
            audit.path = self.path(path.get_ref());
            audit.key_file = audit.path.with_extension("key");
            audit.head_file = audit.path.with_extension("head");
        }
        if let Some(key) = &raw.key_file {
            audit.key_file = self.path(key.get_ref());
        }
        if let Some(head) = &raw.head_file {
            audit.head_file = self.path(head.get_ref());
        }
        if audit.key_file == audit.path || audit.head_file == audit.path || audit.key_file == audit.head_file {
            self.problem(None, "audit path, key_file and head_file must be three different files");
        }
        if let Some(sync) = &raw.sync {
            audit.sync = match sync.get_ref().as_str() {
                "full" => crate::audit::SyncMode::Full,
                "normal" => crate::audit::SyncMode::Normal,
                other => {
                    self.at(sync, format!("audit sync = \"{other}\"; write \"full\" (survives power loss) or \"normal\" (survives a crash of the gateway)"));
                    crate::audit::SyncMode::Full
                }
            };
        }
        if let Some(every) = &raw.sign_every {
            match u64::try_from(*every.get_ref()) {
                Ok(n) if n >= 1 => audit.sign_every = n,
                _ => self.at(every, "audit sign_every must be 1 or more rows"),
            }
        }
        audit.sign_interval = self.duration("audit sign_interval", raw.sign_interval, audit.sign_interval);
        if audit.sign_interval.is_zero() {
            audit.sign_interval = Duration::from_millis(10);
        }
        for tag in raw.tags {
            let name = tag.tag.get_ref().trim().to_string();
            if name.is_empty() {
                self.at(&tag.tag, "an audit tag needs a name (\"pii\", \"finance\"...)");
                continue;
            }
            let mut relations = Vec::new();
            for text in &tag.relations {
                match policy::relation_pattern(text.get_ref()) {
                    Some(pattern) => relations.push(pattern),
                    None => self.at(
                        text,
                        format!(
                            "audit tag \"{name}\": \"{}\" is not a relation pattern; write \"table\", \"schema.table\" or \"billing.*\"",
                            text.get_ref()
                        ),
                    ),
                }
            }
            let mut columns = Vec::new();
            for text in &tag.columns {
                match ColumnPattern::parse(text.get_ref()) {
                    Some(pattern) => columns.push(pattern),
                    None => self.at(
                        text,
                        format!(
                            "audit tag \"{name}\": \"{}\" is not a column pattern; write \"column\", \"table.column\" or \"schema.table.column\" (wildcards * and ?)",
                            text.get_ref()
                        ),
                    ),
                }
            }
            if tag.relations.is_empty() && tag.columns.is_empty() {
                self.at(
                    &tag.tag,
                    format!("audit tag \"{name}\" names nothing: add relations = [\"customers\"] or columns = [\"customers.email\"]"),
                );
            }
            audit.tags.push(TagRule {
                tag: name,
                relations,
                columns,
            });
        }
        if let Some(rows) = &raw.sample_rows {
            match usize::try_from(*rows.get_ref()) {
                Ok(rows) if rows <= 100 => audit.sample_rows = rows,
                _ => self.at(rows, "audit sample_rows must be 0 (none) to 100"),
            }
        }
        if let Some(days) = &raw.retention_days {
            match u64::try_from(*days.get_ref()) {
                Ok(0) => audit.retention = None,
                Ok(days) if days <= 36_500 => audit.retention = Some(Duration::from_secs(days * 86_400)),
                _ => self.at(days, "audit retention_days must be 0 (keep everything) to 36500"),
            }
        }
        if let Some(mode) = &raw.on_audit_failure {
            audit.on_failure = match mode.get_ref().as_str() {
                "refuse" => OnAuditFailure::Refuse,
                "continue" => OnAuditFailure::Continue,
                other => {
                    self.at(
                        mode,
                        format!("audit on_audit_failure = \"{other}\"; write \"refuse\" or \"continue\""),
                    );
                    OnAuditFailure::Refuse
                }
            };
        }
        audit
    }

    /// `[masking]`.
    fn masking(&mut self, raw: raw::RawMasking) -> MaskingConfig {
        let mut masking = MaskingConfig::default();
        if let Some(moved) = &raw.unmasked_groups {
            self.at(
                moved,
                "masking.unmasked_groups is now a policy grant: write [[policy.grants]] (or [[grants]] in the policy file) \
                 with name = \"...\", grant = \"unmask\" and groups = [...]",
            );
        }
        if let Some(names) = raw.detectors {
            let mut set = crate::mask::DetectorSet::EMPTY;
            for name in &names {
                if name.get_ref() == "all" {
                    set = crate::mask::DetectorSet::ALL;
                    continue;
                }
                match name.get_ref().parse::<crate::mask::Detector>() {
                    Ok(detector) => set = set.with(detector),
                    Err(_) => self.at(
                        name,
                        format!(
                            "masking detectors: \"{}\" is not a detector; write \"all\" or some of: {}",
                            name.get_ref(),
                            crate::mask::Detector::ALL.map(|d| d.name()).join(", ")
                        ),
                    ),
                }
            }
            masking.detectors = set;
        }
        masking.catalog_ttl = self.duration("masking catalog_ttl", raw.catalog_ttl, masking.catalog_ttl);
        let key = self.hash_key(raw.hash_key_env, raw.hash_key_file);
        for rule in raw.rules {
            let strategy = match crate::mask::Strategy::parse(rule.strategy.get_ref(), key.as_ref()) {
                Ok(strategy) => Some(std::sync::Arc::new(strategy)),
                Err(err) => {
                    let hint = if key.is_none() && rule.strategy.get_ref().starts_with("hash") {
                        " (set hash_key_env or hash_key_file in [masking])"
                    } else {
                        ""
                    };
                    self.at(&rule.strategy, format!("masking rule: {err}{hint}"));
                    None
                }
            };
            let mut columns = Vec::new();
            for text in &rule.columns {
                match ColumnPattern::parse(text.get_ref()) {
                    Some(pattern) => columns.push(pattern),
                    None => self.at(
                        text,
                        format!(
                            "masking rule: \"{}\" is not a column pattern; write \"column\", \"table.column\" or \"schema.table.column\" (wildcards * and ?)",
                            text.get_ref()
                        ),
                    ),
                }
            }
            if rule.columns.is_empty() {
                self.at(
                    &rule.strategy,
                    "masking rule: columns is empty; name the columns it masks",
                );
            }
            let Some(strategy) = strategy else { continue };
            masking.rules.push(MaskRule {
                columns,
                strategy,
                groups: rule.groups,
            });
        }
        if raw.enabled == Some(false) {
            masking.detectors = crate::mask::DetectorSet::EMPTY;
            masking.rules.clear();
        }
        masking
    }

    /// The key of the `hash` strategy, from the environment or a file.
    fn hash_key(
        &mut self,
        env: Option<Spanned<String>>,
        file: Option<Spanned<String>>,
    ) -> Option<std::sync::Arc<crate::mask::HashKey>> {
        let (bytes, at) = match (env, file) {
            (Some(env), Some(file)) => {
                self.at(&file, "masking: set only one of hash_key_env and hash_key_file");
                let _ = env;
                return None;
            }
            (Some(env), None) => match std::env::var(env.get_ref()) {
                Ok(value) => (value.into_bytes(), env),
                Err(_) => {
                    let message = format!(
                        "masking hash_key_env: the environment variable {} is not set",
                        env.get_ref()
                    );
                    self.at(&env, message);
                    return None;
                }
            },
            (None, Some(file)) => {
                let path = self.path(file.get_ref());
                match std::fs::read(&path) {
                    Ok(mut bytes) => {
                        while bytes.last().is_some_and(|b| matches!(b, b'\r' | b'\n')) {
                            bytes.pop();
                        }
                        (bytes, file)
                    }
                    Err(err) => {
                        let message = format!("masking hash_key_file: cannot read {}: {err}", path.display());
                        self.at(&file, message);
                        return None;
                    }
                }
            }
            (None, None) => return None,
        };
        match crate::mask::HashKey::new(&bytes) {
            Ok(key) => Some(std::sync::Arc::new(key)),
            Err(err) => {
                self.at(&at, format!("masking hash key: {err}"));
                None
            }
        }
    }

    fn at<T>(&mut self, value: &Spanned<T>, message: impl Into<String>) {
        self.problem(Some(value.span()), message);
    }

    fn path(&self, value: &str) -> PathBuf {
        let path = Path::new(value);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }

    fn duration(&mut self, key: &str, value: Option<Spanned<raw::RawDuration>>, default: Duration) -> Duration {
        let Some(value) = value else { return default };
        match units::parse_duration(value.get_ref()) {
            Ok(duration) => duration,
            Err(message) => {
                self.at(&value, format!("{key}: {message}"));
                default
            }
        }
    }

    fn server(&mut self, raw: RawServer) -> Option<ServerConfig> {
        let listen = match &raw.listen {
            None => SocketAddr::from(([127, 0, 0, 1], 7432)),
            Some(listen) => match listen.get_ref().parse::<SocketAddr>() {
                Ok(addr) => addr,
                Err(_) => {
                    self.at(
                        listen,
                        format!(
                            "server.listen = \"{}\" is not an address: write an IP and a port, \
                             such as \"127.0.0.1:7432\" or \"0.0.0.0:7432\"",
                            listen.get_ref()
                        ),
                    );
                    return None;
                }
            },
        };
        let max_connections = match &raw.max_connections {
            None => 1000,
            Some(value) if *value.get_ref() >= 1 => *value.get_ref() as usize,
            Some(value) => {
                self.at(
                    value,
                    format!("server.max_connections = {} must be at least 1", value.get_ref()),
                );
                1
            }
        };
        let max_sessions_per_identity = match &raw.max_sessions_per_identity {
            None => 64,
            Some(value) if *value.get_ref() >= 0 => *value.get_ref() as usize,
            Some(value) => {
                self.at(
                    value,
                    format!(
                        "server.max_sessions_per_identity = {} must be 0 (no limit) or more",
                        value.get_ref()
                    ),
                );
                0
            }
        };
        let max_message_size = match &raw.max_message_size {
            None => 64 << 20,
            Some(value) => match units::parse_size(value.get_ref()) {
                Ok(size) if size >= 8 << 10 => size,
                Ok(size) => {
                    self.at(
                        value,
                        format!(
                            "server.max_message_size = {size} bytes is too small for ordinary \
                             queries: write at least \"8KiB\" (the default is \"64MiB\")"
                        ),
                    );
                    8 << 10
                }
                Err(message) => {
                    self.at(value, format!("server.max_message_size: {message}"));
                    64 << 20
                }
            },
        };
        let shutdown_grace = self.duration("server.shutdown_grace", raw.shutdown_grace, Duration::from_secs(30));
        let auth_timeout = self.duration("server.auth_timeout", raw.auth_timeout, Duration::from_secs(30));
        let allow_plaintext = raw.allow_plaintext.as_ref().is_some_and(|v| *v.get_ref());
        if allow_plaintext && !listen.ip().is_loopback() {
            let span = raw.allow_plaintext.as_ref().map(Spanned::span);
            self.problem(
                span,
                format!(
                    "server.allow_plaintext = true is only allowed on a loopback listener, \
                     and server.listen is {listen}: configure [tls] instead, or listen on 127.0.0.1"
                ),
            );
        }
        let worker_threads = match &raw.worker_threads {
            None => 0,
            Some(value) => match usize::try_from(*value.get_ref()) {
                Ok(n) if n <= 1024 => n,
                _ => {
                    self.at(
                        value,
                        format!(
                            "server.worker_threads = {} is out of range: write 0 (one per CPU core) or a number up to 1024",
                            value.get_ref()
                        ),
                    );
                    0
                }
            },
        };
        Some(ServerConfig {
            listen,
            max_connections,
            max_sessions_per_identity,
            max_message_size,
            shutdown_grace,
            auth_timeout,
            allow_plaintext,
            worker_threads,
        })
    }

    fn tls(&mut self, raw: RawTls) -> TlsFiles {
        TlsFiles {
            cert: self.path(raw.cert.get_ref()),
            key: self.path(raw.key.get_ref()),
        }
    }

    fn identity(&mut self, raw: RawIdentity) -> IdentityConfig {
        let oidc = raw.oidc.and_then(|oidc| self.oidc(oidc));
        let mut tokens = Vec::new();
        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        for token in raw.tokens {
            let name = token.name.get_ref().trim().to_string();
            if name.is_empty() {
                self.at(&token.name, "identity.tokens: name must not be empty");
                continue;
            }
            if !names.insert(name.clone()) {
                self.at(
                    &token.name,
                    format!("identity.tokens: the name \"{name}\" is used twice; token names identify people and machines and must be unique"),
                );
            }
            let mut sha256 = [0u8; 32];
            if hex::decode_to_slice(token.sha256.get_ref().trim(), &mut sha256).is_err() {
                self.at(
                    &token.sha256,
                    format!(
                        "identity.tokens \"{name}\": sha256 must be 64 hex digits, the SHA-256 of the \
                         token (print it with `sluice hash-token`), never the token itself"
                    ),
                );
                continue;
            }
            if !hashes.insert(sha256) {
                self.at(
                    &token.sha256,
                    format!("identity.tokens \"{name}\": this sha256 is already configured for another token"),
                );
            }
            tokens.push(StaticTokenConfig {
                name,
                sha256,
                groups: token.groups,
                labels: token.labels,
            });
        }
        for service in oidc.iter().flat_map(|oidc| &oidc.services) {
            if !names.insert(service.name.clone()) {
                self.problem(
                    None,
                    format!(
                        "identity.oidc.services: the name \"{}\" is used twice (by a service or a service token); names identify people and machines and must be unique",
                        service.name
                    ),
                );
            }
        }
        let defaults = IdentityConfig::default();
        let on_token_expiry = match &raw.on_token_expiry {
            None => defaults.on_token_expiry,
            Some(mode) => match mode.get_ref().as_str() {
                "end" => OnTokenExpiry::End,
                "finish_transaction" => OnTokenExpiry::FinishTransaction,
                other => {
                    self.at(
                        mode,
                        format!(
                            "identity.on_token_expiry = \"{other}\"; write \"end\" (end the session when its token expires) \
                             or \"finish_transaction\" (let an open transaction finish first)"
                        ),
                    );
                    OnTokenExpiry::End
                }
            },
        };
        let token_expiry_grace = self.duration(
            "identity.token_expiry_grace",
            raw.token_expiry_grace,
            defaults.token_expiry_grace,
        );
        IdentityConfig {
            oidc,
            tokens,
            on_token_expiry,
            token_expiry_grace,
        }
    }

    fn oidc(&mut self, raw: RawOidc) -> Option<OidcConfig> {
        let issuer = raw.issuer.get_ref().trim().to_string();
        if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
            self.at(
                &raw.issuer,
                format!(
                    "identity.oidc.issuer = \"{issuer}\" must be the issuer URL, such as \"https://login.example.com\""
                ),
            );
            return None;
        }
        let audience = raw.audience.get_ref().trim().to_string();
        if audience.is_empty() {
            self.at(
                &raw.audience,
                "identity.oidc.audience must be the client id that Sluice's tokens are issued for",
            );
        }
        const ACCEPTED: [&str; 9] = [
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
        ];
        let algorithms = match raw.algorithms {
            None => vec!["RS256".to_string()],
            Some(algs) => {
                let mut ok = Vec::new();
                for alg in algs.get_ref() {
                    if ACCEPTED.contains(&alg.as_str()) {
                        ok.push(alg.clone());
                    } else {
                        self.at(
                            &algs,
                            format!(
                                "identity.oidc.algorithms: \"{alg}\" is not accepted; use public-key \
                                 algorithms only ({}). `none` and shared-secret HS* would let \
                                 others mint tokens",
                                ACCEPTED.join(", ")
                            ),
                        );
                    }
                }
                if ok.is_empty() && algs.get_ref().is_empty() {
                    self.at(
                        &algs,
                        "identity.oidc.algorithms must list at least one algorithm, such as [\"RS256\"]",
                    );
                }
                ok
            }
        };
        let jwks_refresh = self.duration(
            "identity.oidc.jwks_refresh",
            raw.jwks_refresh,
            Duration::from_secs(3600),
        );
        let min_refresh_interval = self.duration(
            "identity.oidc.min_refresh_interval",
            raw.min_refresh_interval,
            Duration::from_secs(30),
        );
        let http_timeout = self.duration("identity.oidc.http_timeout", raw.http_timeout, Duration::from_secs(10));
        let service_audience = raw
            .service_audience
            .as_ref()
            .map(|aud| aud.get_ref().trim().to_string());
        if let Some(spanned) = &raw.service_audience {
            let aud = spanned.get_ref().trim();
            if aud.is_empty() || aud == audience {
                self.at(
                    spanned,
                    "identity.oidc.service_audience must be the resource services ask tokens for (such as \"urn:sluice\"), \
                     and differ from audience, so a person's ID token and a service's access token cannot be taken for each other",
                );
            }
        }
        let mut services = Vec::new();
        let mut client_ids = HashSet::new();
        for service in raw.services {
            let client_id = service.client_id.get_ref().trim().to_string();
            if service_audience.is_none() {
                self.at(
                    &service.client_id,
                    "identity.oidc.services need identity.oidc.service_audience: the `aud` of the access tokens services get",
                );
            }
            if client_id.is_empty() || !client_ids.insert(client_id.clone()) {
                self.at(
                    &service.client_id,
                    format!("identity.oidc.services: client_id \"{client_id}\" is empty or listed twice"),
                );
                continue;
            }
            services.push(OidcService {
                subject: service
                    .subject
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| client_id.clone()),
                name: service
                    .name
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| client_id.clone()),
                client_id,
                groups: service.groups,
                labels: service.labels,
            });
        }
        Some(OidcConfig {
            issuer,
            audience,
            groups_claim: raw.groups_claim.unwrap_or_else(|| "groups".to_string()),
            algorithms,
            jwks_refresh,
            min_refresh_interval,
            http_timeout,
            service_audience,
            services,
        })
    }

    fn targets(&mut self, raw: Vec<RawTarget>) -> Vec<Target> {
        let mut targets = Vec::new();
        let mut names = HashSet::new();
        for raw in raw {
            let name = raw.name.get_ref().trim().to_string();
            if name.is_empty() {
                self.at(&raw.name, "targets: name must not be empty");
                continue;
            }
            if !names.insert(name.clone()) {
                self.at(
                    &raw.name,
                    format!("targets: the name \"{name}\" is used twice; clients choose a target by name"),
                );
            }
            if let Some(target) = self.target(name, raw) {
                targets.push(target);
            }
        }
        targets
    }

    fn target(&mut self, name: String, raw: RawTarget) -> Option<Target> {
        let port = match &raw.port {
            None => 5432,
            Some(port) => match u16::try_from(*port.get_ref()) {
                Ok(port) if port > 0 => port,
                _ => {
                    self.at(
                        port,
                        format!("target \"{name}\": port = {} is not a TCP port", port.get_ref()),
                    );
                    return None;
                }
            },
        };
        let host = raw.host.get_ref().trim().to_string();
        let address = if host.starts_with('/') {
            UpstreamAddress::Unix {
                dir: PathBuf::from(&host),
                port,
            }
        } else if host.is_empty() {
            self.at(&raw.host, format!("target \"{name}\": host must not be empty"));
            return None;
        } else {
            UpstreamAddress::Tcp { host, port }
        };
        let local = match &address {
            UpstreamAddress::Unix { .. } => true,
            UpstreamAddress::Tcp { host, .. } => crate::net::is_loopback_host(host),
        };
        let tls = match &raw.tls {
            // A remote database is reached over the network: verify it unless told otherwise.
            None if local => UpstreamTls::Disable,
            None => UpstreamTls::VerifyFull,
            Some(mode) => match mode.get_ref().as_str() {
                "disable" => UpstreamTls::Disable,
                "require" => UpstreamTls::Require,
                "verify-ca" => UpstreamTls::VerifyCa,
                "verify-full" => UpstreamTls::VerifyFull,
                other => {
                    self.at(
                        mode,
                        format!(
                            "target \"{name}\": tls = \"{other}\" is not a mode; write \"disable\", \
                             \"require\", \"verify-ca\" or \"verify-full\""
                        ),
                    );
                    return None;
                }
            },
        };
        if matches!(address, UpstreamAddress::Unix { .. }) && tls != UpstreamTls::Disable {
            let span = raw.tls.as_ref().map(Spanned::span);
            self.problem(
                span,
                format!("target \"{name}\": a Unix socket cannot use TLS; write tls = \"disable\""),
            );
        }
        let ca = raw.ca.as_ref().map(|ca| self.path(ca.get_ref()));
        let connect_timeout = self.duration(
            &format!("target \"{name}\" connect_timeout"),
            raw.connect_timeout,
            Duration::from_secs(10),
        );
        if raw.access.is_empty() {
            self.at(
                &raw.name,
                format!(
                    "target \"{name}\" has no [[targets.access]] entry, so nobody could use it: \
                     add one that maps identities or groups to an upstream role"
                ),
            );
        }
        let access = raw
            .access
            .into_iter()
            .filter_map(|access| self.access(&name, access))
            .collect();
        Some(Target {
            database: raw.database.unwrap_or_else(|| name.clone()),
            monitor: raw.monitor,
            name,
            address,
            tls,
            ca,
            server_name: raw.server_name,
            connect_timeout,
            access,
        })
    }

    fn access(&mut self, target: &str, raw: RawAccess) -> Option<AccessRule> {
        if raw.identities.is_empty() && raw.groups.is_empty() {
            self.at(
                &raw.role,
                format!(
                    "target \"{target}\": an access entry for role \"{}\" names no identities and \
                     no groups; write identities = [\"alice@example.com\"] or groups = [\"oncall\"] \
                     (\"*\" in identities matches every verified identity)",
                    raw.role.get_ref()
                ),
            );
            return None;
        }
        let sources = [
            raw.password.is_some(),
            raw.password_env.is_some(),
            raw.password_file.is_some(),
        ];
        if sources.iter().filter(|&&set| set).count() > 1 {
            self.at(
                &raw.role,
                format!(
                    "target \"{target}\" role \"{}\": set only one of password, password_env and password_file",
                    raw.role.get_ref()
                ),
            );
            return None;
        }
        let password = if let Some(password) = raw.password {
            Some(Secret::new(password.into_inner()))
        } else if let Some(var) = raw.password_env {
            match std::env::var(var.get_ref()) {
                Ok(value) => Some(Secret::new(value)),
                Err(_) => {
                    self.at(
                        &var,
                        format!(
                            "target \"{target}\" role \"{}\": the environment variable {} is not set",
                            raw.role.get_ref(),
                            var.get_ref()
                        ),
                    );
                    return None;
                }
            }
        } else if let Some(file) = raw.password_file {
            let path = self.path(file.get_ref());
            match std::fs::read_to_string(&path) {
                Ok(value) => Some(Secret::new(value.trim_end_matches(['\r', '\n']))),
                Err(err) => {
                    self.at(
                        &file,
                        format!(
                            "target \"{target}\" role \"{}\": cannot read password_file {}: {err}",
                            raw.role.get_ref(),
                            path.display()
                        ),
                    );
                    return None;
                }
            }
        } else {
            None
        };
        Some(AccessRule {
            identities: raw.identities,
            groups: raw.groups,
            role: raw.role.into_inner(),
            password,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/sluice/sluice.toml"))
    }

    fn minimal() -> String {
        format!(
            r#"
[server]
allow_plaintext = true

[[identity.tokens]]
name = "ci"
sha256 = "{HASH}"
groups = ["deploy"]
labels = {{ kind = "agent", model = "m1" }}

[[targets]]
name = "shop"
host = "127.0.0.1"

[[targets.access]]
groups = ["deploy"]
role = "app"
password = "pw"
"#
        )
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = load(&minimal()).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:7432".parse().unwrap());
        assert_eq!(config.server.max_message_size, 64 << 20);
        assert_eq!(config.server.max_connections, 1000);
        assert_eq!(config.server.max_sessions_per_identity, 64);
        let target = config.target("shop").unwrap();
        assert_eq!(target.database, "shop");
        assert_eq!(target.tls, UpstreamTls::Disable);
        assert_eq!(
            target.address,
            UpstreamAddress::Tcp {
                host: "127.0.0.1".into(),
                port: 5432
            }
        );
        assert_eq!(config.identity.tokens[0].labels["kind"], "agent");
        assert_eq!(format!("{:?}", target.access[0].password), "Some(Secret(..))");
    }

    #[test]
    fn remote_targets_verify_tls_by_default() {
        let text = minimal().replace("host = \"127.0.0.1\"", "host = \"db.internal\"");
        let config = load(&text).unwrap();
        assert_eq!(config.targets[0].tls, UpstreamTls::VerifyFull);
    }

    #[test]
    fn unknown_key_names_line() {
        let text = minimal().replace("allow_plaintext = true", "allow_plaintext = true\nmax_conections = 5");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.starts_with("/etc/sluice/sluice.toml:4:"), "{err}");
        assert!(err.contains("max_conections"), "{err}");
    }

    #[test]
    fn all_problems_reported_with_lines() {
        let text = minimal()
            .replace(
                "allow_plaintext = true",
                "allow_plaintext = true\nlisten = \"0.0.0.0:7432\"",
            )
            .replace(HASH, "not-a-hash")
            .replace("host = \"127.0.0.1\"", "host = \"127.0.0.1\"\ntls = \"sometimes\"");
        let err = load(&text).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("expected validation problems, got {err}");
        };
        let rendered = err.to_string();
        assert!(rendered.contains("only allowed on a loopback listener"), "{rendered}");
        assert!(rendered.contains("64 hex digits"), "{rendered}");
        assert!(rendered.contains("\"sometimes\" is not a mode"), "{rendered}");
        assert!(problems.iter().all(|p| p.line.is_some()), "{problems:?}");
        assert!(rendered.contains("sluice.toml:3:"), "{rendered}");
    }

    #[test]
    fn shared_secret_algorithms_are_refused() {
        let text = minimal()
            + "\n[identity.oidc]\nissuer = \"https://id.example.com\"\naudience = \"sluice\"\nalgorithms = [\"HS256\"]\n";
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("\"HS256\" is not accepted"), "{err}");
    }

    #[test]
    fn missing_password_env_is_named() {
        let text = minimal().replace("password = \"pw\"", "password_env = \"SLUICE_TEST_SURELY_UNSET\"");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("SLUICE_TEST_SURELY_UNSET is not set"), "{err}");
    }

    #[test]
    fn masking_problems_are_named_with_their_lines() {
        let text = minimal()
            + r#"
[masking]
detectors = ["email", "passport"]

[[masking.rules]]
columns = ["public.customers.email.extra"]
strategy = "partial:x"

[[masking.rules]]
columns = ["ssn"]
strategy = "hash"
"#;
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.contains("\"passport\" is not a detector; write \"all\" or some of: email,"),
            "{err}"
        );
        assert!(
            err.contains("\"public.customers.email.extra\" is not a column pattern"),
            "{err}"
        );
        assert!(err.contains("partial:x"), "{err}");
        assert!(err.contains("hash"), "{err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("sluice.toml:")).collect();
        assert_eq!(lines.len(), 4, "{err}");

        let config = load(&(minimal() + "\n[masking]\nenabled = false\n")).unwrap();
        assert!(config.masking.detectors.is_empty());
        let config = load(&minimal()).unwrap();
        assert_eq!(config.masking.detectors, crate::mask::DetectorSet::ALL);
    }

    #[test]
    fn unmask_grants_are_validated_and_the_old_key_says_where_it_went() {
        let text = minimal()
            + r#"
[masking]
unmasked_groups = ["leads"]

[policy]
[[policy.grants]]
name = "leads"
grant = "unmask"
groups = ["leads"]

[[policy.grants]]
name = "leads"
grant = "unmask"
groups = ["oncall"]

[[policy.grants]]
name = "everyone-by-accident"
grant = "unmask"
targets = ["prod"]

[[policy.grants]]
name = "superpowers"
grant = "superuser"
groups = ["x"]
"#;
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("masking.unmasked_groups is now a policy grant"), "{err}");
        assert!(err.contains("grant \"leads\" is defined twice"), "{err}");
        assert!(err.contains("grant \"everyone-by-accident\" names no holders"), "{err}");
        assert!(err.contains("\"superuser\" is not a grant"), "{err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("sluice.toml:")).collect();
        assert_eq!(lines.len(), 4, "{err}");

        let config = load(
            &(minimal()
                + "\n[policy]\n[[policy.grants]]\nname = \"g\"\ngrant = \"unmask\"\ngroups = [\"leads\"]\ntargets = [\"staging-*\"]\n"),
        )
        .unwrap();
        let grant = &config.policy.grants[0];
        assert_eq!((grant.name.as_str(), grant.kind), ("g", GrantKind::Unmask));
        assert_eq!(grant.targets.len(), 1);
    }

    #[test]
    fn delegates_and_approve_via_are_checked() {
        let good = minimal()
            + &format!(
                r#"
[[identity.tokens]]
name = "approval-bot"
sha256 = "{}"
"#,
                HASH.replace('2', "3")
            )
            + r#"
[api]
[[api.delegates]]
identity = "approval-bot"
via = ["slack", "discord", "slack"]
people = { " carol@example.com " = ["leads"] }

[policy]
[[policy.rules]]
name = "drops"
decision = "require_approval"
kinds = ["ddl"]
approvers = ["leads"]
approve_via = ["console"]
"#;
        let config = load(&good).unwrap();
        let bot = config.api.delegate("approval-bot").unwrap();
        assert_eq!(bot.via, ["slack", "discord"]);
        assert_eq!(bot.people["carol@example.com"], ["leads"]);
        let leads = ["leads".to_string()];
        assert_eq!(bot.person("Carol@Example.com"), Some(("carol@example.com", &leads[..])));
        assert!(config.api.delegate("carol@example.com").is_none());
        let approval = config.policy.rules[0].approval.as_ref().unwrap();
        assert_eq!(approval.approve_via, ["console"]);

        let bad = minimal()
            + r#"
[api]
[[api.delegates]]
identity = "approval-bot"
via = ["console"]
people = { "*" = ["leads"], "Dave@example.com" = ["leads"], "dave@example.com" = ["leads"] }

[policy]
[[policy.rules]]
name = "drops"
decision = "require_approval"
kinds = ["ddl"]
approvers = ["leads"]
approve_via = ["teams"]

[[policy.rules]]
name = "reads"
decision = "allow"
kinds = ["read"]
approve_via = ["console"]
"#;
        let err = load(&bad).unwrap_err().to_string();
        assert!(
            err.contains("api.delegates \"approval-bot\": via \"console\" is not a chat channel"),
            "{err}"
        );
        assert!(
            err.contains("\"*\", an empty name and the bot itself are not allowed"),
            "{err}"
        );
        assert!(
            err.contains("a person is listed twice (names compare without case)"),
            "{err}"
        );
        assert!(
            err.contains(
                "\"approval-bot\" is not the name of an [[identity.tokens]] entry or an [[identity.oidc.services]] client"
            ),
            "{err}"
        );
        assert!(
            err.contains("rule \"drops\": approve_via \"teams\" is not a channel; write some of \"api\", \"console\", \"slack\", \"discord\""),
            "{err}"
        );
        assert!(
            err.contains("rule \"reads\" has approvers, approvals, timeout, approval_mode or approve_via"),
            "{err}"
        );
    }

    #[test]
    fn requested_grants_and_the_rules_that_name_them_are_checked() {
        let text = minimal()
            + r#"
[policy]
[[policy.grants]]
name = "clear-for-a-while"
grant = "unmask"
groups = ["oncall"]
approvers = ["leads"]

[[policy.grants]]
name = "nobody-approves"
grant = "access"
groups = ["oncall"]
max_duration = "1h"

[[policy.grants]]
name = "writer"
grant = "access"
groups = ["oncall"]
approvers = ["leads"]
max_duration = "forever"

[[policy.rules]]
name = "read-only"
decision = "deny"
kinds = ["write"]
except_grants = ["writter"]
"#;
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("an unmask grant is standing"), "{err}");
        assert!(
            err.contains(
                "grant \"nobody-approves\" has approvals, timeout, max_duration or approve_via but no approvers"
            ),
            "{err}"
        );
        assert!(err.contains("grant \"writer\" max_duration"), "{err}");
        assert!(
            err.contains("rule \"read-only\" names grant \"writter\", which no [[grants]] defines"),
            "{err}"
        );
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("sluice.toml:")).collect();
        assert_eq!(lines.len(), 4, "{err}");

        let config = load(
            &(minimal()
                + "\n[policy]\n[[policy.grants]]\nname = \"w\"\ngrant = \"access\"\ngroups = [\"oncall\"]\napprovers = [\"leads\"]\napprovals = 2\n\n\
                   [[policy.rules]]\nname = \"r\"\ndecision = \"deny\"\ngrants = [\"w\"]\nfeatures = [\"drop\"]\n"),
        )
        .unwrap();
        let request = config.policy.grants[0].request.as_ref().unwrap();
        assert_eq!(
            (request.approvals, request.max_duration),
            (2, std::time::Duration::from_secs(3600))
        );
        assert_eq!(request.timeout, std::time::Duration::from_secs(600));
        assert_eq!(config.policy.rules[0].grants, ["w"]);
    }

    #[test]
    fn oidc_services_are_checked() {
        let oidc = "\n[identity.oidc]\nissuer = \"https://login.example.com\"\naudience = \"sluice\"\n";
        let config = load(
            &(minimal()
                + oidc
                + "service_audience = \"urn:sluice\"\n[[identity.oidc.services]]\nclient_id = \"deployer\"\ngroups = [\"ci\"]\n"),
        )
        .unwrap();
        let oidc_config = config.identity.oidc.unwrap();
        assert_eq!(oidc_config.service_audience.as_deref(), Some("urn:sluice"));
        let service = &oidc_config.services[0];
        assert_eq!(
            (service.name.as_str(), service.subject.as_str()),
            ("deployer", "deployer")
        );
        // Services without an audience for their tokens; an audience that is
        // the people's; a name taken by a static token.
        let err = load(&(minimal() + oidc + "[[identity.oidc.services]]\nclient_id = \"deployer\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("need identity.oidc.service_audience"), "{err}");
        let err = load(&(minimal() + oidc + "service_audience = \"sluice\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("differ from audience"), "{err}");
        let err = load(
            &(minimal()
                + oidc
                + "service_audience = \"urn:sluice\"\n[[identity.oidc.services]]\nclient_id = \"x\"\nname = \"ci\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("the name \"ci\" is used twice"), "{err}");
    }

    #[test]
    fn token_expiry_settings_are_read_and_checked() {
        let config = load(&minimal()).unwrap();
        assert_eq!(config.identity.on_token_expiry, OnTokenExpiry::FinishTransaction);
        assert_eq!(config.identity.token_expiry_grace, Duration::from_secs(300));
        let config =
            load(&(minimal() + "\n[identity]\non_token_expiry = \"end\"\ntoken_expiry_grace = \"30s\"\n")).unwrap();
        assert_eq!(config.identity.on_token_expiry, OnTokenExpiry::End);
        assert_eq!(config.identity.token_expiry_grace, Duration::from_secs(30));
        let err = load(&(minimal() + "\n[identity]\non_token_expiry = \"never\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("identity.on_token_expiry = \"never\"; write \"end\""),
            "{err}"
        );
    }

    #[test]
    fn the_audit_section_is_resolved_and_checked() {
        let config = load(&minimal()).unwrap();
        assert!(config.audit.enabled);
        assert_eq!(config.audit.sync, crate::audit::SyncMode::Normal);
        assert_eq!(config.audit.on_failure, OnAuditFailure::Refuse);
        assert_eq!(config.audit.retention, None);
        let config = load(
            &(minimal()
                + "\n[audit]\npath = \"/var/lib/sluice/trail.db\"\nretention_days = 30\nsync = \"full\"\non_audit_failure = \"continue\"\n"),
        )
        .unwrap();
        assert_eq!(config.audit.key_file, Path::new("/var/lib/sluice/trail.key"));
        assert_eq!(config.audit.head_file, Path::new("/var/lib/sluice/trail.head"));
        assert_eq!(config.audit.retention, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(config.audit.sync, crate::audit::SyncMode::Full);
        assert_eq!(config.audit.on_failure, OnAuditFailure::Continue);
        let err = load(
            &(minimal()
                + "\n[audit]\nretention_days = -1\nsync = \"sometimes\"\non_audit_failure = \"shrug\"\nsign_every = 0\nkey_file = \"audit.db\"\n"),
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "retention_days must be 0",
            "sync = \"sometimes\"",
            "on_audit_failure = \"shrug\"",
            "sign_every must be 1 or more",
            "three different files",
        ] {
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn no_tls_and_no_plaintext_is_useless() {
        let text = minimal().replace("allow_plaintext = true", "");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("no [tls] section"), "{err}");
    }

    #[test]
    fn access_without_subjects_is_refused() {
        let text = minimal().replace("groups = [\"deploy\"]\nrole", "role");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("names no identities and no groups"), "{err}");
    }
}
