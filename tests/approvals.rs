//! Statements held for approval, decided through the control API: psql
//! waits with a notice and gets its result once approved; denials, expiry,
//! self-approval, N approvals and a cancelled client; access requests that
//! lift a rule for a while.

use std::time::Duration;

use sluice_core::api::client::ApiClient;
use sluice_core::approvals::{RequestState, RequestView};
use sluice_core::audit::{Detail, EventFilter, SqliteStore};

use crate::harness::{self, AGENT, ALICE, BOB, Spec, TestGateway};

const POLICY: &str = r#"[policy]
default = "allow"

[[policy.rules]]
name = "two-eyes-for-orders"
decision = "require_approval"
groups = ["oncall"]
kinds = ["write"]
relations = ["orders"]
approvers = ["engineering", "analytics"]
reason = "orders change only with a second pair of eyes"

[[policy.rules]]
name = "four-eyes-for-payments"
decision = "require_approval"
groups = ["oncall"]
kinds = ["write"]
relations = ["payments"]
approvers = ["engineering", "analytics"]
approvals = 2
reason = "payments need two approvers"

[[policy.rules]]
name = "retry-after-approval"
decision = "require_approval"
groups = ["oncall"]
kinds = ["write"]
relations = ["reports"]
approvers = ["engineering"]
approval_mode = "refuse_and_retry"

[[policy.rules]]
name = "quick-decisions"
decision = "require_approval"
groups = ["oncall"]
kinds = ["write"]
relations = ["urgent"]
approvers = ["engineering"]
timeout = "1s"

[[policy.rules]]
name = "unreadable-is-reviewed"
decision = "require_approval"
groups = ["analytics"]
kinds = ["unknown"]
approvers = ["engineering"]
reason = "the gateway cannot read it"

[[policy.rules]]
name = "ledger-is-read-only"
decision = "deny"
kinds = ["write"]
relations = ["ledger"]
except_grants = ["ledger-writer"]
reason = "the ledger is read-only"

[[policy.grants]]
name = "ledger-writer"
grant = "access"
groups = ["oncall"]
approvers = ["engineering"]
max_duration = "1h"

[[policy.rules]]
name = "archive-is-read-only"
decision = "deny"
kinds = ["write"]
relations = ["archive"]
except_grants = ["ledger-writer"]

[[policy.rules]]
name = "archive-writes-are-reviewed"
decision = "require_approval"
grants = ["ledger-writer"]
kinds = ["write"]
relations = ["archive"]
approvers = ["engineering"]
"#;

const API: &str = "[api]\nlisten = \"127.0.0.1:0\"\nviewer_groups = [\"oncall\"]\n\
                   approver_groups = [\"engineering\", \"analytics\"]\nadmin_groups = [\"oncall\"]\n";

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
         CREATE TABLE payments (id int); INSERT INTO payments VALUES (1); \
         CREATE TABLE urgent (id int); INSERT INTO urgent VALUES (1); \
         CREATE TABLE reports (id int); INSERT INTO reports SELECT generate_series(1, 3); \
         CREATE TABLE ledger (id int); INSERT INTO ledger SELECT generate_series(1, 3); \
         CREATE TABLE archive (id int); INSERT INTO archive VALUES (1)",
    )
    .await;
    gw
}

fn api(gw: &TestGateway, token: &str) -> ApiClient {
    ApiClient::new(gw.api.as_deref().unwrap(), Some(token))
}

/// Waits until a request is pending and returns it.
async fn pending(gw: &TestGateway) -> RequestView {
    let viewer = api(gw, BOB);
    for _ in 0..500 {
        if let Some(request) = viewer
            .approvals()
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.state == RequestState::Pending)
        {
            return request;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no request became pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_waits_for_an_approval_then_gets_its_result() {
    let mut gw = start("approval_psql").await;
    let conn = gw.conn_str("bob", BOB, "");
    let psql =
        tokio::spawn(async move { harness::psql(&conn, &["-c", "DELETE FROM orders WHERE id <= 2"], None).await });

    let request = pending(&gw).await;
    assert_eq!(request.requester, "bob");
    assert_eq!(request.rule, "two-eyes-for-orders");
    assert_eq!(request.statement, "DELETE FROM orders WHERE id <= 2");
    // Held, not run: others carry on meanwhile.
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 5);
    let live = api(&gw, BOB).sessions().await.unwrap();
    assert_eq!(live[0].state, sluice_core::live::SessionState::Held);
    let other = gw.connect(ALICE).await.unwrap();
    other.simple_query("SELECT 1").await.unwrap();

    // The requester cannot approve, even with an approver role elsewhere.
    let err = api(&gw, BOB).decide(request.id, true, None).await.unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    let decided = api(&gw, ALICE).decide(request.id, true, None).await.unwrap();
    assert_eq!(decided.state, RequestState::Approved);

    let out = psql.await.unwrap();
    assert_eq!(harness::stdout_ok(&out), "DELETE 2\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "NOTICE:  held for approval: request {}, expires in 10m, approvers: engineering, analytics",
            request.id
        )),
        "{stderr}"
    );
    // The detail names the rule once, with its reason.
    assert!(
        stderr.contains(
            "DETAIL:  statement needs approval under rule \"two-eyes-for-orders\": \
             orders change only with a second pair of eyes\n"
        ),
        "{stderr}"
    );
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 3);
    // Deciding again is a conflict that says how it ended.
    let err = api(&gw, AGENT).decide(request.id, false, None).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("it was approved"), "{err}");

    // The trail tells the story in order.
    gw.shutdown.cancel();
    gw.finished().await;
    let store = SqliteStore::open_read_only(&gw.audit.path).unwrap();
    let story: Vec<String> = store
        .events(&EventFilter::default())
        .unwrap()
        .into_iter()
        .filter(|e| e.event.identity.as_deref() == Some("bob"))
        .map(|e| match e.event.detail {
            Detail::Statement { decision, .. } => format!("statement {decision}"),
            Detail::ApprovalDecided { decision, by, .. } => format!("{decision} by {by}"),
            other => other.kind().to_string(),
        })
        .collect();
    assert_eq!(
        story,
        [
            "session_opened",
            "statement require_approval",
            "approval_requested",
            "approved by alice",
            "statement allow",
            "statement_done",
            "session_closed"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_expiry_and_cancellation_refuse_with_the_reason() {
    let gw = start("approval_refusals").await;
    let bob = gw.connect(BOB).await.unwrap();

    // Denied, with a reason.
    let held = {
        let bob = gw.connect(BOB).await.unwrap();
        tokio::spawn(async move { bob.simple_query("DELETE FROM orders").await })
    };
    let request = pending(&gw).await;
    api(&gw, ALICE)
        .decide(request.id, false, Some("not during the sale"))
        .await
        .unwrap();
    let err = held.await.unwrap().unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42501");
    assert_eq!(
        db.message(),
        format!(
            "statement refused: approval request {} was denied by alice: not during the sale",
            request.id
        )
    );
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 5);

    // Nobody decides: it expires (this rule waits one second).
    let err = bob.simple_query("DELETE FROM urgent").await.unwrap_err();
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(message.contains("expired after 1s with no decision"), "{message}");
    let expired = api(&gw, BOB).approvals().await.unwrap();
    assert!(
        expired
            .iter()
            .any(|r| r.rule == "quick-decisions" && r.state == RequestState::Expired)
    );

    // The client cancels (psql's ctrl-c sends a CancelRequest).
    let cancel = bob.cancel_token();
    let held = tokio::spawn(async move { bob.simple_query("DELETE FROM orders WHERE id = 1").await });
    let request = pending(&gw).await;
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = held.await.unwrap().unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "57014");
    let view = api(&gw, BOB).approval(request.id).await.unwrap();
    assert_eq!(view.state, RequestState::Cancelled);
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 5);
}

/// `unknown = "require_approval"` (the default) holds what the gateway
/// cannot read only under a rule that names approvers; without one it is
/// refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_statement_is_held_under_a_rule_that_names_approvers() {
    let gw = start("approval_unreadable").await;
    let conn = gw.conn_str("agent", AGENT, "");
    let psql = tokio::spawn(async move { harness::psql(&conn, &["-c", "SELEC 1"], None).await });
    let request = pending(&gw).await;
    assert_eq!(request.rule, "unreadable-is-reviewed");
    assert_eq!(request.statement, "SELEC 1");
    api(&gw, ALICE).decide(request.id, true, None).await.unwrap();
    // Approved, it reaches PostgreSQL, which has its own say.
    let out = psql.await.unwrap();
    let stderr = harness::stderr(&out);
    assert!(
        stderr.contains(
            "DETAIL:  statement needs approval under rule \"unreadable-is-reviewed\": the gateway cannot read it\n"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("ERROR:  syntax error at or near \"SELEC\""), "{stderr}");

    // No such rule applies to bob: refused, and told why.
    let bob = gw.connect(BOB).await.unwrap();
    let err = bob.simple_query("SELEC 1").await.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42501");
    assert!(
        db.message()
            .ends_with("and no policy rule that applies to you holds such statements for approval"),
        "{}",
        db.message()
    );
    assert_eq!(api(&gw, ALICE).approvals().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_approvals_from_two_approvers() {
    let gw = start("approval_two").await;
    let bob = gw.connect(BOB).await.unwrap();
    let held = tokio::spawn(async move { bob.simple_query("UPDATE payments SET id = 2").await });
    let request = pending(&gw).await;
    assert_eq!(request.needed, 2);
    let view = api(&gw, ALICE).decide(request.id, true, None).await.unwrap();
    assert_eq!((view.state, view.approvals.len()), (RequestState::Pending, 1));
    // The same approver twice is still one approval.
    let view = api(&gw, ALICE).decide(request.id, true, None).await.unwrap();
    assert_eq!(view.approvals.len(), 1);
    assert_eq!(harness::count_rows(&gw.db, "payments WHERE id = 2").await, 0);
    let view = api(&gw, AGENT).decide(request.id, true, None).await.unwrap();
    assert_eq!(view.state, RequestState::Approved);
    held.await.unwrap().unwrap();
    assert_eq!(harness::count_rows(&gw.db, "payments WHERE id = 2").await, 1);
}

/// `refuse_and_retry`: refused with a request id; once approved, exactly the
/// same statement from the same identity runs once, as a simple query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_and_retry_runs_the_approved_statement_once() {
    let gw = start("approval_retry").await;
    let bob = gw.connect(BOB).await.unwrap();
    let statement = "DELETE FROM reports WHERE id = 1";
    let refused = |err: tokio_postgres::Error| {
        let db = err.as_db_error().unwrap().clone();
        assert_eq!(db.code().code(), "42501", "{db:?}");
        db
    };
    let first = refused(bob.simple_query(statement).await.unwrap_err());
    let id: u64 = first
        .message()
        .rsplit("approval request ")
        .next()
        .and_then(|rest| rest.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("{first:?}"));
    assert!(
        first.hint().unwrap().contains("send exactly the same statement again"),
        "{first:?}"
    );
    // Sending it again before the decision opens no second request.
    let again = refused(bob.simple_query(statement).await.unwrap_err());
    assert!(
        again.message().ends_with(&format!("(approval request {id})")),
        "{again:?}"
    );
    assert_eq!(api(&gw, BOB).approvals().await.unwrap().len(), 1);

    api(&gw, ALICE).decide(id, true, None).await.unwrap();
    // Another statement is not approved by it.
    refused(bob.simple_query("DELETE FROM reports WHERE id = 2").await.unwrap_err());
    // A prepared statement does not use the approval (it could run any
    // number of times); the simple query runs, once.
    refused(bob.execute(statement, &[]).await.unwrap_err());
    let ran = bob.simple_query(statement).await.unwrap();
    assert!(
        ran.iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(1)))
    );
    refused(bob.simple_query(statement).await.unwrap_err());
    assert_eq!(harness::count_rows(&gw.db, "reports").await, 2);
}

/// A `refuse_and_retry` statement the server skips (an earlier message of
/// its batch failed) never ran: its approval is not used up, and the
/// statement still runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_retry_the_server_skips_keeps_its_approval() {
    use crate::harness::raw::{self, RawClient, tags};
    let gw = start("approval_retry_skipped").await;
    let statement = "DELETE FROM reports WHERE id = 1";
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, BOB).await;
    client.send(&raw::query(statement)).await;
    let refused = raw::first_error(&client.until_ready().await);
    assert_eq!(refused[&'C'], "42501", "{refused:?}");
    let request = pending(&gw).await;
    api(&gw, ALICE).decide(request.id, true, None).await.unwrap();

    client
        .send(&[raw::failing(), raw::query(statement), raw::sync()].concat())
        .await;
    let answer = client.until_ready().await;
    assert_eq!(tags(&answer), "1EZ", "{answer:?}");
    assert_eq!(raw::first_error(&answer)[&'C'], "22012", "{answer:?}");
    assert_eq!(harness::count_rows(&gw.db, "reports").await, 3);

    client.send(&raw::query(statement)).await;
    let ran = client.until_ready().await;
    assert_eq!(tags(&ran), "CZ", "{ran:?}");
    assert_eq!(harness::count_rows(&gw.db, "reports").await, 2);
    // Once.
    client.send(&raw::query(statement)).await;
    let again = raw::first_error(&client.until_ready().await);
    assert_eq!(again[&'C'], "42501", "{again:?}");
}

/// An approved statement changes what the gate knows of the session like an
/// allowed one would: after an approved `SET search_path`, unqualified
/// names no longer count as `public` for allow rules (found in review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_search_path_change_reaches_the_gate() {
    let policy = r#"[policy]
default = "deny"

[[policy.rules]]
name = "read-public"
decision = "allow"
groups = ["*"]
kinds = ["read", "session", "transaction", "utility"]
relations = ["public.*"]

[[policy.rules]]
name = "path-changes-need-approval"
decision = "require_approval"
groups = ["oncall"]
features = ["search_path"]
approvers = ["engineering"]
"#;
    let spec = Spec {
        policy: Some(policy.into()),
        extra: API.into(),
        ..Spec::default()
    };
    let gw = TestGateway::start("approval_search_path", spec).await;
    harness::setup(
        &gw.db,
        "CREATE TABLE orders (id int); CREATE SCHEMA other; CREATE TABLE other.orders (id int)",
    )
    .await;
    let bob = gw.connect(BOB).await.unwrap();
    bob.simple_query("SELECT * FROM orders").await.unwrap();
    let set = {
        let bob = gw.connect(BOB).await.unwrap();
        let request = tokio::spawn(async move {
            bob.simple_query("SET search_path = other").await.unwrap();
            bob.simple_query("SELECT * FROM orders").await
        });
        let pending = pending(&gw).await;
        api(&gw, ALICE).decide(pending.id, true, None).await.unwrap();
        request.await.unwrap()
    };
    let err = set.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501", "{err}");
    // The first session never changed its path.
    bob.simple_query("SELECT * FROM orders").await.unwrap();
}

/// `sluice request`: a time-bound grant, approved by someone else, lifts a
/// rule for its holder (in sessions already open, too) until it expires;
/// asking is checked like deciding is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_grant_lifts_a_rule_until_it_expires() {
    use sluice_core::api::AccessRequestBody;
    let gw = start("approval_access").await;
    let bob = gw.connect(BOB).await.unwrap();
    let err = bob.simple_query("DELETE FROM ledger WHERE id = 1").await.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42501");
    assert!(db.message().contains("the ledger is read-only"), "{db:?}");
    assert_eq!(
        db.hint(),
        Some(
            format!(
                "grant \"ledger-writer\" lifts this rule; ask for it with: sluice request --target {} --grant ledger-writer --for 30m --reason \"...\"",
                gw.db
            )
            .as_str()
        )
    );

    // Asking is checked: who may, for how long, and why.
    let ask = |grant: &str, duration: &str, reason: &str| AccessRequestBody {
        target: gw.db.clone(),
        grant: grant.into(),
        duration: duration.into(),
        reason: reason.into(),
    };
    let refused = |result: Result<RequestView, sluice_core::api::client::ClientError>| {
        let err = result.unwrap_err();
        (err.status().unwrap(), err.to_string())
    };
    let (status, message) = refused(api(&gw, ALICE).request_access(&ask("ledger-writer", "5m", "fix")).await);
    assert_eq!(status, 403, "{message}");
    assert!(
        message.contains("alice may not ask for grant \"ledger-writer\""),
        "{message}"
    );
    let (status, message) = refused(api(&gw, BOB).request_access(&ask("ledger-writer", "2h", "fix")).await);
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("from 1s up to 1h"), "{message}");
    let (status, message) = refused(api(&gw, BOB).request_access(&ask("ledger-writer", "5m", " ")).await);
    assert_eq!(status, 400, "{message}");
    let (status, message) = refused(api(&gw, BOB).request_access(&ask("root", "5m", "fix")).await);
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("grants that can be requested: ledger-writer"),
        "{message}"
    );
    let (status, _) = refused(
        ApiClient::new(gw.api.as_deref().unwrap(), None)
            .request_access(&ask("ledger-writer", "5m", "fix"))
            .await,
    );
    assert_eq!(status, 401);

    // The CLI asks and waits; someone else approves.
    let cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "request",
            "--grant",
            "ledger-writer",
            "--for",
            "10s",
            "--reason",
            "fix row 1",
        ])
        .args(["--target", &gw.db, "--api", gw.api.as_deref().unwrap()])
        .env("SLUICE_TOKEN", BOB)
        .kill_on_drop(true)
        .output();
    let cli = tokio::spawn(cli);
    let request = pending(&gw).await;
    assert_eq!(request.access.as_ref().unwrap().grant, "ledger-writer");
    assert_eq!(request.access.as_ref().unwrap().seconds, 10);
    assert_eq!(
        (request.requester.as_str(), request.rule.as_str()),
        ("bob", "ledger-writer")
    );
    // Asking again returns the pending request instead of a second one.
    let again = api(&gw, BOB)
        .request_access(&ask("ledger-writer", "10s", "again"))
        .await
        .unwrap();
    assert_eq!(again.id, request.id);
    let err = api(&gw, BOB).decide(request.id, true, None).await.unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    let approved = api(&gw, ALICE).decide(request.id, true, None).await.unwrap();
    assert!(approved.access.as_ref().unwrap().until.is_some());
    let out = cli.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains(&format!("access request {}: grant \"ledger-writer\"", request.id)),
        "{stdout}"
    );
    assert!(
        stdout.contains("approved by alice: grant \"ledger-writer\" holds on"),
        "{stdout}"
    );

    // The session opened before the grant uses it now.
    let grants = api(&gw, BOB).grants().await.unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!((grants[0].identity.as_str(), grants[0].request), ("bob", request.id));
    bob.simple_query("DELETE FROM ledger WHERE id = 1").await.unwrap();
    assert_eq!(harness::count_rows(&gw.db, "ledger").await, 2);
    // Statements prepared under the grant, at both levels; and one the
    // grant made no difference to.
    let prepared = bob.prepare("DELETE FROM ledger WHERE id = $1").await.unwrap();
    let harmless = bob.prepare("SELECT count(*) FROM ledger").await.unwrap();
    bob.simple_query("PREPARE wipe(int) AS DELETE FROM ledger WHERE id = $1")
        .await
        .unwrap();
    // ... and a portal bound under it, inside a transaction, to be run later.
    let mut raw_bob = crate::harness::raw::RawClient::connect(gw.addr).await;
    raw_bob.login(&gw.db, BOB).await;
    raw_bob.simple("BEGIN").await;
    raw_bob
        .simple("PREPARE sqlwipe AS DELETE FROM ledger WHERE id = 3")
        .await;
    {
        use crate::harness::raw;
        raw_bob
            .send(
                &[
                    raw::parse("d", "DELETE FROM ledger WHERE id = 3"),
                    raw::bind("p5", "d"),
                    raw::sync(),
                ]
                .concat(),
            )
            .await;
        assert_eq!(raw::tags(&raw_bob.until_ready().await), "12Z");
    }
    // Only for its holder.
    let agent = gw.connect(AGENT).await.unwrap();
    agent.simple_query("DELETE FROM ledger WHERE id = 2").await.unwrap_err();

    // It expires on its own, and says so.
    let mut ended = false;
    for _ in 0..300 {
        if api(&gw, BOB).grants().await.unwrap().is_empty() {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ended, "the grant did not expire");
    let err = bob.simple_query("DELETE FROM ledger WHERE id = 2").await.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501");
    // What was prepared under it does not outlive it either.
    let err = bob.execute(&prepared, &[&2i32]).await.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42501");
    assert_eq!(
        db.message(),
        "statement refused: it was prepared while you held grant \"ledger-writer\", which has ended"
    );
    let err = bob.simple_query("EXECUTE wipe(2)").await.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert!(
        db.message().contains("wipe was prepared while you held grant"),
        "{db:?}"
    );
    // What the grant did not matter to still runs, unnamed portals included.
    bob.query_one(&harmless, &[]).await.unwrap();
    bob.query("SELECT 1::int", &[]).await.unwrap();
    // Nor can messages the server never carries out wipe that: a PREPARE of
    // the name in use (it fails), a DEALLOCATE after an error in its string.
    bob.simple_query("PREPARE wipe AS SELECT 1").await.unwrap_err();
    bob.simple_query("SELECT 1/0; DEALLOCATE wipe").await.unwrap_err();
    bob.simple_query("EXECUTE wipe(2)").await.unwrap_err();
    // The portal bound under the grant does not run after it either.
    {
        use crate::harness::raw;
        raw_bob.send(&[raw::execute("p5", 0), raw::sync()].concat()).await;
        let answer = raw_bob.until_ready().await;
        let error = raw::first_error(&answer);
        assert!(error[&'M'].contains("which has ended"), "{error:?}");
        raw_bob.simple("ROLLBACK").await;
        // A Bind refused in place leaves the portal of its name as it was:
        // run after a savepoint rolled back, that portal is on the record.
        raw_bob.simple("BEGIN").await;
        raw_bob
            .send(
                &[
                    raw::parse("c", "SELECT count(*) AS kept FROM ledger"),
                    raw::bind("k", "c"),
                    raw::sync(),
                ]
                .concat(),
            )
            .await;
        assert_eq!(raw::tags(&raw_bob.until_ready().await), "12Z");
        raw_bob.simple("SAVEPOINT s").await;
        raw_bob.send(&[raw::bind("k", "d"), raw::sync()].concat()).await;
        let error = raw::first_error(&raw_bob.until_ready().await);
        assert!(error[&'M'].contains("which has ended"), "{error:?}");
        raw_bob.simple("ROLLBACK TO s").await;
        raw_bob.send(&[raw::execute("k", 0), raw::sync()].concat()).await;
        assert_eq!(raw::tags(&raw_bob.until_ready().await), "DCZ");
        raw_bob.simple("ROLLBACK").await;
        // The two levels share one namespace: neither runs the other's
        // statement past its grant.
        raw_bob
            .send(&[raw::bind("", "sqlwipe"), raw::execute("", 0), raw::sync()].concat())
            .await;
        let error = raw::first_error(&raw_bob.until_ready().await);
        assert!(error[&'M'].contains("which has ended"), "{error:?}");
        raw_bob.send(&raw::query("EXECUTE d")).await;
        let error = raw::first_error(&raw_bob.until_ready().await);
        assert!(error[&'M'].contains("which has ended"), "{error:?}");
    }
    // The session is fine: it prepares again, and policy decides afresh.
    let err = bob.prepare("DELETE FROM ledger WHERE id = $1").await.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501");
    bob.simple_query("SELECT 1").await.unwrap();
    assert_eq!(harness::count_rows(&gw.db, "ledger").await, 2);
    let view = api(&gw, BOB).approval(request.id).await.unwrap();
    assert_eq!(view.access.unwrap().ended.as_deref(), Some("expired"));

    // On the record: asked, approved, granted, ended.
    let read = || {
        let path = gw.audit.path.clone();
        tokio::task::spawn_blocking(move || {
            let store = SqliteStore::open_read_only(&path).unwrap();
            store
                .events(&EventFilter::default())
                .unwrap()
                .into_iter()
                .filter_map(|e| match e.event.detail {
                    Detail::ApprovalRequested { access: Some(a), .. } => Some(format!("requested {}", a.grant)),
                    Detail::ApprovalDecided { decision, by, .. } => Some(format!("{decision} by {by}")),
                    Detail::AccessGranted { grant, .. } => Some(format!("granted {grant}")),
                    Detail::AccessEnded { grant, reason, .. } => Some(format!("{grant} {reason}")),
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
    };
    // The end is recorded as it happens; the writer commits it a moment later.
    let mut kinds = read().await.unwrap();
    for _ in 0..200 {
        if kinds.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        kinds = read().await.unwrap();
    }
    assert_eq!(
        kinds,
        [
            "requested ledger-writer",
            "approved by alice",
            "granted ledger-writer",
            "ledger-writer expired"
        ]
    );
    // So is the Execute of the portal bound under it, refused at its end,
    // and that of the portal kept past the refused Bind, which ran.
    let executes = || {
        let path = gw.audit.path.clone();
        tokio::task::spawn_blocking(move || {
            let store = SqliteStore::open_read_only(&path).unwrap();
            let mut events = Vec::new();
            for event in store.events(&EventFilter::default()).unwrap() {
                event.expand(&mut events);
            }
            events
                .into_iter()
                .filter_map(|e| match e.event.detail {
                    Detail::Statement {
                        source,
                        text,
                        decision,
                        refusal,
                        ..
                    } if source == "execute" => Some((text, decision, refusal.unwrap_or_default())),
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
    };
    let kept = |executed: &[(String, String, String)]| -> Vec<(String, String)> {
        executed
            .iter()
            .filter(|(text, _, _)| text.contains("AS kept"))
            .map(|(text, decision, _)| (text.clone(), decision.clone()))
            .collect()
    };
    let mut executed = executes().await.unwrap();
    for _ in 0..200 {
        if executed.iter().any(|(_, decision, _)| decision == "deny") && !kept(&executed).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        executed = executes().await.unwrap();
    }
    let refused: Vec<&(String, String, String)> = executed.iter().filter(|(_, d, _)| d == "deny").collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, "DELETE FROM ledger WHERE id = 3");
    assert!(refused[0].2.contains("which has ended"), "{refused:?}");
    assert_eq!(
        kept(&executed),
        [("SELECT count(*) AS kept FROM ledger".to_string(), "allow".to_string())]
    );
}

/// An approved grant survives a restart of the gateway; one appended to the
/// trail by someone who can write its file (after the last signed head) is
/// not restored, and ends on the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_grants_survive_a_restart_and_forged_ones_do_not() {
    use sluice_core::api::AccessRequestBody;
    use sluice_core::audit::{AccessAsk, AuditStore as _, Event};

    let db = harness::database("approval_restart").await;
    harness::setup(
        &db,
        "CREATE TABLE ledger (id int); INSERT INTO ledger SELECT generate_series(1, 3)",
    )
    .await;
    let dir = harness::cluster().dev.dir().to_path_buf();
    let config_path = dir.join(format!("{db}.toml"));
    let spec = Spec {
        policy: Some(POLICY.into()),
        extra: API.into(),
        ..Spec::default()
    };
    let text = harness::config_text(&spec, &db);
    std::fs::write(&config_path, &text).unwrap();
    let audit = sluice_core::Config::from_toml(&text, &config_path).unwrap().audit;
    let serve = || async {
        let (child, mut lines, port, api) = harness::serve_binary_with_api(&config_path).await;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        (child, port, api.expect("the control API is on"))
    };
    let stop = |mut child: tokio::process::Child| async move {
        // SAFETY: SIGTERM to our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) }, 0);
        child.wait().await.unwrap();
    };
    let delete = |port: u16, id: i32| {
        let db = db.clone();
        async move {
            let (client, connection) = tokio_postgres::connect(
                &format!("host=127.0.0.1 port={port} dbname={db} user=bob password={BOB}"),
                tokio_postgres::NoTls,
            )
            .await
            .unwrap();
            tokio::spawn(connection);
            client
                .simple_query(&format!("DELETE FROM ledger WHERE id = {id}"))
                .await
                .map(|_| ())
        }
    };

    let (gateway, port, api_url) = serve().await;
    let asked = ApiClient::new(&api_url, Some(BOB))
        .request_access(&AccessRequestBody {
            target: db.clone(),
            grant: "ledger-writer".into(),
            duration: "1h".into(),
            reason: "close the books".into(),
        })
        .await
        .unwrap();
    ApiClient::new(&api_url, Some(ALICE))
        .decide(asked.id, true, None)
        .await
        .unwrap();
    delete(port, 1).await.unwrap();
    stop(gateway).await;

    // Someone with write access to the trail appends a grant for the agent,
    // chained correctly but after the last signed head.
    {
        let mut store = SqliteStore::open(&audit.path, audit.sync).unwrap();
        let forged = |detail| Event::now(detail).by("agent", &db);
        store
            .append(&[
                forged(Detail::ApprovalRequested {
                    request: 900,
                    rule: "ledger-writer".into(),
                    statement: String::new(),
                    approvers: vec!["engineering".into()],
                    needed: 1,
                    expires: "2030-01-01T00:00:00Z".into(),
                    access: Some(AccessAsk {
                        grant: "ledger-writer".into(),
                        seconds: 3600,
                    }),
                }),
                forged(Detail::ApprovalDecided {
                    request: 900,
                    decision: "approved".into(),
                    by: "alice".into(),
                    reason: None,
                    via: "api".into(),
                    delegate: None,
                    chat_user: None,
                }),
                forged(Detail::AccessGranted {
                    request: 900,
                    grant: "ledger-writer".into(),
                    subject: "agent".into(),
                    until: (chrono::Utc::now() + chrono::Duration::minutes(30)).to_rfc3339(),
                }),
            ])
            .unwrap();
    }

    let (gateway, port, api_url) = serve().await;
    let grants = ApiClient::new(&api_url, Some(BOB)).grants().await.unwrap();
    let held: Vec<(u64, &str)> = grants.iter().map(|g| (g.request, g.identity.as_str())).collect();
    assert_eq!(
        held,
        [(asked.id, "bob")],
        "the approved grant holds, the forged one does not"
    );
    delete(port, 2).await.unwrap();
    // Its holder ends it early; then it is gone.
    let revoked = ApiClient::new(&api_url, Some(BOB))
        .revoke_grant(asked.id, Some("done"))
        .await
        .unwrap();
    assert_eq!(revoked.request, asked.id);
    let again = ApiClient::new(&api_url, Some(BOB)).revoke_grant(asked.id, None).await;
    assert_eq!(again.unwrap_err().status(), Some(404));
    delete(port, 3).await.unwrap_err();
    stop(gateway).await;
    assert_eq!(harness::count_rows(&db, "ledger").await, 1);

    let store = SqliteStore::open_read_only(&audit.path).unwrap();
    let ended: Vec<(u64, String)> = store
        .events(&EventFilter::default())
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event.detail {
            Detail::AccessEnded { request, reason, .. } => Some((request, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert_eq!(ended[0].0, 900);
    assert!(ended[0].1.contains("no signed head covers it"), "{ended:?}");
    assert_eq!(ended[1], (asked.id, "revoked by bob: done".to_string()));
}

/// The extended protocol (JDBC, psycopg, tokio-postgres) is held too: the
/// statement is prepared, and each execution's Bind waits for approvers,
/// with its parameter values on the request; what the client pipelined
/// behind it waits too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_are_held_at_each_execution() {
    let gw = start("approval_extended").await;
    let bob = std::sync::Arc::new(gw.connect(BOB).await.unwrap());
    let run = |statement: tokio_postgres::Statement, id: i32| {
        let bob = bob.clone();
        tokio::spawn(async move { bob.execute(&statement, &[&id]).await })
    };

    // An SQL-level PREPARE would let one approval run it any number of
    // times: refused, saying what to do instead.
    let err = bob
        .simple_query("PREPARE w AS DELETE FROM orders WHERE id = 7")
        .await
        .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42501");
    assert!(db.hint().unwrap().contains("send the statement itself"), "{db:?}");

    // Preparing needs nothing; executing does.
    let statement = bob.prepare("DELETE FROM orders WHERE id = $1").await.unwrap();
    let held = run(statement.clone(), 1);
    let request = pending(&gw).await;
    assert_eq!(
        request.statement,
        "DELETE FROM orders WHERE id = $1\n-- parameters: $1 = (binary 0x00000001)"
    );
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 5, "nothing ran while held");
    api(&gw, ALICE).decide(request.id, true, None).await.unwrap();
    assert_eq!(held.await.unwrap().unwrap(), 1);
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 4);

    // The next execution asks again.
    let held = run(statement.clone(), 2);
    let request = pending(&gw).await;
    assert!(request.statement.ends_with("$1 = (binary 0x00000002)"), "{request:?}");
    api(&gw, ALICE)
        .decide(request.id, false, Some("not this one"))
        .await
        .unwrap();
    let err = held.await.unwrap().unwrap_err();
    assert_eq!(
        err.as_db_error().unwrap().message(),
        format!(
            "statement refused: approval request {} was denied by alice: not this one",
            request.id
        )
    );
    // The session is in a good state afterwards.
    bob.simple_query("SELECT 1").await.unwrap();
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 4);

    // Text parameters are shown with the detectors' findings masked.
    let update = bob
        .prepare_typed(
            "UPDATE orders SET id = id WHERE id = $1 OR $2 <> ''",
            &[tokio_postgres::types::Type::INT4, tokio_postgres::types::Type::TEXT],
        )
        .await
        .unwrap();
    let held = {
        let bob = bob.clone();
        tokio::spawn(async move { bob.execute(&update, &[&3i32, &"4111111111111111"]).await })
    };
    let request = pending(&gw).await;
    assert!(!request.statement.contains("4111111111111111"), "{request:?}");
    api(&gw, ALICE).decide(request.id, true, None).await.unwrap();
    held.await.unwrap().unwrap();

    // On the record: each approved Bind and its Execute; the denied Bind as
    // refused, and no Execute for it (the server skipped it).
    let session = request.session.clone();
    let path = gw.audit.path.clone();
    let read = move || {
        let store = SqliteStore::open_read_only(&path).unwrap();
        store
            .events(&EventFilter {
                session: Some(session.clone()),
                ..EventFilter::default()
            })
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.event.detail {
                Detail::Statement { source, decision, .. } if source == "bind" || source == "execute" => {
                    Some(format!("{source} {decision}"))
                }
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let mut seen = Vec::new();
    for _ in 0..200 {
        seen = tokio::task::spawn_blocking(read.clone()).await.unwrap();
        if seen.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        seen,
        [
            "bind allow",
            "execute allow",
            "bind deny",
            "bind allow",
            "execute allow"
        ]
    );
}

/// What the gateway remembers about a prepared statement (that it needs
/// approval, the grants it was allowed under) cannot be wiped by messages
/// the server never carries out: a second Parse of the same name (which
/// PostgreSQL rejects) or a Close skipped after an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_parses_and_skipped_closes_do_not_wipe_what_a_statement_needs() {
    use crate::harness::raw::{self, RawClient};
    let gw = start("approval_remembered").await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, BOB).await;
    let close = |name: &str| raw::close(b'S', name);
    client
        .send(&[raw::parse("s", "DELETE FROM orders WHERE id = 1"), raw::sync()].concat())
        .await;
    assert_eq!(raw::tags(&client.until_ready().await), "1Z");
    // A Parse of the same name, which the server rejects ...
    client.send(&[raw::parse("s", "SELECT 1"), raw::sync()].concat()).await;
    assert_eq!(raw::tags(&client.until_ready().await), "EZ");
    // ... and a Close the server skips after an error in the same batch.
    client
        .send(&[raw::parse("", "SELEC broken"), close("s"), raw::sync()].concat())
        .await;
    assert_eq!(raw::tags(&client.until_ready().await), "EZ");
    // Executing "s" still waits for approval, with its own text.
    client
        .send(&[raw::bind("", "s"), raw::execute("", 0), raw::sync()].concat())
        .await;
    let request = pending(&gw).await;
    assert_eq!(request.statement, "DELETE FROM orders WHERE id = 1");
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 5);
    api(&gw, ALICE).decide(request.id, false, None).await.unwrap();
    let answer = client.until_ready().await;
    let error = raw::first_error(&answer);
    assert!(error[&'M'].contains("was denied by alice"), "{error:?}");
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 5);
}

/// A client that prepares the name of a statement that needs approval over
/// and over (the server rejects each Parse after the first: the name is
/// taken) is refused after a while, and the refusal is on the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_prepared_over_and_over_is_refused_on_the_record() {
    use crate::harness::raw::{self, RawClient};
    let mut gw = start("approval_parse_flood").await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, BOB).await;
    let mut refused = None;
    for attempt in 1..=20 {
        client
            .send(&[raw::parse("s", "DELETE FROM orders WHERE id = 1"), raw::sync()].concat())
            .await;
        let answer = client.until_ready().await;
        if attempt > 1 {
            let message = raw::first_error(&answer)[&'M'].clone();
            if message.contains("prepared too many times") {
                refused = Some(attempt);
                break;
            }
            assert!(message.contains("already exists"), "{message}");
        }
    }
    assert_eq!(refused, Some(17));
    // A Parse of the name that policy refuses adds nothing to remember: it
    // is refused for what it is.
    client
        .send(&[raw::parse("s", "DELETE FROM ledger WHERE id = 1"), raw::sync()].concat())
        .await;
    let answer = client.until_ready().await;
    assert!(
        raw::first_error(&answer)[&'M'].contains("the ledger is read-only"),
        "{answer:?}"
    );
    drop(client);
    gw.shutdown.cancel();
    gw.finished().await;
    let store = SqliteStore::open_read_only(&gw.audit.path).unwrap();
    let mut events = Vec::new();
    for event in store.events(&EventFilter::default()).unwrap() {
        event.expand(&mut events);
    }
    let recorded: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event.detail {
            Detail::Statement {
                source,
                text,
                decision,
                refusal,
                ..
            } => Some((source.as_str(), text.as_str(), decision.as_str(), refusal.as_deref())),
            Detail::SessionClosed {
                statements, refused, ..
            } => {
                assert_eq!((*statements, *refused), (2, 2), "{events:#?}");
                None
            }
            _ => None,
        })
        .collect();
    assert_eq!(recorded.len(), 2, "{recorded:#?}");
    assert_eq!(
        recorded[0],
        (
            "parse",
            "DELETE FROM orders WHERE id = 1",
            "deny",
            Some("statement refused: prepared statement \"s\" was prepared too many times without being closed")
        )
    );
    assert_eq!(
        (recorded[1].0, recorded[1].1, recorded[1].2),
        ("parse", "DELETE FROM ledger WHERE id = 1", "deny")
    );
}

/// Statement after statement through the unnamed statement (what JDBC,
/// psycopg and pgx do), each held on its own; and SQL EXECUTE cannot run
/// what the protocol prepared for approval (found in review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_is_held_each_time_and_sql_execute_cannot_skip_it() {
    use crate::harness::raw::{self, RawClient};
    let gw = start("approval_unnamed").await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, BOB).await;
    let run = |sql: &str| raw::unnamed(sql, 0);
    client.send(&run("DELETE FROM orders WHERE id = 1")).await;
    let request = pending(&gw).await;
    assert_eq!(request.statement, "DELETE FROM orders WHERE id = 1");
    api(&gw, ALICE).decide(request.id, true, None).await.unwrap();
    let tags = raw::tags(&client.until_ready().await);
    assert!(!tags.contains('E') && tags.ends_with("2CZ"), "{tags}");
    client.send(&run("DELETE FROM orders WHERE id = 2")).await;
    let request = pending(&gw).await;
    assert_eq!(request.statement, "DELETE FROM orders WHERE id = 2");
    api(&gw, ALICE).decide(request.id, false, None).await.unwrap();
    let error = raw::first_error(&client.until_ready().await);
    assert!(error[&'M'].contains("was denied by alice"), "{error:?}");
    // A statement that needs nothing runs at once.
    client.send(&run("SELECT 1")).await;
    assert_eq!(raw::tags(&client.until_ready().await), "12DCZ");
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 4);

    // Prepared for approval through the protocol, EXECUTEd through SQL.
    client
        .send(&[raw::parse("s", "DELETE FROM orders WHERE id > 3"), raw::sync()].concat())
        .await;
    assert_eq!(raw::tags(&client.until_ready().await), "1Z");
    for sql in ["EXECUTE s", "EXPLAIN ANALYZE EXECUTE s"] {
        client.send(&raw::query(sql)).await;
        let error = raw::first_error(&client.until_ready().await);
        assert_eq!(error[&'C'], "42501", "{sql}: {error:?}");
    }
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 4);
}

/// A statement the protocol prepares can run another through SQL EXECUTE
/// at each of its Binds, where nothing is decided: it may not run one that
/// needs approval or a grant, whichever of the two was prepared first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_execute_prepared_by_the_protocol_skips_no_approval_or_grant() {
    use crate::harness::raw::{self, RawClient};
    use sluice_core::api::AccessRequestBody;
    let gw = start("approval_execute_order").await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, BOB).await;
    let prepare = raw::prepare;
    let run = |name: &str| raw::run(name, 0);

    // `EXECUTE s` first, then `s` as a statement that needs approval.
    client.send(&prepare("x", "EXECUTE s")).await;
    assert_eq!(raw::tags(&client.until_ready().await), "1Z");
    client.send(&prepare("s", "DELETE FROM orders WHERE id > 3")).await;
    let error = raw::first_error(&client.until_ready().await);
    assert_eq!(error[&'C'], "42501", "{error:?}");
    assert!(error[&'M'].contains("this session prepared earlier"), "{error:?}");
    client.send(&run("x")).await;
    let error = raw::first_error(&client.until_ready().await);
    assert_eq!(error[&'C'], "26000", "s was never prepared: {error:?}");
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 5);

    // Under a grant: `EXECUTE g` prepared after `g` is bound to g's
    // grants, whether SQL's PREPARE or the protocol's Parse prepared g;
    // one prepared before (`y` runs `x2`, a second session's `early` runs
    // EXECUTE inside EXPLAIN, of any name) keeps what it runs from being
    // prepared under a grant.
    client.send(&prepare("y", "EXECUTE x2")).await;
    assert_eq!(raw::tags(&client.until_ready().await), "1Z");
    let mut second = RawClient::connect(gw.addr).await;
    second.login(&gw.db, BOB).await;
    second.send(&prepare("early", "EXPLAIN ANALYZE EXECUTE k")).await;
    assert_eq!(raw::tags(&second.until_ready().await), "1Z");
    let asked = api(&gw, BOB)
        .request_access(&AccessRequestBody {
            target: gw.db.clone(),
            grant: "ledger-writer".into(),
            duration: "1h".into(),
            reason: "ledger fix".into(),
        })
        .await
        .unwrap();
    api(&gw, ALICE).decide(asked.id, true, None).await.unwrap();
    client
        .send(&raw::query("PREPARE g AS DELETE FROM ledger WHERE id = 1"))
        .await;
    assert_eq!(raw::tags(&client.until_ready().await), "CZ");
    client.send(&prepare("h", "DELETE FROM ledger WHERE id = 2")).await;
    assert_eq!(raw::tags(&client.until_ready().await), "1Z");
    client.send(&prepare("xg", "EXECUTE g")).await;
    assert_eq!(raw::tags(&client.until_ready().await), "1Z");
    // A session with only SQL's PREPARE under the grant.
    let mut third = RawClient::connect(gw.addr).await;
    third.login(&gw.db, BOB).await;
    third.simple("PREPARE g AS DELETE FROM ledger WHERE id = 1").await;
    client.send(&prepare("x2", "EXECUTE g")).await;
    let error = raw::first_error(&client.until_ready().await);
    assert!(error[&'M'].contains("\"x2\" would need a grant"), "{error:?}");
    client.send(&prepare("xh", "EXPLAIN ANALYZE EXECUTE h")).await;
    assert_eq!(raw::tags(&client.until_ready().await), "1Z");
    second
        .send(&raw::query("PREPARE k AS DELETE FROM ledger WHERE id = 3"))
        .await;
    let error = raw::first_error(&second.until_ready().await);
    assert!(error[&'M'].contains("does not name"), "{error:?}");
    api(&gw, BOB).revoke_grant(asked.id, None).await.unwrap();
    for name in ["xg", "xh"] {
        client.send(&run(name)).await;
        let error = raw::first_error(&client.until_ready().await);
        assert!(error[&'M'].contains("which has ended"), "{name}: {error:?}");
    }
    // SQL's own EXECUTE, plain or inside EXPLAIN, of what SQL prepared.
    for sql in ["EXECUTE g", "EXPLAIN ANALYZE EXECUTE g"] {
        third.send(&raw::query(sql)).await;
        let error = raw::first_error(&third.until_ready().await);
        assert!(error[&'M'].contains("which has ended"), "{sql}: {error:?}");
    }
    client.send(&run("y")).await;
    let error = raw::first_error(&client.until_ready().await);
    assert_eq!(error[&'C'], "26000", "x2 was never prepared: {error:?}");
    second.send(&run("early")).await;
    let error = raw::first_error(&second.until_ready().await);
    assert_eq!(error[&'C'], "26000", "k was never prepared: {error:?}");
    assert_eq!(harness::count_rows(&gw.db, "ledger").await, 3);
}

/// A grant that turns a refusal into "needs approval" binds what was
/// prepared under it too: once it ends, an execution is refused, not held
/// (found in review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_held_under_a_grant_is_refused_once_the_grant_ends() {
    use sluice_core::api::AccessRequestBody;
    let gw = start("approval_grant_hold").await;
    let bob = gw.connect(BOB).await.unwrap();
    let asked = api(&gw, BOB)
        .request_access(&AccessRequestBody {
            target: gw.db.clone(),
            grant: "ledger-writer".into(),
            duration: "1h".into(),
            reason: "archive fix".into(),
        })
        .await
        .unwrap();
    api(&gw, ALICE).decide(asked.id, true, None).await.unwrap();
    let statement = bob.prepare("DELETE FROM archive WHERE id = $1").await.unwrap();
    api(&gw, BOB).revoke_grant(asked.id, None).await.unwrap();
    let err = bob.execute(&statement, &[&1i32]).await.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert!(db.message().contains("which has ended"), "{db:?}");
    assert!(
        api(&gw, BOB)
            .approvals()
            .await
            .unwrap()
            .iter()
            .all(|r| r.state != RequestState::Pending),
        "nothing was held"
    );
    assert_eq!(harness::count_rows(&gw.db, "archive").await, 1);
}

/// A cancel while a statement is held but an earlier one of the same
/// pipeline still runs on the server reaches the server (found in review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_what_runs_before_a_held_statement() {
    use crate::harness::raw::{self, RawClient};
    use tokio::io::AsyncWriteExt;
    let gw = start("approval_cancel_busy").await;
    let mut client = RawClient::connect(gw.addr).await;
    let greeting = client.login(&gw.db, BOB).await;
    client
        .send(
            &[
                raw::parse("", "SELECT pg_sleep(30)"),
                raw::bind("", ""),
                raw::execute("", 0),
                raw::parse("d", "DELETE FROM orders WHERE id = 1"),
                raw::bind("", "d"),
                raw::execute("", 0),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
    pending(&gw).await;
    // The DELETE is held as soon as the gateway reads it, which can be
    // before the server starts the sleep; a cancel that reaches a server
    // still reading the pipeline is ignored, by PostgreSQL itself.
    let admin = harness::superuser(&gw.db).await;
    harness::eventually("the sleep to run", || async {
        harness::running(&admin, "SELECT pg_sleep(30)").await > 0
    })
    .await;
    let mut cancel = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80877102i32.to_be_bytes());
    packet.extend_from_slice(&greeting.process_id.to_be_bytes());
    packet.extend_from_slice(&greeting.secret_key.to_be_bytes());
    cancel.write_all(&packet).await.unwrap();
    drop(cancel);
    let answer = tokio::time::timeout(Duration::from_secs(20), client.until_ready())
        .await
        .expect("the sleep was cancelled, not waited out");
    let error = raw::first_error(&answer);
    assert_eq!(error[&'C'], "57014", "{error:?}");
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 5);
}

/// A held Query behind a failed message of its batch is skipped by the
/// server, whatever approvers would decide: its request is withdrawn, the
/// batch ends, and every later answer still belongs to its own statement
/// (a refusal keeps the policy's message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_query_skipped_after_an_error_withdraws_its_request() {
    use crate::harness::raw::{self, RawClient, tags};
    let gw = start("approval_skipped").await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, BOB).await;
    client
        .send(
            &[
                raw::failing(),
                raw::query("DELETE FROM orders WHERE id = 1"),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
    let answer = client.until_ready().await;
    // The notice that it is held, then the batch's error and its end.
    assert_eq!(tags(&answer), "N1EZ", "{answer:?}");
    assert_eq!(raw::first_error(&answer)[&'C'], "22012", "{answer:?}");
    let requests = api(&gw, BOB).approvals().await.unwrap();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].state, RequestState::Cancelled, "{requests:?}");
    let err = api(&gw, ALICE).decide(requests[0].id, true, None).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 5);

    client.send(&raw::query("DELETE FROM ledger")).await;
    let error = raw::first_error(&client.until_ready().await);
    assert!(error[&'M'].contains("the ledger is read-only"), "{error:?}");
    for (sql, value) in [("SELECT 1", b"1"), ("SELECT 2", b"2")] {
        client.send(&raw::query(sql)).await;
        let answer = client.until_ready().await;
        assert_eq!(tags(&answer), "TDCZ", "{answer:?}");
        assert!(answer[1].1.ends_with(value), "{sql}: {answer:?}");
    }

    // Behind the failed batch's Sync the server runs it: it stays held
    // until approved, then runs.
    client
        .send(
            &[
                raw::failing(),
                raw::sync(),
                raw::query("DELETE FROM orders WHERE id = 1"),
            ]
            .concat(),
        )
        .await;
    let mut seen = tags(&client.until_ready().await);
    let request = pending(&gw).await;
    assert_eq!(request.statement, "DELETE FROM orders WHERE id = 1");
    api(&gw, ALICE).decide(request.id, true, None).await.unwrap();
    seen += &tags(&client.until_ready().await);
    assert_eq!(seen.replace('N', ""), "1EZCZ", "{seen}");
    assert!(seen.contains('N'), "{seen}");
    assert_eq!(harness::count_rows(&gw.db, "orders").await, 4);
}
