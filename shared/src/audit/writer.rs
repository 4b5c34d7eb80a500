//! The audit writer: one thread that owns the store and commits events in
//! batches, and the [`Auditor`] handle sessions record events through.
//!
//! Sessions serialize their events themselves and put them on one queue (a
//! mutex and a condition variable, woken only when the writer sleeps). How
//! a write-ahead event becomes durable depends on `sync`:
//!
//! - `normal`: the session copies the event into the write-ahead journal
//!   (`journal.rs`) as it queues it, and the event is durable at once: the
//!   statement goes upstream with no wait and no thread switch. The writer
//!   wakes once per [`GATHER`] under load, or sooner once a quarter of the
//!   journal waits (while the store works), and moves what gathered into
//!   SQLite in one transaction.
//! - `full` (and events too large for the journal): the session waits for
//!   the event's SQLite commit (group commit: one transaction and one fsync
//!   for everything that arrived while the previous batch was written), and
//!   the writer commits as soon as someone waits.
//!
//! Nothing is dropped to keep up: a session waits before its next statement
//! while half the journal waits for SQLite (`Journal::crowded`), and an
//! event that waits for its commit holds its statement back. Only while the
//! store fails are events that were not write-ahead kept in memory, up to
//! [`MAX_RETRY`]; the ones beyond are counted and the count recorded.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::chain::{Signer, replace_file};
use super::event::{Completion, CompletionView, Detail, Envelope, Event, Record};
use super::journal::{Journal, Mark};
use super::sqlite::StoredEvent;
use super::{AuditError, AuditStore, SyncMode};

/// Events kept for a retry while the store cannot write (those in the
/// journal are kept whatever their number: they are on the record
/// already); beyond this they are counted, and the count is written once
/// the store recovers.
const MAX_RETRY: usize = 100_000;

/// How often a failing store is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// With the journal, how long the writer lets events gather before it
/// moves them into SQLite, unless someone waits for them. Sleeping here
/// (not spinning) costs nothing, and a larger batch shares one commit, one
/// round of WAL page writes and one wakeup among more events. A commit
/// writes whole pages, among them the index leaves its rows land in (about
/// one per active session), so the longer the batch the fewer pages per
/// statement: 100 ms rather than 50 took the writer from 1.35 to 1.15 µs
/// per statement at pgbench -c 10 and from 1.98 to 1.33 µs at -c 50, and
/// its writes down by a quarter. It is also how late the live event stream
/// (and the console) can be; the API flushes before it reads the trail.
/// The writer also stops gathering once the journal holds a batch
/// (`Journal::batch_ready`), so a load fast enough to fill the ring within
/// this time never finds it crowded while the writer sleeps.
pub const GATHER: Duration = Duration::from_millis(100);

/// How the writer signs and where it keeps the signed head.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Sign the head after this many rows (a row may keep several
    /// statements: see `rows`).
    pub sign_every: u64,
    /// ... or after this long, if anything is unsigned.
    pub sign_interval: Duration,
    /// The newest signed head, outside the database.
    pub head_file: PathBuf,
    /// Events older than this are removed (in whole signed segments);
    /// `None` keeps everything.
    pub retention: Option<Duration>,
    /// The write-ahead journal's file ([`super::journal_path`] of the
    /// trail). What a crash left in it is written to the trail at start,
    /// whatever `sync`.
    pub journal: PathBuf,
    /// `Normal`: write-ahead events are durable once in the journal.
    /// `Full`: each waits for its SQLite commit (and fsync); no journal.
    pub sync: SyncMode,
    /// How long journal events gather before the writer takes them:
    /// [`GATHER`] (tests use longer).
    pub gather: Duration,
}

/// How many events' room the writer's round keeps between rounds (about
/// 2 MiB; a -c 50 pgbench round takes about 1,200).
const BATCH_KEPT: usize = 16 * 1024;

/// How many emptied event buffers wait for sessions ([`Queue::spares`]),
/// and the largest one kept: a few rounds' statements at -c 50, about
/// 1.5 MiB with pgbench's.
const SPARES_KEPT: usize = 2048;
const SPARE_BYTES: usize = 4096;

/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The trail cannot take events now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the audit trail cannot record events: {0}")]
pub struct Unavailable(pub String);

/// An event on its way to the store.
#[derive(Debug)]
struct Queued {
    record: Record,
    /// The session waiting for the commit (an event that is not in the
    /// journal).
    ack: Option<oneshot::Sender<Result<(), Unavailable>>>,
    /// The journal position after this event, when it is in the journal.
    journal: Option<Mark>,
}

#[derive(Debug)]
enum Control {
    /// Answers once everything sent before it is durable.
    Flush(oneshot::Sender<()>),
    /// Like Flush, and signs the head first.
    Sign(oneshot::Sender<()>),
}

/// What the writer is waiting for, so that senders wake it only when it
/// needs waking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sleep {
    /// Working: it looks at the queue again before it sleeps.
    Awake,
    /// Nothing to do: the next event wakes it.
    Idle,
    /// Letting journal events gather: a waiting session, a control or a
    /// batch in the journal wakes it ([`Queue::gathering`]).
    Gathering,
}

#[derive(Debug)]
struct Queue {
    events: Vec<Queued>,
    /// Counts the writer's takes: a [`Ticket`] of an earlier round points
    /// into a queue the writer has taken.
    round: u64,
    controls: Vec<Control>,
    /// Events in `events` someone waits for, plus controls.
    urgent: usize,
    /// Where the next journal record goes.
    next: Mark,
    /// Where a joined completion's journal record is written, under the
    /// lock ([`Auditor::complete`]); reused.
    done: String,
    /// The journal's ring size (0 without one).
    capacity: u64,
    /// The oldest journal position the writer still needs: everything
    /// before it is in SQLite.
    ingested: u64,
    sleep: Sleep,
    /// Every [`Auditor`] is gone: write what is left and stop.
    closed: bool,
    /// Sessions waiting for a crowded journal to drain.
    crowded: Vec<Waker>,
    /// Emptied buffers of stored events, for sessions' next statement
    /// events ([`Auditor::write_ahead_statement`]).
    spares: Vec<String>,
}

impl Queue {
    /// Whether a batch waits in the journal: a quarter of the ring
    /// (`Journal::batch_ready`). Not while the store fails: nothing drains
    /// the journal then, and retrying sooner would not help.
    fn batch_ready(&self, health: &Health) -> bool {
        self.capacity > 0
            && Journal::batch_ready(self.capacity, self.next.offset, self.ingested)
            && !health.failing.load(Ordering::Acquire)
    }

    /// Whether the writer goes on letting journal events gather: until
    /// someone waits, every [`Auditor`] is gone, or a batch is ready.
    fn gathering(&self, health: &Health) -> bool {
        self.urgent == 0 && !self.closed && !self.batch_ready(health)
    }
}

/// What the sessions and the writer thread share.
#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    health: Health,
    journal: Option<Journal>,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Default)]
struct Health {
    failing: AtomicBool,
    error: Mutex<Option<String>>,
    written: AtomicU64,
    /// Events kept for a retry while the store fails.
    retrying: AtomicU64,
    /// Statements sessions refused while the store was failing.
    refused: AtomicU64,
    /// Events dropped because the retry buffer was full.
    lost: AtomicU64,
}

/// The trail's state, for logs and (with the control API) the health endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub available: bool,
    pub error: Option<String>,
    pub written: u64,
    pub queued: u64,
}

/// The sessions' handle on the audit trail. Cheap to clone; when the last
/// clone is dropped, the writer writes what is left, signs and stops.
#[derive(Debug, Clone)]
pub struct Auditor {
    handle: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    /// Events as they are committed, for the live stream.
    published: tokio::sync::broadcast::Sender<Arc<StoredEvent>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.queue().closed = true;
        self.shared.wake.notify_one();
    }
}

/// Committed events a slow subscriber may fall behind by before it is told
/// to catch up from the trail.
const PUBLISH_BUFFER: usize = 4096;

/// Resolves once a write-ahead event is durable, or with why it cannot be.
pub struct Durable(Wait);

/// Where a statement's event waits for the writer, so that its completion
/// can join it there ([`Auditor::complete`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    round: u64,
    index: usize,
}

enum Wait {
    /// Durable already (in the journal), or refused.
    Ready(Option<Result<(), Unavailable>>),
    /// In the journal, which is crowded: the statement waits until SQLite
    /// has caught up (back-pressure).
    Crowded(Arc<Shared>),
    /// Waits for its SQLite commit.
    Commit(oneshot::Receiver<Result<(), Unavailable>>),
    /// Waits for each (events of several statements held together).
    All(Vec<Durable>),
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Wait::Ready(_) => "Durable(ready)",
            Wait::Crowded(_) => "Durable(crowded)",
            Wait::Commit(_) => "Durable(commit)",
            Wait::All(_) => "Durable(all)",
        })
    }
}

impl Future for Durable {
    type Output = Result<(), Unavailable>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Wait::Ready(result) => Poll::Ready(result.take().unwrap_or(Ok(()))),
            Wait::Crowded(shared) => {
                let mut queue = shared.queue();
                // While the store fails the journal cannot drain; the event
                // is on the record, and the session refuses what comes next.
                if !Journal::crowded(queue.capacity, queue.next.offset, queue.ingested)
                    || shared.health.failing.load(Ordering::Acquire)
                {
                    Poll::Ready(Ok(()))
                } else {
                    queue.crowded.push(cx.waker().clone());
                    Poll::Pending
                }
            }
            Wait::Commit(rx) => {
                let result = std::task::ready!(Pin::new(rx).poll(cx))
                    .unwrap_or_else(|_| Err(Unavailable("the audit writer stopped".into())));
                // A receiver is not polled again once it has answered.
                self.0 = Wait::Ready(None);
                Poll::Ready(result)
            }
            Wait::All(waits) => {
                let mut failed = None;
                waits.retain_mut(|wait| match Pin::new(wait).poll(cx) {
                    Poll::Ready(Ok(())) => false,
                    Poll::Ready(Err(err)) => {
                        failed.get_or_insert(err);
                        false
                    }
                    Poll::Pending => true,
                });
                match failed {
                    Some(err) => Poll::Ready(Err(err)),
                    None if waits.is_empty() => Poll::Ready(Ok(())),
                    None => Poll::Pending,
                }
            }
        }
    }
}

impl Durable {
    /// Resolves once both this and `next` are durable. The events of
    /// statements held back together must all be: one in the journal is
    /// durable at once, while an earlier one too large for it still waits
    /// for its commit (and an earlier batch may fail where a later one
    /// does not, so every commit counts). A crowded journal is one
    /// condition, however many wait on it: it is kept once.
    pub fn and(self, next: Durable) -> Durable {
        let crowded = |wait: &Wait| matches!(wait, Wait::Crowded(_));
        match (self.0, next.0) {
            // Durable already: only the other is left to wait for.
            (wait, Wait::Ready(None)) | (Wait::Ready(None), wait) => Durable(wait),
            (Wait::Crowded(shared), Wait::Crowded(_)) => Durable(Wait::Crowded(shared)),
            (Wait::All(mut waits), next) => {
                if !(crowded(&next) && waits.iter().any(|w| crowded(&w.0))) {
                    waits.push(Durable(next));
                }
                Durable(Wait::All(waits))
            }
            (wait, next) => Durable(Wait::All(vec![Durable(wait), Durable(next)])),
        }
    }
}

impl Auditor {
    /// Writes to the trail what a crash left in the journal, then starts
    /// the writer thread over `store`.
    pub fn start(
        mut store: Box<dyn AuditStore>,
        signer: Signer,
        options: WriterOptions,
    ) -> Result<(Auditor, std::thread::JoinHandle<()>), AuditError> {
        let mut next = store.journal_mark();
        let journal = if options.sync == SyncMode::Normal || options.journal.exists() {
            let journal = Journal::open(&options.journal)?;
            next = recover(&journal, store.as_mut(), next)?;
            Some(journal)
        } else {
            None
        };
        let journal = match (journal, options.sync) {
            (Some(journal), SyncMode::Full) => {
                // Recovered: with sync = full nothing goes through it.
                drop(journal);
                let _ = std::fs::remove_file(&options.journal);
                None
            }
            (Some(journal), SyncMode::Normal) if journal.capacity() != super::journal::CAPACITY => {
                // Recovered: one an earlier version made, with a ring of
                // another size, is made anew at this version's (numbering
                // goes on from the mark; the new ring holds nothing older).
                drop(journal);
                std::fs::remove_file(&options.journal).map_err(|err| AuditError::Setup {
                    path: options.journal.clone(),
                    reason: format!("cannot replace the audit journal of an earlier version: {err}"),
                })?;
                Some(Journal::open(&options.journal)?)
            }
            (journal, _) => journal,
        };
        let mut prefaulted = 0;
        if let Some(journal) = &journal {
            journal.prefault(next.offset, &mut prefaulted);
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                events: Vec::new(),
                round: 0,
                controls: Vec::new(),
                urgent: 0,
                next,
                done: String::new(),
                capacity: journal.as_ref().map_or(0, Journal::capacity),
                ingested: next.offset,
                sleep: Sleep::Awake,
                closed: false,
                crowded: Vec::new(),
                spares: Vec::new(),
            }),
            wake: Condvar::new(),
            health: Health::default(),
            journal,
        });
        let (published, _) = tokio::sync::broadcast::channel(PUBLISH_BUFFER);
        let writer = Writer {
            published: published.clone(),
            store,
            signer,
            options,
            shared: shared.clone(),
            retry: VecDeque::new(),
            batch: Vec::new(),
            spares: Vec::new(),
            prefaulted,
            taken: None,
            last_signed: None,
            signed_at: Instant::now(),
            pruned_at: None,
        };
        let handle = std::thread::Builder::new()
            .name("sluice-audit".into())
            .spawn(move || writer.run())
            .map_err(|err| AuditError::Setup {
                path: PathBuf::new(),
                reason: format!("cannot start the audit writer thread: {err}"),
            })?;
        Ok((
            Auditor {
                handle: Arc::new(Handle { shared, published }),
            },
            handle,
        ))
    }

    /// Committed events from now on, in order.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<StoredEvent>> {
        self.handle.published.subscribe()
    }

    fn health_state(&self) -> &Health {
        &self.handle.shared.health
    }

    /// Whether the trail is taking events. A session refuses new statements
    /// while it is not (unless configured to continue).
    pub fn available(&self) -> bool {
        !self.health_state().failing.load(Ordering::Acquire)
    }

    /// Records an event without waiting for it.
    pub fn record(&self, event: Event) {
        // Serialized here, on the caller's thread, outside the lock.
        self.record_stored(Record::new(event));
    }

    /// Records an event already in its stored form (a session's statement,
    /// [`Record::statement`]) without waiting for it.
    pub fn record_stored(&self, record: Record) {
        // Nobody waits: an event that did not fit in the journal is
        // simply written with the next batch.
        drop(self.send(record, false, None).0);
    }

    /// Records an event the caller must not act on before it is durable.
    pub fn write_ahead(&self, event: Event) -> Durable {
        self.send(Record::new(event), true, None).0
    }

    /// Records a statement's event ([`Record::statement`]) write-ahead
    /// ([`Auditor::write_ahead`]); the ticket lets its completion join it.
    /// An empty `spare` (the session's buffer for its next statement event)
    /// gets the emptied buffer of an event already stored, when the writer
    /// has one (at most 4 KiB): in the steady state statement events are
    /// neither allocated by the sessions nor freed by the writer.
    pub fn write_ahead_statement(&self, record: Record, spare: &mut String) -> (Durable, Ticket) {
        self.send(record, true, Some(spare))
    }

    /// Records how statement `seq` of the session `envelope` is ended.
    /// Its fields are written once, into `scratch` (the session's
    /// buffer). While its event (`ticket`) still waits for the writer,
    /// which is almost always, the completion joins it (`done`): one event
    /// in the trail. The completion then goes into the journal as a small
    /// event of its own (`at`, `session`, its number and fields), so that
    /// a crash keeps both: recovery joins it to its statement as the writer
    /// did. (Journaling the joined statement again put about 1.5 times as
    /// many bytes through the ring per statement.) Otherwise (the writer
    /// took the statement before it ended) the completion is an event of
    /// its own, [`Record::done`].
    pub fn complete(
        &self,
        ticket: Option<Ticket>,
        envelope: &Arc<Envelope>,
        seq: u64,
        completion: CompletionView<'_>,
        scratch: &mut String,
    ) {
        let columns = completion.write_fields(scratch);
        let fields = scratch.as_str();
        if let Some(ticket) = ticket {
            let shared = &self.handle.shared;
            let mut queue = shared.queue();
            let queue = &mut *queue;
            if ticket.round == queue.round
                && let Some(statement) = queue.events.get_mut(ticket.index)
                && statement.record.kind == "statement"
                && statement.record.seq == seq
                && Arc::ptr_eq(&statement.record.envelope, envelope)
                && statement.record.join(fields, columns)
            {
                // Journaled like its statement (one the journal refused
                // waits for its commit, and so does its completion).
                if statement.journal.is_some()
                    && let Some(journal) = &shared.journal
                    && statement.record.write_done(&mut queue.done, fields)
                {
                    journal.append(&mut queue.next, queue.ingested, queue.done.as_bytes());
                    if queue.done.capacity() > 64 << 10 {
                        queue.done = String::new();
                    }
                }
                let batch_ready = queue.batch_ready(&shared.health);
                self.wake(queue, batch_ready);
                return;
            }
        }
        match Record::done(String::new(), chrono::Utc::now(), envelope, seq, fields) {
            Some(record) => self.record_stored(record),
            // Not reached: `write_fields` writes an object.
            None => {
                let envelope = envelope.as_ref().clone();
                self.record(Event {
                    session: envelope.session,
                    identity: envelope.identity,
                    target: envelope.target,
                    ..Event::now(completion.to_completion().into_done(seq))
                });
            }
        }
    }

    fn send(&self, record: Record, write_ahead: bool, spare: Option<&mut String>) -> (Durable, Ticket) {
        let shared = &self.handle.shared;
        let mut queue = shared.queue();
        let queue = &mut *queue;
        let journal = shared.journal.as_ref().and_then(|journal| {
            journal
                .append(&mut queue.next, queue.ingested, record.json.as_bytes())
                .map(|()| queue.next)
        });
        let (ack, durable) = match (write_ahead, journal) {
            (false, _) => (None, Durable(Wait::Ready(None))),
            (true, Some(_)) if Journal::crowded(queue.capacity, queue.next.offset, queue.ingested) => {
                (None, Durable(Wait::Crowded(shared.clone())))
            }
            (true, Some(_)) => (None, Durable(Wait::Ready(None))),
            (true, None) => {
                let (ack, durable) = oneshot::channel();
                (Some(ack), Durable(Wait::Commit(durable)))
            }
        };
        let urgent = ack.is_some();
        queue.urgent += usize::from(urgent);
        let ticket = Ticket {
            round: queue.round,
            index: queue.events.len(),
        };
        queue.events.push(Queued { record, ack, journal });
        if let Some(spare) = spare
            && spare.capacity() == 0
            && let Some(buffer) = queue.spares.pop()
        {
            *spare = buffer;
        }
        let batch_ready = queue.batch_ready(&shared.health);
        self.wake(queue, urgent || batch_ready);
        (durable, ticket)
    }

    /// Wakes the writer if it sleeps and this is what it waits for:
    /// `urgent` when someone waits, or the journal holds a batch.
    fn wake(&self, queue: &mut Queue, urgent: bool) {
        let wake = match queue.sleep {
            Sleep::Awake => false,
            Sleep::Idle => true,
            Sleep::Gathering => urgent,
        };
        if wake {
            queue.sleep = Sleep::Awake;
            self.handle.shared.wake.notify_one();
        }
    }

    /// Notes a statement refused because the trail was unavailable; the
    /// count is recorded once it is available again.
    pub fn refused_while_unavailable(&self) {
        self.health_state().refused.fetch_add(1, Ordering::Relaxed);
    }

    fn control(&self, make: impl FnOnce(oneshot::Sender<()>) -> Control) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut queue = self.handle.shared.queue();
        queue.controls.push(make(tx));
        queue.urgent += 1;
        self.wake(&mut queue, true);
        rx
    }

    /// Waits until everything recorded so far is in the store (or given up
    /// on).
    pub async fn flush(&self) {
        let _ = self.control(Control::Flush).await;
    }

    /// Waits until everything recorded so far is in the store and the head
    /// is signed: at shutdown.
    pub async fn sign_now(&self) {
        let _ = self.control(Control::Sign).await;
    }

    pub fn health(&self) -> HealthSnapshot {
        let available = self.available();
        let health = self.health_state();
        HealthSnapshot {
            available,
            // The last error is kept for the outage record; it is news only
            // while the trail is failing.
            error: if available {
                None
            } else {
                health.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
            },
            written: health.written.load(Ordering::Relaxed),
            // Events sent and not yet taken by the writer, counted here
            // rather than by each event: the sessions' hot path touches
            // nothing of the writer's but the queue.
            queued: self.handle.shared.queue().events.len() as u64 + health.retrying.load(Ordering::Relaxed),
        }
    }
}

/// At most this many statements share a row, ...
const ROW_STATEMENTS: usize = 256;

/// ... in at most this many bytes (SQLite takes values up to 1e9, and
/// readers read a row at once), ...
const ROW_BYTES: usize = 1 << 20;

/// ... each of them at most this large (a larger one is a row of its own),
const ROW_MEMBER_BYTES: usize = 64 << 10;

/// ... and they happened within this long of the row's first.
const ROW_SPAN: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// A row of the trail: one event of the batch, or a session's statements.
enum Row {
    Event(usize),
    Statements(usize),
}

/// The rows `batch` is stored as, in order. Each event is a row of its
/// own, except statement events: a session's are kept together, as one
/// [`Detail::Statements`] row in `groups` at the place of its first, until
/// anything but a statement or a completion is recorded (by any session,
/// or none: an approval, a grant, a session's end), the session's own
/// completion of an earlier statement is, or the row reaches
/// [`ROW_STATEMENTS`], [`ROW_BYTES`] or [`ROW_SPAN`]. So a statement keeps
/// its place relative to every event that is neither a statement nor a
/// completion, and a session's statements and completions keep their
/// order; only statements and completions of sessions running side by
/// side may be stored out of their order with each other (a later one of
/// one session ahead of an earlier one of another), by at most
/// [`ROW_SPAN`]. (A completion joined to its statement is stored at the
/// statement's place. One of its own is a statement the writer took before
/// it ended: under load, one of every session at each round, and ending
/// every session's row there would store several times as many rows.)
/// Under load this is what makes the trail cheap: one
/// row, hash and pair of index entries for a hundred statements rather
/// than one each, and a statement shape's classification and columns
/// stored once per row ([`StatementsRow`](super::event::StatementsRow)).
fn rows(batch: &[Queued], groups: &mut Vec<Record>) -> Vec<Row> {
    enum Slot {
        Event(usize),
        Members(usize),
    }
    let mut slots = Vec::with_capacity(batch.len());
    // Each row's members and their bytes.
    let mut members: Vec<(Vec<usize>, usize)> = Vec::new();
    let mut open: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (n, queued) in batch.iter().enumerate() {
        let record = &queued.record;
        let size = record.json.len();
        let session = match record.session() {
            Some(session) if record.kind == "statement" && size <= ROW_MEMBER_BYTES => session,
            Some(session) if record.kind == "statement" || record.kind == "statement_done" => {
                // Too large to share a row, or a completion: its own, and
                // its session's statements after it start another.
                open.remove(session);
                slots.push(Slot::Event(n));
                continue;
            }
            _ => {
                open.clear();
                slots.push(Slot::Event(n));
                continue;
            }
        };
        if let Some(&group) = open.get(session) {
            let (row, bytes) = &mut members[group];
            let first = &batch[row[0]].record;
            if row.len() < ROW_STATEMENTS
                && *bytes + size <= ROW_BYTES
                && record.envelope == first.envelope
                && (record.at - first.at).abs() <= ROW_SPAN
            {
                row.push(n);
                *bytes += size;
                continue;
            }
        }
        open.insert(session, members.len());
        slots.push(Slot::Members(members.len()));
        members.push((vec![n], size));
    }
    let mut rows = Vec::with_capacity(slots.len());
    for slot in slots {
        let group = match slot {
            Slot::Event(n) => {
                rows.push(Row::Event(n));
                continue;
            }
            Slot::Members(group) => &members[group].0,
        };
        let first = &batch[group[0]].record;
        // Room for every member whole (shared parts make it less).
        let capacity = group.iter().map(|&n| batch[n].record.json.len() + 1).sum::<usize>() + 2;
        let Some(mut row) = (group.len() > 1)
            .then(|| super::event::StatementsRow::start(first, capacity))
            .flatten()
        else {
            rows.extend(group.iter().map(|&n| Row::Event(n)));
            continue;
        };
        for &n in &group[1..] {
            row.push(&batch[n].record);
        }
        rows.push(Row::Statements(groups.len()));
        groups.push(Record {
            json: row.finish(),
            at: first.at,
            kind: "statements",
            seq: 0,
            envelope: first.envelope.clone(),
            parts: super::event::Parts::default(),
        });
    }
    rows
}

/// Writes what the journal holds beyond the trail's mark to the trail;
/// returns where the journal continues.
fn recover(journal: &Journal, store: &mut dyn AuditStore, from: Mark) -> Result<Mark, AuditError> {
    let mut records: Vec<Record> = Vec::new();
    // Statements by session and number (`Auditor::complete` joins a
    // completion to its queued statement, of the same session and number,
    // and journals the completion as an event of its own): a completion is
    // joined here when its statement is recovered too, as the writer
    // would have; a statement journaled again with its completion (as
    // earlier builds did) replaces its first form.
    let mut open: std::collections::HashMap<(Option<String>, u64), usize> = std::collections::HashMap::new();
    let mut last = from;
    for (mark, json) in journal.recover(from) {
        match serde_json::from_str::<Event>(&json) {
            Ok(event) => match event.detail {
                Detail::Statement { seq, .. } => match open.get(&(event.session.clone(), seq)) {
                    Some(&at) => records[at] = Record::stored(event, json),
                    None => {
                        open.insert((event.session.clone(), seq), records.len());
                        records.push(Record::stored(event, json));
                    }
                },
                Detail::StatementDone { seq, .. } => {
                    let joined = open
                        .remove(&(event.session.clone(), seq))
                        .zip(Completion::of_done(event.detail.clone()))
                        .is_some_and(|(at, (_, completion))| records[at].join(&completion.to_json(), None));
                    if !joined {
                        records.push(Record::stored(event, json));
                    }
                }
                _ => records.push(Record::stored(event, json)),
            },
            Err(err) => {
                tracing::warn!(error = %err, seq = last.seq, "an event in the audit journal cannot be read; recovery stops there");
                break;
            }
        }
        last = mark;
    }
    if records.is_empty() {
        return Ok(from);
    }
    let refs: Vec<&Record> = records.iter().collect();
    store.append_records(&refs, Some(last))?;
    tracing::warn!(
        events = records.len(),
        journal = %journal.path().display(),
        "recovered audit events the last run left in its journal"
    );
    Ok(last)
}

struct Writer {
    published: tokio::sync::broadcast::Sender<Arc<StoredEvent>>,
    store: Box<dyn AuditStore>,
    signer: Signer,
    options: WriterOptions,
    shared: Arc<Shared>,
    /// Events kept while the store fails, in order.
    retry: VecDeque<Queued>,
    /// What [`Writer::write`] writes in a round: kept empty between
    /// rounds, so that it allocates once it has grown. A fresh one each
    /// round was a large allocation (a -c 50 round takes about 1,200
    /// events): the allocator gave it fresh pages, and the kernel
    /// zeroed a 2 MiB huge page for it 10 times a second. That was a
    /// tenth of the writer's time and flushed a core's cache each time.
    batch: Vec<Queued>,
    /// Buffers of the events just stored, emptied, on their way back to
    /// the sessions ([`Queue::spares`]).
    spares: Vec<String>,
    /// How far ahead the journal's pages are mapped writable.
    prefaulted: u64,
    /// How far into the journal the events taken so far reach.
    taken: Option<Mark>,
    /// The newest signed position.
    last_signed: Option<u64>,
    signed_at: Instant,
    /// When retention last ran.
    pruned_at: Option<Instant>,
}

impl Writer {
    fn run(mut self) {
        // Swapped with the queue's each round, so that neither side
        // allocates once both have grown.
        let mut events: Vec<Queued> = Vec::with_capacity(1024);
        let mut controls: Vec<Control> = Vec::new();
        loop {
            let mut taken = self.taken;
            let closed = self.take(&mut events, &mut controls, &mut taken);
            self.taken = taken;
            let sign = controls.iter().any(|c| matches!(c, Control::Sign(_)));
            // One transaction for everything taken (a round with nothing
            // new still tries a failing store again).
            self.write(&mut events);
            self.shared
                .health
                .retrying
                .store(self.retry.len() as u64, Ordering::Relaxed);
            self.maybe_sign(sign || closed);
            self.maybe_prune();
            for control in controls.drain(..) {
                let (Control::Flush(done) | Control::Sign(done)) = control;
                let _ = done.send(());
            }
            if closed {
                break;
            }
        }
    }

    /// Waits for work, lets journal events gather, and takes what is
    /// queued; returns whether every [`Auditor`] is gone.
    fn take(&self, events: &mut Vec<Queued>, controls: &mut Vec<Control>, taken: &mut Option<Mark>) -> bool {
        let shared = &self.shared;
        let wait = if self.failing() {
            RETRY_EVERY
        } else {
            self.options.sign_interval.max(Duration::from_millis(10))
        };
        let mut queue = shared.queue();
        let deadline = Instant::now() + wait;
        while queue.events.is_empty() && queue.controls.is_empty() && !queue.closed {
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                break;
            };
            queue.sleep = Sleep::Idle;
            queue = shared
                .wake
                .wait_timeout(queue, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if shared.journal.is_some() && !queue.events.is_empty() {
            let deadline = Instant::now() + self.options.gather;
            while queue.gathering(&shared.health) {
                let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                    break;
                };
                queue.sleep = Sleep::Gathering;
                queue = shared
                    .wake
                    .wait_timeout(queue, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        queue.sleep = Sleep::Awake;
        queue.urgent = 0;
        queue.round += 1;
        if self.shared.journal.is_some() {
            // Everything in the journal so far is in what is taken now (a
            // completion that joined its statement has no queue entry of its
            // own, only a journal record).
            *taken = Some(queue.next);
        }
        std::mem::swap(events, &mut queue.events);
        controls.append(&mut queue.controls);
        queue.closed
    }

    fn failing(&self) -> bool {
        self.shared.health.failing.load(Ordering::Acquire)
    }

    /// Writes the retry buffer, then `events`; answers every waiting
    /// session, and lets the journal's space go.
    fn write(&mut self, events: &mut Vec<Queued>) {
        let shared = self.shared.clone();
        let health = &shared.health;
        let refused = health.refused.load(Ordering::Relaxed);
        let lost = health.lost.load(Ordering::Relaxed);
        // While failing, every round tries the store again, with an event
        // that records the outage: its success is the recovery. Refusals
        // counted while that event was being written are recorded in the
        // next round.
        let recovering = self.failing() || refused > 0 || lost > 0;
        if events.is_empty() && self.retry.is_empty() && !recovering {
            return;
        }
        let mut batch = std::mem::take(&mut self.batch);
        batch.extend(self.retry.drain(..));
        if recovering {
            let error = health
                .error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default();
            let error = if lost > 0 {
                format!("{error}; {lost} events could not be kept for a retry and are lost")
            } else {
                error
            };
            batch.push(Queued {
                record: Record::new(Event::now(Detail::AuditUnavailable { refused, error })),
                ack: None,
                journal: None,
            });
        }
        batch.append(events);
        let count = batch.len() as u64;
        let journal = self.taken;
        let mut groups = Vec::new();
        let records: Vec<&Record> = rows(&batch, &mut groups)
            .into_iter()
            .map(|row| match row {
                Row::Event(n) => &batch[n].record,
                Row::Statements(g) => &groups[g],
            })
            .collect();
        match self.store.append_records(&records, journal) {
            Ok(last) => {
                // Read back from their stored forms: the writer is not
                // handed whole events (see `Record`), and this costs only
                // while someone watches the stream.
                if self.published.receiver_count() > 0 {
                    let first = last + 1 - records.len() as u64;
                    for (n, record) in records.iter().enumerate() {
                        if let Ok(event) = record.event() {
                            let _ = self.published.send(Arc::new(StoredEvent {
                                id: first + n as u64,
                                event,
                            }));
                        }
                    }
                }
                drop(records);
                if self.failing() {
                    tracing::warn!("the audit trail is writable again; statements are accepted");
                    health.failing.store(false, Ordering::Release);
                }
                if recovering {
                    health.refused.fetch_sub(refused, Ordering::Relaxed);
                    health.lost.fetch_sub(lost, Ordering::Relaxed);
                }
                health.written.fetch_add(count, Ordering::Relaxed);
                for queued in batch.drain(..) {
                    if let Some(ack) = queued.ack {
                        let _ = ack.send(Ok(()));
                    }
                    let mut json = queued.record.json;
                    if shared.journal.is_some() && json.capacity() <= SPARE_BYTES && self.spares.len() < SPARES_KEPT {
                        json.clear();
                        self.spares.push(json);
                    }
                }
                if let Some(mark) = journal {
                    self.journal_drained(mark);
                }
            }
            Err(err) => {
                drop(records);
                let message = err.to_string();
                if !self.failing() {
                    tracing::error!(error = %message, "the audit trail cannot be written; new statements are refused until it can");
                }
                *health.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
                health.failing.store(true, Ordering::Release);
                // Sessions waiting on a crowded journal go on: what they
                // wait for is on the record, and they refuse what follows.
                self.wake_crowded();
                // Events sessions wait for are answered: their statements
                // do not run. The outage event is made afresh, with fresh
                // counts, on the next try. The rest are kept for it; those
                // in the journal whatever their number.
                let mut kept = 0;
                for queued in batch.drain(..) {
                    if let Some(ack) = queued.ack {
                        let _ = ack.send(Err(Unavailable(message.clone())));
                        continue;
                    }
                    if queued.record.kind == "audit_unavailable" {
                        continue;
                    }
                    if queued.journal.is_some() || kept < MAX_RETRY {
                        kept += usize::from(queued.journal.is_none());
                        self.retry.push_back(queued);
                    } else {
                        health.lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        // A burst (an outage's retries, say) does not keep its size.
        batch.shrink_to(BATCH_KEPT);
        self.batch = batch;
    }

    /// The journal up to `mark` is in the store: its space is free again,
    /// and the stored events' buffers go back to the sessions.
    fn journal_drained(&mut self, mark: Mark) {
        let Some(journal) = &self.shared.journal else { return };
        let next = {
            let mut queue = self.shared.queue();
            queue.ingested = mark.offset;
            for waker in queue.crowded.drain(..) {
                waker.wake();
            }
            let room = SPARES_KEPT.saturating_sub(queue.spares.len()).min(self.spares.len());
            queue.spares.extend(self.spares.drain(..room));
            queue.next.offset
        };
        // Those the sessions have no room for are freed outside the lock.
        self.spares.clear();
        journal.prefault(next, &mut self.prefaulted);
    }

    /// Lets the sessions waiting on a crowded journal go on.
    fn wake_crowded(&self) {
        for waker in self.shared.queue().crowded.drain(..) {
            waker.wake();
        }
    }

    /// Removes what retention no longer keeps, once an hour, and records
    /// that it did.
    fn maybe_prune(&mut self) {
        let Some(retention) = self.options.retention else {
            return;
        };
        if self.failing() || self.pruned_at.is_some_and(|at| at.elapsed() < PRUNE_EVERY) {
            return;
        }
        self.pruned_at = Some(Instant::now());
        let Ok(age) = chrono::Duration::from_std(retention) else {
            return;
        };
        let before = (chrono::Utc::now() - age).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        match self.store.prune(&before) {
            Ok(Some((through_id, events))) => {
                tracing::info!(through_id, events, %before, "audit retention removed old events");
                let mut record = vec![Queued {
                    record: Record::new(Event::now(Detail::AuditPruned {
                        before,
                        through_id,
                        events,
                    })),
                    ack: None,
                    journal: None,
                }];
                self.write(&mut record);
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, "audit retention failed; will try again in an hour"),
        }
    }

    /// Signs the head when enough events or time have passed since the last
    /// signature (or `now`), and keeps it in the store and the head file.
    fn maybe_sign(&mut self, now: bool) {
        let (id, hash) = self.store.head();
        if id == 0 || self.last_signed == Some(id) || self.failing() {
            return;
        }
        let unsigned = id - self.last_signed.unwrap_or(0);
        let due = now || unsigned >= self.options.sign_every || self.signed_at.elapsed() >= self.options.sign_interval;
        if !due {
            return;
        }
        let head = self.signer.sign_head(id, hash);
        if let Err(err) = self.store.record_head(&head) {
            tracing::warn!(error = %err, "cannot record the signed audit head; will try again");
            return;
        }
        // Synced to disk with sync = "full" only: with "normal" the trail
        // itself survives a crash of the gateway, not of the machine, and
        // an fsync per signature was a tenth of the writer's time.
        let sync = self.options.sync == SyncMode::Full;
        if let Err(err) = replace_file(&self.options.head_file, &head.to_line(), sync) {
            tracing::warn!(error = %err, path = %self.options.head_file.display(), "cannot write the audit head file; will try again");
            return;
        }
        self.last_signed = Some(id);
        self.signed_at = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{SqliteStore, SyncMode, read_head_file};

    fn setup(name: &str) -> (PathBuf, Auditor, std::thread::JoinHandle<()>, Signer) {
        let dir = std::env::temp_dir().join(format!("sluice-writer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = SqliteStore::open(&dir.join("audit.db"), SyncMode::Normal).unwrap();
        let (auditor, handle, signer) = start(&dir, Box::new(store));
        (dir, auditor, handle, signer)
    }

    /// A writer over `store` for the trail in `dir` (`sync = "normal"`,
    /// signing every 100 rows), and the signer whose key it uses.
    fn start(dir: &std::path::Path, store: Box<dyn AuditStore>) -> (Auditor, std::thread::JoinHandle<()>, Signer) {
        let key = dir.join("audit.key");
        let signer = Signer::load_or_create(&key).unwrap();
        let (auditor, handle) = Auditor::start(
            store,
            Signer::load_or_create(&key).unwrap(),
            WriterOptions {
                sign_every: 100,
                ..options(dir, SyncMode::Normal)
            },
        )
        .unwrap();
        (auditor, handle, signer)
    }

    /// The options for a trail in `dir`: signing every 1000 rows or at
    /// the end, no retention, the gateway's gathering time.
    fn options(dir: &std::path::Path, sync: SyncMode) -> WriterOptions {
        WriterOptions {
            sign_every: 1000,
            sign_interval: Duration::from_secs(3600),
            head_file: dir.join("audit.head"),
            retention: None,
            journal: crate::audit::journal_path(&dir.join("audit.db")),
            sync,
            gather: GATHER,
        }
    }

    fn grant(n: usize) -> Event {
        Event::now(Detail::UnmaskGrantUsed { grant: format!("g{n}") })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_from_many_tasks_are_all_written_in_one_chain_and_signed() {
        let (dir, auditor, handle, signer) = setup("many");
        let mut tasks = Vec::new();
        for t in 0..8 {
            let auditor = auditor.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..250 {
                    if n % 2 == 0 {
                        auditor.write_ahead(grant(t * 1000 + n)).await.unwrap();
                    } else {
                        auditor.record(grant(t * 1000 + n));
                    }
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        auditor.flush().await;
        assert!(auditor.health().available);
        assert_eq!(auditor.health().written, 2000);
        drop(auditor);
        handle.join().unwrap();
        let head = read_head_file(&dir.join("audit.head")).unwrap().unwrap();
        assert_eq!(head.id, 2000, "the last head is signed when the writer stops");
        let store = SqliteStore::open_read_only(&dir.join("audit.db")).unwrap();
        let report = store.verify(&signer.public_key(), Some(&head)).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.events, report.unsigned_tail()), (2000, 0));
        // Heads are signed per batch once `sign_every` events gathered: how
        // many batches 2000 events make depends on the machine's timing.
        assert!(report.signed_heads >= 1, "{report:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A trail whose every append first runs `before` (which may fail it).
    struct Hooked<F> {
        inner: SqliteStore,
        before: F,
    }

    impl<F: FnMut() -> Result<(), AuditError> + Send> AuditStore for Hooked<F> {
        fn append_records(&mut self, records: &[&Record], journal: Option<Mark>) -> Result<u64, AuditError> {
            (self.before)()?;
            self.inner.append_records(records, journal)
        }
        fn journal_mark(&self) -> Mark {
            self.inner.journal_mark()
        }
        fn head(&self) -> (u64, super::super::Hash) {
            self.inner.head()
        }
        fn record_head(&mut self, head: &super::super::SignedHead) -> Result<(), AuditError> {
            self.inner.record_head(head)
        }
        fn prune(&mut self, before: &str) -> Result<Option<(u64, u64)>, AuditError> {
            self.inner.prune(before)
        }
    }

    /// With `sync = "full"` a write-ahead event waits for its commit, so a
    /// failing store refuses it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_store_refuses_write_ahead_keeps_the_rest_and_recovers() {
        let dir = std::env::temp_dir().join(format!("sluice-writer-flaky-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let broken = Arc::new(AtomicBool::new(false));
        let store = flaky(&dir.join("audit.db"), &broken);
        let key = dir.join("audit.key");
        let signer = Signer::load_or_create(&key).unwrap();
        let (auditor, handle) = Auditor::start(
            store,
            Signer::load_or_create(&key).unwrap(),
            options(&dir, SyncMode::Full),
        )
        .unwrap();
        auditor.write_ahead(grant(1)).await.unwrap();
        broken.store(true, Ordering::SeqCst);
        let err = auditor.write_ahead(grant(2)).await.unwrap_err();
        assert!(err.0.contains("disk full"), "{err}");
        assert!(!auditor.available());
        assert!(auditor.health().error.unwrap().contains("disk full"));
        // Events that were not write-ahead wait for the store.
        auditor.record(grant(3));
        auditor.refused_while_unavailable();
        auditor.flush().await;
        assert_eq!(auditor.health().queued, 1, "the kept event waits");
        broken.store(false, Ordering::SeqCst);
        // Every round of the writer tries the store again (a flush makes
        // one happen now).
        auditor.flush().await;
        assert!(auditor.available());
        assert_eq!(auditor.health().queued, 0);
        auditor.write_ahead(grant(4)).await.unwrap();
        drop(auditor);
        handle.join().unwrap();
        let store = SqliteStore::open_read_only(&dir.join("audit.db")).unwrap();
        assert!(store.verify(&signer.public_key(), None).unwrap().ok());
        let kinds: Vec<String> = store
            .events(&crate::audit::EventFilter::default())
            .unwrap()
            .into_iter()
            .map(|e| e.event.to_json())
            .collect();
        assert_eq!(kinds.len(), 4, "{kinds:#?}");
        assert!(kinds[0].contains("\"g1\""));
        assert!(kinds[1].contains("\"g3\""), "the kept event comes first: {kinds:#?}");
        assert!(kinds[2].contains("audit_unavailable") && kinds[2].contains("\"refused\":1"));
        assert!(kinds[3].contains("\"g4\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// With the journal, an event is durable before the store has it: a
    /// failing store makes the trail unavailable (sessions refuse what
    /// comes next) but loses nothing that was recorded, and what a crash
    /// leaves in the journal is in the trail after the next start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn journal_events_survive_a_failing_store_and_a_crash() {
        let dir = std::env::temp_dir().join(format!("sluice-writer-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let broken = Arc::new(AtomicBool::new(false));
        let key = dir.join("audit.key");
        let signer = Signer::load_or_create(&key).unwrap();
        let options = options(&dir, SyncMode::Normal);
        let store = flaky(&dir.join("audit.db"), &broken);
        let (auditor, handle) = Auditor::start(store, Signer::load_or_create(&key).unwrap(), options.clone()).unwrap();
        auditor.write_ahead(grant(1)).await.unwrap();
        broken.store(true, Ordering::SeqCst);
        auditor.write_ahead(grant(2)).await.expect("durable in the journal");
        auditor.flush().await;
        assert!(!auditor.available(), "the store failed: the trail is unavailable");
        auditor.record(grant(3));
        broken.store(false, Ordering::SeqCst);
        auditor.flush().await;
        assert!(auditor.available());
        drop(auditor);
        handle.join().unwrap();

        // A crash: events in the journal that the store never got.
        {
            let store = SqliteStore::open(&dir.join("audit.db"), SyncMode::Normal).unwrap();
            let journal = Journal::open(&options.journal).unwrap();
            let mut next = store.journal_mark();
            for n in 4..7 {
                journal
                    .append(
                        &mut next,
                        store.journal_mark().offset,
                        Record::new(grant(n)).json.as_bytes(),
                    )
                    .unwrap();
            }
        }
        let store = SqliteStore::open(&dir.join("audit.db"), SyncMode::Normal).unwrap();
        let (auditor, handle) =
            Auditor::start(Box::new(store), Signer::load_or_create(&key).unwrap(), options).unwrap();
        auditor.write_ahead(grant(7)).await.unwrap();
        drop(auditor);
        handle.join().unwrap();

        assert_eq!(
            grants(&verified(&dir, &signer)),
            ["g1", "g2", "g3", "g4", "g5", "g6", "g7"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A journal an earlier version made with a larger ring (16 MiB) is
    /// recovered at its own size, then made anew at this version's; the
    /// numbering goes on, so a crash after that is recovered too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journal_of_another_size_is_recovered_then_replaced() {
        let dir = std::env::temp_dir().join(format!("sluice-writer-resize-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("audit.key");
        let signer = Signer::load_or_create(&key).unwrap();
        let options = options(&dir, SyncMode::Normal);
        let old = 16u64 << 20;
        {
            // What the earlier version left after a crash: its header, its
            // ring, two events the trail never got.
            let file = std::fs::File::create(&options.journal).unwrap();
            let mut header = b"sluice-journal-1".to_vec();
            header.extend_from_slice(&old.to_le_bytes());
            std::os::unix::fs::FileExt::write_all_at(&file, &header, 0).unwrap();
            file.set_len(4096 + old).unwrap();
            drop(file);
            let journal = Journal::open(&options.journal).unwrap();
            assert_eq!(journal.capacity(), old);
            let mut next = Mark::default();
            for n in 1..3 {
                journal
                    .append(&mut next, 0, Record::new(grant(n)).json.as_bytes())
                    .unwrap();
            }
        }
        let store = SqliteStore::open(&dir.join("audit.db"), SyncMode::Normal).unwrap();
        let (auditor, handle) =
            Auditor::start(Box::new(store), Signer::load_or_create(&key).unwrap(), options.clone()).unwrap();
        assert_eq!(
            std::fs::metadata(&options.journal).unwrap().len(),
            4096 + crate::audit::journal::CAPACITY,
            "made anew at this version's size"
        );
        auditor.write_ahead(grant(3)).await.unwrap();
        auditor.flush().await;
        drop(auditor);
        handle.join().unwrap();
        {
            // A crash in the new ring: an event the trail never got.
            let store = SqliteStore::open(&dir.join("audit.db"), SyncMode::Normal).unwrap();
            let journal = Journal::open(&options.journal).unwrap();
            let mut next = store.journal_mark();
            assert_eq!(next.seq, 3, "numbering goes on across the new ring");
            journal
                .append(
                    &mut next,
                    store.journal_mark().offset,
                    Record::new(grant(4)).json.as_bytes(),
                )
                .unwrap();
        }
        let store = SqliteStore::open(&dir.join("audit.db"), SyncMode::Normal).unwrap();
        let (auditor, handle) =
            Auditor::start(Box::new(store), Signer::load_or_create(&key).unwrap(), options).unwrap();
        drop(auditor);
        handle.join().unwrap();
        assert_eq!(grants(&verified(&dir, &signer)), ["g1", "g2", "g3", "g4"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The writer gathers until someone waits, the auditors are gone or a
    /// quarter of the ring waits; a ring that waits because the store
    /// fails does not end the gathering (the store would only be retried
    /// once per event).
    #[test]
    fn the_writer_gathers_until_a_batch_waits_in_a_working_journal() {
        let health = Health::default();
        let mut queue = Queue {
            events: Vec::new(),
            round: 0,
            controls: Vec::new(),
            urgent: 0,
            next: Mark::default(),
            done: String::new(),
            capacity: crate::audit::journal::CAPACITY,
            ingested: 0,
            sleep: Sleep::Gathering,
            closed: false,
            crowded: Vec::new(),
            spares: Vec::new(),
        };
        let quarter = crate::audit::journal::CAPACITY / 4;
        assert!(queue.gathering(&health), "nothing waits");
        queue.next.offset = quarter - 1;
        assert!(queue.gathering(&health), "less than a batch waits");
        queue.next.offset = quarter;
        assert!(queue.batch_ready(&health));
        assert!(!queue.gathering(&health), "a batch waits");
        queue.ingested = 1;
        assert!(queue.gathering(&health), "measured from what SQLite has");
        queue.ingested = 0;
        health.failing.store(true, Ordering::Release);
        assert!(!queue.batch_ready(&health));
        assert!(queue.gathering(&health), "the store fails: nothing drains");
        queue.urgent = 1;
        assert!(!queue.gathering(&health), "someone waits");
        queue.urgent = 0;
        queue.closed = true;
        assert!(!queue.gathering(&health), "every auditor is gone");
    }

    /// A load that fills the journal faster than the writer's gathering
    /// time ends the gathering: the writer takes a batch once a quarter of
    /// the ring waits, and no session stalls at a crowded ring while the
    /// writer sleeps. (Here the gathering time is an hour: without that,
    /// the event past half the ring would wait for it.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journal_filling_faster_than_the_gathering_time_is_taken_in_batches() {
        let dir = std::env::temp_dir().join(format!("sluice-writer-batch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("audit.key");
        let signer = Signer::load_or_create(&key).unwrap();
        let store = SqliteStore::open(&dir.join("audit.db"), SyncMode::Normal).unwrap();
        let (auditor, handle) = Auditor::start(
            Box::new(store),
            Signer::load_or_create(&key).unwrap(),
            WriterOptions {
                gather: Duration::from_secs(3600),
                ..options(&dir, SyncMode::Normal)
            },
        )
        .unwrap();
        // Three quarters of the ring, in events of 32 KiB.
        let events = (crate::audit::journal::CAPACITY * 3 / 4 / (32 << 10)) as usize;
        let wide = |n: usize| {
            Event::now(Detail::UnmaskGrantUsed {
                grant: format!("{n:032}").repeat(1024),
            })
        };
        let written = tokio::time::timeout(Duration::from_secs(120), async {
            for n in 0..events {
                auditor.write_ahead(wide(n)).await.unwrap();
            }
        })
        .await;
        assert!(
            written.is_ok(),
            "a session stalled at a crowded journal while the writer slept"
        );
        auditor.flush().await;
        assert_eq!(auditor.health().written, events as u64);
        drop(auditor);
        handle.join().unwrap();
        verified(&dir, &signer);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn statement(session: &str, seq: u64) -> Event {
        Event::now(Detail::Statement {
            seq,
            source: "query".into(),
            text: format!("SELECT {seq}"),
            decision: "allow".into(),
            rule: None,
            refusal: None,
            statements: vec![],
            done: None,
        })
        .in_session(session)
        .by("alice", "shop")
    }

    fn done(session: &str, seq: u64) -> Event {
        Event::now(completion(seq).into_done(seq))
            .in_session(session)
            .by("alice", "shop")
    }

    fn completion(seq: u64) -> Completion {
        Completion {
            rows: Some(seq),
            duration_us: 250,
            sqlstate: None,
            skipped: false,
            columns: vec![],
            sample: vec![vec![Some(format!("row of {seq}"))]],
        }
    }

    /// A session's envelope, shared by its statements as in a session.
    fn envelope(session: &str) -> Arc<Envelope> {
        static SESSIONS: std::sync::LazyLock<Mutex<std::collections::HashMap<String, Arc<Envelope>>>> =
            std::sync::LazyLock::new(Default::default);
        let mut sessions = SESSIONS.lock().unwrap();
        sessions
            .entry(session.to_string())
            .or_insert_with(|| Envelope::of_session(session, "alice", "shop"))
            .clone()
    }

    /// A statement event as a session records it ([`Record::statement`]).
    fn stored(event: Event) -> Record {
        stored_in(String::new(), event)
    }

    /// [`stored`], written into `buffer`.
    fn stored_in(buffer: String, event: Event) -> Record {
        let Detail::Statement {
            seq,
            source,
            text,
            decision,
            rule,
            refusal,
            statements,
            done: None,
        } = &event.detail
        else {
            unreachable!("a statement without its completion")
        };
        let envelope = envelope(event.session.as_deref().unwrap());
        assert_eq!(*envelope, *Record::new(event.clone()).envelope);
        let record = Record::statement(
            buffer,
            event.at,
            &envelope,
            crate::audit::StatementView {
                seq: *seq,
                source,
                text,
                decision,
                rule: rule.as_deref(),
                refusal: refusal.as_deref(),
                statements: &crate::audit::StatementRecords::new(statements.clone()),
            },
        );
        assert_eq!(record.json, event.to_json());
        record
    }

    /// Records how statement `seq` of `session` ended, as a session does.
    fn complete(auditor: &Auditor, ticket: Option<Ticket>, session: &str, seq: u64) {
        let mut scratch = String::new();
        let done = completion(seq);
        auditor.complete(
            ticket,
            &envelope(session),
            seq,
            done.view(&done.sample_rows()),
            &mut scratch,
        );
    }

    /// The stored form of statement `seq` of `session` with its completion.
    fn joined(session: &str, seq: u64) -> Event {
        let mut event = statement(session, seq);
        if let Detail::Statement { done, .. } = &mut event.detail {
            *done = Some(completion(seq));
        }
        event
    }

    /// What the trail holds, row by row: kind, session, seq, and whether a
    /// statement carries its completion.
    fn rows(store: &SqliteStore) -> Vec<(u64, String, String, u64, bool)> {
        store
            .rows(&crate::audit::EventFilter::default())
            .unwrap()
            .into_iter()
            .map(|row| {
                let (seq, joined) = match &row.event.detail {
                    Detail::Statement { seq, done, .. } => (*seq, done.is_some()),
                    Detail::StatementDone { seq, .. } => (*seq, false),
                    _ => (0, false),
                };
                let session = row.event.session.clone().unwrap_or_default();
                (row.id, row.event.detail.kind().to_string(), session, seq, joined)
            })
            .collect()
    }

    fn row(id: u64, kind: &str, session: &str, seq: u64, joined: bool) -> (u64, String, String, u64, bool) {
        (id, kind.into(), session.into(), seq, joined)
    }

    /// A statement in the journal is durable at once; one held back with
    /// it that waits for its commit keeps both held until then.
    #[tokio::test]
    async fn held_statements_wait_for_every_event_they_hold() {
        let (tx, rx) = oneshot::channel();
        let mut both = Durable(Wait::Commit(rx)).and(Durable(Wait::Ready(None)));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(
            Pin::new(&mut both).poll(&mut cx).is_pending(),
            "the earlier one is not committed yet"
        );
        tx.send(Ok(())).unwrap();
        assert_eq!(Pin::new(&mut both).poll(&mut cx), Poll::Ready(Ok(())));

        let (tx, rx) = oneshot::channel();
        let mut both = Durable(Wait::Ready(None)).and(Durable(Wait::Commit(rx)));
        assert!(Pin::new(&mut both).poll(&mut cx).is_pending());
        tx.send(Err(Unavailable("disk full".into()))).unwrap();
        assert_eq!(
            Pin::new(&mut both).poll(&mut cx),
            Poll::Ready(Err(Unavailable("disk full".into())))
        );
    }

    /// The grants of the unmask-grant events in `store`, in order.
    fn grants(store: &SqliteStore) -> Vec<String> {
        store
            .events(&crate::audit::EventFilter::default())
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.event.detail {
                Detail::UnmaskGrantUsed { grant } => Some(grant),
                _ => None,
            })
            .collect()
    }

    /// The stopped writer's trail in `dir`, which verifies against its
    /// head file.
    fn verified(dir: &std::path::Path, signer: &Signer) -> SqliteStore {
        let store = SqliteStore::open_read_only(&dir.join("audit.db")).unwrap();
        let head = crate::audit::read_head_file(&dir.join("audit.head")).unwrap();
        let report = store.verify(&signer.public_key(), head.as_ref()).unwrap();
        assert!(report.ok(), "{report:?}");
        store
    }

    /// A store that fails while `broken` is set.
    fn flaky(path: &std::path::Path, broken: &Arc<AtomicBool>) -> Box<dyn AuditStore> {
        let broken = broken.clone();
        Box::new(Hooked {
            inner: SqliteStore::open(path, SyncMode::Normal).unwrap(),
            before: move || {
                if broken.load(Ordering::SeqCst) {
                    return Err(AuditError::Setup {
                        path: PathBuf::from("flaky"),
                        reason: "disk full".into(),
                    });
                }
                Ok(())
            },
        })
    }

    /// A writer whose store is inside its first append (of one event) when
    /// this returns: what is sent next waits in the queue, one batch, until
    /// `release` is sent; `flushed` answers once that batch is written too.
    #[allow(clippy::type_complexity)]
    fn gated(
        name: &str,
    ) -> (
        PathBuf,
        Auditor,
        std::thread::JoinHandle<()>,
        Signer,
        std::sync::mpsc::Sender<()>,
        oneshot::Receiver<()>,
    ) {
        let dir = std::env::temp_dir().join(format!("sluice-writer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (entered, entered_rx) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        // Its first append waits until the test lets it go: what is sent
        // meanwhile waits in the queue, whatever the machine's timing.
        let mut entered = Some(entered);
        let store = Hooked {
            inner: SqliteStore::open(&dir.join("audit.db"), SyncMode::Normal).unwrap(),
            before: move || {
                if let Some(entered) = entered.take() {
                    entered.send(()).unwrap();
                    release_rx.recv().unwrap();
                }
                Ok(())
            },
        };
        let (auditor, handle, signer) = start(&dir, Box::new(store));
        // The writer takes this and stays in its append until released.
        auditor.record(grant(0));
        let flushed = auditor.control(Control::Flush);
        entered_rx.recv().unwrap();
        (dir, auditor, handle, signer, release, flushed)
    }

    /// Once the writer has stored statement events, it hands their
    /// emptied buffers back: a session's next statement event is written
    /// into one, and stored whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stored_events_buffers_go_back_to_the_sessions() {
        let (dir, auditor, handle, signer) = setup("spares");
        let mut spare = String::new();
        let (durable, _) = auditor.write_ahead_statement(stored(statement("s1", 1)), &mut spare);
        durable.await.unwrap();
        assert_eq!(spare.capacity(), 0, "nothing is stored yet to hand back");
        auditor.flush().await;
        let (durable, _) = auditor.write_ahead_statement(stored(statement("s1", 2)), &mut spare);
        durable.await.unwrap();
        assert!(spare.is_empty() && spare.capacity() > 0, "{spare:?}");
        let buffer = spare.as_ptr();
        // Written over whatever the buffer held (`stored_in` compares the
        // bytes with the event's serde form).
        let record = stored_in(std::mem::take(&mut spare), statement("s1", 3));
        assert_eq!(record.json.as_ptr(), buffer);
        let (durable, _) = auditor.write_ahead_statement(record, &mut spare);
        durable.await.unwrap();
        drop(auditor);
        handle.join().unwrap();

        let store = verified(&dir, &signer);
        let statements: Vec<Event> = store
            .events(&crate::audit::EventFilter::default())
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .filter(|e| matches!(e.detail, Detail::Statement { .. }))
            .collect();
        let texts: Vec<(u64, &str)> = statements
            .iter()
            .map(|e| match &e.detail {
                Detail::Statement { seq, text, .. } => (*seq, text.as_str()),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(texts, [(1, "SELECT 1"), (2, "SELECT 2"), (3, "SELECT 3")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A completion that comes while its statement's event waits for the
    /// writer joins it: one row. Readers still see the two events.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_completion_joins_its_waiting_statement_in_one_row() {
        let (dir, auditor, handle, signer, release, flushed) = gated("joins");
        let (durable, a) = auditor.write_ahead_statement(stored(statement("s1", 1)), &mut String::new());
        durable.await.unwrap();
        let (durable, b) = auditor.write_ahead_statement(stored(statement("s2", 1)), &mut String::new());
        durable.await.unwrap();
        complete(&auditor, Some(a), "s1", 1);
        // A ticket that does not point at this completion's statement (another
        // number) joins nothing.
        complete(&auditor, Some(b), "s2", 7);
        // The health endpoint's queue depth: the two statements (the first
        // with its completion joined) and the completion that joined
        // nothing.
        assert_eq!(auditor.health().queued, 3);
        release.send(()).unwrap();
        flushed.await.unwrap();
        auditor.flush().await;
        assert_eq!(auditor.health().queued, 0);
        // Taken by the writer already: the completion is a row of its own.
        let (durable, c) = auditor.write_ahead_statement(stored(statement("s1", 2)), &mut String::new());
        durable.await.unwrap();
        auditor.flush().await;
        complete(&auditor, Some(c), "s1", 2);
        complete(&auditor, None, "s2", 1);
        assert_eq!(auditor.health().written, 5);
        drop(auditor);
        handle.join().unwrap();

        let store = verified(&dir, &signer);
        assert_eq!(
            rows(&store)[1..],
            [
                row(2, "statement", "s1", 1, true),
                row(3, "statement", "s2", 1, false),
                row(4, "statement_done", "s2", 7, false),
                row(5, "statement", "s1", 2, false),
                row(6, "statement_done", "s1", 2, false),
                row(7, "statement_done", "s2", 1, false),
            ]
        );
        let events = store.events(&crate::audit::EventFilter::default()).unwrap();
        let kinds: Vec<(u64, &str)> = events.iter().map(|e| (e.id, e.event.detail.kind())).collect();
        assert_eq!(
            kinds[1..],
            [
                (2, "statement"),
                (2, "statement_done"),
                (3, "statement"),
                (4, "statement_done"),
                (5, "statement"),
                (6, "statement_done"),
                (7, "statement_done")
            ]
        );
        let events = &events[1..];
        let Detail::StatementDone { seq, rows, sample, .. } = &events[1].event.detail else {
            panic!("{:?}", events[1]);
        };
        assert_eq!(
            (*seq, *rows, sample.as_slice()),
            (1, Some(1), &[vec![Some("row of 1".to_string())]][..])
        );
        assert_eq!(events[1].event.session.as_deref(), Some("s1"));
        assert_eq!(
            events[1].event.at,
            events[0].event.at + chrono::Duration::microseconds(250)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn opened(session: &str) -> Event {
        Event::now(Detail::SessionOpened {
            client: "127.0.0.1:5000".into(),
            application: "psql".into(),
            tls: false,
            upstream_role: "app".into(),
            subject: "alice".into(),
            email: None,
            groups: vec![],
            labels: Default::default(),
        })
        .in_session(session)
        .by("alice", "shop")
    }

    fn refused(session: &str, seq: u64) -> Event {
        let mut event = statement(session, seq);
        if let Detail::Statement { decision, refusal, .. } = &mut event.detail {
            *decision = "deny".into();
            *refusal = Some("statement refused".into());
        }
        event
    }

    /// Lets a [`gated`] writer go, waits until everything sent is stored,
    /// stops the writer and opens the trail, verified.
    async fn stored_all(
        release: std::sync::mpsc::Sender<()>,
        flushed: oneshot::Receiver<()>,
        auditor: Auditor,
        handle: std::thread::JoinHandle<()>,
        dir: &std::path::Path,
        signer: &Signer,
    ) -> SqliteStore {
        release.send(()).unwrap();
        flushed.await.unwrap();
        auditor.flush().await;
        drop(auditor);
        handle.join().unwrap();
        verified(dir, signer)
    }

    /// A row's members leave out a classification and columns an earlier
    /// member has; readers see each statement whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rows_members_share_a_classification_and_columns_and_read_back_whole() {
        let (dir, auditor, handle, signer, release, flushed) = gated("shared-parts");
        let classified = |relation: &str| crate::audit::StatementRecord {
            kind: "read".into(),
            command: "SELECT".into(),
            relations: vec![format!("public.{relation} (read)")],
            features: vec![],
            tags: vec!["pii".into()],
        };
        let column = |name: &str| crate::audit::ColumnRecord {
            name: name.into(),
            origin: Some(format!("public.customers.{name}")),
            masking: "rule".into(),
            tags: vec!["pii".into()],
        };
        let mut expected = Vec::new();
        auditor.record(opened("s1"));
        // A transaction of two statement shapes, three times over.
        for seq in 1..=6 {
            let mut event = statement("s1", seq);
            let relation = if seq % 2 == 1 { "customers" } else { "orders" };
            if let Detail::Statement { statements, .. } = &mut event.detail {
                *statements = vec![classified(relation)];
            }
            let (_, ticket) = auditor.write_ahead_statement(stored(event.clone()), &mut String::new());
            let done = Completion {
                columns: if seq % 2 == 1 { vec![column("email")] } else { vec![] },
                ..completion(seq)
            };
            let mut scratch = String::new();
            auditor.complete(
                Some(ticket),
                &envelope("s1"),
                seq,
                done.view(&done.sample_rows()),
                &mut scratch,
            );
            if let Detail::Statement { done: joined, .. } = &mut event.detail {
                *joined = Some(done);
            }
            event.expand(&mut expected);
        }
        let store = stored_all(release, flushed, auditor, handle, &dir, &signer).await;
        let rows = store.rows(&crate::audit::EventFilter::default()).unwrap();
        let Some(Detail::Statements {
            statements,
            same_statements,
            same_columns,
        }) = rows
            .iter()
            .map(|row| &row.event.detail)
            .find(|d| d.kind() == "statements")
        else {
            panic!("no statements row: {rows:?}")
        };
        assert_eq!(statements.len(), 6);
        // The first of each shape is stored whole; the rest name it.
        assert_eq!(*same_statements, [[2, 0], [3, 1], [4, 0], [5, 1]]);
        assert_eq!(*same_columns, [[2, 0], [4, 0]]);
        let events: Vec<Event> = store
            .events(&crate::audit::EventFilter::default())
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .filter(|e| matches!(e.detail, Detail::Statement { .. } | Detail::StatementDone { .. }))
            .collect();
        assert_eq!(events, expected);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Each row of the trail: its id, kind and session.
    fn row_kinds(store: &SqliteStore) -> Vec<(u64, &'static str, Option<String>)> {
        store
            .rows(&crate::audit::EventFilter::default())
            .unwrap()
            .into_iter()
            .map(|row| (row.id, row.event.detail.kind(), row.event.session))
            .collect()
    }

    /// Each event the trail's rows stand for: its row's id, its kind,
    /// session and statement number (0 for other events).
    fn event_seqs(store: &SqliteStore) -> Vec<(u64, &'static str, Option<String>, u64)> {
        store
            .events(&crate::audit::EventFilter::default())
            .unwrap()
            .into_iter()
            .map(|e| {
                let seq = match e.event.detail {
                    Detail::Statement { seq, .. } | Detail::StatementDone { seq, .. } => seq,
                    _ => 0,
                };
                (e.id, e.event.detail.kind(), e.event.session, seq)
            })
            .collect()
    }

    /// Statements of one session taken in one batch share a row, until the
    /// session records something else; readers see each statement.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sessions_statements_in_one_batch_share_a_row() {
        let (dir, auditor, handle, signer, release, flushed) = gated("rows");
        // All of this waits in the queue: one batch.
        auditor.record(opened("s1"));
        auditor.record(opened("s2"));
        let (_, s1) = auditor.write_ahead_statement(stored(statement("s1", 1)), &mut String::new());
        complete(&auditor, Some(s1), "s1", 1);
        let _ = auditor.write_ahead_statement(stored(statement("s2", 1)), &mut String::new());
        let _ = auditor.write_ahead_statement(stored(statement("s1", 2)), &mut String::new());
        auditor.record(refused("s2", 2));
        // Anything but a statement ends every session's row: what follows
        // it is stored after it.
        auditor.record(Event::now(Detail::UnmaskGrantUsed { grant: "g".into() }).in_session("s1"));
        let _ = auditor.write_ahead_statement(stored(statement("s1", 3)), &mut String::new());
        let _ = auditor.write_ahead_statement(stored(statement("s2", 3)), &mut String::new());
        auditor.record(grant(9));
        let _ = auditor.write_ahead_statement(stored(statement("s2", 4)), &mut String::new());
        // A large statement is a row of its own; its session's next ones
        // start another.
        let mut large = statement("s1", 4);
        if let Detail::Statement { text, .. } = &mut large.detail {
            *text = "x".repeat(ROW_MEMBER_BYTES);
        }
        let _ = auditor.write_ahead_statement(stored(large), &mut String::new());
        let _ = auditor.write_ahead_statement(stored(statement("s1", 5)), &mut String::new());
        let _ = auditor.write_ahead_statement(stored(statement("s1", 6)), &mut String::new());
        let store = stored_all(release, flushed, auditor, handle, &dir, &signer).await;
        let kinds = row_kinds(&store);
        let s = |s: &str| Some(s.to_string());
        assert_eq!(
            kinds,
            [
                (1, "unmask_grant_used", None),
                (2, "session_opened", s("s1")),
                (3, "session_opened", s("s2")),
                (4, "statements", s("s1")),
                (5, "statements", s("s2")),
                (6, "unmask_grant_used", s("s1")),
                (7, "statement", s("s1")),
                (8, "statement", s("s2")),
                (9, "unmask_grant_used", None),
                (10, "statement", s("s2")),
                (11, "statement", s("s1")),
                (12, "statements", s("s1")),
            ]
        );
        let events = event_seqs(&store);
        assert_eq!(
            events[3..],
            [
                (4, "statement", s("s1"), 1),
                (4, "statement_done", s("s1"), 1),
                (4, "statement", s("s1"), 2),
                (5, "statement", s("s2"), 1),
                (5, "statement", s("s2"), 2),
                (6, "unmask_grant_used", s("s1"), 0),
                (7, "statement", s("s1"), 3),
                (8, "statement", s("s2"), 3),
                (9, "unmask_grant_used", None, 0),
                (10, "statement", s("s2"), 4),
                (11, "statement", s("s1"), 4),
                (12, "statement", s("s1"), 5),
                (12, "statement", s("s1"), 6),
            ]
        );
        // The sessions' summaries count the statements inside rows.
        let sessions = store.sessions(10).unwrap();
        let counts: Vec<(&str, u64, u64)> = sessions
            .iter()
            .map(|s| (s.session.as_str(), s.statements, s.refused))
            .collect();
        assert_eq!(counts, [("s2", 4, 1), ("s1", 6, 0)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A completion of its own (its statement was taken by the writer
    /// before it ended: under load, one of every session at each round)
    /// ends its session's row, and no other: the other sessions' rows go
    /// on across it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_completion_of_its_own_ends_only_its_sessions_row() {
        let (dir, auditor, handle, signer, release, flushed) = gated("done-rows");
        let _ = auditor.write_ahead_statement(stored(statement("s1", 1)), &mut String::new());
        let _ = auditor.write_ahead_statement(stored(statement("s2", 1)), &mut String::new());
        complete(&auditor, None, "s2", 1);
        let _ = auditor.write_ahead_statement(stored(statement("s1", 2)), &mut String::new());
        let _ = auditor.write_ahead_statement(stored(statement("s2", 2)), &mut String::new());
        let _ = auditor.write_ahead_statement(stored(statement("s2", 3)), &mut String::new());
        let store = stored_all(release, flushed, auditor, handle, &dir, &signer).await;
        let s = |s: &str| Some(s.to_string());
        let kinds = row_kinds(&store);
        assert_eq!(
            kinds[1..],
            [
                (2, "statements", s("s1")),
                (3, "statement", s("s2")),
                (4, "statement_done", s("s2")),
                (5, "statements", s("s2")),
            ]
        );
        let events = event_seqs(&store);
        // s1's second statement is stored ahead of s2's completion, which
        // came before it; each session's own order holds.
        assert_eq!(
            events[1..],
            [
                (2, "statement", s("s1"), 1),
                (2, "statement", s("s1"), 2),
                (3, "statement", s("s2"), 1),
                (4, "statement_done", s("s2"), 1),
                (5, "statement", s("s2"), 2),
                (5, "statement", s("s2"), 3),
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A completion that joined its statement in the queue goes into the
    /// journal as a small event of its own, not with its statement again;
    /// a crash then recovers the statement with its completion joined.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_joined_completion_is_journaled_on_its_own_and_recovered_joined() {
        let (dir, auditor, handle, _signer, release, flushed) = gated("journals-done");
        let long = format!("SELECT '{}'", "x".repeat(2000));
        let mut event = statement("s1", 1);
        if let Detail::Statement { text, .. } = &mut event.detail {
            *text = long.clone();
        }
        let (durable, ticket) = auditor.write_ahead_statement(stored(event), &mut String::new());
        durable.await.unwrap();
        complete(&auditor, Some(ticket), "s1", 1);
        // What a crash would leave: the journal, read as `sluice audit
        // verify` reads it while the gateway runs.
        let view = Journal::open_read_only(&crate::audit::journal_path(&dir.join("audit.db")))
            .unwrap()
            .unwrap();
        let records = view.recover(Mark::default());
        let kinds: Vec<(String, usize)> = records
            .iter()
            .map(|(_, json)| {
                (
                    serde_json::from_str::<Event>(json).unwrap().detail.kind().to_string(),
                    json.len(),
                )
            })
            .collect();
        let (last, size) = kinds.last().unwrap();
        assert_eq!(last, "statement_done", "{kinds:?}");
        assert!(*size < 200, "the completion alone, not the statement again: {kinds:?}");
        assert_eq!(
            kinds.iter().filter(|(kind, _)| kind == "statement").count(),
            1,
            "{kinds:?}"
        );
        // Recovered into another trail: one statement, its completion joined.
        let other = dir.join("other");
        std::fs::create_dir_all(&other).unwrap();
        let mut store = SqliteStore::open(&other.join("audit.db"), SyncMode::Normal).unwrap();
        recover(&view, &mut store, Mark::default()).unwrap();
        let rows = store.rows(&crate::audit::EventFilter::default()).unwrap();
        assert_eq!(rows.len(), 2, "the gate's event, then the statement: {rows:?}");
        let Detail::Statement { text, done, .. } = &rows[1].event.detail else {
            panic!("{:?}", rows[1]);
        };
        assert_eq!(text, &long);
        assert_eq!(done.as_ref(), Some(&completion(1)), "its completion joined");
        drop(view);
        release.send(()).unwrap();
        flushed.await.unwrap();
        drop(auditor);
        handle.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// After a crash the journal holds completions as events of their own;
    /// recovery joins each to its statement when that is recovered too, as
    /// the live writer would have.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovery_joins_completions_to_their_statements() {
        let (dir, auditor, handle, signer) = setup("recover-joins");
        let (durable, _) = auditor.write_ahead_statement(stored(statement("s1", 1)), &mut String::new());
        durable.await.unwrap();
        auditor.flush().await;
        drop(auditor);
        handle.join().unwrap();
        {
            let store = SqliteStore::open(&dir.join("audit.db"), SyncMode::Normal).unwrap();
            let journal = Journal::open(&crate::audit::journal_path(&dir.join("audit.db"))).unwrap();
            let mut next = store.journal_mark();
            // s1's second statement, the completion of its first (stored
            // already), s2's first and then s2's first again with its
            // completion (as `Auditor::complete` journals it), and the
            // completion of s1's second, which came after the writer took it.
            for event in [
                statement("s1", 2),
                done("s1", 1),
                statement("s2", 1),
                joined("s2", 1),
                done("s1", 2),
            ] {
                journal
                    .append(
                        &mut next,
                        store.journal_mark().offset,
                        Record::new(event).json.as_bytes(),
                    )
                    .unwrap();
            }
        }
        let store = SqliteStore::open(&dir.join("audit.db"), SyncMode::Normal).unwrap();
        let (auditor, handle, _) = start(&dir, Box::new(store));
        drop(auditor);
        handle.join().unwrap();
        let store = SqliteStore::open_read_only(&dir.join("audit.db")).unwrap();
        let head = read_head_file(&dir.join("audit.head")).unwrap();
        assert!(store.verify(&signer.public_key(), head.as_ref()).unwrap().ok());
        assert_eq!(
            rows(&store),
            [
                row(1, "statement", "s1", 1, false),
                row(2, "statement", "s1", 2, true),
                row(3, "statement_done", "s1", 1, false),
                row(4, "statement", "s2", 1, true),
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
