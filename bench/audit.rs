//! The audit writer alone: how many events per second it makes durable.
//!
//! `cargo bench --bench audit` (release). For each sync mode it measures
//! (1) throughput: events sent without waiting, then one flush; and
//! (2) write-ahead: C tasks, each sending one event and waiting until it is
//! durable before the next, as sessions do with statements (C = 1, 10, 50).
//! Events are statement events of a realistic size (a pgbench SELECT).
//! Then (3), with `sync = "normal"`, as sessions record statements: ten
//! sessions, each statement written by hand from its parts
//! (`Record::statement`), write-ahead, and its completion joined to it
//! (`Auditor::complete`), with the bytes per statement the trail keeps.
//! Prints the median of ROUNDS runs (env, default 3).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::audit::{
    Auditor, ColumnRecord, CompletionView, Detail, Envelope, Event, Record, SampleRows, Signer, SqliteStore,
    StatementRecord, StatementRecords, StatementView, SyncMode, WriterOptions,
};

fn event(n: u64) -> Event {
    Event::now(Detail::Statement {
        seq: n,
        source: "query".into(),
        text: format!("SELECT abalance FROM pgbench_accounts WHERE aid = {};", n % 1_000_000),
        decision: "allow".into(),
        rule: None,
        refusal: None,
        statements: pgbench_select(),
        done: None,
    })
    .in_session("01a226e8d0b877c19f28ebda52a3ceaa")
    .by("bench", "bench")
}

fn pgbench_select() -> Vec<StatementRecord> {
    vec![StatementRecord {
        kind: "read".into(),
        command: "SELECT".into(),
        relations: vec!["pgbench_accounts (read)".into()],
        features: vec![],
        tags: vec![],
    }]
}

/// Statements recorded as ten sessions record them, `n` in all: each
/// write-ahead (durable at once in the journal, `sync = "normal"`) with
/// its completion joined, then one flush. Returns the
/// statements per second and the bytes of stored events per statement.
fn as_sessions(runtime: &tokio::runtime::Runtime, dir: &std::path::Path, sync: SyncMode, n: u64) -> (f64, f64) {
    let auditor = start(dir, sync);
    let records = StatementRecords::new(pgbench_select());
    let sessions: Vec<Arc<Envelope>> = (0..10)
        .map(|s| Envelope::of_session(&format!("01a226e8d0b877c19f28ebda52a3ce{s:02}"), "bench", "bench"))
        .collect();
    let mut scratch = String::new();
    // Each session's buffer for its next statement event, as in a session.
    let mut spares = vec![String::new(); sessions.len()];
    let columns = [ColumnRecord {
        name: "abalance".into(),
        origin: None,
        masking: "detectors".into(),
        tags: vec![],
    }];
    let (mut sample, mut value) = (SampleRows::default(), String::new());
    let started = Instant::now();
    runtime.block_on(async {
        for i in 0..n {
            let envelope = &sessions[(i % 10) as usize];
            let seq = i / 10 + 1;
            let text = format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
                i * 7919 % 1_000_000
            );
            let view = StatementView {
                seq,
                source: "query",
                text: &text,
                decision: "allow",
                rule: None,
                refusal: None,
                statements: &records,
            };
            let spare = &mut spares[(i % 10) as usize];
            let record = Record::statement(std::mem::take(spare), chrono::Utc::now(), envelope, view);
            let (durable, ticket) = auditor.write_ahead_statement(record, spare);
            durable.await.unwrap();
            // As a session records it: the columns shared, the sample
            // written into a reused buffer.
            sample.clear();
            value.clear();
            write!(value, "{}", i % 5000).unwrap();
            let mut row = sample.row();
            row.value(Some(&value));
            row.finish();
            let completion = CompletionView {
                rows: Some(1),
                duration_us: 40 + i % 60,
                sqlstate: None,
                skipped: false,
                columns: &columns,
                sample: &sample,
            };
            auditor.complete(Some(ticket), envelope, seq, completion, &mut scratch);
        }
        auditor.flush().await;
    });
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(auditor);
    let db = rusqlite::Connection::open_with_flags(dir.join("audit.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let bytes: f64 = db
        .query_row(
            "SELECT SUM(LENGTH(body)) FROM events WHERE kind IN ('statement', 'statements')",
            [],
            |row| row.get(0),
        )
        .unwrap();
    (rate, bytes / n as f64)
}

fn start(dir: &std::path::Path, sync: SyncMode) -> Auditor {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let store = SqliteStore::open(&dir.join("audit.db"), sync).unwrap();
    let signer = Signer::load_or_create(&dir.join("audit.key")).unwrap();
    let (auditor, _thread) = Auditor::start(
        Box::new(store),
        signer,
        WriterOptions {
            sign_every: 1000,
            sign_interval: Duration::from_secs(10),
            head_file: dir.join("audit.head"),
            retention: None,
            journal: sluice_core::audit::journal_path(&dir.join("audit.db")),
            sync,
            gather: sluice_core::audit::GATHER,
        },
    )
    .unwrap();
    auditor
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sluice-audit-bench-{}", std::process::id()));
    println!("audit writer, median of {rounds} runs (events/s durably committed)");
    for (name, sync) in [("full", SyncMode::Full), ("normal", SyncMode::Normal)] {
        let mut throughput = Vec::new();
        for _ in 0..rounds {
            let auditor = start(&dir, sync);
            let n = 200_000u64;
            let started = Instant::now();
            runtime.block_on(async {
                for i in 0..n {
                    auditor.record(event(i));
                }
                auditor.flush().await;
            });
            throughput.push(n as f64 / started.elapsed().as_secs_f64());
        }
        println!(
            "  sync={name:<6}  fire-and-forget          {:>10.0} events/s",
            median(throughput)
        );
        for clients in [1u64, 10, 50] {
            let mut rates = Vec::new();
            let mut latencies = Vec::new();
            for _ in 0..rounds {
                let auditor = start(&dir, sync);
                let per_client = if sync == SyncMode::Full { 200 } else { 2000 };
                let started = Instant::now();
                runtime.block_on(async {
                    let mut tasks = Vec::new();
                    for c in 0..clients {
                        let auditor = auditor.clone();
                        tasks.push(tokio::spawn(async move {
                            for i in 0..per_client {
                                auditor.write_ahead(event(c * 1_000_000 + i)).await.unwrap();
                            }
                        }));
                    }
                    for task in tasks {
                        task.await.unwrap();
                    }
                });
                let elapsed = started.elapsed().as_secs_f64();
                let events = (clients * per_client) as f64;
                rates.push(events / elapsed);
                latencies.push(elapsed / per_client as f64 * 1e6);
            }
            println!(
                "  sync={name:<6}  write-ahead, {clients:>2} writers  {:>10.0} events/s, {:>7.0} µs per event per writer",
                median(rates),
                median(latencies)
            );
        }
        // With sync = "full" each statement would wait for a commit of its
        // own here (one task): that is the write-ahead figure above.
        if sync == SyncMode::Full {
            continue;
        }
        let (mut rates, mut bytes) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (rate, per_statement) = as_sessions(&runtime, &dir, sync, 200_000);
            rates.push(rate);
            bytes.push(per_statement);
        }
        println!(
            "  sync={name:<6}  as 10 sessions record    {:>10.0} statements/s with their completions, {:>4.0} bytes each in the trail",
            median(rates),
            median(bytes)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
