//! Which frontend message each backend message answers.
//!
//! Clients pipeline: many messages can be on their way before the first answer
//! comes back. The proxy pushes one [`Expect`] per frontend message that gets an
//! answer, and [`PendingQueue::on_backend`] retires entries as answers arrive,
//! following PostgreSQL's rules: an error in the extended protocol discards
//! everything up to the next Sync; ReadyForQuery ends a simple Query, a Sync or
//! a FunctionCall; Sync and Flush are ignored while COPY FROM STDIN runs.
//!
//! This is what lets the gateway replace the error of a refused statement with
//! its own, and lets the masker (later) know which RowDescription a DataRow
//! belongs to.

use std::collections::VecDeque;
use std::time::Instant;

use crate::approvals::RetryUse;
use crate::protocol::backend::{ErrorFields, tag};

/// A frontend message awaiting its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A simple Query. `refusal` is set when the gateway replaced it with a
    /// statement that fails, and its error must be replaced by this one;
    /// `guarded` when a row-limit guard owns its answer.
    Query {
        refusal: Option<Box<ErrorFields>>,
        guarded: bool,
        /// Its results may carry rule-masked values in expressions.
        sensitive: bool,
        /// The `refuse_and_retry` approval it runs under: given back if
        /// the server skips it ([`PendingQueue::take_unused_retries`]).
        retry: Option<Box<RetryUse>>,
    },
    Parse {
        refusal: Option<Box<ErrorFields>>,
    },
    Bind,
    Describe {
        sensitive: bool,
    },
    Execute {
        guarded: bool,
    },
    Close,
    Sync,
    FunctionCall,
    /// CopyDone or CopyFail from the client: marks where a COPY FROM STDIN
    /// ends in the client's stream. Gets no answer of its own.
    CopyEnd,
    /// A Describe of a portal the gateway sent on its own before an Execute,
    /// so the masker knows the rows' formats: its RowDescription or NoData is
    /// the gateway's. An error it gets is the client's (the Execute would
    /// have failed the same way, and is then discarded by the server).
    InternalDescribe {
        sensitive: bool,
    },
    /// A simple Query the gateway sent on its own (BEGIN, COMMIT, ROLLBACK
    /// around a row-limited write): its answer is the gateway's, not the client's.
    Internal,
}

impl Expect {
    /// A Query the client sent, as it is.
    pub fn query(sensitive: bool) -> Expect {
        Expect::Query {
            refusal: None,
            guarded: false,
            sensitive,
            retry: None,
        }
    }

    /// Whether ReadyForQuery answers it: it ends a batch.
    fn ends_batch(&self) -> bool {
        matches!(
            self,
            Expect::Query { .. } | Expect::Sync | Expect::FunctionCall | Expect::Internal
        )
    }

    fn owner(&self) -> Owner {
        match self {
            Expect::Query { guarded: true, .. } | Expect::Execute { guarded: true } => Owner::Guard,
            Expect::Internal | Expect::InternalDescribe { .. } => Owner::Internal,
            _ => Owner::Client,
        }
    }
}

/// Who a backend message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// The client, through the result seam.
    Client,
    /// The client, but this error replaces the message: it is the error of a
    /// statement the gateway refused.
    Refusal(Box<ErrorFields>),
    /// The row-limit guard of the statement it answers.
    Guard,
    /// The gateway: the answer to a statement it sent itself.
    Internal,
}

/// A result's columns as the trail records them, shared by the session's
/// results of the same shape.
pub type Columns = std::sync::Arc<[crate::audit::ColumnRecord]>;

/// A statement the audit trail recorded, followed until it ends: what its
/// completion event needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// The statement's number in the session's trail.
    pub seq: u64,
    /// Where its event waits for the audit writer, for its completion to
    /// join it.
    pub ticket: Option<crate::audit::Ticket>,
    pub started: Instant,
    /// Rows its CommandCompletes reported.
    pub rows: Option<u64>,
    /// The SQLSTATE of its error.
    pub sqlstate: Option<String>,
    /// It never ran: an earlier message of its batch failed.
    pub skipped: bool,
    /// The columns of its results, in order (shared with the session's
    /// other results of the same shape); `None` for none.
    pub columns: Option<Columns>,
    /// Results that ended (their CommandComplete came).
    pub results: u32,
    /// Its first result rows, for the trail.
    pub sample: crate::audit::SampleRows,
    /// The portal an Execute ran (`None` for other statements).
    pub portal: Option<Box<str>>,
    /// A portal fetched in pieces: an Execute with a row count stopped at
    /// it (PortalSuspended). The proxy keeps the mark until the portal's
    /// last piece: its later Executes count their rows to it
    /// ([`Mark::continues`]); its columns are those of the first piece.
    pub suspended: bool,
    /// The mark of a later Execute of a portal that ran before: no event of
    /// its own; what it fetched counts to the portal's suspended statement.
    pub continues: bool,
    /// For an Execute of the unnamed portal: how many times the client had
    /// bound that portal when it sent it. A piece sent before the portal
    /// was bound again is its portal's last one in flight.
    pub unnamed_binds: u64,
}

impl Mark {
    /// The mark of statement `seq`, starting now.
    pub fn new(seq: u64, ticket: Option<crate::audit::Ticket>) -> Mark {
        Mark {
            seq,
            ticket,
            started: Instant::now(),
            rows: None,
            sqlstate: None,
            skipped: false,
            columns: None,
            results: 0,
            sample: crate::audit::SampleRows::default(),
            portal: None,
            unnamed_binds: 0,
            suspended: false,
            continues: false,
        }
    }

    /// The mark of a later Execute of `portal` ([`Mark::continues`]).
    pub fn continuing(portal: &str) -> Mark {
        Mark {
            portal: Some(portal.into()),
            continues: true,
            ..Mark::new(0, None)
        }
    }
}

/// A Parse, Bind or Close of a name, identified by the order in which the
/// client sent it: once the server confirms it, what the gateway remembered
/// about earlier statements (or portals) of that name can go; once the
/// server rejected or skipped it, what it meant to replace stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirm {
    /// The statement's (or, with `portal`, the portal's) name.
    pub statement: String,
    pub seq: u64,
    pub portal: bool,
}

/// The answers still owed, oldest first.
#[derive(Debug, Default)]
pub struct PendingQueue {
    queue: VecDeque<Expect>,
    /// Beside each entry of `queue`: the audit mark of the statement it
    /// runs (Query, Execute, FunctionCall), if the trail recorded one.
    marks: VecDeque<Option<Box<Mark>>>,
    /// Marks of statements that ended, for the proxy to record.
    finished: Vec<Mark>,
    /// Beside each entry of `queue`: for a Parse, Bind or Close the
    /// gateway follows, the name it replaces or closes, reported once the
    /// server answers it.
    confirms: VecDeque<Option<Confirm>>,
    /// Messages with a [`Confirm`] the server answered since the last
    /// call, in order: confirmed (true), or rejected or skipped (false).
    resolved: Vec<(Confirm, bool)>,
    /// Approvals of Queries the server skipped, for the proxy to give back.
    unused_retries: Vec<RetryUse>,
    /// Whether the server is in COPY FROM STDIN mode.
    copy_in: bool,
    /// Entries that end a batch (see [`PendingQueue::batch`]) pushed so
    /// far, and answered by a ReadyForQuery so far.
    batches_pushed: u64,
    batches_answered: u64,
}

impl PendingQueue {
    pub fn push(&mut self, expect: Expect) {
        self.push_entry(expect, None, None);
    }

    /// Every push: the entry, its mark and its confirmation side by side,
    /// and the batch count.
    fn push_entry(&mut self, expect: Expect, mark: Option<Mark>, confirm: Option<Confirm>) {
        self.batches_pushed += u64::from(expect.ends_batch());
        self.queue.push_back(expect);
        self.marks.push_back(mark.map(Box::new));
        self.confirms.push_back(confirm);
    }

    /// Pushes a Parse, Bind or Close whose success (ParseComplete,
    /// BindComplete, CloseComplete) or failure is reported through
    /// [`PendingQueue::take_resolved`].
    pub fn push_confirmed(&mut self, expect: Expect, confirm: Confirm) {
        self.push_entry(expect, None, Some(confirm));
    }

    /// The batch a message sent now belongs to: the batch that the
    /// `batch() + 1`th ReadyForQuery ends (a Query, a FunctionCall, or the
    /// extended protocol's messages up to their Sync), counted over the
    /// session. Pipelined messages of the next batch count past the one
    /// the server is still answering.
    pub fn batch(&self) -> u64 {
        self.batches_pushed
    }

    /// How many batches the server has answered (ReadyForQuery): every
    /// batch numbered below this has ended.
    pub fn batches_answered(&self) -> u64 {
        self.batches_answered
    }

    /// The `refuse_and_retry` approvals of Queries the server skipped
    /// since the last call (an earlier message of their batch failed):
    /// their statements never ran.
    pub fn take_unused_retries(&mut self) -> Vec<RetryUse> {
        std::mem::take(&mut self.unused_retries)
    }

    /// What the server made of the messages pushed with a [`Confirm`]
    /// since the last call, in order, into `into` (empty), which gives its
    /// buffer in exchange.
    pub fn take_resolved(&mut self, into: &mut Vec<(Confirm, bool)>) {
        debug_assert!(into.is_empty());
        std::mem::swap(&mut self.resolved, into);
    }

    /// Pushes the entry of a statement the audit trail follows.
    pub fn push_marked(&mut self, expect: Expect, mark: Option<Mark>) {
        self.push_entry(expect, mark, None);
    }

    /// The statements that ended since the last call, into `into` (empty),
    /// which gives its buffer in exchange.
    pub fn take_finished(&mut self, into: &mut Vec<Mark>) {
        debug_assert!(into.is_empty());
        std::mem::swap(&mut self.finished, into);
    }

    /// The mark of the Execute in front, which its portal suspended at the
    /// row count asked for (PortalSuspended arrived): taken out, so that the
    /// statement does not end with this piece.
    pub fn suspend_front(&mut self) -> Option<Mark> {
        self.front();
        self.marks.front_mut()?.take().map(|mark| *mark)
    }

    /// Whether a later piece of the unnamed portal, sent while the client
    /// had bound it `binds` times, waits for its answer.
    pub fn unnamed_piece_in_flight(&self, binds: u64) -> bool {
        self.marks
            .iter()
            .flatten()
            .any(|mark| mark.continues && mark.unnamed_binds == binds && mark.portal.as_deref() == Some(""))
    }

    /// Adds a CommandComplete's row count to the statement it ends.
    pub fn note_rows(&mut self, rows: u64) {
        self.front();
        if let Some(Some(mark)) = self.marks.front_mut() {
            *mark.rows.get_or_insert(0) += rows;
        }
    }

    /// The sample rows of the statement whose rows arrive now, while it
    /// takes more: fewer than `limit` so far, and rows of its first result
    /// only, so that they line up with the first columns.
    pub fn sample(&mut self, limit: usize) -> Option<&mut crate::audit::SampleRows> {
        self.front();
        match self.marks.front_mut() {
            Some(Some(mark)) if mark.results == 0 && mark.sample.len() < limit => Some(&mut mark.sample),
            _ => None,
        }
    }

    /// A result of the statement in front ended, with these columns (none
    /// for a command without rows).
    pub fn note_result(&mut self, columns: Option<Columns>) {
        self.front();
        if let Some(Some(mark)) = self.marks.front_mut() {
            mark.results += 1;
            mark.columns = match (mark.columns.take(), columns) {
                (Some(have), Some(more)) => Some(have.iter().chain(more.iter()).cloned().collect()),
                (have, more) => have.or(more),
            };
        }
    }

    /// The statement that ended last (its completion not taken yet) was
    /// undone by the gateway after the server completed it (a write over
    /// its row limit, rolled back): it ends with the gateway's `sqlstate`,
    /// whatever the server said. Its row count stays: what it would have
    /// changed.
    pub fn refuse_last_finished(&mut self, sqlstate: &str) {
        if let Some(mark) = self.finished.last_mut() {
            mark.sqlstate = Some(sqlstate.to_string());
        }
    }

    /// Notes the SQLSTATE of an error on the statement it ends. An error
    /// at a Bind (a parameter the server cannot read, a constant folded
    /// into a division by zero) is the statement's that the Bind's portal
    /// runs: the next Execute of the batch, which the server then skips.
    pub fn note_error(&mut self, sqlstate: &str) {
        self.front();
        let at = match self.queue.front() {
            Some(Expect::Bind) => self
                .queue
                .iter()
                .take_while(|e| **e != Expect::Sync)
                .position(|e| matches!(e, Expect::Execute { .. })),
            _ => Some(0),
        };
        if let Some(Some(mark)) = at.and_then(|at| self.marks.get_mut(at)) {
            mark.sqlstate.get_or_insert_with(|| sqlstate.to_string());
        }
    }

    fn pop_front_entry(&mut self, skipped: bool) -> Option<Expect> {
        // Still there: the server did not confirm the message (an error,
        // or skipped after one).
        if let Some(Some(confirm)) = self.confirms.pop_front() {
            self.resolved.push((confirm, false));
        }
        if let Some(Some(mut mark)) = self.marks.pop_front() {
            // One that failed at its Bind did run, as far as it got.
            mark.skipped = skipped && mark.sqlstate.is_none();
            self.finished.push(*mark);
        }
        let mut expect = self.queue.pop_front();
        if skipped
            && let Some(Expect::Query { retry, .. }) = &mut expect
            && let Some(retry) = retry.take()
        {
            self.unused_retries.push(*retry);
        }
        expect
    }

    /// Whether an ErrorResponse arriving now makes the server skip the
    /// client's messages up to a Sync the client has not sent yet: the
    /// answer in front is to an extended-protocol message, and no Sync is
    /// owed an answer.
    pub fn error_skips_to_unsent_sync(&self) -> bool {
        let extended = matches!(
            self.queue.iter().find(|e| **e != Expect::CopyEnd),
            Some(
                Expect::Parse { .. }
                    | Expect::Bind
                    | Expect::Describe { .. }
                    | Expect::InternalDescribe { .. }
                    | Expect::Execute { .. }
                    | Expect::Close
            )
        );
        // While a COPY FROM STDIN runs, the Syncs before its end are ones
        // the server ignores (`end_copy_in`): none of them is owed.
        let mut owed = self.queue.iter().skip(1);
        if self.copy_in {
            extended && !owed.skip_while(|e| **e != Expect::CopyEnd).any(|e| *e == Expect::Sync)
        } else {
            extended && !owed.any(|e| *e == Expect::Sync)
        }
    }

    /// Nothing owed: the session is between requests.
    pub fn is_empty(&self) -> bool {
        self.queue.iter().all(|e| *e == Expect::CopyEnd)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether an answer owed is a row-limit guard's: its statement, or a
    /// statement the gateway sent for it.
    pub fn owes_guard(&self) -> bool {
        self.queue.iter().any(|e| {
            matches!(
                e,
                Expect::Query { guarded: true, .. } | Expect::Execute { guarded: true } | Expect::Internal
            )
        })
    }

    /// Whether the server is reading a COPY FROM STDIN's data.
    pub fn copy_in(&self) -> bool {
        self.copy_in
    }

    /// Whether a ReadyForQuery is owed (a Query, Sync or FunctionCall was
    /// sent and not yet answered to the end).
    pub fn awaits_ready(&self) -> bool {
        self.queue.iter().any(|e| {
            matches!(
                e,
                Expect::Query { .. } | Expect::Sync | Expect::FunctionCall | Expect::Internal
            )
        })
    }

    /// The oldest entry that expects an answer. CopyEnd markers that reach the
    /// front belong to a COPY that is over (or never started) and are dropped.
    fn front(&mut self) -> Option<&mut Expect> {
        while self.queue.front() == Some(&Expect::CopyEnd) {
            self.pop_front_entry(false);
        }
        self.queue.front_mut()
    }

    fn front_owner(&mut self) -> Owner {
        self.front().map(|e| e.owner()).unwrap_or(Owner::Client)
    }

    /// Whether the RowDescription arriving now describes results that may
    /// carry rule-masked values in expressions. When the answer cannot be
    /// placed, it is treated as sensitive.
    pub fn front_sensitive(&mut self) -> bool {
        match self.front() {
            Some(Expect::Query { sensitive, .. })
            | Some(Expect::Describe { sensitive })
            | Some(Expect::InternalDescribe { sensitive }) => *sensitive,
            _ => true,
        }
    }

    /// Marks every answer still owed as sensitive: after an error, the
    /// statements and portals they describe may not be the ones the client
    /// meant (its Parse or Bind was discarded or rejected).
    pub fn mark_sensitive(&mut self) {
        for expect in &mut self.queue {
            match expect {
                Expect::Query { sensitive, .. }
                | Expect::Describe { sensitive }
                | Expect::InternalDescribe { sensitive } => *sensitive = true,
                _ => {}
            }
        }
    }

    fn front_owner_pop(&mut self) -> Owner {
        let owner = self.front_owner();
        self.pop();
        owner
    }

    fn pop(&mut self) -> Option<Expect> {
        self.front();
        self.pop_front_entry(false)
    }

    /// A COPY FROM STDIN ended: the Syncs the client sent while it ran were
    /// ignored by the server (as is libpq's Sync sent with the Execute), so
    /// they get no ReadyForQuery and must not wait for one (each counts as
    /// answered: its batch runs on into the next, which the server does
    /// answer).
    fn end_copy_in(&mut self) {
        self.copy_in = false;
        let mut index = 1;
        while index < self.queue.len() {
            match self.queue[index] {
                Expect::CopyEnd => break,
                Expect::Sync => {
                    self.queue.remove(index);
                    self.marks.remove(index);
                    self.confirms.remove(index);
                    self.batches_answered += 1;
                }
                _ => index += 1,
            }
        }
    }

    /// Accounts for one backend message and says who it is for.
    pub fn on_backend(&mut self, message_tag: u8) -> Owner {
        match message_tag {
            tag::PARSE_COMPLETE | tag::BIND_COMPLETE | tag::CLOSE_COMPLETE | tag::NO_DATA | tag::PORTAL_SUSPENDED => {
                let owner = self.front_owner();
                if matches!(
                    message_tag,
                    tag::PARSE_COMPLETE | tag::BIND_COMPLETE | tag::CLOSE_COMPLETE
                ) && let Some(confirm) = self.confirms.front_mut().and_then(Option::take)
                {
                    self.resolved.push((confirm, true));
                }
                self.pop();
                owner
            }
            tag::ROW_DESCRIPTION => {
                // Part of a simple Query's answer unless a Describe asked for it.
                if matches!(
                    self.front(),
                    Some(Expect::Describe { .. } | Expect::InternalDescribe { .. })
                ) {
                    self.front_owner_pop()
                } else {
                    self.front_owner()
                }
            }
            tag::DATA_ROW | tag::NOTICE_RESPONSE => match self.front_owner() {
                // A notice during an internal statement (such as a warning
                // about the transaction state) is the gateway's.
                Owner::Internal => Owner::Internal,
                Owner::Guard if message_tag == tag::DATA_ROW => Owner::Guard,
                _ => Owner::Client,
            },
            tag::COMMAND_COMPLETE | tag::EMPTY_QUERY_RESPONSE => {
                if self.copy_in {
                    self.end_copy_in();
                }
                let owner = self.front_owner();
                if matches!(self.front(), Some(Expect::Execute { .. })) {
                    self.pop();
                }
                owner
            }
            tag::COPY_IN_RESPONSE => {
                self.copy_in = true;
                // A guarded COPY's guard lets the client's data through.
                match self.front_owner() {
                    Owner::Guard => Owner::Guard,
                    _ => Owner::Client,
                }
            }
            tag::ERROR_RESPONSE => {
                if self.copy_in {
                    self.end_copy_in();
                }
                self.on_error()
            }
            tag::READY_FOR_QUERY => {
                let mut owner = Owner::Client;
                while let Some(expect) = self.pop() {
                    if expect.ends_batch() {
                        self.batches_answered += 1;
                        owner = expect.owner();
                        break;
                    }
                }
                owner
            }
            _ => Owner::Client,
        }
    }

    fn on_error(&mut self) -> Owner {
        let Some(front) = self.front() else {
            return Owner::Client;
        };
        match front {
            // A simple Query or FunctionCall ends with ReadyForQuery after its error.
            Expect::Query { refusal, guarded, .. } => match refusal.take() {
                Some(refusal) => Owner::Refusal(refusal),
                None if *guarded => Owner::Guard,
                None => Owner::Client,
            },
            Expect::Internal => Owner::Internal,
            Expect::FunctionCall | Expect::Sync => Owner::Client,
            // The extended protocol: the server discards messages until Sync.
            _ => {
                let owner = match self.pop_front_entry(false) {
                    Some(Expect::Parse { refusal: Some(refusal) }) => Owner::Refusal(refusal),
                    Some(Expect::Execute { guarded: true }) => Owner::Guard,
                    _ => Owner::Client,
                };
                while let Some(front) = self.queue.front() {
                    if *front == Expect::Sync {
                        break;
                    }
                    self.pop_front_entry(true);
                }
                owner
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::Severity;

    fn refusal() -> Option<Box<ErrorFields>> {
        Some(Box::new(ErrorFields::new(Severity::Error, "42501", "refused")))
    }

    fn refused_query() -> Expect {
        Expect::Query {
            refusal: refusal(),
            guarded: false,
            sensitive: false,
            retry: None,
        }
    }

    fn is_refusal(owner: &Owner) -> bool {
        matches!(owner, Owner::Refusal(_))
    }

    fn feed(queue: &mut PendingQueue, tags: &[u8]) -> Vec<Owner> {
        tags.iter().map(|&t| queue.on_backend(t)).collect()
    }

    #[test]
    fn simple_query_lifecycle() {
        let mut q = PendingQueue::default();
        q.push(Expect::query(false));
        feed(&mut q, b"TDDCTDC");
        assert!(!q.is_empty());
        feed(&mut q, b"Z");
        assert!(q.is_empty());
    }

    #[test]
    fn extended_pipeline_retires_in_order() {
        let mut q = PendingQueue::default();
        for e in [
            Expect::Parse { refusal: None },
            Expect::Bind,
            Expect::Describe { sensitive: false },
            Expect::Execute { guarded: false },
            Expect::Sync,
        ] {
            q.push(e);
        }
        q.push(Expect::Bind);
        q.push(Expect::Execute { guarded: false });
        q.push(Expect::Sync);
        feed(&mut q, b"12TDDCZ");
        assert_eq!(q.len(), 3);
        feed(&mut q, b"2DsZ");
        assert!(q.is_empty());
    }

    #[test]
    fn batches_are_numbered_as_sent_and_counted_as_answered() {
        let mut q = PendingQueue::default();
        q.push(Expect::Bind);
        assert_eq!(q.batch(), 0);
        q.push(Expect::Execute { guarded: false });
        q.push(Expect::Sync);
        // Pipelined behind it: the next batch.
        assert_eq!(q.batch(), 1);
        q.push(Expect::Bind);
        q.push(Expect::Sync);
        q.push(Expect::query(false));
        assert_eq!(q.batch(), 3);
        feed(&mut q, b"2DC");
        assert_eq!(q.batches_answered(), 0);
        feed(&mut q, b"Z");
        assert_eq!(q.batches_answered(), 1);
        // An error skips the rest of its batch; its Sync still ends it.
        feed(&mut q, b"EZ");
        assert_eq!(q.batches_answered(), 2);
        feed(&mut q, b"TDCZ");
        assert_eq!(q.batches_answered(), 3);
        assert!(q.is_empty());
    }

    #[test]
    fn confirmed_rejected_and_skipped_messages_are_reported_in_order() {
        let confirm = |name: &str, seq: u64| Confirm {
            statement: name.to_string(),
            seq,
            portal: true,
        };
        let mut q = PendingQueue::default();
        q.push_confirmed(Expect::Bind, confirm("a", 1));
        q.push(Expect::Sync);
        // The Bind fails; the Close behind it is skipped.
        q.push_confirmed(Expect::Bind, confirm("b", 2));
        q.push_confirmed(Expect::Close, confirm("a", 3));
        q.push(Expect::Sync);
        q.push_confirmed(Expect::Close, confirm("b", 4));
        q.push(Expect::Sync);
        feed(&mut q, b"2ZEZ3Z");
        assert!(q.is_empty());
        let mut resolved = Vec::new();
        q.take_resolved(&mut resolved);
        assert_eq!(
            resolved,
            [
                (confirm("a", 1), true),
                (confirm("b", 2), false),
                (confirm("a", 3), false),
                (confirm("b", 4), true),
            ]
        );
        let mut again = Vec::new();
        q.take_resolved(&mut again);
        assert!(again.is_empty());
    }

    #[test]
    fn an_error_before_the_sync_is_sent_skips_what_follows_until_it() {
        let mut q = PendingQueue::default();
        q.push(Expect::Parse { refusal: None });
        q.push(Expect::Bind);
        assert!(q.error_skips_to_unsent_sync());
        q.push(Expect::Sync);
        assert!(!q.error_skips_to_unsent_sync(), "the Sync is sent");
        let mut q = PendingQueue::default();
        q.push(Expect::query(false));
        assert!(!q.error_skips_to_unsent_sync(), "a simple Query's error ends with it");
        assert!(!PendingQueue::default().error_skips_to_unsent_sync());
    }

    #[test]
    fn refused_parse_error_is_replaced_and_batch_discarded() {
        let mut q = PendingQueue::default();
        q.push(Expect::Parse { refusal: None });
        q.push(Expect::Bind);
        q.push(Expect::Execute { guarded: false });
        q.push(Expect::Parse { refusal: refusal() });
        q.push(Expect::Bind);
        q.push(Expect::Execute { guarded: false });
        q.push(Expect::Sync);
        q.push(Expect::query(false));
        let out = feed(&mut q, b"12C");
        assert!(out.iter().all(|o| *o == Owner::Client));
        // The refused Parse's error is the one to replace.
        assert!(is_refusal(&q.on_backend(b'E')));
        feed(&mut q, b"Z");
        assert_eq!(q.queue.front(), Some(&Expect::query(false)));
    }

    #[test]
    fn earlier_error_skips_the_refused_parse_like_postgres_does() {
        let mut q = PendingQueue::default();
        q.push(Expect::Parse { refusal: None });
        q.push(Expect::Bind);
        q.push(Expect::Execute { guarded: false });
        q.push(Expect::Parse { refusal: refusal() });
        q.push(Expect::Sync);
        // The first statement fails at Execute; the server never sees the
        // refused Parse, so no error may be replaced.
        let out = feed(&mut q, b"12EZ");
        assert!(out.iter().all(|o| *o == Owner::Client));
        assert!(q.is_empty());
    }

    #[test]
    fn refused_simple_query() {
        let mut q = PendingQueue::default();
        q.push(refused_query());
        assert!(is_refusal(&q.on_backend(b'E')));
        assert_eq!(q.on_backend(b'E'), Owner::Client);
        feed(&mut q, b"Z");
        assert!(q.is_empty());
    }

    #[test]
    fn libpq_extended_copy_in_ignores_the_early_sync() {
        // libpq: Parse/Bind/Describe/Execute/Sync, then CopyData..., CopyDone, Sync.
        let mut q = PendingQueue::default();
        for e in [
            Expect::Parse { refusal: None },
            Expect::Bind,
            Expect::Describe { sensitive: false },
            Expect::Execute { guarded: false },
            Expect::Sync,
        ] {
            q.push(e);
        }
        feed(&mut q, b"12nG");
        q.push(Expect::CopyEnd);
        q.push(Expect::Sync);
        feed(&mut q, b"C");
        feed(&mut q, b"Z");
        assert!(q.is_empty(), "{:?}", q.queue);
        // The ignored Sync's batch ended with the next: nothing is owed.
        assert_eq!((q.batch(), q.batches_answered()), (2, 2));
        q.push(refused_query());
        assert!(is_refusal(&q.on_backend(b'E')), "queue drifted: {:?}", q.queue);
    }

    #[test]
    fn extended_copy_in_failing_mid_stream() {
        let mut q = PendingQueue::default();
        for e in [
            Expect::Parse { refusal: None },
            Expect::Bind,
            Expect::Execute { guarded: false },
            Expect::Sync,
        ] {
            q.push(e);
        }
        feed(&mut q, b"12G");
        // The server rejects a row before the client finished sending.
        feed(&mut q, b"E");
        q.push(Expect::CopyEnd);
        q.push(Expect::Sync);
        feed(&mut q, b"Z");
        assert!(q.is_empty(), "{:?}", q.queue);
    }

    #[test]
    fn simple_copy_in_and_stray_copy_done() {
        let mut q = PendingQueue::default();
        q.push(Expect::query(false));
        feed(&mut q, b"G");
        q.push(Expect::CopyEnd);
        feed(&mut q, b"CZ");
        assert!(q.is_empty());
        // A CopyDone sent after a failed COPY is ignored by the server.
        q.push(Expect::CopyEnd);
        q.push(refused_query());
        assert!(is_refusal(&q.on_backend(b'E')));
    }

    #[test]
    fn row_descriptions_know_whether_their_statement_is_sensitive() {
        let mut q = PendingQueue::default();
        q.push(Expect::query(true));
        q.push(Expect::Parse { refusal: None });
        q.push(Expect::Describe { sensitive: false });
        q.push(Expect::Sync);
        assert!(q.front_sensitive());
        assert_eq!(feed(&mut q, b"TDCZ").len(), 4);
        assert_eq!(feed(&mut q, b"1").len(), 1);
        assert!(!q.front_sensitive());
        assert_eq!(feed(&mut q, b"TZ").len(), 2);
        // Nothing to place it on: sensitive, to be safe.
        assert!(q.front_sensitive());
    }

    #[test]
    fn guarded_and_internal_answers_are_attributed() {
        let mut q = PendingQueue::default();
        q.push(Expect::Internal);
        q.push(Expect::Query {
            refusal: None,
            guarded: true,
            sensitive: false,
            retry: None,
        });
        assert_eq!(feed(&mut q, b"CZ"), vec![Owner::Internal, Owner::Internal]);
        assert_eq!(feed(&mut q, b"TDCZ"), vec![Owner::Guard; 4]);
        assert!(q.is_empty());
        // A guarded Execute, then the rest of the batch.
        q.push(Expect::Execute { guarded: true });
        q.push(Expect::Sync);
        assert_eq!(feed(&mut q, b"DC"), vec![Owner::Guard, Owner::Guard]);
        assert_eq!(feed(&mut q, b"Z"), vec![Owner::Client]);
        q.push(Expect::Execute { guarded: true });
        q.push(Expect::Sync);
        assert_eq!(feed(&mut q, b"EZ"), vec![Owner::Guard, Owner::Client]);
        assert!(q.is_empty());
    }

    #[test]
    fn function_call_and_describe_statement() {
        let mut q = PendingQueue::default();
        q.push(Expect::FunctionCall);
        feed(&mut q, b"VZ");
        assert!(q.is_empty());
        q.push(Expect::Describe { sensitive: false });
        q.push(Expect::Sync);
        feed(&mut q, b"tT");
        assert_eq!(q.len(), 1);
        feed(&mut q, b"Z");
        assert!(q.is_empty());
    }
}
