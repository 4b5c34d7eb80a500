//! The statement seam: every statement text a client sends (each simple Query,
//! each Parse of the extended protocol) passes through one [`StatementGate`]
//! before anything reaches the database. The gate decides; the session enforces
//! the decision in a way that keeps the protocol and the client's transaction
//! state exactly as PostgreSQL would have left them (see `session::proxy`).

use crate::identity::Identity;

/// How a statement arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementSource<'a> {
    /// A simple Query message; may hold several statements.
    SimpleQuery,
    /// A Parse message preparing a statement under this name ("" is unnamed).
    Parse { statement: &'a str },
}

/// Everything the gate may base a decision on, besides the text itself.
#[derive(Debug, Clone, Copy)]
pub struct StatementContext<'a> {
    pub identity: &'a Identity,
    /// The target's name, as the client chose it.
    pub target: &'a str,
    pub session_id: &'a str,
    pub source: StatementSource<'a>,
}

/// A decision that a statement must not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// SQLSTATE sent to the client; 42501 (insufficient privilege) for policy.
    pub code: &'static str,
    /// What happened, naming the rule.
    pub message: String,
    /// What to do next.
    pub hint: Option<String>,
}

/// The gate's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(Refusal),
}

/// Decides, for each statement, whether it may run. Implementations are pure
/// and synchronous: no IO on the statement path.
pub trait StatementGate: Send + Sync {
    fn check(&self, ctx: &StatementContext<'_>, sql: &str) -> Verdict;
}

/// The gate of the foundation: allows every statement and records that it saw
/// it. Statement text is not logged (it may hold values that masking must see
/// first); its length and leading keyword are.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl StatementGate for AllowAll {
    fn check(&self, ctx: &StatementContext<'_>, sql: &str) -> Verdict {
        tracing::debug!(
            identity = %ctx.identity,
            target = ctx.target,
            session = ctx.session_id,
            source = ?ctx.source,
            keyword = leading_keyword(sql),
            len = sql.len(),
            "statement allowed"
        );
        Verdict::Allow
    }
}

/// The first word of a statement, skipping whitespace and comments, for logs.
pub fn leading_keyword(sql: &str) -> &str {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, tail)| tail);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, tail)| tail);
        } else {
            break;
        }
    }
    let end = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
    &rest[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_keyword_skips_comments() {
        assert_eq!(leading_keyword("  select 1"), "select");
        assert_eq!(leading_keyword("-- hi\n/* x */ DELETE FROM t"), "DELETE");
        assert_eq!(leading_keyword("/* unterminated"), "");
        assert_eq!(leading_keyword("(SELECT 1)"), "");
    }
}
