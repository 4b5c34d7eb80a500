//! Bad input from clients: each gets a precise error for that session, the
//! gateway stays up, and other sessions carry on untouched.

use crate::harness::raw::{self, RawClient, first_error, msg, tags};
use crate::harness::{ALICE, Spec, TestGateway};

/// A session opened before the bad input, checked after it.
async fn bystander(gw: &TestGateway) -> tokio_postgres::Client {
    let client = gw.connect(ALICE).await.unwrap();
    client.batch_execute("SELECT 1").await.unwrap();
    client
}

async fn still_fine(client: &tokio_postgres::Client, gw: &TestGateway) {
    let n: i32 = client.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(n, 7);
    let fresh = gw.connect(ALICE).await.expect("new sessions still open");
    fresh.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_get_an_error() {
    let gw = TestGateway::start("garbage", Spec::default()).await;
    let other = bystander(&gw).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n").await;
    let messages = client.until_closed().await;
    let error = first_error(&messages);
    assert_eq!(error[&'S'], "FATAL");
    assert_eq!(error[&'C'], "08P01");
    assert!(error[&'M'].contains("startup packet length"), "{error:?}");
    still_fine(&other, &gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_2_startup_is_refused() {
    let gw = TestGateway::start("protocol2", Spec::default()).await;
    let other = bystander(&gw).await;
    let mut client = RawClient::connect(gw.addr).await;
    // A version 2 startup packet: fixed 296 bytes.
    let mut packet = 296i32.to_be_bytes().to_vec();
    packet.extend(0x0002_0000i32.to_be_bytes());
    packet.resize(296, 0);
    client.send(&packet).await;
    let error = first_error(&client.until_closed().await);
    assert_eq!(error[&'C'], "0A000");
    assert_eq!(error[&'M'], "unsupported frontend protocol 2.0: Sluice supports 3.0");
    still_fine(&other, &gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_field_of_two_gigabytes_ends_only_that_session() {
    let gw = TestGateway::start("huge_length", Spec::default()).await;
    let other = bystander(&gw).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, ALICE).await;
    let mut header = vec![b'Q'];
    header.extend(0x7fff_fff0i32.to_be_bytes());
    client.send(&header).await;
    let error = first_error(&client.until_closed().await);
    assert_eq!(error[&'S'], "FATAL");
    assert_eq!(error[&'C'], "54000");
    assert!(
        error[&'M'].contains("of 2147483632 bytes exceeds the limit of 67108864 bytes"),
        "{error:?}"
    );
    still_fine(&other, &gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_message_limit_applies() {
    let spec = Spec {
        max_message_size: Some("64KiB"),
        ..Spec::default()
    };
    let gw = TestGateway::start("message_limit", spec).await;
    let client = gw.connect(ALICE).await.unwrap();
    let small = format!("SELECT '{}'", "x".repeat(60_000));
    client.batch_execute(&small).await.unwrap();
    let large = format!("SELECT '{}'", "x".repeat(70_000));
    let err = client.batch_execute(&large).await.unwrap_err();
    let db = err.as_db_error().expect("an error from the gateway");
    assert_eq!(db.code().code(), "54000");
    assert!(db.message().contains("limit of 65536 bytes"), "{}", db.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_malformed_messages() {
    let gw = TestGateway::start("malformed", Spec::default()).await;
    let other = bystander(&gw).await;

    // A Query whose string has no terminator: the length is honest, the body is not.
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, ALICE).await;
    client.send(&msg(b'Q', b"SELECT 1")).await;
    let error = first_error(&client.until_closed().await);
    assert_eq!(error[&'C'], "08P01");
    assert_eq!(
        error[&'M'],
        "malformed Query message: the query field has no terminating NUL byte"
    );

    // A Parse that claims parameter types it does not carry.
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, ALICE).await;
    client.send(&msg(b'P', b"\0SELECT $1\0\x00\x05\x00\x00\x00\x17")).await;
    let error = first_error(&client.until_closed().await);
    assert!(error[&'M'].contains("parameter types"), "{error:?}");

    // A message cut short by the client closing: the session just ends.
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, ALICE).await;
    let mut partial = vec![b'Q'];
    partial.extend(100i32.to_be_bytes());
    partial.extend(b"SELECT");
    client.send(&partial).await;
    client.close_write().await;
    assert!(client.until_closed().await.is_empty());

    // An unknown message type.
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, ALICE).await;
    client.send(&msg(b'?', b"")).await;
    let error = first_error(&client.until_closed().await);
    assert_eq!(error[&'M'], "invalid frontend message type '?'");

    // A truncated startup packet.
    let mut client = RawClient::connect(gw.addr).await;
    client.send(&[0, 0, 0, 40, 0, 3, 0, 0, b'u']).await;
    client.close_write().await;
    assert!(client.until_closed().await.is_empty());

    still_fine(&other, &gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_text_that_is_not_utf8_is_refused_and_session_survives() {
    let gw = TestGateway::start("not_utf8", Spec::default()).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, ALICE).await;
    client.send(&msg(b'Q', b"SELECT '\xff\xfe'\0")).await;
    let messages = client.until_ready().await;
    assert_eq!(tags(&messages), "EZ");
    assert_eq!(first_error(&messages)[&'C'], "22021");
    assert_eq!(
        client.simple("SELECT 'still here'").await,
        vec![vec![Some("still here".into())]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_request_is_declined_and_startup_continues() {
    let gw = TestGateway::start("gssenc", Spec::default()).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).await;
    assert_eq!(client.recv_byte().await, b'N');
    client.login(&gw.db, ALICE).await;
    assert_eq!(client.simple("SELECT 1").await, vec![vec![Some("1".into())]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_protocol_minor_is_negotiated_down() {
    let gw = TestGateway::start("negotiate", Spec::default()).await;
    let mut client = RawClient::connect(gw.addr).await;
    client
        .send(&raw::startup_packet(
            0x0003_0002,
            &[("user", "raw"), ("database", &gw.db), ("_pq_.test_option", "1")],
        ))
        .await;
    let (tag, body) = client.recv().await.unwrap();
    assert_eq!(tag, b'v');
    assert_eq!(&body[..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(&body[8..], b"_pq_.test_option\0");
    let (tag, _) = client.recv().await.unwrap();
    assert_eq!(tag, b'R');
    client.send(&msg(b'p', &raw::cstr(ALICE))).await;
    client.greeting().await;
    assert_eq!(client.simple("SELECT 2").await, vec![vec![Some("2".into())]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_that_escape_the_gate_are_refused() {
    let gw = TestGateway::start("startup_params", Spec::default()).await;
    for (name, value, expect) in [
        ("options", "-c role=postgres", "\"role\" is not allowed"),
        (
            "session_authorization",
            "postgres",
            "\"session_authorization\" is not allowed",
        ),
        ("client_encoding", "GBK", "client_encoding \"GBK\" is not supported"),
        ("replication", "database", "replication connections are not supported"),
    ] {
        let mut client = RawClient::connect(gw.addr).await;
        client
            .send(&raw::startup_packet(
                196_608,
                &[("user", "raw"), ("database", &gw.db), (name, value)],
            ))
            .await;
        let error = first_error(&client.until_closed().await);
        assert!(error[&'M'].contains(expect), "{name}: {error:?}");
    }
    // Ordinary settings in `options` pass through to the server.
    let client = gw
        .connect_with(ALICE, "options='-c statement_timeout=4321'")
        .await
        .unwrap();
    let timeout: String = client.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
    assert_eq!(timeout, "4321ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_an_unsafe_client_encoding_ends_the_session() {
    let gw = TestGateway::start("encoding_switch", Spec::default()).await;
    let other = bystander(&gw).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, ALICE).await;
    // In SJIS a multibyte character can swallow a quote or backslash, so the
    // gateway would no longer read statements as the server does.
    client.send(&raw::query("SET client_encoding = 'SJIS'")).await;
    let messages = client.until_closed().await;
    let error = first_error(&messages);
    assert_eq!(error[&'S'], "FATAL");
    assert_eq!(error[&'C'], "22023");
    assert!(
        error[&'M'].contains("\"SJIS\", which Sluice does not support"),
        "{error:?}"
    );
    // A safe switch is fine.
    let client = gw.connect(ALICE).await.unwrap();
    client.batch_execute("SET client_encoding = 'UTF8'").await.unwrap();
    still_fine(&other, &gw).await;
}
