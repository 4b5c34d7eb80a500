//! The policy section, validated: rules with their match criteria and
//! decisions. The policy engine (`crate::policy`) evaluates these.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::Validator;
use super::raw::{RawGrant, RawPolicy, RawRule};
use super::units;
use crate::policy::{Access, Feature, Features, Kind};

/// What policy does with a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyMode {
    Enforce,
    /// Decisions are recorded, never enforced.
    Monitor,
}

/// A decision, ordered by strictness: `Deny > RequireApproval > Allow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DecisionKind {
    Allow,
    RequireApproval,
    Deny,
}

impl DecisionKind {
    pub fn name(self) -> &'static str {
        match self {
            DecisionKind::Allow => "allow",
            DecisionKind::RequireApproval => "require_approval",
            DecisionKind::Deny => "deny",
        }
    }

    fn from_name(name: &str) -> Option<DecisionKind> {
        match name {
            "allow" => Some(DecisionKind::Allow),
            "require_approval" => Some(DecisionKind::RequireApproval),
            "deny" => Some(DecisionKind::Deny),
            _ => None,
        }
    }
}

impl fmt::Display for DecisionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a statement that needs approval waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalMode {
    /// The statement is held until approvers decide.
    Hold,
    /// The statement is refused with a request id; once approved, the same
    /// text from the same identity runs once.
    RefuseAndRetry,
}

/// A `*`/`?` wildcard pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(pattern: impl Into<String>) -> Pattern {
        Pattern(pattern.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, text: &str) -> bool {
        glob(self.0.as_bytes(), text.as_bytes())
    }
}

/// Iterative wildcard matching with backtracking to the last `*`.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// A relation pattern: `name`, `schema.name`, with wildcards in either part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationPattern {
    /// `None` when the pattern gives no schema: any schema matches.
    pub schema: Option<Pattern>,
    pub name: Pattern,
}

impl RelationPattern {
    /// Whether a relation as a statement names it may be this one. An
    /// unqualified name may live in any schema (its session's search_path
    /// decides), so it counts: for tagging what was touched, more is safer.
    pub fn covers(&self, schema: Option<&str>, name: &str) -> bool {
        self.name.matches(name)
            && match (&self.schema, schema) {
                (Some(pattern), Some(schema)) => pattern.matches(schema),
                _ => true,
            }
    }
}

impl fmt::Display for RelationPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{}.{}", schema.as_str(), self.name.as_str()),
            None => f.write_str(self.name.as_str()),
        }
    }
}

/// How many approvals, from whom, for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalConfig {
    /// Groups whose members may approve.
    pub approvers: Vec<String>,
    pub approvals: u32,
    pub timeout: Duration,
    pub mode: ApprovalMode,
    /// Where an approval counts ("console", "slack"...); empty: anywhere.
    /// Denials count from anywhere.
    pub approve_via: Vec<String>,
}

/// Where approvers decide: the values of `approve_via`.
pub const APPROVAL_CHANNELS: [&str; 4] = ["api", "console", "slack", "discord"];

/// One policy rule.
#[derive(Debug, Clone)]
pub struct RuleConfig {
    pub name: String,
    pub decision: DecisionKind,
    /// Shown to the client when this rule refuses or holds a statement.
    pub reason: Option<String>,
    /// The next step, shown as the error's hint.
    pub hint: Option<String>,
    pub users: Vec<Pattern>,
    pub except_users: Vec<Pattern>,
    pub groups: Vec<String>,
    pub except_groups: Vec<String>,
    /// Identity labels that must all be present with these values.
    pub labels: BTreeMap<String, String>,
    pub targets: Vec<Pattern>,
    pub databases: Vec<Pattern>,
    /// Applies only to identities holding one of these grants (names of
    /// `[[grants]]`).
    pub grants: Vec<String>,
    /// Does not apply to identities holding one of these grants.
    pub except_grants: Vec<String>,
    pub kinds: Vec<Kind>,
    pub relations: Vec<RelationPattern>,
    /// Which accesses to the relations count; empty means any.
    pub access: Vec<Access>,
    pub features: Features,
    /// For writes: the most rows one statement may touch.
    pub max_rows: Option<u64>,
    /// Record what this rule would decide, without enforcing it.
    pub monitor: bool,
    pub approval: Option<ApprovalConfig>,
}

/// The validated policy.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Where the rules were written (the main file or the policy file).
    pub source: PathBuf,
    pub mode: PolicyMode,
    /// The decision when no rule matches.
    pub default: DecisionKind,
    /// The decision for statements the classifier cannot read.
    pub unknown: DecisionKind,
    pub max_statement_length: usize,
    /// Entries in the classification cache.
    pub classification_cache: usize,
    pub rules: Vec<RuleConfig>,
    /// Permissions beyond statements, in file order.
    pub grants: Vec<GrantConfig>,
}

/// What a grant permits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantKind {
    /// See clear values: the session's results are not masked.
    Unmask,
    /// A named permission with no effect of its own: rules name it
    /// (`grants = [...]`, `except_grants = [...]`) to apply only to, or not
    /// to, its holders.
    Access,
}

impl GrantKind {
    pub fn name(self) -> &'static str {
        match self {
            GrantKind::Unmask => "unmask",
            GrantKind::Access => "access",
        }
    }
}

/// The longest a requested grant may hold.
pub const MAX_GRANT_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How a grant held on request is asked for: `approvers` on a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRequestConfig {
    /// Groups whose members may approve a request.
    pub approvers: Vec<String>,
    pub approvals: u32,
    /// How long a request waits for a decision.
    pub timeout: Duration,
    /// The longest a request may ask for.
    pub max_duration: Duration,
    /// Where an approval counts; empty: anywhere.
    pub approve_via: Vec<String>,
}

/// Who a rule or grant is for. Empty lists match everyone.
#[derive(Debug, Clone, Copy)]
pub struct Holders<'a> {
    pub users: &'a [Pattern],
    pub except_users: &'a [Pattern],
    pub groups: &'a [String],
    pub except_groups: &'a [String],
    pub labels: &'a BTreeMap<String, String>,
    pub targets: &'a [Pattern],
    pub databases: &'a [Pattern],
}

/// A permission beyond statements and who holds it: `[[grants]]`.
#[derive(Debug, Clone)]
pub struct GrantConfig {
    pub name: String,
    pub kind: GrantKind,
    /// Why they hold it, for the record.
    pub reason: Option<String>,
    pub users: Vec<Pattern>,
    pub except_users: Vec<Pattern>,
    pub groups: Vec<String>,
    pub except_groups: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub targets: Vec<Pattern>,
    pub databases: Vec<Pattern>,
    /// Set: the holders above may ask for the grant (`sluice request`), and
    /// hold it only once approved, for the time asked. Unset: they hold it.
    pub request: Option<GrantRequestConfig>,
}

impl GrantConfig {
    pub fn holders(&self) -> Holders<'_> {
        Holders {
            users: &self.users,
            except_users: &self.except_users,
            groups: &self.groups,
            except_groups: &self.except_groups,
            labels: &self.labels,
            targets: &self.targets,
            databases: &self.databases,
        }
    }
}

impl RuleConfig {
    pub fn holders(&self) -> Holders<'_> {
        Holders {
            users: &self.users,
            except_users: &self.except_users,
            groups: &self.groups,
            except_groups: &self.except_groups,
            labels: &self.labels,
            targets: &self.targets,
            databases: &self.databases,
        }
    }
}

impl PolicyConfig {
    /// The policy of a configuration without `[policy]`: everything the
    /// classifier understands is allowed; what it cannot read requires
    /// approval, which without a rule for it (there are none) is a refusal.
    pub fn permissive(source: PathBuf) -> PolicyConfig {
        PolicyConfig {
            source,
            mode: PolicyMode::Enforce,
            default: DecisionKind::Allow,
            unknown: DecisionKind::RequireApproval,
            max_statement_length: 1 << 20,
            classification_cache: 10_000,
            rules: Vec::new(),
            grants: Vec::new(),
        }
    }
}

/// Folds an identifier pattern as PostgreSQL folds names: lower case unless
/// written in double quotes.
fn identifier_pattern(part: &str) -> Pattern {
    match part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
        Some(quoted) => Pattern::new(quoted),
        None => Pattern::new(part.to_ascii_lowercase()),
    }
}

pub(super) fn relation_pattern(text: &str) -> Option<RelationPattern> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    // Split at the first dot outside double quotes.
    let mut in_quotes = false;
    let mut split = None;
    for (i, c) in text.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            '.' if !in_quotes => {
                split = Some(i);
                break;
            }
            _ => {}
        }
    }
    match split {
        Some(i) => {
            let (schema, name) = (&text[..i], &text[i + 1..]);
            if schema.is_empty() || name.is_empty() || name.contains('.') && !name.starts_with('"') {
                return None;
            }
            Some(RelationPattern {
                schema: Some(identifier_pattern(schema)),
                name: identifier_pattern(name),
            })
        }
        None => Some(RelationPattern {
            schema: None,
            name: identifier_pattern(text),
        }),
    }
}

impl Validator<'_> {
    /// Validates a policy written in this validator's file.
    pub(super) fn policy(&mut self, raw: RawPolicy, source: PathBuf) -> PolicyConfig {
        let mut policy = PolicyConfig::permissive(source);
        if let Some(mode) = &raw.mode {
            policy.mode = match mode.get_ref().as_str() {
                "enforce" => PolicyMode::Enforce,
                "monitor" => PolicyMode::Monitor,
                other => {
                    self.at(
                        mode,
                        format!("policy mode = \"{other}\" is not a mode; write \"enforce\" or \"monitor\""),
                    );
                    PolicyMode::Enforce
                }
            };
        }
        if let Some(default) = &raw.default {
            policy.default = self.decision("policy default", default).unwrap_or(DecisionKind::Deny);
        }
        if let Some(unknown) = &raw.unknown {
            policy.unknown = self.decision("policy unknown", unknown).unwrap_or(DecisionKind::Deny);
        }
        if let Some(size) = &raw.max_statement_length {
            match units::parse_size(size.get_ref()) {
                Ok(bytes) if bytes >= 1024 => policy.max_statement_length = bytes,
                Ok(_) => self.at(size, "policy max_statement_length must be at least \"1KiB\""),
                Err(message) => self.at(size, format!("policy max_statement_length: {message}")),
            }
        }
        if let Some(entries) = &raw.classification_cache {
            match usize::try_from(*entries.get_ref()) {
                Ok(n) => policy.classification_cache = n,
                Err(_) => self.at(entries, "policy classification_cache must be 0 or more entries"),
            }
        }
        let mut names = std::collections::HashSet::new();
        for grant in raw.grants {
            let name = grant.name.get_ref().clone();
            if !names.insert(name.clone()) {
                self.at(
                    &grant.name,
                    format!(
                        "grant \"{name}\" is defined twice; grant names are recorded with every use and must be unique"
                    ),
                );
            }
            if let Some(grant) = self.grant(grant) {
                policy.grants.push(grant);
            }
        }
        let mut names = std::collections::HashSet::new();
        for rule in raw.rules {
            let name = rule.name.get_ref().clone();
            if !names.insert(name.clone()) {
                self.at(
                    &rule.name,
                    format!("rule \"{name}\" is defined twice; rule names appear in refusals and must be unique"),
                );
            }
            for grant in rule.grants.iter().chain(&rule.except_grants) {
                if !policy.grants.iter().any(|g| &g.name == grant.get_ref()) {
                    let defined: Vec<&str> = policy.grants.iter().map(|g| g.name.as_str()).collect();
                    self.at(
                        grant,
                        format!(
                            "rule \"{name}\" names grant \"{}\", which no [[grants]] defines{}",
                            grant.get_ref(),
                            if defined.is_empty() {
                                String::new()
                            } else {
                                format!(" (defined: {})", defined.join(", "))
                            }
                        ),
                    );
                }
            }
            if let Some(rule) = self.rule(rule) {
                policy.rules.push(rule);
            }
        }
        policy
    }

    fn grant(&mut self, raw: RawGrant) -> Option<GrantConfig> {
        let name = raw.name.get_ref().trim().to_string();
        if name.is_empty() {
            self.at(&raw.name, "a grant needs a name: it is recorded with every use");
            return None;
        }
        let kind = match raw.grant.get_ref().as_str() {
            "unmask" => GrantKind::Unmask,
            "access" => GrantKind::Access,
            other => {
                self.at(
                    &raw.grant,
                    format!(
                        "grant \"{name}\": \"{other}\" is not a grant; write grant = \"unmask\" or grant = \"access\""
                    ),
                );
                return None;
            }
        };
        let asks = !raw.approvers.is_empty()
            || raw.approvals.is_some()
            || raw.timeout.is_some()
            || raw.max_duration.is_some()
            || !raw.approve_via.is_empty();
        let request = if !asks {
            None
        } else if kind == GrantKind::Unmask {
            // A session's masking is settled when it starts; a grant that
            // ended mid-session would leave it seeing clear values.
            self.at(
                &raw.name,
                format!(
                    "grant \"{name}\": an unmask grant is standing (it cannot be requested for a time); \
                     drop approvers/approvals/timeout/max_duration/approve_via, or use grant = \"access\""
                ),
            );
            return None;
        } else if raw.approvers.is_empty() {
            self.at(
                &raw.name,
                format!(
                    "grant \"{name}\" has approvals, timeout, max_duration or approve_via but no approvers; \
                     add approvers = [\"leads\"] (groups whose members approve requests for it)"
                ),
            );
            return None;
        } else {
            let approvals = match &raw.approvals {
                None => 1,
                Some(n) => match u32::try_from(*n.get_ref()) {
                    Ok(n) if n >= 1 => n,
                    _ => {
                        self.at(n, format!("grant \"{name}\": approvals must be 1 or more"));
                        1
                    }
                },
            };
            let timeout = self.duration(
                &format!("grant \"{name}\" timeout"),
                raw.timeout,
                Duration::from_secs(600),
            );
            let max_duration = self.duration(
                &format!("grant \"{name}\" max_duration"),
                raw.max_duration,
                Duration::from_secs(3600),
            );
            // Elevation is for a task, not a standing privilege.
            let max_duration = if max_duration > MAX_GRANT_DURATION || max_duration.is_zero() {
                self.at(
                    &raw.name,
                    format!(
                        "grant \"{name}\": max_duration must be between 1s and 7d (a standing grant has no approvers)"
                    ),
                );
                Duration::from_secs(3600)
            } else {
                max_duration
            };
            let approve_via = self.approve_via(&format!("grant \"{name}\""), &raw.approve_via);
            Some(GrantRequestConfig {
                approvers: raw.approvers,
                approvals,
                timeout,
                max_duration,
                approve_via,
            })
        };
        // A grant is a privilege: one that names nobody in particular must
        // say so (groups = ["*"]) rather than apply to everyone by omission.
        if raw.users.is_empty() && raw.groups.is_empty() && raw.labels.is_empty() {
            self.at(
                &raw.name,
                format!(
                    "grant \"{name}\" names no holders; add groups = [\"leads\"], users = [...] or labels (groups = [\"*\"] grants it to everyone)"
                ),
            );
            return None;
        }
        Some(GrantConfig {
            name,
            kind,
            reason: raw.reason,
            users: raw.users.into_iter().map(Pattern::new).collect(),
            except_users: raw.except_users.into_iter().map(Pattern::new).collect(),
            groups: raw.groups,
            except_groups: raw.except_groups,
            labels: raw.labels,
            targets: raw.targets.into_iter().map(Pattern::new).collect(),
            databases: raw.databases.into_iter().map(Pattern::new).collect(),
            request,
        })
    }

    fn decision(&mut self, key: &str, value: &toml::Spanned<String>) -> Option<DecisionKind> {
        let decision = DecisionKind::from_name(value.get_ref());
        if decision.is_none() {
            self.at(
                value,
                format!(
                    "{key} = \"{}\" is not a decision; write \"allow\", \"deny\" or \"require_approval\"",
                    value.get_ref()
                ),
            );
        }
        decision
    }

    /// `approve_via`: channels from [`APPROVAL_CHANNELS`], each once.
    fn approve_via(&mut self, what: &str, raw: &[toml::Spanned<String>]) -> Vec<String> {
        let mut channels: Vec<String> = Vec::new();
        for channel in raw {
            let name = channel.get_ref().as_str();
            if !APPROVAL_CHANNELS.contains(&name) {
                self.at(
                    channel,
                    format!(
                        "{what}: approve_via \"{name}\" is not a channel; write some of \"{}\"",
                        APPROVAL_CHANNELS.join("\", \"")
                    ),
                );
            } else if !channels.iter().any(|c| c == name) {
                channels.push(name.to_string());
            }
        }
        channels
    }

    fn rule(&mut self, raw: RawRule) -> Option<RuleConfig> {
        let name = raw.name.get_ref().trim().to_string();
        if name.is_empty() {
            self.at(&raw.name, "a rule needs a name: it is shown in every refusal it causes");
            return None;
        }
        let decision = self.decision(&format!("rule \"{name}\" decision"), &raw.decision)?;
        let mut kinds = Vec::new();
        for kind in &raw.kinds {
            match Kind::from_name(kind.get_ref()) {
                Some(k) => kinds.push(k),
                None => self.at(
                    kind,
                    format!(
                        "rule \"{name}\": \"{}\" is not a statement kind; use one of {}",
                        kind.get_ref(),
                        Kind::ALL.map(|k| k.name()).join(", ")
                    ),
                ),
            }
        }
        let mut features = Features::default();
        for feature in &raw.features {
            match Feature::from_name(feature.get_ref()) {
                Some(f) => features.insert(f),
                None => self.at(
                    feature,
                    format!(
                        "rule \"{name}\": \"{}\" is not a risk feature; use one of {}",
                        feature.get_ref(),
                        Feature::ALL.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
                    ),
                ),
            }
        }
        let mut access = Vec::new();
        for a in &raw.access {
            match Access::from_name(a.get_ref()) {
                Some(x) => access.push(x),
                None => self.at(
                    a,
                    format!("rule \"{name}\": access \"{}\" is not read, write or ddl", a.get_ref()),
                ),
            }
        }
        let mut relations = Vec::new();
        for relation in &raw.relations {
            match relation_pattern(relation.get_ref()) {
                Some(pattern) => relations.push(pattern),
                None => self.at(
                    relation,
                    format!(
                        "rule \"{name}\": \"{}\" is not a relation pattern; write \"table\", \"schema.table\" or \"billing.*\"",
                        relation.get_ref()
                    ),
                ),
            }
        }
        let max_rows = match &raw.max_rows {
            None => None,
            Some(value) => match u64::try_from(*value.get_ref()) {
                Ok(n) if decision == DecisionKind::Allow => Some(n),
                Ok(_) => {
                    self.at(
                        value,
                        format!("rule \"{name}\": max_rows belongs on an allow rule (it limits what is allowed)"),
                    );
                    None
                }
                Err(_) => {
                    self.at(value, format!("rule \"{name}\": max_rows must be 0 or more"));
                    None
                }
            },
        };
        let has_approval_keys = !raw.approvers.is_empty()
            || raw.approvals.is_some()
            || raw.timeout.is_some()
            || raw.approval_mode.is_some()
            || !raw.approve_via.is_empty();
        let approval = if decision == DecisionKind::RequireApproval {
            if raw.approvers.is_empty() {
                self.at(
                    &raw.decision,
                    format!(
                        "rule \"{name}\" requires approval but names no approvers; add approvers = [\"leads\"] (groups whose members may approve)"
                    ),
                );
            }
            let approvals = match &raw.approvals {
                None => 1,
                Some(n) => match u32::try_from(*n.get_ref()) {
                    Ok(n) if n >= 1 => n,
                    _ => {
                        self.at(n, format!("rule \"{name}\": approvals must be 1 or more"));
                        1
                    }
                },
            };
            let timeout = self.duration(
                &format!("rule \"{name}\" timeout"),
                raw.timeout,
                Duration::from_secs(600),
            );
            let mode = match &raw.approval_mode {
                None => ApprovalMode::Hold,
                Some(mode) => {
                    match mode.get_ref().as_str() {
                        "hold" => ApprovalMode::Hold,
                        "refuse_and_retry" => ApprovalMode::RefuseAndRetry,
                        other => {
                            self.at(
                            mode,
                            format!("rule \"{name}\": approval_mode = \"{other}\"; write \"hold\" or \"refuse_and_retry\""),
                        );
                            ApprovalMode::Hold
                        }
                    }
                }
            };
            let approve_via = self.approve_via(&format!("rule \"{name}\""), &raw.approve_via);
            Some(ApprovalConfig {
                approvers: raw.approvers,
                approvals,
                timeout,
                mode,
                approve_via,
            })
        } else {
            if has_approval_keys {
                self.at(
                    &raw.decision,
                    format!(
                        "rule \"{name}\" has approvers, approvals, timeout, approval_mode or approve_via, which only apply to decision = \"require_approval\""
                    ),
                );
            }
            None
        };
        Some(RuleConfig {
            name,
            decision,
            reason: raw.reason,
            hint: raw.hint,
            users: raw.users.into_iter().map(Pattern::new).collect(),
            except_users: raw.except_users.into_iter().map(Pattern::new).collect(),
            groups: raw.groups,
            except_groups: raw.except_groups,
            labels: raw.labels,
            targets: raw.targets.into_iter().map(Pattern::new).collect(),
            databases: raw.databases.into_iter().map(Pattern::new).collect(),
            grants: raw.grants.into_iter().map(|g| g.into_inner()).collect(),
            except_grants: raw.except_grants.into_iter().map(|g| g.into_inner()).collect(),
            kinds,
            relations,
            access,
            features,
            max_rows,
            monitor: raw.monitor,
            approval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(Pattern::new("*").matches("anything"));
        assert!(Pattern::new("prod-*").matches("prod-eu"));
        assert!(!Pattern::new("prod-*").matches("staging"));
        assert!(Pattern::new("*@example.com").matches("alice@example.com"));
        assert!(Pattern::new("a?c").matches("abc"));
        assert!(Pattern::new("a*b*c").matches("axxbyyc"));
        assert!(!Pattern::new("a*b*c").matches("axxbyy"));
    }

    #[test]
    fn relation_patterns_fold_like_postgres() {
        let p = relation_pattern("Public.Customers").unwrap();
        assert_eq!(p.to_string(), "public.customers");
        let p = relation_pattern("\"Billing\".*").unwrap();
        assert_eq!(p.schema.unwrap().as_str(), "Billing");
        assert_eq!(relation_pattern("orders").unwrap().schema, None);
        assert!(relation_pattern("a.b.c").is_none());
        assert!(relation_pattern(".x").is_none());
    }
}
