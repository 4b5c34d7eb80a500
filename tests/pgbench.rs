//! pgbench through the gateway: `-i` (DDL, COPY, VACUUM) and short runs in
//! every query mode. Counts, not timings, are asserted: speed lives in bench/.

use crate::harness::{self, ALICE, Spec, TestGateway};

async fn pgbench(gw: &TestGateway, args: &[&str]) -> String {
    let port = gw.addr.port().to_string();
    let output = tokio::process::Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "tester"])
        .args(args)
        .arg(&gw.db)
        .env("PGPASSWORD", ALICE)
        .kill_on_drop(true)
        .output()
        .await
        .expect("running pgbench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

async fn init(test: &str) -> TestGateway {
    let gw = TestGateway::start(test, Spec::default()).await;
    pgbench(&gw, &["-i", "-s", "1", "-q"]).await;
    let admin = harness::superuser(&gw.db).await;
    let accounts: i64 = admin
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(accounts, 100_000);
    gw
}

async fn run(mode: &str) {
    let gw = init(&format!("pgbench_{mode}")).await;
    let text = pgbench(&gw, &["-n", "-c", "4", "-j", "2", "-t", "50", "-M", mode]).await;
    assert!(
        text.contains("number of transactions actually processed: 200/200"),
        "{text}"
    );
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    // The TPC-B-like script wrote one history row per transaction.
    let admin = harness::superuser(&gw.db).await;
    let history: i64 = admin
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple() {
    run("simple").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended() {
    run("extended").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared() {
    run("prepared").await;
}

/// Under load the audit trail keeps exactly one statement event, and one
/// completion, per statement PostgreSQL ran: nothing is dropped when the
/// writer falls behind (sessions wait for it instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_keeps_every_statement_under_load() {
    use sluice_core::audit::{Detail, EventFilter, Signer, SqliteStore, read_head_file};
    let gw = init("pgbench_audit").await;
    // A gateway of its own, so that its trail holds the load run only.
    let mut load = TestGateway::start_for(gw.db.clone(), Spec::default()).await;
    let text = pgbench(&load, &["-n", "-c", "20", "-j", "2", "-t", "50", "-M", "prepared"]).await;
    assert!(
        text.contains("number of transactions actually processed: 1000/1000"),
        "{text}"
    );
    let text = pgbench(&load, &["-n", "-S", "-c", "20", "-j", "2", "-t", "100", "-M", "simple"]).await;
    assert!(
        text.contains("number of transactions actually processed: 2000/2000"),
        "{text}"
    );
    load.shutdown.cancel();
    load.finished().await;

    let store = SqliteStore::open_read_only(&load.audit.path).unwrap();
    let signer = Signer::load_or_create(&load.audit.key_file).unwrap();
    let head = read_head_file(&load.audit.head_file).unwrap();
    assert!(store.verify(&signer.public_key(), head.as_ref()).unwrap().ok());
    let events = store.events(&EventFilter::default()).unwrap();
    let mut executes = 0;
    let mut queries = 0;
    let mut done = 0;
    for stored in &events {
        match &stored.event.detail {
            Detail::Statement { source, text, .. } if source == "execute" => {
                executes += 1;
                assert!(!text.is_empty());
            }
            Detail::Statement { source, text, .. }
                if source == "query" && text.starts_with("SELECT abalance FROM pgbench_accounts WHERE aid = ") =>
            {
                queries += 1
            }
            Detail::StatementDone {
                sqlstate: None,
                skipped: false,
                ..
            } => done += 1,
            _ => {}
        }
    }
    // TPC-B: BEGIN, three UPDATEs, SELECT, INSERT, END per transaction.
    assert_eq!(executes, 7 * 1000);
    assert_eq!(queries, 2000);
    // pgbench's own setup queries (counting branches...) complete too.
    assert!(done >= 9000, "{done}");
    let history: i64 = harness::superuser(&gw.db)
        .await
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, 1000);
}
