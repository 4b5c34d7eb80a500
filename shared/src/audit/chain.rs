//! The hash chain and its signatures: what makes the trail tamper-evident.
//!
//! Each event's hash covers its position, the previous event's hash and its
//! stored JSON, so editing, removing or reordering a row breaks every link
//! after it. That alone does not stop someone who rewrites the whole table
//! and recomputes every hash; so at intervals the writer signs the chain's
//! head (position and hash) with the gateway's Ed25519 key, which lives in a
//! file outside the database, and keeps the newest signed head in a second
//! file beside it. Verifying needs only the public key.

use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};
use sha2::{Digest, Sha256};

use super::AuditError;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The `prev_hash` of the first event.
pub const GENESIS: Hash = [0; 32];

const EVENT_DOMAIN: &[u8] = b"sluice-audit-event-v1\0";
const HEAD_DOMAIN: &[u8] = b"sluice-audit-head-v1\0";

/// The hash of the event at `id` with this stored JSON, after `prev`.
pub fn event_hash(id: u64, prev: &Hash, json: &str) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(EVENT_DOMAIN);
    hasher.update(id.to_be_bytes());
    hasher.update(prev);
    hasher.update(json.as_bytes());
    hasher.finalize().into()
}

/// What a head signature covers.
fn head_message(id: u64, hash: &Hash) -> Vec<u8> {
    let mut message = Vec::with_capacity(HEAD_DOMAIN.len() + 8 + 32);
    message.extend_from_slice(HEAD_DOMAIN);
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(hash);
    message
}

/// A signed chain head: the event at `id` has `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHead {
    pub id: u64,
    pub hash: Hash,
    pub signature: Vec<u8>,
}

impl SignedHead {
    /// The head file's text: one line, `id hash signature` (hex).
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {}\n",
            self.id,
            hex::encode(self.hash),
            hex::encode(&self.signature)
        )
    }

    pub fn parse(text: &str) -> Option<SignedHead> {
        let mut parts = text.split_whitespace();
        let id = parts.next()?.parse().ok()?;
        let hash = hex::decode(parts.next()?).ok()?.try_into().ok()?;
        let signature = hex::decode(parts.next()?).ok()?;
        parts.next().is_none().then_some(SignedHead { id, hash, signature })
    }

    /// Whether the signature is the key's over this head.
    pub fn verify(&self, public_key: &PublicKey) -> bool {
        public_key.verify(&head_message(self.id, &self.hash), &self.signature)
    }
}

/// The gateway's signing key.
pub struct Signer {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public_key", &self.public_key().to_hex())
            .finish()
    }
}

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

impl Signer {
    /// Reads the key file (PKCS#8 PEM, as `openssl genpkey -algorithm
    /// ed25519` writes it), or creates one readable only by its owner when
    /// there is none yet.
    pub fn load_or_create(path: &Path) -> Result<Signer, AuditError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Signer::from_pem(&text).map_err(|reason| AuditError::Key {
                path: path.to_path_buf(),
                reason,
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| AuditError::Key {
                    path: path.to_path_buf(),
                    reason: "the system's random number generator failed".into(),
                })?;
                let pem = to_pem(pkcs8.as_ref());
                write_private(path, pem.as_bytes()).map_err(|err| AuditError::Key {
                    path: path.to_path_buf(),
                    reason: format!("cannot create it: {err}"),
                })?;
                tracing::info!(path = %path.display(), "created the audit signing key");
                Signer::from_pem(&pem).map_err(|reason| AuditError::Key {
                    path: path.to_path_buf(),
                    reason,
                })
            }
            Err(err) => Err(AuditError::Key {
                path: path.to_path_buf(),
                reason: format!("cannot read it: {err}"),
            }),
        }
    }

    pub fn from_pem(text: &str) -> Result<Signer, String> {
        let body = text
            .trim()
            .strip_prefix(PEM_BEGIN)
            .and_then(|t| t.strip_suffix(PEM_END))
            .ok_or("not a PEM private key (BEGIN PRIVATE KEY)")?;
        let der = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            body.split_whitespace().collect::<String>(),
        )
        .map_err(|e| format!("the PEM body is not base64: {e}"))?;
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
        Ok(Signer { pair })
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.pair.public_key().as_ref().try_into().unwrap_or([0; 32]))
    }

    pub fn sign_head(&self, id: u64, hash: Hash) -> SignedHead {
        SignedHead {
            id,
            hash,
            signature: self.pair.sign(&head_message(id, &hash)).as_ref().to_vec(),
        }
    }
}

fn to_pem(der: &[u8]) -> String {
    let body = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der);
    let mut pem = String::from(PEM_BEGIN);
    pem.push('\n');
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(PEM_END);
    pem.push('\n');
    pem
}

/// Creates a file only its owner can read (it must not exist yet).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// An Ed25519 public key: what auditors verify the trail with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// 64 hex digits.
    pub fn parse(text: &str) -> Option<PublicKey> {
        hex::decode(text.trim()).ok()?.try_into().ok().map(PublicKey)
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

/// Replaces a file's content atomically (write beside it, then rename),
/// on disk before the rename when `sync`.
pub fn replace_file(path: &Path, text: &str, sync: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    if sync {
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_verify_only_with_their_key_and_content() {
        let dir = std::env::temp_dir().join(format!("sluice-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.key");
        let _ = std::fs::remove_file(&path);
        let signer = Signer::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // The same key comes back from the file.
        let again = Signer::load_or_create(&path).unwrap();
        assert_eq!(again.public_key(), signer.public_key());

        let hash = event_hash(1, &GENESIS, "{}");
        assert_ne!(hash, event_hash(2, &GENESIS, "{}"));
        assert_ne!(hash, event_hash(1, &hash, "{}"));
        let head = signer.sign_head(1, hash);
        assert!(head.verify(&signer.public_key()));
        let parsed = SignedHead::parse(&head.to_line()).unwrap();
        assert_eq!(parsed, head);
        let mut other = head.clone();
        other.id = 2;
        assert!(!other.verify(&signer.public_key()));
        let stranger = Signer::from_pem(&to_pem(
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap().as_ref(),
        ))
        .unwrap();
        assert!(!head.verify(&stranger.public_key()));
        assert_eq!(
            PublicKey::parse(&signer.public_key().to_hex()),
            Some(signer.public_key())
        );
        assert!(Signer::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
