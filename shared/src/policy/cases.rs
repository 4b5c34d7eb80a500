//! Tables of expected decisions (`sluice policy test`), so teams can test
//! their policy in their own CI. A case names who asks, where, the statement
//! and the expected decision, and may also pin the classification (kind,
//! relations, features) and the deciding rule.
//!
//! ```toml
//! [defaults]
//! user = "alice"
//! groups = ["engineering"]
//! target = "shop"
//!
//! [[cases]]
//! sql = "DELETE FROM orders"
//! expect = "deny"
//! rule = "no-unbounded-writes"
//! features = ["no_where"]
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use super::{ClassifyOptions, Decision, Policy, Subject, classify};
use crate::config::DecisionKind;

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct Who {
    user: Option<String>,
    groups: Option<Vec<String>>,
    labels: Option<BTreeMap<String, String>>,
    target: Option<String>,
    /// Requested grants held (approved through `sluice request`).
    grants: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    defaults: Who,
    #[serde(default)]
    cases: Vec<RawCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    sql: String,
    expect: String,
    user: Option<String>,
    groups: Option<Vec<String>>,
    labels: Option<BTreeMap<String, String>>,
    target: Option<String>,
    /// Requested grants held (approved through `sluice request`).
    grants: Option<Vec<String>>,
    /// Kind of the deciding statement.
    kind: Option<String>,
    /// Relations of all statements, as "name", "schema.name", optionally
    /// followed by " (read)", " (write)" or " (ddl)".
    relations: Option<Vec<String>>,
    /// Features of all statements together.
    features: Option<Vec<String>>,
    /// The rule that decides ("(default)" or "(unknown)" for none).
    rule: Option<String>,
    /// A comment shown with failures.
    note: Option<String>,
}

/// One case's outcome.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// 1-based position in the file.
    pub number: usize,
    pub sql: String,
    pub who: String,
    pub expected: String,
    pub got: String,
    /// What did not match, empty when the case passed.
    pub failures: Vec<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Why a case file cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("case {number}: {message}")]
    Invalid { number: usize, message: String },
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The name of the rule that decided a statement, as case files write it.
pub fn deciding_rule_name(policy: &Policy, decision: &Decision) -> String {
    let Some(index) = decision.deciding else {
        return "(none)".into();
    };
    let statement = &decision.statements[index];
    match statement.rule {
        Some(rule) => policy.rule(rule).name.clone(),
        None if decision.classification.statements[index].kind == super::Kind::Unknown => "(unknown)".into(),
        None => "(default)".into(),
    }
}

/// Runs every case of a file against a policy.
pub fn run(policy: &Policy, text: &str) -> Result<Vec<CaseResult>, CaseError> {
    let file: CaseFile = toml::from_str(text).map_err(|err| CaseError::Syntax {
        line: err.span().map(|s| line_of(text, s.start)).unwrap_or(1),
        message: err.message().trim().to_string(),
    })?;
    let options = ClassifyOptions {
        max_statement_length: policy.config().max_statement_length,
        ..ClassifyOptions::default()
    };
    let mut results = Vec::new();
    for (i, case) in file.cases.into_iter().enumerate() {
        let number = i + 1;
        let invalid = |message: String| CaseError::Invalid { number, message };
        let expected = match case.expect.as_str() {
            "allow" => DecisionKind::Allow,
            "deny" => DecisionKind::Deny,
            "require_approval" => DecisionKind::RequireApproval,
            other => {
                return Err(invalid(format!(
                    "expect = \"{other}\": write allow, deny or require_approval"
                )));
            }
        };
        let user = case
            .user
            .or(file.defaults.user.clone())
            .unwrap_or_else(|| "someone".into());
        let groups = case.groups.or(file.defaults.groups.clone()).unwrap_or_default();
        let labels = case.labels.or(file.defaults.labels.clone()).unwrap_or_default();
        let target = case
            .target
            .or(file.defaults.target.clone())
            .ok_or_else(|| invalid("no target: set target in the case or in [defaults]".into()))?;
        let granted: Vec<Arc<str>> = case
            .grants
            .or(file.defaults.grants.clone())
            .unwrap_or_default()
            .into_iter()
            .map(Arc::from)
            .collect();
        let subject = Subject {
            name: &user,
            subject: &user,
            email: None,
            groups: &groups,
            labels: &labels,
            target: &target,
            search_path_changed: false,
            granted: &granted,
        };
        let classification = Arc::new(classify(&case.sql, &options));
        let decision = policy.decide(&subject, classification);
        let got = decision.decision();
        let mut failures = Vec::new();
        if got != expected {
            failures.push(format!("decision: expected {expected}, got {got}"));
        }
        let statements = &decision.classification.statements;
        if let Some(kind) = &case.kind {
            let actual = decision
                .deciding
                .map(|i| statements[i].kind.name())
                .unwrap_or("(no statement)");
            if actual != kind {
                failures.push(format!("kind: expected {kind}, got {actual}"));
            }
        }
        if let Some(expected_relations) = &case.relations {
            let mut actual: Vec<String> = Vec::new();
            let mut actual_with_access: Vec<String> = Vec::new();
            for relation in statements.iter().flat_map(|s| &s.relations) {
                let name = match &relation.schema {
                    Some(schema) => format!("{schema}.{}", relation.name),
                    None => relation.name.clone(),
                };
                actual_with_access.push(format!("{name} ({})", relation.access.name()));
                actual.push(name);
            }
            actual.sort();
            actual.dedup();
            actual_with_access.sort();
            actual_with_access.dedup();
            let mut expected_sorted = expected_relations.clone();
            expected_sorted.sort();
            expected_sorted.dedup();
            let with_access = expected_relations.iter().any(|r| r.ends_with(')'));
            let compare = if with_access { &actual_with_access } else { &actual };
            if &expected_sorted != compare {
                failures.push(format!(
                    "relations: expected [{}], got [{}]",
                    expected_sorted.join(", "),
                    compare.join(", ")
                ));
            }
        }
        if let Some(expected_features) = &case.features {
            let mut actual: Vec<&str> = statements
                .iter()
                .fold(super::Features::default(), |all, s| all.union(s.features))
                .iter()
                .map(|f| f.name())
                .collect();
            actual.sort();
            let mut expected_sorted: Vec<&str> = expected_features.iter().map(String::as_str).collect();
            expected_sorted.sort();
            if expected_sorted != actual {
                failures.push(format!(
                    "features: expected [{}], got [{}]",
                    expected_sorted.join(", "),
                    actual.join(", ")
                ));
            }
        }
        if let Some(rule) = &case.rule {
            let actual = deciding_rule_name(policy, &decision);
            if &actual != rule {
                failures.push(format!("rule: expected {rule}, got {actual}"));
            }
        }
        if !failures.is_empty()
            && let Some(note) = &case.note
        {
            failures.push(format!("note: {note}"));
        }
        if let Some(index) = decision.deciding
            && !failures.is_empty()
            && let Some(why) = &statements[index].note
        {
            failures.push(format!("classifier: {why}"));
        }
        results.push(CaseResult {
            number,
            sql: case.sql,
            who: format!("{user} [{}] on {target}", groups.join(", ")),
            expected: expected.to_string(),
            got: format!("{got} ({})", deciding_rule_name(policy, &decision)),
            failures,
        });
    }
    Ok(results)
}
