//! The control API through its typed client: authentication and roles,
//! live and past sessions, a session's timeline, ending a session, and the
//! live event stream with `since`.

use sluice_core::api::client::ApiClient;
use sluice_core::audit::Detail;

use crate::harness::raw::{self, RawClient};
use crate::harness::{AGENT, ALICE, BOB, Spec, TestGateway};

/// The stream's next event, failing the test rather than hanging it.
async fn next(
    stream: &mut sluice_core::api::client::EventStream,
) -> Option<Result<sluice_core::audit::StoredEvent, sluice_core::api::client::ClientError>> {
    tokio::time::timeout(crate::harness::PATIENCE, stream.next())
        .await
        .expect("no event in time")
}

fn client(gw: &TestGateway, token: Option<&str>) -> ApiClient {
    ApiClient::new(gw.api.as_deref().expect("the harness turns the API on"), token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_authenticated_and_held_to_their_role() {
    let gw = TestGateway::start("api_auth", Spec::default()).await;
    // Health needs no token.
    let health = client(&gw, None).health().await.unwrap();
    assert_eq!(health.status, "ok");
    assert!(health.audit.unwrap().available);

    let err = client(&gw, None).sessions().await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert!(err.to_string().contains("Authorization: Bearer"), "{err}");
    let err = client(&gw, Some("not-a-token")).sessions().await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert!(err.to_string().contains("token refused"), "{err}");
    // The agent's group holds no role.
    let err = client(&gw, Some(AGENT)).sessions().await.unwrap_err();
    assert_eq!(err.status(), Some(403));
    assert!(
        err.to_string()
            .contains("needs the viewer role (held by groups engineering, oncall)"),
        "{err}"
    );
    // alice views but may not end sessions.
    assert!(client(&gw, Some(ALICE)).sessions().await.unwrap().is_empty());
    let err = client(&gw, Some(ALICE)).kill("x").await.unwrap_err();
    assert_eq!(err.status(), Some(403));
    assert!(err.to_string().contains("needs the admin role"), "{err}");
    let err = client(&gw, Some(BOB)).kill("no-such-session").await.unwrap_err();
    assert_eq!(err.status(), Some(404));
    let metrics = client(&gw, Some(ALICE)).metrics().await.unwrap();
    assert!(metrics.contains("sluice_sessions_open 0"), "{metrics}");
    assert!(metrics.contains("sluice_audit_available 1"), "{metrics}");
}

const RUNAWAY: &str = "SELECT pg_sleep(600) AS runaway";

/// PostgreSQL does not notice a closed connection while a statement runs:
/// ending a session must cancel what it left running on the server, or a
/// runaway query an administrator ended would keep the database busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_session_cancels_the_statement_it_left_running() {
    let gw = TestGateway::start("api_kill_running", Spec::default()).await;
    let admin = client(&gw, Some(BOB));
    let direct = crate::harness::superuser(&gw.db).await;
    let mut bob = RawClient::connect(gw.addr).await;
    bob.login(&gw.db, BOB).await;
    bob.send(&raw::msg(b'Q', &raw::cstr(RUNAWAY))).await;
    crate::harness::eventually("the statement to run", || async {
        crate::harness::running(&direct, RUNAWAY).await == 1
    })
    .await;

    let session = admin.sessions().await.unwrap().remove(0);
    admin.kill(&session.id).await.unwrap();
    let closing = bob.until_closed().await;
    let fatal = raw::first_error(&closing);
    assert!(fatal[&'M'].contains("ended by an administrator (bob)"), "{fatal:?}");
    crate::harness::eventually("the server to stop the statement", || async {
        crate::harness::running(&direct, RUNAWAY).await == 0
    })
    .await;
}

/// `/metrics` counts statements as the console does: each execution of a
/// prepared statement (not its one Parse), and a message the gateway
/// refuses in place on its own (no policy rule refused it) as refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_executions_and_refusals_in_place() {
    let gw = TestGateway::start("api_metrics_counts", Spec::default()).await;
    let viewer = client(&gw, Some(ALICE));
    let mut bob = RawClient::connect(gw.addr).await;
    bob.login(&gw.db, BOB).await;
    bob.send(
        &[
            raw::parse("twice", "SELECT 2 AS two"),
            raw::bind("", "twice"),
            raw::execute("", 0),
            raw::bind("", "twice"),
            raw::execute("", 0),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    bob.until_ready().await;
    // A portal name PostgreSQL would cut short: refused in place.
    bob.send(&[raw::execute(&"p".repeat(64), 0), raw::sync()].concat())
        .await;
    let refused = bob.until_ready().await;
    assert!(raw::first_error(&refused)[&'M'].contains("name refused"), "{refused:?}");

    let live = viewer.sessions().await.unwrap();
    assert_eq!((live[0].statements, live[0].refused), (3, 1), "{live:?}");
    let metrics = viewer.metrics().await.unwrap();
    for expected in [
        "sluice_statements_total{decision=\"allow\"} 2\n",
        "sluice_statements_total{decision=\"deny\"} 1\n",
        "sluice_statements_total{decision=\"require_approval\"} 0\n",
    ] {
        assert!(metrics.contains(expected), "{expected}: {metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_listed_followed_and_ended_by_an_admin() {
    let mut gw = TestGateway::start("api_sessions", Spec::default()).await;
    let viewer = client(&gw, Some(ALICE));
    let admin = client(&gw, Some(BOB));

    let mut bob = RawClient::connect(gw.addr).await;
    bob.send(&raw::startup_packet(
        196608,
        &[
            ("user", "tester"),
            ("database", &gw.db),
            ("application_name", "reports"),
        ],
    ))
    .await;
    bob.send(&raw::msg(b'p', &raw::cstr(BOB))).await;
    bob.until_ready().await;
    bob.simple("SELECT 'ada.lovelace@example.com' AS contact").await;
    let live = viewer.sessions().await.unwrap();
    assert_eq!(live.len(), 1, "{live:?}");
    let session = &live[0];
    assert_eq!(
        (session.identity.as_str(), session.application.as_str()),
        ("bob", "reports")
    );
    assert_eq!(session.statements, 1);
    // The last statement is shown as the trail keeps it: masked.
    assert_eq!(session.last_statement, "SELECT '****@example.com' AS contact");

    let metrics = viewer.metrics().await.unwrap();
    for expected in [
        "sluice_sessions_open 1",
        "sluice_statements_total{decision=\"allow\"} 1",
        "sluice_statement_duration_seconds_count 1",
        "sluice_approvals_pending 0",
    ] {
        assert!(metrics.contains(expected), "{expected}: {metrics}");
    }

    // A statement prepared once and executed twice is two statements, and
    // the last one shown is what ran.
    bob.send(
        &[
            raw::parse("", "SELECT 2 AS two"),
            raw::bind("", ""),
            raw::execute("", 0),
            raw::bind("", ""),
            raw::execute("", 0),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    bob.until_ready().await;
    let live = viewer.sessions().await.unwrap();
    assert_eq!(
        (live[0].statements, live[0].last_statement.as_str()),
        (3, "SELECT 2 AS two")
    );

    let killed = admin.kill(&session.id).await.unwrap();
    assert_eq!(killed.by, "bob");
    let closing = bob.until_closed().await;
    let fatal = raw::first_error(&closing);
    assert_eq!(fatal.get(&'C').map(String::as_str), Some("57P01"), "{closing:?}");
    assert!(fatal[&'M'].contains("ended by an administrator (bob)"), "{fatal:?}");
    // The session is gone from the live list once it has closed.
    let mut gone = false;
    for _ in 0..200 {
        if viewer.sessions().await.unwrap().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(gone);

    let past = viewer.past_sessions(10).await.unwrap();
    assert_eq!(past[0].session, session.id);
    // The closing event is written by the audit writer a moment after the
    // session leaves the live list: wait for it rather than race it.
    let mut timeline = viewer.timeline(&session.id).await.unwrap();
    for _ in 0..200 {
        if timeline.len() >= 8 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        timeline = viewer.timeline(&session.id).await.unwrap();
    }
    let kinds: Vec<&str> = timeline.iter().map(|e| e.event.detail.kind()).collect();
    assert_eq!(
        kinds,
        [
            "session_opened",
            "statement",
            "statement_done",
            "statement",
            "statement_done",
            "statement",
            "statement_done",
            "session_closed"
        ],
        "{timeline:#?}"
    );
    match &timeline[7].event.detail {
        Detail::SessionClosed {
            reason,
            detail,
            statements,
            ..
        } => {
            assert_eq!((reason.as_str(), detail.as_str(), *statements), ("killed", "bob", 3));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(viewer.timeline("nope").await.unwrap_err().status(), Some(404));
    gw.shutdown.cancel();
    gw.finished().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_resumes_with_since_and_misses_nothing() {
    let mut gw = TestGateway::start("api_events", Spec::default()).await;
    let viewer = client(&gw, Some(ALICE));
    let mut stream = viewer.events(0).await.unwrap();

    let bob = gw.connect(BOB).await.unwrap();
    bob.simple_query("SELECT 1").await.unwrap();
    let mut seen = Vec::new();
    while let Some(event) = next(&mut stream).await {
        let event = event.unwrap();
        let done = matches!(event.event.detail, Detail::StatementDone { .. });
        seen.push(event);
        if done {
            break;
        }
    }
    let kinds: Vec<&str> = seen.iter().map(|e| e.event.detail.kind()).collect();
    assert_eq!(kinds, ["session_opened", "statement", "statement_done"]);
    let last = seen.last().unwrap().id;
    drop(stream);

    // While nobody listens, more happens.
    bob.simple_query("SELECT 2").await.unwrap();
    drop(bob);

    // Reconnecting with since = the last id seen gives exactly what came
    // after, in order, and then the live events.
    let mut stream = viewer.events(last).await.unwrap();
    let mut resumed = Vec::new();
    while let Some(event) = next(&mut stream).await {
        let event = event.unwrap();
        let closed = matches!(event.event.detail, Detail::SessionClosed { .. });
        resumed.push(event);
        if closed {
            break;
        }
    }
    // A statement and its completion are one row of the trail when the
    // completion came before the writer stored the statement (they then
    // share its id and arrive together).
    let mut ids: Vec<u64> = resumed.iter().map(|e| e.id).collect();
    ids.dedup();
    let expected: Vec<u64> = (last + 1..last + 1 + ids.len() as u64).collect();
    assert_eq!(ids, expected, "no gaps, no repeats: {resumed:#?}");
    let kinds: Vec<&str> = resumed.iter().map(|e| e.event.detail.kind()).collect();
    assert_eq!(kinds, ["statement", "statement_done", "session_closed"]);

    // A later session arrives live on the same stream.
    let alice = gw.connect(ALICE).await.unwrap();
    drop(alice);
    let following = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(following.id, ids.last().unwrap() + 1);
    assert_eq!(following.event.detail.kind(), "session_opened");
    // The stream ends when the gateway stops.
    gw.shutdown.cancel();
    gw.finished().await;
}

/// Lineage through the API: who touched tagged data, how, and whether they
/// saw it masked; and what one identity touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lineage_answers_who_touched_tagged_data_and_what_an_identity_touched() {
    use sluice_core::audit::LineageQuery;
    let path = crate::harness::cluster().dev.dir().join("audit-lineage.db");
    let extra = format!(
        "[audit]\npath = \"{}\"\nsync = \"normal\"\n\n\
         [[audit.tags]]\ntag = \"pii\"\nrelations = [\"customers\"]\n\n\
         [[audit.tags]]\ntag = \"finance\"\nrelations = [\"public.orders\"]\n",
        path.display()
    );
    let gw = TestGateway::start(
        "api_lineage",
        Spec {
            extra,
            ..Spec::default()
        },
    )
    .await;
    crate::harness::setup(
        &gw.db,
        "CREATE TABLE customers (id int, email text); INSERT INTO customers VALUES (1, 'a@example.com'); \
         CREATE TABLE orders (id int)",
    )
    .await;
    let bob = gw.connect(BOB).await.unwrap();
    bob.simple_query("SELECT email FROM customers").await.unwrap();
    bob.simple_query("INSERT INTO orders VALUES (1)").await.unwrap();
    let agent = gw.connect(AGENT).await.unwrap();
    agent.simple_query("SELECT * FROM customers").await.unwrap();
    drop((bob, agent));

    let viewer = client(&gw, Some(ALICE));
    let err = viewer.lineage(&LineageQuery::default()).await.unwrap_err();
    assert_eq!(err.status(), Some(400));
    let pii = viewer
        .lineage(&LineageQuery {
            tag: Some("pii".into()),
            ..LineageQuery::default()
        })
        .await
        .unwrap();
    let who: Vec<(&str, &str, &str, bool)> = pii
        .iter()
        .map(|r| (r.identity.as_str(), r.relation.as_str(), r.access.as_str(), r.masked))
        .collect();
    assert_eq!(
        who,
        [("agent", "customers", "read", true), ("bob", "customers", "read", true)]
    );
    assert_eq!(pii[0].labels.get("model").map(String::as_str), Some("test-model"));
    let bob_touched = viewer
        .lineage(&LineageQuery {
            identity: Some("bob".into()),
            ..LineageQuery::default()
        })
        .await
        .unwrap();
    let what: Vec<(&str, &str)> = bob_touched
        .iter()
        .map(|r| (r.relation.as_str(), r.access.as_str()))
        .collect();
    assert_eq!(what, [("customers", "read"), ("orders", "write")]);
    assert!(bob_touched[1].tags.contains("finance"), "{bob_touched:?}");
}

/// Column lineage: each statement's result columns are on the record with
/// their origin (whatever the alias), tags and how they were masked, over
/// both protocols; lineage by a column tag finds a statement over an
/// untagged relation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_columns_are_recorded_with_origin_tags_and_masking() {
    use sluice_core::audit::{ColumnRecord, LineageQuery};
    let path = crate::harness::cluster().dev.dir().join("audit-columns.db");
    let extra = format!(
        "[audit]\npath = \"{}\"\nsync = \"normal\"\n\n\
         [[audit.tags]]\ntag = \"contact\"\ncolumns = [\"customers.email\"]\n\n\
         [[audit.tags]]\ntag = \"crm\"\nrelations = [\"public.customers\"]\n\n\
         [[masking.rules]]\ncolumns = [\"customers.email\"]\nstrategy = \"redact\"\n",
        path.display()
    );
    let gw = TestGateway::start(
        "api_columns",
        Spec {
            extra,
            policy: Some(
                "[policy]\ndefault = \"allow\"\n\n[[policy.grants]]\nname = \"agent-sees-clear\"\n\
                 grant = \"unmask\"\nusers = [\"agent\"]\n"
                    .into(),
            ),
            ..Spec::default()
        },
    )
    .await;
    crate::harness::setup(
        &gw.db,
        "CREATE TABLE customers (id int, email text); INSERT INTO customers VALUES (1, 'a@example.com'); \
         CREATE VIEW v AS SELECT email AS via_view FROM customers",
    )
    .await;
    let bob = gw.connect(BOB).await.unwrap();
    bob.simple_query("SELECT id AS n, email AS contact, upper(email) FROM customers")
        .await
        .unwrap();
    let row = bob
        .query_one("SELECT email AS e FROM customers WHERE id = $1", &[&1i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("[masked]"));
    bob.simple_query("INSERT INTO customers VALUES (2, 'b@example.com')")
        .await
        .unwrap();
    // Rows, then an error: the rows' columns are the failed statement's.
    bob.simple_query("SELECT email, 10 / (id - 2) AS q FROM customers ORDER BY id")
        .await
        .unwrap_err();
    // A Describe with no Execute lends its columns to nothing.
    bob.prepare("SELECT email AS described FROM customers").await.unwrap();
    bob.simple_query("UPDATE customers SET id = id WHERE false")
        .await
        .unwrap();
    // A view over the tagged column shows it, tags and all.
    bob.simple_query("SELECT via_view FROM v").await.unwrap();
    drop(bob);
    // A session that sees clear values, running a prepared statement twice
    // (the second time without a Describe of its own).
    let agent = gw.connect(AGENT).await.unwrap();
    let statement = agent
        .prepare("SELECT email FROM customers WHERE id = $1")
        .await
        .unwrap();
    for _ in 0..2 {
        let row = agent.query_one(&statement, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "a@example.com");
    }
    drop(agent);

    let viewer = client(&gw, Some(ALICE));
    // Each session's completions, once the writer has them all.
    let completions = |identity: &'static str, want: usize| {
        let viewer = viewer.clone();
        async move {
            for _ in 0..400 {
                let sessions = viewer.past_sessions(10).await.unwrap();
                if let Some(session) = sessions.iter().find(|s| s.identity.as_deref() == Some(identity)) {
                    let done: Vec<Vec<ColumnRecord>> = viewer
                        .timeline(&session.session)
                        .await
                        .unwrap()
                        .into_iter()
                        .filter_map(|e| match e.event.detail {
                            Detail::StatementDone { columns, .. } => Some(columns),
                            _ => None,
                        })
                        .collect();
                    if done.len() >= want {
                        return done;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            panic!("{identity}'s statements did not all complete on the record");
        }
    };
    // (A statement only prepared has no completion.)
    let done = completions("bob", 6).await;
    let describe = |columns: &[ColumnRecord]| -> Vec<String> {
        columns
            .iter()
            .map(|c| {
                format!(
                    "{} <- {} [{}; {}]",
                    c.name,
                    c.origin.as_deref().unwrap_or("?"),
                    c.masking,
                    c.tags.join(",")
                )
            })
            .collect()
    };
    assert_eq!(
        describe(&done[0]),
        [
            "n <- public.customers.id [detectors; crm]",
            "contact <- public.customers.email [rule; contact,crm]",
            "upper <- ? [expression; ]",
        ]
    );
    assert_eq!(
        describe(&done[1]),
        ["e <- public.customers.email [rule; contact,crm]"],
        "the extended protocol records its columns too"
    );
    assert!(done[2].is_empty(), "an INSERT returns no columns");
    assert_eq!(
        describe(&done[3]),
        [
            "email <- public.customers.email [rule; contact,crm]",
            "q <- ? [expression; ]",
        ],
        "a statement that failed after sending rows keeps its columns"
    );
    assert!(
        done[4].is_empty(),
        "the UPDATE after a Describe returned nothing: {:?}",
        done[4]
    );
    assert_eq!(
        describe(&done[5]),
        ["via_view <- public.v.via_view [rule; contact,crm]"]
    );
    assert_eq!(done.len(), 6);
    let clear = completions("agent", 2).await;
    for columns in &clear {
        assert_eq!(
            describe(columns),
            ["email <- public.customers.email [clear; contact,crm]"]
        );
    }

    let contact = viewer
        .lineage(&LineageQuery {
            tag: Some("contact".into()),
            ..LineageQuery::default()
        })
        .await
        .unwrap();
    let via_view = contact
        .iter()
        .find(|r| r.relation == "v")
        .expect("the view's read counts");
    assert_eq!(
        via_view.columns["via_view"],
        std::collections::BTreeSet::from(["rule".to_string()])
    );
    let how: Vec<(&str, Vec<String>, u64)> = contact
        .iter()
        .filter(|r| r.relation == "customers")
        .map(|r| {
            let email = r
                .columns
                .get("email")
                .map(|m| m.iter().cloned().collect())
                .unwrap_or_default();
            (r.identity.as_str(), email, r.statements)
        })
        .collect();
    assert_eq!(
        how,
        [
            ("agent", vec!["clear".to_string()], 2),
            ("bob", vec!["rule".to_string()], 3)
        ]
    );
}
