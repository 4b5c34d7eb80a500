//! The gateway's own logins: SCRAM-SHA-256, md5, cleartext and trust, TLS
//! towards the server with verify-full / verify-ca / require, and credentials
//! that never reach the client.

use crate::harness::{self, ALICE, APP_ROLE, Spec, TestGateway, db_error};

/// A target on the test database logging in as `role` with `options`.
fn target(db: &str, suffix: &str, role: &str, options: &str) -> String {
    format!(
        "\n[[targets]]\nname = \"{db}_{suffix}\"\nhost = \"127.0.0.1\"\nport = {}\ndatabase = \"{db}\"\n{options}\n\
         [[targets.access]]\nidentities = [\"*\"]\nrole = \"{role}\"\n",
        harness::cluster().dev.port()
    )
}

async fn whoami(gw: &TestGateway, suffix: &str) -> Result<(String, bool), tokio_postgres::Error> {
    let client = gw.connect_target(&format!("{}_{suffix}", gw.db), ALICE).await?;
    let row = client
        .query_one(
            "SELECT current_user::text, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upstream_authentication_method() {
    let db = harness::database("upstream_auth").await;
    let ca = harness::cluster().ca_path.display().to_string();
    let mut extra = String::new();
    extra += &target(&db, "md5", "sluice_md5", "tls = \"disable\"");
    extra += "password = \"md5-pw\"\n";
    extra += &target(&db, "trust", "sluice_trust", "tls = \"disable\"");
    extra += &target(&db, "plain", "sluice_plain", "tls = \"disable\"");
    extra += "password = \"plain-pw\"\n";
    extra += &target(
        &db,
        "full",
        "sluice_tls",
        &format!("tls = \"verify-full\"\nca = \"{ca}\""),
    );
    extra += "password = \"tls-pw\"\n";
    extra += &target(
        &db,
        "ca",
        "sluice_tls",
        &format!("tls = \"verify-ca\"\nca = \"{ca}\"\nserver_name = \"not-the-host.example\""),
    );
    extra += "password = \"tls-pw\"\n";
    extra += &target(&db, "require", "sluice_tls", "tls = \"require\"");
    extra += "password = \"tls-pw\"\n";
    let spec = Spec {
        extra,
        ..Spec::default()
    };
    let gw = TestGateway::start_for(db, spec).await;

    // The test database's own target uses SCRAM-SHA-256.
    let client = gw.connect(ALICE).await.unwrap();
    let role: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(role, APP_ROLE);

    assert_eq!(whoami(&gw, "md5").await.unwrap(), ("sluice_md5".into(), false));
    assert_eq!(whoami(&gw, "trust").await.unwrap(), ("sluice_trust".into(), false));
    assert_eq!(whoami(&gw, "plain").await.unwrap(), ("sluice_plain".into(), false));
    // pg_hba only lets sluice_tls in over TLS, so these prove encryption.
    assert_eq!(whoami(&gw, "full").await.unwrap(), ("sluice_tls".into(), true));
    assert_eq!(whoami(&gw, "ca").await.unwrap(), ("sluice_tls".into(), true));
    assert_eq!(whoami(&gw, "require").await.unwrap(), ("sluice_tls".into(), true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_certificate_for_another_name() {
    let db = harness::database("upstream_name").await;
    let ca = harness::cluster().ca_path.display().to_string();
    let mut extra = target(
        &db,
        "wrongname",
        "sluice_tls",
        &format!("tls = \"verify-full\"\nca = \"{ca}\"\nserver_name = \"db.example.com\""),
    );
    extra += "password = \"tls-pw\"\n";
    let gw = TestGateway::start_for(
        db,
        Spec {
            extra,
            ..Spec::default()
        },
    )
    .await;
    let err = whoami(&gw, "wrongname").await.unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "08001");
    assert_eq!(
        message,
        format!("the gateway could not connect to target \"{}_wrongname\"", gw.db)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upstream_password_never_reaches_the_client() {
    let db = harness::database("upstream_badpw").await;
    let mut extra = target(&db, "bad", "sluice_app", "tls = \"disable\"");
    extra += "password = \"not-the-password-s3cr3t\"\n";
    let gw = TestGateway::start_for(
        db,
        Spec {
            extra,
            ..Spec::default()
        },
    )
    .await;
    let err = whoami(&gw, "bad").await.unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "08001");
    let detail = format!("{err:?}");
    assert!(!detail.contains("s3cr3t") && !detail.contains("sluice_app"), "{detail}");
    assert!(message.contains("could not connect"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_target_and_no_access() {
    let db = harness::database("targets").await;
    let spec = Spec {
        access: format!("[[targets.access]]\nidentities = [\"bob\"]\nrole = \"{APP_ROLE}\"\npassword = \"app-pw\"\n"),
        ..Spec::default()
    };
    let gw = TestGateway::start_for(db, spec).await;
    let err = gw.connect_target("nowhere", ALICE).await.unwrap_err();
    assert_eq!(
        db_error(&err),
        ("3D000".into(), "target \"nowhere\" does not exist".into())
    );
    let err = gw.connect(ALICE).await.unwrap_err();
    assert_eq!(
        db_error(&err),
        ("28000".into(), format!("alice may not use target \"{}\"", gw.db))
    );
    gw.connect(crate::harness::BOB).await.expect("bob is allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_a_clear_error() {
    let db = harness::database("upstream_down").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let extra = format!(
        "\n[[targets]]\nname = \"{db}_down\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"disable\"\n\
         [[targets.access]]\nidentities = [\"*\"]\nrole = \"{APP_ROLE}\"\n"
    );
    let gw = TestGateway::start_for(
        db,
        Spec {
            extra,
            ..Spec::default()
        },
    )
    .await;
    let err = gw.connect_target(&format!("{}_down", gw.db), ALICE).await.unwrap_err();
    assert_eq!(
        db_error(&err),
        (
            "08001".into(),
            format!("the gateway could not connect to target \"{}_down\"", gw.db)
        )
    );
    // Other targets of the same gateway are unaffected.
    gw.connect(ALICE)
        .await
        .expect("the healthy target")
        .batch_execute("SELECT 1")
        .await
        .unwrap();
}
