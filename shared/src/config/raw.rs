//! The configuration file as written: serde structs with defaults, no meaning
//! attached yet. `super::validate` turns these into the resolved types the rest
//! of the gateway takes. Unknown keys are errors, so a typo is reported with its
//! line instead of being ignored.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub tls: Option<RawTls>,
    #[serde(default)]
    pub identity: RawIdentity,
    #[serde(default)]
    pub targets: Vec<RawTarget>,
    pub policy: Option<RawPolicy>,
    pub masking: Option<RawMasking>,
    pub audit: Option<RawAudit>,
    pub api: Option<RawApi>,
}

/// `[api]`: the control API's listener and who may do what with it.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    pub enabled: Option<bool>,
    pub listen: Option<Spanned<String>>,
    #[serde(default)]
    pub viewer_groups: Vec<String>,
    #[serde(default)]
    pub approver_groups: Vec<String>,
    #[serde(default)]
    pub admin_groups: Vec<String>,
    #[serde(default)]
    pub delegates: Vec<RawDelegate>,
}

/// `[[api.delegates]]`: a chat bot that decides on behalf of people.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelegate {
    pub identity: Spanned<String>,
    pub via: Spanned<Vec<String>>,
    pub people: Spanned<BTreeMap<String, Vec<String>>>,
}

/// `[audit]`: where the trail is kept and how it is signed.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub enabled: Option<bool>,
    pub path: Option<Spanned<String>>,
    pub key_file: Option<Spanned<String>>,
    pub head_file: Option<Spanned<String>>,
    pub sync: Option<Spanned<String>>,
    pub sign_every: Option<Spanned<i64>>,
    pub sign_interval: Option<Spanned<RawDuration>>,
    pub on_audit_failure: Option<Spanned<String>>,
    pub retention_days: Option<Spanned<i64>>,
    pub sample_rows: Option<Spanned<i64>>,
    #[serde(default)]
    pub tags: Vec<RawTag>,
}

/// `[[audit.tags]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTag {
    pub tag: Spanned<String>,
    #[serde(default)]
    pub relations: Vec<Spanned<String>>,
    #[serde(default)]
    pub columns: Vec<Spanned<String>>,
}

/// `[masking]`: what the result seam does to values.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMasking {
    pub enabled: Option<bool>,
    pub detectors: Option<Vec<Spanned<String>>>,
    /// Moved to the policy (`[[grants]]`); read only to say so.
    pub unmasked_groups: Option<Spanned<toml::Value>>,
    pub hash_key_env: Option<Spanned<String>>,
    pub hash_key_file: Option<Spanned<String>>,
    pub catalog_ttl: Option<Spanned<RawDuration>>,
    #[serde(default)]
    pub rules: Vec<RawMaskRule>,
}

/// `[[masking.rules]]`: columns and what their values become.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMaskRule {
    pub columns: Vec<Spanned<String>>,
    pub strategy: Spanned<String>,
    /// Only for identities in these groups (default: everyone masked).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// A policy: inline under `[policy]` in the main file, or in its own file
/// that `[policy] file = "..."` names (which may not name another).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub file: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub default: Option<Spanned<String>>,
    pub unknown: Option<Spanned<String>>,
    pub max_statement_length: Option<Spanned<RawSize>>,
    pub classification_cache: Option<Spanned<i64>>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub grants: Vec<RawGrant>,
}

/// `[[grants]]`: a permission beyond statements, and who holds it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    pub name: Spanned<String>,
    pub grant: Spanned<String>,
    pub reason: Option<String>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub except_users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub except_groups: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub databases: Vec<String>,
    /// Present: the grant is held only through an approved access request.
    #[serde(default)]
    pub approvers: Vec<String>,
    pub approvals: Option<Spanned<i64>>,
    /// How long a request waits for approvers.
    pub timeout: Option<Spanned<RawDuration>>,
    /// The longest a request may ask for.
    pub max_duration: Option<Spanned<RawDuration>>,
    /// Where requests for it may be approved ("api", "console", "slack", "discord").
    #[serde(default)]
    pub approve_via: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: Spanned<String>,
    pub decision: Spanned<String>,
    pub reason: Option<String>,
    pub hint: Option<String>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub except_users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub except_groups: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub databases: Vec<String>,
    /// The rule applies only to identities holding one of these grants.
    #[serde(default)]
    pub grants: Vec<Spanned<String>>,
    /// The rule does not apply to identities holding one of these grants.
    #[serde(default)]
    pub except_grants: Vec<Spanned<String>>,
    #[serde(default)]
    pub kinds: Vec<Spanned<String>>,
    #[serde(default)]
    pub relations: Vec<Spanned<String>>,
    #[serde(default)]
    pub access: Vec<Spanned<String>>,
    #[serde(default)]
    pub features: Vec<Spanned<String>>,
    pub max_rows: Option<Spanned<i64>>,
    #[serde(default)]
    pub monitor: bool,
    #[serde(default)]
    pub approvers: Vec<String>,
    pub approvals: Option<Spanned<i64>>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub approval_mode: Option<Spanned<String>>,
    /// Where its requests may be approved ("api", "console", "slack", "discord").
    #[serde(default)]
    pub approve_via: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_sessions_per_identity: Option<Spanned<i64>>,
    pub max_message_size: Option<Spanned<RawSize>>,
    pub shutdown_grace: Option<Spanned<RawDuration>>,
    pub auth_timeout: Option<Spanned<RawDuration>>,
    pub allow_plaintext: Option<Spanned<bool>>,
    pub worker_threads: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub oidc: Option<RawOidc>,
    #[serde(default)]
    pub tokens: Vec<RawToken>,
    pub on_token_expiry: Option<Spanned<String>>,
    pub token_expiry_grace: Option<Spanned<RawDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOidc {
    pub issuer: Spanned<String>,
    pub audience: Spanned<String>,
    pub groups_claim: Option<String>,
    pub algorithms: Option<Spanned<Vec<String>>>,
    pub jwks_refresh: Option<Spanned<RawDuration>>,
    pub min_refresh_interval: Option<Spanned<RawDuration>>,
    pub http_timeout: Option<Spanned<RawDuration>>,
    pub service_audience: Option<Spanned<String>>,
    #[serde(default)]
    pub services: Vec<RawOidcService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOidcService {
    pub client_id: Spanned<String>,
    pub subject: Option<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    pub name: Spanned<String>,
    pub sha256: Spanned<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub name: Spanned<String>,
    pub host: Spanned<String>,
    pub port: Option<Spanned<i64>>,
    pub database: Option<String>,
    pub tls: Option<Spanned<String>>,
    pub ca: Option<Spanned<String>>,
    pub server_name: Option<String>,
    pub connect_timeout: Option<Spanned<RawDuration>>,
    /// Policy decisions on this target are recorded, not enforced.
    #[serde(default)]
    pub monitor: bool,
    #[serde(default)]
    pub access: Vec<RawAccess>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    #[serde(default)]
    pub identities: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub role: Spanned<String>,
    pub password: Option<Spanned<String>>,
    pub password_env: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
}

/// A duration written as `"30s"`, `"500ms"`, `"5m"`, `"1h"` or a number of seconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawDuration {
    Seconds(i64),
    Text(String),
}

/// A size written as `"64MiB"`, `"512KiB"`, `"1GiB"` or a number of bytes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(i64),
    Text(String),
}
