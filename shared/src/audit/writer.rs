//! The audit writer: one thread that owns the store and commits events in
//! batches, and the [`Auditor`] handle sessions send events through.
//!
//! The channel to the writer is unbounded on purpose, and bounded in
//! practice by the write-ahead rule: a session sends at most one batch of
//! statements (what one read from its client held) before it waits for their
//! events to be durable, and its other events (session start and end,
//! statement completions) number at most a few per statement. A writer that
//! falls behind therefore slows the sessions down instead of dropping events.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::chain::{Signer, replace_file};
use super::event::{Detail, Event};
use super::sqlite::StoredEvent;
use super::{AuditError, AuditStore};

/// Events per transaction at most.
const MAX_BATCH: usize = 4096;

/// Events kept for a retry while the store cannot write; beyond this they
/// are counted, and the count is written once the store recovers.
const MAX_RETRY: usize = 100_000;

/// How often a failing store is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// How the writer signs and where it keeps the signed head.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Sign the head after this many events.
    pub sign_every: u64,
    /// ... or after this long, if anything is unsigned.
    pub sign_interval: Duration,
    /// The newest signed head, outside the database.
    pub head_file: PathBuf,
    /// Events older than this are removed (in whole signed segments);
    /// `None` keeps everything.
    pub retention: Option<Duration>,
}

/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The trail cannot take events now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the audit trail cannot record events: {0}")]
pub struct Unavailable(pub String);

// Almost every job is a Record: boxing the event would cost an allocation
// per event to shrink the rare Flush.
#[allow(clippy::large_enum_variant)]
enum Job {
    Record(Event, Option<oneshot::Sender<Result<(), Unavailable>>>),
    /// Answers once everything sent before it is durable.
    Flush(oneshot::Sender<()>),
    /// Like Flush, and signs the head first.
    Sign(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct Health {
    failing: AtomicBool,
    error: Mutex<Option<String>>,
    written: AtomicU64,
    /// Events sent and not yet taken by the writer.
    queued: AtomicU64,
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

/// The sessions' handle on the audit trail. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Auditor {
    tx: mpsc::Sender<Job>,
    health: Arc<Health>,
    /// Events as they are committed, for the live stream.
    published: tokio::sync::broadcast::Sender<Arc<StoredEvent>>,
}

/// Committed events a slow subscriber may fall behind by before it is told
/// to catch up from the trail.
const PUBLISH_BUFFER: usize = 4096;

/// Resolves once a write-ahead event is durable, or with why it cannot be.
#[derive(Debug)]
pub struct Durable(oneshot::Receiver<Result<(), Unavailable>>);

impl Future for Durable {
    type Output = Result<(), Unavailable>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|result| result.unwrap_or_else(|_| Err(Unavailable("the audit writer stopped".into()))))
    }
}

impl Auditor {
    /// Starts the writer thread over `store`.
    pub fn start(
        store: Box<dyn AuditStore>,
        signer: Signer,
        options: WriterOptions,
    ) -> Result<(Auditor, std::thread::JoinHandle<()>), AuditError> {
        let (tx, rx) = mpsc::channel();
        let health = Arc::new(Health::default());
        let (published, _) = tokio::sync::broadcast::channel(PUBLISH_BUFFER);
        let writer = Writer {
            published: published.clone(),
            store,
            signer,
            options,
            health: health.clone(),
            retry: VecDeque::new(),
            last_signed: None,
            signed_at: Instant::now(),
            pruned_at: None,
        };
        let handle = std::thread::Builder::new()
            .name("sluice-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|err| AuditError::Setup {
                path: PathBuf::new(),
                reason: format!("cannot start the audit writer thread: {err}"),
            })?;
        Ok((Auditor { tx, health, published }, handle))
    }

    /// Committed events from now on, in order.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<StoredEvent>> {
        self.published.subscribe()
    }

    /// Whether the trail is taking events. A session refuses new statements
    /// while it is not (unless configured to continue).
    pub fn available(&self) -> bool {
        !self.health.failing.load(Ordering::Acquire)
    }

    /// Records an event without waiting for it.
    pub fn record(&self, event: Event) {
        self.health.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Job::Record(event, None)).is_err() {
            self.health.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records an event the caller must not act on before it is durable.
    pub fn write_ahead(&self, event: Event) -> Durable {
        let (ack, durable) = oneshot::channel();
        self.health.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::SendError(Job::Record(_, Some(ack)))) = self.tx.send(Job::Record(event, Some(ack))) {
            let _ = ack.send(Err(Unavailable("the audit writer stopped".into())));
        }
        Durable(durable)
    }

    /// Notes a statement refused because the trail was unavailable; the
    /// count is recorded once it is available again.
    pub fn refused_while_unavailable(&self) {
        self.health.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until everything recorded so far is durable (or given up on).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Waits until everything recorded so far is durable and the head is
    /// signed: at shutdown.
    pub async fn sign_now(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Sign(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    pub fn health(&self) -> HealthSnapshot {
        let available = self.available();
        HealthSnapshot {
            available,
            // The last error is kept for the outage record; it is news only
            // while the trail is failing.
            error: if available {
                None
            } else {
                self.health.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
            },
            written: self.health.written.load(Ordering::Relaxed),
            queued: self.health.queued.load(Ordering::Relaxed) + self.health.retrying.load(Ordering::Relaxed),
        }
    }
}

struct Writer {
    published: tokio::sync::broadcast::Sender<Arc<StoredEvent>>,
    store: Box<dyn AuditStore>,
    signer: Signer,
    options: WriterOptions,
    health: Arc<Health>,
    /// Events that were not write-ahead, kept while the store fails.
    retry: VecDeque<Event>,
    /// The newest signed position.
    last_signed: Option<u64>,
    signed_at: Instant,
    /// When retention last ran.
    pruned_at: Option<Instant>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut events: Vec<Event> = Vec::with_capacity(MAX_BATCH);
        // Write-ahead events' answers, with their place in `events`.
        let mut acks: Vec<(usize, oneshot::Sender<Result<(), Unavailable>>)> = Vec::new();
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        let mut sign = false;
        loop {
            let wait = if self.failing() {
                RETRY_EVERY
            } else {
                self.options.sign_interval.max(Duration::from_millis(10))
            };
            let first = match rx.recv_timeout(wait) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut jobs = first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok()));
            for job in jobs.by_ref() {
                match job {
                    Job::Record(event, ack) => {
                        self.health.queued.fetch_sub(1, Ordering::Relaxed);
                        if let Some(ack) = ack {
                            acks.push((events.len(), ack));
                        }
                        events.push(event);
                    }
                    Job::Flush(done) => flushes.push(done),
                    Job::Sign(done) => {
                        sign = true;
                        flushes.push(done);
                    }
                }
                if events.len() >= MAX_BATCH {
                    break;
                }
            }
            self.write(&mut events, &mut acks);
            self.health.retrying.store(self.retry.len() as u64, Ordering::Relaxed);
            self.maybe_sign(std::mem::take(&mut sign));
            self.maybe_prune();
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
        // Every session is gone: write what is left and sign the end.
        self.health.retrying.store(self.retry.len() as u64, Ordering::Relaxed);
        self.write(&mut events, &mut acks);
        self.maybe_sign(true);
    }

    fn failing(&self) -> bool {
        self.health.failing.load(Ordering::Acquire)
    }

    /// Writes the retry buffer, then `events`; answers every ack.
    fn write(&mut self, events: &mut Vec<Event>, acks: &mut Vec<(usize, oneshot::Sender<Result<(), Unavailable>>)>) {
        let refused = self.health.refused.load(Ordering::Relaxed);
        let lost = self.health.lost.load(Ordering::Relaxed);
        // While failing, every round tries the store again, with an event
        // that records the outage: its success is the recovery. Refusals
        // counted while that event was being written are recorded in the
        // next round.
        let recovering = self.failing() || refused > 0 || lost > 0;
        if events.is_empty() && self.retry.is_empty() && !recovering {
            return;
        }
        let mut batch: Vec<Event> = self.retry.drain(..).collect();
        if recovering {
            let error = self
                .health
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
            batch.push(Event::now(Detail::AuditUnavailable { refused, error }));
        }
        let offset = batch.len();
        batch.append(events);
        let count = batch.len() as u64;
        match self.store.append(&batch) {
            Ok(last) => {
                if self.published.receiver_count() > 0 {
                    let first = last + 1 - batch.len() as u64;
                    for (n, event) in batch.into_iter().enumerate() {
                        let _ = self.published.send(Arc::new(StoredEvent {
                            id: first + n as u64,
                            event,
                        }));
                    }
                }
                if self.failing() {
                    tracing::warn!("the audit trail is writable again; statements are accepted");
                    self.health.failing.store(false, Ordering::Release);
                }
                if recovering {
                    self.health.refused.fetch_sub(refused, Ordering::Relaxed);
                    self.health.lost.fetch_sub(lost, Ordering::Relaxed);
                }
                self.health.written.fetch_add(count, Ordering::Relaxed);
                for (_, ack) in acks.drain(..) {
                    let _ = ack.send(Ok(()));
                }
            }
            Err(err) => {
                let message = err.to_string();
                if !self.failing() {
                    tracing::error!(error = %message, "the audit trail cannot be written; new statements are refused until it can");
                }
                *self.health.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
                self.health.failing.store(true, Ordering::Release);
                // Write-ahead events are answered: their statements do not
                // run. The rest are kept for the next try.
                let mut answered = vec![false; batch.len()];
                for (at, ack) in acks.drain(..) {
                    answered[offset + at] = true;
                    let _ = ack.send(Err(Unavailable(message.clone())));
                }
                // The outage event is made afresh, with fresh counts, on
                // the next try.
                let keep = batch
                    .into_iter()
                    .zip(answered)
                    .filter(|(e, answered)| !answered && !matches!(e.detail, Detail::AuditUnavailable { .. }))
                    .map(|(e, _)| e);
                for event in keep {
                    if self.retry.len() < MAX_RETRY {
                        self.retry.push_back(event);
                    } else {
                        self.health.lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
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
                let mut record = vec![Event::now(Detail::AuditPruned {
                    before,
                    through_id,
                    events,
                })];
                let mut none = Vec::new();
                self.write(&mut record, &mut none);
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
        if let Err(err) = replace_file(&self.options.head_file, &head.to_line()) {
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
        let key = dir.join("audit.key");
        let signer = Signer::load_or_create(&key).unwrap();
        let (auditor, handle) = Auditor::start(
            Box::new(store),
            Signer::load_or_create(&key).unwrap(),
            WriterOptions {
                sign_every: 100,
                sign_interval: Duration::from_secs(3600),
                head_file: dir.join("audit.head"),
                retention: None,
            },
        )
        .unwrap();
        (dir, auditor, handle, signer)
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
        assert!(report.signed_heads >= 2, "{report:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A store that fails while `broken` is set.
    struct Flaky {
        inner: SqliteStore,
        broken: Arc<AtomicBool>,
    }

    impl AuditStore for Flaky {
        fn append(&mut self, events: &[Event]) -> Result<u64, AuditError> {
            if self.broken.load(Ordering::SeqCst) {
                return Err(AuditError::Setup {
                    path: PathBuf::from("flaky"),
                    reason: "disk full".into(),
                });
            }
            self.inner.append(events)
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_store_refuses_write_ahead_keeps_the_rest_and_recovers() {
        let dir = std::env::temp_dir().join(format!("sluice-writer-flaky-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let broken = Arc::new(AtomicBool::new(false));
        let store = Flaky {
            inner: SqliteStore::open(&dir.join("audit.db"), SyncMode::Normal).unwrap(),
            broken: broken.clone(),
        };
        let key = dir.join("audit.key");
        let signer = Signer::load_or_create(&key).unwrap();
        let (auditor, handle) = Auditor::start(
            Box::new(store),
            Signer::load_or_create(&key).unwrap(),
            WriterOptions {
                sign_every: 1000,
                sign_interval: Duration::from_secs(3600),
                head_file: dir.join("audit.head"),
                retention: None,
            },
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
}
