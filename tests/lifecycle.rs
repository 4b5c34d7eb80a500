//! Sessions from start to end: cancel keys, the connection limit, graceful
//! shutdown, Terminate, disconnects on either side, Flush and FunctionCall.

use std::time::Duration;

use crate::harness::raw::{self, RawClient, first_error, msg, tags};
use crate::harness::{self, ALICE, BOB, Spec, TestGateway, db_error};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaches_the_backend() {
    let gw = TestGateway::start("cancel", Spec::default()).await;
    let client = gw.connect(ALICE).await.unwrap();
    let token = client.cancel_token();
    let admin = harness::superuser(&gw.db).await;
    let sleeper = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(60)").await });
    harness::eventually("the sleep to run", || async {
        harness::running(&admin, "SELECT pg_sleep(60)").await > 0
    })
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), sleeper)
        .await
        .unwrap()
        .unwrap();
    let (code, message) = db_error(&result.unwrap_err());
    assert_eq!(code, "57014");
    assert_eq!(message, "canceling statement due to user request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sees_the_real_pid_and_only_the_gateway_key_cancels() {
    let gw = TestGateway::start("cancel_keys", Spec::default()).await;
    let mut client = RawClient::connect(gw.addr).await;
    let greeting = client.login(&gw.db, ALICE).await;
    let pid = client.simple("SELECT pg_backend_pid()").await;
    assert_eq!(pid, vec![vec![Some(greeting.process_id.to_string())]]);
    assert!(greeting.params.contains_key("server_version"));

    client.send(&raw::query("SELECT pg_sleep(60)")).await;
    let admin = harness::superuser(&gw.db).await;
    let backend = greeting.process_id;
    harness::eventually("the sleep to run", || async {
        !admin
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&backend],
            )
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    // A wrong key is ignored.
    let mut wrong = RawClient::connect(gw.addr).await;
    wrong
        .send(
            &[
                &16i32.to_be_bytes()[..],
                &80_877_102i32.to_be_bytes(),
                &backend.to_be_bytes(),
                &(greeting.secret_key ^ 1).to_be_bytes(),
            ]
            .concat(),
        )
        .await;
    assert!(wrong.until_closed().await.is_empty());
    let still_running = admin
        .query(
            "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
            &[&backend],
        )
        .await
        .unwrap();
    assert_eq!(still_running.len(), 1);
    // The key the gateway handed out cancels.
    let mut cancel = RawClient::connect(gw.addr).await;
    cancel
        .send(
            &[
                &16i32.to_be_bytes()[..],
                &80_877_102i32.to_be_bytes(),
                &backend.to_be_bytes(),
                &greeting.secret_key.to_be_bytes(),
            ]
            .concat(),
        )
        .await;
    assert!(cancel.until_closed().await.is_empty());
    let messages = client.until_ready().await;
    assert_eq!(first_error(&messages)[&'C'], "57014");
}

/// Connects as alice once the gateway has seen a client of hers leave and
/// freed its slot.
async fn connect_once_freed(gw: &TestGateway) -> tokio_postgres::Client {
    let mut attempts = 0;
    loop {
        match gw.connect(ALICE).await {
            Ok(client) => return client,
            Err(_) if attempts < 500 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => panic!("slot never freed: {err}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit() {
    let spec = Spec {
        max_connections: Some(2),
        ..Spec::default()
    };
    let gw = TestGateway::start("limit", spec).await;
    let first = gw.connect(ALICE).await.unwrap();
    let second = gw.connect(ALICE).await.unwrap();
    let err = gw.connect(ALICE).await.unwrap_err();
    assert_eq!(
        db_error(&err),
        (
            "53300".into(),
            "too many connections: the gateway serves at most 2 sessions".into()
        )
    );
    second.batch_execute("SELECT 1").await.unwrap();
    drop(second);
    let third = connect_once_freed(&gw).await;
    third.batch_execute("SELECT 1").await.unwrap();
    first.batch_execute("SELECT 1").await.unwrap();
}

/// One identity cannot take every upstream connection from the others: a
/// probe held 296 idle sessions as alice, and everyone else got "could not
/// connect to target".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_identity_are_limited() {
    let spec = Spec {
        max_sessions_per_identity: Some(2),
        ..Spec::default()
    };
    let gw = TestGateway::start("identity_limit", spec).await;
    let first = gw.connect(ALICE).await.unwrap();
    let second = gw.connect(ALICE).await.unwrap();
    let err = gw.connect(ALICE).await.unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "53300");
    assert_eq!(
        message,
        "alice has 2 sessions through the gateway already, the most one identity may have"
    );
    // Others are not held back by alice's sessions.
    let bob = gw.connect(BOB).await.unwrap();
    bob.batch_execute("SELECT 1").await.unwrap();
    drop(second);
    let third = connect_once_freed(&gw).await;
    third.batch_execute("SELECT 1").await.unwrap();
    first.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_transactions_finish() {
    let mut gw = TestGateway::start("shutdown", Spec::default()).await;
    let mut idle = RawClient::connect(gw.addr).await;
    idle.login(&gw.db, ALICE).await;
    let mut busy = RawClient::connect(gw.addr).await;
    busy.login(&gw.db, ALICE).await;
    busy.simple("CREATE TABLE t (id int)").await;
    busy.send(&raw::query("BEGIN; INSERT INTO t VALUES (1)")).await;
    assert_eq!(busy.until_ready().await.last().unwrap().1, b"T");

    gw.shutdown.cancel();
    // The idle session is ended at once, with a reason.
    let error = first_error(&idle.until_closed().await);
    assert_eq!(error[&'C'], "57P01");
    assert_eq!(error[&'M'], "terminating connection: the gateway is shutting down");
    // No new sessions.
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
    // The session in a transaction may finish it, and is ended afterwards.
    assert_eq!(
        busy.simple("INSERT INTO t VALUES (2) RETURNING id").await,
        vec![vec![Some("2".into())]]
    );
    busy.send(&raw::query("COMMIT")).await;
    assert_eq!(busy.until_ready().await.last().unwrap().1, b"I");
    assert_eq!(first_error(&busy.until_closed().await)[&'C'], "57P01");
    gw.finished().await;
    let admin = harness::superuser(&gw.db).await;
    let count: i64 = admin.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deadline_ends_open_transactions() {
    let spec = Spec {
        shutdown_grace: "300ms",
        ..Spec::default()
    };
    let mut gw = TestGateway::start("deadline", spec).await;
    let mut busy = RawClient::connect(gw.addr).await;
    busy.login(&gw.db, ALICE).await;
    busy.send(&raw::query("BEGIN")).await;
    busy.until_ready().await;
    gw.shutdown.cancel();
    let error = first_error(&busy.until_closed().await);
    assert_eq!(error[&'C'], "57P01");
    assert!(error[&'M'].contains("grace period is over"), "{error:?}");
    gw.finished().await;
}

/// A statement still running at the deadline is cancelled on the server,
/// not left to run after its session (and the gateway) are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deadline_cancels_running_statements() {
    let spec = Spec {
        shutdown_grace: "300ms",
        ..Spec::default()
    };
    let mut gw = TestGateway::start("deadline_running", spec).await;
    let admin = harness::superuser(&gw.db).await;
    let sleeping = || harness::running(&admin, "SELECT pg_sleep(600)");
    let mut busy = RawClient::connect(gw.addr).await;
    busy.login(&gw.db, ALICE).await;
    busy.send(&raw::query("SELECT pg_sleep(600)")).await;
    harness::eventually("the statement to run", || async { sleeping().await == 1 }).await;
    gw.shutdown.cancel();
    let error = first_error(&busy.until_closed().await);
    assert_eq!(error[&'C'], "57P01");
    gw.finished().await;
    harness::eventually("the server to stop the statement", || async { sleeping().await == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_and_disconnect_end_the_upstream_session() {
    let gw = TestGateway::start("terminate", Spec::default()).await;
    let admin = harness::superuser(&gw.db).await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE t (id int); GRANT ALL ON t TO {}",
            harness::APP_ROLE
        ))
        .await
        .unwrap();
    let alive = |pid: i32| {
        let admin = &admin;
        async move {
            !admin
                .query("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
                .await
                .unwrap()
                .is_empty()
        }
    };

    let mut client = RawClient::connect(gw.addr).await;
    let greeting = client.login(&gw.db, ALICE).await;
    client.send(&msg(b'X', b"")).await;
    assert!(client.until_closed().await.is_empty());
    harness::eventually("the backend to exit after Terminate", || async {
        !alive(greeting.process_id).await
    })
    .await;

    // A client vanishing mid-transaction: the backend ends and rolls back.
    let mut client = RawClient::connect(gw.addr).await;
    let greeting = client.login(&gw.db, ALICE).await;
    client.send(&raw::query("BEGIN; INSERT INTO t VALUES (1)")).await;
    client.until_ready().await;
    drop(client);
    harness::eventually("the backend to exit after a disconnect", || async {
        !alive(greeting.process_id).await
    })
    .await;
    let count: i64 = admin.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_terminated_by_an_administrator() {
    let gw = TestGateway::start("admin_kill", Spec::default()).await;
    let mut client = RawClient::connect(gw.addr).await;
    let greeting = client.login(&gw.db, ALICE).await;
    let admin = harness::superuser(&gw.db).await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&greeting.process_id])
        .await
        .unwrap();
    // PostgreSQL's own FATAL passes through, then the session closes.
    let error = first_error(&client.until_closed().await);
    assert_eq!(error[&'C'], "57P01");
    assert_eq!(error[&'M'], "terminating connection due to administrator command");
    gw.connect(ALICE)
        .await
        .expect("the gateway serves on")
        .batch_execute("SELECT 1")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_gets_answers_without_sync() {
    let gw = TestGateway::start("flush", Spec::default()).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, ALICE).await;
    client.send(&[raw::parse("s", "SELECT 1"), raw::flush()].concat()).await;
    // Without Sync the server only answers because of Flush.
    let (tag, _) = client.recv().await.unwrap();
    assert_eq!(tag, b'1');
    client
        .send(&[raw::bind("", "s"), raw::execute("", 0), raw::flush()].concat())
        .await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(client.recv().await.unwrap());
    }
    assert_eq!(tags(&got), "2DC");
    client.send(&raw::sync()).await;
    assert_eq!(tags(&client.until_ready().await), "Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_passes_through() {
    // The gateway cannot see which function a FunctionCall calls: it is an
    // unknown statement, which this policy allows.
    let spec = Spec {
        policy: Some("[policy]\ndefault = \"allow\"\nunknown = \"allow\"\n".into()),
        ..Spec::default()
    };
    let gw = TestGateway::start("fastpath", spec).await;
    let mut client = RawClient::connect(gw.addr).await;
    let greeting = client.login(&gw.db, ALICE).await;
    let oid: i32 = client.simple("SELECT 'pg_backend_pid'::regproc::oid::int").await[0][0]
        .as_ref()
        .unwrap()
        .parse()
        .unwrap();
    // FunctionCall: oid, no argument formats, no arguments, binary result.
    let mut body = oid.to_be_bytes().to_vec();
    body.extend([0, 0, 0, 0, 0, 1]);
    client.send(&msg(b'F', &body)).await;
    let messages = client.until_ready().await;
    assert_eq!(tags(&messages), "VZ");
    let (_, result) = &messages[0];
    assert_eq!(&result[..4], &4i32.to_be_bytes());
    assert_eq!(
        i32::from_be_bytes(result[4..8].try_into().unwrap()),
        greeting.process_id
    );
}

/// By default a FunctionCall is refused like any statement the gateway cannot
/// read (it could call set_config or query_to_xml by number), and the
/// session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_is_refused_by_default() {
    let gw = TestGateway::start("fastpath_refused", Spec::default()).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, ALICE).await;
    let oid: i32 = client.simple("SELECT 'pg_backend_pid'::regproc::oid::int").await[0][0]
        .as_ref()
        .unwrap()
        .parse()
        .unwrap();
    let mut body = oid.to_be_bytes().to_vec();
    body.extend([0, 0, 0, 0, 0, 1]);
    client.send(&msg(b'F', &body)).await;
    let messages = client.until_ready().await;
    assert_eq!(tags(&messages), "EZ");
    let error = String::from_utf8_lossy(&messages[0].1);
    assert!(
        error.contains("42501")
            && error.contains("FunctionCall (fastpath)")
            && error.contains("cannot be held for approval")
            && error.contains("call the function from SQL instead (SELECT f(...))"),
        "{error}"
    );
    assert_eq!(client.simple("SELECT 7").await[0][0].as_deref(), Some("7"));
}
