//! Statements held for approval, decided through the control API: psql
//! waits with a notice and gets its result once approved; denials, expiry,
//! self-approval, N approvals and a cancelled client.

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
         CREATE TABLE reports (id int); INSERT INTO reports SELECT generate_series(1, 3)",
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

async fn count(gw: &TestGateway, table: &str) -> i64 {
    harness::superuser(&gw.db)
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
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
    assert_eq!(count(&gw, "orders").await, 5);
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
    assert_eq!(count(&gw, "orders").await, 3);
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
    assert_eq!(count(&gw, "orders").await, 5);

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
    assert_eq!(count(&gw, "orders").await, 5);
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
    assert_eq!(count(&gw, "payments WHERE id = 2").await, 0);
    let view = api(&gw, AGENT).decide(request.id, true, None).await.unwrap();
    assert_eq!(view.state, RequestState::Approved);
    held.await.unwrap().unwrap();
    assert_eq!(count(&gw, "payments WHERE id = 2").await, 1);
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
    assert_eq!(count(&gw, "reports").await, 2);
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
