//! The proxy loop of an authenticated session.
//!
//! One task owns both sockets and four buffers and never waits on one
//! direction while the other could move: [`Proxy::poll_io`] writes whatever is
//! queued, then reads from whichever side has room downstream. This is what
//! keeps a pipelining client and a server writing large results from
//! deadlocking each other, and it gives backpressure for free: a side is not
//! read while the buffer it feeds is above [`HIGH_WATER`].
//!
//! Frontend messages are read whole (up to `server.max_message_size`); Query
//! and Parse pass through the statement gate. Backend messages are read whole
//! unless they exceed [`STREAM_THRESHOLD`], in which case the result seam may let
//! them stream through in chunks. Every backend message reaches the client
//! through the result seam.
//!
//! A refused statement is not simply dropped: the gateway sends upstream, in
//! its place, a statement that fails to parse, and replaces that failure's
//! ErrorResponse with the refusal. The server therefore does exactly what it
//! would do for any failed statement (abort the transaction block, discard the
//! rest of the extended-protocol batch until Sync, answer ReadyForQuery with
//! the right status), and the client's view stays consistent.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use super::executes::{Names, SqlExecutes};
use super::guard::{Guard, GuardKind, GuardPhase, HOLD_CAP, ROW_LIMIT_SQLSTATE, command_count};
use super::pending::{Columns, Confirm, Expect, Mark, Owner, PendingQueue};
use super::remembered::Remembered;
use super::results::ResultSeam;
use super::startup::encoding_is_safe;
use crate::audit::{self, Auditor, Durable, StatementRecord, StatementRecords};
use crate::gate::{
    Allowance, GateSession, Refusal, RowLimit, StatementContext, StatementGate, StatementSource, Verdict,
};
use crate::identity::Identity;
use crate::live::{LiveSession, SessionState};
use crate::mask::RowMasker;
use crate::metrics::Decision;
use crate::net::Stream;
use crate::protocol::backend::{self, ErrorFields, ParameterStatus, ReceivedError, Severity};
use crate::protocol::codec::{self, HEADER_LEN, printable};
use crate::protocol::frontend::{self, Parse, Query, tag as fe};
use crate::protocol::{Cursor, DecodeError, TxStatus};
use crate::shutdown::{Phase, ShutdownListener};

/// Stop reading a side while the buffer it feeds holds this much.
const HIGH_WATER: usize = 256 * 1024;

/// Read into buffers in steps of this size.
const READ_CHUNK: usize = 32 * 1024;

/// Backend messages larger than this are streamed through instead of held
/// whole, when the result seam allows it.
const STREAM_THRESHOLD: usize = 1024 * 1024;

/// How long the last bytes of a closing session may take to drain.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the upstream server receives in place of a refused statement. It is a
/// syntax error whatever the server's state, and it names the gateway in the
/// server's own log.
pub(crate) const REFUSED_STATEMENT: &str = "SLUICE REFUSED THIS STATEMENT";

/// The statement name of a failing Parse sent in place of a refused Bind
/// or Execute: it creates nothing, whether or not a statement of that name
/// exists, and leaves the client's unnamed statement alone.
const REFUSED_NAME: &str = "sluice:refused";

/// How a session ended, for its closing log line.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    ClientTerminated,
    ClientDisconnected,
    ServerClosed,
    Shutdown,
    ClientProtocol(String),
    ServerFailed(String),
    ClientIo(String),
    AuditFailed(String),
    Killed(String),
    /// The token the session signed in with expired.
    TokenExpired(String),
}

impl SessionEnd {
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            SessionEnd::ClientTerminated => "client_terminated",
            SessionEnd::ClientDisconnected => "client_disconnected",
            SessionEnd::ServerClosed => "server_closed",
            SessionEnd::Shutdown => "gateway_shutdown",
            SessionEnd::ClientProtocol(_) => "client_protocol_error",
            SessionEnd::ServerFailed(_) => "server_error",
            SessionEnd::ClientIo(_) => "client_io_error",
            SessionEnd::AuditFailed(_) => "audit_unavailable",
            SessionEnd::Killed(_) => "killed",
            SessionEnd::TokenExpired(_) => "token_expired",
        }
    }

    /// What went wrong, for the ends that are failures.
    pub(crate) fn detail(&self) -> &str {
        match self {
            SessionEnd::ClientProtocol(detail)
            | SessionEnd::ServerFailed(detail)
            | SessionEnd::ClientIo(detail)
            | SessionEnd::AuditFailed(detail)
            | SessionEnd::Killed(detail)
            | SessionEnd::TokenExpired(detail) => detail,
            _ => "",
        }
    }
}

/// What a round of IO produced.
enum Event {
    ClientData,
    ServerData,
    ClientEof,
    ServerEof,
    /// The client sent Terminate and it has been passed on.
    Terminated,
    /// The gateway is draining and this session is idle.
    Drained,
    /// The gateway's grace period is over.
    Deadline,
    /// An administrator ended the session (through the control API).
    Killed(String),
    /// The held statement's request ended.
    Decided(HoldEnd),
    /// The session's token expired, or (letting a transaction finish) its
    /// grace period ran out or the session became idle.
    TokenExpired,
}

/// How a hold ended.
enum HoldEnd {
    Decided(crate::approvals::Outcome),
    Expired,
    Cancelled,
}

/// Why the loop must stop.
enum Stop {
    /// The client broke the protocol: tell it and close.
    Client(ErrorFields),
    /// The server broke the protocol or the connection to it failed.
    Server(String),
    ClientIo(io::Error),
    /// The audit trail could not record a statement that was already on its
    /// way: it must not run, and the session cannot be kept in sync.
    Audit(String),
}

/// What the gate's verdict means for the proxy.
#[derive(Debug)]
enum Outcome {
    Forward,
    Refuse(Box<ErrorFields>),
    /// Run it, under a row limit.
    Guard(RowLimit),
    /// Hold it until approvers decide (a simple Query or a Parse).
    Hold(Box<ToHold>),
}

/// A statement to hold, with the approval settings holding needs.
#[derive(Debug, Clone)]
struct ToHold {
    request: crate::gate::ApprovalRequest,
    approval: crate::config::ApprovalConfig,
}

/// Whether a frontend message was handled or must wait in the buffer.
enum Consumed {
    Yes,
    Wait,
}

/// The name of the statement the gateway prepares, failing, to undo a
/// row-limited write in the extended protocol. Never created: it fails.
const GUARD_STATEMENT: &str = "sluice_row_limit";

/// The static parts of a session the loop needs.
pub(crate) struct ProxyContext<'a> {
    pub gate: &'a dyn StatementGate,
    pub identity: &'a Identity,
    pub target: &'a str,
    pub session_id: &'a str,
    pub max_message_size: usize,
    /// The session's result masker; `None` when the identity sees clear
    /// values.
    pub masker: Option<RowMasker>,
    /// Where result columns come from (tagged and masked ones), for the
    /// trail; `None` when the target has neither.
    pub origins: Option<std::sync::Arc<crate::mask::catalog::Origins>>,
    /// The gateway's masking catalog snapshots: DDL on this session makes
    /// the target's stale, so the next session reads it again.
    pub catalogs: &'a std::sync::Mutex<HashMap<String, std::sync::Arc<crate::mask::catalog::Catalog>>>,
    /// The audit trail, when auditing is on.
    pub auditor: Option<&'a Auditor>,
    /// `on_audit_failure = "continue"`: statements run even when the trail
    /// cannot record them.
    pub audit_continue: bool,
    /// Result rows the trail keeps per statement.
    pub audit_sample_rows: usize,
    /// This session in the gateway's list of running sessions.
    pub live: &'a LiveSession,
    /// Where held statements wait for approvers.
    pub approvals: &'a crate::approvals::Approvals,
    /// The gateway's counters.
    pub metrics: &'a crate::metrics::Metrics,
    /// Data set tags for the trail's lineage.
    pub audit_tags: &'a [crate::config::TagRule],
    /// When the session's token expires and what happens then; `None` for
    /// tokens that do not expire.
    pub token_expiry: Option<TokenExpiry>,
    /// Cancels the statement the backend runs (its CancelRequest).
    pub upstream_cancel: UpstreamCancel<'a>,
}

/// What a CancelRequest for one backend needs.
#[derive(Clone, Copy)]
pub(crate) struct UpstreamCancel<'a> {
    pub target: &'a crate::config::Target,
    pub tls: Option<&'a crate::tls::UpstreamTlsConnector>,
    pub key: crate::protocol::backend::BackendKeyData,
}

impl UpstreamCancel<'_> {
    /// Sends it: the backend stops the statement it runs now, if any.
    pub(crate) async fn send(self) -> Result<(), crate::upstream::UpstreamError> {
        crate::upstream::send_cancel(self.target, self.tls, self.key).await
    }
}

/// The end of a session's credential.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenExpiry {
    pub at: std::time::SystemTime,
    pub mode: crate::config::OnTokenExpiry,
    pub grace: Duration,
}

/// Facts remembered about one statement name at most (see the Parse
/// branch): beyond, a Parse of the name is refused until it is closed.
const MAX_FACTS_PER_NAME: usize = 16;

/// A prepared statement that needs approval: each Bind of it is held.
#[derive(Debug)]
struct NeedsApproval {
    hold: ToHold,
    /// Its text as the trail keeps it.
    text: String,
}

/// A simple Query (or a Bind) held until approvers decide.
struct Held {
    id: u64,
    decision: tokio::sync::oneshot::Receiver<crate::approvals::Outcome>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    /// The Query (or Parse) message, as the client sent it.
    query: Vec<u8>,
    /// The held message is a Bind (of a statement that needs approval):
    /// approved, it is sent on and its portal runs.
    bind: bool,
    text: String,
    statements: Arc<StatementRecords>,
    rule: String,
    sensitive: bool,
    /// It changes search_path: once it runs, the gate must know.
    changes_search_path: bool,
}

/// Statement counts, for the session's closing log line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    pub statements: u64,
    pub refused: u64,
    pub rows: u64,
    /// Values the masker replaced.
    pub masked: u64,
}

pub(crate) struct Proxy<'a> {
    ctx: ProxyContext<'a>,
    client: Stream,
    /// Bytes read from the client, not yet processed.
    client_in: BytesMut,
    /// Bytes for the client, not yet written.
    to_client: BytesMut,
    client_unflushed: bool,
    server: Stream,
    server_in: BytesMut,
    to_server: BytesMut,
    server_unflushed: bool,
    /// Bytes of an oversized backend message that still stream through unparsed.
    server_streaming: usize,
    pending: PendingQueue,
    /// What the statement gate remembers about this session.
    gate_session: GateSession,
    /// The row-limited write in progress; while it runs, the client's
    /// messages wait (COPY data excepted).
    guard: Option<Guard>,
    /// The verdict for the Query at the front of `client_in`, which waits
    /// for the answers still owed before it can run under a guard.
    deferred: Option<Outcome>,
    /// Row limits of prepared statements (extended protocol), by name:
    /// a Parse the server rejects (the name is taken) or a Close it skips
    /// must not lift one, so each stays until the server confirms a later
    /// Parse or Close of its name; of several, the tightest holds.
    statement_limits: Remembered<RowLimit>,
    /// Prepared statements allowed while the session held requested
    /// grants, with those grants: a Bind after one of them ended is refused
    /// (the statement must be prepared, and decided, again).
    grant_bound: Remembered<Vec<Arc<str>>>,
    /// Portals bound to such statements: an Execute after a grant ended is
    /// refused too.
    portal_grants: Remembered<Vec<Arc<str>>>,
    /// The grants held when the last statement was decided.
    last_granted: Vec<Arc<str>>,
    /// Prepared statements that need approval: each Bind of one is held
    /// until approvers decide, with its parameters on the request.
    needs_approval: Remembered<Arc<NeedsApproval>>,
    /// The names statements the protocol prepared run through SQL
    /// EXECUTE: none may be prepared again with a restriction.
    sql_executes: SqlExecutes,
    /// Prepared statements (by the protocol or SQL's PREPARE) that may run
    /// a portal (SQL FETCH or MOVE, dynamic SQL, unreadable text, an
    /// EXECUTE of one of these), and the portals bound to them: a Bind or Execute of one while a portal runs a
    /// limited write is refused (FETCH runs a `DELETE ... RETURNING`
    /// portal to its end, uncounted).
    fetch_statements: Names,
    fetch_portals: Names,
    /// The session declared or closed a cursor in SQL, which shares the
    /// portals' names: what the gateway knew of a portal by name no longer
    /// says whether it reads masked columns.
    sql_cursors: bool,
    /// Numbers Parse, Bind and Close messages for [`Remembered`].
    message_seq: u64,
    /// Parses sent since the client's last Sync, by name: a Bind in the
    /// same batch binds what that Parse prepared (had it failed, the server
    /// would skip the Bind), whatever earlier Parses of the name recorded.
    batch_parses: HashMap<String, u64>,
    /// The Bind being sent again was approved (request id): it is not
    /// held a second time.
    bind_approved: Option<u64>,
    /// Row limits of bound portals, with the rows they returned so far,
    /// until the portal is closed, runs to its end, or its transaction
    /// ends (a portal bound and never executed, say because an earlier
    /// message of its batch failed, would otherwise keep every later FETCH
    /// refused as if it still ran).
    portal_limits: Portals<(RowLimit, u64)>,
    /// Binds and Closes of portal names the gateway knew a portal by,
    /// until the server answers them: what they replaced comes back if the
    /// server rejects or skips them ([`Proxy::rebind`]).
    rebinds: Vec<Rebind>,
    /// What the server made of messages pushed with a [`Confirm`]; reused.
    resolved: Vec<(Confirm, bool)>,
    /// An error in the extended protocol arrived before the client sent
    /// its batch's Sync: the server skips what the client sends until then,
    /// so the gateway passes it on without acting on it (a Parse or Bind it
    /// skips must not change what the gateway knows of a name).
    discarding: bool,
    /// The Bind or Execute at the front of `client_in` waits for the
    /// server's answer to an earlier Parse, Bind or Close of its name (see
    /// [`StatementText::undecided_before`], [`Rebind`]); the client is not
    /// read further meanwhile.
    waits_for_answer: bool,
    /// Whether the last statement the gate allowed reads a table with
    /// columns masked by rule (or cannot be seen into): its expression
    /// columns are then masked too. See [`Proxy::sensitivity`].
    last_sensitive: bool,
    /// The same, per prepared statement and per bound portal.
    /// (A Remembered, for the reasons `statement_limits` is: a statement
    /// is sensitive if any Parse of its name not yet replaced said so, or
    /// if the gateway knows nothing of it.)
    statement_sensitive: Remembered<bool>,
    portal_sensitive: Portals<bool>,
    /// A cursor was declared over a table with masked columns, or a
    /// sensitive statement bound to a named portal (which SQL can FETCH
    /// from as well): FETCH and MOVE are sensitive from then on.
    cursors_sensitive: bool,
    seam: ResultSeam,
    tx_status: TxStatus,
    /// The client sent Terminate: pass it on, then end.
    terminating: bool,
    /// The server reported a FATAL error; its closing is explained already.
    server_said_fatal: bool,
    /// Alternates which side is read first, so neither starves the other.
    server_first: bool,
    counters: Counters,
    /// Statements recorded in the audit trail so far; the last one's number.
    audit_seq: u64,
    /// The session, identity and target its statement events share.
    audit_envelope: Arc<audit::Envelope>,
    /// Where completions are written, reused.
    audit_scratch: String,
    /// The buffer its next statement event is written into: one the
    /// writer is done with, handed over with the last
    /// ([`Auditor::write_ahead_statement`]); empty until it has one.
    audit_buffer: String,
    /// The statements that ended, taken from `pending` (both buffers are
    /// kept: one statement ends per response under load).
    audit_finished: Vec<Mark>,
    /// Portals fetched in pieces (see [`Mark::suspended`]) between their
    /// Executes: each portal's statement ends when its last piece does, or
    /// when the portal goes (its transaction ends, it is closed or bound
    /// anew, the session ends). Rarely more than one.
    suspended_portals: Vec<Mark>,
    /// Binds of the unnamed portal the client sent (with the trail on):
    /// a suspended piece sent before the last of them is the last piece of
    /// its portal ([`Proxy::portal_replaced`]).
    unnamed_binds: u64,
    /// DataRows the server sent since its last CommandComplete,
    /// PortalSuspended, ErrorResponse or ReadyForQuery: the rows of a piece
    /// of a portal, which PortalSuspended does not count.
    piece_rows: u64,
    /// The trail's records of the classifications the session saw last.
    audit_records: AuditRecords,
    /// While a write-ahead event is not yet durable: how many bytes at the
    /// front of `to_server` may be written. The rest (the statement it
    /// records, and everything after) waits.
    audit_hold: Option<usize>,
    /// The write-ahead events of the statements held back, not yet all
    /// durable (combined with `Durable::and`).
    audit_wait: Option<Durable>,
    /// The `refuse_and_retry` approval the Query being checked runs
    /// under, until its answer is expected ([`Expect::Query`]'s `retry`).
    retry_use: Option<crate::approvals::RetryUse>,
    /// The mark of the statement just checked, for its pending entry.
    pending_mark: Option<Mark>,
    /// The mark of a row-limited Query that waits for the BEGIN the
    /// gateway sent before it.
    guard_mark: Option<Mark>,
    /// What the trail says about prepared statements and bound portals, by
    /// name: their text, for the event of each execution. A portal's entry
    /// is taken by its first Execute (later ones fetch more of its rows).
    statement_texts: HashMap<String, StatementText>,
    portal_texts: Portals<PortalAudit>,
    /// The columns of the last RowDescription, for the trail: they go to
    /// the statement whose result they describe when it ends.
    result_columns: Option<Columns>,
    /// The last RowDescription that had columns, and its columns as the
    /// trail records them: the next one of the same shape (with the same
    /// masking) shares them instead of building them again.
    described: Option<(Vec<u8>, Columns)>,
    /// An emptied buffer of sample rows, for the next statement that
    /// samples its rows.
    spare_sample: crate::audit::SampleRows,
    /// The statement waiting for approvers; the client's next messages wait
    /// behind it.
    held: Option<Held>,
    /// The hold's notice, while a streamed result must finish first.
    held_notice: Option<BytesMut>,
    /// The wakers last registered with the kill and cancel switches.
    kill_waker: Option<std::task::Waker>,
    cancel_waker: Option<std::task::Waker>,
    /// The audit text of the statement just checked, for its hold.
    checked_text: String,
    /// Fires when the token expires; once it has (`token_expired`), at the
    /// end of the grace period for an open transaction.
    expiry_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    token_expired: bool,
    /// Extended-protocol messages passed on since the last Sync: their
    /// implicit transaction is still open, whatever ReadyForQuery said.
    unsynced: bool,
}

/// A prepared statement as the audit trail records its executions.
#[derive(Debug)]
struct AuditText {
    text: String,
    statements: Arc<StatementRecords>,
}

impl AuditText {
    /// A text the gateway has no classification for.
    fn unclassified(text: String) -> Arc<AuditText> {
        Arc::new(AuditText {
            text,
            statements: StatementRecords::none(),
        })
    }

    /// The text of a portal bound to a statement the gateway has no text
    /// for.
    fn unknown_portal(portal: &str) -> Arc<AuditText> {
        AuditText::unclassified(format!(
            "(portal \"{portal}\" of a prepared statement the gateway has no text for)"
        ))
    }
}

/// What the trail knows of a prepared statement of some name: the text
/// of the Parse that prepared it, kept until the server confirms a later
/// Close or Parse of the name (a Close it skips, a Parse it rejects because
/// the name is taken, or a DEALLOCATE that may not have run leave the
/// statement as it was), and the Parses of the name it has not answered.
#[derive(Debug)]
struct StatementText {
    /// The statement the server has: its Parse's [`Confirm::seq`] and
    /// text (`None` after a Close the server confirmed).
    current: Option<(u64, Arc<AuditText>)>,
    /// Later Parses of the name, oldest first, with their number and
    /// batch: each prepares its statement only if the name was free by
    /// then (the unnamed statement: if the server did not skip it).
    pending: Vec<(u64, u64, Arc<AuditText>)>,
}

impl StatementText {
    /// The text a Bind sent in `batch` binds: the last Parse's when it is
    /// in the same batch (had it failed, the server would skip the Bind).
    fn bound_in(&self, batch: u64) -> Option<&Arc<AuditText>> {
        match self.pending.last() {
            Some((_, at, text)) if *at == batch => Some(text),
            _ => self.current.as_ref().map(|(_, text)| text),
        }
    }

    /// Whether a Parse of the name sent before `batch` is unanswered: a
    /// Bind sent now cannot tell which statement it binds.
    fn undecided_before(&self, batch: u64) -> bool {
        self.pending.iter().any(|(_, at, _)| *at < batch)
    }

    /// The server answered the Parse or Close of the name numbered `seq`
    /// (`done`: carried it out); false once nothing is known of the name.
    fn resolved(&mut self, seq: u64, done: bool) -> bool {
        match self.pending.iter().position(|(at, _, _)| *at == seq) {
            Some(index) if done => {
                let (at, _, text) = self.pending.remove(index);
                self.pending.drain(..index);
                self.current = Some((at, text));
            }
            Some(index) => {
                self.pending.remove(index);
            }
            // A Close (or a Parse the trail did not follow) carried out.
            None if done && self.current.as_ref().is_some_and(|(at, _)| *at < seq) => self.current = None,
            None => {}
        }
        self.current.is_some() || !self.pending.is_empty()
    }
}

/// Classifications a session saw last and their statements as the trail
/// records them: a session runs the same few statement shapes over and
/// over, and the policy's cache hands back the same classification for
/// each, so most statements find theirs here rather than allocate them.
#[derive(Debug, Default)]
struct AuditRecords {
    recent: Vec<(Arc<crate::policy::Classification>, Arc<StatementRecords>)>,
}

impl AuditRecords {
    /// How many classifications are kept.
    const KEPT: usize = 8;

    /// `classification`'s statements as the trail records them.
    fn of(
        &mut self,
        classification: Option<&Arc<crate::policy::Classification>>,
        tags: &[crate::config::TagRule],
    ) -> Arc<StatementRecords> {
        let Some(classification) = classification else {
            return StatementRecords::none();
        };
        if let Some(at) = self
            .recent
            .iter()
            .position(|(seen, _)| Arc::ptr_eq(seen, classification))
        {
            // Most recent first, so that the oldest is the one to go.
            self.recent[..=at].rotate_right(1);
            return self.recent[0].1.clone();
        }
        let records = Arc::new(StatementRecords::new(audit_records(Some(classification), tags)));
        self.recent.truncate(Self::KEPT - 1);
        self.recent.insert(0, (classification.clone(), records.clone()));
        records
    }
}

/// Where a bound portal is, for the audit trail.
#[derive(Debug, Clone)]
enum PortalAudit {
    /// Bound to a statement whose text the gateway saw parsed.
    Bound(Arc<AuditText>),
    /// Bound to a statement the gateway has no text for: its execution is
    /// recorded all the same.
    Unknown,
    /// Executed: later Executes fetch more of its rows.
    Executed,
    /// Its Bind was refused: the server skips its Execute.
    Refused,
}

/// A Bind (or Close) of a portal name the gateway knew a portal by, not
/// answered yet, with what the gateway knew before it. The server rejects a
/// Bind of a named portal that exists, and may reject a Bind of the unnamed
/// one before replacing it (a statement that does not exist, the wrong
/// number of parameters); after an error it skips the rest of the batch,
/// Closes included. Inside a transaction the old portal can then be
/// executed again (after a savepoint is rolled back), and it must run with
/// its own row limit and go on the record with its own text.
#[derive(Debug)]
struct Rebind {
    portal: String,
    /// The message's [`Confirm::seq`].
    seq: u64,
    /// The batch it was sent in: an Execute of the name in a later batch
    /// waits until the server has answered it.
    batch: u64,
    /// The portal's text for the trail, and its row limit, before.
    text: Option<(u64, PortalAudit)>,
    limit: Option<(u64, (RowLimit, u64))>,
}

/// What the gateway keeps about each bound portal, by name, until the
/// server forgets the portal: at a Close, or when the transaction it was
/// bound in ends (a ReadyForQuery that says the session is idle ends every
/// portal of the batches it answers; those of batches pipelined behind it
/// stay). A client that never closes its named portals would otherwise
/// grow these maps for as long as the session lasts.
#[derive(Debug)]
struct Portals<T> {
    /// Each portal's value, with the batch it was bound in
    /// ([`PendingQueue::batch`]).
    by_name: HashMap<String, (u64, T)>,
}

impl<T> Default for Portals<T> {
    fn default() -> Self {
        Portals {
            by_name: HashMap::new(),
        }
    }
}

impl<T> Portals<T> {
    /// A portal bound in `batch` (replacing one of the same name).
    fn bind(&mut self, name: &str, batch: u64, value: T) {
        self.by_name.insert(name.to_string(), (batch, value));
    }

    /// Replaces a portal's value, keeping the batch it was bound in (or
    /// taking `batch` if it is not known); the value it had.
    fn replace(&mut self, name: &str, batch: u64, value: T) -> Option<T> {
        match self.by_name.get_mut(name) {
            Some((_, old)) => Some(std::mem::replace(old, value)),
            None => {
                self.by_name.insert(name.to_string(), (batch, value));
                None
            }
        }
    }

    fn get(&self, name: &str) -> Option<&T> {
        self.by_name.get(name).map(|(_, value)| value)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut T> {
        self.by_name.get_mut(name).map(|(_, value)| value)
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.by_name.iter().map(|(name, (_, value))| (name.as_str(), value))
    }

    fn remove(&mut self, name: &str) -> Option<T> {
        self.by_name.remove(name).map(|(_, value)| value)
    }

    fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// A portal's value with the batch it was bound in, as
    /// [`Portals::restore`] takes it back.
    fn entry(&self, name: &str) -> Option<(u64, T)>
    where
        T: Clone,
    {
        self.by_name.get(name).cloned()
    }

    /// Puts back what [`Portals::entry`] gave (nothing: no portal).
    fn restore(&mut self, name: &str, entry: Option<(u64, T)>) {
        match entry {
            Some(entry) => {
                self.by_name.insert(name.to_string(), entry);
            }
            None => {
                self.by_name.remove(name);
            }
        }
    }

    fn clear(&mut self) {
        self.by_name.clear();
    }

    /// The session is idle after the server answered `answered` batches:
    /// the portals bound in them are gone.
    fn transaction_ended(&mut self, answered: u64) {
        if !self.by_name.is_empty() {
            self.by_name.retain(|_, (batch, _)| *batch >= answered);
        }
    }
}

/// What the gate decided, for the audit trail.
struct Decided {
    decision: &'static str,
    rule: Option<String>,
    classification: Option<Arc<crate::policy::Classification>>,
}

impl<'a> Proxy<'a> {
    pub(crate) fn new(
        ctx: ProxyContext<'a>,
        client: Stream,
        client_in: BytesMut,
        server: Stream,
        server_in: BytesMut,
        tx_status: TxStatus,
    ) -> Proxy<'a> {
        let mut ctx = ctx;
        let seam = ResultSeam::new(ctx.masker.take());
        let audit_envelope = audit::Envelope::of_session(ctx.session_id, ctx.identity.name(), ctx.target);
        let expiry_timer = ctx.token_expiry.map(|expiry| {
            let left = expiry
                .at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            Box::pin(tokio::time::sleep(left))
        });
        Proxy {
            ctx,
            client,
            client_in,
            to_client: BytesMut::with_capacity(READ_CHUNK),
            client_unflushed: false,
            server,
            server_in,
            to_server: BytesMut::with_capacity(READ_CHUNK),
            server_unflushed: false,
            server_streaming: 0,
            pending: PendingQueue::default(),
            gate_session: GateSession::default(),
            guard: None,
            deferred: None,
            statement_limits: Remembered::default(),
            grant_bound: Remembered::default(),
            portal_grants: Remembered::default(),
            last_granted: Vec::new(),
            needs_approval: Remembered::default(),
            sql_executes: SqlExecutes::default(),
            fetch_statements: Names::default(),
            fetch_portals: Names::default(),
            sql_cursors: false,
            message_seq: 0,
            batch_parses: HashMap::new(),
            bind_approved: None,
            portal_limits: Portals::default(),
            rebinds: Vec::new(),
            resolved: Vec::new(),
            waits_for_answer: false,
            discarding: false,
            last_sensitive: false,
            statement_sensitive: Remembered::default(),
            portal_sensitive: Portals::default(),
            cursors_sensitive: false,
            seam,
            tx_status,
            terminating: false,
            server_said_fatal: false,
            server_first: false,
            counters: Counters::default(),
            audit_seq: 0,
            audit_envelope,
            audit_scratch: String::new(),
            audit_buffer: String::new(),
            audit_finished: Vec::new(),
            suspended_portals: Vec::new(),
            unnamed_binds: 0,
            piece_rows: 0,
            audit_records: AuditRecords::default(),
            audit_hold: None,
            audit_wait: None,
            retry_use: None,
            pending_mark: None,
            guard_mark: None,
            statement_texts: HashMap::new(),
            portal_texts: Portals::default(),
            result_columns: None,
            described: None,
            spare_sample: crate::audit::SampleRows::default(),
            held: None,
            held_notice: None,
            kill_waker: None,
            cancel_waker: None,
            checked_text: String::new(),
            expiry_timer,
            token_expired: false,
            unsynced: false,
        }
    }

    pub(crate) fn counters(&self) -> Counters {
        Counters {
            rows: self.seam.rows(),
            masked: self.seam.masked(),
            ..self.counters
        }
    }

    /// Runs until the session ends. Once the gateway drains, the session ends
    /// at its next idle moment; at the deadline, at once.
    pub(crate) async fn run(&mut self, shutdown: &mut ShutdownListener) -> SessionEnd {
        // Anything the client pipelined behind its startup packet.
        if !self.client_in.is_empty()
            && let Err(stop) = self.on_client_data()
        {
            return self.stop(stop).await;
        }
        loop {
            let event = poll_fn(|cx| {
                let phase = shutdown.poll_phase(cx);
                if phase == Phase::Deadline {
                    return Poll::Ready(Ok(Event::Deadline));
                }
                if let Some(by) = self.ctx.live.poll_killed(cx, &mut self.kill_waker) {
                    return Poll::Ready(Ok(Event::Killed(by)));
                }
                if let Some(end) = self.poll_hold(cx) {
                    return Poll::Ready(Ok(Event::Decided(end)));
                }
                if let Some(timer) = &mut self.expiry_timer
                    && timer.as_mut().poll(cx).is_ready()
                {
                    self.expiry_timer = None;
                    return Poll::Ready(Ok(Event::TokenExpired));
                }
                // Expired and the transaction is over: end before reading
                // (or passing on) anything more the client sent.
                if self.token_expired && self.between_transactions() {
                    return Poll::Ready(Ok(Event::TokenExpired));
                }
                let io = self.poll_io(cx);
                if io.is_pending() && phase == Phase::Draining && self.is_idle() {
                    return Poll::Ready(Ok(Event::Drained));
                }
                io
            })
            .await;
            let result = match event {
                Ok(Event::ClientData) => self.on_client_data(),
                Ok(Event::ServerData) => self.on_server_data().and_then(|()| {
                    // Answers may have ended a guard, started its COPY or
                    // let a deferred statement go: carry on with what the
                    // client sent (each message checks whether it may pass),
                    // unless an expired token's transaction just ended.
                    let expired_done = self.token_expired && self.between_transactions();
                    if !self.client_in.is_empty() && !expired_done {
                        self.on_client_data()
                    } else {
                        Ok(())
                    }
                }),
                Ok(Event::Drained) => return self.shut_down("the gateway is shutting down").await,
                Ok(Event::Decided(end)) => self.end_hold(end),
                Ok(Event::TokenExpired) => {
                    if let Some(end) = self.on_token_expired() {
                        return self.end_expired(end).await;
                    }
                    Ok(())
                }
                Ok(Event::Killed(by)) => {
                    tracing::info!(%by, "session ended by an administrator");
                    // What still waits for the trail was never sent: it
                    // stays unsent (the hold marks a message boundary).
                    if let Some(hold) = self.audit_hold.take() {
                        self.to_server.truncate(hold);
                        self.audit_wait = None;
                    }
                    self.shut_down(&format!("ended by an administrator ({by})")).await;
                    return SessionEnd::Killed(by);
                }
                Ok(Event::Deadline) => {
                    return self
                        .shut_down("the gateway is shutting down and the grace period is over")
                        .await;
                }
                Ok(Event::Terminated) => {
                    self.close_quietly(false).await;
                    return SessionEnd::ClientTerminated;
                }
                Ok(Event::ClientEof) => {
                    frontend::encode_terminate(&mut self.to_server);
                    self.close_quietly(false).await;
                    return SessionEnd::ClientDisconnected;
                }
                Ok(Event::ServerEof) => {
                    if !self.server_said_fatal {
                        self.queue_fatal(ErrorFields::new(
                            Severity::Fatal,
                            "08006",
                            format!("the target \"{}\" closed the connection unexpectedly", self.ctx.target),
                        ));
                    }
                    self.close_quietly(false).await;
                    return SessionEnd::ServerClosed;
                }
                Err(stop) => Err(stop),
            };
            if let Err(stop) = result {
                return self.stop(stop).await;
            }
            if self.server_streaming == 0
                && let Some(notice) = self.held_notice.take()
            {
                self.to_client.extend_from_slice(&notice);
            }
            self.ctx.live.set_upstream_busy(!self.pending.is_empty());
            self.ctx.live.set_state(if self.held.is_some() {
                SessionState::Held
            } else if self.pending.is_empty() {
                SessionState::Idle
            } else {
                SessionState::Running
            });
        }
    }

    /// No transaction open and nothing owed or on its way upstream; what
    /// the client sent next may still wait in `client_in`, and a statement
    /// held for approval or deferred behind answers has not started: with
    /// an expired token, neither will.
    fn between_transactions(&self) -> bool {
        self.guard.is_none()
            && !self.unsynced
            && self.pending.is_empty()
            && self.tx_status == TxStatus::Idle
            && self.server_streaming == 0
            && self.to_server.is_empty()
            && self.audit_wait.is_none()
    }

    /// Between requests: nothing owed, nothing half-read, no transaction open.
    fn is_idle(&self) -> bool {
        self.guard.is_none()
            && self.deferred.is_none()
            && self.pending.is_empty()
            && self.tx_status == TxStatus::Idle
            && self.client_in.is_empty()
            && self.server_streaming == 0
            && self.to_server.is_empty()
            && self.audit_wait.is_none()
            && self.held.is_none()
    }

    /// Moves bytes until something needs processing.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, Stop>> {
        loop {
            let mut progressed = false;
            if let Some(wait) = &mut self.audit_wait {
                match Pin::new(wait).poll(cx) {
                    Poll::Ready(Ok(())) => {
                        self.audit_wait = None;
                        self.audit_hold = None;
                    }
                    Poll::Ready(Err(err)) if self.ctx.audit_continue => {
                        tracing::warn!(error = %err.0, "the audit trail could not record a statement; it runs (on_audit_failure = continue)");
                        self.audit_wait = None;
                        self.audit_hold = None;
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(Stop::Audit(err.0))),
                    Poll::Pending => {}
                }
            }
            let writable = self.audit_hold.unwrap_or(self.to_server.len());
            if writable > 0 {
                match poll_write_front(&mut self.server, cx, &mut self.to_server, writable) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Stop::Server("upstream stopped accepting data".into())));
                    }
                    Poll::Ready(Ok(n)) => {
                        progressed = true;
                        self.server_unflushed = true;
                        if let Some(hold) = &mut self.audit_hold {
                            *hold -= n;
                        }
                    }
                    Poll::Ready(Err(err)) => {
                        return Poll::Ready(Err(Stop::Server(format!("writing to upstream: {err}"))));
                    }
                    Poll::Pending => {}
                }
            }
            if self.audit_hold.unwrap_or(self.to_server.len()) == 0 && self.server_unflushed {
                match Pin::new(&mut self.server).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.server_unflushed = false,
                    Poll::Ready(Err(err)) => {
                        return Poll::Ready(Err(Stop::Server(format!("writing to upstream: {err}"))));
                    }
                    Poll::Pending => {}
                }
            }
            if !self.to_client.is_empty() {
                match poll_write_all(&mut self.client, cx, &mut self.to_client) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Stop::ClientIo(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(_)) => {
                        progressed = true;
                        self.client_unflushed = true;
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(Stop::ClientIo(err))),
                    Poll::Pending => {}
                }
            }
            if self.to_client.is_empty() && self.client_unflushed {
                match Pin::new(&mut self.client).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.client_unflushed = false,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(Stop::ClientIo(err))),
                    Poll::Pending => {}
                }
            }
            if self.terminating {
                if self.to_server.is_empty() && !self.server_unflushed {
                    return Poll::Ready(Ok(Event::Terminated));
                }
            } else {
                self.server_first = !self.server_first;
                for server_side in [self.server_first, !self.server_first] {
                    let event = if server_side {
                        self.poll_read_server(cx)
                    } else {
                        self.poll_read_client(cx)
                    };
                    if let Poll::Ready(event) = event {
                        return Poll::Ready(event);
                    }
                }
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }

    fn poll_read_client(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, Stop>> {
        if self.to_server.len() >= HIGH_WATER
            || ((self.client_blocked() || self.expiry_blocked()) && self.client_in.len() >= HIGH_WATER)
        {
            return Poll::Pending;
        }
        reserve_for_read(&mut self.client_in);
        match poll_read_buf(Pin::new(&mut self.client), cx, &mut self.client_in) {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(Event::ClientEof)),
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(Event::ClientData)),
            Poll::Ready(Err(err)) => Poll::Ready(Err(Stop::ClientIo(err))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_read_server(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, Stop>> {
        if self.to_client.len() >= HIGH_WATER {
            return Poll::Pending;
        }
        reserve_for_read(&mut self.server_in);
        match poll_read_buf(Pin::new(&mut self.server), cx, &mut self.server_in) {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(Event::ServerEof)),
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(Event::ServerData)),
            Poll::Ready(Err(err)) => Poll::Ready(Err(Stop::Server(format!("reading from upstream: {err}")))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Processes every complete frontend message buffered.
    fn on_client_data(&mut self) -> Result<(), Stop> {
        let mut buf = std::mem::take(&mut self.client_in);
        let mut offset = 0;
        let result = loop {
            if self.terminating {
                break Ok(());
            }
            let rest = &buf[offset..];
            let header = match codec::peek_header(rest, self.ctx.max_message_size) {
                Ok(Some(header)) => header,
                Ok(None) => break Ok(()),
                Err(err @ codec::FrameError::TooLarge { .. }) => {
                    tracing::warn!(error = %err, "client message over the size limit");
                    break Err(Stop::Client(
                        ErrorFields::new(Severity::Fatal, "54000", err.to_string())
                            .with_hint("the limit is server.max_message_size in the gateway's configuration"),
                    ));
                }
                Err(err) => {
                    break Err(Stop::Client(ErrorFields::new(
                        Severity::Fatal,
                        "08P01",
                        err.to_string(),
                    )));
                }
            };
            let total = header.total_len();
            if rest.len() < total {
                break Ok(());
            }
            if self.client_blocked() && !self.passes_while_blocked(header.tag) {
                break Ok(());
            }
            if self.expiry_blocked()
                && !matches!(
                    header.tag,
                    fe::COPY_DATA | fe::COPY_DONE | fe::COPY_FAIL | fe::FLUSH | fe::TERMINATE
                )
            {
                break Ok(());
            }
            match self.on_frontend(header.tag, &rest[..total]) {
                Ok(Consumed::Yes) => {
                    offset += total;
                    match header.tag {
                        fe::PARSE | fe::BIND | fe::EXECUTE | fe::DESCRIBE | fe::CLOSE => self.unsynced = true,
                        fe::SYNC | fe::QUERY => self.unsynced = false,
                        _ => {}
                    }
                }
                Ok(Consumed::Wait) => break Ok(()),
                Err(stop) => break Err(stop),
            }
        };
        buf.advance(offset);
        if let Ok(Some(header)) = codec::peek_header(&buf, self.ctx.max_message_size)
            && buf.len() < header.total_len()
        {
            buf.reserve(header.total_len() - buf.len());
        }
        self.client_in = buf;
        result
    }

    /// Once the token expired (letting a transaction finish), requests go
    /// one at a time: each answer's ReadyForQuery says whether the
    /// transaction is over, and then nothing more runs.
    /// A COPY FROM STDIN's data (and the Syncs drivers send meanwhile)
    /// still flows: the transaction cannot end without it.
    fn expiry_blocked(&self) -> bool {
        self.token_expired && !self.pending.copy_in() && self.pending.awaits_ready()
    }

    /// Whether the client's messages must wait: a guard runs, or a guarded
    /// statement waits for the answers still owed.
    fn client_blocked(&self) -> bool {
        self.guard.is_some()
            || self.held.is_some()
            || (self.deferred.is_some() && !self.pending.is_empty())
            || (self.waits_for_answer && !self.pending.is_empty())
    }

    /// With masking or auditing on, every Execute is preceded by a Describe
    /// of its portal that the gateway sends itself: its RowDescription (with
    /// the formats the portal really uses) reaches the masker and the trail's
    /// column records, not the client, so rows of a portal the client
    /// executes without describing are still read, and recorded, right.
    fn describe_before_execute(&mut self, execute_body: &[u8]) -> Result<(), Stop> {
        if !self.seam.masking() && self.ctx.auditor.is_none() {
            return Ok(());
        }
        let portal = first_name(execute_body, "portal name")?;
        frontend::encode_describe(b'P', portal, &mut self.to_server);
        let sensitive = self.seam.has_rules() && self.portal_is_sensitive(portal);
        self.pending.push(Expect::InternalDescribe { sensitive });
        Ok(())
    }

    /// Whether a client message may reach the server while a guard runs:
    /// only the data of a COPY FROM STDIN, up to its end. The Syncs and
    /// Flushes drivers send while COPY runs pass too (the server ignores
    /// them); the Sync after CopyDone would commit, so it waits for the
    /// guard's verdict.
    fn passes_while_blocked(&mut self, message_tag: u8) -> bool {
        let Some(guard) = self.guard.as_mut() else {
            return matches!(message_tag, fe::COPY_DATA | fe::COPY_DONE | fe::COPY_FAIL);
        };
        if !guard.copy_in || guard.copy_ended {
            return false;
        }
        match message_tag {
            fe::COPY_DONE | fe::COPY_FAIL => {
                guard.copy_ended = true;
                true
            }
            fe::COPY_DATA | fe::SYNC | fe::FLUSH => true,
            _ => false,
        }
    }

    /// One complete frontend message (header included).
    fn on_frontend(&mut self, message_tag: u8, message: &[u8]) -> Result<Consumed, Stop> {
        let body = &message[HEADER_LEN..];
        if self.discarding {
            // Skipped by the server, every message but Sync (a Query too):
            // passed on, answered by nothing, acted on by nobody. A Bind or
            // Execute that waited for an answer waits no more, and a Bind
            // approved meanwhile used its approval up.
            let skipped = match message_tag {
                fe::PARSE => Some(Some(Expect::Parse { refusal: None })),
                fe::BIND => {
                    self.bind_approved = None;
                    Some(Some(Expect::Bind))
                }
                fe::DESCRIBE => Some(Some(Expect::Describe { sensitive: true })),
                fe::EXECUTE => Some(Some(Expect::Execute { guarded: false })),
                fe::CLOSE => Some(Some(Expect::Close)),
                // No answer at all: nothing for the queue.
                fe::QUERY | fe::FUNCTION_CALL => {
                    // A Query checked (and recorded) before it waited for
                    // the answers owed: its verdict goes with it, and is
                    // never the next Query's.
                    if message_tag == fe::QUERY && self.deferred.take().is_some() {
                        if let Some(mut mark) = self.pending_mark.take() {
                            mark.skipped = true;
                            self.record_done(mark);
                        }
                        let used = self.retry_use.take();
                        self.give_back_retry(used);
                    }
                    Some(None)
                }
                fe::SYNC => {
                    self.discarding = false;
                    None
                }
                _ => None,
            };
            if let Some(expect) = skipped {
                self.waits_for_answer = false;
                self.to_server.extend_from_slice(message);
                if let Some(expect) = expect {
                    self.pending.push(expect);
                }
                return Ok(Consumed::Yes);
            }
        }
        // Past the skipped messages: one the server skips is acted on by
        // nobody, whatever its names.
        if let Some((what, why)) = unfollowable_name(message_tag, body) {
            self.refuse_unfollowable(message_tag, body, what, why)?;
            return Ok(Consumed::Yes);
        }
        let expect = match message_tag {
            fe::QUERY => {
                let waited = self.deferred.is_some();
                let outcome = match self.deferred.take() {
                    Some(outcome) => outcome,
                    None => {
                        self.counters.statements += 1;
                        match Query::decode(body) {
                            Ok(query) => self.check(query.sql, StatementSource::SimpleQuery),
                            Err(err) => Outcome::Refuse(self.undecodable(err, "Query")?),
                        }
                    }
                };
                match outcome {
                    Outcome::Forward => {
                        self.to_server.extend_from_slice(message);
                        let mark = self.pending_mark.take();
                        let expect = Expect::Query {
                            refusal: None,
                            guarded: false,
                            sensitive: self.last_sensitive,
                            retry: self.retry_use.take().map(Box::new),
                        };
                        self.pending.push_marked(expect, mark);
                    }
                    Outcome::Refuse(refusal) => {
                        // Refused after an approval let it through: it
                        // does not run, and the approval is not used.
                        let used = self.retry_use.take();
                        self.give_back_retry(used);
                        self.refuse_query(refusal);
                    }
                    Outcome::Guard(limit) => {
                        // The guard needs the transaction status as it will
                        // be when the statement runs: wait for what is owed.
                        if !self.pending.is_empty() {
                            // Extended messages before it with no Sync are
                            // answered only once flushed.
                            if !waited && self.unsynced {
                                frontend::encode_flush(&mut self.to_server);
                            }
                            self.deferred = Some(Outcome::Guard(limit));
                            return Ok(Consumed::Wait);
                        }
                        self.start_simple_guard(limit, message);
                    }
                    Outcome::Hold(hold) => self.hold(*hold, message, false),
                }
                return Ok(Consumed::Yes);
            }
            fe::PARSE => {
                // Numbered before the check, which records the statement's
                // text under this number.
                self.message_seq += 1;
                let seq = self.message_seq;
                let (name, sql, outcome) = match Parse::decode(body) {
                    Ok(parse) => (
                        parse.name,
                        parse.sql,
                        self.check(parse.sql, StatementSource::Parse { statement: parse.name }),
                    ),
                    Err(err) => ("", "", Outcome::Refuse(self.undecodable(err, "Parse")?)),
                };
                // What runs, and counts, is each Execute of a statement
                // prepared; one refused here is a statement refused.
                if matches!(outcome, Outcome::Refuse(_)) {
                    self.counters.statements += 1;
                }
                let prepared = matches!(outcome, Outcome::Forward | Outcome::Guard(_) | Outcome::Hold(_));
                if !self.grant_bound.is_empty()
                    || !self.needs_approval.is_empty()
                    || !self.statement_limits.is_empty()
                    || !self.batch_parses.is_empty()
                {
                    self.batch_parses.insert(name.to_string(), seq);
                }
                // A client repeating a Parse the server rejects would grow
                // what is remembered of the name without end. (One refused
                // by policy adds nothing, and is refused as such.)
                if prepared
                    && self.grant_bound.count(name)
                        + self.needs_approval.count(name)
                        + self.statement_limits.count(name)
                        + self.statement_sensitive.count(name)
                        >= MAX_FACTS_PER_NAME
                {
                    let refusal = refusal_error(Refusal {
                        code: "42501",
                        message: format!(
                            "statement refused: prepared statement \"{name}\" was prepared too many times without being closed"
                        ),
                        hint: Some("close it, or prepare under a new name".into()),
                    });
                    self.count_refused_statement();
                    // Allowed by policy, so not on the record yet.
                    let source = StatementSource::Parse { statement: name };
                    let outcome = Outcome::Refuse(refusal.clone());
                    self.record_statement(audit_text(sql), source, &outcome, None, "deny", None);
                    // Its text, which the check kept for the name, goes
                    // with the refusal's answer.
                    let confirm = Confirm {
                        statement: name.to_string(),
                        seq,
                        portal: false,
                    };
                    self.fail_in_place_confirmed(name, refusal, Some(confirm));
                    return Ok(Consumed::Yes);
                }
                if prepared && !self.last_granted.is_empty() {
                    self.grant_bound.add(name, seq, std::mem::take(&mut self.last_granted));
                }
                // A Parse of a named statement fails on the server while
                // the name is taken (until Close or DEALLOCATE), and one of
                // the unnamed statement may be skipped after an error in
                // its batch, so it may not lift a row limit the name has:
                // the limit stays until the server confirms the Parse (see
                // `statement_limits`).
                let refusal = match outcome {
                    Outcome::Forward => {
                        self.to_server.extend_from_slice(message);
                        None
                    }
                    Outcome::Guard(limit) => {
                        self.statement_limits.add(name, seq, limit);
                        self.to_server.extend_from_slice(message);
                        None
                    }
                    // Prepared now; each execution waits for approvers at
                    // its Bind, where its parameters are known.
                    Outcome::Hold(hold) => {
                        let text = std::mem::take(&mut self.checked_text);
                        self.needs_approval
                            .add(name, seq, Arc::new(NeedsApproval { hold: *hold, text }));
                        self.to_server.extend_from_slice(message);
                        None
                    }
                    Outcome::Refuse(_) => {
                        Parse::encode(name, REFUSED_STATEMENT, &mut self.to_server);
                        Some(outcome.into_refusal())
                    }
                };
                if self.seam.has_rules() {
                    // A Parse the server rejects (the name is taken) must not
                    // make a sensitive statement look harmless, nor a Close
                    // it skips: a named statement's flag only grows until
                    // the server confirms a Close (or a later Parse); one
                    // refused here prepares nothing. The unnamed one is
                    // replaced by each Parse; errors reset it below.
                    if name.is_empty() {
                        self.statement_sensitive.forget(name);
                        self.statement_sensitive.add(name, seq, self.last_sensitive);
                    } else if prepared {
                        self.statement_sensitive.add(name, seq, self.last_sensitive);
                    }
                }
                // A statement with facts from earlier Parses of its name:
                // they go once the server confirms this one (the name was
                // free, or the unnamed statement replaced).
                let earlier = self.statement_limits.count(name) > 0
                    || self
                        .statement_texts
                        .get(name)
                        .is_some_and(|known| known.pending.iter().any(|(at, _, _)| *at == seq))
                    || (!name.is_empty() && self.statement_sensitive.count(name) > 1);
                if prepared && (!self.grant_bound.is_empty() || !self.needs_approval.is_empty() || earlier) {
                    self.pending.push_confirmed(
                        Expect::Parse { refusal },
                        Confirm {
                            statement: name.to_string(),
                            seq,
                            portal: false,
                        },
                    );
                } else {
                    self.pending.push(Expect::Parse { refusal });
                }
                return Ok(Consumed::Yes);
            }
            fe::BIND => {
                // Nothing owed (a driver that waits for each answer): nothing
                // to wait for, and nothing to look up.
                if self.ctx.auditor.is_some() && !self.statement_texts.is_empty() && !self.pending.is_empty() {
                    // Which statement the name means, for the trail, depends
                    // on the server's answer to a Parse of it sent in an
                    // earlier batch: the Bind waits for that answer.
                    let (_, statement) = bind_names(body)?;
                    let batch = self.pending.batch();
                    if self
                        .statement_texts
                        .get(statement)
                        .is_some_and(|known| known.undecided_before(batch))
                    {
                        self.waits_for_answer = true;
                        return Ok(Consumed::Wait);
                    }
                }
                self.waits_for_answer = false;
                let approved = self.bind_approved.take();
                let (_, statement) = if self.grant_bound.is_empty()
                    && self.needs_approval.is_empty()
                    && self.gate_session.prepared_grants.is_empty()
                {
                    ("", "")
                } else {
                    bind_names(body)?
                };
                let in_batch = self.batch_parses.get(statement).copied();
                let mut refused = if self.grant_bound.is_empty() {
                    None
                } else {
                    match in_batch {
                        Some(seq) => self.grant_ended(self.grant_bound.get_exact(statement, seq)),
                        None => self.grant_ended(self.grant_bound.get(statement)),
                    }
                    // SQL-level PREPAREs share the namespace.
                    .or_else(|| self.grant_ended(self.gate_session.prepared_grants.get(statement).into_iter()))
                };
                if refused.is_none() && !self.fetch_statements.is_empty() {
                    let (portal, statement) = bind_names(body)?;
                    if self.fetch_statements.contains(statement) {
                        self.fetch_portals.add(portal);
                        // Bound, it replaces a portal of its own name.
                        refused = self.fetch_refusal(Some(portal));
                    }
                }
                if refused.is_none() && self.grant_bound.is_empty() && !self.gate_session.prepared_grants.is_empty() {
                    refused = self.grant_ended(self.gate_session.prepared_grants.get(statement).into_iter());
                }
                if refused.is_none() && approved.is_none() && !self.needs_approval.is_empty() {
                    let waiting: Vec<Arc<NeedsApproval>> = match in_batch {
                        Some(seq) => self.needs_approval.get_exact(statement, seq).cloned().collect(),
                        None => self.needs_approval.get(statement).cloned().collect(),
                    };
                    match waiting.as_slice() {
                        [] => {}
                        [needs] => {
                            let text = format!("{}{}", needs.text, bind_parameters(body));
                            self.checked_text = text;
                            self.hold(needs.hold.clone(), message, true);
                            return Ok(Consumed::Yes);
                        }
                        // A second Parse of the name that the server may
                        // have rejected: which text runs is not known.
                        _ => {
                            refused = Some(Refusal {
                                code: "42501",
                                message: format!(
                                    "statement refused: prepared statement \"{statement}\" was prepared more than once and needs approval; the gateway cannot tell approvers which text it is"
                                ),
                                hint: Some("close it and prepare it again under a new name".into()),
                            });
                        }
                    }
                }
                if let Some(refusal) = refused {
                    self.refuse_bind(body, refusal_error(refusal))?;
                    return Ok(Consumed::Yes);
                }
                // Before this Bind changes what the gateway knows of its
                // portal name, in case the server does not carry it out.
                let rebind = if self.knows_portals() || !self.rebinds.is_empty() {
                    self.rebind(bind_names(body)?.0)
                } else {
                    None
                };
                if self.ctx.auditor.is_some() {
                    let (portal, statement) = bind_names(body)?;
                    let batch = self.pending.batch();
                    let audit = match self
                        .statement_texts
                        .get(statement)
                        .and_then(|known| known.bound_in(batch))
                    {
                        Some(text) => PortalAudit::Bound(bound_text(text, body)),
                        None => PortalAudit::Unknown,
                    };
                    self.portal_texts.bind(portal, self.pending.batch(), audit);
                    // Binding the name again replaces the portal.
                    self.end_suspended(Some(portal));
                    if portal.is_empty() {
                        self.unnamed_binds += 1;
                    }
                }
                if self.seam.has_rules() {
                    let (portal, statement) = bind_names(body)?;
                    // A statement the gateway never saw parsed is sensitive.
                    let sensitive = self.statement_is_sensitive(statement);
                    self.portal_sensitive.bind(portal, self.pending.batch(), sensitive);
                    // SQL's FETCH and MOVE read a named portal too, as a
                    // cursor (inside a transaction block).
                    if sensitive && !portal.is_empty() {
                        self.cursors_sensitive = true;
                    }
                }
                if !self.statement_limits.is_empty()
                    || !self.portal_limits.is_empty()
                    || !self.gate_session.prepared_limits.is_empty()
                {
                    let (portal, statement) = bind_names(body)?;
                    // What a Parse in this batch prepared (had it failed, the
                    // server would skip this Bind); otherwise the tightest
                    // limit any Parse of the name not yet replaced set.
                    let own = match self.batch_parses.get(statement) {
                        Some(&seq) => self.statement_limits.get_exact(statement, seq).min_by_key(|l| l.rows),
                        None => self.statement_limits.get(statement).min_by_key(|l| l.rows),
                    };
                    // SQL's PREPARE shares the protocol's names: a statement
                    // prepared by SQL and bound here keeps its limit, and of
                    // two, the tighter one holds.
                    let limit = [own, self.gate_session.prepared_limits.get(statement)]
                        .into_iter()
                        .flatten()
                        .min_by_key(|limit| limit.rows);
                    match limit {
                        Some(limit) => {
                            self.portal_limits
                                .bind(portal, self.pending.batch(), (limit.clone(), 0));
                        }
                        None => {
                            self.portal_limits.remove(portal);
                        }
                    }
                }
                if let Some(id) = approved {
                    tracing::info!(request = id, "approved Bind sent on");
                }
                let bound: Vec<Arc<str>> = self.grant_bound.get(statement).flatten().cloned().collect();
                if !bound.is_empty() || !self.portal_grants.is_empty() || rebind.is_some() {
                    let (portal, _) = bind_names(body)?;
                    let seq = rebind.unwrap_or_else(|| {
                        self.message_seq += 1;
                        self.message_seq
                    });
                    if !bound.is_empty() {
                        self.portal_grants.add(portal, seq, bound);
                    }
                    self.to_server.extend_from_slice(message);
                    self.pending.push_confirmed(
                        Expect::Bind,
                        Confirm {
                            statement: portal.to_string(),
                            seq,
                            portal: true,
                        },
                    );
                    return Ok(Consumed::Yes);
                }
                Some(Expect::Bind)
            }
            fe::EXECUTE => {
                if !self.rebinds.is_empty() {
                    // Which portal runs, and so its row limit and its text on
                    // the record, depends on whether the server carried out a
                    // Bind or Close of its name sent in an earlier batch: the
                    // Execute waits for that answer. (In the same batch it
                    // runs only if the Bind was carried out.)
                    let portal = first_name(body, "portal name")?;
                    let batch = self.pending.batch();
                    if !self.pending.is_empty()
                        && self
                            .rebinds
                            .iter()
                            .rev()
                            .find(|r| r.portal == portal)
                            .is_some_and(|last| last.batch < batch)
                    {
                        self.waits_for_answer = true;
                        return Ok(Consumed::Wait);
                    }
                }
                self.waits_for_answer = false;
                if !self.portal_grants.is_empty() {
                    let portal = first_name(body, "portal name")?;
                    if let Some(refusal) = self.grant_ended(self.portal_grants.get(portal)) {
                        self.refuse_execute(portal, refusal_error(refusal));
                        return Ok(Consumed::Yes);
                    }
                }
                if !self.fetch_portals.is_empty() && self.limits_portals() {
                    let portal = first_name(body, "portal name")?;
                    if self.fetch_portals.contains(portal)
                        && let Some(refusal) = self.fetch_refusal(Some(portal))
                    {
                        self.refuse_execute(portal, refusal_error(refusal));
                        return Ok(Consumed::Yes);
                    }
                }
                self.record_execute(body)?;
                if !self.portal_limits.is_empty() {
                    let portal = first_name(body, "portal name")?;
                    if let Some((limit, rows)) = self.portal_limits.get(portal) {
                        let mut guard = Guard::new(
                            limit.clone(),
                            GuardKind::Extended {
                                portal: portal.to_string(),
                            },
                            GuardPhase::Running,
                        );
                        guard.rows = *rows;
                        self.guard = Some(guard);
                        self.describe_before_execute(body)?;
                        // Flush so the answer comes back before anything the
                        // client sends next (its Sync) reaches the server.
                        self.to_server.extend_from_slice(message);
                        frontend::encode_flush(&mut self.to_server);
                        let mark = self.pending_mark.take();
                        self.pending.push_marked(Expect::Execute { guarded: true }, mark);
                        return Ok(Consumed::Yes);
                    }
                }
                self.describe_before_execute(body)?;
                Some(Expect::Execute { guarded: false })
            }
            fe::CLOSE => {
                let closes_portal = body.first() != Some(&b'S');
                // A Close the server skips (after an error earlier in its
                // batch) closes nothing.
                let rebind = if closes_portal && (self.knows_portals() || !self.rebinds.is_empty()) {
                    self.rebind(first_name(body.get(1..).unwrap_or(&[]), "close name")?)
                } else {
                    None
                };
                if self.ctx.auditor.is_some() {
                    let kind = body.first().copied();
                    let name = first_name(body.get(1..).unwrap_or(&[]), "close name")?;
                    match kind {
                        // A statement's text goes once the server confirms
                        // the Close.
                        Some(b'S') => {}
                        _ => {
                            self.portal_texts.remove(name);
                            self.end_suspended(Some(name));
                        }
                    }
                }
                if self.seam.has_rules() {
                    let kind = body.first().copied();
                    let name = first_name(body.get(1..).unwrap_or(&[]), "close name")?;
                    // A statement's flag goes once the server confirms the
                    // Close; a portal unknown is sensitive.
                    if kind != Some(b'S') {
                        self.portal_sensitive.remove(name);
                    }
                }
                if closes_portal && !self.portal_limits.is_empty() {
                    let name = first_name(body.get(1..).unwrap_or(&[]), "close name")?;
                    self.portal_limits.remove(name);
                }
                if rebind.is_some()
                    || !self.grant_bound.is_empty()
                    || !self.needs_approval.is_empty()
                    || !self.portal_grants.is_empty()
                    || (!closes_portal
                        && (!self.statement_limits.is_empty()
                            || self.seam.has_rules()
                            || !self.statement_texts.is_empty()))
                {
                    // Forgotten once the server confirms the Close (a
                    // statement's row limit, masking flag and text too).
                    let name = first_name(body.get(1..).unwrap_or(&[]), "close name")?;
                    let seq = rebind.unwrap_or_else(|| {
                        self.message_seq += 1;
                        self.message_seq
                    });
                    self.to_server.extend_from_slice(message);
                    self.pending.push_confirmed(
                        Expect::Close,
                        Confirm {
                            statement: name.to_string(),
                            seq,
                            portal: closes_portal,
                        },
                    );
                    return Ok(Consumed::Yes);
                }
                Some(Expect::Close)
            }
            fe::DESCRIBE => {
                let sensitive = self.seam.has_rules() && {
                    let kind = body.first().copied();
                    let name = first_name(body.get(1..).unwrap_or(&[]), "describe name")?;
                    match kind {
                        Some(b'S') => self.statement_is_sensitive(name),
                        _ => self.portal_is_sensitive(name),
                    }
                };
                Some(Expect::Describe { sensitive })
            }
            fe::SYNC => {
                self.batch_parses.clear();
                Some(Expect::Sync)
            }
            fe::FUNCTION_CALL => {
                self.counters.statements += 1;
                match self.check("", StatementSource::FunctionCall) {
                    outcome @ (Outcome::Refuse(_) | Outcome::Hold(_)) => {
                        // Answered like a refused Query: an error, then
                        // ReadyForQuery, which is what the client awaits.
                        self.refuse_query(outcome.into_refusal());
                        return Ok(Consumed::Yes);
                    }
                    Outcome::Forward | Outcome::Guard(_) => Some(Expect::FunctionCall),
                }
            }
            fe::COPY_DONE | fe::COPY_FAIL => Some(Expect::CopyEnd),
            fe::FLUSH | fe::COPY_DATA => None,
            fe::TERMINATE => {
                self.terminating = true;
                None
            }
            other => {
                return Err(Stop::Client(ErrorFields::new(
                    Severity::Fatal,
                    "08P01",
                    format!("invalid frontend message type {}", printable(other)),
                )));
            }
        };
        self.to_server.extend_from_slice(message);
        if matches!(message_tag, fe::COPY_DONE | fe::COPY_FAIL) && self.guard.is_some() {
            // The guard needs the COPY's CommandComplete now, not when the
            // client's Sync (which it holds back) would flush it.
            frontend::encode_flush(&mut self.to_server);
        }
        if let Some(expect) = expect {
            // Only the message that runs the checked statement carries its
            // mark (COPY data passing meanwhile must not take it).
            let mark = if matches!(expect, Expect::Execute { .. } | Expect::FunctionCall) {
                self.pending_mark.take()
            } else {
                None
            };
            self.pending.push_marked(expect, mark);
        }
        Ok(Consumed::Yes)
    }

    /// Whether a statement's results may carry values of columns masked by
    /// rule in expressions (`upper(secret)`, `row_to_json(k)`): it reads such
    /// a table or a view over one, or cannot be seen into, or fetches from a
    /// cursor declared over one. Only with column rules on this session.
    fn sensitivity(&mut self, classification: Option<&crate::policy::Classification>) -> bool {
        if !self.seam.has_rules() {
            return false;
        }
        let Some(classification) = classification else {
            return true;
        };
        let mut sensitive = false;
        let mut declares = false;
        for statement in &classification.statements {
            let command = statement.command.as_str();
            declares |= command.starts_with("DECLARE");
            self.sql_cursors |= command.starts_with("DECLARE") || command.starts_with("CLOSE");
            sensitive |= self.reads_masked(statement)
                || (self.cursors_sensitive && (command.starts_with("FETCH") || command.starts_with("MOVE")));
        }
        if sensitive && declares {
            self.cursors_sensitive = true;
        }
        sensitive
    }

    /// Whether one statement may read values of columns masked by rule: it
    /// names a table with such columns (a view over one counts), calls a
    /// user-defined function (which can read any table), or cannot be seen
    /// into.
    fn reads_masked(&self, statement: &crate::policy::StatementClass) -> bool {
        self.seam.has_rules()
            && (statement.opaque
                || statement.kind == crate::policy::Kind::Unknown
                || statement
                    .relations
                    .iter()
                    .any(|r| self.seam.masks_table(r.schema.as_deref(), &r.name))
                || statement.functions.iter().any(|f| self.seam.user_function(f)))
    }

    /// For a session masked by column rules: the first statement that would
    /// route masked values around the masker. Results are masked by the
    /// origin of their columns; a value copied into another table, or
    /// produced by a view, trigger, rule, function or column default the
    /// session creates, would come back with a new origin and in clear.
    fn rerouting(&self, statements: &[crate::policy::StatementClass]) -> Option<Refusal> {
        use crate::policy::{Access, Kind};
        /// Objects whose definition computes values: what they show or
        /// store has no masked column as its origin.
        const CODE: &[&str] = &[
            "VIEW",
            "RULE",
            "TRIGGER",
            "FUNCTION",
            "PROCEDURE",
            "OPERATOR",
            "CAST",
            "AGGREGATE",
            "DOMAIN",
            "POLICY",
        ];
        let refused = |message: String, hint: &str| {
            Some(Refusal {
                code: "42501",
                message: format!("statement refused: {message}"),
                hint: Some(hint.into()),
            })
        };
        for statement in statements {
            let command = statement.command.as_str();
            let defines_code = (command.starts_with("CREATE") || command.starts_with("ALTER"))
                && command.split(' ').any(|word| CODE.contains(&word));
            let schema_change = match statement.kind {
                Kind::Procedural => command.starts_with("CREATE"),
                Kind::Ddl if ["DROP", "TRUNCATE", "COMMENT"].iter().any(|c| command.starts_with(c)) => false,
                Kind::Ddl => defines_code || self.reads_masked(statement),
                _ => false,
            };
            if schema_change {
                return refused(
                    format!(
                        "{command} while columns are masked for you: a table copy, view, trigger, rule, function or \
                         column default could carry masked values past the masker"
                    ),
                    "schema changes over masked data are made by an identity with the unmask grant (a lead or a \
                     migration service)",
                );
            }
            if !self.reads_masked(statement) {
                continue;
            }
            if let Some(written) = statement
                .relations
                .iter()
                .find(|r| r.access == Access::Write && !self.seam.masks_table(r.schema.as_deref(), &r.name))
            {
                let name = match &written.schema {
                    Some(schema) => format!("{schema}.{}", written.name),
                    None => written.name.clone(),
                };
                return refused(
                    format!(
                        "{command} into {name} in a statement over columns that are masked for you: the values \
                         would be stored where the masker cannot follow them"
                    ),
                    "read masked columns with SELECT, whose results are masked; write from statements that read no \
                     masked column",
                );
            }
            // A write inside a masked table: a masked value must not move
            // to a column that is read in clear (SET notes = secret).
            let written = &statement.written;
            let copy_hint = "set columns from constants or parameters, or from their own values (SET email = \
                             lower(email)); copying between columns of a table with masked columns is done by an \
                             identity with the unmask grant";
            if statement.kind == Kind::Unknown {
                return refused(
                    "the gateway cannot read this statement, so it cannot tell whether it moves values of \
                     columns that are masked for you"
                        .into(),
                    "rewrite it in a form the gateway reads (its log says why it could not), or ask an identity \
                     with the unmask grant",
                );
            }
            for assigned in &written.assignments {
                let over_masked = assigned.tables.iter().any(|t| self.seam.masks_table(None, t))
                    || assigned.functions.iter().any(|f| self.seam.user_function(f));
                if !over_masked {
                    continue;
                }
                if assigned.whole_rows {
                    return refused(
                        format!(
                            "{command} copies whole rows or every column (a *, t.* or a table used as a value) of a \
                             table with columns that are masked for you: masked values could land in columns read \
                             in clear"
                        ),
                        copy_hint,
                    );
                }
                let copied = assigned
                    .reads
                    .iter()
                    .find(|c| self.seam.may_be_masked(c) && !c.eq_ignore_ascii_case(&assigned.column));
                if let Some(column) = copied {
                    let into = if assigned.column.is_empty() {
                        "the rows it writes".to_string()
                    } else {
                        format!("column {}", assigned.column)
                    };
                    return refused(
                        format!("{command} copies {column}, which is masked for you, into {into}"),
                        copy_hint,
                    );
                }
                if let Some(function) = assigned.functions.iter().find(|f| self.seam.user_function(f)) {
                    return refused(
                        format!("{command} stores the result of {function}(), a function that can read masked columns"),
                        copy_hint,
                    );
                }
            }
            // A user-defined function anywhere in a write that stores
            // values (a FROM item, a VALUES list, a CTE) may hand it masked
            // values under any name.
            if !written.assignments.is_empty()
                && let Some(function) = statement.functions.iter().find(|f| self.seam.user_function(f))
            {
                return refused(
                    format!(
                        "{command} stores values computed by {function}(), a function that can read masked columns"
                    ),
                    copy_hint,
                );
            }
            if written.opaque {
                return refused(
                    "this write into a table with columns that are masked for you stores values the gateway \
                     cannot follow column by column"
                        .to_string(),
                    copy_hint,
                );
            }
        }
        None
    }

    /// What masking needs of an allowed text: after DDL, the target's
    /// catalog snapshot is dropped (a table or column may be new, renamed or
    /// gone: sessions that start from now on read it again); and a refusal
    /// for what a masked session cannot pass safely.
    fn masking_refusal(&mut self, sql: &str, classification: &crate::policy::Classification) -> Option<Refusal> {
        use crate::policy::{Feature, Kind};
        let statements = &classification.statements;
        if statements.iter().any(|s| s.kind == Kind::Ddl) {
            self.ctx
                .catalogs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(self.ctx.target);
        }
        if !self.seam.masking() {
            return None;
        }
        let refused = |message: String, hint: String| {
            Some(Refusal {
                code: "42501",
                message: format!("statement refused: {message}"),
                hint: Some(hint),
            })
        };
        if self.seam.has_rules()
            && let Some(refusal) = self.rerouting(statements)
        {
            return Some(refusal);
        }
        if self.last_sensitive {
            // A notification's payload reaches whoever listens, outside any
            // result the masker can attribute.
            if contains_ignore_case(sql, "notify") {
                return refused(
                    "NOTIFY or pg_notify in a statement over columns that are masked for you".into(),
                    "notifications cannot be masked by column; send them from a statement that reads no masked column"
                        .into(),
                );
            }
            // A setting is read back later by SHOW or current_setting(),
            // which read no table.
            if statements.iter().any(|s| s.features.contains(Feature::SetConfig)) {
                return refused(
                    "set_config in a statement over columns that are masked for you".into(),
                    "a setting can be read back unmasked; set it from a statement that reads no masked column".into(),
                );
            }
            // Advisory locks, sequences and large objects keep a value in
            // the server, where a later statement that reads no masked
            // column finds it (pg_locks, currval, lo_get).
            let keeps = statements.iter().find_map(|s| {
                s.functions
                    .iter()
                    .find(|f| keeps_a_value(f))
                    .map(String::as_str)
                    .or_else(|| {
                        s.features
                            .contains(Feature::LargeObject)
                            .then_some("a large object function")
                    })
            });
            if let Some(function) = keeps {
                return refused(
                    format!("{function} in a statement over columns that are masked for you"),
                    "it keeps a value in the server that a later statement could read back unmasked; call it from a statement that reads no masked column".into(),
                );
            }
        }
        let copies = statements.iter().filter(|s| s.kind == Kind::CopyOut);
        if copies.clone().any(|s| s.features.contains(Feature::CopyCustomFormat)) {
            return refused(
                "COPY TO with its own DELIMITER, QUOTE or ESCAPE cannot be masked reliably by the gateway".into(),
                "use COPY's default text or CSV format (FORMAT csv without DELIMITER, QUOTE or ESCAPE)".into(),
            );
        }
        // Binary COPY rows say nothing of their columns' types: a card
        // number cast to int8 is eight bytes no detector reads.
        if copies.clone().any(|s| s.features.contains(Feature::CopyBinary)) {
            return refused(
                "COPY TO in binary format cannot be masked by the gateway: its values carry no type to read them by"
                    .into(),
                "use COPY's text or CSV format".into(),
            );
        }
        // COPY rows carry no column origins for the rules to apply to.
        let copy = copies.into_iter().find(|s| self.reads_masked(s))?;
        let masked = copy
            .relations
            .iter()
            .find(|r| self.seam.masks_table(r.schema.as_deref(), &r.name));
        let name = match masked {
            Some(relation) => match &relation.schema {
                Some(schema) => format!("{schema}.{}", relation.name),
                None => relation.name.clone(),
            },
            None => "a user-defined function's result".into(),
        };
        // COPY rows name no columns; a table's column order could be taken
        // from the session's catalog snapshot, but a column dropped since
        // (outside the gateway) would shift a masked value into a clear
        // position. A SELECT names each column's origin in every result.
        refused(
            format!(
                "COPY of {name} would pass columns that are masked for you; COPY rows carry no column names for the gateway to mask by"
            ),
            "run the query as a SELECT instead (psql --csv writes CSV): results of SELECT are masked column by column"
                .into(),
        )
    }

    /// Asks the gate what to do with a statement, and records it: an
    /// allowed simple Query or FunctionCall write-ahead (it waits in
    /// `to_server` until its event is durable), a refused one at once, an
    /// allowed Parse not yet (each Execute of it is recorded).
    fn check(&mut self, sql: &str, source: StatementSource<'_>) -> Outcome {
        self.pending_mark = None;
        self.retry_use = None;
        let text = audit_text(sql);
        if let Some(refusal) = self.audit_unavailable() {
            self.counters.refused += 1;
            self.ctx.metrics.decided(Decision::Deny);
            self.ctx.live.note_statement(&text, true);
            self.record_statement(text, source, &Outcome::Refuse(refusal.clone()), None, "deny", None);
            return Outcome::Refuse(refusal);
        }
        let (outcome, decided) = self.decide(sql, source);
        let refused = matches!(outcome, Outcome::Refuse(_));
        if refused || !matches!(source, StatementSource::Parse { .. }) {
            self.ctx.metrics.decided(match (&outcome, decided.decision) {
                (Outcome::Hold(_), _) | (Outcome::Refuse(_), "require_approval") => Decision::RequireApproval,
                (Outcome::Refuse(_), _) => Decision::Deny,
                (Outcome::Forward | Outcome::Guard(_), _) => Decision::Allow,
            });
            self.ctx.live.note_statement(&text, refused);
        } else {
            // Counted at each Execute ([`Proxy::record_execute`]).
            self.ctx.live.note_text(&text);
        }
        if matches!(outcome, Outcome::Hold(_)) {
            self.checked_text = text.clone();
        }
        if (!self.statement_texts.is_empty() || self.seam.has_rules())
            && !matches!(outcome, Outcome::Refuse(_))
            && let Some(classification) = &decided.classification
        {
            // SQL's PREPARE shares the protocol's names: one that succeeds
            // prepares a statement the trail has no text for. (One that
            // fails, because the name is taken, leaves the statement
            // unnamed in the trail: less said, nothing false.) A DEALLOCATE
            // may be skipped, when an earlier statement of its string
            // fails: the text stays until the server confirms a Parse of
            // the name (`StatementText::pending`).
            // Masking reads a name an SQL PREPARE took as unknown, so
            // sensitive: what the protocol knew of it may be of a statement
            // a DEALLOCATE freed.
            for statement in &classification.statements {
                if let Some(crate::policy::PreparedRef::Prepare(name)) = &statement.prepared {
                    self.statement_texts.remove(name.as_str());
                    if self.seam.has_rules() {
                        self.statement_sensitive.add(name, self.message_seq, true);
                    }
                }
            }
        }
        if self.ctx.auditor.is_some() {
            let statements = self
                .audit_records
                .of(decided.classification.as_ref(), self.ctx.audit_tags);
            match source {
                StatementSource::Parse { statement } => match outcome {
                    Outcome::Refuse(_) => {
                        // A refused Parse fails on the server: a named
                        // statement of that name (if any) stays as it was;
                        // the unnamed one is gone.
                        if statement.is_empty() {
                            self.statement_texts.remove(statement);
                        }
                        self.record_statement(text, source, &outcome, Some(statements), decided.decision, decided.rule);
                    }
                    _ => {
                        let text = Arc::new(AuditText { text, statements });
                        let (seq, batch) = (self.message_seq, self.pending.batch());
                        match self.statement_texts.get_mut(statement) {
                            // A statement that has a text keeps it until
                            // the server confirms this Parse: it rejects a
                            // Parse of a name that is taken, and skips one
                            // (of the unnamed statement too) after an error
                            // in its batch.
                            Some(known) => known.pending.push((seq, batch, text)),
                            // A named one the gateway knows no text for may
                            // still be taken (an SQL PREPARE of it): its text
                            // waits for the server's answer too.
                            None if !statement.is_empty() => {
                                self.statement_texts.insert(
                                    statement.to_string(),
                                    StatementText {
                                        current: None,
                                        pending: vec![(seq, batch, text)],
                                    },
                                );
                            }
                            None => {
                                self.statement_texts.insert(
                                    statement.to_string(),
                                    StatementText {
                                        current: Some((seq, text)),
                                        pending: Vec::new(),
                                    },
                                );
                            }
                        }
                    }
                },
                _ => {
                    self.pending_mark =
                        self.record_statement(text, source, &outcome, Some(statements), decided.decision, decided.rule);
                }
            }
        }
        outcome
    }

    /// The refusal for a statement while the trail cannot record it (with
    /// `on_audit_failure = "refuse"`).
    fn audit_unavailable(&self) -> Option<Box<ErrorFields>> {
        let auditor = self.ctx.auditor?;
        if auditor.available() || self.ctx.audit_continue {
            return None;
        }
        auditor.refused_while_unavailable();
        Some(Box::new(
            ErrorFields::new(
                Severity::Error,
                "58000",
                "statement refused: the gateway's audit trail cannot record statements right now, and this gateway runs nothing it cannot record",
            )
            .with_hint("try again shortly; the gateway's log says why the trail cannot be written"),
        ))
    }

    /// Records a statement; for one that runs, returns the mark that
    /// follows it to its end, and holds what follows in `to_server` until
    /// the event is durable.
    fn record_statement(
        &mut self,
        text: String,
        source: StatementSource<'_>,
        outcome: &Outcome,
        statements: Option<Arc<StatementRecords>>,
        decision: &'static str,
        rule: Option<String>,
    ) -> Option<Mark> {
        let statements = statements.unwrap_or_else(StatementRecords::none);
        let source = match source {
            StatementSource::SimpleQuery => "query",
            StatementSource::Parse { .. } => "parse",
            StatementSource::FunctionCall => "function_call",
        };
        self.record_execution(source, &text, &statements, outcome, decision, rule.as_deref())
    }

    fn record_execution(
        &mut self,
        source: &str,
        text: &str,
        statements: &StatementRecords,
        outcome: &Outcome,
        decision: &'static str,
        rule: Option<&str>,
    ) -> Option<Mark> {
        let auditor = self.ctx.auditor?;
        let refusal = match outcome {
            Outcome::Refuse(error) => Some(error.message.as_str()),
            _ => None,
        };
        let runs = matches!(outcome, Outcome::Forward | Outcome::Guard(_));
        let event = self.statement_event(
            source,
            text,
            statements,
            if runs { "allow" } else { decision },
            rule,
            refusal,
        );
        if !runs {
            auditor.record_stored(event);
            return None;
        }
        let ticket = if self.ctx.audit_continue && !auditor.available() {
            tracing::warn!("the audit trail is behind: a statement runs before its event is written");
            auditor.record_stored(event);
            None
        } else {
            let (durable, ticket) = auditor.write_ahead_statement(event, &mut self.audit_buffer);
            // Everything held waits for every event it holds back.
            self.audit_wait = Some(match self.audit_wait.take() {
                Some(earlier) => earlier.and(durable),
                None => durable,
            });
            self.audit_hold.get_or_insert(self.to_server.len());
            Some(ticket)
        };
        Some(Mark::new(self.audit_seq, ticket))
    }

    /// The next statement event of the session, in its stored form.
    fn statement_event(
        &mut self,
        source: &str,
        text: &str,
        statements: &StatementRecords,
        decision: &str,
        rule: Option<&str>,
        refusal: Option<&str>,
    ) -> audit::Record {
        self.audit_seq += 1;
        audit::Record::statement(
            std::mem::take(&mut self.audit_buffer),
            chrono::Utc::now(),
            &self.audit_envelope,
            audit::StatementView {
                seq: self.audit_seq,
                source,
                text,
                decision,
                rule,
                refusal,
                statements,
            },
        )
    }

    /// A statement refused in place of an extended-protocol message (a
    /// Bind, an Execute, a Parse after policy allowed it), counted as the
    /// trail records it.
    fn count_refused_statement(&mut self) {
        self.counters.statements += 1;
        self.ctx.metrics.decided(Decision::Deny);
        self.ctx.live.count_statement(true);
    }

    /// Records and counts an Execute of a bound portal (its first: later
    /// ones fetch more rows of the same statement).
    fn record_execute(&mut self, execute_body: &[u8]) -> Result<(), Stop> {
        self.pending_mark = None;
        if self.ctx.auditor.is_none() {
            // Portals are followed for the trail only: without it, each
            // Execute counts, a portal fetched in pieces once a piece.
            self.counters.statements += 1;
            self.ctx.metrics.decided(Decision::Allow);
            self.ctx.live.count_statement(false);
            return Ok(());
        }
        let portal = first_name(execute_body, "portal name")?;
        let batch = self.pending.batch();
        let audit = self.portal_texts.replace(portal, batch, PortalAudit::Executed);
        let bound = match audit {
            Some(PortalAudit::Executed) => {
                // The next piece of a portal fetched in pieces: no event of
                // its own, its rows count to the portal's statement.
                self.pending_mark = Some(Mark {
                    unnamed_binds: self.unnamed_binds,
                    ..Mark::continuing(portal)
                });
                return Ok(());
            }
            Some(PortalAudit::Refused) => {
                self.portal_texts.replace(portal, batch, PortalAudit::Refused);
                return Ok(());
            }
            Some(PortalAudit::Bound(text)) => text,
            // A portal bound to a statement the gateway has no text for
            // (or bound in a batch the server discarded): it still runs on
            // the record.
            Some(PortalAudit::Unknown) | None => AuditText::unknown_portal(portal),
        };
        self.counters.statements += 1;
        self.ctx.live.note_statement(&bound.text, false);
        if let Some(refusal) = self.audit_unavailable() {
            self.ctx.metrics.decided(Decision::Deny);
            return Err(Stop::Audit(refusal.message));
        }
        self.ctx.metrics.decided(Decision::Allow);
        self.pending_mark = self.record_execution(
            "execute",
            &bound.text,
            &bound.statements,
            &Outcome::Forward,
            "allow",
            None,
        );
        if let Some(mark) = &mut self.pending_mark {
            mark.portal = Some(portal.into());
            mark.unnamed_binds = self.unnamed_binds;
        }
        Ok(())
    }

    /// Keeps the mark of a portal its server suspended until its next
    /// piece (or its end). A mark kept for a portal of that name before is
    /// of a portal that is gone (the name was bound again): it ends now.
    fn suspend(&mut self, mark: Mark) {
        if mark.portal.is_none() {
            self.record_done(mark);
            return;
        }
        self.end_suspended(mark.portal.as_deref());
        if self.portal_replaced(&mark) {
            self.record_done(mark);
        } else {
            self.suspended_portals.push(mark);
        }
    }

    /// Whether `piece`, suspended, was the last piece of its portal the
    /// client will fetch: the unnamed portal, bound again after the piece
    /// was sent, with no later piece of it in flight. (Pipelined, the Bind
    /// goes out before the piece's PortalSuspended comes back; the server
    /// replaces the portal when it gets to the Bind.)
    fn portal_replaced(&self, piece: &Mark) -> bool {
        piece.portal.as_deref() == Some("")
            && piece.unnamed_binds != self.unnamed_binds
            && !self.pending.unnamed_piece_in_flight(piece.unnamed_binds)
    }

    /// Counts a later piece of a portal (`piece`, [`Mark::continues`]) to
    /// the portal's suspended statement, which ends with it when the
    /// portal was run to its end or failed (`ended`). A piece the server
    /// skipped ran nothing; one of a portal without a suspended statement
    /// (run to its end before, or gone) has nothing to count to.
    fn continue_portal(&mut self, piece: Mark, ended: bool) {
        if piece.skipped {
            return;
        }
        let ended = ended || self.portal_replaced(&piece);
        let Some(at) = self.suspended_portals.iter().position(|m| m.portal == piece.portal) else {
            return;
        };
        let mark = &mut self.suspended_portals[at];
        if let Some(rows) = piece.rows {
            *mark.rows.get_or_insert(0) += rows;
        }
        let room = self.ctx.audit_sample_rows.saturating_sub(mark.sample.len());
        mark.sample.extend_from(&piece.sample, room);
        if piece.sqlstate.is_some() {
            mark.sqlstate = piece.sqlstate;
        }
        if ended {
            let mark = self.suspended_portals.swap_remove(at);
            self.record_done(mark);
        }
    }

    /// Ends the statements of suspended portals that are gone: the one of
    /// that name, or every one (`None`: the transaction or session ended).
    fn end_suspended(&mut self, portal: Option<&str>) {
        if self.suspended_portals.is_empty() {
            return;
        }
        // Pieces that ended in what the server sent before count first.
        self.record_finished();
        for mark in std::mem::take(&mut self.suspended_portals) {
            if portal.is_some_and(|name| mark.portal.as_deref() != Some(name)) {
                self.suspended_portals.push(mark);
            } else {
                self.record_done(mark);
            }
        }
    }

    /// Refuses an extended-protocol message: in its place a Parse (of
    /// statement `name`) that fails, whose error becomes the refusal, so
    /// the server skips the rest of the batch up to Sync as it would after
    /// the message itself failed.
    fn fail_in_place(&mut self, name: &str, refusal: Box<ErrorFields>) {
        self.fail_in_place_confirmed(name, refusal, None);
    }

    /// [`Proxy::fail_in_place`], reporting the failure as that of the
    /// message `confirm` stands for (which never reaches the server).
    fn fail_in_place_confirmed(&mut self, name: &str, refusal: Box<ErrorFields>, confirm: Option<Confirm>) {
        self.counters.refused += 1;
        Parse::encode(name, REFUSED_STATEMENT, &mut self.to_server);
        let expect = Expect::Parse { refusal: Some(refusal) };
        match confirm {
            Some(confirm) => self.pending.push_confirmed(expect, confirm),
            None => self.pending.push(expect),
        }
    }

    /// Refuses an Execute of `portal` (see [`Proxy::fail_in_place`]): on
    /// the record as its statement refused; the server skips the rest of
    /// the batch.
    fn refuse_execute(&mut self, portal: &str, refusal: Box<ErrorFields>) {
        self.count_refused_statement();
        if self.ctx.auditor.is_some() {
            let bound = match self.portal_texts.get(portal) {
                Some(PortalAudit::Bound(bound)) => bound.clone(),
                Some(PortalAudit::Executed) => AuditText::unclassified(format!(
                    "(a later piece of portal \"{portal}\", whose statement is on the record before)"
                )),
                _ => AuditText::unknown_portal(portal),
            };
            self.record_refused("execute", &bound, &refusal);
        }
        self.fail_in_place(REFUSED_NAME, refusal);
    }

    /// Records an extended-protocol message refused in place
    /// ([`Proxy::fail_in_place`]) as its statement, denied, with what the
    /// client was told.
    fn record_refused(&mut self, source: &str, bound: &AuditText, refusal: &ErrorFields) {
        let Some(auditor) = self.ctx.auditor else { return };
        let event = self.statement_event(
            source,
            &bound.text,
            &bound.statements,
            "deny",
            None,
            Some(&refusal.message),
        );
        auditor.record_stored(event);
    }

    /// Refuses an extended-protocol message with a name the gateway cannot
    /// follow ([`unfollowable_name`]) in place ([`Proxy::fail_in_place`]):
    /// the client gets an error, the server skips the rest of the batch,
    /// and the session goes on. The failing Parse is named
    /// [`REFUSED_NAME`], so the server never sees the name, and nothing
    /// the gateway knows of names changes. A Parse, Bind or Execute is on
    /// the record as its statement refused; a Describe or Close runs no
    /// statement and is counted as a refusal only.
    fn refuse_unfollowable(&mut self, message_tag: u8, body: &[u8], what: &str, why: &str) -> Result<(), Stop> {
        let refusal = Box::new(
            ErrorFields::new(
                Severity::Error,
                "42622",
                format!(
                    "{what} name refused: the name {why}, and PostgreSQL could take it for another name (it tells names apart by their first 63 bytes, in its own encoding), so the gateway cannot follow it"
                ),
            )
            .with_hint("use names of ASCII characters, at most 63 bytes long"),
        );
        // A name that is not UTF-8 is refused like one outside ASCII (the
        // server would fail it too, on its encoding), and named in the
        // record as well as it can be.
        let text = match message_tag {
            fe::BIND if bind_names(body).is_ok() => return self.refuse_bind(body, refusal),
            fe::BIND => "(a Bind the gateway could not read)".to_string(),
            fe::EXECUTE => {
                let name = body.split(|&b| b == 0).next().unwrap_or_default();
                self.refuse_execute(&String::from_utf8_lossy(name), refusal);
                return Ok(());
            }
            fe::PARSE => match Parse::decode(body) {
                Ok(parse) => audit_text(parse.sql),
                Err(_) => "(a Parse the gateway could not read)".to_string(),
            },
            _ => {
                self.fail_in_place(REFUSED_NAME, refusal);
                return Ok(());
            }
        };
        self.count_refused_statement();
        let source = if message_tag == fe::PARSE { "parse" } else { "bind" };
        self.record_refused(source, &AuditText::unclassified(text), &refusal);
        self.fail_in_place(REFUSED_NAME, refusal);
        Ok(())
    }

    /// Refuses a Bind (see [`Proxy::fail_in_place`]; the failing Parse is
    /// named [`REFUSED_NAME`], so the client's unnamed statement stays). On
    /// the record as refused, and the portal's Execute, which the server
    /// skips, is not recorded as run.
    fn refuse_bind(&mut self, bind_body: &[u8], refusal: Box<ErrorFields>) -> Result<(), Stop> {
        self.count_refused_statement();
        let mut confirm = None;
        if self.ctx.auditor.is_some() {
            let (portal, statement) = bind_names(bind_body)?;
            let batch = self.pending.batch();
            let bound = match self
                .statement_texts
                .get(statement)
                .and_then(|known| known.bound_in(batch))
            {
                Some(text) => bound_text(text, bind_body),
                None => AuditText::unclassified(format!(
                    "(prepared statement \"{statement}\"){}",
                    bind_parameters(bind_body)
                )),
            };
            let (portal, batch) = (portal.to_string(), self.pending.batch());
            self.record_refused("bind", &bound, &refusal);
            // The server never sees the Bind: a portal of that name stays
            // as it was once the refusal is answered.
            let rebind = self.rebind(&portal);
            self.portal_texts.bind(&portal, batch, PortalAudit::Refused);
            confirm = rebind.map(|seq| Confirm {
                statement: portal,
                seq,
                portal: true,
            });
        }
        self.fail_in_place_confirmed(REFUSED_NAME, refusal, confirm);
        Ok(())
    }

    /// Answers a simple Query (or FunctionCall) with a refusal: upstream it
    /// becomes a statement that fails, so the server reports the right
    /// transaction state, and the refusal replaces its error.
    fn refuse_query(&mut self, refusal: Box<ErrorFields>) {
        Query::encode(REFUSED_STATEMENT, &mut self.to_server);
        self.pending.push(Expect::Query {
            refusal: Some(refusal),
            guarded: false,
            sensitive: false,
            retry: None,
        });
    }

    /// Ends a held statement's request when the session ends without it
    /// having been decided (the client left, an administrator ended it).
    pub(crate) fn release(&mut self, why: &str) {
        // Portals still suspended end with the session.
        self.end_suspended(None);
        if let Some(held) = self.held.take() {
            self.ctx
                .approvals
                .end(held.id, crate::approvals::RequestState::Cancelled, why);
        }
    }

    /// An error earlier in the held statement's batch makes the server
    /// skip it (a Query too) up to the client's Sync, which the hold keeps
    /// back: the request is withdrawn, as the server would skip the
    /// statement, and the client's messages go on to that Sync. (Run or
    /// refused later, the gateway would wait for an answer the server never
    /// sends, and match every later answer to the wrong statement.)
    fn held_skipped(&mut self) {
        let Some(held) = self.held.take() else { return };
        let why = "an earlier message in the statement's batch failed, so the server skips the statement";
        if self
            .ctx
            .approvals
            .end(held.id, crate::approvals::RequestState::Cancelled, why)
        {
            tracing::info!(
                request = held.id,
                "held statement skipped after an earlier error; request cancelled"
            );
        }
        self.ctx.live.set_state(SessionState::Running);
    }

    /// Holds a simple Query until approvers decide: opens the request, tells
    /// the client at once, and stops reading its messages meanwhile.
    fn hold(&mut self, hold: ToHold, message: &[u8], bind: bool) {
        let ToHold { request, approval } = hold;
        let text = std::mem::take(&mut self.checked_text);
        let statements = Arc::new(StatementRecords::new(audit_records(
            request.classification.as_deref(),
            self.ctx.audit_tags,
        )));
        // Held before the request exists: a cancel that comes once approvers
        // can see it must reach the hold, not be forgotten with the ones
        // before it (nor go upstream, where nothing runs).
        self.ctx.live.clear_cancel();
        self.ctx.live.set_upstream_busy(!self.pending.is_empty());
        self.ctx.live.set_state(SessionState::Held);
        let (view, decision) = self.ctx.approvals.open(crate::approvals::NewRequest {
            requester: self.ctx.identity.clone(),
            target: self.ctx.target.to_string(),
            session: self.ctx.session_id.to_string(),
            statement: text.clone(),
            rule: request.rule.clone(),
            reason: Some(request.refusal.message.clone()),
            approvers: approval.approvers.clone(),
            needed: approval.approvals,
            timeout: approval.timeout,
            retry: None,
            access: None,
            statements: statements.records().to_vec(),
            approve_via: approval.approve_via.clone(),
        });
        tracing::info!(request = view.id, rule = %request.rule, "statement held for approval");
        let mut notice = ErrorFields::new(
            Severity::Notice,
            "01000",
            format!(
                "held for approval: request {}, expires in {}, approvers: {} ({} approval{} needed)",
                view.id,
                crate::config::human_duration(approval.timeout),
                approval.approvers.join(", "),
                approval.approvals,
                if approval.approvals == 1 { "" } else { "s" }
            ),
        );
        // Only a rule holds a statement, and the policy's message names it
        // ("needs approval under rule ...").
        notice.detail = Some(request.refusal.message.clone());
        notice.hint = Some(format!(
            "the statement runs once approved; ctrl-c cancels it (approvers: POST /v1/approvals/{}/approve)",
            view.id
        ));
        // In the middle of a result streaming through, a message would
        // corrupt it: the notice then waits for the stream's end.
        let mut encoded = BytesMut::new();
        notice.encode(&mut encoded);
        if self.server_streaming == 0 {
            self.to_client.extend_from_slice(&encoded);
        } else {
            // After any notice already waiting (a token expiry warning).
            self.held_notice
                .get_or_insert_with(BytesMut::new)
                .extend_from_slice(&encoded);
        }
        self.held = Some(Held {
            id: view.id,
            decision,
            deadline: Box::pin(tokio::time::sleep(approval.timeout)),
            timeout: approval.timeout,
            query: message.to_vec(),
            bind,
            text,
            statements,
            changes_search_path: changes_search_path(request.classification.as_deref()),
            rule: request.rule,
            sensitive: self.last_sensitive,
        });
    }

    /// How the held statement's request ended, if it did.
    fn poll_hold(&mut self, cx: &mut Context<'_>) -> Option<HoldEnd> {
        let held = self.held.as_mut()?;
        if let Poll::Ready(result) = Pin::new(&mut held.decision).poll(cx) {
            return Some(match result {
                Ok(outcome) => HoldEnd::Decided(outcome),
                // Ended without a decision by someone else: as expired.
                Err(_) => HoldEnd::Expired,
            });
        }
        if held.deadline.as_mut().poll(cx).is_ready() {
            return Some(HoldEnd::Expired);
        }
        if self.ctx.live.poll_cancelled(cx, &mut self.cancel_waker) {
            return Some(HoldEnd::Cancelled);
        }
        None
    }

    /// Gives back the `refuse_and_retry` approval of a statement that did
    /// not run (the server skipped it after an earlier message of its
    /// batch failed, or the gateway refused it for another reason): the
    /// same statement may still run once within the approval's window.
    fn give_back_retry(&self, used: Option<crate::approvals::RetryUse>) {
        if let Some(used) = used {
            tracing::info!(
                request = used.request,
                "an approved statement did not run; its approval stands"
            );
            self.ctx.approvals.give_back_retry(used);
        }
    }

    /// `refuse_and_retry`: `Ok(request)` when an approval lets this exact
    /// statement run now; otherwise the refusal that names the request
    /// (opened now, or the one already pending for the same statement).
    fn refuse_and_retry(
        &mut self,
        sql: &str,
        request: &crate::gate::ApprovalRequest,
        approval: &crate::config::ApprovalConfig,
        source: StatementSource<'_>,
    ) -> Result<u64, Refusal> {
        use sha2::Digest as _;
        let hash: [u8; 32] = sha2::Sha256::digest(sql.as_bytes()).into();
        let (identity, target) = (self.ctx.identity.name(), self.ctx.target);
        // Only a simple Query uses the approval: a prepared statement could
        // be executed any number of times.
        if matches!(source, StatementSource::SimpleQuery)
            && let Some(used) = self.ctx.approvals.take_retry(identity, target, hash)
        {
            let id = used.request;
            tracing::info!(request = id, "approved statement sent again; it runs once");
            self.retry_use = Some(used);
            return Ok(id);
        }
        let id = match self.ctx.approvals.pending_retry(identity, target, hash) {
            Some(id) => id,
            None if let Some(message) = self.ctx.approvals.too_many_pending(self.ctx.identity) => {
                return Err(Refusal {
                    code: "42501",
                    message: format!("{} ({message})", request.refusal.message),
                    hint: Some(
                        "the statement needs approval; ask an approver about the requests already waiting".into(),
                    ),
                });
            }
            None => {
                let (view, _answer) = self.ctx.approvals.open(crate::approvals::NewRequest {
                    requester: self.ctx.identity.clone(),
                    target: target.to_string(),
                    session: self.ctx.session_id.to_string(),
                    statement: audit_text(sql),
                    rule: request.rule.clone(),
                    reason: Some(request.refusal.message.clone()),
                    approvers: approval.approvers.clone(),
                    needed: approval.approvals,
                    timeout: approval.timeout,
                    retry: Some(hash),
                    access: None,
                    statements: audit_records(request.classification.as_deref(), self.ctx.audit_tags),
                    approve_via: approval.approve_via.clone(),
                });
                view.id
            }
        };
        Err(Refusal {
            code: "42501",
            message: format!("{} (approval request {id})", request.refusal.message),
            hint: Some(format!(
                "once request {id} is approved ({} of: {}), send exactly the same statement again within {}, as a simple query (not prepared): it runs once",
                approval.approvals,
                approval.approvers.join(", "),
                crate::config::human_duration(approval.timeout)
            )),
        })
    }

    /// Runs the held statement, or refuses it with who decided and why.
    fn end_hold(&mut self, end: HoldEnd) -> Result<(), Stop> {
        let Some(mut held) = self.held.take() else {
            return Ok(());
        };
        // The session's own deadline or the client's cancel may race an
        // approver's decision: whichever the registry took first counts.
        let end = match end {
            HoldEnd::Expired | HoldEnd::Cancelled => {
                let (state, why) = match end {
                    HoldEnd::Expired => (
                        crate::approvals::RequestState::Expired,
                        "no decision before the request expired",
                    ),
                    _ => (
                        crate::approvals::RequestState::Cancelled,
                        "the client cancelled its statement",
                    ),
                };
                if self.ctx.approvals.end(held.id, state, why) {
                    end
                } else {
                    match held.decision.try_recv() {
                        Ok(outcome) => HoldEnd::Decided(outcome),
                        Err(_) => end,
                    }
                }
            }
            decided => decided,
        };
        // Approved just as the client cancelled: the cancel stayed in the
        // gateway (see `forward_cancel`), so the client's wish wins.
        let end = match end {
            HoldEnd::Decided(crate::approvals::Outcome::Approved { .. }) if self.ctx.live.cancel_requested() => {
                HoldEnd::Cancelled
            }
            end => end,
        };
        if matches!(end, HoldEnd::Decided(crate::approvals::Outcome::Approved { .. })) {
            // From here a cancel is the server's to act on.
            self.ctx.live.set_state(SessionState::Running);
        }
        // Approved while the trail cannot record it: it does not run.
        let audit_refusal = match end {
            HoldEnd::Decided(crate::approvals::Outcome::Approved { .. }) => self.audit_unavailable(),
            _ => None,
        };
        let refusal = match end {
            _ if let Some(refusal) = audit_refusal => *refusal,
            HoldEnd::Decided(crate::approvals::Outcome::Approved { by }) => {
                tracing::info!(request = held.id, by = ?by, "held statement approved; it runs");
                // The gate's view of the session follows what runs.
                self.gate_session.search_path_changed |= held.changes_search_path;
                let rule = format!("{} (request {} approved by {})", held.rule, held.id, by.join(", "));
                if held.bind {
                    // Bound now; its Execute is recorded (write-ahead) when
                    // it comes.
                    if let Some(auditor) = self.ctx.auditor {
                        let event =
                            self.statement_event("bind", &held.text, &held.statements, "allow", Some(&rule), None);
                        auditor.record_stored(event);
                    }
                    self.bind_approved = Some(held.id);
                    self.on_frontend(fe::BIND, &held.query)?;
                    return if self.client_in.is_empty() {
                        Ok(())
                    } else {
                        self.on_client_data()
                    };
                }
                self.pending_mark = self.record_execution(
                    "query",
                    &held.text,
                    &held.statements,
                    &Outcome::Forward,
                    "allow",
                    Some(&rule),
                );
                self.to_server.extend_from_slice(&held.query);
                let mark = self.pending_mark.take();
                self.pending.push_marked(Expect::query(held.sensitive), mark);
                // What the client sent meanwhile goes on now.
                return if self.client_in.is_empty() {
                    Ok(())
                } else {
                    self.on_client_data()
                };
            }
            HoldEnd::Decided(crate::approvals::Outcome::Denied { by, reason }) => {
                let reason = reason.map(|r| format!(": {r}")).unwrap_or_default();
                ErrorFields::new(
                    Severity::Error,
                    "42501",
                    format!(
                        "statement refused: approval request {} was denied by {by}{reason}",
                        held.id
                    ),
                )
            }
            HoldEnd::Expired => ErrorFields::new(
                Severity::Error,
                "42501",
                format!(
                    "statement not run: approval request {} expired after {} with no decision",
                    held.id,
                    crate::config::human_duration(held.timeout)
                ),
            )
            .with_hint("send the statement again to ask again, or ask an approver to watch for it"),
            HoldEnd::Cancelled => ErrorFields::new(
                Severity::Error,
                "57014",
                format!(
                    "canceling statement due to user request (approval request {} is cancelled)",
                    held.id
                ),
            ),
        };
        if held.bind {
            self.refuse_bind(&held.query[HEADER_LEN..], Box::new(refusal))?;
        } else {
            self.refuse_query(Box::new(refusal));
        }
        if self.client_in.is_empty() {
            Ok(())
        } else {
            self.on_client_data()
        }
    }

    /// Records how the statements that ended did.
    fn record_finished(&mut self) {
        if self.ctx.auditor.is_none() {
            return;
        }
        let mut finished = std::mem::take(&mut self.audit_finished);
        self.pending.take_finished(&mut finished);
        for mark in finished.drain(..) {
            self.record_done(mark);
        }
        self.audit_finished = finished;
    }

    fn record_done(&mut self, mut mark: Mark) {
        if mark.continues {
            self.continue_portal(mark, true);
            return;
        }
        let took = mark.started.elapsed();
        // A portal fetched in pieces took as long as its client went on
        // fetching: not a statement's latency.
        if !mark.skipped && !mark.suspended {
            self.ctx.metrics.took(took);
        }
        let Some(auditor) = self.ctx.auditor else { return };
        let completion = audit::CompletionView {
            rows: mark.rows,
            duration_us: took.as_micros() as u64,
            sqlstate: mark.sqlstate.as_deref(),
            skipped: mark.skipped,
            columns: mark.columns.as_deref().unwrap_or_default(),
            sample: &mark.sample,
        };
        auditor.complete(
            mark.ticket,
            &self.audit_envelope,
            mark.seq,
            completion,
            &mut self.audit_scratch,
        );
        // One large completion (long sampled values, many columns) does not
        // keep its buffer for the rest of the session.
        if self.audit_scratch.capacity() > SCRATCH_KEPT {
            self.audit_scratch = String::new();
        }
        if mark.sample.capacity() > 0 && mark.sample.capacity() <= SCRATCH_KEPT {
            mark.sample.clear();
            self.spare_sample = mark.sample;
        }
    }

    /// A RowDescription's columns as the trail records them: name, origin
    /// and tags when the target's catalog knows the column, and how its
    /// values leave the gateway. `None` without columns, or if it does not
    /// read (the masker then ends the session). The same description as
    /// the last one, masked the same, shares its columns: a session runs a
    /// few statement shapes over and over.
    fn columns(&mut self, body: &[u8]) -> Option<Columns> {
        if let Some((seen, columns)) = &self.described
            && seen.as_slice() == body
            && columns
                .iter()
                .enumerate()
                .all(|(index, column)| column.masking == self.seam.column_masking(index))
        {
            return Some(columns.clone());
        }
        let columns: Columns = self.column_records(body).into();
        if columns.is_empty() {
            return None;
        }
        let (mut seen, _) = self.described.take().unwrap_or_default();
        seen.clear();
        seen.extend_from_slice(body);
        self.described = Some((seen, columns.clone()));
        Some(columns)
    }

    /// [`Proxy::columns`], built.
    fn column_records(&self, body: &[u8]) -> Vec<crate::audit::ColumnRecord> {
        let mut cur = Cursor::new(body);
        let Ok(count) = cur.count16("column count") else {
            return Vec::new();
        };
        let mut columns = Vec::with_capacity(count);
        for index in 0..count {
            let Ok(name) = cur.cstr_bytes("column name") else {
                return Vec::new();
            };
            let (Ok(table), Ok(attnum)) = (cur.i32("table"), cur.i16("attnum")) else {
                return Vec::new();
            };
            // type oid, type length, modifier, format
            if cur
                .i32("type")
                .and(cur.i16("len"))
                .and(cur.i32("mod"))
                .and(cur.i16("format"))
                .is_err()
            {
                return Vec::new();
            }
            let origin = self
                .ctx
                .origins
                .as_deref()
                .and_then(|origins| origins.get(&(table as u32, attnum)));
            columns.push(crate::audit::ColumnRecord {
                name: String::from_utf8_lossy(name).into_owned(),
                origin: origin.map(|o| o.column.to_string()),
                masking: self.seam.column_masking(index).to_string(),
                tags: origin.map(|o| o.tags.to_vec()).unwrap_or_default(),
            });
        }
        columns
    }

    /// For a Bind or Execute of a statement prepared under requested grants
    /// (`bound`: every set of grants recorded for it): the refusal, if one
    /// of them has ended since.
    fn grant_ended<'g>(&self, mut bound: impl Iterator<Item = &'g Vec<Arc<str>>>) -> Option<Refusal> {
        let first = bound.next()?;
        let held = self.ctx.approvals.granted(self.ctx.identity, self.ctx.target);
        let ended = first.iter().chain(bound.flatten()).find(|g| !held.contains(g))?;
        tracing::info!(grant = %ended, "prepared statement refused: it was allowed under a grant that has ended");
        Some(Refusal {
            code: "42501",
            message: format!("statement refused: it was prepared while you held grant \"{ended}\", which has ended"),
            hint: Some("prepare it again: policy decides it afresh".into()),
        })
    }

    /// For SQL that EXECUTEs a prepared statement: the refusal if the
    /// protocol prepared it for approval or under a grant that has ended.
    /// EXECUTE inside another statement (EXPLAIN ANALYZE, CREATE TABLE AS)
    /// is not followed by name: then every such statement counts.
    fn sql_execute_refusal(
        &self,
        sql: &str,
        classification: Option<&crate::policy::Classification>,
    ) -> Option<Refusal> {
        // Without a classification the gate refused it already.
        let classification = classification?;
        if !crate::policy::mentions_execute(sql) {
            return None;
        }
        let names: Vec<&str> = classification.executed().collect();
        let plain = classification.only_executes();
        let approval = if plain {
            names.iter().any(|n| self.needs_approval.count(n) > 0)
        } else {
            !self.needs_approval.is_empty()
        };
        if approval {
            return Some(Refusal {
                code: "42501",
                message: "statement refused: EXECUTE of a prepared statement that needs approval".into(),
                hint: Some("execute it through your driver (Bind/Execute): each execution is held for approval".into()),
            });
        }
        // The gate checks a plain EXECUTE of what SQL prepared; one inside
        // another statement (EXPLAIN ANALYZE EXECUTE) may run any of them.
        if plain {
            names.iter().find_map(|n| self.grant_ended(self.grant_bound.get(n)))
        } else {
            self.grant_ended(self.grant_bound.all())
                .or_else(|| self.grant_ended(self.gate_session.prepared_grants.values()))
        }
    }

    /// SQL's FETCH and MOVE run a portal the protocol bound, and run a
    /// `DELETE ... RETURNING` (any write that returns rows) to its end at
    /// the first row, where its rows are not counted; so does dynamic SQL
    /// (`cursor_to_xml` takes a portal's name, the unnamed one's too), text
    /// the gate could not read, and an EXECUTE of a statement that does
    /// any of these. While a portal runs a limited write, such a statement
    /// is refused. One prepared (by the protocol or SQL's PREPARE) is
    /// remembered, and checked again at its Bind and its portal's Execute
    /// ([`Proxy::fetch_refusal`]).
    fn limit_sql_fetch(&mut self, sql: &str, source: StatementSource<'_>, verdict: Verdict) -> Verdict {
        let classification = match &verdict {
            Verdict::Allow(allowance) => allowance.classification.as_deref(),
            Verdict::RequireApproval(request) => request.classification.as_deref(),
            Verdict::Deny(_) => return verdict,
        };
        let Some(classification) = classification else {
            return verdict;
        };
        let scs = self.gate_session.standard_conforming_strings;
        let fetches = classification.statements.iter().any(|s| {
            s.command.starts_with("FETCH")
                || s.command.starts_with("MOVE")
                || s.kind == crate::policy::Kind::Unknown
                || s.features.contains(crate::policy::Feature::DynamicSql)
                || matches!(&s.prepared, Some(crate::policy::PreparedRef::Execute(name)) if self.fetch_statements.contains(name))
                || (!self.fetch_statements.is_empty()
                    && s.command.starts_with("EXPLAIN")
                    && crate::policy::executes_keyword(sql, scs))
        });
        if !fetches {
            return verdict;
        }
        if let StatementSource::Parse { statement } = source {
            self.fetch_statements.add(statement);
        }
        // SQL's PREPARE of one (`PREPARE f AS SELECT cursor_to_xml(...)`).
        for name in classification.statements.iter().filter_map(|s| match &s.prepared {
            Some(crate::policy::PreparedRef::Prepare(name)) => Some(name),
            _ => None,
        }) {
            self.fetch_statements.add(name);
        }
        match self.fetch_refusal(None) {
            Some(refusal) => Verdict::Deny(refusal),
            None => verdict,
        }
    }

    /// Whether a portal, or one a Close or Bind not answered yet may leave
    /// in place, runs a row-limited write.
    fn limits_portals(&self) -> bool {
        !self.portal_limits.is_empty() || self.rebinds.iter().any(|r| r.limit.is_some())
    }

    /// The refusal of a statement that may run a portal while a portal
    /// other than `except` (its own, which a Bind replaces and an Execute
    /// runs under its limit) runs a limited write.
    ///
    /// A limit a Close or Bind not answered yet took away counts until the
    /// answer: the server may skip that message (after an error earlier in
    /// its batch), and the portal then runs on.
    fn fetch_refusal(&self, except: Option<&str>) -> Option<Refusal> {
        let saved = self
            .rebinds
            .iter()
            .filter_map(|r| r.limit.as_ref().map(|(_, limit)| (r.portal.as_str(), limit)));
        let (portal, (limit, _)) = self
            .portal_limits
            .iter()
            .chain(saved)
            .find(|&(portal, _)| Some(portal) != except)?;
        let portal = if portal.is_empty() {
            "unnamed portal".to_string()
        } else {
            format!("portal \"{portal}\"")
        };
        Some(Refusal {
            code: ROW_LIMIT_SQLSTATE,
            message: format!(
                "statement refused: the {portal} runs a write that rule \"{}\" limits to {} rows, and this statement may run it (FETCH, MOVE, dynamic SQL) where its rows cannot be counted",
                limit.rule, limit.rows
            ),
            hint: Some("execute the portal through the protocol (Execute), or close it first".into()),
        })
    }

    /// A statement the protocol prepared runs the name a PREPARE or Parse
    /// prepares now through SQL EXECUTE ([`SqlExecutes`]), where nothing
    /// is checked at each run: if this one would be restricted (a row
    /// limit, approval, a grant it needs), it is refused.
    fn executed_elsewhere(&self, source: StatementSource<'_>, verdict: Verdict) -> Verdict {
        if self.sql_executes.is_empty() {
            return verdict;
        }
        let (restriction, classification) = match &verdict {
            Verdict::Allow(allowance) if allowance.max_rows.is_some() => {
                (Some("a row limit"), &allowance.classification)
            }
            Verdict::Allow(allowance) if !allowance.granted_by.is_empty() => {
                (Some("a grant"), &allowance.classification)
            }
            Verdict::Allow(allowance) => (None, &allowance.classification),
            Verdict::RequireApproval(request) => (Some("approval"), &request.classification),
            Verdict::Deny(_) => return verdict,
        };
        // A Parse needs the grants of what it runs, too (`last_granted`).
        let parsed = match source {
            StatementSource::Parse { statement } if !statement.is_empty() => Some((
                statement,
                restriction.or((!self.last_granted.is_empty()).then_some("a grant")),
            )),
            _ => None,
        };
        // The gate keeps an SQL PREPARE's limit for its EXECUTEs, not on
        // the PREPARE's allowance.
        let prepared = classification
            .iter()
            .flat_map(|c| c.statements.iter())
            .filter_map(|s| match &s.prepared {
                Some(crate::policy::PreparedRef::Prepare(name)) => Some((
                    name.as_str(),
                    (self.gate_session.prepared_limits.contains_key(name))
                        .then_some("a row limit")
                        .or(restriction),
                )),
                _ => None,
            });
        let Some((name, restriction)) = parsed.into_iter().chain(prepared).find_map(|(name, restriction)| {
            Some((name, restriction?)).filter(|(name, _)| self.sql_executes.runs(name))
        }) else {
            return verdict;
        };
        let (runs, hint) = if self.sql_executes.runs_any() {
            (
                "runs EXECUTE of a statement it does not name (inside EXPLAIN or CREATE TABLE AS, or in dynamic SQL such as a DO block)",
                "prepare it in a new session",
            )
        } else {
            (
                "runs it through EXECUTE",
                "prepare it under another name, or in a new session",
            )
        };
        Verdict::Deny(Refusal {
            code: "42501",
            message: format!(
                "statement refused: \"{name}\" would need {restriction}, and a statement this session prepared earlier {runs}, where that cannot be checked"
            ),
            hint: Some(hint.into()),
        })
    }

    /// A Parse of `EXECUTE name` runs `name` at each Bind: it is bound to
    /// the grants `name` was prepared under (by either protocol), so that a
    /// Bind after one ended is refused, as a Bind of `name` itself is. One
    /// that runs EXECUTE inside another statement is bound to every grant
    /// the session's prepared statements hold.
    fn inherit_executed_grants(&mut self, sql: &str, classification: &crate::policy::Classification) {
        if (self.grant_bound.is_empty() && self.gate_session.prepared_grants.is_empty())
            || !crate::policy::mentions_execute(sql)
        {
            return;
        }
        let grants: Vec<Arc<str>> = if classification.only_executes() {
            classification
                .executed()
                .flat_map(|name| {
                    self.grant_bound
                        .get(name)
                        .flatten()
                        .chain(self.gate_session.prepared_grants.get(name).into_iter().flatten())
                })
                .cloned()
                .collect()
        } else {
            self.grant_bound
                .all()
                .flatten()
                .chain(self.gate_session.prepared_grants.values().flatten())
                .cloned()
                .collect()
        };
        for grant in grants {
            if !self.last_granted.contains(&grant) {
                self.last_granted.push(grant);
            }
        }
    }

    /// SQL EXECUTE shares the protocol's namespace: an EXECUTE of a
    /// statement the protocol prepared under a row limit runs under it (the
    /// gate knows only the limits of SQL's PREPAREs), and, like any limited
    /// write, on its own. An EXECUTE inside another statement
    /// (`EXPLAIN ANALYZE EXECUTE`, `CREATE TABLE ... AS EXECUTE`) runs its
    /// statement where no limit can be checked: while the session has a
    /// limited prepared statement, a statement that mentions EXECUTE other
    /// than as a plain `EXECUTE name` is refused.
    fn limit_sql_execute(&self, sql: &str, verdict: Verdict) -> Verdict {
        let Verdict::Allow(mut allowance) = verdict else {
            return verdict;
        };
        if self.statement_limits.is_empty() && self.gate_session.prepared_limits.is_empty() {
            return Verdict::Allow(allowance);
        }
        let Some(classification) = allowance.classification.as_deref() else {
            return Verdict::Allow(allowance);
        };
        if !classification.only_executes() && crate::policy::mentions_execute(sql) {
            return Verdict::Deny(Refusal {
                code: "42501",
                message: "statement refused: a prepared statement with a row limit runs only as EXECUTE name, on its own; this statement may execute one where its rows cannot be counted".into(),
                hint: Some("send EXECUTE name as a statement of its own".into()),
            });
        }
        let limit = classification
            .statements
            .iter()
            .filter_map(|s| match &s.prepared {
                Some(crate::policy::PreparedRef::Execute(name)) => {
                    self.statement_limits.get(name).min_by_key(|l| l.rows)
                }
                _ => None,
            })
            .chain(allowance.max_rows.as_ref())
            .min_by_key(|l| l.rows)
            .cloned();
        let Some(limit) = limit else {
            return Verdict::Allow(allowance);
        };
        if classification.statements.len() > 1 {
            return Verdict::Deny(crate::policy::limited_write_among_others());
        }
        allowance.max_rows = Some(limit);
        Verdict::Allow(allowance)
    }

    /// The gate's decision on a statement.
    fn decide(&mut self, sql: &str, source: StatementSource<'_>) -> (Outcome, Decided) {
        // Looked up for every statement, so that a grant applies from the
        // moment it is approved and stops the moment it expires.
        let granted = self.ctx.approvals.granted(self.ctx.identity, self.ctx.target);

        let ctx = StatementContext {
            identity: self.ctx.identity,
            target: self.ctx.target,
            session_id: self.ctx.session_id,
            source,
            granted: &granted,
        };
        let verdict = self.ctx.gate.check(&ctx, &mut self.gate_session, sql);
        let verdict = self.limit_sql_execute(sql, verdict);
        let verdict = self.limit_sql_fetch(sql, source, verdict);
        // What a prepared statement must remember: the grants it needed,
        // and those of what it runs through EXECUTE.
        let classification = match &verdict {
            Verdict::Allow(allowance) => {
                self.last_granted.clone_from(&allowance.granted_by);
                allowance.classification.clone()
            }
            Verdict::RequireApproval(request) => {
                self.last_granted.clone_from(&request.granted_by);
                request.classification.clone()
            }
            Verdict::Deny(_) => {
                self.last_granted.clear();
                None
            }
        };
        let parse = matches!(source, StatementSource::Parse { .. });
        if parse && let Some(classification) = classification.as_deref() {
            self.inherit_executed_grants(sql, classification);
        }
        let verdict = self.executed_elsewhere(source, verdict);
        // A statement that needs approval may run once approved: it gets
        // the same masking checks now as one allowed outright.
        let classification = match &verdict {
            Verdict::Deny(_) => {
                self.last_granted.clear();
                None
            }
            _ => classification,
        };
        if parse && let Some(classification) = classification.as_deref() {
            self.sql_executes
                .note(sql, classification, self.gate_session.standard_conforming_strings);
        }
        self.last_sensitive = self.sensitivity(classification.as_deref());
        let masking_refusal = classification.as_deref().and_then(|c| self.masking_refusal(sql, c));
        let mut decided = Decided {
            decision: "allow",
            rule: None,
            classification,
        };
        // SQL EXECUTE shares the protocol's namespace: what the protocol
        // prepared under a grant or for approval is not run that way.
        let execute_refusal = if self.grant_bound.is_empty()
            && self.needs_approval.is_empty()
            && self.gate_session.prepared_grants.is_empty()
        {
            None
        } else {
            self.sql_execute_refusal(sql, decided.classification.as_deref())
        };
        let refusal = match verdict {
            _ if let Some(refusal) = masking_refusal => {
                decided.decision = "deny";
                refusal
            }
            _ if let Some(refusal) = execute_refusal => {
                decided.decision = "deny";
                refusal
            }
            Verdict::Allow(Allowance { max_rows: None, .. }) => return (Outcome::Forward, decided),
            // A write inside WITH reports no row count of its own (the
            // command tag is the outer statement's): its limit could not be
            // checked.
            Verdict::Allow(Allowance {
                max_rows: Some(limit), ..
            }) if decided.classification.as_ref().is_some_and(|c| {
                c.statements
                    .iter()
                    .any(|s| s.features.contains(crate::policy::Feature::DataModifyingCte))
            }) =>
            {
                decided.decision = "deny";
                decided.rule = Some(limit.rule.to_string());
                Refusal {
                    code: ROW_LIMIT_SQLSTATE,
                    message: format!(
                        "statement refused: rule \"{}\" limits this write to {} rows, and the gateway cannot count the rows a write inside WITH changes",
                        limit.rule, limit.rows
                    ),
                    hint: Some("run the write as a statement of its own".into()),
                }
            }
            Verdict::Allow(Allowance {
                max_rows: Some(limit), ..
            }) => {
                decided.rule = Some(limit.rule.to_string());
                return (Outcome::Guard(limit), decided);
            }
            // Held (`hold` rules, a simple Query or a Parse), refused with
            // a request to retry (`refuse_and_retry`), or refused saying
            // why it cannot be either.
            Verdict::RequireApproval(request) if matches!(source, StatementSource::FunctionCall) => {
                // It names its function by number, with binary arguments:
                // there is no SQL for approvers to read, nor to retry.
                decided.decision = "require_approval";
                decided.rule = Some(request.rule.clone());
                Refusal {
                    code: "42501",
                    message: "statement refused: a FunctionCall (fastpath) message calls a function by number, which \
                              the gateway cannot see, and it cannot be held for approval: approvers would have no SQL \
                              to read"
                        .into(),
                    hint: Some(
                        "call the function from SQL instead (SELECT f(...)): the gateway reads that, and holds it for \
                         approval where the policy asks"
                            .into(),
                    ),
                }
            }
            Verdict::RequireApproval(request)
                if decided.classification.as_deref().is_some_and(|c| {
                    c.statements
                        .iter()
                        .any(|s| matches!(s.prepared, Some(crate::policy::PreparedRef::Prepare(_))))
                }) =>
            {
                // EXECUTE of it would run it any number of times on one
                // approval: the statement itself is what gets held.
                decided.decision = "require_approval";
                decided.rule = Some(request.rule.clone());
                Refusal {
                    code: "42501",
                    message: request.refusal.message,
                    hint: Some(
                        "PREPARE of a statement that needs approval is refused: send the statement itself (it is held \
                         for approval), or prepare it through your driver (each execution is held)"
                            .into(),
                    ),
                }
            }
            Verdict::RequireApproval(request) => {
                decided.decision = "require_approval";
                decided.rule = Some(request.rule.clone());
                let hold = request.approval.clone().filter(|a| {
                    a.mode == crate::config::ApprovalMode::Hold
                        && matches!(source, StatementSource::SimpleQuery | StatementSource::Parse { .. })
                });
                if let Some(approval) = hold {
                    return (
                        Outcome::Hold(Box::new(ToHold {
                            request: *request,
                            approval,
                        })),
                        decided,
                    );
                }
                match request
                    .approval
                    .as_ref()
                    .filter(|a| a.mode == crate::config::ApprovalMode::RefuseAndRetry)
                {
                    Some(approval) => match self.refuse_and_retry(sql, &request, approval, source) {
                        Ok(id) => {
                            self.gate_session.search_path_changed |=
                                changes_search_path(decided.classification.as_deref());
                            // Approved before: this one run is allowed.
                            decided.decision = "allow";
                            decided.rule = Some(format!("{} (request {id} approved)", request.rule));
                            return (Outcome::Forward, decided);
                        }
                        Err(refusal) => refusal,
                    },
                    None => request.refusal,
                }
            }
            Verdict::Deny(refusal) => {
                decided.decision = "deny";
                refusal
            }
        };
        self.counters.refused += 1;
        (Outcome::Refuse(refusal_error(refusal)), decided)
    }

    /// A simple Query under a row limit. Inside a transaction it runs as is
    /// (and the transaction is aborted if it goes over); outside one, the
    /// gateway opens a transaction first so that it can still roll it back.
    fn start_simple_guard(&mut self, limit: RowLimit, message: &[u8]) {
        match self.tx_status {
            // It will fail like everything in a failed transaction.
            TxStatus::Failed => {
                self.to_server.extend_from_slice(message);
                let mark = self.pending_mark.take();
                self.pending.push_marked(Expect::query(self.last_sensitive), mark);
            }
            TxStatus::InTransaction => {
                self.to_server.extend_from_slice(message);
                let mark = self.pending_mark.take();
                self.pending.push_marked(
                    Expect::Query {
                        refusal: None,
                        guarded: true,
                        sensitive: self.last_sensitive,
                        retry: self.retry_use.take().map(Box::new),
                    },
                    mark,
                );
                self.guard = Some(Guard::new(
                    limit,
                    GuardKind::Simple { wrapped: false },
                    GuardPhase::Running,
                ));
            }
            TxStatus::Idle => {
                // Sent later, inside the gateway's own transaction: a
                // `refuse_and_retry` approval is used up now.
                self.retry_use = None;
                Query::encode("BEGIN", &mut self.to_server);
                self.pending.push(Expect::Internal);
                self.guard_mark = self.pending_mark.take();
                self.guard = Some(Guard::new(
                    limit,
                    GuardKind::Simple { wrapped: true },
                    GuardPhase::Beginning {
                        query: message.to_vec(),
                        failed: false,
                    },
                ));
            }
        }
    }

    /// A backend message that answers a guarded statement.
    fn guard_message(&mut self, message_tag: u8, message: &[u8]) {
        let Some(guard) = self.guard.as_mut() else {
            self.seam.forward(message_tag, message, &mut self.to_client);
            return;
        };
        let extended = matches!(guard.kind, GuardKind::Extended { .. });
        match message_tag {
            backend::tag::DATA_ROW => {
                guard.rows += 1;
                if guard.over() {
                    return;
                }
                if guard.held.len() + message.len() > HOLD_CAP {
                    guard.overflowed = true;
                    return;
                }
                self.seam.forward(message_tag, message, &mut guard.held);
            }
            backend::tag::COMMAND_COMPLETE => {
                guard.completed =
                    command_count(&message[HEADER_LEN..]).map(|(command, rows)| (command.to_string(), rows));
                self.seam.forward(message_tag, message, &mut guard.held);
                if extended {
                    self.finish_extended_guard();
                }
            }
            backend::tag::PORTAL_SUSPENDED => {
                // A write runs whole at its first Execute, whatever the
                // row count asked for (JDBC asks for 1 when it wants no
                // results): one that returns no rows completes with its
                // count. One suspended returned rows, and the rest wait in
                // the portal with its count: refused and rolled back.
                guard.suspended = true;
                self.seam.forward(message_tag, message, &mut guard.held);
                self.finish_extended_guard();
            }
            backend::tag::ERROR_RESPONSE => {
                if extended {
                    // The Execute failed: nothing to undo, the server does,
                    // and the portal cannot run again.
                    let guard = self.guard.take().expect("guard present");
                    if let GuardKind::Extended { portal } = &guard.kind {
                        self.portal_limits.remove(portal);
                    }
                    self.to_client.extend_from_slice(&guard.held);
                    self.seam.forward(message_tag, message, &mut self.to_client);
                } else {
                    // Kept masked: it reaches the client later, as is.
                    let mut masked = BytesMut::with_capacity(message.len());
                    self.seam.forward(message_tag, message, &mut masked);
                    guard.error = Some(masked.to_vec());
                }
            }
            backend::tag::COPY_IN_RESPONSE | backend::tag::COPY_BOTH_RESPONSE => {
                // The client must see this to send its data; only the row
                // count at CopyDone's CommandComplete is held.
                guard.copy_in = true;
                self.to_client.extend_from_slice(&guard.held);
                guard.held.clear();
                self.seam.forward(message_tag, message, &mut self.to_client);
            }
            backend::tag::READY_FOR_QUERY => self.finish_simple_guard(message),
            // RowDescription, EmptyQueryResponse: part of the held answer.
            _ => self.seam.forward(message_tag, message, &mut guard.held),
        }
    }

    /// An error earlier in the batch made the server skip everything up to
    /// the client's Sync, the guarded Execute too: it never ran (its record
    /// says skipped, as its queue entry went), and the guard that would
    /// hold the client's Sync back until its verdict has nothing to wait
    /// for. Only an Execute can be skipped so: a guarded Query starts once
    /// nothing is owed, and an error to its BEGIN is the guard's own.
    fn guard_skipped(&mut self) {
        if let Some(guard) = self.guard.take() {
            tracing::debug!(rule = %guard.limit.rule, "row-limited Execute skipped after an earlier error");
        }
    }

    /// The guarded Execute finished (or was suspended at its row limit).
    fn finish_extended_guard(&mut self) {
        let Some(guard) = self.guard.take() else { return };
        let GuardKind::Extended { portal } = &guard.kind else {
            return;
        };
        if guard.over() {
            // Make the batch fail, so the server rolls the write back at
            // Sync (or aborts the transaction it is in).
            self.portal_limits.remove(portal);
            self.counters.refused += 1;
            self.pending.refuse_last_finished(ROW_LIMIT_SQLSTATE);
            tracing::info!(rows = guard.rows, limit = guard.limit.rows, rule = %guard.limit.rule, "write over its row limit; rolled back");
            Parse::encode(GUARD_STATEMENT, REFUSED_STATEMENT, &mut self.to_server);
            frontend::encode_flush(&mut self.to_server);
            self.pending.push(Expect::Parse {
                refusal: Some(Box::new(guard.refusal())),
            });
        } else {
            if guard.completed.is_some() {
                self.portal_limits.remove(portal);
            } else if let Some(entry) = self.portal_limits.get_mut(portal) {
                entry.1 = guard.rows;
            }
            self.to_client.extend_from_slice(&guard.held);
        }
    }

    /// The guarded Query's ReadyForQuery: decide, and end or finish the guard.
    fn finish_simple_guard(&mut self, ready: &[u8]) {
        let Some(guard) = self.guard.as_mut() else { return };
        let over = guard.over();
        match guard.kind {
            GuardKind::Simple { wrapped: true } => {
                let mut payload = std::mem::take(&mut guard.held);
                let commit = if let Some(error) = guard.error.take() {
                    payload.extend_from_slice(&error);
                    false
                } else if over {
                    payload.clear();
                    guard.refusal().encode(&mut payload);
                    false
                } else {
                    true
                };
                if over {
                    self.counters.refused += 1;
                    self.pending.refuse_last_finished(ROW_LIMIT_SQLSTATE);
                    tracing::info!(rows = ?guard.completed, limit = guard.limit.rows, rule = %guard.limit.rule, "write over its row limit; rolled back");
                }
                Query::encode(if commit { "COMMIT" } else { "ROLLBACK" }, &mut self.to_server);
                self.pending.push(Expect::Internal);
                guard.phase = GuardPhase::Finishing { payload, commit };
            }
            _ => {
                let guard = self.guard.take().expect("guard present");
                if let Some(error) = &guard.error {
                    self.to_client.extend_from_slice(&guard.held);
                    self.to_client.extend_from_slice(error);
                    self.to_client.extend_from_slice(ready);
                } else if over {
                    // Abort the transaction, as after any failed statement:
                    // the write can then never be committed.
                    self.counters.refused += 1;
                    self.pending.refuse_last_finished(ROW_LIMIT_SQLSTATE);
                    tracing::info!(rows = ?guard.completed, limit = guard.limit.rows, rule = %guard.limit.rule, "write over its row limit; transaction aborted");
                    self.refuse_query(Box::new(guard.refusal()));
                } else {
                    self.to_client.extend_from_slice(&guard.held);
                    self.to_client.extend_from_slice(ready);
                }
            }
        }
    }

    /// A backend message that answers a statement the gateway sent itself.
    fn internal_message(&mut self, message_tag: u8, message: &[u8]) {
        let Some(guard) = self.guard.as_mut() else { return };
        match (&mut guard.phase, message_tag) {
            (GuardPhase::Beginning { failed, .. }, backend::tag::ERROR_RESPONSE) => *failed = true,
            (GuardPhase::Beginning { query, failed }, backend::tag::READY_FOR_QUERY) => {
                if *failed {
                    // Without the transaction the write could not be undone:
                    // it is not run.
                    let guard = self.guard.take().expect("guard present");
                    tracing::warn!(rule = %guard.limit.rule, "could not open a transaction for a row-limited write");
                    ErrorFields::new(
                        Severity::Error,
                        "55000",
                        "statement not run: the gateway could not open the transaction it checks row limits in",
                    )
                    .encode(&mut self.to_client);
                    self.to_client.extend_from_slice(message);
                    if let Some(mut mark) = self.guard_mark.take() {
                        mark.sqlstate = Some("55000".into());
                        self.record_done(mark);
                    }
                } else {
                    let query = std::mem::take(query);
                    self.to_server.extend_from_slice(&query);
                    let mark = self.guard_mark.take();
                    self.pending.push_marked(
                        Expect::Query {
                            refusal: None,
                            guarded: true,
                            sensitive: self.last_sensitive,
                            retry: None,
                        },
                        mark,
                    );
                    guard.phase = GuardPhase::Running;
                }
            }
            (GuardPhase::Finishing { payload, commit: true }, backend::tag::ERROR_RESPONSE) => {
                // COMMIT failed (a deferred constraint, say): in autocommit
                // the statement itself would have failed with this error.
                payload.clear();
                self.seam.forward(backend::tag::ERROR_RESPONSE, message, payload);
            }
            (GuardPhase::Finishing { payload, .. }, backend::tag::READY_FOR_QUERY) => {
                let payload = std::mem::take(payload);
                self.guard = None;
                self.to_client.extend_from_slice(&payload);
                self.to_client.extend_from_slice(message);
            }
            // CommandComplete of BEGIN / COMMIT / ROLLBACK, notices.
            _ => {}
        }
    }

    /// A Query or Parse that could not be decoded. Text that is not UTF-8 is
    /// refused like a policy decision (the session goes on); a message whose
    /// structure is broken ends the session.
    fn undecodable(&mut self, err: DecodeError, what: &str) -> Result<Box<ErrorFields>, Stop> {
        match err {
            DecodeError::NotUtf8 { .. } => {
                self.counters.refused += 1;
                Ok(Box::new(
                    ErrorFields::new(Severity::Error, "22021", format!("statement refused: {err}"))
                        .with_hint("set client_encoding to UTF8"),
                ))
            }
            err => Err(Stop::Client(ErrorFields::new(
                Severity::Fatal,
                "08P01",
                format!("malformed {what} message: {err}"),
            ))),
        }
    }

    /// Processes every complete backend message buffered, streaming oversized
    /// ones through when the seam allows.
    fn on_server_data(&mut self) -> Result<(), Stop> {
        let mut buf = std::mem::take(&mut self.server_in);
        let mut offset = 0;
        let result = loop {
            if self.server_streaming > 0 {
                let n = self.server_streaming.min(buf.len() - offset);
                self.to_client.extend_from_slice(&buf[offset..offset + n]);
                offset += n;
                self.server_streaming -= n;
                if self.server_streaming > 0 {
                    break Ok(());
                }
                continue;
            }
            let rest = &buf[offset..];
            let header = match codec::peek_header(rest, i32::MAX as usize) {
                Ok(Some(header)) => header,
                Ok(None) => break Ok(()),
                Err(err) => break Err(Stop::Server(format!("invalid message from upstream: {err}"))),
            };
            let total = header.total_len();
            if rest.len() < total {
                if total > STREAM_THRESHOLD {
                    if self.seam.start_streaming(header.tag) {
                        self.pending.on_backend(header.tag);
                        self.to_client.extend_from_slice(rest);
                        self.server_streaming = total - rest.len();
                        offset = buf.len();
                    } else if total > self.ctx.max_message_size {
                        break Err(Stop::Server(format!(
                            "upstream message type {} of {total} bytes is over the limit of {} bytes",
                            printable(header.tag),
                            self.ctx.max_message_size
                        )));
                    }
                }
                break Ok(());
            }
            if let Err(stop) = self.on_backend(header.tag, &rest[..total]) {
                break Err(stop);
            }
            offset += total;
        };
        buf.advance(offset);
        if self.server_streaming == 0
            && let Ok(Some(header)) = codec::peek_header(&buf, i32::MAX as usize)
            && buf.len() < header.total_len()
            && header.total_len() <= STREAM_THRESHOLD
        {
            buf.reserve(header.total_len() - buf.len());
        }
        self.server_in = buf;
        self.record_finished();
        self.apply_resolved();
        for used in self.pending.take_unused_retries() {
            self.give_back_retry(Some(used));
        }
        result
    }

    /// What the server made of Parses, Binds and Closes the gateway
    /// follows: once it confirmed one, what was remembered about earlier
    /// statements and portals of that name goes; one it rejected or skipped
    /// leaves its portal name as it was ([`Proxy::rebind`]).
    fn apply_resolved(&mut self) {
        let mut resolved = std::mem::take(&mut self.resolved);
        self.pending.take_resolved(&mut resolved);
        for (confirm, done) in resolved.drain(..) {
            if confirm.portal {
                if done {
                    self.portal_grants.confirmed(&confirm.statement, confirm.seq);
                }
                if !self.rebinds.is_empty() {
                    self.resolve_rebind(&confirm, done);
                }
            } else {
                if done {
                    self.grant_bound.confirmed(&confirm.statement, confirm.seq);
                    self.needs_approval.confirmed(&confirm.statement, confirm.seq);
                    self.statement_limits.confirmed(&confirm.statement, confirm.seq);
                    self.statement_sensitive.confirmed(&confirm.statement, confirm.seq);
                }
                if let Some(known) = self.statement_texts.get_mut(&confirm.statement)
                    && !known.resolved(confirm.seq, done)
                {
                    self.statement_texts.remove(&confirm.statement);
                }
            }
        }
        self.resolved = resolved;
    }

    /// Whether a portal may return values of masked columns: as bound,
    /// unless SQL declared or closed a cursor since (it may have replaced
    /// the portal under the same name), or if it is not known.
    /// (SQL cannot name the unnamed portal: a cursor never takes it.)
    fn portal_is_sensitive(&self, name: &str) -> bool {
        (self.sql_cursors && !name.is_empty()) || self.portal_sensitive.get(name).copied().unwrap_or(true)
    }

    /// Whether a prepared statement may show values masked by rule in its
    /// expression columns: any Parse of its name not yet replaced said so,
    /// or the gateway knows nothing of it.
    fn statement_is_sensitive(&self, name: &str) -> bool {
        let mut facts = self.statement_sensitive.get(name).peekable();
        facts.peek().is_none() || facts.any(|&sensitive| sensitive)
    }

    /// Whether the gateway knows a portal by name (for the trail, or by its
    /// row limit): a Bind or Close of one of them is a [`Rebind`].
    fn knows_portals(&self) -> bool {
        !self.portal_texts.is_empty() || !self.portal_limits.is_empty()
    }

    /// Before a Bind or Close of `portal` changes what the gateway knows
    /// of a portal of that name: keeps what it knew until the server
    /// answers, and numbers the message for that answer ([`Confirm`]).
    /// `None` when it knew nothing of the name, and no earlier message
    /// about it waits for its answer (the last [`Rebind`] of a name is
    /// always its last Bind or Close).
    fn rebind(&mut self, portal: &str) -> Option<u64> {
        let text = self.portal_texts.entry(portal);
        let limit = self.portal_limits.entry(portal);
        if text.is_none() && limit.is_none() && !self.rebinds.iter().any(|r| r.portal == portal) {
            return None;
        }
        self.message_seq += 1;
        self.rebinds.push(Rebind {
            portal: portal.to_string(),
            seq: self.message_seq,
            batch: self.pending.batch(),
            text,
            limit,
        });
        Some(self.message_seq)
    }

    /// The server answered a [`Rebind`]'s message: carried out (`done`),
    /// what it put in place stands; rejected or skipped, the portal of
    /// that name is the one before it, unless a later Bind of the name,
    /// still unanswered, replaced what this one put in place: then that one
    /// replaced the portal before.
    fn resolve_rebind(&mut self, confirm: &Confirm, done: bool) {
        let Some(at) = self.rebinds.iter().position(|r| r.seq == confirm.seq) else {
            return;
        };
        let rebind = self.rebinds.remove(at);
        if done {
            return;
        }
        match self.rebinds[at..].iter_mut().find(|r| r.portal == rebind.portal) {
            Some(later) => {
                later.text = rebind.text;
                later.limit = rebind.limit;
            }
            None => {
                self.portal_texts.restore(&rebind.portal, rebind.text);
                self.portal_limits.restore(&rebind.portal, rebind.limit);
            }
        }
    }

    /// One complete backend message (header included).
    fn on_backend(&mut self, message_tag: u8, message: &[u8]) -> Result<(), Stop> {
        let body = &message[HEADER_LEN..];
        if message_tag == backend::tag::ROW_DESCRIPTION {
            let sensitive = self.pending.front_sensitive();
            self.seam.describe(message, sensitive);
            if self.ctx.auditor.is_some() {
                self.result_columns = self.columns(body);
            }
        }
        if matches!(
            message_tag,
            backend::tag::ERROR_RESPONSE | backend::tag::NOTICE_RESPONSE
        ) && self.seam.has_rules()
        {
            // PostgreSQL echoes values in messages (`invalid input syntax
            // for type integer: "..."`): a statement over masked columns
            // gets its SQLSTATE, not the text.
            let sensitive = self.pending.front_sensitive();
            self.seam.withhold_next_message(sensitive);
        }
        if self.ctx.auditor.is_some() {
            match message_tag {
                backend::tag::COMMAND_COMPLETE => {
                    self.piece_rows = 0;
                    self.pending.note_result(std::mem::take(&mut self.result_columns));
                    if let Some((_, rows)) = command_count(body) {
                        self.pending.note_rows(rows);
                    }
                }
                backend::tag::DATA_ROW => self.piece_rows += 1,
                backend::tag::PORTAL_SUSPENDED => {
                    let rows = std::mem::take(&mut self.piece_rows);
                    if let Some(mut mark) = self.pending.suspend_front() {
                        *mark.rows.get_or_insert(0) += rows;
                        if mark.continues {
                            self.continue_portal(mark, false);
                        } else {
                            // Later Executes of the portal get no
                            // RowDescription: the first piece's columns are
                            // the statement's.
                            mark.columns = std::mem::take(&mut self.result_columns);
                            mark.suspended = true;
                            self.suspend(mark);
                        }
                    }
                }
                backend::tag::NO_DATA => self.result_columns = None,
                backend::tag::ERROR_RESPONSE => {
                    self.piece_rows = 0;
                    // Rows it returned before failing left the gateway.
                    self.pending.note_result(std::mem::take(&mut self.result_columns));
                    if let Ok(error) = ReceivedError::decode(body) {
                        self.pending.note_error(error.code);
                    }
                }
                // What a Describe without an Execute described goes no
                // further than its batch.
                backend::tag::READY_FOR_QUERY => {
                    self.piece_rows = 0;
                    self.result_columns = None;
                }
                _ => {}
            }
        }
        if message_tag == backend::tag::ERROR_RESPONSE && self.pending.error_skips_to_unsent_sync() {
            self.discarding = true;
            // A statement held now came after the failed message: the
            // server would skip it whatever approvers decide.
            self.held_skipped();
        }
        let owner = self.pending.on_backend(message_tag);
        if message_tag == backend::tag::ERROR_RESPONSE
            && self.guard.is_some()
            && !matches!(owner, Owner::Guard | Owner::Internal)
            && !self.pending.owes_guard()
        {
            self.guard_skipped();
        }
        // What the gateway tracks whoever the message is for.
        match message_tag {
            backend::tag::READY_FOR_QUERY => {
                self.seam.observe(message_tag, message);
                self.tx_status = backend::decode_ready_for_query(body)
                    .map_err(|err| Stop::Server(format!("invalid ReadyForQuery from upstream: {err}")))?;
                if self.tx_status == TxStatus::Idle {
                    // No transaction: no portal either.
                    self.end_suspended(None);
                    let answered = self.pending.batches_answered();
                    self.portal_texts.transaction_ended(answered);
                    self.portal_sensitive.transaction_ended(answered);
                    self.portal_limits.transaction_ended(answered);
                    if !self.rebinds.is_empty() {
                        self.rebinds.retain(|r| r.batch >= answered);
                    }
                }
            }
            backend::tag::ERROR_RESPONSE => {
                if self.seam.has_rules() {
                    // Parses and Binds after an error were discarded: the
                    // unnamed statement and the portals may be older ones
                    // than the flags say. Assume the worst until re-bound.
                    self.statement_sensitive.forget("");
                    self.statement_sensitive.add("", self.message_seq, true);
                    self.portal_sensitive.clear();
                    self.pending.mark_sensitive();
                }
                if let Ok(error) = ReceivedError::decode(body)
                    && matches!(error.severity, "FATAL" | "PANIC")
                {
                    self.server_said_fatal = true;
                }
            }
            backend::tag::PARAMETER_STATUS => {
                let status = ParameterStatus::decode(body)
                    .map_err(|err| Stop::Server(format!("invalid ParameterStatus from upstream: {err}")))?;
                if status.name == "client_encoding" && !encoding_is_safe(status.value) {
                    // Statements would no longer mean what the gateway reads.
                    return Err(Stop::Client(ErrorFields::new(
                        Severity::Fatal,
                        "22023",
                        format!(
                            "client_encoding was set to \"{}\", which Sluice does not support: the session ends; reconnect and keep UTF8",
                            status.value
                        ),
                    )));
                }
                if status.name == "standard_conforming_strings" {
                    self.gate_session.standard_conforming_strings = status.value == "on";
                }
            }
            backend::tag::NO_DATA
            | backend::tag::COPY_OUT_RESPONSE
            | backend::tag::COPY_BOTH_RESPONSE
            | backend::tag::COPY_DONE => self.seam.observe(message_tag, message),
            backend::tag::AUTHENTICATION | backend::tag::BACKEND_KEY_DATA => {
                return Err(Stop::Server(format!(
                    "unexpected message type {} from upstream after login",
                    printable(message_tag)
                )));
            }
            _ => {}
        }
        // A session with the unmask grant sees clear values; the trail's
        // readers may not: its rows are not sampled at all (the detectors
        // alone would let rule-masked columns through).
        let sample = message_tag == backend::tag::DATA_ROW
            && owner == Owner::Client
            && self.seam.masking()
            && self.ctx.audit_sample_rows > 0
            && self.ctx.auditor.is_some();
        let sample_from = self.to_client.len();
        match owner {
            Owner::Client => self.seam.forward(message_tag, message, &mut self.to_client),
            Owner::Refusal(refusal) => refusal.encode(&mut self.to_client),
            Owner::Guard => self.guard_message(message_tag, message),
            Owner::Internal => self.internal_message(message_tag, message),
        }
        if message_tag == backend::tag::ERROR_RESPONSE {
            self.seam.observe(message_tag, message);
        }
        if sample
            && let Some(rows) = self.pending.sample(self.ctx.audit_sample_rows)
            && let Some(body) = self.to_client.get(sample_from + HEADER_LEN..)
        {
            if rows.capacity() == 0 {
                std::mem::swap(rows, &mut self.spare_sample);
            }
            sample_row(body, rows);
        }
        if let Some(err) = self.seam.take_failure() {
            // Fail closed: what cannot be read cannot be masked.
            tracing::warn!(error = %err, "ending session: a result could not be masked");
            return Err(Stop::Client(ErrorFields::new(
                Severity::Fatal,
                "XX000",
                format!("the gateway could not mask a result ({err}); the session ends rather than pass it on"),
            )));
        }
        Ok(())
    }

    fn queue_fatal(&mut self, error: ErrorFields) {
        // In the middle of a streamed message an error would corrupt the
        // stream; the client then only sees the connection close.
        if self.server_streaming == 0 {
            error.encode(&mut self.to_client);
        }
    }

    async fn stop(&mut self, stop: Stop) -> SessionEnd {
        match stop {
            Stop::Client(error) => {
                let reason = error.message.clone();
                tracing::warn!(code = error.code, %reason, "ending session: client protocol error");
                self.queue_fatal(error);
                frontend::encode_terminate(&mut self.to_server);
                self.close_quietly(true).await;
                SessionEnd::ClientProtocol(reason)
            }
            Stop::Server(reason) => {
                tracing::warn!(%reason, "ending session: upstream failed");
                self.queue_fatal(ErrorFields::new(
                    Severity::Fatal,
                    "08006",
                    format!("lost the connection to target \"{}\"", self.ctx.target),
                ));
                self.close_quietly(false).await;
                SessionEnd::ServerFailed(reason)
            }
            Stop::ClientIo(err) => {
                frontend::encode_terminate(&mut self.to_server);
                self.close_quietly(false).await;
                SessionEnd::ClientIo(err.to_string())
            }
            Stop::Audit(reason) => {
                tracing::error!(%reason, "ending session: the audit trail cannot record its statements");
                // What waited for the trail never reaches the server.
                if let Some(hold) = self.audit_hold.take() {
                    self.to_server.truncate(hold);
                }
                self.audit_wait = None;
                self.queue_fatal(
                    ErrorFields::new(
                        Severity::Fatal,
                        "58000",
                        "the gateway's audit trail could not record your statement, so it did not run; the session ends",
                    )
                    .with_hint("reconnect once the trail is available again; the gateway's log says why it is not"),
                );
                frontend::encode_terminate(&mut self.to_server);
                self.close_quietly(true).await;
                SessionEnd::AuditFailed(reason)
            }
        }
    }

    /// The token expired, or the time it left a transaction ran out.
    /// Returns why the session ends now, or `None` while an open
    /// transaction may still finish.
    fn on_token_expired(&mut self) -> Option<String> {
        let expiry = self.ctx.token_expiry?;
        let at = chrono::DateTime::<chrono::Utc>::from(expiry.at).format("%Y-%m-%d %H:%M:%S UTC");
        if self.token_expired {
            return Some(if self.between_transactions() {
                format!("the token expired at {at}; the session ended after its transaction")
            } else {
                format!(
                    "the token expired at {at}, and the transaction did not finish within {}s",
                    expiry.grace.as_secs()
                )
            });
        }
        if expiry.mode == crate::config::OnTokenExpiry::End || self.between_transactions() {
            return Some(format!("the token expired at {at}"));
        }
        self.token_expired = true;
        self.expiry_timer = Some(Box::pin(tokio::time::sleep(expiry.grace)));
        tracing::info!(
            grace_s = expiry.grace.as_secs(),
            "token expired: the open transaction may finish first"
        );
        let notice = ErrorFields::new(
            Severity::Warning,
            "01000",
            format!(
                "your token expired at {at}: finish this transaction within {}s; the session then ends",
                expiry.grace.as_secs()
            ),
        )
        .with_hint("sign in again (sluice login) and reconnect");
        let notice_bytes = self.held_notice.get_or_insert_with(BytesMut::new);
        notice.encode(notice_bytes);
        None
    }

    /// Ends the session because its token expired, telling the client why.
    async fn end_expired(&mut self, detail: String) -> SessionEnd {
        tracing::info!(%detail, "session ended: its token expired");
        // As for a kill: what still waits for the trail was never sent,
        // and stays unsent.
        if let Some(hold) = self.audit_hold.take() {
            self.to_server.truncate(hold);
            self.audit_wait = None;
        }
        self.queue_fatal(
            ErrorFields::new(Severity::Fatal, "28000", format!("terminating connection: {detail}"))
                .with_hint("sign in again (sluice login) and reconnect"),
        );
        frontend::encode_terminate(&mut self.to_server);
        self.close_quietly(true).await;
        SessionEnd::TokenExpired(detail)
    }

    async fn shut_down(&mut self, message: &str) -> SessionEnd {
        self.queue_fatal(ErrorFields::new(
            Severity::Fatal,
            "57P01",
            format!("terminating connection: {message}"),
        ));
        frontend::encode_terminate(&mut self.to_server);
        self.close_quietly(true).await;
        SessionEnd::Shutdown
    }

    /// Writes what is queued on both sides, then closes both, within
    /// [`CLOSE_TIMEOUT`]: a client that stopped reading cannot hold the task.
    /// `abandon`: the gateway ends the session on its own (a kill, the
    /// shutdown deadline, an expired token, a protocol violation, a trail
    /// that cannot record), so while the server still owes answers its
    /// backend is sent a CancelRequest at the same time: PostgreSQL does
    /// not notice a closed connection while a statement runs. One cancel
    /// stops the statement running then; what the client pipelined behind
    /// it that the server already has still runs (allowed and recorded).
    /// A client that goes away is left as PostgreSQL leaves it.
    async fn close_quietly(&mut self, abandon: bool) {
        let cancel =
            (abandon && (!self.pending.is_empty() || self.server_streaming > 0)).then_some(self.ctx.upstream_cancel);
        let cancel = async move {
            let Some(cancel) = cancel else { return };
            let backend_pid = cancel.key.process_id;
            match cancel.send().await {
                Ok(()) => tracing::info!(backend_pid, "sent a cancel for what the session may have left running"),
                Err(err) => tracing::warn!(error = %err, "cannot cancel what the session may have left running"),
            }
        };
        tokio::join!(self.close_both(), cancel);
    }

    async fn close_both(&mut self) {
        // Statements held for the trail go only once it has them.
        if let Some(wait) = self.audit_wait.take() {
            let durable = matches!(tokio::time::timeout(CLOSE_TIMEOUT, wait).await, Ok(Ok(())));
            if !durable && let Some(hold) = self.audit_hold {
                self.to_server.truncate(hold);
                frontend::encode_terminate(&mut self.to_server);
            }
        }
        self.audit_hold = None;
        let drain = async {
            let server = async {
                let _ = write_all_and_close(&mut self.server, &mut self.to_server).await;
            };
            let client = async {
                let _ = write_all_and_close(&mut self.client, &mut self.to_client).await;
            };
            tokio::join!(server, client);
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
    }
}

async fn write_all_and_close(stream: &mut Stream, buf: &mut BytesMut) -> io::Result<()> {
    while !buf.is_empty() {
        stream.write_buf(buf).await?;
    }
    stream.flush().await?;
    stream.shutdown().await
}

/// Writes from the front of `buf` with one plain write (`send`): the buffer
/// is contiguous, so a vectored write would only add the iovec handling.
fn poll_write_all(stream: &mut Stream, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
    let len = buf.len();
    poll_write_front(stream, cx, buf, len)
}

/// Like [`poll_write_all`], for the first `limit` bytes of `buf` only.
fn poll_write_front(
    stream: &mut Stream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    limit: usize,
) -> Poll<io::Result<usize>> {
    let result = Pin::new(stream).poll_write(cx, &buf[..limit.min(buf.len())]);
    if let Poll::Ready(Ok(n)) = result {
        buf.advance(n);
    }
    result
}

fn reserve_for_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// A statement's text as the trail keeps it: what the content detectors
/// find in it (an email in a WHERE clause, a card number in an INSERT) is
/// masked, whatever the session's own masking.
fn audit_text(sql: &str) -> String {
    match crate::mask::scrub(sql.as_bytes(), crate::mask::DetectorSet::ALL) {
        Some(scrubbed) => String::from_utf8_lossy(&scrubbed).into_owned(),
        None => sql.to_string(),
    }
}

impl Outcome {
    /// The error for a statement that does not run: its refusal, or, where
    /// it cannot be held (a Parse, a FunctionCall), the message that says
    /// it needs approval. Only called on those two.
    fn into_refusal(self) -> Box<ErrorFields> {
        match self {
            Outcome::Refuse(error) => error,
            Outcome::Hold(hold) => refusal_error(hold.request.refusal),
            Outcome::Forward | Outcome::Guard(_) => refusal_error(Refusal {
                code: "XX000",
                message: "statement refused: the gateway lost track of its decision".into(),
                hint: None,
            }),
        }
    }
}

/// A gate refusal as the error the client gets.
fn refusal_error(refusal: Refusal) -> Box<ErrorFields> {
    let mut error = ErrorFields::new(Severity::Error, refusal.code, refusal.message);
    error.hint = refusal.hint;
    Box::new(error)
}

/// Whether a statement changes search_path (then unqualified names may
/// live anywhere, and the gate must be told once it runs).
fn changes_search_path(classification: Option<&crate::policy::Classification>) -> bool {
    classification.is_some_and(|c| {
        c.statements
            .iter()
            .any(|s| s.features.contains(crate::policy::Feature::SearchPath))
    })
}

/// The trail's text of a portal a Bind (`bind_body`) binds to a statement
/// (`text`): the statement's text and, when the Bind has any, its parameter
/// values as approvers see them ([`bind_parameters`]: what the detectors
/// find masked, long values cut, binary ones described), so that the trail
/// says what ran as it does for a simple Query's literals.
fn bound_text(text: &Arc<AuditText>, bind_body: &[u8]) -> Arc<AuditText> {
    let mut bound = String::with_capacity(text.text.len() + 64);
    bound.push_str(&text.text);
    if !push_bind_parameters(bind_body, &mut bound) {
        return text.clone();
    }
    Arc::new(AuditText {
        text: bound,
        statements: text.statements.clone(),
    })
}

/// A Bind's parameter values, for the approvers who decide on it: text
/// values with the content detectors' findings masked and long ones cut,
/// binary ones described. Empty without parameters.
fn bind_parameters(body: &[u8]) -> String {
    let mut out = String::new();
    push_bind_parameters(body, &mut out);
    out
}

/// [`bind_parameters`], appended to `out`; false, and nothing appended,
/// without parameters. Written straight into `out`: the trail makes one
/// per Execute of a statement with parameters.
fn push_bind_parameters(body: &[u8], out: &mut String) -> bool {
    let start = out.len();
    match write_bind_parameters(body, out) {
        Ok(0) => false,
        Ok(_) => true,
        Err(_) => {
            out.truncate(start);
            out.push_str("\n-- parameters: (unreadable)");
            true
        }
    }
}

fn write_bind_parameters(body: &[u8], out: &mut String) -> Result<usize, DecodeError> {
    use std::fmt::Write as _;
    let mut cur = Cursor::new(body);
    cur.cstr("portal name")?;
    cur.cstr("statement name")?;
    let formats = cur.count16("format count")?;
    let codes = cur.bytes(2 * formats, "format codes")?;
    let code = |index: usize| {
        codes
            .get(2 * index..2 * index + 2)
            .map(|c| i16::from_be_bytes([c[0], c[1]]))
    };
    let count = cur.count16("parameter count")?;
    if count > 0 {
        out.push_str("\n-- parameters:");
    }
    for index in 0..count {
        let binary = match formats {
            0 => false,
            1 => code(0) == Some(1),
            _ => code(index) == Some(1),
        };
        let value = cur.nullable_value("parameter")?;
        let _ = write!(out, "{} ${} = ", if index == 0 { "" } else { "," }, index + 1);
        match value {
            None => out.push_str("NULL"),
            Some(value) => push_parameter(value, binary, out),
        }
    }
    Ok(count)
}

/// One parameter value as approvers and the trail see it. A binary value
/// that reads as text (text types are sent as their UTF-8 bytes) is shown,
/// and masked, as text; short others (integers, timestamps, uuids) in hex.
/// Eight bytes or fewer are shown in hex whatever they read as: an int8
/// 0x3030303030303035 reads as '00000005' but is about 3.5e18 to the
/// server, and approvers must not be told 5. (A short value the detectors
/// flag, such as an email, is shown masked and without its bytes.)
fn push_parameter(value: &[u8], binary: bool, out: &mut String) {
    use std::fmt::Write as _;
    let push_hex = |out: &mut String| {
        for byte in value {
            let _ = write!(out, "{byte:02x}");
        }
    };
    let push_quoted = |out: &mut String, text: &str| {
        out.push('\'');
        for (n, part) in text.split('\'').enumerate() {
            if n > 0 {
                out.push_str("''");
            }
            out.push_str(part);
        }
        out.push('\'');
    };
    let printable = std::str::from_utf8(value)
        .is_ok_and(|t| !t.is_empty() && t.chars().all(|c| !c.is_control() || c.is_whitespace()));
    if binary && value.len() <= 8 {
        if !printable {
            out.push_str("(binary 0x");
            push_hex(out);
            out.push(')');
            return;
        }
        match crate::mask::scrub(value, crate::mask::DetectorSet::ALL) {
            Some(masked) => {
                let _ = write!(out, "(binary, {} bytes, as text ", value.len());
                push_quoted(out, &String::from_utf8_lossy(&masked));
            }
            None => {
                out.push_str("(binary 0x");
                push_hex(out);
                out.push_str(", as text ");
                push_quoted(out, &String::from_utf8_lossy(value));
            }
        }
        out.push(')');
        return;
    }
    if binary && !printable {
        if value.len() <= 16 {
            out.push_str("(binary 0x");
            push_hex(out);
            out.push(')');
        } else {
            let _ = write!(out, "(binary, {} bytes)", value.len());
        }
        return;
    }
    let scrubbed = crate::mask::scrub(value, crate::mask::DetectorSet::ALL);
    let text = String::from_utf8_lossy(scrubbed.as_deref().unwrap_or(value));
    if text.len() > SAMPLE_VALUE_MAX {
        let end = (0..=SAMPLE_VALUE_MAX)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        push_quoted(out, &format!("{}... ({} bytes)", &text[..end], text.len()));
    } else {
        push_quoted(out, &text);
    }
}

/// A completion's serialization buffer larger than this is not kept.
const SCRATCH_KEPT: usize = 16 << 10;

/// Sampled values longer than this are cut.
const SAMPLE_VALUE_MAX: usize = 200;

/// Functions that keep a value in the server for later statements to read:
/// advisory locks (their keys show in pg_locks) and setval (currval).
fn keeps_a_value(function: &str) -> bool {
    let function = function.to_ascii_lowercase();
    function.starts_with("pg_advisory") || function.starts_with("pg_try_advisory") || function == "setval"
}

/// A DataRow body (as the client received it, masked) as text values for
/// the trail: the detectors run on each value again, whatever the session's
/// masking (the trail's readers may not hold the unmask grant), binary
/// values are described, long ones cut. Added to `rows`; nothing added
/// if it does not read.
fn sample_row(body: &[u8], rows: &mut crate::audit::SampleRows) {
    let mut cur = Cursor::new(body);
    let Ok(count) = cur.count16("field count") else { return };
    let mut row = rows.row();
    for _ in 0..count {
        // Dropped unfinished, the row leaves nothing.
        let Ok(value) = cur.nullable_value("field") else { return };
        let Some(value) = value else {
            row.value(None);
            continue;
        };
        let scrubbed = crate::mask::scrub(value, crate::mask::DetectorSet::ALL);
        let value = scrubbed.as_deref().unwrap_or(value);
        match std::str::from_utf8(value) {
            Ok(text) if text.len() > SAMPLE_VALUE_MAX => {
                let mut end = SAMPLE_VALUE_MAX;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                row.value(Some(&format!("{}... ({} bytes)", &text[..end], text.len())));
            }
            Ok(text) => row.value(Some(text)),
            Err(_) => row.value(Some(&format!("({} bytes of binary)", value.len()))),
        }
    }
    row.finish();
}

/// Each statement of a classified text, as the trail records it.
fn audit_records(
    classification: Option<&crate::policy::Classification>,
    tags: &[crate::config::TagRule],
) -> Vec<StatementRecord> {
    classification
        .map(|c| c.statements.iter().map(|s| StatementRecord::of(s, tags)).collect())
        .unwrap_or_default()
}

/// The first name (a NUL-terminated string) of a message body.
fn first_name<'m>(body: &'m [u8], field: &'static str) -> Result<&'m str, Stop> {
    Cursor::new(body).cstr(field).map_err(|err| {
        Stop::Client(ErrorFields::new(
            Severity::Fatal,
            "08P01",
            format!("malformed message: {err}"),
        ))
    })
}

/// A statement or portal name in an extended-protocol message that the
/// gateway cannot follow as the server does, what it names and why.
/// PostgreSQL keys both by their first 63 bytes
/// ([`frontend::MAX_NAME_BYTES`]), so two longer names that share them are
/// one statement (or portal) to the server and two to the gateway, which
/// follows names for row limits, approvals, grants and masking; and it
/// converts a name to the server's encoding, where one outside ASCII may
/// grow past them. No driver makes such a name. One without its terminator
/// is left to the decoder.
fn unfollowable_name(message_tag: u8, body: &[u8]) -> Option<(&'static str, &'static str)> {
    let name = |from: usize| {
        let rest = body.get(from..)?;
        rest.iter().position(|&b| b == 0).map(|len| &rest[..len])
    };
    let (first, what) = match message_tag {
        fe::PARSE => (0, "prepared statement"),
        fe::BIND | fe::EXECUTE => (0, "portal"),
        fe::CLOSE | fe::DESCRIBE if body.first() == Some(&b'P') => (1, "portal"),
        fe::CLOSE | fe::DESCRIBE => (1, "prepared statement"),
        _ => return None,
    };
    let why = |name: &[u8]| {
        if name.len() > frontend::MAX_NAME_BYTES {
            Some("is longer than 63 bytes")
        } else if !name.is_ascii() {
            Some("is not ASCII")
        } else {
            None
        }
    };
    let portal = name(first)?;
    if let Some(why) = why(portal) {
        return Some((what, why));
    }
    if message_tag == fe::BIND {
        return why(name(first + portal.len() + 1)?).map(|why| ("prepared statement", why));
    }
    None
}

/// Whether `haystack` contains `needle` (ASCII, any case).
fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// The portal and statement names of a Bind body.
fn bind_names(body: &[u8]) -> Result<(&str, &str), Stop> {
    let mut cursor = Cursor::new(body);
    let malformed = |err: DecodeError| {
        Stop::Client(ErrorFields::new(
            Severity::Fatal,
            "08P01",
            format!("malformed Bind message: {err}"),
        ))
    };
    let portal = cursor.cstr("portal name").map_err(malformed)?;
    let statement = cursor.cstr("statement name").map_err(malformed)?;
    Ok((portal, statement))
}

/// Writes the greeting after login: the client sees the upstream's parameter
/// statuses and real process id, with the gateway's own cancel key.
pub(crate) fn encode_greeting(greeting: &[u8], key: backend::BackendKeyData, status: TxStatus, out: &mut BytesMut) {
    backend::encode_auth_ok(out);
    out.extend_from_slice(greeting);
    key.encode(out);
    backend::encode_ready_for_query(status, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Bind body of unnamed portal and statement, with these parameter
    /// formats and values.
    fn bind_body(formats: &[i16], values: &[&[u8]]) -> Vec<u8> {
        let mut body = b"\0\0".to_vec();
        body.extend_from_slice(&(formats.len() as i16).to_be_bytes());
        for format in formats {
            body.extend_from_slice(&format.to_be_bytes());
        }
        body.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for value in values {
            body.extend_from_slice(&(value.len() as i32).to_be_bytes());
            body.extend_from_slice(value);
        }
        body.extend_from_slice(&0i16.to_be_bytes());
        body
    }

    #[test]
    fn approvers_see_short_binary_parameters_as_bytes_whatever_they_read_as() {
        // A probe bound an int8 as the bytes of "00000005": the server reads
        // about 3.5e18, and the request said '00000005'.
        assert_eq!(
            bind_parameters(&bind_body(&[1], &[b"00000005"])),
            "\n-- parameters: $1 = (binary 0x3030303030303035, as text '00000005')"
        );
        assert_eq!(
            bind_parameters(&bind_body(&[1], &[&5i64.to_be_bytes()])),
            "\n-- parameters: $1 = (binary 0x0000000000000005)"
        );
        // A short value a detector flags keeps neither its text nor its bytes.
        assert_eq!(
            bind_parameters(&bind_body(&[1], &[b"x@ab.io"])),
            "\n-- parameters: $1 = (binary, 7 bytes, as text '****@ab.io')"
        );
        // Text format, and longer binary text, read as text (and masked).
        assert_eq!(
            bind_parameters(&bind_body(&[0, 1], &[b"5", b"card 4111111111111111"])),
            "\n-- parameters: $1 = '5', $2 = 'card ************1111'"
        );
    }

    #[test]
    fn parameters_are_described_whatever_their_shape() {
        let long = "x".repeat(SAMPLE_VALUE_MAX + 10);
        let mut body = bind_body(
            &[1, 0, 1, 1, 0],
            &[&[0xff; 12], b"it's", &[0u8; 17], &[0xfe; 9], long.as_bytes()],
        );
        // A sixth value, NULL: length -1 and no bytes, before the result
        // formats; the value count says six.
        let at = body.len() - 2;
        body.splice(at..at, (-1i32).to_be_bytes());
        body[2 + 2 + 2 * 5..2 + 2 + 2 * 5 + 2].copy_from_slice(&6i16.to_be_bytes());
        assert_eq!(
            bind_parameters(&body),
            format!(
                "\n-- parameters: $1 = (binary 0xffffffffffffffffffffffff), $2 = 'it''s', $3 = (binary, 17 bytes), \
                 $4 = (binary 0xfefefefefefefefefe), $5 = '{}... ({} bytes)', $6 = NULL",
                &long[..SAMPLE_VALUE_MAX],
                long.len()
            )
        );
        // None: nothing; cut short: unreadable, and nothing half-written.
        assert_eq!(bind_parameters(&bind_body(&[], &[])), "");
        let mut text = "SELECT $1".to_string();
        let short = bind_body(&[0], &[b"abc"]);
        assert!(push_bind_parameters(&short[..short.len() - 4], &mut text));
        assert_eq!(text, "SELECT $1\n-- parameters: (unreadable)");
    }

    #[test]
    fn portals_are_forgotten_with_the_transaction_they_were_bound_in() {
        let mut portals = Portals::default();
        portals.bind("a", 0, 'a');
        portals.bind("b", 1, 'b');
        // Pipelined behind the batch being answered.
        portals.bind("c", 2, 'c');
        // Executing keeps the batch a portal was bound in.
        assert_eq!(portals.replace("b", 5, 'B'), Some('b'));
        assert_eq!(portals.replace("d", 2, 'd'), None);
        portals.transaction_ended(2);
        assert_eq!(portals.get("a"), None);
        assert_eq!(portals.get("b"), None);
        assert_eq!(portals.get("c"), Some(&'c'));
        assert_eq!(portals.get("d"), Some(&'d'));
        // Bound again under an old name: a portal of its own batch.
        portals.bind("a", 3, 'A');
        portals.transaction_ended(3);
        assert_eq!((portals.get("a"), portals.get("c")), (Some(&'A'), None));
        assert_eq!(portals.remove("a"), Some('A'));
        assert!(portals.by_name.is_empty());
    }

    #[test]
    fn a_sessions_recent_classifications_keep_their_audit_records() {
        let options = crate::policy::ClassifyOptions::default();
        let classified = |sql: &str| Arc::new(crate::policy::classify(sql, &options));
        let mut records = AuditRecords::default();
        let read = classified("SELECT * FROM accounts");
        let first = records.of(Some(&read), &[]);
        assert_eq!(first.records().len(), 1);
        assert_eq!(first.records()[0].command, "SELECT");
        assert_eq!(first.records()[0].relations, ["accounts (read)"]);
        // The same classification (the policy cache's) finds them again.
        assert!(Arc::ptr_eq(&records.of(Some(&read), &[]), &first));
        // Another, even of the same text, has its own.
        let again = classified("SELECT * FROM accounts");
        let other = records.of(Some(&again), &[]);
        assert!(!Arc::ptr_eq(&other, &first));
        assert_eq!(other, first);
        let delete = records.of(Some(&classified("DELETE FROM accounts; SELECT 1")), &[]);
        assert_eq!(
            delete.records().iter().map(|r| r.command.as_str()).collect::<Vec<_>>(),
            ["DELETE", "SELECT"]
        );
        // Only the most recent are kept, the last one used among them.
        let _ = records.of(Some(&read), &[]);
        let many: Vec<_> = (0..AuditRecords::KEPT - 1)
            .map(|n| classified(&format!("SELECT {n} FROM t")))
            .collect();
        for classification in &many {
            let _ = records.of(Some(classification), &[]);
        }
        assert_eq!(records.recent.len(), AuditRecords::KEPT);
        assert!(
            Arc::ptr_eq(&records.of(Some(&read), &[]), &first),
            "used last before the others"
        );
        let _ = records.of(Some(&classified("SELECT 99")), &[]);
        assert!(!records.recent.iter().any(|(seen, _)| Arc::ptr_eq(seen, &again)));
        assert!(records.of(None, &[]).records().is_empty());
    }

    fn data_row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut body = (values.len() as i16).to_be_bytes().to_vec();
        for value in values {
            match value {
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v);
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        body
    }

    #[test]
    fn sampled_rows_pass_the_detectors_and_stay_short() {
        let long = "x".repeat(500);
        let mut rows = crate::audit::SampleRows::default();
        sample_row(
            &data_row(&[
                Some(b"ada.lovelace@example.com"),
                None,
                Some(long.as_bytes()),
                Some(&[0xff, 0x00, 0x01]),
            ]),
            &mut rows,
        );
        let row = &rows.to_rows()[0];
        assert_eq!(row[0].as_deref(), Some("****@example.com"));
        assert_eq!(row[1], None);
        assert!(row[2].as_deref().unwrap().ends_with("... (500 bytes)"));
        assert_eq!(row[3].as_deref(), Some("(3 bytes of binary)"));
        sample_row(&[0, 2, 0], &mut rows);
        assert_eq!(rows.len(), 1, "a broken row is not sampled");
        assert_eq!(rows.to_rows().len(), 1);
    }
}
