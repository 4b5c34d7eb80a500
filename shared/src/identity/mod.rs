//! Who is on the other end of a session. A client presents a bearer token as
//! its PostgreSQL password; [`Verifier`] turns it into an [`Identity`] or says
//! precisely why it cannot. An `Identity` has no public constructor: holding one
//! means a verifier accepted the token.

pub mod login;
mod oidc;
mod tokens;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::IdentityConfig;

pub use oidc::OidcVerifier;
pub use tokens::{StaticTokens, hash_token};

/// How an identity was proven.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// An OpenID Connect ID token from this issuer.
    Oidc { issuer: String },
    /// An OAuth access token this issuer gave a service (a client listed in
    /// `[[identity.oidc.services]]`) with the client credentials grant.
    OidcService { issuer: String, client_id: String },
    /// A static service token from the configuration.
    StaticToken,
    /// Named by a chat bot listed in `[[api.delegates]]`, which verified
    /// the chat user; the groups are the delegate entry's.
    Delegated { by: String },
}

/// A verified person or machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    name: String,
    subject: String,
    email: Option<String>,
    groups: Vec<String>,
    labels: BTreeMap<String, String>,
    source: IdentitySource,
    expires_at: Option<SystemTime>,
    application_name: Option<String>,
}

impl Identity {
    /// The name policy and logs use: the email for people, the token name for machines.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stable subject: the `sub` claim, or the token name.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub fn email(&self) -> Option<&str> {
        self.email.as_deref()
    }

    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    /// Free-form labels of a static token (`kind = "agent"`, `model = "..."`).
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    pub fn source(&self) -> &IdentitySource {
        &self.source
    }

    /// When the credential stops being valid; `None` for static tokens.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// The client's `application_name`, as the client reported it (not verified).
    pub fn application_name(&self) -> Option<&str> {
        self.application_name.as_deref()
    }

    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// Whether an access list entry names this identity.
    pub fn matches_name(&self, name: &str) -> bool {
        name == "*" || name == self.name || name == self.subject || self.email.as_deref() == Some(name)
    }

    /// An identity no verifier checked, for unit tests of code that takes
    /// one. Not compiled outside tests.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str, groups: Vec<String>, labels: BTreeMap<String, String>) -> Identity {
        Identity {
            name: name.to_string(),
            subject: name.to_string(),
            email: None,
            groups,
            labels,
            source: IdentitySource::StaticToken,
            expires_at: None,
            application_name: None,
        }
    }

    /// A person a chat bot decides for: `[[api.delegates]]` names them and
    /// their groups. Used only for approval decisions, never for sessions.
    pub(crate) fn delegated(name: &str, groups: &[String], by: &str) -> Identity {
        Identity {
            name: name.to_string(),
            subject: name.to_string(),
            email: name.contains('@').then(|| name.to_string()),
            groups: groups.to_vec(),
            labels: BTreeMap::new(),
            source: IdentitySource::Delegated { by: by.to_string() },
            expires_at: None,
            application_name: None,
        }
    }

    /// Attaches the application name the client reported at startup.
    pub(crate) fn with_application_name(mut self, application_name: Option<&str>) -> Identity {
        self.application_name = application_name.filter(|name| !name.is_empty()).map(str::to_string);
        self
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Why a token was refused. Messages go to the client as they are: they say
/// what was wrong and what to do, and never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token was sent: use your Sluice token (or `sluice token`) as the password")]
    Empty,
    #[error("token not recognised: it is neither a configured service token nor an ID token")]
    UnknownToken,
    #[error("the token looks like an ID token, but this gateway has no OIDC issuer configured")]
    OidcNotConfigured,
    #[error("the ID token is malformed: {0}")]
    Malformed(String),
    #[error("the ID token expired at {at}: sign in again (sluice login) and reconnect")]
    Expired { at: String },
    #[error("the ID token is not valid before {at}: check the clock of this machine or the issuer")]
    NotYetValid { at: String },
    #[error("the ID token was issued by {found}, but this gateway trusts only {expected}")]
    WrongIssuer { expected: String, found: String },
    #[error("the ID token is for audience {found}, not for this gateway (expected {expected})")]
    WrongAudience { expected: String, found: String },
    #[error("the ID token is signed with algorithm {alg}, which this gateway does not accept (allowed: {allowed})")]
    DisallowedAlgorithm { alg: String, allowed: String },
    #[error("the ID token is signed with key {kid}, which the issuer does not publish")]
    UnknownKey { kid: String },
    #[error("the ID token's signature does not verify against the issuer's published keys")]
    BadSignature,
    #[error("cannot verify the ID token right now: the issuer {issuer} is unreachable ({reason})")]
    IssuerUnavailable { issuer: String, reason: String },
    #[error("the service's access token names no client (no client_id, azp, appid or cid claim)")]
    NoClientId,
    #[error("this is an access token, not an ID token: sign in with sluice login and use sluice token")]
    NotAnIdToken,
    #[error(
        "the access token is for client {client_id}, which this gateway does not accept as a service ([[identity.oidc.services]])"
    )]
    UnknownService { client_id: String },
    #[error(
        "the access token of client {client_id} names another subject: only the service's own client-credentials tokens are accepted"
    )]
    NotTheService { client_id: String },
}

impl AuthError {
    /// SQLSTATE sent with the error: 28P01 when the credential itself is bad,
    /// 28000 when it could not be checked or is not usable here.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::IssuerUnavailable { .. } | AuthError::OidcNotConfigured => "28000",
            _ => "28P01",
        }
    }

    /// A short stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthError::Empty => "empty",
            AuthError::UnknownToken => "unknown_token",
            AuthError::OidcNotConfigured => "oidc_not_configured",
            AuthError::Malformed(_) => "malformed",
            AuthError::Expired { .. } => "expired",
            AuthError::NotYetValid { .. } => "not_yet_valid",
            AuthError::WrongIssuer { .. } => "wrong_issuer",
            AuthError::WrongAudience { .. } => "wrong_audience",
            AuthError::DisallowedAlgorithm { .. } => "disallowed_algorithm",
            AuthError::UnknownKey { .. } => "unknown_key",
            AuthError::BadSignature => "bad_signature",
            AuthError::IssuerUnavailable { .. } => "issuer_unavailable",
            AuthError::NoClientId => "no_client_id",
            AuthError::NotAnIdToken => "not_an_id_token",
            AuthError::UnknownService { .. } => "unknown_service",
            AuthError::NotTheService { .. } => "not_the_service",
        }
    }
}

/// Verifies tokens from every configured source.
pub struct Verifier {
    tokens: StaticTokens,
    oidc: Option<Arc<OidcVerifier>>,
}

impl Verifier {
    /// Builds the verifiers. OIDC discovery happens on first use (or with
    /// [`Verifier::warm_up`]), so a gateway starts even while its issuer is down.
    pub fn new(config: &IdentityConfig) -> Verifier {
        Verifier {
            tokens: StaticTokens::new(&config.tokens),
            oidc: config
                .oidc
                .as_ref()
                .map(|oidc| Arc::new(OidcVerifier::new(oidc.clone()))),
        }
    }

    /// Fetches the issuer's metadata and keys ahead of the first client.
    pub async fn warm_up(&self) -> Result<(), AuthError> {
        match &self.oidc {
            Some(oidc) => oidc.warm_up().await,
            None => Ok(()),
        }
    }

    /// Verifies a bearer token.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Empty);
        }
        if let Some(identity) = self.tokens.verify(token) {
            return Ok(identity);
        }
        if looks_like_jwt(token) {
            return match &self.oidc {
                Some(oidc) => oidc.verify(token).await,
                None => Err(AuthError::OidcNotConfigured),
            };
        }
        Err(AuthError::UnknownToken)
    }
}

/// A compact JWS: three base64url parts, the first a JSON object.
fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ")
        && token.split('.').count() == 3
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StaticTokenConfig;

    fn verifier() -> Verifier {
        Verifier::new(&IdentityConfig {
            oidc: None,
            tokens: vec![StaticTokenConfig {
                name: "deployer".into(),
                sha256: hash_token("s3cret-token"),
                groups: vec!["ci".into()],
                labels: BTreeMap::from([("kind".into(), "agent".into())]),
            }],
            ..IdentityConfig::default()
        })
    }

    #[tokio::test]
    async fn static_token_verifies() {
        let identity = verifier().verify("s3cret-token").await.unwrap();
        assert_eq!(identity.name(), "deployer");
        assert!(identity.in_group("ci"));
        assert_eq!(identity.labels()["kind"], "agent");
        assert_eq!(identity.source(), &IdentitySource::StaticToken);
        assert!(identity.matches_name("deployer") && identity.matches_name("*"));
        assert!(!identity.matches_name("someone-else"));
    }

    #[tokio::test]
    async fn unknown_and_empty_tokens_are_refused() {
        let v = verifier();
        assert_eq!(v.verify("nope").await, Err(AuthError::UnknownToken));
        assert_eq!(v.verify("  ").await, Err(AuthError::Empty));
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
        assert_eq!(v.verify(jwt).await, Err(AuthError::OidcNotConfigured));
    }

    #[test]
    fn error_messages_never_carry_the_token() {
        // The variants take no token argument; this guards the wording of the
        // two that a client sees most.
        assert!(!AuthError::UnknownToken.to_string().contains("s3cret"));
        assert_eq!(AuthError::BadSignature.sqlstate(), "28P01");
    }
}
