//! Approval requests: statements held until approvers decide.
//!
//! The gateway is the only authority. A session opens a request when policy
//! says a statement needs approval and holds the statement; approvers decide
//! through the control API (the console and the bot are clients of it); the
//! registry enforces the rules (not your own request, only the rule's
//! approver groups, N distinct approvals, nothing after the request ended)
//! and tells the waiting session. Every transition is an audit event.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::audit::{Auditor, Detail, Event};
use crate::identity::Identity;

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    Pending,
    Approved,
    Denied,
    Expired,
    /// The client left or cancelled its statement.
    Cancelled,
}

impl RequestState {
    pub fn name(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Approved => "approved",
            RequestState::Denied => "denied",
            RequestState::Expired => "expired",
            RequestState::Cancelled => "cancelled",
        }
    }
}

/// One approver's approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub by: String,
    pub at: DateTime<Utc>,
    /// Where it was given: "api", "console", "slack", "discord".
    pub via: String,
}

/// A request as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestView {
    pub id: u64,
    pub state: RequestState,
    pub requester: String,
    pub groups: Vec<String>,
    pub target: String,
    pub session: String,
    /// The statement, with the content detectors' findings masked.
    pub statement: String,
    pub rule: String,
    pub reason: Option<String>,
    pub approvers: Vec<String>,
    pub needed: u32,
    pub approvals: Vec<Approval>,
    pub created: DateTime<Utc>,
    pub expires: DateTime<Utc>,
    /// Who denied and why, for a denied request.
    pub denied_by: Option<String>,
    pub denial_reason: Option<String>,
}

/// What the waiting session learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Approved { by: Vec<String> },
    Denied { by: String, reason: Option<String> },
}

/// What a session asks for.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub requester: Identity,
    pub target: String,
    pub session: String,
    pub statement: String,
    pub rule: String,
    pub reason: Option<String>,
    pub approvers: Vec<String>,
    pub needed: u32,
    pub timeout: std::time::Duration,
    /// `refuse_and_retry`: the statement was refused, and the same text
    /// (this hash of it) from the same identity and target runs once within
    /// `timeout` after an approval.
    pub retry: Option<[u8; 32]>,
}

/// Who may run which statement once, after an approval.
type RetryKey = (String, String, [u8; 32]);

/// Why a decision was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("no approval request {0}")]
    NotFound(u64),
    #[error("{0}")]
    Forbidden(String),
    #[error("request {id} is no longer pending: it was {state}")]
    NotPending { id: u64, state: &'static str },
}

struct Entry {
    view: RequestView,
    requester_subject: String,
    retry: Option<(RetryKey, std::time::Duration)>,
    /// Tells the waiting session; taken when the request ends.
    waiter: Option<oneshot::Sender<Outcome>>,
}

/// Requests kept after they end, for the API's recent decisions.
const KEEP_ENDED: usize = 200;

/// The gateway's approval requests.
#[derive(Default)]
pub struct Approvals {
    entries: Mutex<HashMap<u64, Entry>>,
    /// Approved `refuse_and_retry` statements, with the request that
    /// approved them and until when they may run.
    retries: Mutex<HashMap<RetryKey, (u64, DateTime<Utc>)>>,
    ended: Mutex<VecDeque<u64>>,
    next_id: AtomicU64,
    auditor: Option<Auditor>,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals").finish_non_exhaustive()
    }
}

impl Approvals {
    /// `first_id`: requests are numbered from here (after those the trail
    /// already holds, so that ids stay unique across restarts).
    pub fn new(auditor: Option<Auditor>, first_id: u64) -> Approvals {
        Approvals {
            entries: Mutex::default(),
            retries: Mutex::default(),
            ended: Mutex::default(),
            next_id: AtomicU64::new(first_id.max(1)),
            auditor,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, view: &RequestView, detail: Detail) {
        if let Some(auditor) = &self.auditor {
            auditor.record(
                Event::now(detail)
                    .in_session(&view.session)
                    .by(&view.requester, &view.target),
            );
        }
    }

    /// Opens a request; the receiver answers when approvers decide (it is
    /// dropped, unanswered, if the request expires or is cancelled).
    pub fn open(&self, new: NewRequest) -> (RequestView, oneshot::Receiver<Outcome>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let created = Utc::now();
        let expires = created + chrono::Duration::from_std(new.timeout).unwrap_or(chrono::Duration::minutes(10));
        let view = RequestView {
            id,
            state: RequestState::Pending,
            requester: new.requester.name().to_string(),
            groups: new.requester.groups().to_vec(),
            target: new.target,
            session: new.session,
            statement: new.statement,
            rule: new.rule,
            reason: new.reason,
            approvers: new.approvers,
            needed: new.needed.max(1),
            approvals: Vec::new(),
            created,
            expires,
            denied_by: None,
            denial_reason: None,
        };
        let (tx, rx) = oneshot::channel();
        let retry = new
            .retry
            .map(|hash| ((view.requester.clone(), view.target.clone(), hash), new.timeout));
        self.lock().insert(
            id,
            Entry {
                view: view.clone(),
                requester_subject: new.requester.subject().to_string(),
                retry,
                waiter: Some(tx),
            },
        );
        self.record(
            &view,
            Detail::ApprovalRequested {
                request: id,
                rule: view.rule.clone(),
                statement: view.statement.clone(),
                approvers: view.approvers.clone(),
                needed: view.needed,
                expires: view.expires.to_rfc3339(),
            },
        );
        (view, rx)
    }

    /// An approver decides. Idempotent for the same decision by the same
    /// approver; an ended request is an error that says how it ended.
    pub fn decide(
        &self,
        id: u64,
        approver: &Identity,
        approve: bool,
        reason: Option<String>,
        via: &str,
    ) -> Result<RequestView, DecideError> {
        self.expire_due();
        let mut entries = self.lock();
        let entry = entries.get_mut(&id).ok_or(DecideError::NotFound(id))?;
        let name = approver.name();
        let view = &mut entry.view;
        if view.state != RequestState::Pending {
            let same = match view.state {
                RequestState::Approved => approve && view.approvals.iter().any(|a| a.by == name),
                RequestState::Denied => !approve && view.denied_by.as_deref() == Some(name),
                _ => false,
            };
            return if same {
                Ok(view.clone())
            } else {
                Err(DecideError::NotPending {
                    id,
                    state: view.state.name(),
                })
            };
        }
        if name == view.requester || approver.subject() == entry.requester_subject {
            return Err(DecideError::Forbidden(format!(
                "{name} asked for request {id} and cannot decide it: another approver must"
            )));
        }
        if !view.approvers.iter().any(|g| approver.in_group(g)) {
            return Err(DecideError::Forbidden(format!(
                "request {id} (rule \"{}\") is decided by members of {}; {name} is not one",
                view.rule,
                view.approvers.join(", ")
            )));
        }
        let outcome = if approve {
            if !view.approvals.iter().any(|a| a.by == name) {
                view.approvals.push(Approval {
                    by: name.to_string(),
                    at: Utc::now(),
                    via: via.to_string(),
                });
            }
            if (view.approvals.len() as u32) < view.needed {
                let view = view.clone();
                drop(entries);
                self.record(
                    &view,
                    Detail::ApprovalDecided {
                        request: id,
                        decision: "approval".into(),
                        by: name.to_string(),
                        reason,
                        via: via.to_string(),
                    },
                );
                return Ok(view);
            }
            view.state = RequestState::Approved;
            Outcome::Approved {
                by: view.approvals.iter().map(|a| a.by.clone()).collect(),
            }
        } else {
            view.state = RequestState::Denied;
            view.denied_by = Some(name.to_string());
            view.denial_reason = reason.clone();
            Outcome::Denied {
                by: name.to_string(),
                reason: reason.clone(),
            }
        };
        let waiter = entry.waiter.take();
        let view = entry.view.clone();
        let retry = entry.retry.clone();
        drop(entries);
        if view.state == RequestState::Approved
            && let Some((key, window)) = retry
        {
            let until = Utc::now() + chrono::Duration::from_std(window).unwrap_or(chrono::Duration::minutes(10));
            self.retries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, (id, until));
        }
        self.ended(id);
        self.record(
            &view,
            Detail::ApprovalDecided {
                request: id,
                decision: view.state.name().into(),
                by: name.to_string(),
                reason,
                via: via.to_string(),
            },
        );
        if let Some(waiter) = waiter {
            let _ = waiter.send(outcome);
        }
        Ok(view)
    }

    /// The request ends without a decision (`Expired` or `Cancelled`), if it
    /// is still pending; `false` if it had ended already (a decision came
    /// first).
    pub fn end(&self, id: u64, state: RequestState, why: &str) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(&id) else {
            return false;
        };
        if entry.view.state != RequestState::Pending {
            return false;
        }
        entry.view.state = state;
        entry.waiter = None;
        let view = entry.view.clone();
        drop(entries);
        self.ended(id);
        self.record(
            &view,
            Detail::ApprovalDecided {
                request: id,
                decision: state.name().into(),
                by: String::new(),
                reason: Some(why.to_string()),
                via: "gateway".into(),
            },
        );
        true
    }

    /// Ends the pending requests whose time is up. A held statement's
    /// session does this with its own timer too; a `refuse_and_retry`
    /// request has no session waiting, so it ends here, on the next look.
    fn expire_due(&self) {
        let now = Utc::now();
        let due: Vec<u64> = self
            .lock()
            .values()
            .filter(|e| e.view.state == RequestState::Pending && e.view.expires <= now)
            .map(|e| e.view.id)
            .collect();
        for id in due {
            self.end(id, RequestState::Expired, "no decision before the request expired");
        }
    }

    /// Keeps the newest ended requests for the API; forgets older ones.
    fn ended(&self, id: u64) {
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        ended.push_back(id);
        while ended.len() > KEEP_ENDED {
            if let Some(old) = ended.pop_front() {
                self.lock().remove(&old);
            }
        }
    }

    /// For `refuse_and_retry`: the approved request that lets this exact
    /// statement run now, used up by this call.
    pub fn take_retry(&self, identity: &str, target: &str, sql_hash: [u8; 32]) -> Option<u64> {
        let mut retries = self.retries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Utc::now();
        retries.retain(|_, (_, until)| *until > now);
        retries
            .remove(&(identity.to_string(), target.to_string(), sql_hash))
            .map(|(id, _)| id)
    }

    /// For `refuse_and_retry`: a pending request for this exact statement,
    /// so that sending it again does not open another.
    pub fn pending_retry(&self, identity: &str, target: &str, sql_hash: [u8; 32]) -> Option<u64> {
        self.expire_due();
        self.lock().values().find_map(|entry| {
            let ((who, to, hash), _) = entry.retry.as_ref()?;
            (entry.view.state == RequestState::Pending && who == identity && to == target && *hash == sql_hash)
                .then_some(entry.view.id)
        })
    }

    pub fn get(&self, id: u64) -> Option<RequestView> {
        self.expire_due();
        self.lock().get(&id).map(|e| e.view.clone())
    }

    /// Pending requests first (oldest first), then recent decisions (newest
    /// first).
    pub fn list(&self) -> Vec<RequestView> {
        self.expire_due();
        let mut all: Vec<RequestView> = self.lock().values().map(|e| e.view.clone()).collect();
        all.sort_by(|a, b| {
            let pending = |v: &RequestView| v.state == RequestState::Pending;
            pending(b)
                .cmp(&pending(a))
                .then_with(|| if pending(a) { a.id.cmp(&b.id) } else { b.id.cmp(&a.id) })
        });
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn person(name: &str, groups: &[&str]) -> Identity {
        Identity::for_tests(name, groups.iter().map(|g| g.to_string()).collect(), BTreeMap::new())
    }

    fn request(approvals: &Approvals, needed: u32) -> (RequestView, oneshot::Receiver<Outcome>) {
        approvals.open(NewRequest {
            requester: person("bob", &["oncall", "leads"]),
            target: "shop".into(),
            session: "s1".into(),
            statement: "DELETE FROM orders WHERE id = 1".into(),
            rule: "writes-need-approval".into(),
            reason: None,
            approvers: vec!["leads".into()],
            needed,
            timeout: Duration::from_secs(300),
            retry: None,
        })
    }

    #[test]
    fn the_rules_of_deciding() {
        let approvals = Approvals::new(None, 1);
        let (view, mut rx) = request(&approvals, 2);
        assert_eq!((view.id, view.state), (1, RequestState::Pending));
        let bob = person("bob", &["leads"]);
        let carol = person("carol", &["leads"]);
        let dave = person("dave", &["leads"]);
        let erin = person("erin", &["engineering"]);
        let err = approvals.decide(1, &bob, true, None, "api").unwrap_err();
        assert!(err.to_string().contains("cannot decide it"), "{err}");
        let err = approvals.decide(1, &erin, true, None, "api").unwrap_err();
        assert!(
            err.to_string().contains("decided by members of leads; erin is not one"),
            "{err}"
        );
        assert_eq!(
            approvals.decide(9, &carol, true, None, "api").unwrap_err(),
            DecideError::NotFound(9)
        );
        // Two distinct approvals are needed: carol twice counts once.
        approvals.decide(1, &carol, true, None, "api").unwrap();
        let view = approvals.decide(1, &carol, true, None, "console").unwrap();
        assert_eq!((view.state, view.approvals.len()), (RequestState::Pending, 1));
        assert!(rx.try_recv().is_err());
        let view = approvals.decide(1, &dave, true, None, "slack").unwrap();
        assert_eq!(view.state, RequestState::Approved);
        assert_eq!(
            rx.try_recv().unwrap(),
            Outcome::Approved {
                by: vec!["carol".into(), "dave".into()]
            }
        );
        // Deciding again: the same decision by an approver is idempotent,
        // another is an error that says how it ended.
        assert!(approvals.decide(1, &dave, true, None, "api").is_ok());
        let err = approvals.decide(1, &dave, false, None, "api").unwrap_err();
        assert_eq!(err.to_string(), "request 1 is no longer pending: it was approved");
    }

    #[test]
    fn denial_expiry_and_cancellation_end_a_request() {
        let approvals = Approvals::new(None, 7);
        let (view, mut rx) = request(&approvals, 1);
        assert_eq!(view.id, 7);
        let carol = person("carol", &["leads"]);
        let view = approvals
            .decide(7, &carol, false, Some("not during the sale".into()), "api")
            .unwrap();
        assert_eq!(view.denied_by.as_deref(), Some("carol"));
        assert_eq!(
            rx.try_recv().unwrap(),
            Outcome::Denied {
                by: "carol".into(),
                reason: Some("not during the sale".into())
            }
        );
        let (view, mut rx) = request(&approvals, 1);
        approvals.end(view.id, RequestState::Expired, "nobody decided in time");
        assert!(rx.try_recv().is_err(), "the waiter is dropped");
        let err = approvals.decide(view.id, &carol, true, None, "api").unwrap_err();
        assert!(err.to_string().ends_with("it was expired"), "{err}");
        let pending = request(&approvals, 1).0;
        let list = approvals.list();
        assert_eq!(list[0].id, pending.id, "pending first");
        assert_eq!(list.len(), 3);
    }
}
