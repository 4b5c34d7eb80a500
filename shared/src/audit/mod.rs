//! The audit trail: every session, statement, decision and grant use, kept
//! in a tamper-evident store.
//!
//! Sessions hand events to an [`Auditor`]; its writer thread appends them to
//! an [`AuditStore`] in batches (one transaction for everything that
//! gathered) and extends the hash chain (`chain`). A statement's event is
//! *write-ahead*: the session holds the statement back until the event is
//! durable ([`Auditor::write_ahead`]): with `sync = "normal"` that is once
//! it is copied into the write-ahead journal (`journal`), at once; with
//! `sync = "full"`, once its group commit is on disk. When the store cannot
//! write, the auditor says so ([`Auditor::available`]) and sessions refuse
//! new statements (or, with `on_audit_failure = "continue"`, let them run);
//! events already journaled or not write-ahead are kept and written once
//! the store recovers, and the trail then records how many statements were
//! refused.

mod chain;
mod event;
mod journal;
mod lineage;
pub mod report;
mod sqlite;
mod writer;

use std::path::PathBuf;

pub use chain::{Hash, PublicKey, SignedHead, Signer};
pub use event::{
    AccessAsk, ColumnRecord, Completion, CompletionView, Detail, Envelope, Event, Parts, Record, SampleRows,
    StatementRecord, StatementRecords, StatementView, join_completion,
};
pub use journal::{Journal, Mark as JournalMark, path_for as journal_path};
pub use lineage::{LineageQuery, LineageRow, lineage};
pub use sqlite::{Broken, EventFilter, OpenGrant, OpenRequest, SessionSummary, SqliteStore, StoredEvent, Verification};
pub use writer::{Auditor, Durable, GATHER, HealthSnapshot, Ticket, Unavailable, WriterOptions};

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// fsync on every commit: a committed event survives power loss.
    Full,
    /// fsync at WAL checkpoints only: a committed event survives the
    /// gateway's crash, not the machine's.
    Normal,
}

/// Where events are kept. The embedded default is [`SqliteStore`]; the
/// writer thread is the only caller of these methods.
pub trait AuditStore: Send {
    /// Appends events (with their stored form) in order, as one durable
    /// unit, after the current head, and keeps `journal`, how far into the
    /// write-ahead journal the trail now reaches, in the same unit; returns
    /// the id of the last event.
    fn append_records(&mut self, records: &[&Record], journal: Option<JournalMark>) -> Result<u64, AuditError>;

    /// Appends events in order, as one durable unit; returns the id of the
    /// last one.
    fn append(&mut self, events: &[Event]) -> Result<u64, AuditError> {
        let records: Vec<Record> = events.iter().cloned().map(Record::new).collect();
        self.append_records(&records.iter().collect::<Vec<_>>(), None)
    }

    /// How far into the write-ahead journal the trail reaches (its start
    /// for a store that keeps no journal position).
    fn journal_mark(&self) -> JournalMark {
        JournalMark::default()
    }

    /// The last event's id and hash.
    fn head(&self) -> (u64, Hash);

    /// Keeps a signed head with the trail.
    fn record_head(&mut self, head: &SignedHead) -> Result<(), AuditError>;

    /// Removes the events older than `before` (RFC 3339, UTC) in whole
    /// chain segments: through the newest signed head whose event is that
    /// old, never past it, and keeps that head so the rest still verifies.
    /// Returns the last id removed and how many events went.
    fn prune(&mut self, before: &str) -> Result<Option<(u64, u64)>, AuditError>;
}

/// Why the audit trail could not be opened, written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{what} ({}): {source}", path.display())]
    Sqlite {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("audit database {}: {reason}", path.display())]
    Setup { path: PathBuf, reason: String },
    #[error("audit signing key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("audit head file {}: {reason}", path.display())]
    HeadFile { path: PathBuf, reason: String },
}

/// Reads the head file kept beside the trail, if there is one.
pub fn read_head_file(path: &std::path::Path) -> Result<Option<SignedHead>, AuditError> {
    match std::fs::read_to_string(path) {
        Ok(text) => SignedHead::parse(&text).map(Some).ok_or_else(|| AuditError::HeadFile {
            path: path.to_path_buf(),
            reason: "not a signed head (expected one line: id, hash, signature)".into(),
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(AuditError::HeadFile {
            path: path.to_path_buf(),
            reason: err.to_string(),
        }),
    }
}
