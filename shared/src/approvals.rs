//! Approval requests: statements held until approvers decide.
//!
//! The gateway is the only authority. A session opens a request when policy
//! says a statement needs approval and holds the statement; approvers decide
//! through the control API (the console and the bot are clients of it); the
//! registry enforces the rules (not your own request, only the rule's
//! approver groups, N distinct approvals, nothing after the request ended)
//! and tells the waiting session. Every transition is an audit event.
//!
//! Access requests (`sluice request`) live here too, in the same id space
//! and under the same rules: an approved one becomes an active grant for its
//! requester on its target until it expires, and policy rules that name the
//! grant apply (or stop applying) to them meanwhile.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::audit::{AccessAsk, Auditor, Detail, Event};
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
    /// For a decision a chat bot forwarded: the chat user who clicked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_user: Option<String>,
}

/// Where a decision comes from: the channel, and for a chat bot deciding on
/// a person's behalf, the bot and the chat user who clicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channel<'a> {
    /// "api", "console", "slack" or "discord".
    pub via: &'a str,
    /// The bot's identity, when it decides on the approver's behalf.
    pub delegate: Option<&'a str>,
    pub chat_user: Option<&'a str>,
}

impl<'a> Channel<'a> {
    /// The approver's own call ("api", "console").
    pub fn direct(via: &'a str) -> Channel<'a> {
        Channel {
            via,
            delegate: None,
            chat_user: None,
        }
    }
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
    /// Set for an access request (`sluice request`): what it asks for;
    /// `statement` is empty and `rule` is the grant's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessView>,
    /// The held statement as the classifier read it (kind, relations, risk
    /// features, tags), one record per statement of its text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statements: Vec<crate::audit::StatementRecord>,
    /// Where an approval counts ("console", "slack"...); empty: anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approve_via: Vec<String>,
}

/// What an access request asks for, and what became of the grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessView {
    pub grant: String,
    /// For how long once approved.
    pub seconds: u64,
    /// Once approved: when the grant ends.
    pub until: Option<DateTime<Utc>>,
    /// Once the grant ended: why ("expired").
    pub ended: Option<String>,
}

/// A grant an approved access request gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    /// The access request that gave it.
    pub request: u64,
    pub grant: String,
    /// Who holds it.
    pub identity: String,
    /// The identity's subject (`sub`), which the grant is bound to.
    pub subject: String,
    pub target: String,
    pub until: DateTime<Utc>,
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
    /// An access request: the grant asked for, and for how long.
    pub access: Option<AccessAsk>,
    /// The statement's classification, for approvers to see.
    pub statements: Vec<crate::audit::StatementRecord>,
    /// Where an approval counts; empty: anywhere.
    pub approve_via: Vec<String>,
}

/// Who may run which statement once, after an approval.
type RetryKey = (String, String, [u8; 32]);

/// A `refuse_and_retry` approval a statement is about to use
/// ([`Approvals::take_retry`]), kept by its session until the statement
/// has run, in case it never does ([`Approvals::give_back_retry`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryUse {
    key: RetryKey,
    /// The request that approved it.
    pub request: u64,
    until: DateTime<Utc>,
}

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
    /// The requester's email, when the token had one.
    requester_email: Option<String>,
    retry: Option<(RetryKey, std::time::Duration)>,
    /// Tells the waiting session; taken when the request ends.
    waiter: Option<oneshot::Sender<Outcome>>,
}

/// Whether two names are one person's: identity names and emails compare
/// without case or surrounding space.
fn same_person(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

/// Whether an approval through `via` counts under `approve_via`. The API and
/// the console are one class: both are a person's own token, and the
/// gateway cannot tell one client from another; the chat channels are told
/// apart, since only a delegate (a bot) can decide through them.
fn counts_through(approve_via: &[String], via: &str) -> bool {
    let direct = |v: &str| matches!(v, "api" | "console");
    approve_via.is_empty() || approve_via.iter().any(|v| v == via || (direct(v) && direct(via)))
}

/// Requests kept after they end, for the API's recent decisions.
const KEEP_ENDED: usize = 200;

/// Pending requests one identity may have that do not hold a session
/// (`refuse_and_retry` statements, access requests): beyond this, new ones
/// are refused, so one client cannot bury approvers (or memory) in them.
pub const MAX_PENDING_PER_IDENTITY: usize = 20;

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
    /// Grants from approved access requests, expired ones removed by
    /// [`Approvals::expire_due`].
    grants: Mutex<Vec<(GrantView, Arc<str>)>>,
    /// How many grants there are: statements skip the lock while none.
    grant_count: AtomicUsize,
    /// Woken when a deadline may have moved closer (a new request, a new
    /// grant), for [`Approvals::watch_deadlines`].
    deadlines_moved: tokio::sync::Notify,
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
            grants: Mutex::default(),
            grant_count: AtomicUsize::new(0),
            deadlines_moved: tokio::sync::Notify::new(),
        }
    }

    fn grants_lock(&self) -> std::sync::MutexGuard<'_, Vec<(GrantView, Arc<str>)>> {
        self.grants.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Grants approved earlier and not yet expired (read from the trail at
    /// start): they hold across a restart.
    pub fn restore_grants(&self, grants: Vec<GrantView>) {
        let now = Utc::now();
        let mut held = self.grants_lock();
        for grant in grants.into_iter().filter(|g| g.until > now) {
            let name: Arc<str> = Arc::from(grant.grant.as_str());
            held.push((grant, name));
        }
        self.grant_count.store(held.len(), Ordering::Release);
    }

    /// The grants `identity` holds on `target` now, by name. Allocates
    /// nothing while no grant is held anywhere.
    pub fn granted(&self, identity: &Identity, target: &str) -> Vec<Arc<str>> {
        if self.grant_count.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let now = Utc::now();
        self.grants_lock()
            .iter()
            .filter(|(g, _)| g.subject == identity.subject() && g.target == target && g.until > now)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// Ends the grant of access request `request` before its time: by its
    /// holder, or an approver or admin (the caller checks who may). `None`
    /// when no such grant holds.
    pub fn revoke(&self, request: u64, by: &Identity, reason: Option<&str>) -> Option<GrantView> {
        let grant = {
            let mut grants = self.grants_lock();
            let at = grants.iter().position(|(g, _)| g.request == request)?;
            let (grant, _) = grants.remove(at);
            self.grant_count.store(grants.len(), Ordering::Release);
            grant
        };
        let why = match reason {
            Some(reason) if !reason.trim().is_empty() => format!("revoked by {}: {}", by.name(), reason.trim()),
            _ => format!("revoked by {}", by.name()),
        };
        self.end_grant(&grant, why);
        Some(grant)
    }

    /// Says on the record (and on its request) that a grant ended, and why.
    pub fn end_grant(&self, grant: &GrantView, why: String) {
        if let Some(entry) = self.lock().get_mut(&grant.request)
            && let Some(access) = &mut entry.view.access
        {
            access.ended = Some(why.clone());
        }
        tracing::info!(request = grant.request, grant = %grant.grant, identity = %grant.identity, reason = %why, "access grant ended");
        if let Some(auditor) = &self.auditor {
            auditor.record(
                Event::now(Detail::AccessEnded {
                    request: grant.request,
                    grant: grant.grant.clone(),
                    reason: why,
                })
                .by(&grant.identity, &grant.target),
            );
        }
    }

    /// The grant of access request `request`, if it holds.
    pub fn grant(&self, request: u64) -> Option<GrantView> {
        self.grants_lock()
            .iter()
            .find(|(g, _)| g.request == request)
            .map(|(g, _)| g.clone())
    }

    /// Every grant held now.
    pub fn grants(&self) -> Vec<GrantView> {
        self.expire_due();
        self.grants_lock().iter().map(|(g, _)| g.clone()).collect()
    }

    /// The next time something is due to expire: a pending request or a
    /// grant.
    fn next_deadline(&self) -> Option<DateTime<Utc>> {
        let requests = self
            .lock()
            .values()
            .filter(|e| e.view.state == RequestState::Pending)
            .map(|e| e.view.expires)
            .min();
        let grants = self.grants_lock().iter().map(|(g, _)| g.until).min();
        requests.into_iter().chain(grants).min()
    }

    /// Ends requests and grants as they expire, so that the trail and the
    /// event stream say so when it happens, not on the next look. Runs
    /// until `stop`.
    pub async fn watch_deadlines(&self, stop: tokio_util::sync::CancellationToken) {
        loop {
            let moved = self.deadlines_moved.notified();
            let wait = self
                .next_deadline()
                .map(|at| (at - Utc::now()).to_std().unwrap_or_default())
                .unwrap_or(std::time::Duration::from_secs(3600));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = moved => {}
                _ = tokio::time::sleep(wait) => {}
            }
            self.expire_due();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, view: &RequestView, detail: Detail) {
        if let Some(auditor) = &self.auditor {
            let event = Event::now(detail).by(&view.requester, &view.target);
            // An access request belongs to no session.
            auditor.record(if view.session.is_empty() {
                event
            } else {
                event.in_session(&view.session)
            });
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
            access: new.access.as_ref().map(|ask| AccessView {
                grant: ask.grant.clone(),
                seconds: ask.seconds,
                until: None,
                ended: None,
            }),
            statements: new.statements,
            approve_via: new.approve_via,
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
                requester_email: new.requester.email().map(str::to_string),
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
                access: new.access,
            },
        );
        self.deadlines_moved.notify_one();
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
        self.decide_via(id, approver, approve, reason, Channel::direct(via))
    }

    /// [`Approvals::decide`], through a channel: a rule's `approve_via`
    /// decides where an approval counts (a denial counts from anywhere).
    pub fn decide_via(
        &self,
        id: u64,
        approver: &Identity,
        approve: bool,
        reason: Option<String>,
        channel: Channel<'_>,
    ) -> Result<RequestView, DecideError> {
        let via = channel.via;
        self.expire_due();
        let mut entries = self.lock();
        let entry = entries.get_mut(&id).ok_or(DecideError::NotFound(id))?;
        let name = approver.name();
        let view = &mut entry.view;
        if view.state != RequestState::Pending {
            let same = match view.state {
                RequestState::Approved => approve && view.approvals.iter().any(|a| same_person(&a.by, name)),
                RequestState::Denied => !approve && view.denied_by.as_deref().is_some_and(|d| same_person(d, name)),
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
        // Names are compared as people write them: an email in another case
        // (an IdP's "Bob@Example.com", a bot's "bob@example.com") is the
        // same person, by name, email or subject.
        let approver_names = [Some(name), approver.email(), Some(approver.subject())];
        let requester_names = [
            Some(view.requester.as_str()),
            entry.requester_email.as_deref(),
            Some(entry.requester_subject.as_str()),
        ];
        let is_requester = approver_names
            .iter()
            .flatten()
            .any(|a| requester_names.iter().flatten().any(|r| same_person(a, r)));
        if is_requester {
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
        if approve && !counts_through(&view.approve_via, via) {
            return Err(DecideError::Forbidden(format!(
                "request {id} (rule \"{}\") may be approved only through {}, not {via}; deny it here, or approve it there",
                view.rule,
                view.approve_via.join(" or ")
            )));
        }
        let outcome = if approve {
            if !view.approvals.iter().any(|a| same_person(&a.by, name)) {
                view.approvals.push(Approval {
                    by: name.to_string(),
                    at: Utc::now(),
                    via: via.to_string(),
                    chat_user: channel.chat_user.map(str::to_string),
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
                        delegate: channel.delegate.map(str::to_string),
                        chat_user: channel.chat_user.map(str::to_string),
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
        let granted = match (&mut entry.view.access, entry.view.state) {
            (Some(access), RequestState::Approved) => {
                let seconds = i64::try_from(access.seconds).unwrap_or(i64::MAX);
                let until = Utc::now() + chrono::Duration::try_seconds(seconds).unwrap_or(chrono::Duration::hours(1));
                access.until = Some(until);
                Some(GrantView {
                    request: id,
                    grant: access.grant.clone(),
                    identity: entry.view.requester.clone(),
                    subject: entry.requester_subject.clone(),
                    target: entry.view.target.clone(),
                    until,
                })
            }
            _ => None,
        };
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
                delegate: channel.delegate.map(str::to_string),
                chat_user: channel.chat_user.map(str::to_string),
            },
        );
        if let Some(grant) = granted {
            self.record(
                &view,
                Detail::AccessGranted {
                    request: id,
                    grant: grant.grant.clone(),
                    subject: grant.subject.clone(),
                    until: grant.until.to_rfc3339(),
                },
            );
            let name: Arc<str> = Arc::from(grant.grant.as_str());
            let mut grants = self.grants_lock();
            grants.push((grant, name));
            self.grant_count.store(grants.len(), Ordering::Release);
            drop(grants);
            self.deadlines_moved.notify_one();
        }
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
                delegate: None,
                chat_user: None,
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
        if self.grant_count.load(Ordering::Acquire) == 0 {
            return;
        }
        let expired: Vec<GrantView> = {
            let mut grants = self.grants_lock();
            let (gone, kept): (Vec<_>, Vec<_>) = grants.drain(..).partition(|(g, _)| g.until <= now);
            *grants = kept;
            self.grant_count.store(grants.len(), Ordering::Release);
            gone.into_iter().map(|(g, _)| g).collect()
        };
        for grant in expired {
            self.end_grant(&grant, "expired".into());
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
    pub fn take_retry(&self, identity: &str, target: &str, sql_hash: [u8; 32]) -> Option<RetryUse> {
        let mut retries = self.retries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Utc::now();
        retries.retain(|_, (_, until)| *until > now);
        let key = (identity.to_string(), target.to_string(), sql_hash);
        let (request, until) = retries.remove(&key)?;
        Some(RetryUse { key, request, until })
    }

    /// Gives back an approval [`Approvals::take_retry`] handed out for a
    /// statement that never ran (the server skipped it after an earlier
    /// message of its batch failed, or the gateway refused it for another
    /// reason): the same statement may still run once, within the window
    /// it had, unless a newer approval of it is there already.
    pub fn give_back_retry(&self, used: RetryUse) {
        if used.until <= Utc::now() {
            return;
        }
        self.retries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(used.key)
            .or_insert((used.request, used.until));
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

    /// A pending access request by this identity for this grant on this
    /// target, so that asking twice does not open two.
    pub fn pending_access(&self, requester: &Identity, grant: &str, target: &str) -> Option<RequestView> {
        self.expire_due();
        self.lock()
            .values()
            .find(|e| {
                e.view.state == RequestState::Pending
                    && e.requester_subject == requester.subject()
                    && e.view.target == target
                    && e.view.access.as_ref().is_some_and(|a| a.grant == grant)
            })
            .map(|e| e.view.clone())
    }

    /// How many pending requests `requester` has that no session waits on,
    /// or `None` below [`MAX_PENDING_PER_IDENTITY`]: the refusal's text.
    pub fn too_many_pending(&self, requester: &Identity) -> Option<String> {
        self.expire_due();
        let pending = self
            .lock()
            .values()
            .filter(|e| {
                e.view.state == RequestState::Pending
                    && e.requester_subject == requester.subject()
                    && (e.retry.is_some() || e.view.access.is_some())
            })
            .count();
        (pending >= MAX_PENDING_PER_IDENTITY).then(|| {
            format!(
                "{} has {pending} approval requests waiting; wait for approvers to decide some before asking again",
                requester.name()
            )
        })
    }

    /// Whether `identity` asked for request `id`: requesters may follow
    /// their own requests without a viewer role.
    pub fn is_requester(&self, id: u64, identity: &Identity) -> bool {
        self.lock()
            .get(&id)
            .is_some_and(|e| e.requester_subject == identity.subject())
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
            needed,
            ..request_for_tests()
        })
    }

    fn request_for_tests() -> NewRequest {
        NewRequest {
            requester: person("bob", &["oncall", "leads"]),
            target: "shop".into(),
            session: "s1".into(),
            statement: "DELETE FROM orders WHERE id = 1".into(),
            rule: "writes-need-approval".into(),
            reason: None,
            approvers: vec!["leads".into()],
            needed: 1,
            timeout: Duration::from_secs(300),
            retry: None,
            access: None,
            statements: Vec::new(),
            approve_via: Vec::new(),
        }
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
    fn one_person_is_one_person_whatever_the_case() {
        let approvals = Approvals::new(None, 1);
        let (view, _rx) = request(&approvals, 2);
        let slack = Channel {
            via: "slack",
            delegate: Some("approval-bot"),
            chat_user: Some("U1"),
        };
        // The requester, named by a bot in another case: still the requester.
        let loud_bob = person("BOB ", &["leads"]);
        let err = approvals.decide_via(view.id, &loud_bob, true, None, slack).unwrap_err();
        assert!(err.to_string().contains("cannot decide it"), "{err}");
        // carol in the console and "Carol" through Slack are one approval.
        let carol = person("carol", &["leads"]);
        approvals.decide(view.id, &carol, true, None, "console").unwrap();
        let again = approvals
            .decide_via(view.id, &person("Carol", &["leads"]), true, None, slack)
            .unwrap();
        assert_eq!((again.state, again.approvals.len()), (RequestState::Pending, 1));
    }

    #[test]
    fn the_api_and_the_console_are_one_class() {
        let console = vec!["console".to_string()];
        assert!(counts_through(&console, "console"));
        assert!(counts_through(&console, "api"));
        assert!(!counts_through(&console, "slack"));
        assert!(counts_through(&[], "discord"));
        assert!(counts_through(&["slack".to_string()], "slack"));
        assert!(!counts_through(&["slack".to_string()], "discord"));
    }

    #[test]
    fn approve_via_decides_where_an_approval_counts() {
        let approvals = Approvals::new(None, 1);
        let (view, _rx) = approvals.open(NewRequest {
            approve_via: vec!["console".into()],
            ..request_for_tests()
        });
        let carol = person("carol", &["leads"]);
        let slack = Channel {
            via: "slack",
            delegate: Some("approval-bot"),
            chat_user: Some("U042"),
        };
        let err = approvals.decide_via(view.id, &carol, true, None, slack).unwrap_err();
        assert_eq!(
            err.to_string(),
            "request 1 (rule \"writes-need-approval\") may be approved only through console, not slack; deny it here, or approve it there"
        );
        assert_eq!(approvals.get(view.id).unwrap().state, RequestState::Pending);
        // A denial counts from anywhere: stopping a statement is always safe.
        let denied = approvals
            .decide_via(view.id, &carol, false, Some("not now".into()), slack)
            .unwrap();
        assert_eq!(denied.state, RequestState::Denied);

        let (view, _rx) = approvals.open(request_for_tests());
        let approved = approvals.decide_via(view.id, &carol, true, None, slack).unwrap();
        assert_eq!(approved.approvals[0].via, "slack");
        assert_eq!(approved.approvals[0].chat_user.as_deref(), Some("U042"));
    }

    #[test]
    fn an_approved_access_request_grants_until_it_expires() {
        let approvals = Approvals::new(None, 1);
        let bob = person("bob", &["oncall"]);
        let carol = person("carol", &["leads"]);
        assert!(approvals.granted(&bob, "shop").is_empty());
        let ask = |seconds| NewRequest {
            requester: bob.clone(),
            target: "shop".into(),
            session: String::new(),
            statement: String::new(),
            rule: "writer".into(),
            reason: Some("fix a row".into()),
            approvers: vec!["leads".into()],
            needed: 1,
            timeout: Duration::from_secs(300),
            retry: None,
            access: Some(AccessAsk {
                grant: "writer".into(),
                seconds,
            }),
            statements: Vec::new(),
            approve_via: Vec::new(),
        };
        let (view, _) = approvals.open(ask(1800));
        assert_eq!(approvals.pending_access(&bob, "writer", "shop").unwrap().id, view.id);
        assert!(approvals.pending_access(&bob, "writer", "other").is_none());
        assert!(approvals.is_requester(view.id, &bob) && !approvals.is_requester(view.id, &carol));
        let approved = approvals.decide(view.id, &carol, true, None, "api").unwrap();
        let until = approved.access.unwrap().until.unwrap();
        assert!(until > Utc::now() + chrono::Duration::minutes(29));
        let granted = approvals.granted(&bob, "shop");
        assert_eq!(granted.len(), 1);
        assert_eq!(&*granted[0], "writer");
        assert!(approvals.granted(&bob, "other").is_empty(), "only on its target");
        assert!(approvals.granted(&carol, "shop").is_empty(), "only for its requester");
        assert_eq!(approvals.grants().len(), 1);

        // A grant whose time is up stops counting at once, and ends on the
        // next sweep.
        let (short, _) = approvals.open(ask(0));
        approvals.decide(short.id, &carol, true, None, "api").unwrap();
        assert_eq!(
            approvals.granted(&bob, "shop").len(),
            1,
            "the expired one does not count"
        );
        approvals.expire_due();
        let grants = approvals.grants();
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].request, view.id);
        assert_eq!(
            approvals.get(short.id).unwrap().access.unwrap().ended.as_deref(),
            Some("expired")
        );
    }

    #[test]
    fn requests_no_session_waits_on_are_capped_per_identity() {
        let approvals = Approvals::new(None, 1);
        let bob = person("bob", &["oncall", "leads"]);
        // Held statements hold their session: they do not count.
        for _ in 0..MAX_PENDING_PER_IDENTITY {
            request(&approvals, 1);
        }
        assert!(approvals.too_many_pending(&bob).is_none());
        for n in 0..MAX_PENDING_PER_IDENTITY {
            approvals.open(NewRequest {
                requester: bob.clone(),
                target: "shop".into(),
                session: "s".into(),
                statement: format!("DELETE FROM t WHERE id = {n}"),
                rule: "r".into(),
                reason: None,
                approvers: vec!["leads".into()],
                needed: 1,
                timeout: Duration::from_secs(300),
                retry: Some([n as u8; 32]),
                access: None,
                statements: Vec::new(),
                approve_via: Vec::new(),
            });
        }
        let message = approvals.too_many_pending(&bob).unwrap();
        assert!(message.contains("bob has 20 approval requests waiting"), "{message}");
        assert!(approvals.too_many_pending(&person("carol", &["leads"])).is_none());
    }

    #[test]
    fn a_retry_approval_given_back_runs_once_more_within_its_window() {
        let approvals = Approvals::new(None, 1);
        let hash = [7; 32];
        let (view, _rx) = approvals.open(NewRequest {
            retry: Some(hash),
            ..request_for_tests()
        });
        assert!(approvals.take_retry("bob", "shop", hash).is_none(), "pending");
        approvals
            .decide(view.id, &person("carol", &["leads"]), true, None, "api")
            .unwrap();
        let used = approvals.take_retry("bob", "shop", hash).unwrap();
        assert_eq!(used.request, view.id);
        assert!(approvals.take_retry("bob", "shop", hash).is_none(), "used up");
        approvals.give_back_retry(used.clone());
        assert_eq!(approvals.take_retry("bob", "shop", hash), Some(used.clone()));
        // Not past its window.
        approvals.give_back_retry(RetryUse {
            until: Utc::now() - chrono::Duration::seconds(1),
            ..used
        });
        assert!(approvals.take_retry("bob", "shop", hash).is_none());
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
