//! TLS between clients and the gateway: psql with `sslmode=require` and
//! `verify-full` against the test CA, and plaintext refused unless allowed.

use sluice_core::devcluster::DevPki;

use crate::harness::{self, ALICE, Spec, TestGateway, stderr, stdout_ok};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_and_verify_full() {
    let gw = TestGateway::start("tls_modes", Spec::default()).await;
    let out = gw
        .psql(
            ALICE,
            "sslmode=require",
            &["-c", "\\conninfo", "-c", "SELECT 'over tls'"],
        )
        .await;
    let text = stdout_ok(&out);
    assert!(text.contains("SSL connection (protocol: TLSv1.3"), "{text}");
    assert!(text.contains("over tls"), "{text}");

    let ca = harness::cluster().ca_path.display().to_string();
    for host in ["localhost", "127.0.0.1"] {
        let conn = format!(
            "host={host} port={} dbname={} user=alice password={ALICE} sslmode=verify-full sslrootcert={ca}",
            gw.addr.port(),
            gw.db
        );
        let out = harness::psql(&conn, &["-c", "SELECT 'verified'"], None).await;
        assert_eq!(stdout_ok(&out), "verified\n", "host {host}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_fails_against_another_ca() {
    let gw = TestGateway::start("tls_wrong_ca", Spec::default()).await;
    let other = DevPki::generate("Some other CA", &["localhost"]).unwrap();
    let path = harness::cluster()
        .dev
        .dir()
        .join(format!("other-ca-{}.pem", gw.addr.port()));
    std::fs::write(&path, &other.ca_cert).unwrap();
    let conn = format!(
        "host=localhost port={} dbname={} user=alice password={ALICE} sslmode=verify-full sslrootcert={}",
        gw.addr.port(),
        gw.db,
        path.display()
    );
    let out = harness::psql(&conn, &["-c", "SELECT 1"], None).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("certificate verify failed"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_unless_allowed() {
    let spec = Spec {
        allow_plaintext: false,
        ..Spec::default()
    };
    let gw = TestGateway::start("tls_required", spec).await;
    let out = gw.psql(ALICE, "sslmode=disable", &["-c", "SELECT 1"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("FATAL:  Sluice accepts tokens over TLS only, and this connection is not encrypted"),
        "{err}"
    );
    assert!(err.contains("HINT:  connect with sslmode=require"), "{err}");
    // The same gateway over TLS.
    let out = gw.psql(ALICE, "sslmode=require", &["-c", "SELECT 'fine'"]).await;
    assert_eq!(stdout_ok(&out), "fine\n");

    // With plaintext allowed on loopback, sslmode=disable works.
    let open = TestGateway::start("tls_optional", Spec::default()).await;
    let out = open.psql(ALICE, "sslmode=disable", &["-c", "SELECT 'plain'"]).await;
    assert_eq!(stdout_ok(&out), "plain\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_without_tls_declines_ssl_request() {
    let spec = Spec {
        tls: false,
        ..Spec::default()
    };
    let gw = TestGateway::start("tls_none", spec).await;
    let out = gw.psql(ALICE, "sslmode=require", &["-c", "SELECT 1"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("server does not support SSL"), "{}", stderr(&out));
    let out = gw.psql(ALICE, "sslmode=prefer", &["-c", "SELECT 'fell back'"]).await;
    assert_eq!(stdout_ok(&out), "fell back\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_sent_before_the_tls_handshake_is_refused() {
    use crate::harness::raw::{RawClient, first_error};
    let gw = TestGateway::start("tls_stuffing", Spec::default()).await;
    let mut client = RawClient::connect(gw.addr).await;
    // SSLRequest followed at once by a plaintext startup packet: if the
    // gateway read it after the handshake, a man in the middle could inject
    // a session (CVE-2021-23214).
    let mut bytes = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    bytes.extend(crate::harness::raw::startup_packet(
        196_608,
        &[("user", "x"), ("database", &gw.db)],
    ));
    client.send(&bytes).await;
    let error = first_error(&client.until_closed().await);
    assert_eq!(error[&'C'], "08P01");
    assert_eq!(error[&'M'], "received unencrypted data after SSL request");
}
