//! The statement seam: a statement the gate refuses gets an ErrorResponse, is
//! never executed, and leaves the session exactly as a failed statement would
//! (transaction aborted, extended batch discarded until Sync), and usable.

use std::sync::Arc;

use sluice_core::gate::{GateSession, Refusal, StatementContext, StatementGate, Verdict};

use crate::harness::raw::{self, RawClient, first_error, tags};
use crate::harness::{self, ALICE, Spec, TestGateway, db_error};

/// Refuses any statement that mentions `forbidden`.
struct RefuseForbidden;

impl StatementGate for RefuseForbidden {
    fn check(&self, ctx: &StatementContext<'_>, _session: &mut GateSession, sql: &str) -> Verdict {
        if sql.contains("forbidden") {
            Verdict::Deny(Refusal {
                code: "42501",
                message: format!(
                    "statement refused for {} by test rule no-forbidden",
                    ctx.identity.name()
                ),
                hint: Some("ask for approval".into()),
            })
        } else {
            Verdict::allow()
        }
    }
}

fn spec() -> Spec {
    Spec {
        gate: Some(Arc::new(RefuseForbidden)),
        ..Spec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_simple_query_errors_and_session_goes_on() {
    let gw = TestGateway::start("refuse_simple", spec()).await;
    let client = gw.connect(ALICE).await.unwrap();
    let err = client.simple_query("SELECT 'forbidden'").await.unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "42501");
    assert_eq!(message, "statement refused for alice by test rule no-forbidden");
    assert_eq!(err.as_db_error().unwrap().hint(), Some("ask for approval"));
    let rows = client.query("SELECT 41 + 1", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_statement_in_a_transaction_aborts_it() {
    let gw = TestGateway::start("refuse_txn", spec()).await;
    let client = gw.connect(ALICE).await.unwrap();
    client.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    client.batch_execute("BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
    let (code, _) = db_error(&client.batch_execute("DELETE FROM t -- forbidden").await.unwrap_err());
    assert_eq!(code, "42501");
    // As after any error: the transaction is aborted until it ends.
    let (code, _) = db_error(&client.batch_execute("SELECT 1").await.unwrap_err());
    assert_eq!(code, "25P02");
    client.batch_execute("ROLLBACK").await.unwrap();
    let count: i64 = client.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_multi_statement_string_runs_none_of_it() {
    let gw = TestGateway::start("refuse_multi", spec()).await;
    let client = gw.connect(ALICE).await.unwrap();
    client.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let err = client
        .batch_execute("INSERT INTO t VALUES (1); SELECT 'forbidden'; INSERT INTO t VALUES (2)")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "42501");
    let count: i64 = client.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_prepared_statement_and_later_ones_work() {
    let gw = TestGateway::start("refuse_extended", spec()).await;
    let client = gw.connect(ALICE).await.unwrap();
    let err = client.prepare("SELECT $1::text AS forbidden").await.unwrap_err();
    assert_eq!(db_error(&err).0, "42501");
    let statement = client.prepare("SELECT $1::text || '!'").await.unwrap();
    let row = client.query_one(&statement, &[&"ok"]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "ok!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_parse_in_a_pipelined_batch_discards_it_until_sync() {
    let gw = TestGateway::start("refuse_batch", spec()).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, ALICE).await;
    client.simple("CREATE TABLE t (id int)").await;

    // One batch: an insert that runs, then a refused statement, then more.
    let mut batch = Vec::new();
    batch.extend(raw::parse("", "INSERT INTO t VALUES (1)"));
    batch.extend(raw::bind("", ""));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::parse("s2", "SELECT 'forbidden'"));
    batch.extend(raw::bind("", "s2"));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    client.send(&batch).await;
    let messages = client.until_ready().await;
    // ParseComplete, BindComplete, CommandComplete, then the refusal and
    // nothing else until ReadyForQuery.
    assert_eq!(tags(&messages), "12CEZ");
    let error = first_error(&messages);
    assert_eq!(error[&'C'], "42501");
    assert!(error[&'M'].contains("no-forbidden"));
    // The batch was one implicit transaction: the insert is rolled back.
    assert_eq!(messages.last().unwrap().1, b"I");
    assert_eq!(
        client.simple("SELECT count(*) FROM t").await,
        vec![vec![Some("0".into())]]
    );
    // The refused statement was never prepared.
    client
        .send(&[raw::bind("", "s2"), raw::execute("", 0), raw::sync()].concat())
        .await;
    let messages = client.until_ready().await;
    assert_eq!(first_error(&messages)[&'C'], "26000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_not_executed_when_refused() {
    let gw = TestGateway::start("refuse_side_effects", spec()).await;
    let client = gw.connect(ALICE).await.unwrap();
    client.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    for sql in [
        "INSERT INTO t VALUES (1) -- forbidden",
        "/* forbidden */ INSERT INTO t VALUES (2)",
    ] {
        assert!(client.batch_execute(sql).await.is_err());
        assert!(client.execute(sql, &[]).await.is_err());
    }
    let admin = harness::superuser(&gw.db).await;
    let count: i64 = admin.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(count, 0);
}
