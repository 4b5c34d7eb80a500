//! Statement policy through the gateway: the demo policy's refusals, denied
//! statements in pipelines and multi-statement strings, monitor mode, and
//! exact row limits in both protocols, inside and outside transactions.

use std::time::Duration;

use futures_util::SinkExt;

use crate::harness::raw::{self, RawClient, first_error, tags};
use crate::harness::{self, ALICE, BOB, Spec, TestGateway, db_error, events};

/// The shipped default policy, as the demo uses it.
fn demo_policy() -> Spec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.toml");
    Spec {
        policy: Some(format!("[policy]\nfile = \"{}\"\n", path.display())),
        ..Spec::default()
    }
}

/// A policy that allows everything for everyone and limits bob's writes.
fn limited(max_rows: u64) -> Spec {
    Spec {
        policy: Some(format!(
            r#"
[policy]
default = "allow"

[[policy.rules]]
name = "bob-small-writes"
decision = "allow"
users = ["bob"]
kinds = ["write", "copy_in"]
max_rows = {max_rows}
"#
        )),
        ..Spec::default()
    }
}

async fn table_with_rows(db: &str, rows: i32) {
    harness::setup(
        db,
        &format!("CREATE TABLE t (id int PRIMARY KEY, note text); INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, {rows}) g"),
    )
    .await;
}

async fn count(db: &str) -> i64 {
    let admin = harness::superuser(db).await;
    admin.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_policy_refuses_drop_for_alice_and_the_session_goes_on() {
    let gw = TestGateway::start("policy_drop", demo_policy()).await;
    harness::setup(&gw.db, "CREATE TABLE customers (id int)").await;
    let client = gw.connect(ALICE).await.unwrap();
    let err = client.batch_execute("DROP TABLE customers").await.unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "42501");
    assert_eq!(
        message,
        "statement refused by rule \"no-drop-or-truncate\": dropping or truncating is not done through the gateway except by leads"
    );
    assert_eq!(
        err.as_db_error().unwrap().hint(),
        Some("ask a lead; they can do it with a second lead's approval")
    );
    // The table is intact and the session usable.
    let rows = client.query("SELECT count(*) FROM customers", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 0);
    // Tricks do not help: a comment, case games, a second statement after a
    // string that looks closed (standard_conforming_strings is on).
    for sql in [
        "/* harmless */ drop /* really */ TABLE \"customers\"",
        "SELECT 'a\\'; DROP TABLE customers; --'",
        "SELECT 1; drop table public.customers",
    ] {
        let (code, _) = db_error(&client.batch_execute(sql).await.unwrap_err());
        assert_eq!(code, "42501", "{sql}");
    }
    let admin = harness::superuser(&gw.db).await;
    admin
        .query_one("SELECT 'customers'::regclass::text", &[])
        .await
        .expect("the table still exists");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_required_holds_a_query_and_a_prepared_statement() {
    let gw = TestGateway::start("policy_approval", demo_policy()).await;
    harness::setup(&gw.db, "CREATE TABLE orders (id int, status text)").await;
    let client = std::sync::Arc::new(gw.connect(ALICE).await.unwrap());
    let cancel = client.cancel_token();
    let api = sluice_core::api::client::ApiClient::new(gw.api.as_deref().unwrap(), Some(harness::BOB));
    // Over either protocol the statement is held until approvers decide
    // (here: until the client gives up and cancels).
    for prepared in [true, false] {
        let held = {
            let client = client.clone();
            tokio::spawn(async move {
                if prepared {
                    client
                        .execute("UPDATE orders SET status = 'paid' WHERE id = $1", &[&1i32])
                        .await
                        .map(|_| ())
                } else {
                    client
                        .batch_execute("UPDATE orders SET status = 'paid' WHERE id = 1")
                        .await
                }
            })
        };
        let request = loop {
            let pending = api
                .approvals()
                .await
                .unwrap()
                .into_iter()
                .find(|r| r.state == sluice_core::approvals::RequestState::Pending);
            if let Some(request) = pending {
                break request;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert_eq!(
            (request.rule.as_str(), request.requester.as_str()),
            ("writes-need-approval", "alice")
        );
        assert_eq!(request.approvers, ["leads", "oncall"]);
        let text = if prepared { "$1" } else { "id = 1" };
        assert!(request.statement.contains(text), "{request:?}");
        cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let err = held.await.unwrap().unwrap_err();
        assert_eq!(err.as_db_error().unwrap().code().code(), "57014", "{err}");
    }
    // The session goes on.
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_statement_in_a_pipeline_leaves_its_neighbours_alone() {
    let gw = TestGateway::start("policy_pipeline", demo_policy()).await;
    harness::setup(&gw.db, "CREATE TABLE customers (id int)").await;
    let client = gw.connect(ALICE).await.unwrap();
    // tokio-postgres pipelines these; each has its own Sync.
    let (a, b, c) = tokio::join!(
        client.query("SELECT 1::int", &[]),
        client.query("DROP TABLE customers", &[]),
        client.query("SELECT 2::int", &[]),
    );
    assert_eq!(a.unwrap()[0].get::<_, i32>(0), 1);
    assert_eq!(db_error(&b.unwrap_err()).0, "42501");
    assert_eq!(c.unwrap()[0].get::<_, i32>(0), 2);

    // One batch with one Sync: the refusal fails the batch, as any error would.
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, ALICE).await;
    let mut batch = Vec::new();
    batch.extend(raw::parse("", "SELECT 1"));
    batch.extend(raw::bind("", ""));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::parse("", "TRUNCATE customers"));
    batch.extend(raw::bind("", ""));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::parse("", "SELECT 2"));
    batch.extend(raw::bind("", ""));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    raw.send(&batch).await;
    let messages = raw.until_ready().await;
    assert_eq!(tags(&messages), "12DCEZ");
    assert!(first_error(&messages)[&'M'].contains("no-drop-or-truncate"));
    assert_eq!(raw.simple("SELECT 3").await, vec![vec![Some("3".into())]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_forbidden_part_stops_the_whole_string() {
    let spec = Spec {
        policy: Some(
            "[policy]\ndefault = \"allow\"\n[[policy.rules]]\nname = \"no-truncate\"\ndecision = \"deny\"\nfeatures = [\"truncate\"]\n"
                .into(),
        ),
        ..Spec::default()
    };
    let gw = TestGateway::start("policy_multi", spec).await;
    table_with_rows(&gw.db, 3).await;
    let client = gw.connect(ALICE).await.unwrap();
    let err = client
        .batch_execute("INSERT INTO t VALUES (10, 'x'); TRUNCATE t; INSERT INTO t VALUES (11, 'y')")
        .await
        .unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "42501");
    assert!(
        message.starts_with("statement 2 of 3 (TRUNCATE on t (truncate)): refused by rule \"no-truncate\""),
        "{message}"
    );
    assert_eq!(count(&gw.db).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_mode_lets_it_run_and_records_the_would_be_decision() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.toml");
    let policy = std::fs::read_to_string(&path)
        .unwrap()
        .replace("mode = \"enforce\"", "mode = \"monitor\"");
    let file = harness::cluster()
        .dev
        .dir()
        .join(format!("monitor-policy-{}.toml", std::process::id()));
    std::fs::write(&file, policy).unwrap();
    let spec = Spec {
        policy: Some(format!("[policy]\nfile = \"{}\"\n", file.display())),
        ..Spec::default()
    };
    let gw = TestGateway::start("policy_monitor", spec).await;
    harness::setup(&gw.db, "CREATE TABLE customers (id int)").await;
    let client = gw.connect(ALICE).await.unwrap();
    client
        .batch_execute("DROP TABLE customers")
        .await
        .expect("monitor mode enforces nothing");
    let recorded = events::for_target(&gw.db);
    let monitor = recorded
        .iter()
        .find(|e| e.message.starts_with("policy monitor"))
        .unwrap_or_else(|| panic!("no monitor event in {recorded:#?}"));
    assert_eq!(monitor.fields["would_be"], "deny");
    assert_eq!(monitor.fields["rule"], "no-drop-or-truncate");
    assert_eq!(monitor.fields["identity"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limit_outside_a_transaction_simple_protocol() {
    let gw = TestGateway::start("limit_simple", limited(3)).await;
    table_with_rows(&gw.db, 10).await;
    let client = gw.connect(BOB).await.unwrap();

    // Within the limit: exactly what PostgreSQL says, committed.
    let rows = client.simple_query("DELETE FROM t WHERE id <= 2").await.unwrap();
    assert!(matches!(
        rows.last(),
        Some(tokio_postgres::SimpleQueryMessage::CommandComplete(2))
    ));
    assert_eq!(count(&gw.db).await, 8);

    // Over it: refused with the count, and nothing changed.
    let err = client.simple_query("DELETE FROM t WHERE id <= 8").await.unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "42501");
    assert_eq!(
        message,
        "statement refused: it would have deleted 6 rows, over the limit of 3 set by rule \"bob-small-writes\"; it was rolled back"
    );
    assert_eq!(count(&gw.db).await, 8);

    // RETURNING: the rows arrive when within the limit, none when over.
    let rows = client
        .simple_query("DELETE FROM t WHERE id IN (3, 4) RETURNING id")
        .await
        .unwrap();
    let returned = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(returned, 2);
    let err = client
        .simple_query("UPDATE t SET note = 'changed' WHERE id > 4 RETURNING id")
        .await
        .unwrap_err();
    assert!(db_error(&err).1.contains("would have updated 6 rows"), "{err}");
    assert_eq!(count(&gw.db).await, 6);
    let admin = harness::superuser(&gw.db).await;
    let changed: i64 = admin
        .query_one("SELECT count(*) FROM t WHERE note = 'changed'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(changed, 0);
    // The session is idle and usable afterwards.
    client.batch_execute("SELECT 1").await.unwrap();
    assert!(!client.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limit_inside_a_transaction() {
    let gw = TestGateway::start("limit_txn", limited(3)).await;
    table_with_rows(&gw.db, 10).await;
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    raw.send(&raw::query("BEGIN")).await;
    raw.until_ready().await;
    raw.send(&raw::query("DELETE FROM t WHERE id <= 2")).await;
    let messages = raw.until_ready().await;
    assert_eq!(tags(&messages), "CZ");
    assert_eq!(messages[1].1, b"T");
    // Over the limit: the transaction is aborted, as after any error.
    raw.send(&raw::query("DELETE FROM t WHERE id > 2")).await;
    let messages = raw.until_ready().await;
    assert_eq!(tags(&messages), "EZ");
    assert_eq!(messages[1].1, b"E");
    assert!(first_error(&messages)[&'M'].contains("would have deleted 8 rows"));
    raw.send(&raw::query("COMMIT")).await;
    let messages = raw.until_ready().await;
    // COMMIT of a failed transaction rolls back.
    assert_eq!(messages[0].1, b"ROLLBACK\0");
    assert_eq!(count(&gw.db).await, 10);

    // Within the limit in a transaction that commits.
    raw.simple("BEGIN").await;
    raw.simple("DELETE FROM t WHERE id = 1").await;
    raw.simple("COMMIT").await;
    assert_eq!(count(&gw.db).await, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limit_in_the_extended_protocol() {
    let gw = TestGateway::start("limit_extended", limited(3)).await;
    table_with_rows(&gw.db, 10).await;
    let mut client = gw.connect(BOB).await.unwrap();
    let delete = client.prepare("DELETE FROM t WHERE id <= $1").await.unwrap();
    assert_eq!(client.execute(&delete, &[&2i32]).await.unwrap(), 2);
    // The same prepared statement, re-executed with a wider reach.
    let err = client.execute(&delete, &[&9i32]).await.unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "42501");
    assert!(
        message.contains("would have deleted 7 rows, over the limit of 3"),
        "{message}"
    );
    assert_eq!(count(&gw.db).await, 8);
    assert_eq!(client.execute(&delete, &[&3i32]).await.unwrap(), 1);

    // RETURNING through the extended protocol.
    let rows = client
        .query("UPDATE t SET note = 'x' WHERE id IN (4, 5) RETURNING id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        client
            .query("UPDATE t SET note = 'y' WHERE id > 3 RETURNING id", &[])
            .await
            .is_err()
    );

    // In a transaction: the refusal aborts it.
    let tx = client.transaction().await.unwrap();
    assert_eq!(tx.execute("DELETE FROM t WHERE id = 4", &[]).await.unwrap(), 1);
    assert!(tx.execute("DELETE FROM t WHERE id > 4", &[]).await.is_err());
    let (code, _) = db_error(&tx.execute("SELECT 1", &[]).await.unwrap_err());
    assert_eq!(code, "25P02");
    tx.rollback().await.unwrap();
    assert_eq!(count(&gw.db).await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limit_on_a_pipelined_batch() {
    let gw = TestGateway::start("limit_batch", limited(3)).await;
    table_with_rows(&gw.db, 10).await;
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    // A write within the limit and one over it, in one batch with one Sync:
    // the batch is one transaction, and the refusal rolls all of it back.
    let mut batch = Vec::new();
    batch.extend(raw::parse("", "DELETE FROM t WHERE id = 1"));
    batch.extend(raw::bind("", ""));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::parse("", "DELETE FROM t WHERE id > 5"));
    batch.extend(raw::bind("", ""));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::parse("", "SELECT 1"));
    batch.extend(raw::sync());
    raw.send(&batch).await;
    let messages = raw.until_ready().await;
    assert_eq!(tags(&messages), "12C12EZ");
    assert!(first_error(&messages)[&'M'].contains("would have deleted 5 rows"));
    assert_eq!(messages.last().unwrap().1, b"I");
    assert_eq!(count(&gw.db).await, 10);
    // A simple Query pipelined behind another waits its turn.
    raw.send(&[raw::query("SELECT 1"), raw::query("DELETE FROM t WHERE id = 10")].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "TDCZ");
    assert_eq!(tags(&raw.until_ready().await), "CZ");
    assert_eq!(count(&gw.db).await, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limit_on_copy_and_sql_prepared_statements() {
    let gw = TestGateway::start("limit_copy", limited(3)).await;
    table_with_rows(&gw.db, 0).await;
    let client = gw.connect(BOB).await.unwrap();
    let copy = |rows: std::ops::Range<i32>| {
        let client = &client;
        async move {
            let sink = client.copy_in("COPY t FROM STDIN").await?;
            futures_util::pin_mut!(sink);
            let data: String = rows.map(|i| format!("{i}\tnote\n")).collect();
            sink.send(bytes::Bytes::from(data)).await?;
            sink.finish().await
        }
    };
    assert_eq!(copy(1..3).await.unwrap(), 2);
    let err = copy(10..15).await.unwrap_err();
    assert!(db_error(&err).1.contains("would have copied 5 rows"), "{err}");
    assert_eq!(count(&gw.db).await, 2);

    // psql's \copy is COPY FROM STDIN in a simple Query: the guard opens a
    // transaction around it and rolls it back when it copies too much.
    let conn = gw.conn_str("bob", BOB, "");
    let over = harness::psql(
        &conn,
        &["-c", "\\copy t from stdin"],
        Some("20\tx\n21\tx\n22\tx\n23\tx\n"),
    )
    .await;
    let err = String::from_utf8_lossy(&over.stderr);
    assert!(
        !over.status.success() && err.contains("would have copied 4 rows"),
        "{err}"
    );
    let within = harness::psql(&conn, &["-c", "\\copy t from stdin"], Some("20\tx\n")).await;
    assert!(within.status.success(), "{within:?}");
    assert_eq!(count(&gw.db).await, 3);
    harness::setup(&gw.db, "DELETE FROM t WHERE id = 20").await;

    // PREPARE carries the limit to EXECUTE.
    client
        .batch_execute("PREPARE wipe(int) AS DELETE FROM t WHERE id >= $1")
        .await
        .unwrap();
    table_with_rows_more(&gw.db).await;
    let err = client.batch_execute("EXECUTE wipe(0)").await.unwrap_err();
    assert!(db_error(&err).1.contains("would have deleted"), "{err}");
    client.batch_execute("EXECUTE wipe(5)").await.unwrap();
    assert_eq!(count(&gw.db).await, 4);
}

/// A Parse of a name that is taken fails on the server, so it must not
/// change what the gateway knows of the statement: a probe parsed `s1` as
/// a big INSERT, then `s1` again as a harmless SELECT (rejected: "already
/// exists"), bound `s1` and inserted past the row limit, recorded as the
/// SELECT. A statement prepared by SQL and bound over the protocol keeps
/// its limit too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limit_holds_when_a_prepared_name_is_reused_or_prepared_by_sql() {
    let mut gw = TestGateway::start("limit_reuse", limited(3)).await;
    table_with_rows(&gw.db, 10).await;
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    raw.send(&[raw::parse("s1", "DELETE FROM t WHERE id > 2"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "1Z");
    raw.send(&[raw::parse("s1", "SELECT 'harmless'"), raw::sync()].concat())
        .await;
    let messages = raw.until_ready().await;
    assert_eq!(tags(&messages), "EZ");
    assert_eq!(first_error(&messages)[&'C'], "42P05");
    raw.send(&[raw::bind("", "s1"), raw::execute("", 0), raw::sync()].concat())
        .await;
    let messages = raw.until_ready().await;
    assert_eq!(tags(&messages), "2EZ", "the DELETE of 8 rows ran");
    assert!(first_error(&messages)[&'M'].contains("would have deleted 8 rows"));
    assert_eq!(count(&gw.db).await, 10);

    // SQL's PREPARE, bound over the protocol; and a protocol name freed by
    // DEALLOCATE and prepared again by SQL.
    raw.send(&[raw::parse("s2", "SELECT 'harmless'"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "1Z");
    for sql in [
        "PREPARE big AS DELETE FROM t WHERE id > 1",
        "DEALLOCATE s2",
        "PREPARE s2 AS UPDATE t SET note = 'x'",
    ] {
        raw.send(&raw::query(sql)).await;
        let messages = raw.until_ready().await;
        assert_eq!(tags(&messages), "CZ", "{sql}: {:?}", first_error(&messages));
    }
    for statement in ["big", "s2"] {
        raw.send(&[raw::bind("", statement), raw::execute("", 0), raw::sync()].concat())
            .await;
        let messages = raw.until_ready().await;
        assert_eq!(tags(&messages), "2EZ", "{statement} ran past its limit");
        assert!(
            first_error(&messages)[&'M'].contains("over the limit of 3"),
            "{statement}"
        );
    }
    assert_eq!(count(&gw.db).await, 10);
    let admin = harness::superuser(&gw.db).await;
    let changed: i64 = admin
        .query_one("SELECT count(*) FROM t WHERE note = 'x'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(changed, 0);
    drop(raw);

    // The trail names what ran, not the rejected text.
    gw.shutdown.cancel();
    gw.finished().await;
    let store = sluice_core::audit::SqliteStore::open_read_only(&gw.audit.path).unwrap();
    // A completion joins its statement's event, or follows as its own
    // (once the writer took the statement).
    let mut executions: Vec<(u64, String, Option<String>)> = Vec::new();
    let mut ended: std::collections::HashMap<u64, Option<String>> = std::collections::HashMap::new();
    for event in store.events(&sluice_core::audit::EventFilter::default()).unwrap() {
        match event.event.detail {
            sluice_core::audit::Detail::Statement {
                seq,
                source,
                text,
                done,
                ..
            } if source == "execute" => executions.push((seq, text, done.and_then(|d| d.sqlstate))),
            sluice_core::audit::Detail::StatementDone { seq, sqlstate, .. } => {
                ended.insert(seq, sqlstate);
            }
            _ => {}
        }
    }
    for execution in &mut executions {
        if let Some(sqlstate) = ended.remove(&execution.0) {
            execution.2 = sqlstate;
        }
    }
    assert_eq!(executions.len(), 3, "{executions:?}");
    assert!(
        executions[0].1.starts_with("DELETE FROM t WHERE id > 2"),
        "{executions:?}"
    );
    assert!(
        !executions.iter().any(|(_, t, _)| t.contains("harmless")),
        "{executions:?}"
    );
    // Each was rolled back: the trail says so, not "ok".
    assert!(
        executions
            .iter()
            .all(|(_, _, sqlstate)| sqlstate.as_deref() == Some("42501")),
        "{executions:?}"
    );
}

/// A portal keeps its row limit through messages about its name that the
/// server rejects or skips. Inside a transaction a portal outlives a
/// savepoint rolled back after it was bound, so the client can go on to
/// execute it after a Bind of the name failed (a named portal that
/// exists; the unnamed one with the wrong parameter count) or a Close of it
/// was skipped (after an error earlier in its batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limit_holds_when_a_portal_name_is_bound_again_or_closed_in_vain() {
    let mut gw = TestGateway::start("limit_portal_reuse", limited(3)).await;
    table_with_rows(&gw.db, 10).await;
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    let refused = |messages: &[raw::Msg], what: &str| {
        assert_eq!(tags(messages), "EZ", "{what}: the DELETE of 8 rows ran");
        let message = &first_error(messages)[&'M'];
        assert!(message.contains("would have deleted 8 rows"), "{what}: {message}");
    };

    raw.simple("BEGIN").await;
    raw.send(
        &[
            raw::parse("w", "DELETE FROM t WHERE id > 2"),
            raw::bind("p", "w"),
            raw::bind("q", "w"),
            raw::bind("r", "w"),
            raw::bind("f", "w"),
            raw::parse("h", "SELECT 'harmless'"),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    assert_eq!(tags(&raw.until_ready().await), "122221Z");
    raw.simple("SAVEPOINT a").await;
    raw.send(&[raw::bind("p", "h"), raw::sync()].concat()).await;
    let messages = raw.until_ready().await;
    assert_eq!(tags(&messages), "EZ");
    assert_eq!(first_error(&messages)[&'C'], "42P03", "portal \"p\" exists");
    raw.simple("ROLLBACK TO a").await;
    raw.send(&[raw::parse("", "SELEC 1"), raw::close(b'P', "q"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "EZ", "the Close is skipped");
    raw.simple("ROLLBACK TO a").await;
    raw.send(&[raw::execute("p", 0), raw::sync()].concat()).await;
    refused(&raw.until_ready().await, "portal bound again");
    raw.simple("ROLLBACK TO a").await;
    raw.send(&[raw::execute("q", 0), raw::sync()].concat()).await;
    refused(&raw.until_ready().await, "portal closed in vain");
    // All in one go: the Execute cannot know yet that the Bind failed.
    raw.simple("ROLLBACK TO a").await;
    raw.send(
        &[
            raw::bind("r", "h"),
            raw::sync(),
            raw::query("ROLLBACK TO a"),
            raw::execute("r", 0),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    assert_eq!(tags(&raw.until_ready().await), "EZ");
    assert_eq!(tags(&raw.until_ready().await), "CZ");
    refused(&raw.until_ready().await, "portal bound again, pipelined");
    // An Execute that asks for a few rows runs a write that returns none
    // whole, and it is counted as ever (JDBC asks for 1 when it wants no
    // results).
    raw.simple("ROLLBACK TO a").await;
    raw.send(&[raw::execute("f", 1), raw::sync()].concat()).await;
    refused(&raw.until_ready().await, "portal executed for a few rows");
    raw.simple("ROLLBACK").await;
    assert_eq!(count(&gw.db).await, 10);

    // The unnamed portal: a simple Query would drop it, so the savepoint
    // is made and rolled back through named portals.
    let through_portal = |name: &str, sql: &str| {
        [
            raw::parse(name, sql),
            raw::bind(name, name),
            raw::execute(name, 0),
            raw::sync(),
        ]
        .concat()
    };
    raw.simple("BEGIN").await;
    raw.send(
        &[
            raw::parse("", "DELETE FROM t WHERE id > 2"),
            raw::bind("", ""),
            raw::parse("one", "SELECT $1::int"),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    assert_eq!(tags(&raw.until_ready().await), "121Z");
    raw.send(&through_portal("sp", "SAVEPOINT b")).await;
    assert_eq!(tags(&raw.until_ready().await), "12CZ");
    raw.send(&[raw::bind("", "one"), raw::sync()].concat()).await;
    let messages = raw.until_ready().await;
    assert_eq!(tags(&messages), "EZ");
    assert_eq!(first_error(&messages)[&'C'], "08P01", "no parameter given");
    raw.send(&through_portal("rb", "ROLLBACK TO b")).await;
    assert_eq!(tags(&raw.until_ready().await), "12CZ");
    raw.send(&[raw::execute("", 0), raw::sync()].concat()).await;
    refused(&raw.until_ready().await, "unnamed portal");
    raw.simple("ROLLBACK").await;
    assert_eq!(count(&gw.db).await, 10);
    drop(raw);

    // The trail names what ran: the DELETE, not the text the failed Binds
    // would have put in its place.
    gw.shutdown.cancel();
    gw.finished().await;
    let store = sluice_core::audit::SqliteStore::open_read_only(&gw.audit.path).unwrap();
    let executions: Vec<String> = store
        .events(&sluice_core::audit::EventFilter::default())
        .unwrap()
        .into_iter()
        .filter_map(|event| match event.event.detail {
            sluice_core::audit::Detail::Statement { source, text, .. } if source == "execute" => Some(text),
            _ => None,
        })
        .filter(|text| !text.starts_with("SAVEPOINT") && !text.starts_with("ROLLBACK"))
        .collect();
    assert_eq!(executions.len(), 5, "{executions:?}");
    assert!(
        executions
            .iter()
            .all(|text| text.starts_with("DELETE FROM t WHERE id > 2")),
        "{executions:?}"
    );
}

/// A statement keeps its row limit through a Close the server skips, and
/// a statement prepared by SQL through a PREPARE of its name that fails
/// and a DEALLOCATE that is skipped; a statement prepared under the name
/// after a Close the server carried out has its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limit_holds_when_a_statement_is_closed_or_prepared_in_vain() {
    let gw = TestGateway::start("limit_statement_vain", limited(3)).await;
    table_with_rows(&gw.db, 10).await;
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    raw.send(&[raw::parse("w", "DELETE FROM t WHERE id > 2"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "1Z");
    raw.send(&[raw::parse("", "SELEC 1"), raw::close(b'S', "w"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "EZ", "the Close is skipped");
    raw.send(&[raw::bind("", "w"), raw::execute("", 0), raw::sync()].concat())
        .await;
    let messages = raw.until_ready().await;
    assert_eq!(tags(&messages), "2EZ", "the DELETE of 8 rows ran");
    assert!(first_error(&messages)[&'M'].contains("would have deleted 8 rows"));
    // Closed for real and prepared again in the same batch: the new
    // statement runs under no limit, and goes on doing so.
    let select = [raw::bind("", "w"), raw::execute("", 0), raw::sync()].concat();
    raw.send(
        &[
            raw::close(b'S', "w"),
            raw::parse("w", "SELECT id FROM t"),
            select.clone(),
        ]
        .concat(),
    )
    .await;
    assert_eq!(tags(&raw.until_ready().await), format!("312{}CZ", "D".repeat(10)));
    raw.send(&select).await;
    assert_eq!(tags(&raw.until_ready().await), format!("2{}CZ", "D".repeat(10)));

    // The unnamed statement: a Parse of it skipped after an error in its
    // batch leaves it as it was.
    raw.send(&[raw::parse("", "DELETE FROM t WHERE id > 2"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "1Z");
    raw.send(&[raw::parse("x", "SELEC 1"), raw::parse("", "SELECT 1"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "EZ", "the second Parse is skipped");
    raw.send(&[raw::bind("", ""), raw::execute("", 0), raw::sync()].concat())
        .await;
    let messages = raw.until_ready().await;
    assert_eq!(tags(&messages), "2EZ", "the unnamed DELETE of 8 rows ran");
    assert!(first_error(&messages)[&'M'].contains("would have deleted 8 rows"));

    // SQL's EXECUTE runs what the protocol prepared, under its limit, and
    // on its own.
    raw.send(&[raw::parse("p1", "DELETE FROM t WHERE id > 2"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "1Z");
    raw.send(&raw::query("EXECUTE p1")).await;
    let messages = raw.until_ready().await;
    assert_eq!(tags(&messages), "EZ", "EXECUTE: the DELETE of 8 rows ran");
    assert!(first_error(&messages)[&'M'].contains("would have deleted 8 rows"));
    for sql in ["SELECT 1; EXECUTE p1", "EXPLAIN ANALYZE EXECUTE p1"] {
        raw.send(&raw::query(sql)).await;
        let messages = raw.until_ready().await;
        assert_eq!(tags(&messages), "EZ", "{sql}: the DELETE ran");
        assert!(
            first_error(&messages)[&'M'].contains("runs only as EXECUTE name"),
            "{sql}"
        );
    }

    // SQL's PREPARE: a second PREPARE of the name fails, a DEALLOCATE
    // after an error in its string is skipped.
    raw.simple("PREPARE big AS DELETE FROM t WHERE id > 2").await;
    for sql in ["PREPARE big AS SELECT 1", "SELECT 1/0; DEALLOCATE big"] {
        raw.send(&raw::query(sql)).await;
        let messages = raw.until_ready().await;
        assert_eq!(tags(&messages), "EZ", "{sql}");
        raw.send(&raw::query("EXECUTE big")).await;
        let messages = raw.until_ready().await;
        assert_eq!(tags(&messages), "EZ", "after {sql}: the DELETE of 8 rows ran");
        assert!(
            first_error(&messages)[&'M'].contains("would have deleted 8 rows"),
            "{sql}"
        );
    }
    assert_eq!(count(&gw.db).await, 10);
}

/// A statement the protocol prepared to run another through SQL EXECUTE
/// runs it at each Bind, where the other's limit is not looked at: a
/// limited write may not be prepared under a name such a statement runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limit_holds_when_execute_is_prepared_before_its_statement() {
    let gw = TestGateway::start("limit_execute_first", limited(3)).await;
    table_with_rows(&gw.db, 10).await;
    let prepare = raw::prepare;
    let run = |name: &str| raw::run(name, 0);
    let cases = [
        ("x1", "EXPLAIN ANALYZE EXECUTE p1", None),
        ("x2", "EXECUTE p2", None),
        ("x3", "explain (analyze, costs off) execute p3", Some("p3")),
        ("x4", "EXECUTE p4", Some("p4")),
    ];
    for (runner, sql, by_protocol) in cases {
        let mut raw = RawClient::connect(gw.addr).await;
        raw.login(&gw.db, BOB).await;
        raw.send(&prepare(runner, sql)).await;
        let messages = raw.until_ready().await;
        assert_eq!(tags(&messages), "1Z", "{sql}: {messages:?}");
        let name = sql.rsplit(' ').next().unwrap();
        let write = "DELETE FROM t WHERE id > 2";
        match by_protocol {
            Some(name) => raw.send(&prepare(name, write)).await,
            None => raw.send(&raw::query(&format!("PREPARE {name} AS {write}"))).await,
        }
        let messages = raw.until_ready().await;
        assert_eq!(tags(&messages), "EZ", "{sql}: {name} was prepared");
        assert!(
            first_error(&messages)[&'M'].contains("this session prepared earlier"),
            "{sql}: {messages:?}"
        );
        raw.send(&run(runner)).await;
        let messages = raw.until_ready().await;
        assert_eq!(first_error(&messages)[&'C'], "26000", "{sql}: {messages:?}");
        assert_eq!(count(&gw.db).await, 10, "{sql}");
    }
    // Statements that only have the word in a name, a string or a
    // comment run no EXECUTE, and one that runs `p9` keeps no other name
    // from a limit: limited writes prepared after them are allowed.
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    for (name, sql) in [
        ("y", "SELECT 1 AS executed_at"),
        ("z", "SELECT 'EXECUTE p5' -- EXECUTE p5"),
        ("w", "EXECUTE p9"),
        ("p6", "DELETE FROM t WHERE id > 2"),
    ] {
        raw.send(&prepare(name, sql)).await;
        assert_eq!(tags(&raw.until_ready().await), "1Z", "{sql}");
    }
    raw.simple("PREPARE p5 AS DELETE FROM t WHERE id > 2").await;
    raw.send(&raw::query("EXECUTE p5")).await;
    let messages = raw.until_ready().await;
    assert!(first_error(&messages)[&'M'].contains("would have deleted 8 rows"));
    assert_eq!(count(&gw.db).await, 10);
    // With a limited statement prepared, only EXECUTE the keyword counts.
    assert_eq!(raw.simple("SELECT 1 AS executed_at").await, [[Some("1".to_string())]]);
}

/// PostgreSQL tells prepared statements and portals apart by their first
/// 63 bytes: two longer names that share them would be one statement to
/// the server and two to the gateway (a limited DELETE prepared as one and
/// bound as the other ran unguarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_postgresql_would_shorten_are_refused() {
    let mut gw = TestGateway::start("limit_long_names", limited(3)).await;
    table_with_rows(&gw.db, 10).await;
    let long = "a".repeat(63);
    let write = "DELETE FROM t WHERE id > 2";
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    for sql in [
        format!("PREPARE {long}b AS {write}"),
        format!("EXECUTE {long}c"),
        format!("DEALLOCATE {long}d"),
        format!("PREPARE é AS {write}"),
    ] {
        raw.send(&raw::query(&sql)).await;
        let error = first_error(&raw.until_ready().await);
        assert_eq!(error[&'C'], "42622", "{sql}: {error:?}");
    }
    // 63 bytes is a name like any other.
    raw.simple(&format!("PREPARE {long} AS {write}")).await;
    raw.send(&raw::query(&format!("EXECUTE {long}"))).await;
    assert!(first_error(&raw.until_ready().await)[&'M'].contains("would have deleted 8 rows"));

    // Through the protocol, a message with such a name is refused in
    // place: an error, the rest of its batch skipped, the session goes on.
    let run =
        |statement: &str, portal: &str| [raw::bind(portal, statement), raw::execute(portal, 0), raw::sync()].concat();
    let cases = [
        (
            [raw::parse(&format!("{long}c"), write), run(&format!("{long}d"), "")].concat(),
            "EZ",
        ),
        ([raw::parse("s", write), run("s", &format!("{long}p"))].concat(), "1EZ"),
        (
            [
                raw::parse("s", write),
                raw::bind("", "s"),
                raw::execute(&format!("{long}p"), 0),
                raw::sync(),
            ]
            .concat(),
            "12EZ",
        ),
        ([raw::parse("s", write), run(&format!("{long}s"), "")].concat(), "1EZ"),
        ([raw::close(b'S', &format!("{long}s")), raw::sync()].concat(), "EZ"),
        ([raw::close(b'P', &format!("{long}p")), raw::sync()].concat(), "EZ"),
        (
            [raw::msg(b'D', format!("S{long}s\0").as_bytes()), raw::sync()].concat(),
            "EZ",
        ),
        // Outside ASCII, a name may grow past 63 bytes in the server's
        // encoding, or fold otherwise.
        ([raw::parse("é", write), run("é", "")].concat(), "EZ"),
        ([raw::parse("s", write), run("s", "Ä")].concat(), "1EZ"),
        // Nor UTF-8 (the server would refuse it in its encoding).
        ([raw::msg(b'E', b"\xff\0\0\0\0\0"), raw::sync()].concat(), "EZ"),
        ([raw::msg(b'B', b"\xff\0s\0\0\0\0\0\0\0"), raw::sync()].concat(), "EZ"),
    ];
    for (case, expected) in cases {
        let mut raw = RawClient::connect(gw.addr).await;
        raw.login(&gw.db, BOB).await;
        raw.send(&case).await;
        let answer = raw.until_ready().await;
        assert_eq!(tags(&answer), expected, "{answer:?}");
        let error = first_error(&answer);
        assert_eq!(
            (error[&'S'].as_str(), error[&'C'].as_str()),
            ("ERROR", "42622"),
            "{answer:?}"
        );
        assert!(
            error[&'M'].contains("PostgreSQL could take it for another name"),
            "{error:?}"
        );
        // The session goes on, its statements too.
        raw.send(&[raw::parse("s2", "SELECT 2"), run("s2", "")].concat()).await;
        assert_eq!(tags(&raw.until_ready().await), "12DCZ");
    }
    // After an error the server skips such a message like any other: the
    // client hears of the first error only.
    raw.send(&[raw::failing(), raw::parse(&format!("{long}e"), write), run("", "")].concat())
        .await;
    let answer = raw.until_ready().await;
    assert_eq!(tags(&answer), "1EZ", "{answer:?}");
    assert_eq!(first_error(&answer)[&'C'], "22012", "{answer:?}");
    // So too once the gateway knows the server skips (it heard of the
    // error): passed on untouched, refused by nobody.
    raw.send(&[raw::failing(), raw::flush()].concat()).await;
    let mut answer = Vec::new();
    while answer.last().map(|(tag, _)| *tag) != Some(b'E') {
        answer.push(raw.recv().await.expect("the error"));
    }
    raw.send(
        &[
            raw::parse(&format!("{long}f"), write),
            raw::close(b'P', "Ä"),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    answer.extend(raw.until_ready().await);
    assert_eq!(tags(&answer), "1EZ", "{answer:?}");
    assert_eq!(first_error(&answer)[&'C'], "22012", "{answer:?}");
    assert_eq!(count(&gw.db).await, 10);

    // On the record as statements refused, with what the client was told.
    gw.shutdown.cancel();
    gw.finished().await;
    let store = sluice_core::audit::SqliteStore::open_read_only(&gw.audit.path).unwrap();
    let refused: Vec<(String, String)> = store
        .events(&sluice_core::audit::EventFilter::default())
        .unwrap()
        .into_iter()
        .filter_map(|event| match event.event.detail {
            sluice_core::audit::Detail::Statement {
                source,
                text,
                refusal: Some(refusal),
                ..
            } if refusal.contains("name refused") => Some((source, text)),
            _ => None,
        })
        .collect();
    let sources: Vec<&str> = refused.iter().map(|(source, _)| source.as_str()).collect();
    // Every message refused, in order, those the server would have
    // skipped after the first refusal of their batch too (the gateway
    // refuses them before it hears of it); a Close or Describe runs no
    // statement.
    assert_eq!(
        sources,
        [
            "parse", "bind", "bind", "execute", "execute", "bind", "parse", "bind", "bind", "execute", "execute",
            "bind", "parse"
        ],
        "{refused:?}"
    );
    assert_eq!(refused[0].1, write, "{refused:?}");
}

/// A row-limited statement the server skips (an error earlier in its
/// batch) never runs, and its batch still ends: the gateway, which holds
/// the client's Sync back until a guarded statement's verdict, does not
/// wait for one that gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_limited_statement_skipped_after_an_error_ends_its_batch() {
    let mut spec = limited(3);
    if let Some(policy) = &mut spec.policy {
        policy.push_str(
            "\n[[policy.rules]]\nname = \"no-drop\"\ndecision = \"deny\"\ngroups = [\"*\"]\nfeatures = [\"drop\"]\n",
        );
    }
    let gw = TestGateway::start("limit_skipped", spec).await;
    table_with_rows(&gw.db, 10).await;
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    raw.send(&[raw::parse("w", "DELETE FROM t WHERE id > 2 RETURNING id"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "1Z");
    // A portal's Execute, and a simple Query the gateway would first open a
    // transaction for (the server skips a Query before Sync too).
    for skipped in [
        [raw::bind("c", "w"), raw::execute("c", 0)].concat(),
        raw::query("DELETE FROM t WHERE id > 2"),
    ] {
        raw.send(&[raw::failing(), skipped, raw::sync()].concat()).await;
        let answer = raw.until_ready().await;
        // (A constant 1/0 fails at the Bind, where it is planned.)
        assert_eq!(tags(&answer), "1EZ", "{answer:?}");
        assert_eq!(first_error(&answer)[&'C'], "22012", "{answer:?}");
    }
    assert_eq!(count(&gw.db).await, 10);
    // The skipped Query's verdict went with it: the next statement gets
    // its own.
    raw.send(&raw::query("DROP TABLE t")).await;
    assert_eq!(first_error(&raw.until_ready().await)[&'C'], "42501");
    // The limit still holds on the session, and what it allows runs.
    raw.send(&raw::query("DELETE FROM t WHERE id > 2")).await;
    assert_eq!(first_error(&raw.until_ready().await)[&'C'], "42501");
    raw.send(&raw::query("DELETE FROM t WHERE id > 8")).await;
    assert_eq!(tags(&raw.until_ready().await), "CZ");
    assert_eq!(count(&gw.db).await, 8);
}

/// A row-limited Query after extended messages with no Sync waits for
/// their answers (it needs the transaction status they leave), which the
/// server sends only once flushed; and its limit holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_limited_query_after_unsynced_messages_is_answered() {
    let gw = TestGateway::start("limit_unsynced", limited(3)).await;
    table_with_rows(&gw.db, 10).await;
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    let before = [raw::parse("", "SELECT 1"), raw::bind("", ""), raw::execute("", 0)].concat();
    raw.send(&[before.clone(), raw::query("DELETE FROM t WHERE id > 8"), raw::sync()].concat())
        .await;
    let answer = raw.until_ready().await;
    assert_eq!(tags(&answer), "12DCCZ", "{answer:?}");
    assert_eq!(tags(&raw.until_ready().await), "Z");
    assert_eq!(count(&gw.db).await, 8);
    raw.send(&[before, raw::query("DELETE FROM t WHERE id > 2"), raw::sync()].concat())
        .await;
    let answer = raw.until_ready().await;
    assert_eq!(tags(&answer), "12DCEZ", "{answer:?}");
    assert_eq!(first_error(&answer)[&'C'], "42501", "{answer:?}");
    assert_eq!(tags(&raw.until_ready().await), "Z");
    assert_eq!(count(&gw.db).await, 8);
}

/// SQL's FETCH and MOVE run a portal the protocol bound, and run a write
/// that returns rows to its end at once, where its rows are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limit_holds_when_sql_fetches_a_limited_portal() {
    let gw = TestGateway::start("limit_fetch", limited(3)).await;
    table_with_rows(&gw.db, 10).await;
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    // A FETCH prepared before the portal exists is checked when it runs.
    raw.send(&[raw::parse("f", "FETCH ALL FROM c"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "1Z");
    raw.simple("BEGIN").await;
    let write = "DELETE FROM t WHERE id > 2 RETURNING id";
    raw.send(&[raw::parse("w", write), raw::bind("c", "w"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "12Z");
    let refused = |messages: &[raw::Msg], what: &str| {
        let error = first_error(messages);
        assert_eq!(error[&'C'], "42501", "{what}: {error:?}");
        assert!(
            error[&'M'].contains("where its rows cannot be counted"),
            "{what}: {error:?}"
        );
    };
    for sql in [
        "FETCH ALL FROM c",
        "fetch forward 1 from c",
        "FETCH c",
        "MOVE ALL IN c",
        "EXECUTE f",
        "SELECT cursor_to_xml('c', 100, false, false, '')",
    ] {
        raw.send(&raw::query(sql)).await;
        refused(&raw.until_ready().await, sql);
    }
    raw.send(&[raw::bind("", "f"), raw::execute("", 0), raw::sync()].concat())
        .await;
    refused(&raw.until_ready().await, "Bind of f");
    raw.send(&[raw::parse("x", "EXECUTE f"), raw::sync()].concat()).await;
    refused(&raw.until_ready().await, "Parse of EXECUTE f");
    raw.simple("ROLLBACK").await;

    // The ROLLBACK ended the portal: a cursor's FETCH runs again.
    async fn fetch_two(raw: &mut RawClient) -> usize {
        raw.simple("BEGIN").await;
        raw.simple("DECLARE k CURSOR FOR SELECT id FROM t ORDER BY id").await;
        let rows = raw.simple("FETCH 2 FROM k").await;
        raw.simple("COMMIT").await;
        rows.len()
    }
    assert_eq!(fetch_two(&mut raw).await, 2);
    // So does one after a batch whose limited portal never ran (an earlier
    // message failed, and the server skipped the rest up to Sync).
    raw.send(&[raw::failing(), raw::bind("c", "w"), raw::execute("c", 0), raw::sync()].concat())
        .await;
    assert_eq!(first_error(&raw.until_ready().await)[&'C'], "22012");
    assert_eq!(fetch_two(&mut raw).await, 2);
    assert_eq!(count(&gw.db).await, 10);

    // A Close the server skips (an error earlier in its batch) leaves the
    // portal to run after a savepoint is rolled back: until its answer, the
    // limit counts.
    raw.simple("BEGIN").await;
    raw.send(&[raw::bind("c", "w"), raw::sync()].concat()).await;
    assert_eq!(tags(&raw.until_ready().await), "2Z");
    raw.simple("SAVEPOINT a").await;
    raw.send(
        &[
            raw::failing(),
            raw::close(b'P', "c"),
            raw::sync(),
            raw::query("ROLLBACK TO SAVEPOINT a; FETCH ALL FROM c"),
        ]
        .concat(),
    )
    .await;
    assert_eq!(first_error(&raw.until_ready().await)[&'C'], "22012");
    refused(&raw.until_ready().await, "FETCH while a Close is unanswered");
    raw.simple("ROLLBACK").await;
    assert_eq!(count(&gw.db).await, 10);

    // A portal bound to a MOVE before the write's portal exists is checked
    // when it runs.
    raw.simple("BEGIN").await;
    raw.send(
        &[
            raw::parse("m", "MOVE ALL IN c"),
            raw::bind("p", "m"),
            raw::bind("c", "w"),
            raw::execute("p", 0),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    refused(&raw.until_ready().await, "Execute of a MOVE portal");
    raw.simple("ROLLBACK").await;

    // cursor_to_xml reaches the unnamed portal too.
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    raw.simple("BEGIN").await;
    raw.send(
        &[
            raw::parse("w", write),
            raw::bind("", "w"),
            raw::parse("u", "SELECT cursor_to_xml('', 100, false, false, '')"),
            raw::bind("q", "u"),
            raw::execute("q", 0),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    refused(&raw.until_ready().await, "cursor_to_xml of the unnamed portal");
    raw.simple("ROLLBACK").await;
    // The protocol's Execute of the portal is counted as ever.
    raw.simple("BEGIN").await;
    raw.send(&[raw::bind("c", "w"), raw::execute("c", 0), raw::sync()].concat())
        .await;
    let messages = raw.until_ready().await;
    assert!(
        first_error(&messages)[&'M'].contains("would have deleted 8 rows"),
        "{messages:?}"
    );
    raw.simple("ROLLBACK").await;
    assert_eq!(count(&gw.db).await, 10);

    // What SQL's PREPARE makes a fetcher is one too.
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    raw.simple("PREPARE f2 AS SELECT cursor_to_xml('c', 100, false, false, '')")
        .await;
    raw.simple("BEGIN").await;
    raw.send(&[raw::parse("w", write), raw::bind("c", "w"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&raw.until_ready().await), "12Z");
    raw.send(&raw::query("EXECUTE f2")).await;
    refused(&raw.until_ready().await, "EXECUTE of a prepared cursor_to_xml");
    raw.simple("ROLLBACK").await;

    // The unnamed statement, once a FETCH, does not make a limited write
    // through the unnamed portal a fetch of itself: it runs, counted.
    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    let unnamed = |sql: &str| raw::unnamed(sql, 0);
    raw.send(&unnamed("FETCH ALL FROM nothing")).await;
    assert_eq!(first_error(&raw.until_ready().await)[&'C'], "34000");
    raw.send(&unnamed("DELETE FROM t WHERE id > 2")).await;
    let messages = raw.until_ready().await;
    assert!(
        first_error(&messages)[&'M'].contains("would have deleted 8 rows"),
        "{messages:?}"
    );
    raw.send(&unnamed("DELETE FROM t WHERE id = 1")).await;
    assert_eq!(tags(&raw.until_ready().await), "12CZ");
    assert_eq!(count(&gw.db).await, 9);
}

/// Two writes whose row counts the guard cannot see are refused under a
/// limit rather than run: a write inside WITH (the command tag is the
/// outer SELECT's) and a write executed a few rows at a time (it runs
/// whole at the first Execute; the guard saw one RETURNING row of 2,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limit_refuses_writes_it_cannot_count() {
    let gw = TestGateway::start("limit_uncounted", limited(3)).await;
    table_with_rows(&gw.db, 10).await;
    let client = gw.connect(BOB).await.unwrap();
    let err = client
        .simple_query("WITH d AS (DELETE FROM t WHERE id > 2 RETURNING 1) SELECT count(*) FROM d")
        .await
        .unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "42501");
    assert!(
        message.contains("cannot count the rows a write inside WITH changes"),
        "{message}"
    );
    assert_eq!(count(&gw.db).await, 10);
    // Within the limit as a statement of its own, it runs.
    client.simple_query("DELETE FROM t WHERE id = 10").await.unwrap();

    let mut raw = RawClient::connect(gw.addr).await;
    raw.login(&gw.db, BOB).await;
    let mut batch = Vec::new();
    batch.extend(raw::parse("", "DELETE FROM t WHERE id > 2 RETURNING id"));
    batch.extend(raw::bind("", ""));
    batch.extend(raw::execute("", 1));
    batch.extend(raw::sync());
    raw.send(&batch).await;
    let messages = raw.until_ready().await;
    assert_eq!(tags(&messages), "12EZ");
    let error = first_error(&messages);
    assert_eq!(error[&'C'], "42501");
    assert!(
        error[&'M'].contains("executed for a few of the rows it returns"),
        "{error:?}"
    );
    assert_eq!(count(&gw.db).await, 9, "rolled back");
    // Executed whole, the same write is counted (and refused: ids 3 to 9).
    let mut batch = Vec::new();
    batch.extend(raw::parse("", "DELETE FROM t WHERE id > 2 RETURNING id"));
    batch.extend(raw::bind("", ""));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    raw.send(&batch).await;
    let messages = raw.until_ready().await;
    assert!(
        first_error(&messages)[&'M'].contains("would have deleted 7 rows"),
        "{messages:?}"
    );
    assert_eq!(count(&gw.db).await, 9);
    // JDBC's executeUpdate asks for 1 row: a write that returns none runs
    // whole and is counted, within the limit and over it.
    let jdbc = |sql: &str| raw::unnamed(sql, 1);
    raw.send(&jdbc("DELETE FROM t WHERE id > 7")).await;
    assert_eq!(tags(&raw.until_ready().await), "12CZ");
    assert_eq!(count(&gw.db).await, 7);
    raw.send(&jdbc("DELETE FROM t WHERE id > 2")).await;
    let messages = raw.until_ready().await;
    assert!(
        first_error(&messages)[&'M'].contains("would have deleted 5 rows"),
        "{messages:?}"
    );
    assert_eq!(count(&gw.db).await, 7);
}

async fn table_with_rows_more(db: &str) {
    harness::setup(db, "INSERT INTO t SELECT g, 'more' FROM generate_series(3, 6) g").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_fails_reports_its_error_like_autocommit() {
    let gw = TestGateway::start("limit_commit", limited(3)).await;
    harness::setup(
        &gw.db,
        "CREATE TABLE parent (id int PRIMARY KEY); \
         CREATE TABLE child (id int, parent int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)",
    )
    .await;
    let client = gw.connect(BOB).await.unwrap();
    // The deferred foreign key fails at COMMIT, which the guard sends.
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        client.batch_execute("INSERT INTO child VALUES (1, 42)"),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(db_error(&err).0, "23503");
    client.batch_execute("SELECT 1").await.unwrap();
}
