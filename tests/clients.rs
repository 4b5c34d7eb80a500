//! Real clients through the gateway: psql and tokio-postgres must work exactly
//! as they do against PostgreSQL directly.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::AsyncMessage;

use crate::harness::{self, ALICE, Spec, TestGateway, stderr, stdout_ok};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_simple_queries_describe_and_multi_statement() {
    let gw = TestGateway::start("psql_basics", Spec::default()).await;
    let out = gw
        .psql(
            ALICE,
            "",
            &[
                "-c",
                "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)",
                "-c",
                "INSERT INTO items VALUES (1, 'one'), (2, 'two')",
            ],
        )
        .await;
    stdout_ok(&out);

    let out = gw.psql(ALICE, "", &["-c", "SELECT name FROM items ORDER BY id"]).await;
    assert_eq!(stdout_ok(&out), "one\ntwo\n");

    // psql sends a -c string with several statements as one Query message.
    let out = gw
        .psql(
            ALICE,
            "",
            &["-c", "SELECT 1; SELECT 'a' || 'b'; SELECT count(*) FROM items"],
        )
        .await;
    assert_eq!(stdout_ok(&out), "1\nab\n2\n");

    // \d runs psql's catalog queries (extended-protocol free, large texts).
    let out = gw.psql(ALICE, "", &["-c", "\\d items"]).await;
    let text = stdout_ok(&out);
    assert!(
        text.contains("id|integer||not null|") && text.contains("name|text||not null|"),
        "{text}"
    );
    let out = gw.psql(ALICE, "", &["-c", "\\d"]).await;
    assert_eq!(stdout_ok(&out), "public|items|table|sluice_app\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_copy_both_ways() {
    let gw = TestGateway::start("psql_copy", Spec::default()).await;
    stdout_ok(&gw.psql(ALICE, "", &["-c", "CREATE TABLE t (id int, note text)"]).await);

    let rows: String = (0..5000).map(|i| format!("{i}\tnote {i} with some text\n")).collect();
    let out = harness::psql(
        &gw.conn_str("tester", ALICE, ""),
        &["-c", "\\copy t FROM STDIN"],
        Some(&rows),
    )
    .await;
    stdout_ok(&out);

    let out = gw
        .psql(ALICE, "", &["-c", "\\copy (SELECT * FROM t ORDER BY id) TO STDOUT"])
        .await;
    assert_eq!(stdout_ok(&out), rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_error_mid_transaction_aborts_it() {
    let gw = TestGateway::start("psql_txn_error", Spec::default()).await;
    let script = "CREATE TABLE t (id int);\nBEGIN;\nINSERT INTO t VALUES (1);\nSELECT 1/0;\nSELECT 2;\nROLLBACK;\nSELECT count(*) FROM t;\n";
    let out = harness::psql(
        &gw.conn_str("tester", ALICE, ""),
        &["-v", "ON_ERROR_STOP=0"],
        Some(script),
    )
    .await;
    let err = stderr(&out);
    assert!(err.contains("division by zero"), "{err}");
    assert!(err.contains("current transaction is aborted"), "{err}");
    // The insert was rolled back; the session went on after the error.
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("0\n"), "{:?}", out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_cancel_with_sigint() {
    let gw = TestGateway::start("psql_cancel", Spec::default()).await;
    let admin = harness::superuser(&gw.db).await;
    let child = tokio::process::Command::new("psql")
        .args([
            "-X",
            "-d",
            &gw.conn_str("tester", ALICE, "application_name=cancel_me"),
            "-c",
            "SELECT pg_sleep(60)",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("psql");
    harness::eventually("the sleep to run", || async {
        let rows = admin
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'cancel_me' AND state = 'active'",
                &[],
            )
            .await
            .unwrap();
        !rows.is_empty()
    })
    .await;
    let pid = child.id().expect("psql pid") as i32;
    // psql answers SIGINT by sending a CancelRequest on a new connection.
    // SAFETY: kill with a valid pid and signal has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("psql did not stop after cancel")
        .unwrap();
    let err = stderr(&out);
    assert!(err.contains("canceling statement due to user request"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_prepared_statements_and_binary_values() {
    let gw = TestGateway::start("extended", Spec::default()).await;
    let client = gw.connect(ALICE).await.unwrap();
    client
        .batch_execute("CREATE TABLE v (id bigint, f double precision, b bytea, t text, a int[])")
        .await
        .unwrap();
    // tokio-postgres sends parameters and reads results in binary.
    let insert = client
        .prepare("INSERT INTO v VALUES ($1, $2, $3, $4, $5)")
        .await
        .unwrap();
    for i in 0..20i64 {
        let bytes: Vec<u8> = (0..=255u8).cycle().skip(i as usize).take(300).collect();
        client
            .execute(
                &insert,
                &[
                    &i,
                    &(i as f64 / 3.0),
                    &bytes,
                    &format!("row {i} ✓"),
                    &vec![i as i32, -1, 7],
                ],
            )
            .await
            .unwrap();
    }
    let select = client
        .prepare("SELECT id, f, b, t, a FROM v WHERE id = $1")
        .await
        .unwrap();
    for i in [0i64, 7, 19] {
        let row = client.query_one(&select, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), i);
        assert_eq!(row.get::<_, f64>(1), i as f64 / 3.0);
        assert_eq!(row.get::<_, Vec<u8>>(2).len(), 300);
        assert_eq!(row.get::<_, Vec<u8>>(2)[0], i as u8);
        assert_eq!(row.get::<_, String>(3), format!("row {i} ✓"));
        assert_eq!(row.get::<_, Vec<i32>>(4), vec![i as i32, -1, 7]);
    }
    // Simple protocol too, on the same session.
    let rows = client.simple_query("SELECT count(*) FROM v").await.unwrap();
    let count = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(count.as_deref(), Some("20"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_arrive_in_order() {
    let gw = TestGateway::start("pipeline", Spec::default()).await;
    let client = gw.connect(ALICE).await.unwrap();
    let statement = client.prepare("SELECT $1::int * 2").await.unwrap();
    // tokio-postgres pipelines requests issued concurrently on one connection.
    let futures = (0..200).map(|i| {
        let client = &client;
        let statement = &statement;
        async move { client.query_one(statement, &[&i]).await.map(|row| row.get::<_, i32>(0)) }
    });
    let results = futures_util::future::join_all(futures).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap(), i as i32 * 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_fetched_in_chunks() {
    let gw = TestGateway::start("portal", Spec::default()).await;
    let mut client = gw.connect(ALICE).await.unwrap();
    let tx = client.transaction().await.unwrap();
    let statement = tx.prepare("SELECT g FROM generate_series(1, 1000) g").await.unwrap();
    let portal = tx.bind(&statement, &[]).await.unwrap();
    let mut seen = Vec::new();
    loop {
        // Execute with a row limit: the server answers PortalSuspended.
        let rows = tx.query_portal(&portal, 64).await.unwrap();
        if rows.is_empty() {
            break;
        }
        assert!(rows.len() <= 64);
        seen.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
    }
    tx.commit().await.unwrap();
    assert_eq!(seen, (1..=1000).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_carries_the_real_backend_pid() {
    let gw = TestGateway::start("notify", Spec::default()).await;
    let (listener, mut connection) = tokio_postgres::connect(&gw.conn_str("tester", ALICE, ""), tokio_postgres::NoTls)
        .await
        .unwrap();
    // The connection yields notifications as it is polled: forward them.
    let (tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            if tx.send(message).is_err() {
                break;
            }
        }
    });
    listener.batch_execute("LISTEN orders").await.unwrap();

    let sender = gw.connect(ALICE).await.unwrap();
    let sender_pid: i32 = sender.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    sender.batch_execute("NOTIFY orders, 'order 42 shipped'").await.unwrap();

    let message = tokio::time::timeout(harness::PATIENCE, async {
        loop {
            match notifications.recv().await {
                Some(AsyncMessage::Notification(n)) => break n,
                Some(_) => continue,
                None => panic!("connection closed"),
            }
        }
    })
    .await
    .expect("notification");
    assert_eq!(message.channel(), "orders");
    assert_eq!(message.payload(), "order 42 shipped");
    // Drivers match notifications to sessions by the real backend pid.
    assert_eq!(message.process_id(), sender_pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_with_a_large_payload() {
    let gw = TestGateway::start("copy_large", Spec::default()).await;
    let client = gw.connect(ALICE).await.unwrap();
    client
        .batch_execute("CREATE TABLE blob (id int, payload text)")
        .await
        .unwrap();

    // About 24 MB in 8 KB chunks, streamed.
    let row = |i: usize| format!("{i}\t{}\n", "x".repeat(1000 + i % 17));
    let sink = client.copy_in("COPY blob FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut sent = 0usize;
    let mut chunk = String::new();
    for i in 0..24_000 {
        chunk.push_str(&row(i));
        if chunk.len() > 8192 {
            sent += chunk.len();
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk))).await.unwrap();
        }
    }
    sent += chunk.len();
    sink.send(bytes::Bytes::from(chunk)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 24_000);

    let stream = client
        .copy_out("COPY (SELECT * FROM blob ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let received: usize = chunks.iter().map(|c| c.len()).sum();
    assert_eq!(received, sent);
    let text = chunks.concat();
    assert!(text.starts_with(row(0).as_bytes()));
    assert!(text.ends_with(row(23_999).as_bytes()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_larger_than_the_stream_threshold_passes_whole() {
    let gw = TestGateway::start("huge_value", Spec::default()).await;
    let client = gw.connect(ALICE).await.unwrap();
    // One DataRow of 48 MB: streamed through in chunks, never held whole.
    let row = client
        .query_one("SELECT repeat('ab', 24000000), md5(repeat('ab', 24000000))", &[])
        .await
        .unwrap();
    let value: String = row.get(0);
    assert_eq!(value.len(), 48_000_000);
    let md5: String = row.get(1);
    let check = client.query_one("SELECT md5($1)", &[&value]).await.unwrap();
    assert_eq!(check.get::<_, String>(0), md5);
}
