//! What the gateway must remember about prepared statements and portals by
//! name, kept until the server confirms the name means something else.
//!
//! A client's Parse, Bind or Close may fail, or be skipped after an earlier
//! error in its batch: PostgreSQL never replaces a named statement with a
//! Parse of the same name, and skips everything up to Sync after an error.
//! Forgetting what was known about a name when the message is sent would
//! let a client wipe a restriction with a message the server never carries
//! out. So facts are added when the client's message is seen, and dropped
//! only when the server confirms a later Parse, Bind or Close of that name
//! (ParseComplete, BindComplete, CloseComplete). Until then every fact
//! recorded for the name applies: the strictest reading.

use std::collections::HashMap;

/// Facts by name, each with the sequence number of the message that
/// recorded it.
#[derive(Debug)]
pub(crate) struct Remembered<T> {
    by_name: HashMap<String, Vec<(u64, T)>>,
}

impl<T> Default for Remembered<T> {
    fn default() -> Self {
        Remembered {
            by_name: HashMap::new(),
        }
    }
}

impl<T> Remembered<T> {
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Records a fact about `name`, from the message numbered `seq`.
    pub fn add(&mut self, name: &str, seq: u64, fact: T) {
        self.by_name.entry(name.to_string()).or_default().push((seq, fact));
    }

    /// Every fact still recorded for `name`.
    pub fn get(&self, name: &str) -> impl Iterator<Item = &T> {
        self.by_name.get(name).into_iter().flatten().map(|(_, fact)| fact)
    }

    /// The facts the message numbered `seq` recorded about `name`.
    pub fn get_exact(&self, name: &str, seq: u64) -> impl Iterator<Item = &T> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .filter(move |(at, _)| *at == seq)
            .map(|(_, fact)| fact)
    }

    /// Every fact, whatever its name.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.by_name.values().flatten().map(|(_, fact)| fact)
    }

    /// How many facts are recorded for `name`.
    pub fn count(&self, name: &str) -> usize {
        self.by_name.get(name).map_or(0, Vec::len)
    }

    /// Forgets every fact about `name` (the unnamed statement's masking
    /// flag, which each Parse of it sets anew: a Parse the server skips
    /// follows an error, which sets the flag to sensitive again).
    pub fn forget(&mut self, name: &str) {
        self.by_name.remove(name);
    }

    /// The server confirmed the message numbered `seq` about `name`: what
    /// earlier messages recorded no longer applies.
    pub fn confirmed(&mut self, name: &str, seq: u64) {
        if let Some(facts) = self.by_name.get_mut(name) {
            facts.retain(|(at, _)| *at >= seq);
            if facts.is_empty() {
                self.by_name.remove(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_go_only_when_a_later_message_is_confirmed() {
        let mut facts = Remembered::default();
        facts.add("s", 1, "prepared under grant a");
        // A second Parse of "s" (number 2) that the server rejects: nothing
        // is confirmed, both facts apply.
        facts.add("s", 2, "prepared under grant b");
        assert_eq!(facts.get("s").count(), 2);
        // A Close (3) then Parse (4) the server confirms: only what the
        // confirmed Parse recorded is left.
        facts.add("s", 4, "prepared under grant c");
        facts.confirmed("s", 3);
        assert_eq!(facts.get("s").copied().collect::<Vec<_>>(), ["prepared under grant c"]);
        facts.confirmed("s", 5);
        assert!(facts.is_empty());
        assert_eq!(facts.get("other").count(), 0);
    }
}
