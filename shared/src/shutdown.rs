//! How sessions learn that the gateway is stopping.
//!
//! A session checks for shutdown on every event of its proxy loop, so the
//! check must cost no more than an atomic load: a `CancellationToken` future
//! locks a mutex shared by all sessions on every poll. Here each session
//! registers its task's waker once; [`Shutdown::advance`] wakes them all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};

/// Where the gateway is in stopping. Only ever moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running = 0,
    /// No new sessions; sessions end at their next idle moment.
    Draining = 1,
    /// The grace period is over; sessions end now.
    Deadline = 2,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Running,
            1 => Phase::Draining,
            _ => Phase::Deadline,
        }
    }
}

/// The gateway-wide signal.
#[derive(Debug, Default)]
pub struct Shutdown {
    phase: AtomicU8,
    next_id: AtomicU64,
    wakers: Mutex<HashMap<u64, Waker>>,
}

impl Shutdown {
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Moves to `phase` (never back) and wakes every registered session.
    pub fn advance(&self, phase: Phase) {
        self.phase.fetch_max(phase as u8, Ordering::AcqRel);
        let wakers: Vec<Waker> = self.lock().values().cloned().collect();
        for waker in wakers {
            waker.wake();
        }
    }

    /// A listener for one session.
    pub fn listener(self: &Arc<Self>) -> ShutdownListener {
        ShutdownListener {
            shutdown: Arc::clone(self),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            waker: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waker>> {
        // A waker map cannot be left half-updated by a panic.
        self.wakers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One session's view of the signal.
#[derive(Debug)]
pub struct ShutdownListener {
    shutdown: Arc<Shutdown>,
    id: u64,
    /// The waker last registered; re-registered only if the task's changes.
    waker: Option<Waker>,
}

impl ShutdownListener {
    /// The current phase, making sure this task is woken when it changes.
    /// Costs an atomic load unless the task's waker changed.
    pub fn poll_phase(&mut self, cx: &mut Context<'_>) -> Phase {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            self.shutdown.lock().insert(self.id, waker.clone());
            self.waker = Some(waker);
        }
        // Read after registering, so a change in between is not missed.
        self.shutdown.phase()
    }

    /// Resolves once the gateway starts stopping.
    pub async fn stopping(&mut self) {
        std::future::poll_fn(|cx| {
            if self.poll_phase(cx) >= Phase::Draining {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }
}

impl Drop for ShutdownListener {
    fn drop(&mut self) {
        if self.waker.is_some() {
            self.shutdown.lock().remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Poll;

    #[tokio::test]
    async fn listeners_wake_on_every_phase_change() {
        let shutdown = Arc::new(Shutdown::default());
        let mut listener = shutdown.listener();
        let waiting = tokio::spawn(async move {
            let mut seen = Vec::new();
            poll_fn(|cx| {
                let phase = listener.poll_phase(cx);
                if seen.last() != Some(&phase) {
                    seen.push(phase);
                }
                if phase == Phase::Deadline {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
            seen
        });
        tokio::task::yield_now().await;
        shutdown.advance(Phase::Draining);
        tokio::task::yield_now().await;
        shutdown.advance(Phase::Deadline);
        let seen = waiting.await.unwrap();
        assert_eq!(seen.last(), Some(&Phase::Deadline));
        assert!(shutdown.lock().is_empty(), "the listener deregistered when dropped");
    }

    #[test]
    fn phases_never_go_back() {
        let shutdown = Shutdown::default();
        shutdown.advance(Phase::Deadline);
        shutdown.advance(Phase::Draining);
        assert_eq!(shutdown.phase(), Phase::Deadline);
    }
}
