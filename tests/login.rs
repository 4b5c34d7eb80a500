//! People sign in with OpenID Connect against a real provider (panva's
//! oidc-provider, see `harness::provider`): `sluice login` in a scripted
//! browser, the token cache, `whoami`, `token` (renewed with the refresh
//! token), and psql through the gateway with the ID token as password.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use sluice_core::audit::{EventFilter, SqliteStore};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::provider::{self, Provider};
use crate::harness::{self, Spec, TestGateway};

fn cache_dir(test: &str) -> PathBuf {
    let dir = harness::cluster().dev.dir().join(format!("cache-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs the CLI with its own token cache and no desktop.
async fn sluice(args: &[&str], cache: &Path) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("SLUICE_ISSUER")
        .output()
        .await
        .unwrap()
}

/// `sluice login` (with `extra` arguments) running with its own cache and
/// no desktop, and its stderr's lines.
fn login_process(
    idp: &Provider,
    cache: &Path,
    extra: &[&str],
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["login", "--issuer", &idp.issuer])
        .args(extra)
        .env("XDG_CACHE_HOME", cache)
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    (child, lines)
}

/// `sluice login --client-id sluice-cli` with `login` at the scripted
/// browser; its stderr.
async fn sign_in(idp: &Provider, cache: &Path, login: &str) -> String {
    sign_in_with(idp, cache, login, &["--client-id", "sluice-cli"]).await
}

async fn sign_in_with(idp: &Provider, cache: &Path, login: &str, args: &[&str]) -> String {
    let (mut child, mut lines) = login_process(idp, cache, args);
    let mut said = String::new();
    let url = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("sluice login ended before printing the URL");
        said.push_str(&line);
        said.push('\n');
        if let Some(url) = line.trim().strip_prefix(&format!("{}/auth?", idp.issuer)) {
            break format!("{}/auth?{url}", idp.issuer);
        }
    };
    // Other local programs may poke the redirect listener: an idle
    // connection and a request without this sign-in's state change nothing.
    let redirect = url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| url::Url::parse(&v).unwrap())
        .unwrap();
    let listener = format!("127.0.0.1:{}", redirect.port().unwrap());
    let _idle = tokio::net::TcpStream::connect(&listener).await.unwrap();
    let stray = reqwest::get(format!(
        "http://{listener}/callback?error=access_denied&error_description=%1b%5b2Jgo"
    ))
    .await
    .unwrap();
    assert_eq!(stray.status(), 400);
    let back = provider::browse(&url, login).await;
    assert!(back.contains("/callback?code="), "{back}");
    while let Some(line) = lines.next_line().await.unwrap() {
        said.push_str(&line);
        said.push('\n');
    }
    assert!(child.wait().await.unwrap().success(), "{said}");
    said
}

/// Every event of `gw`'s trail (after it stopped).
fn trail(gw: &TestGateway) -> Vec<sluice_core::audit::StoredEvent> {
    SqliteStore::open_read_only(&gw.audit.path)
        .unwrap()
        .events(&EventFilter::default())
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn oidc(idp: &Provider) -> Spec {
    Spec {
        oidc: Some(format!(
            "[identity.oidc]\nissuer = \"{}\"\naudience = \"sluice-cli\"\nmin_refresh_interval = \"0s\"\n",
            idp.issuer
        )),
        ..Spec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_in_a_browser_then_psql_as_yourself() {
    let idp = Provider::start("login", 3600).await;
    let cache = cache_dir("login");
    let said = sign_in(&idp, &cache, "dana").await;
    assert!(
        said.contains("Signed in: dana@example.com (groups engineering)"),
        "{said}"
    );

    // The cache is the user's alone.
    use std::os::unix::fs::PermissionsExt;
    let tokens = cache.join("sluice/tokens");
    assert_eq!(std::fs::metadata(&tokens).unwrap().permissions().mode() & 0o777, 0o700);
    for entry in std::fs::read_dir(&tokens).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
    let whoami = stdout(&sluice(&["whoami"], &cache).await);
    assert!(whoami.starts_with("dana@example.com\n"), "{whoami}");
    assert!(whoami.contains("groups   engineering"), "{whoami}");
    assert!(whoami.contains(&format!("issuer   {}", idp.issuer)), "{whoami}");

    // The token is the password; statements are recorded under the email.
    let token = stdout(&sluice(&["token"], &cache).await).trim().to_string();
    let mut gw = TestGateway::start("login_psql", oidc(&idp)).await;
    let out = gw.psql(&token, "", &["-c", "SELECT 42"]).await;
    assert_eq!(harness::stdout_ok(&out), "42\n");
    gw.shutdown.cancel();
    gw.finished().await;
    let identities: Vec<String> = trail(&gw).into_iter().filter_map(|e| e.event.identity).collect();
    assert!(identities.iter().any(|i| i == "dana@example.com"), "{identities:?}");

    let before = cached(&cache);
    let out = sluice(&["logout"], &cache).await;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        said.contains("Revoked the refresh token at") && said.contains("Signed out of"),
        "{said}"
    );
    // A copy of the cache taken before is worth nothing now.
    let copied: sluice_core::identity::login::Tokens = serde_json::from_value(before).unwrap();
    let refused = sluice_core::identity::login::refresh(&copied).await.unwrap_err();
    assert!(
        matches!(refused, sluice_core::identity::login::LoginError::Expired { .. }),
        "{refused}"
    );
    let out = sluice(&["token", "--issuer", &idp.issuer], &cache).await;
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!("sluice: not signed in to {}: run sluice login", idp.issuer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_is_renewed_with_the_refresh_token() {
    // ID tokens for 30 s: always within the minute before expiry, so every
    // `sluice token` renews.
    let idp = Provider::start("refresh", 30).await;
    let cache = cache_dir("refresh");
    sign_in(&idp, &cache, "erin").await;
    // The gateway first: the renewed token lives 30 s.
    let gw = TestGateway::start("login_refresh", oidc(&idp)).await;
    let first = cached(&cache);
    let renewed = stdout(&sluice(&["token"], &cache).await).trim().to_string();
    // The provider rotates refresh tokens: a new one shows the renewal (the
    // ID token itself may come out byte for byte the same within a second).
    let after = cached(&cache);
    assert_ne!(
        after["refresh_token"], first["refresh_token"],
        "the token was not renewed"
    );
    assert_eq!(after["id_token"], renewed.as_str(), "the renewed token is cached");
    let out = gw.psql(&renewed, "", &["-c", "SELECT 'renewed'"]).await;
    assert_eq!(harness::stdout_ok(&out), "renewed\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_follows_a_key_rotation_without_restarting() {
    let mut idp = Provider::start("rotate", 3600).await;
    let cache = cache_dir("rotate");
    sign_in(&idp, &cache, "lee").await;
    let old = stdout(&sluice(&["token"], &cache).await).trim().to_string();
    let gw = TestGateway::start("login_rotate", oidc(&idp)).await;
    assert_eq!(harness::stdout_ok(&gw.psql(&old, "", &["-c", "SELECT 1"]).await), "1\n");

    // The provider signs with a new key (kid k2) from now on.
    idp.rotate("k2").await;
    // Signing in again needs no --client-id: the cache remembers it.
    sign_in_with(&idp, &cache, "lee", &[]).await;
    let new = stdout(&sluice(&["token"], &cache).await).trim().to_string();
    let header = |token: &str| -> serde_json::Value {
        use base64::Engine as _;
        let part = token.split('.').next().unwrap();
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    };
    assert_eq!(header(&new)["kid"], "k2");
    assert_eq!(harness::stdout_ok(&gw.psql(&new, "", &["-c", "SELECT 2"]).await), "2\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_flow_signs_in_a_machine_without_a_browser() {
    let idp = Provider::start("device", 3600).await;
    let cache = cache_dir("device");
    let (mut child, mut lines) = login_process(&idp, &cache, &["--client-id", "sluice-cli", "--device"]);
    let mut said = String::new();
    let complete = loop {
        let line = lines.next_line().await.unwrap().expect("no device code printed");
        said.push_str(&line);
        said.push('\n');
        if let Some(rest) = line.strip_prefix("(or open ") {
            break rest.split(", which").next().unwrap().to_string();
        }
    };
    assert!(said.contains("On any device, open "), "{said}");
    assert!(said.contains(" and enter the code "), "{said}");
    // On "another device": the provider's pages, signed in as lee.
    let done = provider::browse(&complete, "lee").await;
    assert!(done.contains("/device"), "{done}");
    while let Some(line) = lines.next_line().await.unwrap() {
        said.push_str(&line);
        said.push('\n');
    }
    assert!(child.wait().await.unwrap().success(), "{said}");
    assert!(said.contains("Signed in: lee@example.com (groups leads)"), "{said}");
    let whoami = stdout(&sluice(&["whoami"], &cache).await);
    assert!(whoami.starts_with("lee@example.com\n"), "{whoami}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_misdirected_real_tokens_are_refused() {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let unb64 = |part: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap();
    let idp = Provider::start("forged", 3600).await;
    let other = Provider::start("forged-other", 3600).await;
    let cache = cache_dir("forged");
    sign_in(&idp, &cache, "dana").await;
    let token = stdout(&sluice(&["token"], &cache).await).trim().to_string();
    let gw = TestGateway::start("login_forged", oidc(&idp)).await;
    let refused = |token: String| {
        let gw = &gw;
        async move {
            let err = gw.connect(&token).await.expect_err("a forged token was accepted");
            let (code, message) = harness::db_error(&err);
            assert!(!message.contains(&token), "the error echoes the token: {message}");
            (code, message)
        }
    };
    gw.connect(&token).await.expect("the real token");
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: serde_json::Value = serde_json::from_slice(&unb64(parts[1])).unwrap();

    // The payload changed under a real signature: more groups.
    claims["groups"] = serde_json::json!(["engineering", "admins"]);
    let tampered = format!("{}.{}.{}", parts[0], b64(claims.to_string().as_bytes()), parts[2]);
    let (code, message) = refused(tampered).await;
    assert_eq!(code, "28P01");
    assert!(message.contains("signature does not verify"), "{message}");

    // alg none over the real claims.
    let none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    let (_, message) = refused(none).await;
    assert!(message.contains("algorithm") && message.contains("none"), "{message}");

    // HS256 with the provider's public key (its modulus) as the HMAC secret.
    let jwks: serde_json::Value = reqwest::get(format!("{}/jwks", idp.issuer))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let modulus = unb64(jwks["keys"][0]["n"].as_str().unwrap());
    let header = b64(format!(
        r#"{{"alg":"HS256","kid":"{}"}}"#,
        jwks["keys"][0]["kid"].as_str().unwrap()
    )
    .as_bytes());
    let signing_input = format!("{header}.{}", parts[1]);
    let mac = {
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&modulus).unwrap();
        mac.update(signing_input.as_bytes());
        mac.finalize().into_bytes()
    };
    let (_, message) = refused(format!("{signing_input}.{}", b64(&mac))).await;
    assert!(message.contains("HS256"), "{message}");

    // A real token from another provider: not this gateway's issuer.
    sign_in(&other, &cache, "dana").await;
    let elsewhere = stdout(&sluice(&["token", "--issuer", &other.issuer], &cache).await)
        .trim()
        .to_string();
    let (_, message) = refused(elsewhere).await;
    assert!(message.contains(&format!("issued by `{}`", other.issuer)), "{message}");

    // A gateway that expects another client (audience) refuses the real token.
    let strict = TestGateway::start(
        "login_audience",
        Spec {
            oidc: Some(format!(
                "[identity.oidc]\nissuer = \"{}\"\naudience = \"another-app\"\n",
                idp.issuer
            )),
            ..Spec::default()
        },
    )
    .await;
    let err = strict
        .connect(&token)
        .await
        .expect_err("the wrong audience was accepted");
    let (_, message) = harness::db_error(&err);
    assert!(message.contains("for audience `sluice-cli`"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_from_the_provider_choose_the_upstream_role() {
    let idp = Provider::start("roles", 3600).await;
    let spec = Spec {
        access: "[[targets.access]]\ngroups = [\"analysts\"]\nrole = \"sluice_plain\"\npassword = \"plain-pw\"\n\n\
                 [[targets.access]]\ngroups = [\"engineering\"]\nrole = \"sluice_app\"\npassword = \"app-pw\"\n"
            .into(),
        ..oidc(&idp)
    };
    let gw = TestGateway::start("login_roles", spec).await;
    let mut roles = Vec::new();
    for person in ["dana", "erin", "lee"] {
        let cache = cache_dir(&format!("roles-{person}"));
        sign_in(&idp, &cache, person).await;
        let token = stdout(&sluice(&["token"], &cache).await).trim().to_string();
        let out = gw.psql(&token, "", &["-c", "SELECT current_user"]).await;
        roles.push(if out.status.success() {
            harness::stdout_ok(&out).trim().to_string()
        } else {
            harness::stderr(&out)
        });
    }
    // engineering and analysts map to their roles; leads to none here.
    assert_eq!(roles[0], "sluice_app");
    assert_eq!(roles[1], "sluice_plain");
    assert!(roles[2].contains("lee@example.com"), "{}", roles[2]);
    assert!(!roles[2].contains("sluice_"), "the refusal names a role: {}", roles[2]);
}

/// `sluice connect TARGET --port 0` running with `cache`, and the psql
/// connection string it printed.
async fn tunnel(gw: &TestGateway, cache: &Path) -> (tokio::process::Child, String) {
    tunnel_to(&gw.addr.to_string(), &gw.db, cache, &[]).await
}

/// As [`tunnel`], to any `gateway`, with `extra` arguments.
async fn tunnel_to(gateway: &str, target: &str, cache: &Path, extra: &[&str]) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["connect", target, "--port", "0", "--gateway", gateway])
        .args(extra)
        .env("SLUICE_CLIENT_SECRET", "ci-secret")
        .env("XDG_CACHE_HOME", cache)
        .env_remove("SLUICE_ISSUER")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines
        .next_line()
        .await
        .unwrap()
        .expect("sluice connect printed nothing");
    let conn = line
        .strip_prefix("psql \"")
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("not a psql line: {line}"))
        .to_string();
    (child, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_lets_psql_in_with_no_password() {
    let idp = Provider::start("connect", 3600).await;
    let cache = cache_dir("connect");
    sign_in(&idp, &cache, "dana").await;
    let mut gw = TestGateway::start("login_connect", oidc(&idp)).await;
    let (_tunnel, conn) = tunnel(&gw, &cache).await;
    assert!(conn.starts_with("host=127.0.0.1 port="), "{conn}");
    assert!(conn.ends_with(&format!("dbname={}", gw.db)), "{conn}");

    // What the tunnel printed is all psql needs: no password anywhere.
    let out = harness::psql(&conn, &["-c", "SELECT 'through the tunnel'", "-w"], None).await;
    assert_eq!(harness::stdout_ok(&out), "through the tunnel\n");
    // psql's default database (the user name) means the tunnel's target.
    let port = conn.split_whitespace().find_map(|kv| kv.strip_prefix("port=")).unwrap();
    let out = harness::psql(
        &format!("host=127.0.0.1 port={port} user=someone"),
        &["-w", "-c", "SELECT 1"],
        None,
    )
    .await;
    assert_eq!(harness::stdout_ok(&out), "1\n");
    // Another database is refused, not quietly replaced.
    let out = harness::psql(&format!("host=127.0.0.1 port={port} dbname=billing"), &["-w"], None).await;
    assert!(!out.status.success());
    assert!(
        harness::stderr(&out).contains(&format!("this tunnel is for target \"{}\", not \"billing\"", gw.db)),
        "{}",
        harness::stderr(&out)
    );
    // A statement cancelled through the tunnel reaches the gateway.
    let client = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
    let (client, connection) = client;
    tokio::spawn(connection);
    let cancel = client.cancel_token();
    let slow = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(30), slow)
        .await
        .expect("the cancel did not arrive")
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );

    // Other local users are refused (root can run psql as another user).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let out = tokio::process::Command::new("runuser")
            .args([
                "-u", "postgres", "--", "psql", "-X", "-w", "-d", &conn, "-c", "SELECT 1",
            ])
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let said = harness::stderr(&out);
        assert!(said.contains("connections from uid"), "{said}");
        assert!(said.contains("are refused"), "{said}");

        // Nor does the token go in the clear to a listener of another
        // user: here the test cluster's postmaster, which runs as postgres.
        let postmaster = format!("127.0.0.1:{}", harness::cluster().dev.port());
        let (_spoof, spoofed) = tunnel_to(&postmaster, &gw.db, &cache, &[]).await;
        let out = harness::psql(&spoofed, &["-w", "-c", "SELECT 1"], None).await;
        let said = harness::stderr(&out);
        assert!(!out.status.success());
        assert!(
            said.contains("belongs to uid") && said.contains("not to you or root"),
            "{said}"
        );
    }

    gw.shutdown.cancel();
    gw.finished().await;
    let sessions: Vec<_> = trail(&gw)
        .into_iter()
        .filter(|e| e.event.detail.kind() == "session_opened")
        .filter_map(|e| e.event.identity)
        .collect();
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    assert!(sessions.iter().all(|i| i == "dana@example.com"), "{sessions:?}");
}

/// `sluice token --client-credentials` for the provider's `sluice-ci`.
async fn service_token(idp: &Provider, secret: &str) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["token", "--client-credentials", "--issuer", &idp.issuer])
        .args(["--client-id", "sluice-ci", "--resource", "urn:sluice"])
        .env("SLUICE_CLIENT_SECRET", secret)
        .output()
        .await
        .unwrap()
}

/// A gateway that accepts `services` (TOML) for the `urn:sluice` resource.
fn with_services(idp: &Provider, services: &str) -> Spec {
    let mut spec = oidc(idp);
    let oidc = spec.oidc.take().unwrap();
    spec.oidc = Some(format!("{oidc}service_audience = \"urn:sluice\"\n{services}"));
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_sign_in_with_client_credentials() {
    let idp = Provider::start("services", 3600).await;
    let ci = "\n[[identity.oidc.services]]\nclient_id = \"sluice-ci\"\nname = \"ci-pipeline\"\n\
              groups = [\"deploy\"]\nlabels = { kind = \"service\" }\n";
    let mut gw = TestGateway::start("login_services", with_services(&idp, ci)).await;

    let token = stdout(&service_token(&idp, "ci-secret").await).trim().to_string();
    let out = gw.psql(&token, "", &["-c", "SELECT 'as a service'"]).await;
    assert_eq!(harness::stdout_ok(&out), "as a service\n");
    // A service's tunnel: the same, with no token in its client's hands.
    let (_tunnel, conn) = tunnel_to(
        &gw.addr.to_string(),
        &gw.db,
        &cache_dir("services-tunnel"),
        &[
            "--issuer",
            &idp.issuer,
            "--client-credentials",
            "--client-id",
            "sluice-ci",
            "--resource",
            "urn:sluice",
        ],
    )
    .await;
    let out = harness::psql(&conn, &["-w", "-c", "SELECT 'tunnelled service'"], None).await;
    assert_eq!(harness::stdout_ok(&out), "tunnelled service\n");
    // People still sign in beside it with their ID tokens.
    let cache = cache_dir("services");
    sign_in(&idp, &cache, "dana").await;
    let person = stdout(&sluice(&["token"], &cache).await).trim().to_string();
    let out = gw.psql(&person, "", &["-c", "SELECT 'as a person'"]).await;
    assert_eq!(harness::stdout_ok(&out), "as a person\n");

    // A wrong secret: the provider's refusal, and no token.
    let out = service_token(&idp, "not-the-secret").await;
    assert!(!out.status.success());
    let said = harness::stderr(&out);
    assert!(said.contains("refused") && said.contains("sluice-ci"), "{said}");
    assert!(out.stdout.is_empty());

    // The service's token is no ID token: a gateway without services
    // refuses it, and so does one that lists another client.
    let plain = TestGateway::start("login_services_none", oidc(&idp)).await;
    let out = plain.psql(&token, "", &["-c", "SELECT 1"]).await;
    let said = harness::stderr(&out);
    assert!(!out.status.success());
    assert!(said.contains("unexpected or unsupported JWT type"), "{said}");
    let other = "\n[[identity.oidc.services]]\nclient_id = \"sluice-deployer\"\n";
    let others = TestGateway::start("login_services_other", with_services(&idp, other)).await;
    let out = others.psql(&token, "", &["-c", "SELECT 1"]).await;
    let said = harness::stderr(&out);
    assert!(
        said.contains("the access token is for client sluice-ci, which this gateway does not accept as a service"),
        "{said}"
    );
    assert!(!said.contains(&token));
    // Listed, but expecting another subject (as for a provider whose
    // service tokens name a service account): a token whose `sub` differs
    // is not that service's.
    let account = "\n[[identity.oidc.services]]\nclient_id = \"sluice-ci\"\nsubject = \"service-account-7\"\n";
    let accounts = TestGateway::start("login_services_sub", with_services(&idp, account)).await;
    let out = accounts.psql(&token, "", &["-c", "SELECT 1"]).await;
    let said = harness::stderr(&out);
    assert!(
        said.contains("the access token of client sluice-ci names another subject"),
        "{said}"
    );

    gw.shutdown.cancel();
    gw.finished().await;
    let opened: Vec<(String, Vec<String>)> = trail(&gw)
        .into_iter()
        .filter_map(|e| match e.event.detail {
            sluice_core::audit::Detail::SessionOpened { groups, .. } => Some((e.event.identity?, groups)),
            _ => None,
        })
        .collect();
    assert_eq!(
        opened,
        [
            ("ci-pipeline".to_string(), vec!["deploy".to_string()]),
            ("ci-pipeline".to_string(), vec!["deploy".to_string()]),
            ("dana@example.com".to_string(), vec!["engineering".to_string()])
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_signs_in_with_the_login_cache() {
    // 30-s ID tokens: always within the minute before expiry, so the
    // console renews the one it finds before using it.
    let idp = Provider::start("console", 30).await;
    let cache = cache_dir("console");
    sign_in(&idp, &cache, "dana").await;
    let before = cached_refresh_token(&cache);
    let gw = TestGateway::start("login_console", oidc(&idp)).await;
    let dir = harness::cluster().dev.dir().join("console-login-state");
    // No --token and no SLUICE_TOKEN: the login cache's.
    let command = format!(
        "env -u SLUICE_TOKEN XDG_CACHE_HOME={} XDG_STATE_HOME={} NO_COLOR=1 {} console --api {} --pg 127.0.0.1:{} --target {}",
        cache.display(),
        dir.display(),
        env!("CARGO_BIN_EXE_sluice"),
        gw.api.as_deref().unwrap(),
        gw.addr.port(),
        gw.db
    );
    let tmux = crate::console::Tmux::start(&dir, &command);
    // Connected: the API took dana's token (a viewer through engineering).
    tmux.shows("● http://").await;
    assert_ne!(
        cached_refresh_token(&cache),
        before,
        "the console did not renew the token"
    );
    tmux.keys("q");
    harness::eventually("the console exits", || async {
        !tmux.run(&["has-session", "-t", "console"]).status.success()
    })
    .await;
}

/// The token cache's one issuer file, as JSON.
fn cached(cache: &Path) -> serde_json::Value {
    let dir = cache.join("sluice/tokens");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
}

fn cached_refresh_token(cache: &Path) -> String {
    cached(cache)["refresh_token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_provider_token_is_refused_and_the_tunnel_renews_it() {
    // 5-s ID tokens: one expires within the test.
    let idp = Provider::start("expired", 5).await;
    let cache = cache_dir("expired");
    sign_in(&idp, &cache, "dana").await;
    let gw = TestGateway::start("login_expired", oidc(&idp)).await;
    let stale = cached(&cache)["id_token"].as_str().unwrap().to_string();
    let payload = stale.split('.').nth(1).unwrap();
    use base64::Engine as _;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    let exp = claims["exp"].as_i64().unwrap();
    // The provider's clock is this machine's: wait until the token is past.
    while chrono::Utc::now().timestamp() <= exp {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let out = gw.psql(&stale, "", &["-c", "SELECT 1"]).await;
    assert!(!out.status.success());
    let said = harness::stderr(&out);
    assert!(
        said.contains("authentication failed: the ID token expired at"),
        "{said}"
    );
    assert!(said.contains("sign in again (sluice login)"), "{said}");
    assert!(!said.contains(&stale));

    // The tunnel renews the cached token before each login.
    let (_tunnel, conn) = tunnel(&gw, &cache).await;
    let out = harness::psql(&conn, &["-w", "-c", "SELECT 'renewed'"], None).await;
    assert_eq!(harness::stdout_ok(&out), "renewed\n");
}
