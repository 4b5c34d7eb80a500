//! The statement seam: every statement text a client sends (each simple Query,
//! each Parse of the extended protocol) passes through one [`StatementGate`]
//! before anything reaches the database. The gate decides; the session enforces
//! the decision in a way that keeps the protocol and the client's transaction
//! state exactly as PostgreSQL would have left them (see `session::proxy`).
//! The production gate is `policy::PolicyGate`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::ApprovalConfig;
use crate::identity::Identity;

/// How a statement arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementSource<'a> {
    /// A simple Query message; may hold several statements.
    SimpleQuery,
    /// A Parse message preparing a statement under this name ("" is unnamed).
    Parse { statement: &'a str },
    /// A FunctionCall (fastpath) message: a function called by OID, which the
    /// gateway cannot see; `sql` is empty. Policy decides it as unknown.
    FunctionCall,
}

/// Everything the gate may base a decision on, besides the text itself.
#[derive(Debug, Clone, Copy)]
pub struct StatementContext<'a> {
    pub identity: &'a Identity,
    /// The target's name, as the client chose it.
    pub target: &'a str,
    pub session_id: &'a str,
    pub source: StatementSource<'a>,
    /// Requested grants (`sluice request`) approved for this identity on
    /// this target and not expired, by name.
    pub granted: &'a [Arc<str>],
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

/// Why a grant cannot be asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantRefusal {
    /// No such grant or target, or the grant is not one that is requested.
    #[error("{0}")]
    Unknown(String),
    /// The policy does not let this identity ask for it there.
    #[error("{0}")]
    Forbidden(String),
}

/// A limit on the rows one write may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLimit {
    pub rows: u64,
    /// The rule that set it, named when the limit is hit.
    pub rule: Arc<str>,
}

/// What an allowed statement may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowance {
    /// For a write: the most rows it may touch, checked on its result.
    pub max_rows: Option<RowLimit>,
    /// What the text was classified as, when the gate classified it: the
    /// session's masker needs the relations a statement reads (COPY of a
    /// table with masked columns is refused; expressions over one are
    /// masked).
    pub classification: Option<std::sync::Arc<crate::policy::Classification>>,
    /// The requested grants it is allowed by: without them it would not
    /// be (or not as it is). A prepared statement remembers them, and is
    /// not run once one has ended.
    pub granted_by: Vec<Arc<str>>,
}

/// A statement that may run only once approvers agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRequest {
    /// The rule that asks for approval.
    pub rule: String,
    /// Who may approve, how many, for how long (`None` for statements the
    /// classifier could not read, which no rule describes).
    pub approval: Option<ApprovalConfig>,
    /// What the client is told while the statement cannot be held.
    pub refusal: Refusal,
    /// How the statement was classified: what masking and the audit trail
    /// need of it when it runs once approved.
    pub classification: Option<std::sync::Arc<crate::policy::Classification>>,
    /// The requested grants its decision depended on (see
    /// [`Allowance::granted_by`]).
    pub granted_by: Vec<Arc<str>>,
}

/// The gate's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow(Allowance),
    Deny(Refusal),
    RequireApproval(Box<ApprovalRequest>),
}

impl Verdict {
    /// Allowed, without limits.
    pub fn allow() -> Verdict {
        Verdict::Allow(Allowance::default())
    }
}

/// What the gate remembers about one session between statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateSession {
    /// The session changed `search_path` (at startup or with SET), so
    /// unqualified names can no longer be assumed to be in `public`.
    pub search_path_changed: bool,
    /// The server's `standard_conforming_strings` for this session.
    pub standard_conforming_strings: bool,
    /// Row limits of SQL-level prepared statements (PREPARE name AS ...),
    /// applied when they are EXECUTEd.
    pub prepared_limits: HashMap<String, RowLimit>,
    /// SQL-level prepared statements allowed while the session held
    /// requested grants, with those grants: EXECUTE after one ended is
    /// refused.
    pub prepared_grants: HashMap<String, Vec<Arc<str>>>,
}

impl Default for GateSession {
    fn default() -> GateSession {
        GateSession {
            search_path_changed: false,
            standard_conforming_strings: true,
            prepared_limits: HashMap::new(),
            prepared_grants: HashMap::new(),
        }
    }
}

/// Decides, for each statement, whether it may run. Implementations are pure
/// and synchronous: no IO on the statement path.
pub trait StatementGate: Send + Sync {
    fn check(&self, ctx: &StatementContext<'_>, session: &mut GateSession, sql: &str) -> Verdict;

    /// The name of the unmask grant this identity holds on this target: its
    /// session sees clear values. None by default: everyone is masked.
    fn unmask_grant(&self, identity: &crate::identity::Identity, target: &str) -> Option<String> {
        let _ = (identity, target);
        None
    }

    /// How `identity` may ask for grant `grant` on `target`
    /// (`sluice request`), or why it may not.
    fn requestable_grant(
        &self,
        identity: &crate::identity::Identity,
        target: &str,
        grant: &str,
    ) -> Result<crate::config::GrantRequestConfig, GrantRefusal> {
        let _ = (identity, target);
        Err(GrantRefusal::Unknown(format!(
            "there is no grant \"{grant}\": this gateway has no policy"
        )))
    }
}

/// A gate that allows every statement and records that it saw it: for tests
/// of the seam itself. Statement text is not logged (it may hold values that
/// masking must see first); its length and leading keyword are.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl StatementGate for AllowAll {
    fn check(&self, ctx: &StatementContext<'_>, _session: &mut GateSession, sql: &str) -> Verdict {
        tracing::debug!(
            identity = %ctx.identity,
            target = ctx.target,
            session = ctx.session_id,
            source = ?ctx.source,
            keyword = leading_keyword(sql),
            len = sql.len(),
            "statement allowed"
        );
        Verdict::allow()
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
