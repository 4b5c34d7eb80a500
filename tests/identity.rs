//! Identity at the door: OIDC ID tokens verified against a local issuer whose
//! keys the test controls, and static service tokens. Every refusal says what
//! was wrong without echoing the token.

use serde_json::json;

use crate::harness::issuer::{self, TestIssuer, now};
use crate::harness::{self, AGENT, APP_PASSWORD, APP_ROLE, BOB, Spec, TestGateway, db_error};

fn oidc_spec(issuer: &TestIssuer) -> Spec {
    Spec {
        oidc: Some(issuer.config("")),
        // People in `engineering` and the agent's group may connect; nobody else.
        access: format!(
            "[[targets.access]]\ngroups = [\"engineering\", \"analytics\"]\nrole = \"{APP_ROLE}\"\npassword = \"{APP_PASSWORD}\"\n"
        ),
        ..Spec::default()
    }
}

/// Connects with `token` and returns the error's SQLSTATE and message.
async fn refused(gw: &TestGateway, token: &str) -> (String, String) {
    let err = gw.connect(token).await.expect_err("the token should be refused");
    let (code, message) = db_error(&err);
    assert!(!message.contains(token), "the error echoes the token: {message}");
    (code, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_id_token_maps_to_identity_and_role() {
    let issuer = TestIssuer::start().await;
    let gw = TestGateway::start("oidc_valid", oidc_spec(&issuer)).await;
    let token = issuer::key(0).token(&issuer.claims("dana@example.com", &["engineering"]));
    let client = gw.connect(&token).await.expect("a valid token connects");
    let role: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(role, APP_ROLE);

    // Right token, wrong group: authenticated, but no access to this target.
    let outsider = issuer::key(0).token(&issuer.claims("eve@example.com", &["marketing"]));
    let (code, message) = refused(&gw, &outsider).await;
    assert_eq!(code, "28000");
    assert_eq!(message, format!("eve@example.com may not use target \"{}\"", gw.db));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_id_tokens_are_refused_with_the_reason() {
    let issuer = TestIssuer::start().await;
    let gw = TestGateway::start("oidc_bad", oidc_spec(&issuer)).await;
    let key = issuer::key(0);
    let good = issuer.claims("dana@example.com", &["engineering"]);

    let mut expired = good.clone();
    expired["iat"] = json!(now() - 7200);
    expired["exp"] = json!(now() - 3600);
    let (code, message) = refused(&gw, &key.token(&expired)).await;
    assert_eq!(code, "28P01");
    assert!(message.contains("expired at"), "{message}");

    // An access token made for the people's client id (as providers do for
    // an API on the same registration) is no ID token.
    let mut access = good.clone();
    access["scp"] = json!("user_impersonation");
    let (code, message) = refused(&gw, &key.token(&access)).await;
    assert_eq!(code, "28P01");
    assert!(
        message.contains("this is an access token, not an ID token"),
        "{message}"
    );

    let mut future = good.clone();
    future["nbf"] = json!(now() + 3600);
    let (_, message) = refused(&gw, &key.token(&future)).await;
    assert!(message.contains("not valid before"), "{message}");

    let mut wrong_audience = good.clone();
    wrong_audience["aud"] = json!("another-app");
    let (code, message) = refused(&gw, &key.token(&wrong_audience)).await;
    assert_eq!(code, "28P01");
    assert!(message.contains("for audience `another-app`"), "{message}");

    let mut wrong_issuer = good.clone();
    wrong_issuer["iss"] = json!("https://evil.example.com");
    let (_, message) = refused(&gw, &key.token(&wrong_issuer)).await;
    assert!(message.contains("issued by `https://evil.example.com`"), "{message}");

    // A valid signature over different claims: swap the payload.
    let token = key.token(&good);
    let mut parts: Vec<&str> = token.split('.').collect();
    let mut elevated = good.clone();
    elevated["groups"] = json!(["engineering", "admins"]);
    let forged_payload = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(elevated.to_string())
    };
    parts[1] = &forged_payload;
    let (_, message) = refused(&gw, &parts.join(".")).await;
    assert!(message.contains("signature does not verify"), "{message}");

    // alg none, no signature.
    let unsigned = {
        use base64::Engine;
        let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.", b64(json!({"alg": "none", "typ": "JWT"})), b64(good.clone()))
    };
    let (_, message) = refused(&gw, &unsigned).await;
    assert!(message.contains("algorithm") && message.contains("none"), "{message}");

    // Signed with HS256 using the public key as the secret: the classic confusion.
    let hs = key.sign(&json!({"alg": "HS256", "kid": key.kid}), &good);
    let (_, message) = refused(&gw, &hs).await;
    assert!(message.contains("HS256"), "{message}");

    // The good token still works.
    gw.connect(&key.token(&good)).await.expect("good token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_refreshes_keys_once_then_rejects() {
    let issuer = TestIssuer::start().await;
    let gw = TestGateway::start("oidc_kid", oidc_spec(&issuer)).await;
    let claims = issuer.claims("dana@example.com", &["engineering"]);
    gw.connect(&issuer::key(0).token(&claims)).await.expect("known key");
    let fetches = issuer.jwks_fetches();

    // The issuer rotates: a token signed with a newly published key is
    // accepted after exactly one refresh.
    issuer.publish(issuer::key(1));
    gw.connect(&issuer::key(1).token(&claims)).await.expect("rotated key");
    assert_eq!(issuer.jwks_fetches(), fetches + 1);

    // A key the issuer never published: one refresh, then a refusal.
    let rogue = issuer::key(2);
    let (code, message) = refused(&gw, &rogue.token(&claims)).await;
    assert_eq!(code, "28P01");
    assert_eq!(
        message,
        "authentication failed: the ID token is signed with key key-2, which the issuer does not publish"
    );
    assert_eq!(issuer.jwks_fetches(), fetches + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_refreshes_are_rate_limited() {
    let issuer = TestIssuer::start().await;
    let spec = Spec {
        oidc: Some(
            issuer
                .config("")
                .replace("min_refresh_interval = \"0s\"", "min_refresh_interval = \"1h\""),
        ),
        ..oidc_spec(&issuer)
    };
    let gw = TestGateway::start("oidc_ratelimit", spec).await;
    let claims = issuer.claims("dana@example.com", &["engineering"]);
    gw.connect(&issuer::key(0).token(&claims)).await.expect("known key");
    let fetches = issuer.jwks_fetches();
    // A flood of tokens with unknown kids cannot make the gateway hammer the issuer.
    for _ in 0..5 {
        refused(&gw, &issuer::key(2).token(&claims)).await;
    }
    assert_eq!(issuer.jwks_fetches(), fetches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_tokens_and_unknown_tokens() {
    let gw = TestGateway::start("static_tokens", Spec::default()).await;
    let client = gw.connect(AGENT).await.expect("service token");
    client.batch_execute("SELECT 1").await.unwrap();
    let (code, message) = refused(&gw, "no-such-token").await;
    assert_eq!(code, "28P01");
    assert_eq!(
        message,
        "authentication failed: token not recognised: it is neither a configured service token nor an ID token"
    );
    // A JWT-shaped token with no issuer configured.
    let (code, message) = refused(&gw, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln").await;
    assert_eq!(code, "28000");
    assert!(message.contains("no OIDC issuer configured"), "{message}");
    // The user name is informational only: bob's token is bob whatever the name says.
    let client = crate::harness::TestGateway::connect(&gw, BOB).await.unwrap();
    client.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_down_refuses_with_a_clear_message() {
    // Bind a port and drop it: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let spec = Spec {
        oidc: Some(format!(
            "[identity.oidc]\nissuer = \"{url}\"\naudience = \"sluice-test\"\nhttp_timeout = \"2s\"\n"
        )),
        ..Spec::default()
    };
    let gw = TestGateway::start("oidc_down", spec).await;
    let claims = json!({"iss": url, "aud": "sluice-test", "sub": "dana", "iat": now(), "exp": now() + 600});
    let token = issuer::key(0).token(&claims);
    let (code, message) = refused(&gw, &token).await;
    assert_eq!(code, "28000");
    assert!(message.contains("unreachable"), "{message}");
    // Static tokens keep working while the issuer is down.
    gw.connect(AGENT).await.expect("service token");
}

/// A gateway trusting `issuer`, with `identity` settings (`[identity]`).
async fn expiring_gateway(issuer: &TestIssuer, name: &str, identity: &str) -> TestGateway {
    let spec = Spec {
        oidc: Some(format!("[identity]\n{identity}\n{}", issuer.config(""))),
        ..oidc_spec(issuer)
    };
    TestGateway::start(name, spec).await
}

/// The reasons and details of the sessions closed in `gw`'s trail.
fn closed_sessions(gw: &TestGateway) -> Vec<(String, String)> {
    use sluice_core::audit::{Detail, EventFilter, SqliteStore};
    let store = SqliteStore::open_read_only(&gw.audit.path).unwrap();
    store
        .events(&EventFilter::default())
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event.detail {
            Detail::SessionClosed { reason, detail, .. } => Some((reason, detail)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_expires() {
    let issuer = TestIssuer::start().await;
    let mut gw = expiring_gateway(&issuer, "expiry_end", "on_token_expiry = \"end\"").await;
    // Tokens are checked to the second: this one lives 4-5 s, time enough
    // to sign in on a loaded machine.
    let mut claims = issuer.claims("dana@example.com", &["engineering"]);
    claims["exp"] = json!(now() + 5);
    let conn = gw.conn_str("tester", &issuer::key(0).token(&claims), "");
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // The gateway ends it, mid-transaction, with the reason.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), connection)
        .await
        .expect("the session outlived its token")
        .unwrap();
    let err = ended.expect_err("the session should end with an error");
    let (code, message) = db_error(&err);
    assert_eq!(code, "28000", "{message}");
    assert!(
        message.starts_with("terminating connection: the token expired at "),
        "{message}"
    );
    assert!(client.simple_query("SELECT 1").await.is_err());
    gw.shutdown.cancel();
    gw.finished().await;
    let closed = closed_sessions(&gw);
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0].0, "token_expired");
    assert!(closed[0].1.starts_with("the token expired at "), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_may_finish_after_the_token_expires() {
    let issuer = TestIssuer::start().await;
    let mut gw = expiring_gateway(
        &issuer,
        "expiry_finish",
        "on_token_expiry = \"finish_transaction\"\ntoken_expiry_grace = \"6s\"",
    )
    .await;
    let mut claims = issuer.claims("dana@example.com", &["engineering"]);
    claims["exp"] = json!(now() + 5);
    let conn = gw.conn_str("tester", &issuer::key(0).token(&claims), "");
    // Both sessions are open before the token expires. One finishes its
    // transaction within the grace period (after expiry: the sleep), the
    // other is still in its transaction when the grace period ends.
    let finishes = "BEGIN;\nSELECT 'before';\n\\! sleep 6\nSELECT 'after expiry';\nCOMMIT;\nSELECT 'next';\n";
    let lingers = "BEGIN;\nSELECT 'before';\n\\! sleep 13\nSELECT 'too late';\n";
    // A third pipelines its next statement behind the COMMIT: the
    // transaction commits, the statement after it never runs.
    let exp = claims["exp"].as_u64().unwrap();
    let pipelined = async {
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
            .batch_execute("BEGIN; CREATE TABLE expiry_pipelined (n int)")
            .await
            .unwrap();
        while now() <= exp + 1 {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let (commit, insert) = tokio::join!(
            client.simple_query("COMMIT"),
            client.simple_query("INSERT INTO expiry_pipelined VALUES (1)")
        );
        (commit.map(|_| ()), insert.map(|_| ()))
    };
    let (finished, lingered, (commit, insert)) = tokio::join!(
        harness::psql(&conn, &[], Some(finishes)),
        harness::psql(&conn, &[], Some(lingers)),
        pipelined
    );
    commit.expect("the open transaction may commit");
    let err = insert.expect_err("nothing runs after the transaction");
    // The FATAL is the INSERT's answer when tokio-postgres had sent the
    // INSERT before it arrived. Its connection task runs on another thread:
    // on a loaded machine the COMMIT's answer and the FATAL can come before
    // it took the INSERT from its queue, and then the FATAL ends the
    // connection and the INSERT fails as closed. (psql's FATAL, below,
    // checks the message whatever the timing.)
    if err.as_db_error().is_some() || !err.is_closed() {
        let (_, message) = db_error(&err);
        assert!(message.contains("the session ended after its transaction"), "{message}");
    }
    assert_eq!(harness::count_rows(&gw.db, "expiry_pipelined").await, 0);
    let out = String::from_utf8_lossy(&finished.stdout);
    let err = harness::stderr(&finished);
    assert_eq!(out, "BEGIN\nbefore\nafter expiry\nCOMMIT\n", "{err}");
    assert!(err.contains("WARNING:  your token expired at "), "{err}");
    assert!(err.contains("finish this transaction within 6s"), "{err}");
    assert!(
        err.contains("FATAL:  terminating connection: the token expired at ")
            && err.contains("the session ended after its transaction"),
        "{err}"
    );
    let out = String::from_utf8_lossy(&lingered.stdout);
    let err = harness::stderr(&lingered);
    assert_eq!(out, "BEGIN\nbefore\n", "{err}");
    assert!(err.contains("did not finish within 6s"), "{err}");

    gw.shutdown.cancel();
    gw.finished().await;
    let mut closed = closed_sessions(&gw);
    closed.sort();
    assert_eq!(closed.len(), 3, "{closed:?}");
    assert!(closed.iter().all(|(reason, _)| reason == "token_expired"), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_held_when_the_token_expires_never_runs() {
    let issuer = TestIssuer::start().await;
    let policy = "[policy]\ndefault = \"allow\"\n\n[[policy.rules]]\nname = \"leads-approve-deletes\"\n\
                  decision = \"require_approval\"\nkinds = [\"write\"]\nrelations = [\"held_at_expiry\"]\n\
                  approvers = [\"leads\"]\ntimeout = \"5m\"\n";
    let spec = Spec {
        oidc: Some(format!(
            "[identity]\non_token_expiry = \"finish_transaction\"\ntoken_expiry_grace = \"5m\"\n{}",
            issuer.config("")
        )),
        policy: Some(policy.into()),
        ..oidc_spec(&issuer)
    };
    let mut gw = TestGateway::start("expiry_held", spec).await;
    harness::setup(
        &gw.db,
        "CREATE TABLE held_at_expiry (n int); INSERT INTO held_at_expiry VALUES (1)",
    )
    .await;
    let mut claims = issuer.claims("dana@example.com", &["engineering"]);
    claims["exp"] = json!(now() + 5);
    let conn = gw.conn_str("tester", &issuer::key(0).token(&claims), "");
    // Held outside a transaction: it has not started, so the expiry ends
    // the session at once (not after the 5-minute grace), and it never runs.
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        harness::psql(&conn, &["-c", "DELETE FROM held_at_expiry"], None),
    )
    .await
    .expect("the held session outlived its token");
    let err = harness::stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("held for approval"), "{err}");
    assert!(err.contains("terminating connection: the token expired at "), "{err}");
    assert!(!err.contains("did not finish"), "{err}");
    assert_eq!(harness::count_rows(&gw.db, "held_at_expiry").await, 1);
    gw.shutdown.cancel();
    gw.finished().await;
    let closed = closed_sessions(&gw);
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0].0, "token_expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsynced_pipeline_may_finish_after_the_token_expires() {
    use crate::harness::raw::{self, RawClient};
    let issuer = TestIssuer::start().await;
    let mut gw = expiring_gateway(
        &issuer,
        "expiry_unsynced",
        "on_token_expiry = \"finish_transaction\"\ntoken_expiry_grace = \"60s\"",
    )
    .await;
    harness::setup(&gw.db, "CREATE TABLE pipeline_expiry (n int)").await;
    let mut claims = issuer.claims("dana@example.com", &["engineering"]);
    let exp = now() + 5;
    claims["exp"] = json!(exp);
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, &issuer::key(0).token(&claims)).await;
    // A pipeline (psycopg's, say) flushes without a Sync: the server's
    // implicit transaction stays open, though the last ReadyForQuery said
    // idle.
    let mut batch = raw::parse("", "INSERT INTO pipeline_expiry VALUES (1)");
    batch.extend(raw::bind("", ""));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::flush());
    client.send(&batch).await;
    for expected in [b'1', b'2', b'C'] {
        assert_eq!(client.recv().await.expect("answer").0, expected);
    }
    while now() <= exp + 1 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Past expiry the session waits for that transaction's Sync, then ends.
    client.send(&raw::sync()).await;
    let rest = client.until_closed().await;
    assert_eq!(raw::tags(&rest), "NZE", "a warning, the Sync's answer, the end");
    assert!(
        raw::first_error(&rest)[&'M'].contains("the session ended after its transaction"),
        "{:?}",
        raw::first_error(&rest)
    );
    assert_eq!(harness::count_rows(&gw.db, "pipeline_expiry").await, 1);
    gw.shutdown.cancel();
    gw.finished().await;
}
