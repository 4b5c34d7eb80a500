//! Statement policy: the classifier and the rules that decide, for every
//! statement, whether it runs, is refused, or needs approval.
//!
//! Evaluation is pure: a classification, an identity and a target in, a
//! [`Decision`] out. [`PolicyGate`] wraps it as the gateway's
//! [`StatementGate`], with a bounded cache of classifications by statement
//! text so that repeated and prepared statements are parsed once.

pub mod cases;
mod class;
mod classify;
mod fallback;
pub mod scan;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

pub use class::{
    Access, Assigned, Classification, Feature, Features, Kind, PreparedRef, Relation, StatementClass, WrittenValues,
};
pub use classify::{ClassifyOptions, classify, classify_with_shape, shape_key};
pub(crate) use fallback::{executes_keyword, mentions_execute};

use crate::config::{
    Config, DecisionKind, GrantConfig, GrantKind, GrantRequestConfig, Holders, PolicyConfig, PolicyMode,
    RelationPattern, RuleConfig,
};
use crate::gate::{
    Allowance, ApprovalRequest, GateSession, GrantRefusal, Refusal, RowLimit, StatementContext, StatementGate, Verdict,
};
use crate::identity::Identity;

/// What policy knows about a target.
#[derive(Debug, Clone)]
struct TargetInfo {
    database: String,
    monitor: bool,
}

/// The rules of one gateway, ready to evaluate.
#[derive(Debug)]
pub struct Policy {
    config: PolicyConfig,
    targets: HashMap<String, TargetInfo>,
}

/// Who is asking, where, and in what session state. Built from a verified
/// [`Identity`] on the gateway's path, or from plain values by the policy
/// tools (`sluice policy check` / `test`), which ask "what if".
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub name: &'a str,
    pub subject: &'a str,
    pub email: Option<&'a str>,
    pub groups: &'a [String],
    pub labels: &'a BTreeMap<String, String>,
    pub target: &'a str,
    /// The session changed search_path: unqualified names may live anywhere.
    pub search_path_changed: bool,
    /// Requested grants approved for this identity on this target and not
    /// yet expired (standing grants are worked out from the policy).
    pub granted: &'a [Arc<str>],
}

impl<'a> Subject<'a> {
    pub fn of(identity: &'a Identity, target: &'a str, search_path_changed: bool) -> Subject<'a> {
        Subject {
            name: identity.name(),
            subject: identity.subject(),
            email: identity.email(),
            groups: identity.groups(),
            labels: identity.labels(),
            target,
            search_path_changed,
            granted: &[],
        }
    }

    /// The same subject, holding these requested grants.
    pub fn with_granted(self, granted: &'a [Arc<str>]) -> Subject<'a> {
        Subject { granted, ..self }
    }

    fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// The decision for one statement of a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementDecision {
    /// What is enforced.
    pub decision: DecisionKind,
    /// What would be enforced without monitor mode (never less strict).
    pub would_be: DecisionKind,
    /// The rule that decided (index into the policy's rules); `None` when
    /// the default or the `unknown` setting decided.
    pub rule: Option<usize>,
    /// Every rule that matched, in order.
    pub matched: Vec<usize>,
    /// The tightest row limit of the matching allow rules, and its rule.
    pub max_rows: Option<(u64, usize)>,
}

/// The decision for a whole text: the strictest of its statements.
#[derive(Debug, Clone)]
pub struct Decision {
    pub classification: Arc<Classification>,
    pub statements: Vec<StatementDecision>,
    /// Index of the statement whose decision is the text's.
    pub deciding: Option<usize>,
}

impl Decision {
    pub fn decision(&self) -> DecisionKind {
        self.deciding
            .map(|i| self.statements[i].decision)
            .unwrap_or(DecisionKind::Allow)
    }

    pub fn would_be(&self) -> DecisionKind {
        self.statements
            .iter()
            .map(|s| s.would_be)
            .max()
            .unwrap_or(DecisionKind::Allow)
    }
}

fn relation_matches(pattern: &RelationPattern, relation: &Relation, strict: bool, search_path_changed: bool) -> bool {
    if !pattern.name.matches(&relation.name) {
        return false;
    }
    match (&pattern.schema, &relation.schema) {
        (None, _) => true,
        (Some(p), Some(schema)) => p.matches(schema),
        // An unqualified name: the session's search_path decides where it
        // lives. A restricting rule assumes the worst (it may be that
        // schema); an allowing rule assumes only the default search_path
        // ("$user", public), and nothing once the session changed it.
        (Some(p), None) => strict || p.as_str() == "*" || (!search_path_changed && p.matches("public")),
    }
}

impl Policy {
    pub fn new(config: &Config) -> Policy {
        Policy {
            config: config.policy.clone(),
            targets: config
                .targets
                .iter()
                .map(|t| {
                    (
                        t.name.clone(),
                        TargetInfo {
                            database: t.database.clone(),
                            monitor: t.monitor,
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    pub fn rule(&self, index: usize) -> &RuleConfig {
        &self.config.rules[index]
    }

    /// Whether the subject is among a rule's or grant's holders.
    fn holds(&self, holders: Holders<'_>, subject: &Subject<'_>) -> bool {
        let names = |p: &crate::config::Pattern| {
            p.matches(subject.name) || p.matches(subject.subject) || subject.email.is_some_and(|e| p.matches(e))
        };
        if !holders.users.is_empty() && !holders.users.iter().any(names) {
            return false;
        }
        if holders.except_users.iter().any(names) {
            return false;
        }
        if !holders.groups.is_empty() && !holders.groups.iter().any(|g| g == "*" || subject.in_group(g)) {
            return false;
        }
        if holders.except_groups.iter().any(|g| subject.in_group(g)) {
            return false;
        }
        let labels_match = holders.labels.iter().all(|(key, value)| {
            subject
                .labels
                .get(key)
                .is_some_and(|have| value == "*" || have == value)
        });
        if !labels_match {
            return false;
        }
        if !holders.targets.is_empty() && !holders.targets.iter().any(|p| p.matches(subject.target)) {
            return false;
        }
        if !holders.databases.is_empty() {
            let database = self
                .targets
                .get(subject.target)
                .map(|t| t.database.as_str())
                .unwrap_or("");
            if !holders.databases.iter().any(|p| p.matches(database)) {
                return false;
            }
        }
        true
    }

    /// Whether the subject holds the grant named `name` now: a standing
    /// grant by being among its holders; a requested one by an approved,
    /// unexpired request (and still being among its holders).
    pub fn holds_grant(&self, name: &str, subject: &Subject<'_>) -> bool {
        let Some(grant) = self.config.grants.iter().find(|g| g.name == name) else {
            return false;
        };
        if grant.request.is_some() && !subject.granted.iter().any(|g| &**g == name) {
            return false;
        }
        self.holds(grant.holders(), subject)
    }

    /// The grant `name` as the subject may ask for it, or why not.
    pub fn requestable(&self, name: &str, subject: &Subject<'_>) -> Result<&GrantConfig, GrantRefusal> {
        let Some(grant) = self.config.grants.iter().find(|g| g.name == name) else {
            let requestable: Vec<&str> = self
                .config
                .grants
                .iter()
                .filter(|g| g.request.is_some())
                .map(|g| g.name.as_str())
                .collect();
            return Err(GrantRefusal::Unknown(if requestable.is_empty() {
                format!("there is no grant \"{name}\", and this gateway's policy has no grants that can be requested")
            } else {
                format!(
                    "there is no grant \"{name}\"; grants that can be requested: {}",
                    requestable.join(", ")
                )
            }));
        };
        if grant.request.is_none() {
            return Err(GrantRefusal::Unknown(format!(
                "grant \"{name}\" is not requested: its holders hold it all the time, and others cannot ask for it"
            )));
        }
        if !self.targets.contains_key(subject.target) {
            return Err(GrantRefusal::Unknown(format!(
                "there is no target \"{}\"",
                subject.target
            )));
        }
        if !self.holds(grant.holders(), subject) {
            return Err(GrantRefusal::Forbidden(format!(
                "{} may not ask for grant \"{name}\" on target \"{}\": the policy names who may",
                subject.name, subject.target
            )));
        }
        Ok(grant)
    }

    /// The first unmask grant the subject holds on its target, if any.
    pub fn unmask_grant(&self, subject: &Subject<'_>) -> Option<&GrantConfig> {
        self.config
            .grants
            .iter()
            .find(|g| g.kind == GrantKind::Unmask && self.holds(g.holders(), subject))
    }

    fn rule_matches(&self, rule: &RuleConfig, subject: &Subject<'_>, statement: &StatementClass) -> bool {
        if !self.holds(rule.holders(), subject) {
            return false;
        }
        if !rule.grants.is_empty() && !rule.grants.iter().any(|g| self.holds_grant(g, subject)) {
            return false;
        }
        if rule.except_grants.iter().any(|g| self.holds_grant(g, subject)) {
            return false;
        }
        if !rule.kinds.is_empty() && !rule.kinds.contains(&statement.kind) {
            return false;
        }
        if !rule.features.is_empty() && !statement.features.intersects(rule.features) {
            return false;
        }
        if !rule.relations.is_empty() || !rule.access.is_empty() {
            let strict = rule.decision > DecisionKind::Allow;
            let touches = statement
                .relations
                .iter()
                .filter(|r| rule.access.is_empty() || rule.access.contains(&r.access))
                .any(|r| {
                    rule.relations.is_empty()
                        || rule
                            .relations
                            .iter()
                            .any(|p| relation_matches(p, r, strict, subject.search_path_changed))
                });
            // What the classifier cannot see into may touch anything: a rule
            // that restricts assumes it does; a rule that allows does not.
            let assumed = strict && statement.opaque;
            if !(touches || assumed) {
                return false;
            }
        }
        true
    }

    /// Decides one statement.
    pub fn decide_statement(&self, subject: &Subject<'_>, statement: &StatementClass) -> StatementDecision {
        let target_monitor = self.targets.get(subject.target).is_some_and(|t| t.monitor);
        let monitor_all = self.config.mode == PolicyMode::Monitor || target_monitor;
        let mut enforced: Option<(DecisionKind, Option<usize>)> = None;
        let mut would_be: Option<(DecisionKind, Option<usize>)> = None;
        let mut matched = Vec::new();
        let mut max_rows: Option<(u64, usize)> = None;
        if statement.kind == Kind::Unknown {
            enforced = Some((self.config.unknown, None));
            would_be = enforced;
        }
        for (index, rule) in self.config.rules.iter().enumerate() {
            if !self.rule_matches(rule, subject, statement) {
                continue;
            }
            matched.push(index);
            // A stricter rule decides. So does the first rule for unknown
            // statements (its kinds include "unknown") as strict as the
            // `unknown` decision a statement it cannot read starts at, which
            // has no rule: the rule's approvers can then decide it. (Other
            // rules match such a statement only as one that may touch
            // anything.)
            let decides = |(d, r): (DecisionKind, Option<usize>)| {
                rule.decision > d || (r.is_none() && rule.decision == d && rule.kinds.contains(&Kind::Unknown))
            };
            if would_be.is_none_or(decides) {
                would_be = Some((rule.decision, Some(index)));
            }
            if rule.monitor {
                continue;
            }
            if enforced.is_none_or(decides) {
                enforced = Some((rule.decision, Some(index)));
            }
            if rule.decision == DecisionKind::Allow
                && let Some(limit) = rule.max_rows
                && max_rows.is_none_or(|(m, _)| limit < m)
            {
                max_rows = Some((limit, index));
            }
        }
        let (decision, rule) = enforced.unwrap_or((self.config.default, None));
        let would = would_be.map(|(d, _)| d).unwrap_or(self.config.default).max(decision);
        let (decision, rule) = if monitor_all {
            (DecisionKind::Allow, would_be.and_then(|(_, r)| r).or(rule))
        } else {
            (decision, rule)
        };
        StatementDecision {
            decision,
            would_be: would,
            rule,
            matched,
            max_rows: if decision == DecisionKind::Allow {
                max_rows
            } else {
                None
            },
        }
    }

    /// Decides a whole text: the strictest decision of its statements.
    pub fn decide(&self, subject: &Subject<'_>, classification: Arc<Classification>) -> Decision {
        let statements: Vec<StatementDecision> = classification
            .statements
            .iter()
            .map(|statement| self.decide_statement(subject, statement))
            .collect();
        let deciding = statements
            .iter()
            .enumerate()
            .max_by_key(|(i, s)| (s.decision, s.would_be, std::cmp::Reverse(*i)))
            .map(|(i, _)| i);
        Decision {
            classification,
            statements,
            deciding,
        }
    }

    /// The message a client sees for a refused or held statement.
    pub fn refusal(&self, decision: &Decision, subject: &Subject<'_>) -> Refusal {
        let index = decision.deciding.unwrap_or(0);
        let statement = &decision.classification.statements[index];
        let verdict = &decision.statements[index];
        let mut message = String::new();
        if decision.classification.statements.len() > 1 {
            let _ = write!(
                message,
                "statement {} of {} ({}): ",
                index + 1,
                decision.classification.statements.len(),
                describe(statement)
            );
        }
        let hint = match verdict.rule.map(|i| self.rule(i)) {
            Some(rule) => {
                let reason = rule.reason.clone().unwrap_or_else(|| match &statement.note {
                    // What approvers (and the client) need to know about it.
                    Some(note) if statement.kind == Kind::Unknown => format!("Sluice cannot classify it ({note})"),
                    _ => describe(statement),
                });
                let verb = match verdict.decision {
                    DecisionKind::RequireApproval => "needs approval under",
                    _ => "refused by",
                };
                if message.is_empty() {
                    message.push_str("statement ");
                }
                let _ = write!(message, "{verb} rule \"{}\": {reason}", rule.name);

                // A grant this subject may ask for lifts the rule: say how.
                let lifted_by = rule.except_grants.iter().find(|name| {
                    self.config
                        .grants
                        .iter()
                        .any(|g| &g.name == *name && g.request.is_some() && self.holds(g.holders(), subject))
                });
                let grant = lifted_by.map(|name| {
                    let longest = self
                        .config
                        .grants
                        .iter()
                        .find(|g| &g.name == name)
                        .and_then(|g| g.request.as_ref())
                        .map_or(std::time::Duration::from_secs(1800), |r| r.max_duration);
                    format!(
                        "grant \"{name}\" lifts this rule; ask for it with: sluice request --target {} --grant {name} --for {} --reason \"...\"",
                        subject.target,
                        crate::config::human_duration(longest.min(std::time::Duration::from_secs(1800)))
                    )
                });
                rule.hint.clone().or_else(|| match (&rule.approval, verdict.decision) {
                    (Some(approval), DecisionKind::RequireApproval) => {
                        let approval = format!(
                            "approval by {} of: {} is needed",
                            approval.approvals,
                            approval.approvers.join(", ")
                        );
                        Some(match grant {
                            Some(grant) => format!("{approval}; or: {grant}"),
                            None => approval,
                        })
                    }
                    _ => grant
                        .or_else(|| Some("if you need this, ask for a policy change or an approved exception".into())),
                })
            }
            None if statement.kind == Kind::Unknown => {
                let note = statement.note.clone().unwrap_or_default();
                let _ = write!(message, "statement refused: Sluice cannot classify it ({note})");
                if verdict.decision == DecisionKind::RequireApproval {
                    // Held only under a rule, whose approvers decide.
                    message.push_str(", and no policy rule that applies to you holds such statements for approval");
                    Some(
                        "rewrite it in a form the gateway understands; to have such statements held for approval, \
                         an admin adds a policy rule with kinds = [\"unknown\"] and approvers"
                            .into(),
                    )
                } else {
                    Some("rewrite it in a form the gateway understands".into())
                }
            }
            None => {
                let reason = format!(
                    "no rule allows {} on target \"{}\" for {}, and the policy's default is {}",
                    describe(statement),
                    subject.target,
                    subject.name,
                    self.config.default
                );
                message.push_str("statement refused: ");
                message.push_str(&reason);
                Some("ask for a policy change if you need this".into())
            }
        };
        Refusal {
            code: "42501",
            message,
            hint,
        }
    }
}

/// "DELETE on public.orders (write; no_where)".
pub fn describe(statement: &StatementClass) -> String {
    let mut out = if statement.command.is_empty() {
        statement.kind.name().to_string()
    } else {
        statement.command.clone()
    };
    let relations: Vec<String> = statement
        .relations
        .iter()
        .filter(|r| r.access != Access::Read || statement.kind == Kind::Read)
        .map(|r| match &r.schema {
            Some(schema) => format!("{schema}.{}", r.name),
            None => r.name.clone(),
        })
        .collect();
    if !relations.is_empty() {
        let mut unique = relations;
        unique.dedup();
        let _ = write!(out, " on {}", unique.join(", "));
    }
    let features: Vec<&str> = statement.features.iter().map(Feature::name).collect();
    if !features.is_empty() {
        let _ = write!(out, " ({})", features.join(", "));
    }
    out
}

/// The refusal of a write with a row limit sent in a string of several
/// statements: the limit is checked on one statement's count, and in a
/// string of several it could not be told apart.
pub fn limited_write_among_others() -> Refusal {
    Refusal {
        code: "42501",
        message:
            "statement refused: a write with a row limit must be sent on its own, not in a string of several statements"
                .into(),
        hint: Some("send the limited write as a statement of its own".into()),
    }
}

/// The refusal of an SQL prepared statement name the gate could not follow
/// as PostgreSQL does: longer than it keeps, or outside ASCII.
fn unfollowable_name(name: &str) -> Option<Refusal> {
    let max = crate::protocol::frontend::MAX_NAME_BYTES;
    let why = if name.len() > max {
        format!("is longer than {max} bytes, and PostgreSQL would shorten it")
    } else if !name.is_ascii() {
        "is not ASCII, and PostgreSQL folds such names by the database's encoding".to_string()
    } else {
        return None;
    };
    let shown: String = name.chars().take(max).collect();
    let more = if shown.len() < name.len() { "..." } else { "" };
    Some(Refusal {
        code: "42622",
        message: format!(
            "statement refused: prepared statement name \"{shown}{more}\" {why}: it could name another statement than the one the gateway follows"
        ),
        hint: Some("use names of ASCII characters, at most 63".into()),
    })
}

/// The row limit of an `EXECUTE name` whose PREPARE set one.
fn executed_limit(classification: &Classification, session: &GateSession) -> Option<RowLimit> {
    classification.statements.iter().find_map(|s| match &s.prepared {
        Some(PreparedRef::Execute(name)) => session.prepared_limits.get(name).cloned(),
        _ => None,
    })
}

/// An EXECUTE of an SQL-level prepared statement that was allowed under a
/// requested grant that has ended since: its refusal.
fn executed_after_grant(
    classification: &Classification,
    session: &GateSession,
    granted: &[Arc<str>],
) -> Option<Refusal> {
    classification.statements.iter().find_map(|s| {
        let Some(PreparedRef::Execute(name)) = &s.prepared else {
            return None;
        };
        let ended = session
            .prepared_grants
            .get(name)?
            .iter()
            .find(|g| !granted.contains(g))?;
        Some(Refusal {
            code: "42501",
            message: format!(
                "statement refused: {name} was prepared while you held grant \"{ended}\", which has ended"
            ),
            hint: Some(format!("PREPARE {name} again: policy decides it afresh")),
        })
    })
}

/// Keeps the session's record of SQL-level prepared statements' limits
/// (and the grants they were allowed under) up to date after an allowed
/// PREPARE, DEALLOCATE or DISCARD.
fn remember_prepared(
    classification: &Classification,
    allowance: &Allowance,
    session: &mut GateSession,
    granted: &[Arc<str>],
) {
    for statement in &classification.statements {
        match &statement.prepared {
            Some(PreparedRef::Prepare(name)) => {
                // Limits and grants are only ever added to: a PREPARE of a
                // name in use fails, and a DEALLOCATE (or DISCARD) may be
                // skipped (an earlier statement of its string failed, or
                // the transaction had), so neither may lift a limit or wipe
                // what a prepared statement was allowed under. A name
                // keeps the tightest limit it was prepared with for the
                // session, and one reused after its grant ended is refused;
                // a new name is decided afresh.
                if let Some(limit) = &allowance.max_rows
                    && session
                        .prepared_limits
                        .get(name)
                        .is_none_or(|held| limit.rows < held.rows)
                {
                    session.prepared_limits.insert(name.clone(), limit.clone());
                }
                if !granted.is_empty() {
                    let held = session.prepared_grants.entry(name.clone()).or_default();
                    for grant in granted {
                        if !held.contains(grant) {
                            held.push(grant.clone());
                        }
                    }
                }
            }
            Some(PreparedRef::Deallocate(_)) | Some(PreparedRef::Execute(_)) | None => {}
        }
    }
}

/// The gateway's statement gate: classification (cached) and policy.
pub struct PolicyGate {
    policy: Policy,
    options: ClassifyOptions,
    cache: quick_cache::sync::Cache<Box<str>, Arc<Classification>>,
}

impl PolicyGate {
    pub fn new(config: &Config) -> PolicyGate {
        let policy = Policy::new(config);
        let options = ClassifyOptions {
            max_statement_length: policy.config.max_statement_length,
            ..ClassifyOptions::default()
        };
        let capacity = policy.config.classification_cache.max(1);
        PolicyGate {
            policy,
            options,
            cache: quick_cache::sync::Cache::new(capacity),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The classification of a text, from the cache when it was seen before.
    pub fn classify(&self, sql: &str, standard_conforming_strings: bool) -> Arc<Classification> {
        if !standard_conforming_strings {
            let options = ClassifyOptions {
                standard_conforming_strings: false,
                ..self.options
            };
            return Arc::new(classify(sql, &options));
        }
        // Texts over the statement limit are not kept: they are unknown
        // anyway, and caching them would let one client fill memory.
        if sql.len() > self.options.max_statement_length {
            return Arc::new(classify(sql, &self.options));
        }
        if let Some(hit) = self.cache.get(sql) {
            return hit;
        }
        // Texts that differ only in plain numbers (pgbench's and most
        // applications' simple-protocol statements) also share one entry
        // under their shape, unless a number's value mattered to the class.
        // Shape keys contain a NUL and statement texts never do, so the two
        // kinds of key cannot meet. A shape hit is not copied to the exact
        // key: a stream of new literals would only churn the cache.
        let shape = shape_key(sql);
        if let Some(shape) = &shape
            && let Some(hit) = self.cache.get(shape.as_str())
        {
            return hit;
        }
        let (classification, shareable) = classify_with_shape(sql, &self.options);
        let classification = Arc::new(classification);
        if let Some(shape) = shape
            && shareable
        {
            self.cache.insert(shape.into(), classification.clone());
        }
        self.cache.insert(sql.into(), classification.clone());
        classification
    }
}

impl StatementGate for PolicyGate {
    fn unmask_grant(&self, identity: &Identity, target: &str) -> Option<String> {
        let subject = Subject::of(identity, target, false);
        self.policy.unmask_grant(&subject).map(|g| g.name.clone())
    }

    fn requestable_grant(
        &self,
        identity: &Identity,
        target: &str,
        grant: &str,
    ) -> Result<GrantRequestConfig, GrantRefusal> {
        let subject = Subject::of(identity, target, false);
        self.policy
            .requestable(grant, &subject)
            .map(|g| g.request.clone().expect("requestable grants have a request"))
    }

    fn check(&self, ctx: &StatementContext<'_>, session: &mut GateSession, sql: &str) -> Verdict {
        let classification = match ctx.source {
            // Called by OID: whatever function it is (set_config,
            // query_to_xml...) cannot be seen, so it is unknown.
            crate::gate::StatementSource::FunctionCall => Arc::new(Classification {
                statements: vec![StatementClass::unknown(
                    "a FunctionCall (fastpath) message calls a function by number, which the gateway cannot see",
                )],
            }),
            _ => self.classify(sql, session.standard_conforming_strings),
        };
        // PostgreSQL shortens a name past 63 bytes, and folds one outside
        // ASCII by its own encoding: two names could be one statement to it
        // and two to the gate.
        if let Some(refusal) = classification.statements.iter().find_map(|s| match &s.prepared {
            Some(PreparedRef::Prepare(name) | PreparedRef::Execute(name) | PreparedRef::Deallocate(Some(name))) => {
                unfollowable_name(name)
            }
            _ => None,
        }) {
            return Verdict::Deny(refusal);
        }
        let subject = Subject::of(ctx.identity, ctx.target, session.search_path_changed).with_granted(ctx.granted);
        let decision = self.policy.decide(&subject, classification);
        // Whether the grants held made a difference to this statement.
        let granted_by: Vec<Arc<str>> = if ctx.granted.is_empty() {
            Vec::new()
        } else {
            let without = Subject::of(ctx.identity, ctx.target, session.search_path_changed);
            let plain = self.policy.decide(&without, decision.classification.clone());
            let same = plain.decision() == decision.decision()
                && plain
                    .statements
                    .iter()
                    .map(|s| s.max_rows)
                    .eq(decision.statements.iter().map(|s| s.max_rows));
            if same { Vec::new() } else { ctx.granted.to_vec() }
        };
        let changes_search_path = decision
            .classification
            .statements
            .iter()
            .any(|s| s.features.contains(Feature::SearchPath));
        let verdict = match decision.decision() {
            DecisionKind::Allow
                if let Some(refusal) = executed_after_grant(&decision.classification, session, ctx.granted) =>
            {
                Verdict::Deny(refusal)
            }
            DecisionKind::Allow => {
                if decision.would_be() > DecisionKind::Allow {
                    let index = decision.deciding.unwrap_or(0);
                    tracing::info!(
                        would_be = %decision.would_be(),
                        rule = decision.statements[index].rule.map(|i| self.policy.rule(i).name.as_str()).unwrap_or("(default)"),
                        statement = %describe(&decision.classification.statements[index]),
                        "policy monitor: statement allowed that the policy would not allow"
                    );
                }
                let single = decision.statements.len() == 1;
                let max_rows = decision
                    .statements
                    .iter()
                    .filter_map(|s| s.max_rows)
                    .min()
                    .map(|(rows, rule)| RowLimit {
                        rows,
                        rule: Arc::from(self.policy.rule(rule).name.as_str()),
                    });
                let max_rows = max_rows.or_else(|| executed_limit(&decision.classification, session));
                if max_rows.is_some() && !single {
                    Verdict::Deny(limited_write_among_others())
                } else {
                    Verdict::Allow(Allowance {
                        max_rows,
                        classification: Some(decision.classification.clone()),
                        granted_by: granted_by.clone(),
                    })
                }
            }
            DecisionKind::Deny => Verdict::Deny(self.policy.refusal(&decision, &subject)),
            DecisionKind::RequireApproval => {
                let refusal = self.policy.refusal(&decision, &subject);
                let index = decision.deciding.unwrap_or(0);
                let rule = decision.statements[index].rule.map(|i| self.policy.rule(i));
                Verdict::RequireApproval(Box::new(ApprovalRequest {
                    rule: rule
                        .map(|r| r.name.clone())
                        .unwrap_or_else(|| "unknown-statement".into()),
                    approval: rule.and_then(|r| r.approval.clone()),
                    refusal,
                    classification: Some(decision.classification.clone()),
                    granted_by: granted_by.clone(),
                }))
            }
        };
        let verdict = match verdict {
            Verdict::Allow(allowance) => {
                if changes_search_path {
                    session.search_path_changed = true;
                }
                remember_prepared(&decision.classification, &allowance, session, &granted_by);
                // PREPARE writes nothing: its limit applies when it is EXECUTEd.
                let prepares = decision
                    .classification
                    .statements
                    .iter()
                    .all(|s| matches!(s.prepared, Some(PreparedRef::Prepare(_))));
                if prepares && !decision.classification.is_empty() {
                    // Still classified: the session learns from it that the
                    // name now means another statement.
                    Verdict::Allow(Allowance {
                        max_rows: None,
                        ..allowance
                    })
                } else {
                    Verdict::Allow(allowance)
                }
            }
            other => other,
        };
        match &verdict {
            Verdict::Allow(_) => tracing::debug!(
                identity = %ctx.identity,
                target = ctx.target,
                statements = decision.statements.len(),
                "statement allowed"
            ),
            Verdict::Deny(refusal) => {
                tracing::info!(identity = %ctx.identity, target = ctx.target, reason = %refusal.message, "statement refused")
            }
            Verdict::RequireApproval(request) => tracing::info!(
                identity = %ctx.identity,
                target = ctx.target,
                rule = %request.rule,
                "statement needs approval"
            ),
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gate for the token "ci" (group "deploy") on target "shop", with
    /// `policy` (its `[policy]` section and rules).
    fn gate_with(policy: &str) -> PolicyGate {
        let text = format!(
            r#"
[server]
allow_plaintext = true

[[identity.tokens]]
name = "ci"
sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
groups = ["deploy"]

[[targets]]
name = "shop"
host = "127.0.0.1"

[[targets.access]]
groups = ["deploy"]
role = "app"
password = "pw"
{policy}"#
        );
        PolicyGate::new(&Config::from_toml(&text, std::path::Path::new("/etc/sluice/sluice.toml")).unwrap())
    }

    fn gate() -> PolicyGate {
        gate_with(
            r#"
[policy]
default = "allow"

[[policy.rules]]
name = "no-unbounded-writes"
decision = "deny"
groups = ["*"]
features = ["no_where"]
"#,
        )
    }

    fn decide(gate: &PolicyGate, sql: &str) -> DecisionKind {
        decided(gate, sql).0
    }

    fn grants_gate() -> PolicyGate {
        let text = r#"
[server]
allow_plaintext = true

[[identity.tokens]]
name = "ci"
sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
groups = ["deploy"]

[[targets]]
name = "shop"
host = "127.0.0.1"

[[targets.access]]
groups = ["*"]
role = "app"
password = "pw"

[policy]
default = "allow"

[[policy.grants]]
name = "writer"
grant = "access"
groups = ["oncall"]
approvers = ["leads"]
max_duration = "2h"

[[policy.grants]]
name = "migrators"
grant = "access"
groups = ["deploy"]

[[policy.rules]]
name = "ledger-is-read-only"
decision = "deny"
kinds = ["write", "ddl"]
relations = ["ledger"]
except_grants = ["writer", "migrators"]

[[policy.rules]]
name = "writers-drops-need-a-lead"
decision = "require_approval"
grants = ["writer"]
features = ["drop"]
approvers = ["leads"]
"#;
        PolicyGate::new(&Config::from_toml(text, std::path::Path::new("/etc/sluice/sluice.toml")).unwrap())
    }

    #[test]
    fn rules_name_grants_held_on_request_or_standing() {
        let gate = grants_gate();
        let policy = gate.policy();
        let labels = BTreeMap::new();
        let writer: [Arc<str>; 1] = [Arc::from("writer")];
        let check = |groups: &[&str], granted: &[Arc<str>], sql: &str| {
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            let subject = Subject {
                name: "bob",
                subject: "bob",
                email: None,
                groups: &groups,
                labels: &labels,
                target: "shop",
                search_path_changed: false,
                granted,
            };
            let decision = policy.decide(&subject, gate.classify(sql, true));
            let hint = policy.refusal(&decision, &subject).hint;
            (decision.decision(), hint)
        };
        let delete = "DELETE FROM ledger WHERE id = 1";
        let (decision, hint) = check(&["oncall"], &[], delete);
        assert_eq!(decision, DecisionKind::Deny);
        assert_eq!(
            hint.as_deref(),
            Some(
                "grant \"writer\" lifts this rule; ask for it with: sluice request --target shop --grant writer --for 30m --reason \"...\""
            )
        );
        // Approved: the rule that excepts it no longer applies, and the one
        // that names it does.
        assert_eq!(check(&["oncall"], &writer, delete).0, DecisionKind::Allow);
        assert_eq!(
            check(&["oncall"], &writer, "DROP TABLE ledger").0,
            DecisionKind::RequireApproval
        );
        assert_eq!(check(&["oncall"], &[], "DROP TABLE ledger").0, DecisionKind::Deny);
        // A grant approved for someone no longer among its holders (left
        // the group since) does not hold.
        assert_eq!(check(&["analytics"], &writer, delete).0, DecisionKind::Deny);
        // Someone who may not ask gets no hint to.
        let (_, hint) = check(&["analytics"], &[], delete);
        assert!(!hint.unwrap().contains("sluice request"));
        // A standing grant is held by its holders, without asking.
        assert_eq!(check(&["deploy"], &[], delete).0, DecisionKind::Allow);

        let groups = vec!["oncall".to_string()];
        let subject = Subject {
            name: "bob",
            subject: "bob",
            email: None,
            groups: &groups,
            labels: &labels,
            target: "shop",
            search_path_changed: false,
            granted: &[],
        };
        let grant = policy.requestable("writer", &subject).unwrap();
        assert_eq!(
            grant.request.as_ref().unwrap().max_duration,
            std::time::Duration::from_secs(7200)
        );
        let unknown = policy.requestable("root", &subject).unwrap_err();
        assert_eq!(
            unknown,
            GrantRefusal::Unknown("there is no grant \"root\"; grants that can be requested: writer".into())
        );
        assert!(matches!(
            policy.requestable("migrators", &subject),
            Err(GrantRefusal::Unknown(m)) if m.contains("is not requested")
        ));
        let elsewhere = Subject {
            target: "nowhere",
            ..subject
        };
        assert!(matches!(
            policy.requestable("writer", &elsewhere),
            Err(GrantRefusal::Unknown(_))
        ));
        let analytics = vec!["analytics".to_string()];
        let outsider = Subject {
            groups: &analytics,
            ..subject
        };
        assert!(matches!(
            policy.requestable("writer", &outsider),
            Err(GrantRefusal::Forbidden(m)) if m == "bob may not ask for grant \"writer\" on target \"shop\": the policy names who may"
        ));
    }

    /// Texts of one shape share a cache entry, but a text whose numbers
    /// decide its class never lends its class to another: a harmless
    /// `WHERE 1 = 2` seen first must not make `WHERE 1 = 1` harmless.
    #[test]
    fn the_shape_cache_cannot_be_primed() {
        let gate = gate();
        assert_eq!(decide(&gate, "DELETE FROM orders WHERE 1 = 2"), DecisionKind::Allow);
        assert_eq!(decide(&gate, "DELETE FROM orders WHERE 1 = 1"), DecisionKind::Deny);
        assert_eq!(decide(&gate, "DELETE FROM orders WHERE 2 = 2"), DecisionKind::Deny);
        assert_eq!(decide(&gate, "DELETE FROM orders WHERE 3 = 2"), DecisionKind::Allow);

        assert_eq!(decide(&gate, "DELETE FROM orders WHERE id = 1"), DecisionKind::Allow);
        let first = gate.classify("DELETE FROM orders WHERE id = 1", true);
        let same_shape = gate.classify("DELETE FROM orders WHERE id = 99", true);
        assert!(Arc::ptr_eq(&first, &same_shape), "one entry for one shape");
        assert_eq!(
            decide(&gate, "DELETE FROM orders WHERE id = 1 OR 1 = 1"),
            DecisionKind::Deny
        );
        // Whatever the folding decides, a cached class agrees with a fresh one.
        for sql in [
            "DELETE FROM orders WHERE id = 5 OR 2 = 2",
            "DELETE FROM orders WHERE 7 = 7 OR id = 5",
        ] {
            let fresh = classify(sql, &gate.options);
            assert_eq!(*gate.classify(sql, true), fresh, "{sql}");
        }
    }

    /// A gate whose policy requires approval for what it cannot read,
    /// with `rules` after it.
    fn unknown_gate(rules: &str) -> PolicyGate {
        gate_with(&format!(
            "[policy]\ndefault = \"allow\"\nunknown = \"require_approval\"\n{rules}"
        ))
    }

    /// The decision for `sql`, the name of the rule that made it, and the
    /// refusal a client would see (for an allowed text, none).
    fn decided(gate: &PolicyGate, sql: &str) -> (DecisionKind, Option<String>, Option<Refusal>) {
        let groups = vec!["deploy".to_string()];
        let labels = BTreeMap::new();
        let subject = Subject {
            name: "ci",
            subject: "ci",
            email: None,
            groups: &groups,
            labels: &labels,
            target: "shop",
            search_path_changed: false,
            granted: &[],
        };
        let policy = gate.policy();
        let decision = policy.decide(&subject, gate.classify(sql, true));
        let rule = decision
            .deciding
            .and_then(|i| decision.statements[i].rule)
            .map(|r| policy.rule(r).name.clone());
        let refusal = (decision.decision() != DecisionKind::Allow).then(|| policy.refusal(&decision, &subject));
        (decision.decision(), rule, refusal)
    }

    const HOLD_UNKNOWN: &str = r#"
[[policy.rules]]
name = "unreadable-is-reviewed"
decision = "require_approval"
groups = ["*"]
kinds = ["unknown"]
approvers = ["leads"]

[[policy.rules]]
name = "also-unreadable"
decision = "require_approval"
groups = ["deploy"]
kinds = ["unknown"]
approvers = ["deploy"]
"#;

    /// `unknown = "require_approval"` names no approvers: without a rule
    /// the statement is refused, and the message says so rather than
    /// promise an approval nobody can give.
    #[test]
    fn an_unreadable_statement_without_a_rule_is_refused_and_says_how_to_hold_it() {
        let gate = unknown_gate("");
        let (decision, rule, refusal) = decided(&gate, "SELEKT * FROM orders");
        let refusal = refusal.unwrap();
        assert_eq!((decision, rule), (DecisionKind::RequireApproval, None));
        assert!(
            refusal
                .message
                .starts_with("statement refused: Sluice cannot classify it (")
                && refusal
                    .message
                    .ends_with("), and no policy rule that applies to you holds such statements for approval"),
            "{}",
            refusal.message
        );
        assert!(
            refusal
                .hint
                .as_deref()
                .unwrap_or("")
                .contains(r#"kinds = ["unknown"] and approvers"#),
            "{:?}",
            refusal.hint
        );
    }

    /// A rule for unknown statements as strict as `unknown` takes them
    /// over, so that its approvers decide (the first such rule, as among
    /// any equally strict rules); a stricter rule still wins, and a rule
    /// that matches them only as opaque (by relation) does not.
    #[test]
    fn a_rule_as_strict_as_unknown_decides_an_unreadable_statement() {
        let gate = unknown_gate(HOLD_UNKNOWN);
        let (decision, rule, refusal) = decided(&gate, "SELEKT * FROM orders");
        let refusal = refusal.unwrap();
        assert_eq!(
            (decision, rule.as_deref()),
            (DecisionKind::RequireApproval, Some("unreadable-is-reviewed"))
        );
        // The rule gives no reason: approvers read why it is unknown.
        assert!(
            refusal.message.starts_with(
                r#"statement needs approval under rule "unreadable-is-reviewed": Sluice cannot classify it (sql parser error"#
            ),
            "{}",
            refusal.message
        );
        // What it can read is not touched by the rule.
        assert_eq!(decided(&gate, "SELECT * FROM orders").0, DecisionKind::Allow);

        let deny = format!(
            "{HOLD_UNKNOWN}\n[[policy.rules]]\nname = \"no-unreadable\"\ndecision = \"deny\"\ngroups = [\"*\"]\nkinds = [\"unknown\"]\n"
        );
        let gate = unknown_gate(&deny);
        let (decision, rule, _) = decided(&gate, "SELEKT * FROM orders");
        assert_eq!((decision, rule.as_deref()), (DecisionKind::Deny, Some("no-unreadable")));

        // A rule about a relation, which an opaque statement may touch,
        // is not a rule for what the gateway cannot read.
        let relation = "[[policy.rules]]\nname = \"keys-are-reviewed\"\ndecision = \"require_approval\"\n\
                        groups = [\"*\"]\nrelations = [\"api_keys\"]\napprovers = [\"leads\"]\n";
        let gate = unknown_gate(relation);
        let (decision, rule, _) = decided(&gate, "SELEKT * FROM orders");
        assert_eq!((decision, rule), (DecisionKind::RequireApproval, None));
        let (decision, rule, _) = decided(&gate, "SELECT * FROM api_keys");
        assert_eq!(
            (decision, rule.as_deref()),
            (DecisionKind::RequireApproval, Some("keys-are-reviewed"))
        );

        // A rule in monitor mode only says what it would do.
        let monitor = HOLD_UNKNOWN.replace("kinds = [\"unknown\"]\n", "kinds = [\"unknown\"]\nmonitor = true\n");
        let gate = unknown_gate(&monitor);
        let (decision, rule, _) = decided(&gate, "SELEKT * FROM orders");
        assert_eq!((decision, rule), (DecisionKind::RequireApproval, None));

        // A rule less strict than `unknown` does not lift it.
        let allow = "[[policy.rules]]\nname = \"anything\"\ndecision = \"allow\"\ngroups = [\"*\"]\n";
        let gate = unknown_gate(allow);
        let (decision, rule, _) = decided(&gate, "SELEKT * FROM orders");
        assert_eq!((decision, rule), (DecisionKind::RequireApproval, None));
    }
}
