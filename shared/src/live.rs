//! The sessions running now, for the control API: who, where, since when,
//! what they last ran, and a switch an administrator can use to end one.
//!
//! Each session owns its [`LiveSession`] and updates it with atomic stores
//! (the statement counters) and one uncontended mutex (the last statement's
//! text), so the session path does not wait on API readers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What a session is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Idle,
    Running,
    /// A statement waits for approvers.
    Held,
}

/// One running session.
#[derive(Debug)]
pub struct LiveSession {
    pub id: String,
    pub identity: String,
    pub target: String,
    pub application: String,
    pub client: String,
    pub started: DateTime<Utc>,
    statements: AtomicU64,
    refused: AtomicU64,
    running: AtomicU8,
    /// Answers are owed by the server (something runs, or waits to, there).
    upstream_busy: AtomicBool,
    /// The last statement's text, as the audit trail keeps it (detector
    /// findings masked), cut to [`LAST_MAX`] bytes.
    last: Mutex<String>,
    kill: KillSwitch,
    /// The client sent a CancelRequest (its statement may be held for
    /// approval, where no server would see the cancel).
    cancel: KillSwitch,
}

/// Longest last-statement text kept.
const LAST_MAX: usize = 1024;

/// A request to end a session, and the waker of the task that runs it.
#[derive(Debug, Default)]
struct KillSwitch {
    killed: AtomicBool,
    by: Mutex<Option<String>>,
    waker: Mutex<Option<Waker>>,
}

impl KillSwitch {
    fn set(&self, by: &str) {
        *self.by.lock().unwrap_or_else(|e| e.into_inner()) = Some(by.to_string());
        self.killed.store(true, Ordering::Release);
        if let Some(waker) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            waker.wake();
        }
    }

    /// `registered`: the waker this caller registered last, kept by the
    /// caller, so that the per-wakeup check is an atomic load unless the
    /// task's waker changed.
    fn poll(&self, cx: &mut Context<'_>, registered: &mut Option<Waker>) -> Option<String> {
        if !self.killed.load(Ordering::Acquire) {
            if registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return None;
            }
            *registered = Some(cx.waker().clone());
            *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            // Checked again: a set between the load and the registration
            // would otherwise wake nobody.
            if !self.killed.load(Ordering::Acquire) {
                return None;
            }
        }
        Some(
            self.by
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default(),
        )
    }
}

impl LiveSession {
    /// Counts a statement the session ran or was refused, and shows its
    /// text as the session's last.
    pub fn note_statement(&self, text: &str, refused: bool) {
        self.count_statement(refused);
        self.note_text(text);
    }

    /// Counts a statement whose text is shown already (an Execute of a
    /// statement prepared before: its Parse showed it).
    pub fn count_statement(&self, refused: bool) {
        self.statements.fetch_add(1, Ordering::Relaxed);
        if refused {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Shows `text` as the session's last statement without counting it
    /// (a Parse: what runs, and is counted, is each Execute of it).
    pub fn note_text(&self, text: &str) {
        let mut end = text.len().min(LAST_MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.clear();
        last.push_str(&text[..end]);
    }

    pub fn set_state(&self, state: SessionState) {
        self.running.store(state as u8, Ordering::Release);
    }

    /// Whether an administrator ended this session (and who), making sure
    /// the task is woken if one does later.
    pub fn poll_killed(&self, cx: &mut Context<'_>, registered: &mut Option<Waker>) -> Option<String> {
        self.kill.poll(cx, registered)
    }

    fn kill(&self, by: &str) {
        self.kill.set(by);
    }

    /// The client asked to cancel its statement.
    pub fn cancel(&self) {
        self.cancel.set("");
    }

    /// Whether a statement of this session waits for approvers now and
    /// nothing runs on the server: a cancel is then the gateway's alone.
    pub fn is_held_alone(&self) -> bool {
        self.running.load(Ordering::Acquire) == SessionState::Held as u8 && !self.upstream_busy.load(Ordering::Acquire)
    }

    /// Whether the server owes answers (something runs there).
    pub fn set_upstream_busy(&self, busy: bool) {
        self.upstream_busy.store(busy, Ordering::Release);
    }

    /// Whether the client cancelled since [`LiveSession::clear_cancel`].
    pub fn cancel_requested(&self) -> bool {
        self.cancel.killed.load(Ordering::Acquire)
    }

    /// Forgets a cancel that came before now (for a statement long done).
    pub fn clear_cancel(&self) {
        self.cancel.killed.store(false, Ordering::Release);
    }

    /// Whether the client cancelled since [`LiveSession::clear_cancel`],
    /// making sure the task is woken if it does later.
    pub fn poll_cancelled(&self, cx: &mut Context<'_>, registered: &mut Option<Waker>) -> bool {
        self.cancel.poll(cx, registered).is_some()
    }

    pub fn summary(&self) -> LiveSummary {
        LiveSummary {
            id: self.id.clone(),
            identity: self.identity.clone(),
            target: self.target.clone(),
            application: self.application.clone(),
            client: self.client.clone(),
            started: self.started,
            statements: self.statements.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            state: match self.running.load(Ordering::Relaxed) {
                1 => SessionState::Running,
                2 => SessionState::Held,
                _ => SessionState::Idle,
            },
            last_statement: self.last.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

/// A running session as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSummary {
    pub id: String,
    pub identity: String,
    pub target: String,
    pub application: String,
    pub client: String,
    pub started: DateTime<Utc>,
    pub statements: u64,
    pub refused: u64,
    pub state: SessionState,
    pub last_statement: String,
}

/// How many sessions each identity has, from before its upstream connection
/// opens to the session's end ([`IdentitySlots::take`]).
#[derive(Debug, Default)]
pub struct IdentitySlots {
    held: Mutex<HashMap<String, usize>>,
}

/// One session's slot; given back when dropped.
#[derive(Debug)]
pub struct IdentitySlot<'a> {
    slots: &'a IdentitySlots,
    identity: String,
}

impl IdentitySlots {
    /// A slot for a session of `identity`, unless it has `limit` already
    /// (`limit` 0: no limit).
    pub fn take(&self, identity: &str, limit: usize) -> Option<IdentitySlot<'_>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(identity.to_string()).or_default();
        if limit > 0 && *count >= limit {
            return None;
        }
        *count += 1;
        Some(IdentitySlot {
            slots: self,
            identity: identity.to_string(),
        })
    }
}

impl Drop for IdentitySlot<'_> {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.identity) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.identity);
            }
        }
    }
}

/// Every running session of the gateway.
#[derive(Debug, Default)]
pub struct LiveSessions {
    sessions: Mutex<HashMap<String, Arc<LiveSession>>>,
}

/// Removes a session from the registry when it ends, however it ends.
#[derive(Debug)]
pub struct Registered<'a> {
    registry: &'a LiveSessions,
    pub session: Arc<LiveSession>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.session.id);
    }
}

/// Who a session is, for [`LiveSessions::register`].
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: String,
    pub identity: String,
    pub target: String,
    pub application: String,
    pub client: String,
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LiveSession>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, info: SessionInfo) -> Registered<'_> {
        let session = Arc::new(LiveSession {
            id: info.id,
            identity: info.identity,
            target: info.target,
            application: info.application,
            client: info.client,
            started: Utc::now(),
            statements: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            running: AtomicU8::new(SessionState::Idle as u8),
            upstream_busy: AtomicBool::new(false),
            last: Mutex::new(String::new()),
            kill: KillSwitch::default(),
            cancel: KillSwitch::default(),
        });
        self.lock().insert(session.id.clone(), session.clone());
        Registered {
            registry: self,
            session,
        }
    }

    /// The running sessions, oldest first.
    pub fn list(&self) -> Vec<LiveSummary> {
        let mut list: Vec<LiveSummary> = self.lock().values().map(|s| s.summary()).collect();
        list.sort_by(|a, b| a.started.cmp(&b.started).then_with(|| a.id.cmp(&b.id)));
        list
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Passes a client's CancelRequest to its session.
    /// Passes a client's cancel to its session; `true` when a statement
    /// held for approval takes it and nothing runs upstream to cancel.
    pub fn cancel(&self, id: &str) -> bool {
        let Some(session) = self.lock().get(id).cloned() else {
            return false;
        };
        session.cancel();
        session.is_held_alone()
    }

    /// Asks a session to end; `false` if there is no such session.
    pub fn kill(&self, id: &str, by: &str) -> bool {
        let session = self.lock().get(id).cloned();
        match session {
            Some(session) => {
                session.kill(by);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_gets_slots_up_to_its_limit_and_they_come_back() {
        let slots = IdentitySlots::default();
        let a = slots.take("alice", 2).unwrap();
        let b = slots.take("alice", 2).unwrap();
        assert!(slots.take("alice", 2).is_none());
        // Others are not counted against alice.
        let _bob = slots.take("bob", 2).unwrap();
        drop(a);
        let _c = slots.take("alice", 2).unwrap();
        assert!(slots.take("alice", 2).is_none());
        drop(b);
        assert!(slots.take("alice", 0).is_some(), "0 is no limit");
        assert_eq!(slots.held.lock().unwrap()["alice"], 1);
    }

    fn info(id: &str) -> SessionInfo {
        SessionInfo {
            id: id.into(),
            identity: "alice".into(),
            target: "shop".into(),
            application: "psql".into(),
            client: "127.0.0.1:5000".into(),
        }
    }

    #[test]
    fn sessions_come_and_go_with_their_registration() {
        let live = LiveSessions::default();
        {
            let a = live.register(info("a"));
            let _b = live.register(info("b"));
            a.session.note_statement(&"é".repeat(600), true);
            a.session.set_state(SessionState::Running);
            let list = live.list();
            assert_eq!(list.len(), 2);
            let a = list.iter().find(|s| s.id == "a").unwrap();
            assert_eq!((a.statements, a.refused, a.state), (1, 1, SessionState::Running));
            assert_eq!(a.last_statement.len(), 1024, "cut on a character boundary");
        }
        assert!(live.is_empty());
    }

    #[test]
    fn a_kill_wakes_the_session_and_says_who() {
        let live = LiveSessions::default();
        let a = live.register(info("a"));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut registered = None;
        assert_eq!(a.session.poll_killed(&mut cx, &mut registered), None);
        assert!(registered.is_some());
        assert_eq!(a.session.poll_killed(&mut cx, &mut registered), None);
        assert!(live.kill("a", "carol"));
        assert!(!live.kill("nope", "carol"));
        assert_eq!(
            a.session.poll_killed(&mut cx, &mut registered).as_deref(),
            Some("carol")
        );
    }
}
