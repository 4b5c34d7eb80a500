//! The audit trail through real clients: what sessions do is recorded, in a
//! chain that verifies, before it runs; and when the trail cannot record,
//! nothing runs until it can again.

use std::time::Duration;

use sluice_core::audit::{Detail, EventFilter, Signer, SqliteStore, StoredEvent, read_head_file};

use crate::harness::raw::{self, RawClient};
use crate::harness::{self, BOB, Spec, TestGateway};

/// A policy that allows everything but DROP, so a refusal can be recorded.
const POLICY: &str = r#"[policy]
default = "allow"

[[policy.rules]]
name = "no-drop"
decision = "deny"
groups = ["*"]
features = ["drop"]
reason = "nothing is dropped here"
"#;

/// Stops the gateway (so the end of the trail is signed) and reads it.
async fn stop_and_read(gw: &mut TestGateway) -> Vec<StoredEvent> {
    gw.shutdown.cancel();
    gw.finished().await;
    let store = SqliteStore::open_read_only(&gw.audit.path).unwrap();
    let signer = Signer::load_or_create(&gw.audit.key_file).unwrap();
    let head = read_head_file(&gw.audit.head_file)
        .unwrap()
        .expect("the head is signed at shutdown");
    let report = store.verify(&signer.public_key(), Some(&head)).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.unsigned_tail(), 0, "{report:?}");
    store.events(&EventFilter::default()).unwrap()
}

fn statements(events: &[StoredEvent]) -> Vec<(u64, String, String, String)> {
    events
        .iter()
        .filter_map(|e| match &e.event.detail {
            Detail::Statement {
                seq,
                source,
                text,
                decision,
                ..
            } => Some((*seq, source.clone(), text.clone(), decision.clone())),
            _ => None,
        })
        .collect()
}

/// Asserts that each session's closing event counts as many statements as
/// the trail holds for it (what the log line and the live view count too):
/// each Query, each portal's Execute (not each piece of it), each refusal.
/// For sessions without approvals: a Bind approved is on the record as a
/// `bind` event besides its Execute.
fn assert_closing_counts(events: &[StoredEvent]) {
    let mut expanded = Vec::new();
    for event in events {
        event.clone().expand(&mut expanded);
    }
    let recorded = |session: &Option<String>| {
        expanded
            .iter()
            .filter(|e| matches!(e.event.detail, Detail::Statement { .. }) && &e.event.session == session)
            .count() as u64
    };
    let mut closed = 0;
    for e in &expanded {
        if let Detail::SessionClosed { statements, .. } = e.event.detail {
            assert_eq!(
                statements,
                recorded(&e.event.session),
                "{:?}: {expanded:#?}",
                e.event.session
            );
            closed += 1;
        }
    }
    assert!(closed > 0, "no session closed: {expanded:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_statements_are_recorded_in_a_verifiable_trail() {
    let spec = Spec {
        policy: Some(POLICY.into()),
        ..Spec::default()
    };
    let mut gw = TestGateway::start("audit_trail", spec).await;
    harness::setup(
        &gw.db,
        "CREATE TABLE people (id int PRIMARY KEY, email text); \
         INSERT INTO people VALUES (1, 'ada.lovelace@example.com'), (2, 'grace@example.com')",
    )
    .await;

    // psql: the simple protocol, a statement that fails, a refusal.
    let conn = gw.conn_str("bob", BOB, "application_name=audit-test");
    let script = "SELECT email FROM people WHERE email = 'ada.lovelace@example.com';\n\
                  SELECT 1/0;\n\
                  DROP TABLE people;\n\
                  UPDATE people SET email = email WHERE id <= 2;\n";
    let out = harness::psql(&conn, &["-v", "ON_ERROR_STOP=0", "-f", "-"], Some(script)).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing is dropped here"));

    // tokio-postgres: one prepared statement, executed three times; one
    // whose parameter is an email (a text value; tokio-postgres sends every
    // parameter in binary format).
    let client = gw.connect(BOB).await.unwrap();
    let lookup = client.prepare("SELECT email FROM people WHERE id = $1").await.unwrap();
    for id in [1i32, 2, 3] {
        client.query(&lookup, &[&id]).await.unwrap();
    }
    client
        .query("SELECT id FROM people WHERE email = $1", &[&"ada.lovelace@example.com"])
        .await
        .unwrap();
    drop(client);

    let events = stop_and_read(&mut gw).await;
    let opened: Vec<&StoredEvent> = events
        .iter()
        .filter(|e| matches!(e.event.detail, Detail::SessionOpened { .. }))
        .collect();
    assert_eq!(opened.len(), 2, "{events:#?}");
    match &opened[0].event.detail {
        Detail::SessionOpened {
            application, groups, ..
        } => {
            assert_eq!(application, "audit-test");
            assert_eq!(groups, &["oncall".to_string()]);
        }
        _ => unreachable!(),
    }
    assert_eq!(opened[0].event.identity.as_deref(), Some("bob"));
    assert_eq!(opened[0].event.target.as_deref(), Some(gw.db.as_str()));

    let recorded = statements(&events);
    // The email in the WHERE clause is masked in the trail.
    assert_eq!(
        recorded[0],
        (
            1,
            "query".into(),
            "SELECT email FROM people WHERE email = '****@example.com';".into(),
            "allow".into()
        ),
        "{recorded:#?}"
    );
    assert!(!events.iter().any(|e| e.event.to_json().contains("ada.lovelace@")));
    assert_eq!(recorded[2].3, "deny");
    let executes: Vec<_> = recorded.iter().filter(|s| s.1 == "execute").collect();
    // Each with its parameters, as approvers see them: the email masked.
    let texts: Vec<&str> = executes.iter().map(|s| s.2.as_str()).collect();
    assert_eq!(
        texts,
        [
            "SELECT email FROM people WHERE id = $1\n-- parameters: $1 = (binary 0x00000001)",
            "SELECT email FROM people WHERE id = $1\n-- parameters: $1 = (binary 0x00000002)",
            "SELECT email FROM people WHERE id = $1\n-- parameters: $1 = (binary 0x00000003)",
            "SELECT id FROM people WHERE email = $1\n-- parameters: $1 = '****@example.com'",
        ],
        "one event per execution: {recorded:#?}"
    );

    // Each statement that ran has its outcome, after it.
    let done = |session: &str, seq: u64| {
        events
            .iter()
            .find_map(|e| match &e.event.detail {
                Detail::StatementDone {
                    seq: s, rows, sqlstate, ..
                } if *s == seq && e.event.session.as_deref() == Some(session) => Some((e.id, *rows, sqlstate.clone())),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no completion of #{seq}: {events:#?}"))
    };
    let psql_session = opened[0].event.session.clone().unwrap();
    assert_eq!(done(&psql_session, 1).1, Some(1));
    // Its first rows are kept, masked as the client saw them (bob has no
    // unmask grant), and masked by the detectors in any case.
    let sample = events
        .iter()
        .find_map(|e| match &e.event.detail {
            Detail::StatementDone {
                seq: 1,
                columns,
                sample,
                ..
            } if e.event.session.as_deref() == Some(&psql_session) => Some((columns.clone(), sample.clone())),
            _ => None,
        })
        .unwrap();
    let names: Vec<&str> = sample.0.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["email"]);
    assert_eq!(sample.0[0].masking, "detectors");
    assert_eq!(sample.1, [[Some("****@example.com".to_string())]]);
    assert_eq!(done(&psql_session, 2).2.as_deref(), Some("22012"));
    assert_eq!(done(&psql_session, 4).1, Some(2), "UPDATE 2");
    let refused_done = events.iter().any(|e| {
        matches!(e.event.detail, Detail::StatementDone { seq: 3, .. })
            && e.event.session.as_deref() == Some(&psql_session)
    });
    assert!(!refused_done, "a refused statement did not run");
    let closed = events
        .iter()
        .filter(|e| {
            matches!(
                &e.event.detail,
                Detail::SessionClosed {
                    statements: 4,
                    refused: 1,
                    ..
                }
            )
        })
        .count();
    assert_eq!(closed, 1, "{events:#?}");
    // The prepared statement executed three times is three statements.
    assert_closing_counts(&events);

    // A failed login is on the record too.
    let mut gw = TestGateway::start_for(gw.db.clone(), Spec::default()).await;
    assert!(gw.connect("not-a-token").await.is_err());
    let events = stop_and_read(&mut gw).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.event.detail, Detail::SessionRefused { code, user, .. } if code == "28P01" && user == "tester")),
        "{events:#?}"
    );
}

/// How each statement whose text starts with `prefix` ended, in order:
/// its text, its SQLSTATE, and whether the server skipped it.
fn endings(events: &[StoredEvent], prefix: &str) -> Vec<(String, Option<String>, bool)> {
    let mut done = std::collections::HashMap::new();
    for event in events {
        if let Detail::StatementDone {
            seq, sqlstate, skipped, ..
        } = &event.event.detail
        {
            done.insert(*seq, (sqlstate.clone(), *skipped));
        }
    }
    events
        .iter()
        .filter_map(|e| match &e.event.detail {
            Detail::Statement {
                seq,
                text,
                done: joined,
                ..
            } if text.starts_with(prefix) => {
                let (sqlstate, skipped) = match joined {
                    Some(d) => (d.sqlstate.clone(), d.skipped),
                    None => done.get(seq).cloned().unwrap_or_default(),
                };
                Some((text.clone(), sqlstate, skipped))
            }
            _ => None,
        })
        .collect()
}

/// An error at a Bind is the error of the statement its portal runs: the
/// trail says it failed with that SQLSTATE, not that it was skipped. (The
/// unnamed statement is planned at its Bind, so a constant 1/0 fails
/// there.) What the server really skipped after it still says skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_at_bind_is_its_statements() {
    let mut gw = TestGateway::start("audit_bind_error", Spec::default()).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, BOB).await;
    client
        .send(
            &[
                raw::failing(),
                raw::parse("", "SELECT 2"),
                raw::bind("", ""),
                raw::execute("", 0),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
    let answer = client.until_ready().await;
    assert_eq!(raw::first_error(&answer)[&'C'], "22012", "{answer:?}");
    drop(client);

    let events = stop_and_read(&mut gw).await;
    let ended = endings(&events, "SELECT");
    assert_eq!(
        ended,
        [
            ("SELECT 1/0".to_string(), Some("22012".to_string()), false),
            ("SELECT 2".to_string(), None, true),
        ]
    );
}

/// A row-limited statement behind an error in its batch was skipped, the
/// simple Query the gateway would have opened a transaction for too (it
/// never went upstream): the trail says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_limited_statement_skipped_after_an_error_is_recorded_skipped() {
    let spec = Spec {
        policy: Some(
            "[policy]\ndefault = \"allow\"\n\n[[policy.rules]]\nname = \"small-writes\"\ndecision = \"allow\"\ngroups = [\"*\"]\nkinds = [\"write\"]\nmax_rows = 3\n"
                .into(),
        ),
        ..Spec::default()
    };
    let mut gw = TestGateway::start("audit_limit_skipped", spec).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, BOB).await;
    client.simple("CREATE TABLE t (id int)").await;
    for skipped in [
        [
            raw::parse("w", "DELETE FROM t RETURNING id"),
            raw::bind("c", "w"),
            raw::execute("c", 0),
        ]
        .concat(),
        raw::query("DELETE FROM t WHERE id > 2"),
    ] {
        client.send(&[raw::failing(), skipped, raw::sync()].concat()).await;
        let answer = client.until_ready().await;
        assert_eq!(raw::first_error(&answer)[&'C'], "22012", "{answer:?}");
    }
    drop(client);

    let events = stop_and_read(&mut gw).await;
    let mut ended = endings(&events, "SELECT");
    ended.extend(endings(&events, "DELETE"));
    assert_eq!(
        ended,
        [
            ("SELECT 1/0".to_string(), Some("22012".to_string()), false),
            ("SELECT 1/0".to_string(), Some("22012".to_string()), false),
            ("DELETE FROM t RETURNING id".to_string(), None, true),
            ("DELETE FROM t WHERE id > 2".to_string(), None, true),
        ]
    );
}

/// The server forgets a portal when the transaction it was bound in ends:
/// an Execute of it afterwards runs nothing, and the trail must not say
/// the portal's old statement ran. A portal bound behind a batch the
/// server is still answering belongs to the next one and is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_is_forgotten_with_the_transaction_it_was_bound_in() {
    let spec = Spec {
        policy: Some(POLICY.into()),
        ..Spec::default()
    };
    let mut gw = TestGateway::start("audit_portals", spec).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, BOB).await;
    client
        .send(&[raw::parse("s", "SELECT 1 AS one"), raw::bind("old", "s"), raw::sync()].concat())
        .await;
    client.until_ready().await;
    client.send(&[raw::execute("old", 0), raw::sync()].concat()).await;
    let answer = client.until_ready().await;
    assert_eq!(raw::first_error(&answer)[&'C'], "34000", "{answer:?}");
    // Bound in the same write as the Sync before it: in the next batch.
    client
        .send(
            &[
                raw::parse("t", "SELECT 2 AS two"),
                raw::sync(),
                raw::bind("new", "t"),
                raw::flush(),
            ]
            .concat(),
        )
        .await;
    client.until_ready().await;
    client.send(&[raw::execute("new", 0), raw::sync()].concat()).await;
    let answer = client.until_ready().await;
    assert!(raw::tags(&answer).contains("DC"), "{answer:?}");
    // Inside an explicit transaction a portal outlives its batch's Sync.
    client.send(&raw::query("BEGIN")).await;
    client.until_ready().await;
    client
        .send(
            &[
                raw::parse("u", "SELECT 3 AS three"),
                raw::bind("open", "u"),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
    client.until_ready().await;
    client.send(&[raw::execute("open", 0), raw::sync()].concat()).await;
    let answer = client.until_ready().await;
    assert!(raw::tags(&answer).contains("DC"), "{answer:?}");
    client.send(&raw::query("COMMIT")).await;
    client.until_ready().await;
    drop(client);

    let events = stop_and_read(&mut gw).await;
    let executed: Vec<(String, String)> = statements(&events)
        .into_iter()
        .map(|(_, source, text, _)| (source, text))
        .filter(|(source, _)| source == "execute")
        .collect();
    assert_eq!(
        executed,
        [
            (
                "execute".to_string(),
                "(portal \"old\" of a prepared statement the gateway has no text for)".to_string()
            ),
            ("execute".to_string(), "SELECT 2 AS two".to_string()),
            ("execute".to_string(), "SELECT 3 AS three".to_string()),
        ]
    );
}

/// The trail names the prepared statement that ran, also when the client's
/// messages about its name were not carried out: a Close the server
/// skipped (an error earlier in its batch), a Parse it rejected (the name
/// is taken), a DEALLOCATE skipped after an error in its string. A name
/// freed for real and prepared again is named by its new text, in the
/// batch that prepares it and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_names_the_prepared_statement_that_ran() {
    let spec = Spec {
        policy: Some(POLICY.into()),
        ..Spec::default()
    };
    let mut gw = TestGateway::start("audit_names", spec).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, BOB).await;
    let run = [raw::bind("", "s"), raw::execute("", 0), raw::sync()].concat();
    let steps: [(Vec<u8>, &str); 13] = [
        ([raw::parse("s", "SELECT 1 AS first"), raw::sync()].concat(), "1Z"),
        (
            [raw::parse("", "SELEC 1"), raw::close(b'S', "s"), raw::sync()].concat(),
            "EZ",
        ),
        ([raw::parse("s", "SELECT 2 AS second"), raw::sync()].concat(), "EZ"),
        (run.clone(), "2DCZ"),
        (raw::query("SELECT 1/0; DEALLOCATE s"), "EZ"),
        ([raw::parse("s", "SELECT 3 AS third"), run.clone()].concat(), "EZ"),
        (run.clone(), "2DCZ"),
        (raw::query("DEALLOCATE s"), "CZ"),
        ([raw::parse("s", "SELECT 4 AS fourth"), run.clone()].concat(), "12DCZ"),
        (
            [raw::close(b'S', "s"), raw::parse("s", "SELECT 5 AS fifth"), run.clone()].concat(),
            "312DCZ",
        ),
        // The unnamed statement, and a Parse of it skipped after an error.
        ([raw::parse("", "SELECT 6 AS sixth"), raw::sync()].concat(), "1Z"),
        (
            [
                raw::parse("x", "SELEC 1"),
                raw::parse("", "SELECT 7 AS seventh"),
                raw::sync(),
            ]
            .concat(),
            "EZ",
        ),
        ([raw::bind("", ""), raw::execute("", 0), raw::sync()].concat(), "2DCZ"),
    ];
    for (n, (messages, expected)) in steps.iter().enumerate() {
        client.send(messages).await;
        let answer = client.until_ready().await;
        assert_eq!(raw::tags(&answer), *expected, "step {n}: {answer:?}");
    }
    client.send(&run).await;
    assert_eq!(raw::tags(&client.until_ready().await), "2DCZ");
    // Pipelined: a Bind behind a Parse of its statement in an earlier batch
    // binds what that Parse prepared if the server carried it out, and what
    // was there before if it skipped it.
    client
        .send(
            &[
                raw::parse("", "SELECT 8 AS eighth"),
                raw::sync(),
                raw::bind("", ""),
                raw::execute("", 0),
                raw::sync(),
                raw::parse("x", "SELEC 1"),
                raw::parse("", "SELECT 9 AS ninth"),
                raw::sync(),
                raw::bind("", ""),
                raw::execute("", 0),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
    for expected in ["1Z", "2DCZ", "EZ", "2DCZ"] {
        assert_eq!(raw::tags(&client.until_ready().await), expected);
    }
    // A Bind that waits for the answer to a Parse of its statement, and
    // an error before the Sync of its own batch: nothing hangs, nothing of
    // the skipped batch is on the record.
    client
        .send(
            &[
                raw::parse("s", "SELECT 11 AS taken"),
                raw::sync(),
                raw::parse("x", "SELEC 1"),
                run.clone(),
            ]
            .concat(),
        )
        .await;
    for expected in ["EZ", "EZ"] {
        assert_eq!(raw::tags(&client.until_ready().await), expected);
    }
    // A name SQL prepared, which a protocol Parse cannot take.
    client.simple("PREPARE t7 AS SELECT 70 AS seventy").await;
    client
        .send(&[raw::parse("t7", "SELECT 71 AS not_it"), raw::sync()].concat())
        .await;
    assert_eq!(raw::tags(&client.until_ready().await), "EZ");
    client
        .send(&[raw::bind("", "t7"), raw::execute("", 0), raw::sync()].concat())
        .await;
    assert_eq!(raw::tags(&client.until_ready().await), "2DCZ");
    drop(client);

    let events = stop_and_read(&mut gw).await;
    let executed: Vec<String> = statements(&events)
        .into_iter()
        .filter(|(_, source, _, _)| source == "execute")
        .map(|(_, _, text, _)| text)
        .collect();
    assert_eq!(
        executed,
        [
            "SELECT 1 AS first",
            // Skipped with the Parse before it, which failed: on the record
            // as what the client asked for.
            "SELECT 3 AS third",
            "SELECT 1 AS first",
            "SELECT 4 AS fourth",
            "SELECT 5 AS fifth",
            "SELECT 6 AS sixth",
            "SELECT 5 AS fifth",
            "SELECT 8 AS eighth",
            "SELECT 8 AS eighth",
            "(portal \"\" of a prepared statement the gateway has no text for)",
        ]
    );
}

/// A portal fetched in pieces (Execute with a row count, answered with
/// PortalSuspended until the last) is one statement in the trail: its rows
/// are those of every piece, its sample goes on across pieces, and it ends
/// with its last piece, or when the portal goes (bound anew, or its
/// transaction ends) before the client fetched everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_fetched_in_pieces_is_one_statement_with_all_its_rows() {
    let mut gw = TestGateway::start("audit_portal_pieces", Spec::default()).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, BOB).await;
    client.send(&raw::query("BEGIN")).await;
    client.until_ready().await;
    client
        .send(
            &[
                raw::parse("s", "SELECT g FROM generate_series(1, 10) g"),
                // Fetched to the end: two rows, two more, then the rest.
                raw::bind("whole", "s"),
                raw::execute("whole", 2),
                raw::execute("whole", 2),
                raw::execute("whole", 0),
                // The unnamed portal, bound again after two pieces (sent
                // before the first piece's PortalSuspended comes back).
                raw::bind("", "s"),
                raw::execute("", 3),
                raw::execute("", 3),
                raw::bind("", "s"),
                raw::execute("", 0),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
    let answer = client.until_ready().await;
    assert_eq!(raw::tags(&answer).matches('s').count(), 4, "{answer:?}");
    // Suspended in a later batch; the transaction ends before the rest.
    client
        .send(&[raw::bind("left", "s"), raw::execute("left", 4), raw::sync()].concat())
        .await;
    client.until_ready().await;
    // The unnamed portal bound again behind its first piece ended with
    // that piece, not with its transaction a second later.
    client
        .send(&raw::query("DO $$ BEGIN PERFORM pg_sleep(1); END $$"))
        .await;
    client.until_ready().await;
    client.send(&raw::query("COMMIT")).await;
    client.until_ready().await;
    // Fails in its third piece, after four rows.
    client
        .send(
            &[
                raw::parse("t", "SELECT 1 / (5 - g) AS q FROM generate_series(1, 10) g"),
                raw::bind("fails", "t"),
                raw::execute("fails", 2),
                raw::execute("fails", 2),
                raw::execute("fails", 0),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
    let answer = client.until_ready().await;
    assert_eq!(raw::first_error(&answer)[&'C'], "22012", "{answer:?}");
    drop(client);

    let events = stop_and_read(&mut gw).await;
    // A portal fetched in pieces is one statement.
    assert_closing_counts(&events);
    let mut expanded = Vec::new();
    for event in events {
        event.expand(&mut expanded);
    }
    let replaced = expanded
        .iter()
        .find_map(|e| match e.event.detail {
            Detail::StatementDone {
                rows: Some(6),
                duration_us,
                ..
            } => Some(duration_us),
            _ => None,
        })
        .unwrap();
    assert!(replaced < 1_000_000, "{replaced} us");
    type Ended = (Option<u64>, Vec<String>, Vec<String>, Option<String>);
    let ended: Vec<Ended> = expanded
        .into_iter()
        .filter_map(|e| match e.event.detail {
            Detail::StatementDone {
                rows,
                columns,
                sample,
                sqlstate,
                ..
            } if !columns.is_empty() => Some((
                rows,
                columns.into_iter().map(|c| c.name).collect(),
                sample.into_iter().flatten().flatten().collect(),
                sqlstate,
            )),
            _ => None,
        })
        .collect();
    let strings = |values: &[&str]| values.iter().map(|v| v.to_string()).collect::<Vec<_>>();
    let first = strings(&["1", "2", "3"]);
    assert_eq!(
        ended,
        [
            (Some(10), strings(&["g"]), first.clone(), None),
            (Some(6), strings(&["g"]), first.clone(), None),
            (Some(10), strings(&["g"]), first.clone(), None),
            (Some(4), strings(&["g"]), first, None),
            (
                Some(4),
                strings(&["q"]),
                strings(&["0", "0", "0"]),
                Some("22012".into())
            ),
        ]
    );
}

/// What happens when the trail's SQLite file cannot be written (with
/// `sync = "normal"`): statements already in the write-ahead journal are on
/// the record and run; once the writer finds it cannot commit, the trail is
/// unavailable and new statements and sessions are refused with the reason;
/// everything works again once the file can be written, and then every
/// statement that ran is in the trail, with the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_trail_stops_statements_until_it_recovers() {
    let mut gw = TestGateway::start("audit_outage", Spec::default()).await;
    harness::setup(&gw.db, "CREATE TABLE t (n int)").await;
    let bob = gw.connect(BOB).await.unwrap();
    bob.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();

    // Someone else takes the trail's write lock (a stuck tool, a full disk:
    // the writer cannot commit either way).
    let blocker = rusqlite::Connection::open(&gw.audit.path).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    // The writer notices within its busy timeout (a second); until then
    // statements are durable in the journal and run.
    let mut ran = vec![1];
    let mut refused_n = None;
    for n in 2..200 {
        match bob.execute(&format!("INSERT INTO t VALUES ({n})"), &[]).await {
            Ok(_) => ran.push(n),
            Err(err) => {
                let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
                assert_eq!(db.code().code(), "58000", "{db:?}");
                // Refused at its Parse, or (if the trail failed between
                // its Parse and its Execute) at its Execute, which ends
                // the session.
                assert!(
                    db.message().contains("audit trail cannot record") || db.message().contains("did not run"),
                    "{db:?}"
                );
                refused_n = Some(n);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_n = refused_n.expect("statements are refused once the trail cannot be written");
    let admin = harness::superuser(&gw.db).await;
    let count = |admin: tokio_postgres::Client| async move {
        let n: i64 = admin.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
        (admin, n)
    };
    let (admin, n) = count(admin).await;
    assert_eq!(n, ran.len() as i64, "the refused statement did not run");

    // While it cannot write, new sessions are refused with the reason.
    let err = gw.connect(BOB).await.unwrap_err();
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(db.code().code(), "58000", "{db:?}");
    assert!(db.message().contains("audit trail cannot record"), "{db:?}");

    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    // The writer tries again by itself, every half second.
    let mut carol = None;
    for _ in 0..100 {
        if let Ok(client) = gw.connect(BOB).await {
            carol = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let carol = carol.expect("the gateway accepts sessions again once the trail is writable");
    carol.execute("INSERT INTO t VALUES (1000)", &[]).await.unwrap();
    ran.push(1000);
    let (_admin, n) = count(admin).await;
    assert_eq!(n, ran.len() as i64);
    drop(carol);
    drop(bob);

    let events = stop_and_read(&mut gw).await;
    // The outage is recorded, with every refusal it caused (a session and
    // a statement here; a refusal counted while one record is written goes
    // into the next).
    let outages: Vec<(u64, String)> = events
        .iter()
        .filter_map(|e| match &e.event.detail {
            Detail::AuditUnavailable { refused, error } => Some((*refused, error.clone())),
            _ => None,
        })
        .collect();
    assert!(!outages.is_empty(), "the outage is recorded");
    assert!(outages.iter().all(|(_, error)| error.contains("locked")), "{outages:?}");
    let refused: u64 = outages.iter().map(|(n, _)| n).sum();
    let refused_sessions = events
        .iter()
        .filter(|e| matches!(&e.event.detail, Detail::SessionRefused { code, .. } if code == "58000"))
        .count() as u64;
    assert!(refused_sessions >= 1);
    assert_eq!(refused, refused_sessions + 1, "{outages:?}");
    // Every statement that ran is on the record, allowed; the refused one
    // is there as refused.
    let decision = |n: i32| {
        events.iter().find_map(|e| match &e.event.detail {
            Detail::Statement { text, decision, .. } if text == &format!("INSERT INTO t VALUES ({n})") => {
                Some(decision.clone())
            }
            _ => None,
        })
    };
    for n in ran {
        assert_eq!(decision(n).as_deref(), Some("allow"), "statement {n}");
    }
    assert_ne!(decision(refused_n).as_deref(), Some("allow"));
}

/// kill -9 during a pgbench run: after a restart, every statement that
/// PostgreSQL executed has its event (it was durable before the statement
/// went upstream), and the trail verifies, with the restarted gateway
/// carrying the chain on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_run_left_every_executed_statement_recorded() {
    use std::collections::HashSet;
    use std::process::Stdio;

    let db = harness::database("audit_crash").await;
    harness::setup(&db, "CREATE TABLE hits (n bigint)").await;
    let dir = harness::cluster().dev.dir().to_path_buf();
    let config_path = dir.join(format!("{db}.toml"));
    let text = harness::config_text(&Spec::default(), &db);
    std::fs::write(&config_path, &text).unwrap();
    let audit = sluice_core::Config::from_toml(&text, &config_path).unwrap().audit;
    let script = dir.join(format!("{db}.pgbench"));
    std::fs::write(
        &script,
        "\\set n random(1, 1000000000000)\nINSERT INTO hits VALUES (:n);\n",
    )
    .unwrap();

    // Starts `sluice serve` and returns it with its port.
    let serve = || async {
        let (child, mut lines, port) = harness::serve_binary(&config_path).await;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        (child, port)
    };

    let (mut gateway, port) = serve().await;
    let mut pgbench = tokio::process::Command::new("pgbench")
        .args(["-n", "-c", "8", "-j", "2", "-T", "60", "-M", "simple", "-f"])
        .arg(&script)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "tester", &db])
        .env("PGPASSWORD", BOB)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("pgbench");
    let admin = harness::superuser(&db).await;
    let rows = || async {
        let n: i64 = admin.query_one("SELECT count(*) FROM hits", &[]).await.unwrap().get(0);
        n
    };
    while rows().await < 500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SAFETY: SIGKILL to our own child's pid.
    assert_eq!(unsafe { libc::kill(gateway.id().unwrap() as i32, libc::SIGKILL) }, 0);
    gateway.wait().await.unwrap();
    let _ = pgbench.wait().await;

    // Before the restart the trail verifies as far as it goes; what the
    // journal holds beyond it is reported, not lost.
    let verify = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["audit", "verify", "--path"])
        .arg(&audit.path)
        .arg("--key-file")
        .arg(&audit.key_file)
        .arg("--head-file")
        .arg(&audit.head_file)
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(said.contains(": intact"), "{said}");
    if let Some(line) = said.lines().find(|l| l.contains("pending")) {
        assert!(line.contains("records in the write-ahead journal"), "{said}");
    }

    // The restarted gateway continues the chain and signs it at shutdown.
    let (mut gateway, port) = serve().await;
    let conn = format!("host=127.0.0.1 port={port} dbname={db} user=tester password={BOB}");
    let out = harness::psql(&conn, &["-c", "INSERT INTO hits VALUES (-1)"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // SAFETY: SIGTERM to our own child's pid.
    assert_eq!(unsafe { libc::kill(gateway.id().unwrap() as i32, libc::SIGTERM) }, 0);
    gateway.wait().await.unwrap();

    let store = SqliteStore::open_read_only(&audit.path).unwrap();
    let signer = Signer::load_or_create(&audit.key_file).unwrap();
    let head = read_head_file(&audit.head_file).unwrap();
    let report = store.verify(&signer.public_key(), head.as_ref()).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.unsigned_tail(), 0, "{report:?}");
    let recorded: HashSet<i64> = store
        .events(&EventFilter::default())
        .unwrap()
        .iter()
        .filter_map(|e| match &e.event.detail {
            Detail::Statement { text, .. } => text
                .strip_prefix("INSERT INTO hits VALUES (")
                .and_then(|rest| rest.trim_end_matches(';').strip_suffix(')'))
                .and_then(|n| n.parse().ok()),
            _ => None,
        })
        .collect();
    let executed: Vec<i64> = admin
        .query("SELECT n FROM hits", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(executed.len() >= 500);
    let missing: Vec<&i64> = executed.iter().filter(|n| !recorded.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "{} executed statements have no event: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// The `sluice audit` commands on a real trail: verify, sessions, show,
/// lineage, export and the evidence report; and verify fails, naming the
/// event, once the trail is edited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_commands_read_a_real_trail() {
    let spec = Spec {
        policy: Some(POLICY.into()),
        ..Spec::default()
    };
    let mut gw = TestGateway::start("audit_cli", spec).await;
    harness::setup(&gw.db, "CREATE TABLE people (id int)").await;
    let bob = gw.connect(BOB).await.unwrap();
    bob.simple_query("SELECT count(*) FROM people").await.unwrap();
    assert!(bob.simple_query("DROP TABLE people").await.is_err());
    drop(bob);
    let events = stop_and_read(&mut gw).await;
    let session = events[0].event.session.clone().unwrap();

    let sluice = |args: &[&str]| {
        let audit = gw.audit.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
                .arg("audit")
                .args(&args)
                .arg("--path")
                .arg(&audit.path)
                .arg("--key-file")
                .arg(&audit.key_file)
                .arg("--head-file")
                .arg(&audit.head_file)
                .output()
                .await
                .unwrap()
        }
    };
    let out = sluice(&["verify"]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("intact"), "{text}");
    let out = sluice(&["sessions"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains(&session));
    let out = sluice(&["show", &session]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("#2 query deny: DROP TABLE people"), "{text}");
    let out = sluice(&["lineage", "--relation", "people"]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("bob") && text.contains("read") && text.contains("masked"),
        "{text}"
    );
    let out = sluice(&["export", "--format", "csv"]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.starts_with("id,part,at,type,session,identity,target,decision,text,event\n"),
        "{text}"
    );
    let dir = harness::cluster().dev.dir().join(format!("evidence-{}", gw.db));
    let out = sluice(&["report", "--since", "1d", "--out", dir.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let md = std::fs::read_to_string(dir.join("sluice-evidence.md")).unwrap();
    assert!(md.contains("| bob |"), "{md}");
    assert!(md.contains("nothing is dropped here"), "{md}");
    assert!(md.contains("Audit trail: intact"), "{md}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("sluice-evidence.json")).unwrap()).unwrap();
    assert_eq!(json["chain_intact"], true);

    // Someone edits the trail: verify says where, and fails.
    let db = rusqlite::Connection::open(&gw.audit.path).unwrap();
    db.execute(
        "UPDATE events SET body = replace(body, 'DROP TABLE people', 'SELECT 1') WHERE body LIKE '%DROP TABLE people%'",
        [],
    )
    .unwrap();
    let out = sluice(&["verify"]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("BROKEN at event") && text.contains("edited"), "{text}");
    let out = sluice(&["report", "--since", "1d", "--out", dir.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
}
