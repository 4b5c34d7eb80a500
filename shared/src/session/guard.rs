//! Row-limit guards: a write allowed "up to N rows" runs, its answer is held
//! until its row count is known, and it is undone if it touched more.
//!
//! The proxy drives the protocol (see `Proxy::start_simple_guard` and
//! friends); this module holds the guard's state and the pure parts: reading
//! the count from a CommandComplete tag and wording the refusal.

use bytes::BytesMut;

use crate::gate::RowLimit;
use crate::protocol::Cursor;
use crate::protocol::backend::{ErrorFields, Severity};

/// Result bytes a guard holds at most while it waits for the row count.
/// RETURNING output beyond this makes the write fail closed.
pub(crate) const HOLD_CAP: usize = 16 * 1024 * 1024;

/// How a guarded statement was sent.
#[derive(Debug)]
pub(crate) enum GuardKind {
    /// A simple Query. `wrapped`: no transaction was open, so the gateway
    /// opened one with BEGIN and ends it with COMMIT or ROLLBACK.
    Simple { wrapped: bool },
    /// An Execute of a portal whose statement carries a limit.
    Extended { portal: String },
}

/// Where a guard is.
#[derive(Debug)]
pub(crate) enum GuardPhase {
    /// BEGIN was sent; the client's Query waits for its answer.
    Beginning { query: Vec<u8>, failed: bool },
    /// The statement runs; its answer is being held.
    Running,
    /// COMMIT (`commit`) or ROLLBACK was sent; then the client gets `payload`.
    Finishing { payload: BytesMut, commit: bool },
}

/// The SQLSTATE of a write refused over its row limit (and of its
/// completion in the trail): insufficient privilege, as other refusals.
pub(crate) const ROW_LIMIT_SQLSTATE: &str = "42501";

/// A write under a row limit.
#[derive(Debug)]
pub(crate) struct Guard {
    pub limit: RowLimit,
    pub kind: GuardKind,
    pub phase: GuardPhase,
    /// DataRows seen (RETURNING output), across Executes of one portal.
    pub rows: u64,
    /// The held answer, already through the result seam.
    pub held: BytesMut,
    /// The command tag's verb and count, once CommandComplete arrived.
    pub completed: Option<(String, u64)>,
    /// The statement's own ErrorResponse, when it failed.
    pub error: Option<Vec<u8>>,
    /// Held output outgrew [`HOLD_CAP`].
    pub overflowed: bool,
    /// The Execute asked for a few rows, and the write returned more (its
    /// portal was suspended): it ran whole, but its count never came.
    pub suspended: bool,
    /// The statement is a COPY FROM STDIN that the server started: the
    /// client's copy data flows until its CopyDone or CopyFail (`copy_ended`).
    pub copy_in: bool,
    pub copy_ended: bool,
}

impl Guard {
    pub fn new(limit: RowLimit, kind: GuardKind, phase: GuardPhase) -> Guard {
        Guard {
            limit,
            kind,
            phase,
            rows: 0,
            held: BytesMut::new(),
            completed: None,
            error: None,
            overflowed: false,
            suspended: false,
            copy_in: false,
            copy_ended: false,
        }
    }

    /// Whether the write touched (or returned) more rows than allowed, or
    /// may have and cannot be counted.
    pub fn over(&self) -> bool {
        self.overflowed
            || self.suspended
            || self.rows > self.limit.rows
            || self
                .completed
                .as_ref()
                .is_some_and(|(_, count)| *count > self.limit.rows)
    }

    /// The refusal for a write over its limit.
    pub fn refusal(&self) -> ErrorFields {
        let limit = group_thousands(self.limit.rows);
        let message = if self.suspended && !self.overflowed && self.rows <= self.limit.rows {
            format!(
                "statement refused: it was executed for a few of the rows it returns, so the gateway could not \
                 count the rows it touched (row limit {limit}, rule \"{}\"); it was rolled back",
                self.limit.rule
            )
        } else if self.overflowed {
            format!(
                "the rows this write returned exceed what the gateway holds while it counts them ({} MiB); \
                 the write was rolled back (row limit {limit}, rule \"{}\")",
                HOLD_CAP >> 20,
                self.limit.rule
            )
        } else {
            let (verb, count) = match &self.completed {
                Some((command, count)) => (past_tense(command), (*count).max(self.rows)),
                None => ("touched".to_string(), self.rows),
            };
            format!(
                "statement refused: it would have {verb} {} rows, over the limit of {limit} set by rule \"{}\"; \
                 it was rolled back",
                group_thousands(count),
                self.limit.rule
            )
        };
        ErrorFields::new(Severity::Error, ROW_LIMIT_SQLSTATE, message)
            .with_hint("narrow the statement's WHERE clause, or ask for approval to run it as it is")
    }
}

/// "DELETE" → "deleted".
fn past_tense(command: &str) -> String {
    match command {
        "DELETE" => "deleted",
        "UPDATE" => "updated",
        "INSERT" => "inserted",
        "MERGE" => "merged",
        "COPY" => "copied",
        "SELECT" => "selected",
        _ => "touched",
    }
    .to_string()
}

/// 48213 → "48,213".
pub(crate) fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The verb and row count of a CommandComplete body ("DELETE 5",
/// "INSERT 0 5", "COPY 5"). Commands without a count give `None`.
pub(crate) fn command_count(body: &[u8]) -> Option<(&str, u64)> {
    let tag = Cursor::new(body).cstr("command tag").ok()?;
    let mut words = tag.split(' ');
    let command = words.next()?;
    let count = words.next_back()?.parse().ok()?;
    Some((command, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_from_command_tags() {
        assert_eq!(command_count(b"DELETE 5\0"), Some(("DELETE", 5)));
        assert_eq!(command_count(b"INSERT 0 1200\0"), Some(("INSERT", 1200)));
        assert_eq!(command_count(b"COPY 7\0"), Some(("COPY", 7)));
        assert_eq!(command_count(b"BEGIN\0"), None);
    }

    #[test]
    fn refusal_names_count_limit_and_rule() {
        let mut guard = Guard::new(
            RowLimit {
                rows: 1000,
                rule: Arc::from("oncall-writes"),
            },
            GuardKind::Simple { wrapped: true },
            GuardPhase::Running,
        );
        guard.completed = Some(("DELETE".into(), 48_213));
        assert!(guard.over());
        let error = guard.refusal();
        assert_eq!(
            error.message,
            "statement refused: it would have deleted 48,213 rows, over the limit of 1,000 set by rule \"oncall-writes\"; it was rolled back"
        );
        assert_eq!(group_thousands(999), "999");
        assert_eq!(group_thousands(1_000_000), "1,000,000");
    }
}
