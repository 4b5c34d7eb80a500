//! The approval bot end to end: a real gateway and PostgreSQL, psql as the
//! requester, the bot's real interaction endpoints receiving correctly
//! signed clicks, and local HTTP servers standing in for the Slack Web API
//! and Discord's REST API, recording every request the bot makes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{Method, Uri};
use axum::response::IntoResponse;
use ed25519_dalek::Signer;
use serde_json::{Value, json};
use sluice_bot::{Bot, BotConfig};
use sluice_core::api::client::ApiClient;
use sluice_core::approvals::{RequestState, RequestView};
use tokio_util::sync::CancellationToken;

use crate::harness::{self, AGENT, ALICE, BOB, Spec, TestGateway};

const BOT_TOKEN: &str = "approval-bot-test-token";
const SIGNING_SECRET: &str = "test-signing-secret";
const CAROL: &str = "U0CAROL";
const BOB_IN_SLACK: &str = "U0BOB";
/// Not listed in the bot's users: mapped by the email of their Slack profile.
const CAROL_BY_EMAIL: &str = "U0CAROL2";
const STRANGER: &str = "U0STRANGER";
const CAROL_ON_DISCORD: &str = "80351110224678912";
const STRANGER_ON_DISCORD: &str = "80351110224678913";
const BOB_ON_DISCORD: &str = "80351110224678914";
const CHANNEL: u64 = 777;

const POLICY: &str = r#"[policy]
default = "allow"

[[policy.rules]]
name = "orders-need-a-lead"
decision = "require_approval"
groups = ["oncall"]
kinds = ["write"]
relations = ["orders"]
approvers = ["leads", "analytics"]
reason = "on-call changes to orders are reviewed by a lead"

[[policy.rules]]
name = "urgent-or-never"
decision = "require_approval"
groups = ["oncall"]
kinds = ["write"]
relations = ["urgent"]
approvers = ["leads"]
timeout = "1s"

[[policy.rules]]
name = "payments-only-in-the-console"
decision = "require_approval"
groups = ["oncall"]
kinds = ["write"]
relations = ["payments"]
approvers = ["leads"]
approve_via = ["console"]
"#;

fn sha256_hex(token: &str) -> String {
    use sha2::Digest;
    hex_string(&sha2::Sha256::digest(token.as_bytes()))
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn gateway(test: &str) -> TestGateway {
    let bot = format!(
        "\n[[identity.tokens]]\nname = \"approval-bot\"\nsha256 = \"{}\"\ngroups = [\"bots\"]\n",
        sha256_hex(BOT_TOKEN)
    );
    gateway_with(test, &bot, None).await
}

/// The bot's gateway; `bot` declares the bot's machine identity, in
/// `extra` (a service token) or in `oidc` (a client-credentials service).
async fn gateway_with(test: &str, bot: &str, oidc: Option<String>) -> TestGateway {
    let extra = format!(
        "{bot}\n\
         [api]\nlisten = \"127.0.0.1:0\"\nviewer_groups = [\"oncall\"]\napprover_groups = [\"engineering\", \"analytics\"]\n\n\
         [[api.delegates]]\nidentity = \"approval-bot\"\nvia = [\"slack\", \"discord\"]\n\
         people = {{ \"carol@example.com\" = [\"leads\"], \"bob\" = [\"leads\"], \"erin@example.com\" = [\"analysts\"] }}\n"
    );
    let gw = TestGateway::start(
        test,
        Spec {
            policy: Some(POLICY.into()),
            extra,
            oidc,
            ..Spec::default()
        },
    )
    .await;
    harness::setup(
        &gw.db,
        "CREATE TABLE orders (id int, email text); \
         INSERT INTO orders SELECT n, 'buyer' || n || '@example.com' FROM generate_series(1, 5) n; \
         CREATE TABLE urgent (id int); INSERT INTO urgent VALUES (1); \
         CREATE TABLE payments (id int); INSERT INTO payments VALUES (1)",
    )
    .await;
    gw
}

/// One request the bot made to a chat platform's API.
#[derive(Debug, Clone)]
struct Call {
    /// "chat.postMessage", or "POST /api/v10/channels/777/messages".
    method: String,
    body: Value,
}

/// A local stand-in for Slack's Web API (with a Socket Mode websocket) or
/// Discord's REST API.
#[derive(Clone)]
struct FakeChat {
    addr: SocketAddr,
    state: Arc<Fake>,
}

struct Fake {
    calls: Mutex<Vec<Call>>,
    addr: Mutex<Option<SocketAddr>>,
    /// Frames for the Socket Mode connection(s), from the test.
    to_socket: tokio::sync::broadcast::Sender<String>,
    /// Message edits fail (Discord answers 404 Unknown Message).
    fail_edits: std::sync::atomic::AtomicBool,
    /// Discord answers a new message this long after it has it (and shows
    /// it: recorded), in ms.
    post_answer_delay: std::sync::atomic::AtomicU64,
}

impl Fake {
    fn record(&self, method: &str, body: Value) {
        self.calls.lock().unwrap().push(Call {
            method: method.to_string(),
            body,
        });
    }
}

impl FakeChat {
    async fn start(router: Router<Arc<Fake>>) -> FakeChat {
        let state = Arc::new(Fake {
            calls: Mutex::new(Vec::new()),
            addr: Mutex::new(None),
            to_socket: tokio::sync::broadcast::channel(16).0,
            fail_edits: std::sync::atomic::AtomicBool::new(false),
            post_answer_delay: std::sync::atomic::AtomicU64::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        *state.addr.lock().unwrap() = Some(addr);
        let app = router.with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeChat { addr, state }
    }

    async fn slack() -> FakeChat {
        FakeChat::start(
            Router::new()
                .route("/api/{method}", axum::routing::any(slack_api))
                .route("/socket", axum::routing::get(slack_socket)),
        )
        .await
    }

    /// The ts of the Slack message posted for request `id` (the fake
    /// numbers them in order).
    fn ts_of(&self, id: u64) -> String {
        let posts = self.calls("chat.postMessage");
        let needle = format!("\"value\":\"{id}\"");
        let n = posts
            .iter()
            .position(|p| p.to_string().contains(&needle))
            .expect("no message for the request");
        post_ts(n)
    }

    /// The id of the Discord message posted for request `id` (the fake
    /// numbers them by their place among all calls).
    fn message_of(&self, id: u64) -> String {
        let calls = self.state.calls.lock().unwrap();
        let needle = format!("sluice:approve:{id}\"");
        let n = calls
            .iter()
            .position(|c| c.method.starts_with("POST /api/v10/channels/") && c.body.to_string().contains(&needle))
            .expect("no message for the request");
        (5000 + n).to_string()
    }

    /// Sends a frame to the bot's Socket Mode connection.
    fn to_socket(&self, frame: Value) {
        self.state.to_socket.send(frame.to_string()).unwrap();
    }

    async fn discord() -> FakeChat {
        FakeChat::start(
            Router::new()
                .route("/gateway", axum::routing::get(discord_gateway))
                .fallback(discord_api),
        )
        .await
    }

    fn calls(&self, method: &str) -> Vec<Value> {
        let calls = self.state.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| c.method.starts_with(method))
            .map(|c| c.body.clone())
            .collect()
    }

    /// Waits for a call to `method` (or a path under it) whose body
    /// contains `needle`: for less than the bot's periodic reconciliation,
    /// so that only following the event stream (or the reconciliation at
    /// its start) passes, never the next reconciliation.
    async fn wait_for(&self, method: &str, needle: &str) -> Value {
        let bound = sluice_bot::engine::RECONCILE_EVERY - Duration::from_secs(5);
        let mut found = None;
        harness::eventually_within(&format!("{method} with {needle:?}"), bound, || {
            found = self
                .calls(method)
                .into_iter()
                .find(|body| body.to_string().contains(needle));
            std::future::ready(found.is_some())
        })
        .await;
        found.unwrap()
    }
}

async fn slack_api(
    State(fake): State<Arc<Fake>>,
    UrlPath(method): UrlPath<String>,
    uri: Uri,
    body: Bytes,
) -> axum::Json<Value> {
    // Methods called with GET take their arguments in the query.
    let body: Value = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(_) => Value::Object(
            url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                .collect(),
        ),
    };
    let reply = match method.as_str() {
        "chat.postMessage" => {
            let n = fake.calls.lock().unwrap().iter().filter(|c| c.method == method).count();
            let ts = format!("1700000000.{:06}", n + 1);
            json!({"ok": true, "channel": body["channel"], "ts": ts, "message": {"ts": ts, "text": body["text"]}})
        }
        "chat.update" => {
            json!({"ok": true, "channel": body["channel"], "ts": body["ts"], "message": {"text": body["text"]}})
        }
        "chat.postEphemeral" => json!({"ok": true, "message_ts": "1700000000.999999"}),
        // Slack user U0CAROL2 has carol's email in their profile.
        "users.info" if body["user"] == "U0CAROL2" => {
            json!({"ok": true, "user": {"id": "U0CAROL2", "team_id": "T0TEST", "profile": {"email": "carol@example.com"}}})
        }
        // A guest with a listed person's email: never mapped by it.
        "users.info" if body["user"] == "U0GUEST" => json!({"ok": true, "user": {
            "id": "U0GUEST", "team_id": "T0TEST", "is_restricted": true,
            "profile": {"email": "carol@example.com"}
        }}),
        "users.info" => json!({"ok": false, "error": "user_not_found"}),
        "auth.test" => {
            json!({"ok": true, "user_id": "U0BOT", "team_id": "T0TEST", "team": "Test", "url": "https://test.slack.com/"})
        }
        "apps.connections.open" => {
            let addr = fake.addr.lock().unwrap().unwrap();
            json!({"ok": true, "url": format!("ws://{addr}/socket")})
        }
        "views.open" => {
            let mut view = body["view"].clone();
            view["id"] = json!("V0TEST");
            view["team_id"] = json!("T0TEST");
            json!({"ok": true, "view": view})
        }
        _ => json!({"ok": false, "error": "unknown_method"}),
    };
    fake.record(&method, body);
    axum::Json(reply)
}

/// Socket Mode: greets, forwards the test's frames, records what the bot
/// sends back ("socket" calls: its acknowledgements).
async fn slack_socket(
    State(fake): State<Arc<Fake>>,
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> axum::response::Response {
    use axum::extract::ws::Message;
    use futures_util::{SinkExt, StreamExt};
    upgrade.on_upgrade(move |socket| async move {
        let (mut tx, mut rx) = socket.split();
        let mut frames = fake.to_socket.subscribe();
        fake.record("socket.connected", Value::Null);
        let hello = json!({"type": "hello", "num_connections": 1});
        if tx.send(Message::Text(hello.to_string().into())).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                frame = frames.recv() => match frame {
                    Ok(frame) => {
                        if tx.send(Message::Text(frame.into())).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                },
                message = rx.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        fake.record("socket", serde_json::from_str(text.as_str()).unwrap_or(Value::Null));
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                },
            }
        }
    })
}

async fn discord_api(State(fake): State<Arc<Fake>>, method: Method, uri: Uri, body: Bytes) -> axum::response::Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri.path().to_string();
    if path.ends_with("/gateway") || path.ends_with("/gateway/bot") {
        fake.record(&format!("{method} {path}"), Value::Null);
        let addr = fake.addr.lock().unwrap().unwrap();
        return axum::Json(json!({
            "url": format!("ws://{addr}/gateway"), "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
        }))
        .into_response();
    }
    if path.ends_with("/callback") {
        // An interaction's answer (gateway mode).
        fake.record(&format!("{method} {path}"), body);
        return axum::http::StatusCode::NO_CONTENT.into_response();
    }
    if method == Method::PATCH && fake.fail_edits.load(std::sync::atomic::Ordering::Relaxed) {
        fake.record(&format!("{method} {path} (failed)"), body);
        let unknown = json!({"message": "Unknown Message", "code": 10008});
        return (axum::http::StatusCode::NOT_FOUND, axum::Json(unknown)).into_response();
    }
    let id = match path.rsplit_once("/messages/") {
        Some((_, id)) => id.to_string(),
        None => (5000 + fake.calls.lock().unwrap().len()).to_string(),
    };
    fake.record(&format!("{method} {path}"), body.clone());
    if method == Method::POST {
        let delay = fake.post_answer_delay.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    axum::Json(message_json(&id, &body["content"])).into_response()
}

/// A Discord message object as the REST API returns it.
fn message_json(id: &str, content: &Value) -> Value {
    json!({
        "id": id, "channel_id": CHANNEL.to_string(),
        "author": {"id": "9", "username": "sluice", "discriminator": "0000", "avatar": null, "bot": true},
        "content": content, "timestamp": "2026-11-29T10:00:00.000000+00:00", "edited_timestamp": null,
        "tts": false, "mention_everyone": false, "mentions": [], "mention_roles": [], "attachments": [],
        "embeds": [], "pinned": false, "type": 0
    })
}

/// Discord's gateway, as much of it as a bot with no intents sees: HELLO,
/// READY after IDENTIFY, heartbeat acks, and the test's dispatches.
async fn discord_gateway(
    State(fake): State<Arc<Fake>>,
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> axum::response::Response {
    use axum::extract::ws::Message;
    use futures_util::{SinkExt, StreamExt};
    upgrade.on_upgrade(move |socket| async move {
        let (mut tx, mut rx) = socket.split();
        let mut frames = fake.to_socket.subscribe();
        let mut seq = 1u64;
        let hello = json!({"op": 10, "d": {"heartbeat_interval": 45000}});
        if tx.send(Message::Text(hello.to_string().into())).await.is_err() {
            return;
        }
        loop {
            let reply = tokio::select! {
                frame = frames.recv() => match frame {
                    Ok(frame) => {
                        seq += 1;
                        json!({"op": 0, "t": "INTERACTION_CREATE", "s": seq, "d": serde_json::from_str::<Value>(&frame).unwrap()})
                    }
                    Err(_) => return,
                },
                message = rx.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                        match frame["op"].as_u64() {
                            Some(2) => {
                                fake.record("gateway.identify", frame["d"]["intents"].clone());
                                json!({"op": 0, "t": "READY", "s": 1, "d": {
                                    "v": 10, "session_id": "session-1", "resume_gateway_url": "ws://127.0.0.1:9",
                                    "user": {"id": "9", "username": "sluice", "discriminator": "0", "avatar": null, "bot": true},
                                    "guilds": [], "shard": [0, 1], "application": {"id": "2", "flags": 0}
                                }})
                            }
                            Some(1) => json!({"op": 11}),
                            _ => continue,
                        }
                    }
                    Some(Ok(_)) => continue,
                    _ => return,
                },
            };
            if tx.send(Message::Text(reply.to_string().into())).await.is_err() {
                return;
            }
        }
    })
}

fn discord_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[42u8; 32])
}

/// A running bot and how to stop it.
struct RunningBot {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningBot {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn bot_config(gw: &TestGateway, slack: Option<&FakeChat>, discord: Option<&FakeChat>, state: &Path) -> BotConfig {
    bot_config_with(gw, slack, discord, state, "")
}

/// A Discord bot in gateway mode (no interactions endpoint, no public key).
fn gateway_bot_config(gw: &TestGateway, discord: &FakeChat, state: &Path) -> BotConfig {
    let text = format!(
        "[gateway]\napi = \"{}\"\ntoken_env = \"BOT_TOKEN\"\nstate = \"{}\"\n\n\
         [discord]\nmode = \"gateway\"\nbot_token_env = \"BOT_TOKEN\"\nchannel_id = \"{CHANNEL}\"\n\
         api_url = \"http://{}\"\n[discord.users]\n\"{CAROL_ON_DISCORD}\" = \"carol@example.com\"\n",
        gw.api.as_deref().unwrap(),
        state.display(),
        discord.addr
    );
    let env = |name: &str| (name == "BOT_TOKEN").then(|| BOT_TOKEN.to_string());
    BotConfig::parse(&text, Path::new("/tmp/bot.toml"), &env).unwrap()
}

/// `slack_extra`: more [slack] keys (`mode = "socket"`).
fn bot_config_with(
    gw: &TestGateway,
    slack: Option<&FakeChat>,
    discord: Option<&FakeChat>,
    state: &Path,
    slack_extra: &str,
) -> BotConfig {
    let text = bot_config_text(gw, slack, discord, state, slack_extra, "token_env = \"BOT_TOKEN\"\n");
    BotConfig::parse(&text, Path::new("/tmp/bot.toml"), &bot_env).unwrap()
}

fn bot_env(name: &str) -> Option<String> {
    match name {
        "BOT_TOKEN" => Some(BOT_TOKEN.to_string()),
        "BOT_CLIENT_SECRET" => Some("ci-secret".to_string()),
        "SLACK_TOKEN" => Some("xoxb-test".to_string()),
        "SLACK_SECRET" => Some(SIGNING_SECRET.to_string()),
        "DISCORD_TOKEN" => Some("discord-test-token".to_string()),
        "SLACK_APP_TOKEN" => Some("xapp-test".to_string()),
        _ => None,
    }
}

/// The bot's configuration file; `auth`: how it signs in to the gateway
/// (the `[gateway]` keys, or a `[gateway.client_credentials]` table last).
fn bot_config_text(
    gw: &TestGateway,
    slack: Option<&FakeChat>,
    discord: Option<&FakeChat>,
    state: &Path,
    slack_extra: &str,
    auth: &str,
) -> String {
    let mut text = format!(
        "[gateway]\napi = \"{}\"\nstate = \"{}\"\n{auth}",
        gw.api.as_deref().unwrap(),
        state.display()
    );
    if let Some(slack) = slack {
        text.push_str(&format!(
            "\n[slack]\nbot_token_env = \"SLACK_TOKEN\"\nsigning_secret_env = \"SLACK_SECRET\"\nchannel = \"C0APPROVALS\"\n{slack_extra}\
             listen = \"127.0.0.1:0\"\napi_url = \"http://{}/api\"\nmap_by_email = true\n[slack.users]\n{CAROL} = \"carol@example.com\"\n{BOB_IN_SLACK} = \"bob\"\n",
            slack.addr
        ));
    }
    if let Some(discord) = discord {
        text.push_str(&format!(
            "\n[discord]\nbot_token_env = \"DISCORD_TOKEN\"\npublic_key = \"{}\"\nchannel_id = \"{CHANNEL}\"\n\
             listen = \"127.0.0.1:0\"\napi_url = \"http://{}\"\n[discord.users]\n\"{CAROL_ON_DISCORD}\" = \"carol@example.com\"\n\
             \"{BOB_ON_DISCORD}\" = \"bob\"\n",
            hex_string(&discord_key().verifying_key().to_bytes()),
            discord.addr
        ));
    }
    text
}

async fn start_bot(config: BotConfig) -> RunningBot {
    let bot = Bot::bind(config).await.unwrap();
    // Socket Mode listens nowhere.
    let addr = bot
        .local_addrs()
        .first()
        .copied()
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9)));
    let stop = CancellationToken::new();
    let task = tokio::spawn(bot.run(stop.clone()));
    RunningBot { addr, stop, task }
}

fn state_file(test: &str) -> PathBuf {
    harness::cluster().dev.dir().join(format!("bot-state-{test}.json"))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Sends Slack's interaction request for `payload`, signed as Slack signs.
async fn slack_interaction(bot: SocketAddr, payload: Value, secret: &str) -> reqwest::Response {
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &payload.to_string())
        .finish();
    let ts = unix_now().to_string();
    let signature = sluice_bot::verify::slack_signature(secret, &ts, body.as_bytes());
    reqwest::Client::new()
        .post(format!("http://{bot}/slack/interactions"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts)
        .header("x-slack-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap()
}

fn slack_click(slack: &FakeChat, user: &str, action: &str, request: u64) -> Value {
    slack_click_on(&slack.ts_of(request), user, action, request)
}

fn slack_click_on(ts: &str, user: &str, action: &str, request: u64) -> Value {
    json!({
        "type": "block_actions",
        "user": {"id": user, "username": "someone", "team_id": "T0TEST"},
        "trigger_id": format!("trigger-{user}-{request}"),
        "channel": {"id": "C0APPROVALS", "name": "approvals"},
        "message": {"ts": ts},
        "actions": [{"action_id": action, "block_id": "b", "value": request.to_string(), "type": "button"}]
    })
}

fn viewer(gw: &TestGateway) -> ApiClient {
    ApiClient::new(gw.api.as_deref().unwrap(), Some(BOB))
}

async fn pending(gw: &TestGateway, rule: &str) -> RequestView {
    let api = viewer(gw);
    let deadline = tokio::time::Instant::now() + harness::PATIENCE;
    loop {
        let found = api
            .approvals()
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.state == RequestState::Pending && r.rule == rule);
        if let Some(request) = found {
            return request;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request of {rule} became pending"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn bob_runs(gw: &TestGateway, sql: &str) -> tokio::task::JoinHandle<std::process::Output> {
    let conn = gw.conn_str("bob", BOB, "");
    let sql = sql.to_string();
    tokio::spawn(async move { harness::psql(&conn, &["-c", &sql], None).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_click_approves_and_the_message_follows() {
    let gw = gateway("bot_slack_approve").await;
    let slack = FakeChat::slack().await;
    let state = state_file("bot_slack_approve");
    let bot = start_bot(bot_config(&gw, Some(&slack), None, &state)).await;

    let psql = bob_runs(&gw, "DELETE FROM orders WHERE email = 'buyer1@example.com' OR id = 2");
    let request = pending(&gw, "orders-need-a-lead").await;
    let id = request.id.to_string();
    let post = slack.wait_for("chat.postMessage", &format!("\"value\":\"{id}\"")).await;
    let text = post.to_string();
    assert_eq!(post["channel"], "C0APPROVALS");
    for expected in [
        format!("request {id}"),
        "*bob* (oncall) on *".to_string(),
        "DELETE FROM orders WHERE email = '".to_string(),
        "orders-need-a-lead".to_string(),
        "on-call changes to orders are reviewed by a lead".to_string(),
        "0 of 1 approval".to_string(),
        "sluice_approve".to_string(),
        "sluice_deny".to_string(),
    ] {
        assert!(text.contains(&expected), "{expected:?} missing from {text}");
    }
    // No clear PII in chat: the literal email went through the detectors.
    assert!(!text.contains("buyer1@example.com"), "{text}");

    // A forged click decides nothing.
    let forged = slack_interaction(
        bot.addr,
        slack_click(&slack, CAROL, "sluice_approve", request.id),
        "not-the-secret",
    )
    .await;
    assert_eq!(forged.status(), 401);
    // Someone the bot cannot map: told so, privately; nothing decided.
    let unmapped = slack_interaction(
        bot.addr,
        slack_click(&slack, STRANGER, "sluice_approve", request.id),
        SIGNING_SECRET,
    )
    .await;
    assert_eq!(unmapped.status(), 200);
    let told = slack.wait_for("chat.postEphemeral", STRANGER).await;
    assert!(
        told["text"]
            .as_str()
            .unwrap()
            .contains("does not know who Slack user U0STRANGER is"),
        "{told}"
    );
    // The bot looked for them by profile email first (map_by_email).
    assert!(slack.calls("users.info").iter().any(|q| q["user"] == STRANGER));
    // A guest whose profile carries carol's email is not carol.
    slack_interaction(
        bot.addr,
        slack_click(&slack, "U0GUEST", "sluice_approve", request.id),
        SIGNING_SECRET,
    )
    .await;
    slack.wait_for("chat.postEphemeral", "U0GUEST").await;
    // A click on another message than the one the bot keeps for this
    // request (an old trail's request with the same id) decides nothing.
    let elsewhere = slack_click_on("1600000000.000001", CAROL, "sluice_approve", request.id);
    slack_interaction(bot.addr, elsewhere, SIGNING_SECRET).await;
    let told = slack
        .wait_for("chat.postEphemeral", "not the message the bot keeps")
        .await;
    assert_eq!(told["user"], CAROL);
    // bob may not approve his own request, whatever groups he has.
    slack_interaction(
        bot.addr,
        slack_click(&slack, BOB_IN_SLACK, "sluice_approve", request.id),
        SIGNING_SECRET,
    )
    .await;
    let told = slack.wait_for("chat.postEphemeral", BOB_IN_SLACK).await;
    assert!(
        told["text"]
            .as_str()
            .unwrap()
            .contains(&format!("bob asked for request {id} and cannot decide it")),
        "{told}"
    );
    assert_eq!(
        viewer(&gw).approval(request.id).await.unwrap().state,
        RequestState::Pending
    );

    // carol's click: psql gets its result, and the message says who approved.
    let approved = slack_interaction(
        bot.addr,
        slack_click(&slack, CAROL, "sluice_approve", request.id),
        SIGNING_SECRET,
    )
    .await;
    assert_eq!(approved.status(), 200);
    let out = psql.await.unwrap();
    assert_eq!(harness::stdout_ok(&out), "DELETE 2\n");
    let update = slack.wait_for("chat.update", "Approved by carol@example.com").await;
    assert_eq!(update["ts"], post_ts(0));
    assert!(
        !update.to_string().contains("sluice_approve"),
        "buttons stay after the decision: {update}"
    );
    let view = viewer(&gw).approval(request.id).await.unwrap();
    assert_eq!(view.approvals[0].by, "carol@example.com");
    assert_eq!(view.approvals[0].via, "slack");
    assert_eq!(view.approvals[0].chat_user.as_deref(), Some(CAROL));
    // A second click is harmless: the same decision by the same approver.
    slack_interaction(
        bot.addr,
        slack_click(&slack, CAROL, "sluice_approve", request.id),
        SIGNING_SECRET,
    )
    .await;
    assert_eq!(slack.calls("chat.postMessage").len(), 1);
    bot.stop().await;
}

fn post_ts(n: usize) -> String {
    format!("1700000000.{:06}", n + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_deny_asks_for_a_reason_and_the_requester_reads_it() {
    let gw = gateway("bot_slack_deny").await;
    let slack = FakeChat::slack().await;
    let bot = start_bot(bot_config(&gw, Some(&slack), None, &state_file("bot_slack_deny"))).await;
    let psql = bob_runs(&gw, "DELETE FROM orders");
    let request = pending(&gw, "orders-need-a-lead").await;
    slack
        .wait_for("chat.postMessage", &format!("\"value\":\"{}\"", request.id))
        .await;

    slack_interaction(
        bot.addr,
        slack_click(&slack, CAROL_BY_EMAIL, "sluice_deny", request.id),
        SIGNING_SECRET,
    )
    .await;
    let modal = slack
        .wait_for("views.open", &format!("trigger-{CAROL_BY_EMAIL}-{}", request.id))
        .await;
    assert_eq!(
        modal["view"]["private_metadata"],
        format!("{}:{}", request.id, slack.ts_of(request.id))
    );
    assert_eq!(modal["view"]["callback_id"], "sluice_deny_reason");
    // Still pending until the form is sent.
    assert_eq!(
        viewer(&gw).approval(request.id).await.unwrap().state,
        RequestState::Pending
    );

    let submission = json!({
        "type": "view_submission",
        "user": {"id": CAROL_BY_EMAIL},
        "view": {
            "id": "V0TEST", "callback_id": "sluice_deny_reason", "private_metadata": modal["view"]["private_metadata"],
            "state": {"values": {"reason": {"reason": {"type": "plain_text_input", "value": "not during the sale"}}}}
        }
    });
    let response = slack_interaction(bot.addr, submission, SIGNING_SECRET).await;
    assert_eq!(response.status(), 200);
    let out = psql.await.unwrap();
    let stderr = harness::stderr(&out);
    assert!(stderr.contains("carol@example.com"), "{stderr}");
    assert!(stderr.contains("not during the sale"), "{stderr}");
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 5);
    slack
        .wait_for("chat.update", "Denied by carol@example.com: not during the sale")
        .await;
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_expiry_and_a_restarted_bot() {
    let gw = gateway("bot_slack_restart").await;
    let slack = FakeChat::slack().await;
    let state = state_file("bot_slack_restart");
    let bot = start_bot(bot_config(&gw, Some(&slack), None, &state)).await;

    // Expired before anyone clicked: the message says so, and a late click
    // is told why nothing happened.
    let urgent = bob_runs(&gw, "DELETE FROM urgent");
    let short = pending(&gw, "urgent-or-never").await;
    slack
        .wait_for("chat.postMessage", &format!("\"value\":\"{}\"", short.id))
        .await;
    let out = urgent.await.unwrap();
    assert!(harness::stderr(&out).contains("expired"), "{}", harness::stderr(&out));
    slack.wait_for("chat.update", "Expired").await;
    slack_interaction(
        bot.addr,
        slack_click(&slack, CAROL, "sluice_approve", short.id),
        SIGNING_SECRET,
    )
    .await;
    let told = slack.wait_for("chat.postEphemeral", "no longer pending").await;
    assert!(told["text"].as_str().unwrap().contains("it was expired"), "{told}");

    // The bot restarts while a request is pending: no second message, and
    // the first one still follows the decision.
    let psql = bob_runs(&gw, "DELETE FROM orders WHERE id = 5");
    let request = pending(&gw, "orders-need-a-lead").await;
    let needle = format!("\"value\":\"{}\"", request.id);
    slack.wait_for("chat.postMessage", &needle).await;
    bot.stop().await;
    let bot = start_bot(bot_config(&gw, Some(&slack), None, &state)).await;
    // Decided elsewhere (the API, as the console would): the message follows.
    let decided = ApiClient::new(gw.api.as_deref().unwrap(), Some(AGENT))
        .decide(request.id, true, None)
        .await
        .unwrap();
    assert_eq!(decided.state, RequestState::Approved);
    assert_eq!(harness::stdout_ok(&psql.await.unwrap()), "DELETE 1\n");
    slack.wait_for("chat.update", "Approved by agent at").await;
    let posts = slack
        .calls("chat.postMessage")
        .into_iter()
        .filter(|p| p.to_string().contains(&needle))
        .count();
    assert_eq!(posts, 1, "the restarted bot posted the request again");
    bot.stop().await;
}

/// Sends a Discord interaction signed with the application's key.
async fn discord_interaction(bot: SocketAddr, payload: &Value, key: &ed25519_dalek::SigningKey) -> reqwest::Response {
    let body = payload.to_string();
    let ts = unix_now().to_string();
    let signature = hex_string(&key.sign(&[ts.as_bytes(), body.as_bytes()].concat()).to_bytes());
    reqwest::Client::new()
        .post(format!("http://{bot}/discord/interactions"))
        .header("content-type", "application/json")
        .header("x-signature-timestamp", ts)
        .header("x-signature-ed25519", signature)
        .body(body)
        .send()
        .await
        .unwrap()
}

fn discord_click(user: &str, custom_id: &str, message: &str) -> Value {
    json!({
        "type": 3, "id": "1", "application_id": "2", "token": "interaction-token", "version": 1,
        "channel_id": CHANNEL.to_string(), "guild_id": "3",
        "member": {"user": {"id": user, "username": "someone"}, "roles": []},
        "message": {"id": message},
        "data": {"custom_id": custom_id, "component_type": 2}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_buttons_and_the_reason_modal() {
    let gw = gateway("bot_discord").await;
    let discord = FakeChat::discord().await;
    let bot = start_bot(bot_config(&gw, None, Some(&discord), &state_file("bot_discord"))).await;
    let post = format!("POST /api/v10/channels/{CHANNEL}/messages");

    // Discord checks the endpoint with a signed PING.
    let pong = discord_interaction(
        bot.addr,
        &json!({"type": 1, "id": "1", "application_id": "2", "token": "t", "version": 1}),
        &discord_key(),
    )
    .await;
    assert_eq!(pong.status(), 200);
    assert_eq!(pong.json::<Value>().await.unwrap(), json!({"type": 1}));
    let forged = discord_interaction(
        bot.addr,
        &json!({"type": 1}),
        &ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]),
    )
    .await;
    assert_eq!(forged.status(), 401);

    // Discord shows the message before the bot has its answer: a click
    // there waits for the bot to know its message, rather than being
    // taken for a click on an older one.
    discord
        .state
        .post_answer_delay
        .store(100, std::sync::atomic::Ordering::Relaxed);
    let psql = bob_runs(&gw, "DELETE FROM orders WHERE id = 1");
    let request = pending(&gw, "orders-need-a-lead").await;
    let approve = format!("sluice:approve:{}", request.id);
    let message = discord.wait_for(&post, &approve).await;
    let text = message.to_string();
    assert!(text.contains("DELETE FROM orders WHERE id = 1"), "{text}");
    assert!(text.contains("orders-need-a-lead"), "{text}");
    assert_eq!(message["allowed_mentions"]["parse"], json!([]), "{text}");

    let stranger = discord_interaction(
        bot.addr,
        &discord_click(STRANGER_ON_DISCORD, &approve, &discord.message_of(request.id)),
        &discord_key(),
    )
    .await;
    let answer: Value = stranger.json().await.unwrap();
    assert_eq!(answer["type"], 4);
    assert_eq!(answer["data"]["flags"], 64);
    assert!(
        answer["data"]["content"]
            .as_str()
            .unwrap()
            .contains("does not know who Discord user"),
        "{answer}"
    );
    discord
        .state
        .post_answer_delay
        .store(0, std::sync::atomic::Ordering::Relaxed);

    let clicked = discord_interaction(
        bot.addr,
        &discord_click(CAROL_ON_DISCORD, &approve, &discord.message_of(request.id)),
        &discord_key(),
    )
    .await;
    assert_eq!(clicked.json::<Value>().await.unwrap(), json!({"type": 6}));
    assert_eq!(harness::stdout_ok(&psql.await.unwrap()), "DELETE 1\n");
    let edit = discord
        .wait_for(
            "PATCH /api/v10/channels/777/messages/5000",
            "Approved by carol@example.com",
        )
        .await;
    assert_eq!(edit["components"], json!([]), "{edit}");
    let view = viewer(&gw).approval(request.id).await.unwrap();
    assert_eq!(
        (view.approvals[0].via.as_str(), view.approvals[0].chat_user.as_deref()),
        ("discord", Some(CAROL_ON_DISCORD))
    );

    // Deny: the button opens a modal; its submission carries the reason.
    let psql = bob_runs(&gw, "DELETE FROM orders WHERE id = 2");
    let second = pending(&gw, "orders-need-a-lead").await;
    discord.wait_for(&post, &format!("sluice:deny:{}", second.id)).await;
    let modal: Value = discord_interaction(
        bot.addr,
        &discord_click(
            CAROL_ON_DISCORD,
            &format!("sluice:deny:{}", second.id),
            &discord.message_of(second.id),
        ),
        &discord_key(),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(modal["type"], 9);
    let modal_id = modal["data"]["custom_id"].as_str().unwrap().to_string();
    let submit = json!({
        "type": 5, "id": "1", "application_id": "2", "token": "t", "version": 1,
        "member": {"user": {"id": CAROL_ON_DISCORD, "username": "carol"}, "roles": []},
        "data": {"custom_id": modal_id, "components": [{"type": 1, "components": [{"type": 4, "custom_id": "reason", "value": "wrong table"}]}]}
    });
    let submitted = discord_interaction(bot.addr, &submit, &discord_key()).await;
    assert_eq!(submitted.json::<Value>().await.unwrap(), json!({"type": 6}));
    let stderr = harness::stderr(&psql.await.unwrap());
    assert!(stderr.contains("wrong table"), "{stderr}");
    discord
        .wait_for(
            "PATCH /api/v10/channels/777/messages",
            "Denied by carol@example.com: wrong table",
        )
        .await;
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_decides_only_for_the_people_it_maps_and_where_rules_allow() {
    let gw = gateway("bot_delegates").await;
    let base = gw.api.as_deref().unwrap();
    let slack_bot = ApiClient::new(base, Some(BOT_TOKEN)).via("slack");
    let psql = bob_runs(&gw, "DELETE FROM payments");
    let request = pending(&gw, "payments-only-in-the-console").await;

    // The bot reads what viewers read, to follow requests.
    assert!(slack_bot.approvals().await.unwrap().iter().any(|r| r.id == request.id));
    // Never as itself.
    let err = slack_bot.decide(request.id, true, None).await.unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(err.to_string().contains("decides only on behalf of a person"), "{err}");
    let console_bot = ApiClient::new(base, Some(BOT_TOKEN)).via("console");
    let alice = ApiClient::new(base, Some(ALICE));
    let refusals = [
        // Only for the people the gateway lists for it, with its groups.
        (
            &slack_bot,
            true,
            "mallory@example.com",
            "may not decide on behalf of \"mallory@example.com\"",
        ),
        (
            &slack_bot,
            true,
            "erin@example.com",
            "decided by members of leads; erin@example.com is not one",
        ),
        // bob, named in another case, is still bob: not his own request.
        (&slack_bot, false, " BOB", "cannot decide it"),
        // Only through its channels.
        (
            &console_bot,
            true,
            "carol@example.com",
            "decides through slack and discord, not \"console\"",
        ),
        // People decide as themselves.
        (&alice, true, "carol@example.com", "alice decides as itself"),
        // This rule is approved only in the console: a chat approval is
        // refused (a chat denial counts, below).
        (
            &slack_bot,
            true,
            "carol@example.com",
            "may be approved only through console, not slack",
        ),
    ];
    for (client, approve, person, expected) in refusals {
        let err = client
            .decide_on_behalf(request.id, approve, None, person, "U0X")
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(403), "{person}: {err}");
        assert!(err.to_string().contains(expected), "{person}: {err}");
    }
    let denied = slack_bot
        .decide_on_behalf(request.id, false, Some("not from chat"), "carol@example.com", "U0C")
        .await
        .unwrap();
    assert_eq!(denied.state, RequestState::Denied);
    assert!(harness::stderr(&psql.await.unwrap()).contains("not from chat"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_socket_mode_needs_no_public_endpoint() {
    let gw = gateway("bot_slack_socket").await;
    let slack = FakeChat::slack().await;
    let config = bot_config_with(
        &gw,
        Some(&slack),
        None,
        &state_file("bot_slack_socket"),
        "mode = \"socket\"\napp_token_env = \"SLACK_APP_TOKEN\"\n",
    );
    let bot = start_bot(config).await;
    slack.wait_for("socket.connected", "").await;

    let psql = bob_runs(&gw, "DELETE FROM orders WHERE id = 3");
    let request = pending(&gw, "orders-need-a-lead").await;
    slack
        .wait_for("chat.postMessage", &format!("\"value\":\"{}\"", request.id))
        .await;
    // Slack rotates connections: the bot opens a new one.
    slack.to_socket(json!({"type": "disconnect", "reason": "refresh_requested"}));
    harness::eventually("a second Socket Mode connection", || {
        std::future::ready(slack.calls("socket.connected").len() >= 2)
    })
    .await;
    slack.to_socket(json!({
        "envelope_id": "env-1", "type": "interactive", "accepts_response_payload": false,
        "payload": slack_click(&slack, CAROL, "sluice_approve", request.id)
    }));
    slack.wait_for("socket", "env-1").await;
    assert_eq!(harness::stdout_ok(&psql.await.unwrap()), "DELETE 1\n");
    slack.wait_for("chat.update", "Approved by carol@example.com").await;

    // A modal submission whose decision the gateway refuses is answered in
    // the acknowledgement, so the form shows why.
    let psql = bob_runs(&gw, "DELETE FROM orders WHERE id = 4");
    let second = pending(&gw, "orders-need-a-lead").await;
    slack
        .wait_for("chat.postMessage", &format!("\"value\":\"{}\"", second.id))
        .await;
    slack.to_socket(json!({
        "envelope_id": "env-2", "type": "interactive",
        "payload": {
            "type": "view_submission", "user": {"id": BOB_IN_SLACK},
            "view": {"callback_id": "sluice_deny_reason", "private_metadata": format!("{}:{}", second.id, slack.ts_of(second.id)),
                     "state": {"values": {"reason": {"reason": {"value": "mine"}}}}}
        }
    }));
    let ack = slack.wait_for("socket", "env-2").await;
    assert_eq!(ack["payload"]["response_action"], "errors");
    assert!(
        ack["payload"]["errors"]["reason"]
            .as_str()
            .unwrap()
            .contains("cannot decide it"),
        "{ack}"
    );
    assert_eq!(
        viewer(&gw).approval(second.id).await.unwrap().state,
        RequestState::Pending
    );
    ApiClient::new(gw.api.as_deref().unwrap(), Some(BOT_TOKEN))
        .via("slack")
        .decide_on_behalf(second.id, false, Some("done"), "carol@example.com", CAROL)
        .await
        .unwrap();
    assert!(harness::stderr(&psql.await.unwrap()).contains("done"));
    bot.stop().await;
}

/// An interaction as the gateway dispatches it (a DM-style user, no member).
fn gateway_interaction(kind: u64, n: u64, user: &str, message: &str, data: Value) -> Value {
    json!({
        "id": (1000 + n).to_string(), "application_id": "2", "type": kind, "data": data,
        "channel_id": CHANNEL.to_string(),
        "user": {"id": user, "username": "carol", "discriminator": "0", "avatar": null},
        "token": format!("token-{n}"), "version": 1,
        "message": message_json(message, &json!("")),
        "locale": "en-US", "entitlements": [], "attachment_size_limit": 8388608,
        "authorizing_integration_owners": {}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_gateway_mode_needs_no_public_endpoint() {
    let gw = gateway("bot_discord_gateway").await;
    let discord = FakeChat::discord().await;
    let bot = start_bot(gateway_bot_config(&gw, &discord, &state_file("bot_discord_gateway"))).await;
    // Connected with no intents: interactions come without any.
    let intents = discord.wait_for("gateway.identify", "").await;
    assert_eq!(intents, json!(0));

    let psql = bob_runs(&gw, "DELETE FROM orders WHERE id = 1");
    let request = pending(&gw, "orders-need-a-lead").await;
    let approve = format!("sluice:approve:{}", request.id);
    discord
        .wait_for(&format!("POST /api/v10/channels/{CHANNEL}/messages"), &approve)
        .await;
    discord.to_socket(gateway_interaction(
        3,
        1,
        CAROL_ON_DISCORD,
        &discord.message_of(request.id),
        json!({"custom_id": approve, "component_type": 2}),
    ));
    let answer = discord
        .wait_for("POST /api/v10/interactions/1001/token-1/callback", "")
        .await;
    assert_eq!(answer, json!({"type": 6}));
    assert_eq!(harness::stdout_ok(&psql.await.unwrap()), "DELETE 1\n");
    discord
        .wait_for("PATCH /api/v10/channels/777/messages/", "Approved by carol@example.com")
        .await;

    // Deny through the form, and a stranger's click explained privately.
    let psql = bob_runs(&gw, "DELETE FROM orders WHERE id = 2");
    let second = pending(&gw, "orders-need-a-lead").await;
    discord
        .wait_for(
            &format!("POST /api/v10/channels/{CHANNEL}/messages"),
            &format!("sluice:deny:{}", second.id),
        )
        .await;
    let deny = json!({"custom_id": format!("sluice:deny:{}", second.id), "component_type": 2});
    let second_message = discord.message_of(second.id);
    discord.to_socket(gateway_interaction(
        3,
        2,
        STRANGER_ON_DISCORD,
        &second_message,
        deny.clone(),
    ));
    let told = discord
        .wait_for("POST /api/v10/interactions/1002/token-2/callback", "")
        .await;
    assert_eq!(
        (told["type"].clone(), told["data"]["flags"].clone()),
        (json!(4), json!(64))
    );
    discord.to_socket(gateway_interaction(3, 3, CAROL_ON_DISCORD, &second_message, deny));
    let modal = discord
        .wait_for("POST /api/v10/interactions/1003/token-3/callback", "")
        .await;
    assert_eq!(modal["type"], 9);
    let submit = json!({
        "custom_id": modal["data"]["custom_id"],
        "components": [{"type": 1, "components": [{"type": 4, "custom_id": "reason", "value": "not today"}]}]
    });
    discord.to_socket(gateway_interaction(5, 4, CAROL_ON_DISCORD, &second_message, submit));
    discord
        .wait_for("POST /api/v10/interactions/1004/token-4/callback", "")
        .await;
    assert!(harness::stderr(&psql.await.unwrap()).contains("not today"));
    discord
        .wait_for(
            "PATCH /api/v10/channels/777/messages/",
            "Denied by carol@example.com: not today",
        )
        .await;
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_platforms_a_reused_id_and_a_failing_platform() {
    let gw = gateway("bot_both").await;
    let slack = FakeChat::slack().await;
    let discord = FakeChat::discord().await;
    let state = state_file("bot_both");
    // The bot's state remembers a request 1 from another trail (the gateway
    // numbers requests again after its trail was replaced).
    let old = json!({"cursor": null, "requests": {"1": {
        "created": "2020-01-01T00:00:00Z",
        "slack": {"at": {"channel": "C0APPROVALS", "ts": "1500000000.000001"}},
        "done": false
    }}});
    std::fs::write(&state, old.to_string()).unwrap();
    let bot = start_bot(bot_config(&gw, Some(&slack), Some(&discord), &state)).await;

    let psql = bob_runs(&gw, "DELETE FROM orders WHERE id = 1");
    let request = pending(&gw, "orders-need-a-lead").await;
    assert_eq!(request.id, 1);
    // The old message is retired, the new request gets messages of its own.
    let retired = slack.wait_for("chat.update", "1500000000.000001").await;
    assert!(retired.to_string().contains("No longer pending"), "{retired}");
    slack.wait_for("chat.postMessage", "\"value\":\"1\"").await;
    discord
        .wait_for(
            &format!("POST /api/v10/channels/{CHANNEL}/messages"),
            "sluice:approve:1\"",
        )
        .await;
    // A click on the old message decides nothing.
    let old_click = slack_click_on("1500000000.000001", CAROL, "sluice_approve", 1);
    slack_interaction(bot.addr, old_click, SIGNING_SECRET).await;
    slack
        .wait_for("chat.postEphemeral", "not the message the bot keeps")
        .await;
    assert_eq!(viewer(&gw).approval(1).await.unwrap().state, RequestState::Pending);

    // Discord cannot take edits now: Slack's message still follows, and
    // nothing is posted twice.
    discord
        .state
        .fail_edits
        .store(true, std::sync::atomic::Ordering::Relaxed);
    slack_interaction(
        bot.addr,
        slack_click(&slack, CAROL, "sluice_approve", 1),
        SIGNING_SECRET,
    )
    .await;
    assert_eq!(harness::stdout_ok(&psql.await.unwrap()), "DELETE 1\n");
    slack.wait_for("chat.update", "Approved by carol@example.com").await;
    discord
        .wait_for("PATCH /api/v10/channels/777/messages/", "Approved by carol@example.com")
        .await;
    assert_eq!(slack.calls("chat.postMessage").len(), 1);
    assert_eq!(
        discord
            .calls(&format!("POST /api/v10/channels/{CHANNEL}/messages"))
            .len(),
        1
    );
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_self_approval_expiry_and_a_restarted_bot() {
    let gw = gateway("bot_discord_more").await;
    let discord = FakeChat::discord().await;
    let state = state_file("bot_discord_more");
    let bot = start_bot(bot_config(&gw, None, Some(&discord), &state)).await;
    let posts = format!("POST /api/v10/channels/{CHANNEL}/messages");

    // Expired before anyone clicked: the message says so, and a late click
    // is told why nothing happened.
    let urgent = bob_runs(&gw, "DELETE FROM urgent");
    let short = pending(&gw, "urgent-or-never").await;
    let approve_short = format!("sluice:approve:{}", short.id);
    discord.wait_for(&posts, &approve_short).await;
    assert!(harness::stderr(&urgent.await.unwrap()).contains("expired"));
    discord
        .wait_for("PATCH /api/v10/channels/777/messages/", "Expired")
        .await;
    let late = discord_click(CAROL_ON_DISCORD, &approve_short, &discord.message_of(short.id));
    let answer: Value = discord_interaction(bot.addr, &late, &discord_key())
        .await
        .json()
        .await
        .unwrap();
    assert!(
        answer["data"]["content"].as_str().unwrap().contains("it was expired"),
        "{answer}"
    );

    // bob cannot approve his own request from Discord either.
    let psql = bob_runs(&gw, "DELETE FROM orders WHERE id = 5");
    let request = pending(&gw, "orders-need-a-lead").await;
    let approve = format!("sluice:approve:{}", request.id);
    discord.wait_for(&posts, &approve).await;
    let own = discord_click(BOB_ON_DISCORD, &approve, &discord.message_of(request.id));
    let answer: Value = discord_interaction(bot.addr, &own, &discord_key())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["data"]["flags"], 64);
    assert!(
        answer["data"]["content"].as_str().unwrap().contains("cannot decide it"),
        "{answer}"
    );

    // The bot restarts while the request is pending: no second message,
    // and the first one follows the decision.
    bot.stop().await;
    let bot = start_bot(bot_config(&gw, None, Some(&discord), &state)).await;
    let click = discord_click(CAROL_ON_DISCORD, &approve, &discord.message_of(request.id));
    let answer: Value = discord_interaction(bot.addr, &click, &discord_key())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer, json!({"type": 6}));
    assert_eq!(harness::stdout_ok(&psql.await.unwrap()), "DELETE 1\n");
    let edited = format!(
        "PATCH /api/v10/channels/777/messages/{}",
        discord.message_of(request.id)
    );
    discord.wait_for(&edited, "Approved by carol@example.com").await;
    let posted = discord
        .calls(&posts)
        .iter()
        .filter(|p| p.to_string().contains(&format!("{approve}\"")))
        .count();
    assert_eq!(posted, 1, "the restarted bot posted the request again");
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_signs_in_with_client_credentials() {
    // The bot is no service token here: it is the provider's client
    // sluice-ci, a client-credentials service named approval-bot.
    let idp = crate::harness::provider::Provider::start("bot", 3600).await;
    let oidc = format!(
        "[identity.oidc]\nissuer = \"{}\"\naudience = \"sluice-cli\"\nmin_refresh_interval = \"0s\"\n\
         service_audience = \"urn:sluice\"\n\n[[identity.oidc.services]]\nclient_id = \"sluice-ci\"\n\
         name = \"approval-bot\"\ngroups = [\"bots\"]\n",
        idp.issuer
    );
    let gw = gateway_with("bot_client_credentials", "", Some(oidc)).await;
    let slack = FakeChat::slack().await;
    let state = state_file("bot_client_credentials");
    let auth = format!(
        "\n[gateway.client_credentials]\nissuer = \"{}\"\nclient_id = \"sluice-ci\"\n\
         secret_env = \"BOT_CLIENT_SECRET\"\nresource = \"urn:sluice\"\n",
        idp.issuer
    );
    // The [slack] table follows the [gateway.client_credentials] one.
    let text = bot_config_text(&gw, Some(&slack), None, &state, "", &auth);
    let config = BotConfig::parse(&text, Path::new("/tmp/bot.toml"), &bot_env).unwrap();
    let bot = start_bot(config).await;

    let psql = bob_runs(&gw, "DELETE FROM orders WHERE id <= 2");
    let request = pending(&gw, "orders-need-a-lead").await;
    // Reading the approvals needs the bot's token: the post shows it works.
    slack
        .wait_for("chat.postMessage", &format!("\"value\":\"{}\"", request.id))
        .await;
    slack_interaction(
        bot.addr,
        slack_click(&slack, CAROL, "sluice_approve", request.id),
        SIGNING_SECRET,
    )
    .await;
    let out = psql.await.unwrap();
    assert_eq!(harness::stdout_ok(&out), "DELETE 2\n");
    let view = viewer(&gw).approval(request.id).await.unwrap();
    assert_eq!(view.approvals[0].by, "carol@example.com");
    assert_eq!(view.approvals[0].via, "slack");
    bot.stop().await;

    // A wrong secret stops the bot at start, saying why.
    let wrong = text.replace("BOT_CLIENT_SECRET", "SLACK_TOKEN");
    let config = BotConfig::parse(&wrong, Path::new("/tmp/bot.toml"), &bot_env).unwrap();
    let err = Bot::bind(config)
        .await
        .err()
        .expect("a wrong secret should stop the bot");
    let said = format!("{err:#}");
    assert!(said.contains("as sluice-ci (client credentials)"), "{said}");
}
