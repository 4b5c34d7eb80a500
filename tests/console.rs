//! The console against a real gateway: key sequences become the right
//! commands, and those commands, carried out by the console's own runner,
//! do what the operator meant (approve, deny, end a session, run SQL under
//! their own identity). One test drives the real `sluice console` binary in
//! a terminal (tmux) while psql waits for the approval.

use std::time::Duration;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use sluice_console::action::{Action, Command, QueryOutcome};
use sluice_console::app::{App, Level, Overlay, Tab, update};
use sluice_console::effects::{Postgres, Runner};
use sluice_console::theme::Theme;
use sluice_core::api::client::{ApiClient, SharedToken};
use sluice_core::approvals::RequestState;
use sluice_core::audit::{Detail, EventFilter, SqliteStore};
use tokio::sync::mpsc;

use crate::harness::{self, ALICE, BOB, Spec, TestGateway};

const POLICY: &str = r#"[policy]
default = "allow"

[[policy.rules]]
name = "orders-need-a-second-pair-of-eyes"
decision = "require_approval"
groups = ["oncall"]
kinds = ["write"]
relations = ["orders"]
approvers = ["engineering"]
reason = "orders change only with a second pair of eyes"

[[policy.rules]]
name = "ledger-is-read-only"
decision = "deny"
kinds = ["write"]
relations = ["ledger"]
reason = "the ledger is read-only"
"#;

const API: &str = "[api]\nlisten = \"127.0.0.1:0\"\nviewer_groups = [\"oncall\"]\n\
                   approver_groups = [\"engineering\"]\nadmin_groups = [\"oncall\"]\n";

async fn start(test: &str) -> TestGateway {
    let spec = Spec {
        policy: Some(POLICY.into()),
        extra: API.into(),
        ..Spec::default()
    };
    let gw = TestGateway::start(test, spec).await;
    harness::setup(
        &gw.db,
        "CREATE TABLE orders (id int); INSERT INTO orders SELECT generate_series(1, 5); \
         CREATE TABLE ledger (id int); INSERT INTO ledger VALUES (1)",
    )
    .await;
    gw
}

/// A console as the operator with `token` would have it, minus the
/// terminal: its state, and its runner talking to the real gateway.
struct Console {
    app: App,
    runner: Runner,
    rx: mpsc::Receiver<Action>,
    /// Query answers applied but not yet looked at by the test.
    answers: std::collections::VecDeque<Action>,
}

impl Console {
    fn new(gw: &TestGateway, token: &str) -> Console {
        Console::with_tls(gw, token, "127.0.0.1", None)
    }

    fn with_tls(gw: &TestGateway, token: &str, host: &str, tls: Option<rustls::ClientConfig>) -> Console {
        let api = gw.api.clone().unwrap();
        let (tx, rx) = mpsc::channel(4096);
        let runner = Runner::new(
            ApiClient::new(&api, Some(token)).via("console"),
            Postgres {
                host: host.into(),
                port: gw.addr.port(),
                user: "operator".into(),
                token: SharedToken::new(token),
                tls: tls.map(std::sync::Arc::new),
            },
            tx,
            None,
            std::env::temp_dir(),
        );
        let app = App::new(
            &api,
            &gw.db,
            chrono::Utc::now(),
            chrono::FixedOffset::east_opt(0).unwrap(),
            Theme { color: false },
        );
        Console {
            app,
            runner,
            rx,
            answers: Default::default(),
        }
    }

    /// Applies `action`, carries out the commands it gives (queries in the
    /// background: they may wait for an approval) and everything that
    /// follows from their answers; returns the commands `action` gave.
    async fn act(&mut self, action: Action) -> Vec<Command> {
        let first = update(&mut self.app, action);
        let mut todo = first.clone();
        loop {
            for command in todo.drain(..) {
                if matches!(command, Command::RunQuery { .. }) {
                    self.app.shell.started(self.app.now);
                    let runner = self.runner.clone();
                    tokio::spawn(async move { runner.execute(command).await });
                } else {
                    self.runner.execute(command).await;
                }
            }
            let Ok(answer) = self.rx.try_recv() else { break };
            if matches!(answer, Action::QueryNotice(_) | Action::QueryDone(_)) {
                self.answers.push_back(answer.clone());
            }
            todo = update(&mut self.app, answer);
        }
        first
    }

    async fn key(&mut self, code: KeyCode) -> Vec<Command> {
        self.act(Action::Key(KeyEvent::new(code, KeyModifiers::NONE))).await
    }

    async fn typed(&mut self, text: &str) {
        for c in text.chars() {
            self.key(KeyCode::Char(c)).await;
        }
    }

    /// Fetches sessions and approvals, as the console's poll does.
    async fn refresh(&mut self) {
        self.runner.refresh().await;
        self.act(Action::Tick(chrono::Utc::now())).await;
    }

    /// Waits for the next answer from the runner (a query's) and applies it.
    async fn next_answer(&mut self) -> Action {
        loop {
            if let Some(answer) = self.answers.pop_front() {
                return answer;
            }
            let action = tokio::time::timeout(harness::PATIENCE, self.rx.recv())
                .await
                .expect("an answer in time")
                .expect("the runner is alive");
            if matches!(action, Action::QueryNotice(_) | Action::QueryDone(_)) {
                self.answers.push_back(action.clone());
            }
            self.act(action).await;
        }
    }

    /// Runs `sql` in the shell, presses ctrl-c while it runs, and returns
    /// the error it ended with.
    async fn run_and_cancel(&mut self, sql: &str) -> sluice_console::action::QueryError {
        self.typed(sql).await;
        self.key(KeyCode::Enter).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cancel = self
            .act(Action::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)))
            .await;
        assert_eq!(cancel, [Command::CancelQuery]);
        match self.next_answer().await {
            Action::QueryDone(Err(error)) => error,
            other => panic!("{sql} did not end cancelled: {other:?}"),
        }
    }

    fn status(&self) -> String {
        self.app.status.as_ref().map(|s| s.text.clone()).unwrap_or_default()
    }
}

/// Waits until the operator's console shows a pending request; its id.
async fn pending(console: &mut Console) -> u64 {
    for _ in 0..500 {
        console.refresh().await;
        if let Some(request) = console.app.approvals.pending().next() {
            return request.id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no request became pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approving_in_the_console_lets_the_held_statement_run() {
    let mut gw = start("console_approve").await;
    let conn = gw.conn_str("bob", BOB, "");
    let psql =
        tokio::spawn(async move { harness::psql(&conn, &["-c", "DELETE FROM orders WHERE id <= 2"], None).await });

    let mut alice = Console::new(&gw, ALICE);
    let id = pending(&mut alice).await;
    alice.key(KeyCode::Char('3')).await;
    assert_eq!(alice.app.tab, Tab::Approvals);
    let commands = alice.key(KeyCode::Char('a')).await;
    assert_eq!(
        commands,
        vec![Command::Decide {
            id,
            approve: true,
            reason: None
        }]
    );
    assert_eq!(alice.status(), format!("request {id} approved"));
    assert_eq!(alice.app.approvals.list[0].state, RequestState::Approved);

    let out = psql.await.unwrap();
    assert_eq!(harness::stdout_ok(&out), "DELETE 2\n");
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 3);
    // A second press has nothing to decide, and says so.
    alice.key(KeyCode::Char('a')).await;
    assert_eq!(alice.status(), format!("request {id} is approved: nothing to decide"));

    // The trail says where the decision was made.
    gw.shutdown.cancel();
    gw.finished().await;
    let store = SqliteStore::open_read_only(&gw.audit.path).unwrap();
    let via: Vec<String> = store
        .events(&EventFilter::default())
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event.detail {
            Detail::ApprovalDecided { via, by, .. } => Some(format!("{by} via {via}")),
            _ => None,
        })
        .collect();
    assert_eq!(via, ["alice via console"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_self_approval_and_a_denial_carries_its_reason() {
    let gw = start("console_deny").await;
    let held = {
        let bob = gw.connect(BOB).await.unwrap();
        tokio::spawn(async move { bob.simple_query("DELETE FROM orders").await })
    };
    // bob may view (oncall) but not approve, least of all his own request.
    let mut bob = Console::new(&gw, BOB);
    let id = pending(&mut bob).await;
    bob.key(KeyCode::Char('3')).await;
    bob.key(KeyCode::Char('a')).await;
    let status = bob.app.status.clone().unwrap();
    assert_eq!(status.level, Level::Error);
    assert!(status.text.starts_with(&format!("request {id}: ")), "{}", status.text);
    assert!(status.text.contains("(HTTP 403)"), "{}", status.text);
    assert_eq!(bob.app.approvals.list[0].state, RequestState::Pending);

    // A reason that would reach bob's terminal with escape sequences in it
    // is refused by the gateway, and nothing is decided.
    let err = ApiClient::new(gw.api.as_deref().unwrap(), Some(ALICE))
        .decide(id, false, Some("no\x1b[2J\u{202e}"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("invisible character (U+001B)"), "{err}");

    let mut alice = Console::new(&gw, ALICE);
    pending(&mut alice).await;
    alice.key(KeyCode::Char('3')).await;
    alice.key(KeyCode::Char('d')).await;
    assert!(matches!(alice.app.overlay, Some(Overlay::Prompt(_))));
    // Pasted into the prompt, such characters are dropped.
    alice.act(Action::Paste("not\x1b[31m\u{202e}".into())).await;
    let Some(Overlay::Prompt(prompt)) = &alice.app.overlay else {
        panic!("the prompt closed");
    };
    assert_eq!(prompt.input, "not[31m");
    alice
        .act(Action::Key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL)))
        .await;
    alice.typed("not during the sale").await;
    let commands = alice.key(KeyCode::Enter).await;
    assert_eq!(
        commands,
        vec![Command::Decide {
            id,
            approve: false,
            reason: Some("not during the sale".into())
        }]
    );
    assert_eq!(alice.status(), format!("request {id} denied"));
    let err = held.await.unwrap().unwrap_err();
    assert_eq!(
        err.as_db_error().unwrap().message(),
        format!("statement refused: approval request {id} was denied by alice: not during the sale")
    );
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_session_asks_first_then_disconnects_it() {
    let gw = start("console_kill").await;
    let victim = gw.connect(ALICE).await.unwrap();
    victim.simple_query("SELECT 1").await.unwrap();

    let mut bob = Console::new(&gw, BOB);
    bob.refresh().await;
    assert_eq!(bob.app.live.sessions.len(), 1);
    assert_eq!(bob.app.live.sessions[0].identity, "alice");
    // k asks; n leaves it be.
    assert!(bob.key(KeyCode::Char('k')).await.is_empty());
    assert!(matches!(bob.app.overlay, Some(Overlay::Confirm { .. })));
    bob.key(KeyCode::Char('n')).await;
    assert!(victim.simple_query("SELECT 1").await.is_ok());
    // y ends it.
    bob.key(KeyCode::Char('k')).await;
    let commands = bob.key(KeyCode::Char('y')).await;
    assert!(matches!(&commands[..], [Command::Kill { .. }]), "{commands:?}");
    assert!(bob.status().contains("ended"), "{}", bob.status());
    harness::eventually("the session ends", || async {
        victim.simple_query("SELECT 1").await.is_err()
    })
    .await;

    // alice is no admin: the gateway says no, and the console shows it.
    let other = gw.connect(BOB).await.unwrap();
    other.simple_query("SELECT 1").await.unwrap();
    let mut alice = Console::new(&gw, ALICE);
    alice.refresh().await;
    alice.key(KeyCode::Char('k')).await;
    alice.key(KeyCode::Char('y')).await;
    let status = alice.app.status.clone().unwrap();
    assert_eq!(status.level, Level::Error, "{}", status.text);
    assert!(status.text.contains("HTTP 403"), "{}", status.text);
    assert!(other.simple_query("SELECT 1").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_runs_under_the_operators_identity_and_policy() {
    let gw = start("console_shell").await;
    let mut bob = Console::new(&gw, BOB);
    bob.key(KeyCode::Char('4')).await;

    // A read: rows, NULL kept distinct.
    bob.typed("SELECT id, NULL::text AS nothing FROM orders ORDER BY id LIMIT 2;")
        .await;
    let commands = bob.key(KeyCode::Enter).await;
    assert!(
        matches!(&commands[0], Command::RunQuery { target, .. } if *target == gw.db),
        "{commands:?}"
    );
    let Action::QueryDone(Ok(QueryOutcome { columns, rows, .. })) = bob.next_answer().await else {
        panic!("the read failed: {:?}", bob.app.shell.messages);
    };
    assert_eq!(columns, ["id", "nothing"]);
    assert_eq!(
        rows,
        vec![vec![Some("1".to_string()), None], vec![Some("2".to_string()), None]]
    );

    // Refused by policy: the refusal, inline.
    bob.typed("DELETE FROM ledger;").await;
    bob.key(KeyCode::Enter).await;
    let Action::QueryDone(Err(error)) = bob.next_answer().await else {
        panic!("the ledger write was not refused");
    };
    assert_eq!(error.code.as_deref(), Some("42501"));
    assert!(
        bob.app.shell.messages[0].1.contains("the ledger is read-only"),
        "{:?}",
        bob.app.shell.messages
    );

    // Held for bob like for anyone: the notice first, the result once
    // approved.
    bob.typed("DELETE FROM orders WHERE id = 5;").await;
    bob.key(KeyCode::Enter).await;
    let Action::QueryNotice(notice) = bob.next_answer().await else {
        panic!("no notice");
    };
    assert!(notice.starts_with("NOTICE: held for approval: request"), "{notice}");
    assert!(bob.app.shell.running.is_some());
    let id = bob.app.approvals.pending().next().map(|r| r.id);
    let id = match id {
        Some(id) => id,
        None => pending(&mut bob).await,
    };
    ApiClient::new(gw.api.as_deref().unwrap(), Some(ALICE))
        .decide(id, true, None)
        .await
        .unwrap();
    let Action::QueryDone(Ok(done)) = bob.next_answer().await else {
        panic!("the approved delete failed: {:?}", bob.app.shell.messages);
    };
    assert_eq!(done.tags, ["1 row"]);
    assert!(bob.app.shell.running.is_none());
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 4);

    // A long query is cancelled with ctrl-c.
    let error = bob.run_and_cancel("SELECT pg_sleep(30);").await;
    assert_eq!(error.code.as_deref(), Some("57014"), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_verifies_the_gateways_certificate() {
    let gw = start("console_tls").await;
    let ca = harness::cluster().ca_path.clone();
    let trusted = sluice_core::tls::client_config(Some(&ca)).unwrap();
    let mut bob = Console::with_tls(&gw, BOB, "localhost", Some(trusted));
    bob.key(KeyCode::Char('4')).await;
    bob.typed("SELECT 'over TLS' AS how;").await;
    bob.key(KeyCode::Enter).await;
    let Action::QueryDone(Ok(outcome)) = bob.next_answer().await else {
        panic!("the query over TLS failed: {:?}", bob.app.shell.messages);
    };
    assert_eq!(outcome.rows, [[Some("over TLS".to_string())]]);

    // The system's roots do not know the test CA: no connection, and a
    // message that says why.
    let untrusted = sluice_core::tls::client_config(None).unwrap();
    let mut bob = Console::with_tls(&gw, BOB, "localhost", Some(untrusted));
    bob.key(KeyCode::Char('4')).await;
    bob.typed("SELECT 1;").await;
    bob.key(KeyCode::Enter).await;
    let Action::QueryDone(Err(error)) = bob.next_answer().await else {
        panic!("connected to a gateway whose certificate it cannot verify");
    };
    assert!(error.message.contains("certificate"), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_never_answers_does_not_wedge_the_shell() {
    let gw = start("console_silent").await;
    // Accepts connections and says nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let mut bob = Console::new(&gw, BOB);
    bob.runner = Runner::new(
        ApiClient::new(gw.api.as_deref().unwrap(), Some(BOB)),
        Postgres {
            host: "127.0.0.1".into(),
            port,
            user: "operator".into(),
            token: SharedToken::new(BOB),
            tls: None,
        },
        {
            let (tx, rx) = mpsc::channel(4096);
            bob.rx = rx;
            tx
        },
        None,
        std::env::temp_dir(),
    );
    bob.key(KeyCode::Char('4')).await;
    let error = bob.run_and_cancel("SELECT 1;").await;
    assert_eq!(error.message, "cancelled while connecting to the gateway");
    assert!(bob.app.shell.running.is_none());
    keep.abort();
}

/// A TCP forwarder on a fixed local port whose destination can change: the
/// console's API address stays the same while the gateway behind it
/// restarts (on another port, as test gateways bind port 0).
struct Forwarder {
    url: String,
    to: std::sync::Arc<std::sync::Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(to: &str) -> Forwarder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let to = std::sync::Arc::new(std::sync::Mutex::new(to.trim_start_matches("http://").to_string()));
        let target = to.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let address = target.lock().unwrap().clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(address).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Forwarder { url, to, task }
    }

    fn point_to(&self, to: &str) {
        *self.to.lock().unwrap() = to.trim_start_matches("http://").to_string();
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Feeds the console's actions from the stream until `done` says so.
async fn follow_until(
    console: &mut Console,
    rx: &mut mpsc::Receiver<Action>,
    seen: &mut Vec<(u64, &'static str)>,
    links: &mut Vec<sluice_console::action::Link>,
    mut done: impl FnMut(&Console) -> bool,
) {
    while !done(console) {
        let action = tokio::time::timeout(harness::PATIENCE, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("the stream did not move: {seen:?} {links:?}"))
            .expect("the stream task is alive");
        match &action {
            Action::Event(event) => seen.push((event.id, event.event.detail.kind())),
            Action::Link(link) => links.push(link.clone()),
            _ => {}
        }
        console.act(action).await;
    }
}

fn shows(console: &Console, sql: &str) -> bool {
    console
        .app
        .activity
        .visible()
        .any(|item| matches!(&item.event.event.detail, Detail::Statement { text, .. } if text == sql))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_resumes_after_a_gateway_restart_missing_nothing() {
    let db = harness::database("console_stream").await;
    let trail = harness::cluster().dev.dir().join(format!("audit-{db}-restart.db"));
    let spec = || Spec {
        policy: Some(POLICY.into()),
        extra: format!("{API}\n[audit]\npath = \"{}\"\nsync = \"normal\"\n", trail.display()),
        ..Spec::default()
    };
    let mut first = TestGateway::start_for(db.clone(), spec()).await;
    let forwarder = Forwarder::start(first.api.as_deref().unwrap()).await;
    let (tx, mut rx) = mpsc::channel(4096);
    let follow = tokio::spawn(sluice_console::follow_events(
        ApiClient::new(&forwarder.url, Some(BOB)),
        tx,
    ));
    let mut console = Console::new(&first, BOB);
    let (mut seen, mut links) = (Vec::new(), Vec::new());

    let alice = first.connect(ALICE).await.unwrap();
    alice.simple_query("SELECT 1001").await.unwrap();
    follow_until(&mut console, &mut rx, &mut seen, &mut links, |c| {
        shows(c, "SELECT 1001")
    })
    .await;
    drop(alice);

    // The gateway goes away: the console says it is reconnecting.
    first.shutdown.cancel();
    first.finished().await;
    follow_until(&mut console, &mut rx, &mut seen, &mut links, |c| {
        matches!(c.app.link, sluice_console::action::Link::Reconnecting { .. })
    })
    .await;

    // The trail has one writer: the next gateway starts once the first
    // has let it go.
    harness::eventually("the first gateway releases the trail", || async {
        SqliteStore::open(&trail, sluice_core::audit::SyncMode::Normal).is_ok()
    })
    .await;
    // It comes back (same trail); what happens there, including what
    // happened before the console got through again, arrives once.
    let second = TestGateway::start_for(db.clone(), spec()).await;
    let alice = second.connect(ALICE).await.unwrap();
    alice.simple_query("SELECT 1002").await.unwrap();
    forwarder.point_to(second.api.as_deref().unwrap());
    alice.simple_query("SELECT 1003").await.unwrap();
    follow_until(&mut console, &mut rx, &mut seen, &mut links, |c| {
        shows(c, "SELECT 1003") && c.app.link == sluice_console::action::Link::Connected
    })
    .await;

    // A statement kept with its completion is two events with one id.
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "in order: {seen:?}");
    let store = SqliteStore::open_read_only(&trail).unwrap();
    let trail_events: Vec<(u64, &'static str)> = store
        .events(&EventFilter::default())
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.event.detail.kind()))
        .collect();
    assert_eq!(
        seen,
        trail_events[..seen.len().min(trail_events.len())],
        "every event of the trail up to the last seen, once"
    );
    assert!(shows(&console, "SELECT 1002"));
    assert!(
        links
            .iter()
            .any(|l| matches!(l, sluice_console::action::Link::Reconnecting { .. }))
    );

    // A gateway with a new, empty trail takes over the address: the old
    // cursor is past its end. The console starts again from its newest
    // events instead of waiting forever for ids it will not see.
    drop(alice);
    drop(second);
    let fresh = harness::cluster().dev.dir().join(format!("audit-{db}-fresh.db"));
    let third = TestGateway::start_for(
        db.clone(),
        Spec {
            policy: Some(POLICY.into()),
            extra: format!("{API}\n[audit]\npath = \"{}\"\nsync = \"normal\"\n", fresh.display()),
            ..Spec::default()
        },
    )
    .await;
    forwarder.point_to(third.api.as_deref().unwrap());
    let alice = third.connect(ALICE).await.unwrap();
    alice.simple_query("SELECT 1004").await.unwrap();
    follow_until(&mut console, &mut rx, &mut seen, &mut links, |c| {
        shows(c, "SELECT 1004")
    })
    .await;
    assert_eq!(console.app.link, sluice_console::action::Link::Connected);
    follow.abort();
}

/// tmux on its own socket, for one test.
pub(crate) struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    /// A tmux server of its own in `dir`, running `command` in a 110x30
    /// session named "console".
    pub(crate) fn start(dir: &std::path::Path, command: &str) -> Tmux {
        std::fs::create_dir_all(dir).unwrap();
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let started = tmux.run(&["new-session", "-d", "-s", "console", "-x", "110", "-y", "30", command]);
        assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
        tmux
    }

    pub(crate) fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux (installed by .ci/run)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "console"]).stdout).into_owned()
    }

    pub(crate) async fn shows(&self, what: &str) -> String {
        let deadline = tokio::time::Instant::now() + harness::PATIENCE;
        loop {
            let screen = self.screen();
            if screen.contains(what) {
                return screen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the console never showed {what:?}; it shows:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn keys(&self, keys: &str) {
        assert!(self.run(&["send-keys", "-t", "console", "-l", keys]).status.success());
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_binary_in_a_terminal_approves_a_held_delete() {
    let gw = start("console_terminal").await;
    let dir = harness::cluster().dev.dir().join(format!("terminal-{}", gw.db));
    let command = format!(
        "env XDG_STATE_HOME={} NO_COLOR=1 {} console --api {} --token {ALICE} --pg 127.0.0.1:{} --target {}",
        dir.display(),
        env!("CARGO_BIN_EXE_sluice"),
        gw.api.as_deref().unwrap(),
        gw.addr.port(),
        gw.db
    );
    let tmux = Tmux::start(&dir, &command);
    tmux.shows("● http://").await;

    let conn = gw.conn_str("bob", BOB, "");
    let psql =
        tokio::spawn(async move { harness::psql(&conn, &["-c", "DELETE FROM orders WHERE id <= 2"], None).await });
    tmux.shows("3 Approvals (1)").await;
    tmux.keys("3");
    // What only the Approvals view shows (Live lists the statement too,
    // and may still be on screen when the key is read).
    let screen = tmux.shows("pending   bob").await;
    assert!(screen.contains("DELETE FROM orders WHERE id <= 2"), "{screen}");
    assert!(
        screen.contains("rule       orders-need-a-second-pair-of-eyes"),
        "{screen}"
    );
    tmux.keys("a");
    let out = psql.await.unwrap();
    assert_eq!(harness::stdout_ok(&out), "DELETE 2\n");
    // The list row, not the status line ("request 1 approved"), which
    // comes before the list is read again.
    let screen = tmux.shows("approved  bob").await;
    assert!(screen.contains("approved  bob"), "{screen}");
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 3);

    // Logs went to the file, never to the screen; q quits.
    assert!(!screen.contains("INFO") && !screen.contains("WARN"), "{screen}");
    tmux.keys("q");
    harness::eventually("the console exits", || async {
        !tmux.run(&["has-session", "-t", "console"]).status.success()
    })
    .await;
    assert!(dir.join("sluice/console.log").exists());
}
