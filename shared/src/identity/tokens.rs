//! Static service tokens: configured by their SHA-256 only, so the file that
//! lists them grants nothing to whoever reads it.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::{Identity, IdentitySource};
use crate::config::StaticTokenConfig;

/// SHA-256 of a token, as configured in `[[identity.tokens]] sha256`.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The configured service tokens, looked up by hash.
pub struct StaticTokens {
    by_hash: HashMap<[u8; 32], Identity>,
}

impl StaticTokens {
    pub fn new(tokens: &[StaticTokenConfig]) -> StaticTokens {
        let by_hash = tokens
            .iter()
            .map(|token| {
                let identity = Identity {
                    name: token.name.clone(),
                    subject: token.name.clone(),
                    email: None,
                    groups: token.groups.clone(),
                    labels: token.labels.clone(),
                    source: IdentitySource::StaticToken,
                    expires_at: None,
                    application_name: None,
                };
                (token.sha256, identity)
            })
            .collect();
        StaticTokens { by_hash }
    }

    /// The identity of a presented token. The lookup is by hash, so its timing
    /// says nothing about how close a guess came to a real token.
    pub fn verify(&self, token: &str) -> Option<Identity> {
        self.by_hash.get(&hash_token(token)).cloned()
    }
}
