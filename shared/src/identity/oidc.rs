//! OpenID Connect ID tokens, verified with the `openidconnect` crate against
//! the issuer's published keys: discovery, a cached key set, one refresh when a
//! token names a key the cache does not hold, a fixed list of algorithms, and
//! `iss`, `aud`, `exp` and `nbf` checks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use openidconnect::core::{
    CoreGenderClaim, CoreIdTokenVerifier, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm, CoreProviderMetadata,
};
use openidconnect::{
    AdditionalClaims, ClaimsVerificationError, ClientId, IdToken, IssuerUrl, JsonWebKeySetUrl, JsonWebTokenType,
    SignatureVerificationError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock};

use super::{AuthError, Identity, IdentitySource};
use crate::config::OidcConfig;

/// Clock skew tolerated for `nbf`: the issuer's clock may run a little ahead.
const NBF_LEEWAY: Duration = Duration::from_secs(30);

/// Every claim beyond the standard ones, so the groups claim can be configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExtraClaims {
    #[serde(flatten)]
    rest: HashMap<String, serde_json::Value>,
}

impl AdditionalClaims for ExtraClaims {}

type SluiceIdToken = IdToken<ExtraClaims, CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm>;

/// Verifiers over the issuer's keys: one for people's ID tokens, one for
/// services' access tokens (when `service_audience` is set).
struct Verifiers {
    id: CoreIdTokenVerifier<'static>,
    service: Option<CoreIdTokenVerifier<'static>>,
}

/// The issuer's keys as last fetched.
struct Keys {
    verifier: Arc<Verifiers>,
    fetched_at: Instant,
}

/// What discovery told us and when the key set was last requested.
#[derive(Default)]
struct FetchState {
    /// Learnt from discovery; later fetches go straight to it.
    jwks_uri: Option<JsonWebKeySetUrl>,
    last_attempt: Option<Instant>,
    /// Why the last attempt failed, answered while attempts are rate-limited.
    last_error: Option<AuthError>,
}

/// Verifies ID tokens of one issuer.
pub struct OidcVerifier {
    config: OidcConfig,
    algorithms: Vec<CoreJwsSigningAlgorithm>,
    http: reqwest::Client,
    keys: RwLock<Option<Keys>>,
    /// Serialises fetches so a burst of unknown `kid`s costs the issuer one request.
    fetch: Mutex<FetchState>,
}

impl OidcVerifier {
    pub fn new(config: OidcConfig) -> OidcVerifier {
        let algorithms = config
            .algorithms
            .iter()
            .filter_map(|alg| serde_json::from_value(serde_json::Value::String(alg.clone())).ok())
            .collect();
        // Redirects are never followed: a redirected discovery or key request
        // could be steered to keys the issuer never published.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.http_timeout)
            .build()
            .unwrap_or_default();
        OidcVerifier {
            config,
            algorithms,
            http,
            keys: RwLock::new(None),
            fetch: Mutex::new(FetchState::default()),
        }
    }

    pub async fn warm_up(&self) -> Result<(), AuthError> {
        self.current_keys().await.map(|_| ())
    }

    pub async fn verify(&self, raw: &str) -> Result<Identity, AuthError> {
        let token: SluiceIdToken = raw
            .parse()
            .map_err(|err: serde_json::Error| AuthError::Malformed(err.to_string()))?;
        // A service's access token is told apart by its audience (read
        // unverified to choose the verifier, which then checks everything).
        let service = self
            .config
            .service_audience
            .as_deref()
            .filter(|aud| unverified_audiences(&token).iter().any(|a| a == aud));
        fn pick(verifiers: &Verifiers, service: bool) -> &CoreIdTokenVerifier<'static> {
            match &verifiers.service {
                Some(verifier) if service => verifier,
                _ => &verifiers.id,
            }
        }
        let verifier = self.current_keys().await?;
        let claims = match token.claims(pick(&verifier, service.is_some()), no_nonce) {
            Err(ClaimsVerificationError::SignatureVerification(SignatureVerificationError::NoMatchingKey)) => {
                // The issuer may have rotated its keys: fetch them once more.
                let verifier = self.refresh_keys(Some(&verifier)).await?;
                token.claims(pick(&verifier, service.is_some()), no_nonce)
            }
            other => other,
        };
        let audience = service.unwrap_or(&self.config.audience);
        let claims = claims.map_err(|err| self.describe(err, &token, audience))?;

        if let Some(nbf) = claims.additional_claims().rest.get("nbf").and_then(|v| v.as_i64()) {
            let not_before = DateTime::<Utc>::from_timestamp(nbf, 0).unwrap_or(DateTime::<Utc>::MAX_UTC);
            if not_before > Utc::now() + NBF_LEEWAY {
                return Err(AuthError::NotYetValid {
                    at: not_before.to_rfc3339(),
                });
            }
        }

        if service.is_some() {
            return self.service_identity(claims);
        }
        let extra = &claims.additional_claims().rest;
        // Providers type their access tokens `JWT` too (Entra, Okta,
        // Keycloak); one made for an API on the people's client id would
        // carry its audience. Their claims give them away.
        let text = |claim: &str| extra.get(claim).and_then(|v| v.as_str());
        let access_claims = ["scp", "client_id", "cid"]
            .iter()
            .any(|claim| extra.contains_key(*claim));
        // OIDC Core: an `azp` (Entra v1: `appid`) must be our client id.
        let other_party = claims
            .authorized_party()
            .map(|azp| azp.as_str().to_string())
            .or_else(|| text("appid").map(str::to_string))
            .is_some_and(|party| party != self.config.audience);
        if access_claims
            || other_party
            || text("idtyp") == Some("app")
            || text("token_use") == Some("access")
            || text("typ").is_some_and(|typ| !typ.eq_ignore_ascii_case("ID"))
        {
            return Err(AuthError::NotAnIdToken);
        }
        let groups = match extra.get(&self.config.groups_claim) {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_string))
                .collect(),
            Some(serde_json::Value::String(single)) => vec![single.clone()],
            _ => Vec::new(),
        };
        let subject = claims.subject().to_string();
        let email = claims.email().map(|email| email.to_string());
        Ok(Identity {
            name: email.clone().unwrap_or_else(|| subject.clone()),
            subject,
            email,
            groups,
            labels: Default::default(),
            source: IdentitySource::Oidc {
                issuer: self.config.issuer.clone(),
            },
            expires_at: Some(SystemTime::from(claims.expiration())),
            application_name: None,
        })
    }

    /// The service a client-credentials access token stands for: its client
    /// must be listed in `services`, and its subject be that client's (not
    /// a person's token obtained through the same client).
    fn service_identity(
        &self,
        claims: &openidconnect::IdTokenClaims<ExtraClaims, CoreGenderClaim>,
    ) -> Result<Identity, AuthError> {
        let extra = &claims.additional_claims().rest;
        let claim = |name: &str| extra.get(name).and_then(|v| v.as_str()).map(str::to_string);
        // RFC 9068 says client_id; Keycloak and Entra put it in azp (Entra
        // v1: appid), Okta in cid.
        let client_id = claim("client_id")
            .or_else(|| claims.authorized_party().map(|azp| azp.to_string()))
            .or_else(|| claim("appid"))
            .or_else(|| claim("cid"))
            .ok_or(AuthError::NoClientId)?;
        let Some(service) = self.config.services.iter().find(|s| s.client_id == client_id) else {
            return Err(AuthError::UnknownService { client_id });
        };
        if claims.subject().as_str() != service.subject {
            return Err(AuthError::NotTheService { client_id });
        }
        Ok(Identity {
            name: service.name.clone(),
            subject: claims.subject().to_string(),
            email: None,
            groups: service.groups.clone(),
            labels: service.labels.clone(),
            source: IdentitySource::OidcService {
                issuer: self.config.issuer.clone(),
                client_id,
            },
            expires_at: Some(SystemTime::from(claims.expiration())),
            application_name: None,
        })
    }

    /// The cached verifier, fetched first if there is none or it is stale.
    async fn current_keys(&self) -> Result<Arc<Verifiers>, AuthError> {
        {
            let keys = self.keys.read().await;
            if let Some(keys) = keys.as_ref()
                && keys.fetched_at.elapsed() < self.config.jwks_refresh
            {
                return Ok(keys.verifier.clone());
            }
        }
        self.refresh_keys(None).await
    }

    /// Fetches the key set again, unless another task just did or the last
    /// attempt was less than `min_refresh_interval` ago. `seen` is the
    /// verifier the caller found wanting (it lacked a token's `kid`); if the
    /// cache holds another one by now, that one is returned without a request.
    async fn refresh_keys(&self, seen: Option<&Arc<Verifiers>>) -> Result<Arc<Verifiers>, AuthError> {
        let mut fetch = self.fetch.lock().await;
        let cached = self
            .keys
            .read()
            .await
            .as_ref()
            .map(|keys| (keys.verifier.clone(), keys.fetched_at));
        if let Some((verifier, fetched_at)) = &cached {
            let fresh = fetched_at.elapsed() < self.config.jwks_refresh;
            match seen {
                None if fresh => return Ok(verifier.clone()),
                Some(seen) if !Arc::ptr_eq(seen, verifier) => return Ok(verifier.clone()),
                _ => {}
            }
        }
        let too_soon = fetch
            .last_attempt
            .is_some_and(|at| at.elapsed() < self.config.min_refresh_interval);
        if too_soon {
            return match (cached, &fetch.last_error) {
                (Some((verifier, _)), _) => Ok(verifier),
                (None, Some(err)) => Err(err.clone()),
                (None, None) => Err(self.unavailable("the key set is being fetched".to_string())),
            };
        }
        fetch.last_attempt = Some(Instant::now());
        match self.fetch_keys(&mut fetch).await {
            Ok(verifier) => {
                fetch.last_error = None;
                *self.keys.write().await = Some(Keys {
                    verifier: verifier.clone(),
                    fetched_at: Instant::now(),
                });
                Ok(verifier)
            }
            Err(err) => {
                fetch.last_error = Some(err.clone());
                match cached {
                    // A periodic refresh failed: the keys we have are still the
                    // issuer's, so keep using them until it answers again.
                    Some((verifier, _)) if seen.is_none() => Ok(verifier),
                    _ => Err(err),
                }
            }
        }
    }

    async fn fetch_keys(&self, fetch: &mut FetchState) -> Result<Arc<Verifiers>, AuthError> {
        let jwks = match fetch.jwks_uri.clone() {
            Some(uri) => CoreJsonWebKeySet::fetch_async(&uri, &self.http).await.map_err(|err| {
                self.unavailable(format!("fetching keys from {}: {}", uri.as_str(), error_chain(&err)))
            })?,
            None => {
                let issuer = IssuerUrl::new(self.config.issuer.clone())
                    .map_err(|err| self.unavailable(format!("bad issuer URL: {err}")))?;
                let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
                    .await
                    .map_err(|err| self.unavailable(format!("discovery: {}", error_chain(&err))))?;
                fetch.jwks_uri = Some(metadata.jwks_uri().clone());
                metadata.jwks().clone()
            }
        };
        tracing::info!(
            issuer = %self.config.issuer,
            keys = jwks.keys().len(),
            "fetched the issuer's signing keys"
        );
        Ok(Arc::new(self.build_verifier(jwks)?))
    }

    fn build_verifier(&self, jwks: CoreJsonWebKeySet) -> Result<Verifiers, AuthError> {
        let issuer = IssuerUrl::new(self.config.issuer.clone())
            .map_err(|err| self.unavailable(format!("bad issuer URL: {err}")))?;
        // People: ID tokens only (typ JWT or none; an `at+jwt` access token
        // is refused), for Sluice's client id.
        let id = CoreIdTokenVerifier::new_public_client(
            ClientId::new(self.config.audience.clone()),
            issuer.clone(),
            jwks.clone(),
        )
        .set_allowed_algs(self.algorithms.clone());
        // Services: access tokens for the service audience, `at+jwt` (RFC
        // 9068) or plain JWT as most providers still type them.
        let service = self.config.service_audience.as_ref().map(|aud| {
            let types = ["at+jwt", "application/at+jwt", "JWT", "application/jwt"]
                .into_iter()
                .filter_map(|t| JsonWebTokenType::new(t.to_string()).normalize().ok());
            CoreIdTokenVerifier::new_public_client(ClientId::new(aud.clone()), issuer.clone(), jwks.clone())
                .set_allowed_algs(self.algorithms.clone())
                .set_allowed_jose_types(types)
        });
        Ok(Verifiers { id, service })
    }

    fn unavailable(&self, reason: String) -> AuthError {
        tracing::warn!(issuer = %self.config.issuer, %reason, "OIDC issuer unavailable");
        AuthError::IssuerUnavailable {
            issuer: self.config.issuer.clone(),
            reason,
        }
    }

    /// Turns the crate's error into one that tells the client what was wrong.
    fn describe(&self, err: ClaimsVerificationError, token: &SluiceIdToken, audience: &str) -> AuthError {
        match err {
            ClaimsVerificationError::Expired(message) => AuthError::Expired {
                at: expired_at(&message),
            },
            ClaimsVerificationError::InvalidIssuer(message) => AuthError::WrongIssuer {
                expected: self.config.issuer.clone(),
                found: found_in(&message),
            },
            ClaimsVerificationError::InvalidAudience(message) => AuthError::WrongAudience {
                expected: audience.to_string(),
                found: found_in(&message),
            },
            ClaimsVerificationError::SignatureVerification(sig) => match sig {
                SignatureVerificationError::NoMatchingKey => AuthError::UnknownKey { kid: header_kid(token) },
                SignatureVerificationError::DisallowedAlg(_) | SignatureVerificationError::UnsupportedAlg(_) => {
                    AuthError::DisallowedAlgorithm {
                        alg: header_alg(token),
                        allowed: self.config.algorithms.join(", "),
                    }
                }
                SignatureVerificationError::NoSignature => AuthError::DisallowedAlgorithm {
                    alg: "none".to_string(),
                    allowed: self.config.algorithms.join(", "),
                },
                _ => AuthError::BadSignature,
            },
            other => AuthError::Malformed(other.to_string()),
        }
    }
}

/// Sluice asks for no nonce: the token arrives as a password, not from a
/// redirect the gateway started.
fn no_nonce(_: Option<&openidconnect::Nonce>) -> Result<(), String> {
    Ok(())
}

fn header_kid(token: &SluiceIdToken) -> String {
    unverified_header(token)
        .and_then(|h| h.get("kid").and_then(|k| k.as_str()).map(str::to_string))
        .unwrap_or_else(|| "(none)".to_string())
}

fn header_alg(token: &SluiceIdToken) -> String {
    unverified_header(token)
        .and_then(|h| h.get("alg").and_then(|k| k.as_str()).map(str::to_string))
        .unwrap_or_else(|| "(none)".to_string())
}

/// The `aud` values of a token, unverified: only to choose which verifier
/// checks it.
fn unverified_audiences(token: &SluiceIdToken) -> Vec<String> {
    use base64::Engine;
    let Some(payload) = serde_json::to_value(token)
        .ok()
        .and_then(|raw| raw.as_str().and_then(|s| s.split('.').nth(1)).map(str::to_string))
    else {
        return Vec::new();
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')) else {
        return Vec::new();
    };
    match serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|claims| claims.get("aud").cloned())
    {
        Some(serde_json::Value::String(aud)) => vec![aud],
        Some(serde_json::Value::Array(auds)) => auds
            .into_iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// The JOSE header, for error messages only: never trusted for a decision.
fn unverified_header(token: &SluiceIdToken) -> Option<serde_json::Value> {
    use base64::Engine;
    let raw = serde_json::to_value(token).ok()?;
    let header = raw.as_str()?.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The crate reports mismatches as "expected `x` (found `y`)"; keep the found part.
fn found_in(message: &str) -> String {
    match message.split_once("found") {
        Some((_, rest)) => rest
            .trim()
            .trim_start_matches("audiences:")
            .trim()
            .trim_end_matches(')')
            .to_string(),
        None => message.to_string(),
    }
}

/// The crate reports "ID token expired at <time> (current time is <time>)".
fn expired_at(message: &str) -> String {
    message
        .strip_prefix("ID token expired at ")
        .and_then(|rest| rest.split(" (").next())
        .unwrap_or(message)
        .to_string()
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        out.push_str(": ");
        out.push_str(&err.to_string());
        source = err.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_messages_keep_the_found_value() {
        assert_eq!(found_in("expected `https://a` (found `https://b`)"), "`https://b`");
        assert_eq!(found_in("must contain `sluice` (found audiences: `other`)"), "`other`");
        assert_eq!(
            expired_at("ID token expired at 2026-01-01 00:00:00 UTC (current time is 2026-02-01)"),
            "2026-01-01 00:00:00 UTC"
        );
    }
}
