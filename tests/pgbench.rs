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
