//! Cancel keys. A client sees its upstream backend's real process id (drivers
//! compare it with `pg_backend_pid()`) paired with a secret key the gateway
//! made up; the real key never leaves the gateway. A CancelRequest is matched
//! on the pair and sent upstream with the real key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::protocol::backend::BackendKeyData;

/// Where a cancel for one session must go.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    /// Name of the target the session is connected to.
    pub target: String,
    /// The upstream backend's real process id and secret key.
    pub upstream: BackendKeyData,
    /// The gateway's session, which may be holding a statement for approval.
    pub session: String,
}

/// Live sessions' cancel keys, keyed by the pair the client holds.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<(i32, i32), CancelTarget>>,
}

impl CancelRegistry {
    /// Registers a session and returns the key data to give its client. The
    /// registration ends when the returned guard is dropped.
    pub fn register(
        self: &Arc<Self>,
        target: &str,
        session: &str,
        upstream: BackendKeyData,
    ) -> (BackendKeyData, CancelGuard) {
        let mut sessions = self.lock();
        let secret_key = loop {
            let candidate: i32 = rand::random();
            if candidate != 0 && !sessions.contains_key(&(upstream.process_id, candidate)) {
                break candidate;
            }
        };
        let client_key = BackendKeyData {
            process_id: upstream.process_id,
            secret_key,
        };
        sessions.insert(
            (client_key.process_id, client_key.secret_key),
            CancelTarget {
                target: target.to_string(),
                upstream,
                session: session.to_string(),
            },
        );
        let guard = CancelGuard {
            registry: Arc::clone(self),
            key: client_key,
        };
        (client_key, guard)
    }

    /// The upstream to cancel for the key a client presented, if it is live.
    pub fn lookup(&self, process_id: i32, secret_key: i32) -> Option<CancelTarget> {
        self.lock().get(&(process_id, secret_key)).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, i32), CancelTarget>> {
        // The map holds no invariant a panicking holder could break halfway.
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Removes a session's cancel key when the session ends.
#[derive(Debug)]
pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    key: BackendKeyData,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.registry.lock().remove(&(self.key.process_id, self.key.secret_key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_gets_real_pid_and_a_different_key() {
        let registry = Arc::new(CancelRegistry::default());
        let real = BackendKeyData {
            process_id: 4242,
            secret_key: 99,
        };
        let (client, guard) = registry.register("shop", "s", real);
        assert_eq!(client.process_id, 4242);
        let found = registry.lookup(client.process_id, client.secret_key).unwrap();
        assert_eq!(found.upstream, real);
        assert_eq!(found.target, "shop");
        // The real key is not accepted from clients (unless it collides by chance).
        if client.secret_key != 99 {
            assert!(registry.lookup(4242, 99).is_none());
        }
        drop(guard);
        assert!(registry.is_empty());
    }
}
