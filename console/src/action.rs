//! What changes the console's state ([`Action`]: a key, a tick, something
//! the gateway sent or answered) and what the state asks the outside world
//! to do ([`Command`]: API calls, queries, files). `update` turns one into
//! the other; nothing else changes the state.

use chrono::{DateTime, Utc};
use crossterm::event::KeyEvent;
use sluice_core::approvals::RequestView;
use sluice_core::audit::{SessionSummary, StoredEvent};
use sluice_core::live::LiveSummary;

#[derive(Debug, Clone)]
pub enum Action {
    Key(KeyEvent),
    Paste(String),
    /// The clock moved (countdowns, replay playback, sparklines).
    Tick(DateTime<Utc>),
    /// The event stream's state.
    Link(Link),
    /// An event from the gateway's stream, in trail order.
    Event(Box<StoredEvent>),
    /// The gateway's trail is not the one followed so far (replaced or
    /// reset): event ids start again.
    StreamReset,
    Sessions(Result<Vec<LiveSummary>, String>),
    Approvals(Result<Vec<RequestView>, String>),
    Decided {
        id: u64,
        approve: bool,
        /// The reason given (a denial's), so that a refused one is not lost.
        reason: Option<String>,
        result: Result<Box<RequestView>, String>,
    },
    Killed {
        session: String,
        result: Result<(), String>,
    },
    /// A live session's timeline so far (the session panel of Live).
    Timeline {
        session: String,
        result: Result<Vec<StoredEvent>, String>,
    },
    PastSessions(Result<Vec<SessionSummary>, String>),
    /// A past session's timeline, for Replay.
    Recording {
        session: String,
        result: Result<Vec<StoredEvent>, String>,
    },
    Exported(Result<String, String>),
    /// A notice the shell's query got (e.g. "held for approval: ...").
    QueryNotice(String),
    QueryDone(Result<QueryOutcome, QueryError>),
}

/// The event stream's connection to the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Connecting,
    Connected,
    /// Lost; trying again (attempt n) after `error`.
    Reconnecting {
        attempt: u32,
        error: String,
    },
    /// The gateway refused the token (401/403): not a network problem.
    Refused {
        error: String,
    },
}

/// What a shell query returned: the last result set with rows, and the
/// command tags of every statement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryOutcome {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
    /// More rows came than the shell keeps.
    pub truncated: bool,
    pub tags: Vec<String>,
    pub elapsed_ms: u64,
}

/// A failed shell query: the server's (or gateway's) error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    pub code: Option<String>,
    pub elapsed_ms: u64,
}

impl QueryError {
    /// An error of the console's own (no server said it).
    pub fn local(message: &str, elapsed_ms: u64) -> QueryError {
        QueryError {
            message: message.to_string(),
            detail: None,
            hint: None,
            code: None,
            elapsed_ms,
        }
    }
}

/// Work for the runner ([`crate::effects`]); each answers with an
/// [`Action`].
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Decide {
        id: u64,
        approve: bool,
        reason: Option<String>,
    },
    Kill {
        session: String,
    },
    /// Fetch live sessions and approvals now rather than at the next poll.
    Refresh,
    LoadTimeline {
        session: String,
    },
    LoadPastSessions,
    LoadRecording {
        session: String,
    },
    /// Write a session's events as JSON lines to a file of its own.
    Export {
        session: String,
        events: Vec<StoredEvent>,
    },
    RunQuery {
        target: String,
        sql: String,
    },
    CancelQuery,
    SaveHistory {
        entries: Vec<String>,
    },
}
