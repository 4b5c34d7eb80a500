//! Every view drawn at a fixed size from realistic state, compared with the
//! snapshots in `snapshots/`. Review a change with `cargo insta review`
//! (or `INSTA_UPDATE=always cargo test -p sluice-console` and `git diff`).

use chrono::{DateTime, Duration, FixedOffset, Utc};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use sluice_core::approvals::{AccessView, Approval, RequestState, RequestView};
use sluice_core::audit::{ColumnRecord, Detail, Event, SessionSummary, StatementRecord, StoredEvent};
use sluice_core::live::{LiveSummary, SessionState};

use crate::action::{Action, Link, QueryOutcome};
use crate::app::{App, Tab, update};
use crate::theme::Theme;

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-29T14:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn app() -> App {
    let mut app = App::new(
        "http://127.0.0.1:7480",
        "shop",
        now(),
        FixedOffset::east_opt(0).unwrap(),
        Theme { color: false },
    );
    app.link = Link::Connected;
    app
}

fn draw(app: &App, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|frame| crate::ui::render(app, frame)).unwrap();
    terminal.backend().to_string()
}

fn key(app: &mut App, code: KeyCode) {
    update(app, Action::Key(KeyEvent::new(code, KeyModifiers::NONE)));
}

fn typed(app: &mut App, text: &str) {
    for c in text.chars() {
        key(app, KeyCode::Char(c));
    }
}

fn sessions() -> Vec<LiveSummary> {
    let rows = [
        (
            "aaaa",
            "alice",
            "shop",
            "psql",
            1820,
            42,
            SessionState::Running,
            "SELECT name, email FROM customers WHERE id = 7",
        ),
        (
            "bbbb",
            "bob",
            "shop",
            "psql",
            300,
            3,
            SessionState::Held,
            "DELETE FROM orders WHERE status = 'refunded'",
        ),
        (
            "cccc",
            "report-bot",
            "analytics",
            "dbt",
            7300,
            1250,
            SessionState::Idle,
            "SELECT sum(total) FROM orders GROUP BY day",
        ),
        (
            "dddd",
            "carol",
            "shop",
            "sluice console",
            40,
            5,
            SessionState::Idle,
            "SELECT 1",
        ),
    ];
    rows.into_iter()
        .map(
            |(id, identity, target, app, ago, statements, state, last)| LiveSummary {
                id: format!("0193a1b2-{id}"),
                identity: identity.into(),
                target: target.into(),
                application: app.into(),
                client: "127.0.0.1:50000".into(),
                started: now() - Duration::seconds(ago),
                statements,
                refused: u64::from(state == SessionState::Held),
                state,
                last_statement: last.into(),
            },
        )
        .collect()
}

fn event(id: u64, secs_ago: i64, session: &str, identity: &str, detail: Detail) -> StoredEvent {
    StoredEvent {
        id,
        event: Event {
            at: now() - Duration::seconds(secs_ago),
            session: Some(session.into()),
            identity: Some(identity.into()),
            target: Some("shop".into()),
            detail,
        },
    }
}

fn statement(seq: u64, text: &str, decision: &str, rule: Option<&str>, features: &[&str]) -> Detail {
    Detail::Statement {
        seq,
        source: "query".into(),
        text: text.into(),
        decision: decision.into(),
        rule: rule.map(str::to_string),
        refusal: (decision == "deny").then(|| "DROP is not allowed through the gateway".to_string()),
        statements: vec![StatementRecord {
            kind: if text.starts_with("SELECT") {
                "read".into()
            } else {
                "write".into()
            },
            command: text.split(' ').next().unwrap_or("").into(),
            relations: vec!["orders (write)".into()],
            features: features.iter().map(|f| f.to_string()).collect(),
            tags: vec!["finance".into()],
        }],
        done: None,
    }
}

fn done(seq: u64, rows: u64, us: u64) -> Detail {
    Detail::StatementDone {
        seq,
        rows: Some(rows),
        duration_us: us,
        sqlstate: None,
        skipped: false,
        columns: vec![
            ColumnRecord {
                name: "name".into(),
                origin: Some("public.customers.name".into()),
                masking: "clear".into(),
                tags: vec![],
            },
            ColumnRecord {
                name: "email".into(),
                origin: Some("public.customers.email".into()),
                masking: "rule".into(),
                tags: vec!["pii".into()],
            },
        ],
        sample: vec![
            vec![Some("Grace Hopper".into()), Some("g***@example.com".into())],
            vec![Some("Alan Turing".into()), None],
        ],
    }
}

fn feed(app: &mut App) {
    let events = vec![
        event(
            1,
            120,
            "0193a1b2-aaaa",
            "alice",
            statement(1, "SELECT name, email FROM customers LIMIT 2", "allow", None, &[]),
        ),
        event(2, 120, "0193a1b2-aaaa", "alice", done(1, 2, 410)),
        event(
            3,
            90,
            "0193a1b2-bbbb",
            "bob",
            statement(1, "DROP TABLE orders", "deny", Some("no-drops"), &["drop"]),
        ),
        event(
            4,
            60,
            "0193a1b2-bbbb",
            "bob",
            statement(
                2,
                "DELETE FROM orders WHERE status = 'refunded'",
                "require_approval",
                Some("order-changes-need-a-lead"),
                &["no_where"],
            ),
        ),
        event(
            5,
            60,
            "0193a1b2-bbbb",
            "bob",
            Detail::ApprovalRequested {
                request: 7,
                rule: "order-changes-need-a-lead".into(),
                statement: "DELETE FROM orders WHERE status = 'refunded'".into(),
                approvers: vec!["leads".into()],
                needed: 1,
                expires: "2026-11-29T14:09:00Z".into(),
                access: None,
            },
        ),
        event(
            6,
            30,
            "0193a1b2-aaaa",
            "alice",
            statement(
                2,
                "SELECT '\x1b[2J\x1b]0;pwned\x07' AS evil, 'rtl\u{202e}gnp.exe'",
                "allow",
                None,
                &[],
            ),
        ),
        event(7, 30, "0193a1b2-aaaa", "alice", done(2, 1, 1_250_000)),
    ];
    for e in events {
        update(app, Action::Event(Box::new(e)));
    }
}

fn requests() -> Vec<RequestView> {
    let base = RequestView {
        id: 7,
        state: RequestState::Pending,
        requester: "bob".into(),
        groups: vec!["oncall".into()],
        target: "shop".into(),
        session: "0193a1b2-bbbb".into(),
        statement: "DELETE FROM orders\nWHERE status = 'refunded' -- cleanup".into(),
        rule: "order-changes-need-a-lead".into(),
        reason: Some("on-call changes to orders are reviewed by a lead".into()),
        approvers: vec!["leads".into()],
        needed: 2,
        approvals: vec![Approval {
            by: "dave".into(),
            at: now() - Duration::seconds(20),
            via: "slack".into(),
            chat_user: Some("U042".into()),
        }],
        created: now() - Duration::seconds(60),
        expires: now() + Duration::seconds(272),
        denied_by: None,
        denial_reason: None,
        access: None,
        statements: vec![StatementRecord {
            kind: "write".into(),
            command: "DELETE".into(),
            relations: vec!["orders (write)".into()],
            features: vec!["no_where".into(), "touches_finance".into()],
            tags: vec!["finance".into()],
        }],
        approve_via: vec!["console".into()],
    };
    let access = RequestView {
        id: 8,
        requester: "bob".into(),
        statement: String::new(),
        rule: "orders-fix".into(),
        reason: Some("fix the stuck orders of ticket OPS-12".into()),
        needed: 1,
        approvals: vec![],
        expires: now() + Duration::seconds(45),
        access: Some(AccessView {
            grant: "orders-fix".into(),
            seconds: 1800,
            until: None,
            ended: None,
        }),
        statements: vec![],
        ..base.clone()
    };
    let denied = RequestView {
        id: 5,
        state: RequestState::Denied,
        denied_by: Some("carol".into()),
        denial_reason: Some("use the admin tool".into()),
        approvals: vec![],
        statement: "UPDATE payments SET amount = 0".into(),
        ..base.clone()
    };
    vec![base, access, denied]
}

#[test]
fn live_empty() {
    insta::assert_snapshot!(draw(&app(), 100, 24));
}

#[test]
fn live_many_sessions_with_pulse() {
    let mut app = app();
    feed(&mut app);
    update(&mut app, Action::Sessions(Ok(sessions())));
    update(&mut app, Action::Approvals(Ok(requests())));
    key(&mut app, KeyCode::Down);
    insta::assert_snapshot!(draw(&app, 120, 24));
}

#[test]
fn live_at_80_by_24() {
    let mut app = app();
    update(&mut app, Action::Sessions(Ok(sessions())));
    insta::assert_snapshot!(draw(&app, 80, 24));
}

#[test]
fn live_kill_asks_first() {
    let mut app = app();
    update(&mut app, Action::Sessions(Ok(sessions())));
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Char('k'));
    insta::assert_snapshot!(draw(&app, 100, 24));
}

#[test]
fn live_session_timeline() {
    let mut app = app();
    update(&mut app, Action::Sessions(Ok(sessions())));
    // Sessions are listed oldest first: alice is second.
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Enter);
    let mut timeline = Vec::new();
    let mut probe = self::app();
    feed(&mut probe);
    for item in probe.activity.visible() {
        if item.event.event.session.as_deref() == Some("0193a1b2-aaaa") {
            timeline.insert(0, item.event.clone());
        }
    }
    update(
        &mut app,
        Action::Timeline {
            session: "0193a1b2-aaaa".into(),
            result: Ok(timeline),
        },
    );
    insta::assert_snapshot!(draw(&app, 100, 20));
}

#[test]
fn activity_feed_highlights_and_escapes() {
    let mut app = app();
    feed(&mut app);
    key(&mut app, KeyCode::Char('2'));
    insta::assert_snapshot!(draw(&app, 120, 16));
}

#[test]
fn activity_empty_and_filtered() {
    let mut app = app();
    key(&mut app, KeyCode::Char('2'));
    let empty = draw(&app, 90, 10);
    feed(&mut app);
    key(&mut app, KeyCode::Char('/'));
    typed(&mut app, "bob");
    key(&mut app, KeyCode::Enter);
    insta::assert_snapshot!(format!("{empty}\n{}", draw(&app, 120, 14)));
}

#[test]
fn activity_statement_detail() {
    let mut app = app();
    feed(&mut app);
    key(&mut app, KeyCode::Char('2'));
    // The held DELETE: third from the top.
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Enter);
    insta::assert_snapshot!(draw(&app, 100, 22));
}

#[test]
fn approvals_empty() {
    let mut app = app();
    key(&mut app, KeyCode::Char('3'));
    insta::assert_snapshot!(draw(&app, 100, 12));
}

#[test]
fn approvals_held_with_countdown() {
    let mut app = app();
    update(&mut app, Action::Approvals(Ok(requests())));
    key(&mut app, KeyCode::Char('3'));
    let before = draw(&app, 110, 30);
    // Time passes: the countdown moves.
    update(&mut app, Action::Tick(now() + Duration::seconds(241)));
    let after = draw(&app, 110, 30);
    assert_ne!(before, after);
    insta::assert_snapshot!(format!("{before}\n{after}"));
}

#[test]
fn approvals_access_request_and_deny_prompt() {
    let mut app = app();
    update(&mut app, Action::Approvals(Ok(requests())));
    key(&mut app, KeyCode::Char('3'));
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Char('d'));
    typed(&mut app, "not during the freeze");
    insta::assert_snapshot!(draw(&app, 110, 28));
}

#[test]
fn approvals_refusal_from_the_gateway_is_shown() {
    let mut app = app();
    update(&mut app, Action::Approvals(Ok(requests())));
    key(&mut app, KeyCode::Char('3'));
    update(
        &mut app,
        Action::Decided {
            id: 7,
            approve: true,
            reason: None,
            result: Err("you cannot approve your own request (HTTP 403)".into()),
        },
    );
    let screen = draw(&app, 110, 28);
    assert!(
        screen.contains("request 7: you cannot approve your own request (HTTP 403)"),
        "{screen}"
    );
}

fn wide_result() -> QueryOutcome {
    let columns: Vec<String> = (1..=12).map(|i| format!("column_number_{i}")).collect();
    let rows = (0..30)
        .map(|r| {
            (0..12)
                .map(|c| {
                    if (r + c) % 5 == 0 {
                        None
                    } else {
                        Some(format!("value {r}.{c}"))
                    }
                })
                .collect()
        })
        .collect();
    QueryOutcome {
        columns,
        rows,
        truncated: false,
        tags: vec!["30 rows".into()],
        elapsed_ms: 12,
    }
}

#[test]
fn shell_wide_result_scrolled() {
    let mut app = app();
    key(&mut app, KeyCode::Char('4'));
    typed(&mut app, "SELECT * FROM wide;");
    key(&mut app, KeyCode::Enter);
    update(&mut app, Action::QueryDone(Ok(wide_result())));
    let ctrl = |app: &mut App, code| update(app, Action::Key(KeyEvent::new(code, KeyModifiers::CONTROL)));
    for _ in 0..3 {
        ctrl(&mut app, KeyCode::Right);
    }
    for _ in 0..5 {
        ctrl(&mut app, KeyCode::Down);
    }
    // Letters and digits stay text in the shell: nothing else happens.
    typed(&mut app, "q1j");
    assert_eq!(
        (app.tab, app.quit, app.shell.text().as_str()),
        (Tab::Shell, false, "q1j")
    );
    insta::assert_snapshot!(draw(&app, 100, 20));
}

#[test]
fn shell_held_notice_then_error() {
    let mut app = app();
    key(&mut app, KeyCode::Char('4'));
    typed(&mut app, "DELETE FROM orders");
    key(&mut app, KeyCode::Enter);
    typed(&mut app, "WHERE status = 'refunded';");
    key(&mut app, KeyCode::Enter);
    app.shell.started(now());
    update(
        &mut app,
        Action::QueryNotice("NOTICE: held for approval: request 9, expires in 10m, approvers: leads".into()),
    );
    update(&mut app, Action::Tick(now() + Duration::seconds(3)));
    let waiting = draw(&app, 100, 16);
    update(
        &mut app,
        Action::QueryDone(Err(crate::action::QueryError {
            message: "request 9 was denied by carol: not during the freeze".into(),
            detail: None,
            hint: Some("ask carol".into()),
            code: Some("42501".into()),
            elapsed_ms: 4200,
        })),
    );
    insta::assert_snapshot!(format!("{waiting}\n{}", draw(&app, 100, 16)));
}

fn past() -> Vec<SessionSummary> {
    vec![
        SessionSummary {
            session: "0193a1b2-aaaa".into(),
            started: "2026-11-29T13:30:00.000000Z".into(),
            last: "2026-11-29T13:58:00.000000Z".into(),
            identity: Some("alice".into()),
            target: Some("shop".into()),
            client: Some("127.0.0.1:50000".into()),
            statements: 2,
            refused: 0,
            closed: Some("client_terminated".into()),
            refused_at_start: false,
        },
        SessionSummary {
            session: "0193a1b2-eeee".into(),
            started: "2026-11-29T12:00:00.000000Z".into(),
            last: "2026-11-29T12:00:00.000000Z".into(),
            identity: None,
            target: Some("shop".into()),
            client: Some("10.0.0.9:41000".into()),
            statements: 0,
            refused: 0,
            closed: None,
            refused_at_start: true,
        },
    ]
}

#[test]
fn replay_session_list() {
    let mut app = app();
    key(&mut app, KeyCode::Char('5'));
    assert!(app.replay.loading);
    update(&mut app, Action::PastSessions(Ok(past())));
    insta::assert_snapshot!(draw(&app, 100, 10));
}

#[test]
fn replay_mid_session() {
    let mut app = app();
    key(&mut app, KeyCode::Char('5'));
    update(&mut app, Action::PastSessions(Ok(past())));
    key(&mut app, KeyCode::Enter);
    let mut probe = self::app();
    feed(&mut probe);
    let mut events: Vec<StoredEvent> = probe.activity.visible().map(|i| i.event.clone()).collect();
    events.reverse();
    events.insert(1, event(2, 120, "0193a1b2-aaaa", "alice", done(1, 2, 410)));
    update(
        &mut app,
        Action::Recording {
            session: "0193a1b2-aaaa".into(),
            result: Ok(events),
        },
    );
    key(&mut app, KeyCode::Right);
    key(&mut app, KeyCode::Char('+'));
    insta::assert_snapshot!(draw(&app, 120, 22));
}

#[test]
fn replay_plays_back_in_time() {
    let mut app = app();
    key(&mut app, KeyCode::Char('5'));
    update(&mut app, Action::PastSessions(Ok(past())));
    key(&mut app, KeyCode::Enter);
    let events = vec![
        event(1, 100, "s", "alice", statement(1, "SELECT 1", "allow", None, &[])),
        event(2, 90, "s", "alice", statement(2, "SELECT 2", "allow", None, &[])),
        event(3, 10, "s", "alice", statement(3, "SELECT 3", "allow", None, &[])),
    ];
    update(
        &mut app,
        Action::Recording {
            session: "0193a1b2-aaaa".into(),
            result: Ok(events),
        },
    );
    key(&mut app, KeyCode::Char(' '));
    let player = |app: &App| app.replay.player.as_ref().map(|p| (p.position, p.playing)).unwrap();
    update(&mut app, Action::Tick(now()));
    update(&mut app, Action::Tick(now() + Duration::seconds(5)));
    assert_eq!(player(&app), (0, true), "5 s in, the next event is 10 s away");
    update(&mut app, Action::Tick(now() + Duration::seconds(11)));
    assert_eq!(player(&app), (1, true));
    // Faster: ×8 covers the remaining 80 s in 10.
    for _ in 0..3 {
        key(&mut app, KeyCode::Char('+'));
    }
    update(&mut app, Action::Tick(now() + Duration::seconds(21)));
    assert_eq!(player(&app), (2, false), "played to the end and stopped");
}

#[test]
fn help_overlay_per_view() {
    let mut app = app();
    key(&mut app, KeyCode::Char('3'));
    key(&mut app, KeyCode::Char('?'));
    let approvals = draw(&app, 90, 20);
    key(&mut app, KeyCode::Esc);
    key(&mut app, KeyCode::Char('4'));
    // In the shell, ? is text: F1 is help.
    key(&mut app, KeyCode::Char('?'));
    assert_eq!(app.shell.text(), "?");
    key(&mut app, KeyCode::F(1));
    insta::assert_snapshot!(format!("{approvals}\n{}", draw(&app, 90, 22)));
}

#[test]
fn reconnecting_is_shown() {
    let mut app = app();
    update(
        &mut app,
        Action::Link(Link::Reconnecting {
            attempt: 3,
            error: "cannot reach the control API at http://127.0.0.1:7480: connection refused".into(),
        }),
    );
    let screen = draw(&app, 120, 12);
    assert!(screen.contains("○ reconnecting http://127.0.0.1:7480 (3)"), "{screen}");
    assert!(
        screen.contains("lost the gateway: cannot reach the control API"),
        "{screen}"
    );
}

#[test]
fn control_characters_never_reach_the_terminal() {
    let mut app = app();
    let mut evil = sessions();
    evil[0].identity = "mallory\x1b[31m".into();
    evil[0].application = "app\x1b]0;title\x07".into();
    evil[0].last_statement = "SELECT 1 /*\x1b[2J*/".into();
    update(&mut app, Action::Sessions(Ok(evil)));
    feed(&mut app);
    for tab in ['1', '2', '3'] {
        key(&mut app, KeyCode::Char(tab));
        let screen = draw(&app, 120, 24);
        assert!(!screen.chars().any(|c| c.is_control() && c != '\n'), "{screen}");
        assert!(!screen.contains('\u{202e}'), "{screen}");
    }
    key(&mut app, KeyCode::Char('1'));
    let screen = draw(&app, 120, 24);
    assert!(screen.contains("mallory\\e[31m"), "{screen}");
    assert!(screen.contains("app\\e]0;tit…"), "{screen}");
}

#[test]
fn tabs_switch_by_number_and_tab_key() {
    let mut app = app();
    key(&mut app, KeyCode::Char('3'));
    assert_eq!(app.tab, Tab::Approvals);
    key(&mut app, KeyCode::Tab);
    assert_eq!(app.tab, Tab::Shell);
    // Digits are text in the shell; Tab still switches.
    key(&mut app, KeyCode::Char('1'));
    assert_eq!(app.tab, Tab::Shell);
    key(&mut app, KeyCode::Tab);
    assert_eq!(app.tab, Tab::Replay);
    key(&mut app, KeyCode::BackTab);
    key(&mut app, KeyCode::BackTab);
    assert_eq!(app.tab, Tab::Approvals);
    // The "1" typed in the shell is still there: quitting asks first.
    key(&mut app, KeyCode::Char('q'));
    assert!(!app.quit);
    key(&mut app, KeyCode::Char('y'));
    assert!(app.quit);
}

#[test]
fn every_view_draws_at_any_size_without_panicking() {
    let mut app = app();
    feed(&mut app);
    update(&mut app, Action::Sessions(Ok(sessions())));
    update(&mut app, Action::Approvals(Ok(requests())));
    key(&mut app, KeyCode::Char('4'));
    typed(&mut app, "SELECT 1;");
    key(&mut app, KeyCode::Enter);
    update(&mut app, Action::QueryNotice("NOTICE: a long notice ".repeat(20)));
    update(&mut app, Action::QueryDone(Ok(wide_result())));
    for tab in Tab::ALL {
        app.tab = tab;
        for (width, height) in [(1, 1), (10, 3), (20, 5), (80, 6), (80, 7), (80, 8), (40, 24), (200, 60)] {
            draw(&app, width, height);
        }
    }
}

#[test]
fn the_error_after_a_long_notice_stays_in_view() {
    let mut app = app();
    key(&mut app, KeyCode::Char('4'));
    typed(&mut app, "DELETE FROM orders;");
    key(&mut app, KeyCode::Enter);
    update(
        &mut app,
        Action::QueryNotice(format!("NOTICE: held for approval: request 1 {}", "x".repeat(150))),
    );
    update(
        &mut app,
        Action::QueryDone(Err(crate::action::QueryError {
            message: "canceling statement due to user request".into(),
            detail: None,
            hint: Some("approval request 1 is cancelled".into()),
            code: Some("57014".into()),
            elapsed_ms: 900,
        })),
    );
    let screen = draw(&app, 100, 20);
    assert!(screen.contains("ERROR (57014): canceling statement"), "{screen}");
    assert!(screen.contains("HINT: approval request 1 is cancelled"), "{screen}");
}

/// A row of the trail may keep several events (a statement with its
/// completion, a session's statements): they come with one id, and each
/// counts.
#[test]
fn events_of_one_row_share_its_id_and_all_count() {
    let mut app = app();
    for detail in [
        statement(1, "SELECT 1", "allow", None, &[]),
        done(1, 2, 900),
        statement(2, "SELECT 2", "allow", None, &[]),
        statement(3, "SELECT 3", "allow", None, &[]),
        done(3, 4, 900),
    ] {
        update(&mut app, Action::Event(Box::new(event(3, 0, "s", "alice", detail))));
    }
    let items: Vec<(String, Option<Option<u64>>)> = app
        .activity
        .visible()
        .map(|item| match &item.event.event.detail {
            Detail::Statement { text, .. } => (text.clone(), item.done.as_ref().map(|d| d.rows)),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        items,
        [
            ("SELECT 3".into(), Some(Some(4))),
            ("SELECT 2".into(), None),
            ("SELECT 1".into(), Some(Some(2)))
        ]
    );
}

#[test]
fn a_far_away_second_does_not_fill_the_pulse_history() {
    let mut app = app();
    let old = StoredEvent {
        id: 1,
        event: Event {
            at: now() - Duration::days(365),
            ..event(1, 0, "s", "alice", statement(1, "SELECT 1", "allow", None, &[])).event
        },
    };
    update(&mut app, Action::Event(Box::new(old)));
    update(&mut app, Action::Approvals(Ok(requests())));
    assert_eq!(app.stats.series(now().timestamp(), 3, |b| b.pending), [0, 0, 2]);
}

#[test]
fn filters_match_the_words_on_screen_and_esc_puts_them_back() {
    let mut app = app();
    feed(&mut app);
    key(&mut app, KeyCode::Char('2'));
    key(&mut app, KeyCode::Char('/'));
    typed(&mut app, "held");
    key(&mut app, KeyCode::Enter);
    assert_eq!(app.activity.visible().count(), 2, "the held statement and its request");
    key(&mut app, KeyCode::Char('/'));
    typed(&mut app, "xyz");
    assert_eq!(app.activity.visible().count(), 0, "filters as it is typed");
    key(&mut app, KeyCode::Esc);
    assert_eq!(app.activity.filter, "held");
    assert_eq!(app.activity.visible().count(), 2);
}

#[test]
fn the_selection_moves_on_when_its_request_ends() {
    let mut app = app();
    let mut list = requests();
    update(&mut app, Action::Approvals(Ok(list.clone())));
    key(&mut app, KeyCode::Char('3'));
    assert_eq!(app.approvals.list[app.approvals.selected].id, 7);
    // 7 is cancelled; 9 now waits.
    list[0].state = RequestState::Cancelled;
    let mut waiting = list[1].clone();
    waiting.id = 9;
    update(
        &mut app,
        Action::Approvals(Ok(vec![waiting, list[1].clone(), list[0].clone()])),
    );
    assert_eq!(app.approvals.list[app.approvals.selected].id, 9);
}

#[test]
fn messages_fade_and_the_demo_asks_before_quitting() {
    let mut app = app();
    update(&mut app, Action::Exported(Ok("/tmp/sluice-session-x.jsonl".into())));
    assert!(app.status.is_some());
    update(&mut app, Action::Tick(now() + Duration::seconds(9)));
    assert!(app.status.is_none());

    app.confirm_quit = true;
    key(&mut app, KeyCode::Char('q'));
    assert!(!app.quit);
    assert!(matches!(
        app.overlay,
        Some(crate::app::Overlay::Confirm { command: None, .. })
    ));
    key(&mut app, KeyCode::Char('n'));
    assert!(!app.quit);
    key(&mut app, KeyCode::Char('q'));
    key(&mut app, KeyCode::Char('y'));
    assert!(app.quit);
}

#[test]
fn the_shell_editor_follows_the_cursor_across_wide_and_long_lines() {
    let mut app = app();
    key(&mut app, KeyCode::Char('4'));
    typed(&mut app, "select '漢字漢字'");
    for _ in 0..3 {
        key(&mut app, KeyCode::Left);
    }
    let mut terminal = Terminal::new(TestBackend::new(40, 12)).unwrap();
    terminal.draw(|frame| crate::ui::render(&app, frame)).unwrap();
    // "select '漢字" is 12 columns: the cursor is after it, inside the border.
    terminal.backend_mut().assert_cursor_position((1 + 12, 2));
    // A line longer than the editor scrolls to keep the cursor in view.
    key(&mut app, KeyCode::End);
    typed(&mut app, &" and more".repeat(8));
    terminal.draw(|frame| crate::ui::render(&app, frame)).unwrap();
    let screen = terminal.backend().to_string();
    assert!(screen.contains("and more and more"), "{screen}");
    terminal.backend_mut().assert_cursor_position((38, 2));
}

#[test]
fn a_long_statement_is_read_whole_before_a_approves_it() {
    let mut app = app();
    let mut list = requests();
    let body: Vec<String> = (0..40)
        .map(|n| format!("  -- reviewed by finance, ticket #{n}"))
        .collect();
    list[0].statement = format!(
        "UPDATE orders SET status = 'refunded'\nWHERE id = 3\n{}\n  OR total > 0",
        body.join("\n")
    );
    update(&mut app, Action::Approvals(Ok(list)));
    key(&mut app, KeyCode::Char('3'));
    let screen = draw(&app, 100, 30);
    assert!(
        screen.contains("⋯ the statement goes on (43 lines): enter reads it whole"),
        "{screen}"
    );
    // a opens the statement instead of approving it.
    assert!(
        update(
            &mut app,
            Action::Key(KeyEvent::new(KeyCode::Char('a'), KeyModifiers::NONE))
        )
        .is_empty()
    );
    assert_eq!(app.approvals.reading, Some(0));
    key(&mut app, KeyCode::End);
    let screen = draw(&app, 100, 30);
    assert!(screen.contains("OR total > 0"), "{screen}");
    let commands = update(
        &mut app,
        Action::Key(KeyEvent::new(KeyCode::Char('a'), KeyModifiers::NONE)),
    );
    assert_eq!(
        commands,
        [crate::action::Command::Decide {
            id: 7,
            approve: true,
            reason: None
        }]
    );
}

#[test]
fn the_selection_stays_on_a_decided_request_the_operator_chose() {
    let mut app = app();
    update(&mut app, Action::Approvals(Ok(requests())));
    key(&mut app, KeyCode::Char('3'));
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Down);
    assert_eq!(app.approvals.list[app.approvals.selected].id, 5);
    // The next poll brings the same list: the selection stays on the denied one.
    update(&mut app, Action::Approvals(Ok(requests())));
    assert_eq!(app.approvals.list[app.approvals.selected].id, 5);
}
