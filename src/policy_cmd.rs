//! `sluice policy check` and `sluice policy test`: explain a decision, and run
//! a table of expected decisions.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use sluice_core::Config;
use sluice_core::config::DecisionKind;
use sluice_core::policy::{self, ClassifyOptions, Policy, PolicyGate, Subject, cases};

/// Exit status of `policy check` for a decision: 0 allow, 1 deny, 2 approval.
fn exit_code(decision: DecisionKind) -> i32 {
    match decision {
        DecisionKind::Allow => 0,
        DecisionKind::Deny => 1,
        DecisionKind::RequireApproval => 2,
    }
}

pub struct CheckArgs<'a> {
    pub config: &'a Path,
    pub user: &'a str,
    pub groups: &'a [String],
    pub labels: &'a [String],
    pub target: &'a str,
    pub sql: &'a str,
    /// Requested grants to assume held.
    pub grants: &'a [String],
}

/// Prints the classification, every matching rule and the decision; returns
/// the exit status.
pub fn check(args: CheckArgs<'_>) -> anyhow::Result<i32> {
    let config = Config::load(args.config)?;
    anyhow::ensure!(
        config.target(args.target).is_some(),
        "{} has no target \"{}\" (targets: {})",
        args.config.display(),
        args.target,
        config
            .targets
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let labels = parse_labels(args.labels)?;
    let gate = PolicyGate::new(&config);
    let policy = gate.policy();
    let granted: Vec<Arc<str>> = args.grants.iter().map(|g| Arc::from(g.as_str())).collect();
    for grant in args.grants {
        anyhow::ensure!(
            policy.config().grants.iter().any(|g| &g.name == grant),
            "the policy defines no grant \"{grant}\""
        );
    }
    let subject = Subject {
        name: args.user,
        subject: args.user,
        email: None,
        groups: args.groups,
        labels: &labels,
        target: args.target,
        search_path_changed: false,
        granted: &granted,
    };
    let options = ClassifyOptions {
        max_statement_length: policy.config().max_statement_length,
        ..ClassifyOptions::default()
    };
    let classification = Arc::new(policy::classify(args.sql, &options));
    let decision = policy.decide(&subject, classification);
    let statements = &decision.classification.statements;
    println!(
        "{} [{}] on target {}, policy {}",
        args.user,
        args.groups.join(", "),
        args.target,
        policy.config().source.display()
    );
    if statements.is_empty() {
        println!("\n(no statement: an empty query string is allowed)");
    }
    for (i, (statement, verdict)) in statements.iter().zip(&decision.statements).enumerate() {
        println!(
            "\nstatement {} of {}: {}",
            i + 1,
            statements.len(),
            policy::describe(statement)
        );
        println!("  kind        {}", statement.kind);
        let relations: Vec<String> = statement.relations.iter().map(ToString::to_string).collect();
        println!(
            "  relations   {}",
            if relations.is_empty() {
                "(none)".into()
            } else {
                relations.join(", ")
            }
        );
        let features: Vec<&str> = statement.features.iter().map(|f| f.name()).collect();
        println!(
            "  features    {}",
            if features.is_empty() {
                "(none)".into()
            } else {
                features.join(", ")
            }
        );
        if !statement.functions.is_empty() {
            println!("  functions   {}", statement.functions.join(", "));
        }
        if statement.opaque {
            println!("  opaque      yes: it may touch relations the gateway cannot see");
        }
        if let Some(note) = &statement.note {
            println!("  note        {note}");
        }
        if verdict.matched.is_empty() {
            println!("  rules       none match");
        } else {
            for (n, index) in verdict.matched.iter().enumerate() {
                let rule = policy.rule(*index);
                let mut line = format!("{} -> {}", rule.name, rule.decision);
                if let Some(max) = rule.max_rows {
                    line.push_str(&format!(" (max_rows {max})"));
                }
                if rule.monitor {
                    line.push_str(" (monitor only)");
                }
                println!("  {}  {line}", if n == 0 { "rules     " } else { "          " });
            }
        }
        let by = match verdict.rule {
            Some(index) => format!("rule \"{}\"", policy.rule(index).name),
            None if statement.kind == policy::Kind::Unknown => "the policy's `unknown` setting".into(),
            None => "the policy's default".into(),
        };
        println!("  decision    {} by {by}", verdict.decision);
        if verdict.would_be != verdict.decision {
            println!("  monitor     would be {} if enforced", verdict.would_be);
        }
        if let Some((max, rule)) = verdict.max_rows {
            println!("  row limit   {max} (rule \"{}\")", policy.rule(rule).name);
        }
    }
    let overall = decision.decision();
    println!("\ndecision: {overall}");
    let held = (overall == DecisionKind::RequireApproval)
        .then_some(())
        .and(decision.deciding)
        .and_then(|i| decision.statements[i].rule)
        .and_then(|rule| policy.rule(rule).approval.as_ref())
        .filter(|approval| approval.mode == sluice_core::config::ApprovalMode::Hold);
    if let Some(approval) = held {
        println!(
            "the client waits: NOTICE held for approval (request ID), approvers: {} ({} needed, {} s to decide);",
            approval.approvers.join(", "),
            approval.approvals,
            approval.timeout.as_secs()
        );
        println!("                  the statement runs once approved, or fails with who denied it and why.");
        println!(
            "                  (A prepared statement is held the same way at its Parse, and runs once when approved.)"
        );
    }
    if overall != DecisionKind::Allow {
        let refusal = policy.refusal(&decision, &subject);
        println!("the client sees: ERROR {}: {}", refusal.code, refusal.message);
        if let Some(hint) = refusal.hint {
            println!("                 HINT: {hint}");
        }
    }
    match policy.unmask_grant(&subject) {
        Some(grant) => println!("results: clear values, by unmask grant \"{}\"", grant.name),
        None if config.masking.detectors.is_empty() && config.masking.rules.is_empty() => {
            println!("results: not masked (masking is off)")
        }
        None => println!("results: masked (no unmask grant on this target)"),
    }
    Ok(exit_code(overall))
}

fn parse_labels(labels: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    labels
        .iter()
        .map(|label| {
            label
                .split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--label {label}: write key=value, such as kind=agent"))
        })
        .collect()
}

/// Runs a case file; returns the exit status (non-zero if any case failed).
pub fn test(config: &Path, file: &Path) -> anyhow::Result<i32> {
    let config = Config::load(config)?;
    let policy = Policy::new(&config);
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let results = cases::run(&policy, &text).with_context(|| format!("in {}", file.display()))?;
    let failed: Vec<&cases::CaseResult> = results.iter().filter(|r| !r.passed()).collect();
    let width = 60;
    println!("{:>4}  {:<6}  {:<width$}  result", "case", "", "statement");
    for result in &results {
        let mut sql: String = result.sql.split_whitespace().collect::<Vec<_>>().join(" ");
        if sql.chars().count() > width {
            sql = sql.chars().take(width - 3).collect::<String>() + "...";
        }
        let status = if result.passed() { "ok" } else { "FAIL" };
        println!("{:>4}  {:<6}  {:<width$}  {}", result.number, status, sql, result.got);
    }
    for result in &failed {
        println!("\ncase {} failed: {}", result.number, result.sql);
        println!("  who: {}", result.who);
        for failure in &result.failures {
            println!("  {failure}");
        }
    }
    println!(
        "\n{} cases, {} passed, {} failed ({})",
        results.len(),
        results.len() - failed.len(),
        failed.len(),
        file.display()
    );
    Ok(if failed.is_empty() { 0 } else { 1 })
}
