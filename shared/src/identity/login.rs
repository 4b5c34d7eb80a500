//! Signing in from a person's machine (`sluice login`), the client side of
//! OpenID Connect: the authorization code flow with PKCE and a loopback
//! redirect, the refresh of an expiring ID token, and the per-issuer token
//! cache (a file only its owner can read). The gateway verifies what this
//! produces with [`super::OidcVerifier`]; nothing here is trusted by it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge,
    RedirectUrl, RefreshToken, Scope, TokenResponse,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long the browser may take to come back to the loopback redirect.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(300);

/// A token this close to its expiry is refreshed before use.
const REFRESH_AHEAD: i64 = 60;

/// Why signing in (or refreshing) failed, said for a person.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Provider(String),
    #[error("the sign-in was not completed within {} minutes; run sluice login again", LOGIN_TIMEOUT.as_secs() / 60)]
    TimedOut,
    #[error("the identity provider refused the sign-in: {0}")]
    Refused(String),
    #[error("not signed in to {0}: run sluice login")]
    NotSignedIn(String),
    #[error("the session with {issuer} has ended ({why}): run sluice login")]
    Expired { issuer: String, why: String },
    #[error("token cache {path}: {why}")]
    Cache { path: PathBuf, why: String },
}

/// What the cache keeps for one issuer. Its `Debug` hides the tokens.
#[derive(Clone, Serialize, Deserialize)]
pub struct Tokens {
    pub issuer: String,
    pub client_id: String,
    /// The ID token: what clients present to the gateway.
    pub id_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// The claims of an ID token that people want to see (`sluice whoami`).
#[derive(Debug, Clone, Default)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub email: Option<String>,
    pub groups: Vec<String>,
    pub exp: i64,
    /// When it was issued; 0 when the token does not say.
    pub iat: i64,
}

impl Claims {
    /// How long before `exp` to renew, aiming for `ahead`: no more than
    /// half the token's life (so a short-lived token is not renewed the
    /// moment it arrives), but never less than the minute `fresh` keeps.
    pub fn renew_ahead(&self, ahead: i64) -> i64 {
        let life = self.exp - self.iat;
        let capped = if self.iat > 0 && life > 0 {
            ahead.min(life / 2)
        } else {
            ahead
        };
        capped.max(ahead.min(REFRESH_AHEAD))
    }
}

/// Text from the provider or a token, made safe for a terminal.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() || crate::text::is_invisible(c) {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// The claims of a token (an ID token, or a service's JWT access token),
/// read without verifying it: for showing, and for knowing when to renew.
/// Each claim is read on its own: one of an odd type (a groups string, a
/// fractional `exp`) does not lose the others.
pub fn token_claims(token: &str) -> Claims {
    let payload: serde_json::Value = token
        .split('.')
        .nth(1)
        .and_then(|payload| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok())
        .and_then(|json| serde_json::from_slice(&json).ok())
        .unwrap_or_default();
    let text = |key: &str| payload[key].as_str().map(printable);
    let groups = match &payload["groups"] {
        serde_json::Value::Array(items) => items.iter().filter_map(|g| g.as_str()).map(printable).collect(),
        serde_json::Value::String(one) => vec![printable(one)],
        _ => Vec::new(),
    };
    Claims {
        sub: text("sub").unwrap_or_default(),
        iss: text("iss").unwrap_or_default(),
        email: text("email"),
        groups,
        exp: payload["exp"].as_f64().map_or(0, |e| e as i64),
        iat: payload["iat"].as_f64().map_or(0, |e| e as i64),
    }
}

impl Tokens {
    /// The ID token's claims, read without verifying it (it came from the
    /// provider over TLS and was verified at sign-in; the gateway verifies
    /// it again at every use).
    pub fn claims(&self) -> Claims {
        token_claims(&self.id_token)
    }

    /// Whether the ID token is expired, or will be within a minute.
    pub fn expiring(&self, now: i64) -> bool {
        self.expires_within(now, REFRESH_AHEAD)
    }

    /// Whether less than `left` seconds (at most half the token's life)
    /// remain at `now`.
    pub fn expires_within(&self, now: i64, left: i64) -> bool {
        let claims = self.claims();
        claims.exp <= now + claims.renew_ahead(left)
    }
}

fn http() -> Result<reqwest::Client, LoginError> {
    // The provider's redirects are for the browser, never followed here.
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|err| LoginError::Provider(format!("cannot make an HTTP client: {err}")))
}

/// Whether tokens may be sent to `url`: https, or anything on loopback.
fn https_or_loopback(url: &url::Url) -> bool {
    url.scheme() == "https" || url.host_str().is_some_and(crate::net::is_loopback_host)
}

/// The issuer's URL: https, or plain http on loopback only.
fn issuer_url(issuer: &str) -> Result<IssuerUrl, LoginError> {
    let url = IssuerUrl::new(issuer.to_string())
        .map_err(|err| LoginError::Provider(format!("{issuer} is not an issuer URL: {err}")))?;
    if !https_or_loopback(url.url()) {
        return Err(LoginError::Provider(format!(
            "{issuer} is not https: tokens would cross the network in the clear"
        )));
    }
    Ok(url)
}

async fn discover(issuer: &str, http: &reqwest::Client) -> Result<CoreProviderMetadata, LoginError> {
    let url = issuer_url(issuer)?;
    CoreProviderMetadata::discover_async(url, http).await.map_err(|err| {
        LoginError::Provider(format!(
            "cannot discover {issuer} (its .well-known/openid-configuration and keys): {}",
            token_error(&err)
        ))
    })
}

/// The optional scopes the provider says it supports (all of them when it
/// does not say): a provider that refuses unknown scopes still signs in.
fn scopes(metadata: &CoreProviderMetadata) -> Vec<Scope> {
    scopes_among(metadata.scopes_supported())
}

fn scopes_among(supported: Option<&Vec<Scope>>) -> Vec<Scope> {
    let wanted = ["email", "groups", "offline_access"];
    wanted
        .into_iter()
        .filter(|w| supported.is_none_or(|s| s.iter().any(|scope| scope.as_str() == *w)))
        .map(|w| Scope::new(w.into()))
        .collect()
}

/// The authorization code flow with PKCE: `show` gets the URL to open in a
/// browser; the provider sends the browser back to a listener on loopback,
/// which takes the code (once, with the right state) and says so.
pub async fn sign_in(issuer: &str, client_id: &str, show: impl FnOnce(&str)) -> Result<Tokens, LoginError> {
    let http = http()?;
    let metadata = discover(issuer, &http).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|err| LoginError::Provider(format!("cannot listen on loopback for the redirect: {err}")))?;
    let port = listener
        .local_addr()
        .map_err(|err| LoginError::Provider(err.to_string()))?
        .port();
    let redirect = RedirectUrl::new(format!("http://127.0.0.1:{port}/callback"))
        .map_err(|err| LoginError::Provider(err.to_string()))?;
    let scopes = scopes(&metadata);
    let client = CoreClient::from_provider_metadata(metadata, ClientId::new(client_id.to_string()), None)
        .set_redirect_uri(redirect);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .add_scopes(scopes.iter().cloned())
        .set_pkce_challenge(challenge);
    if scopes.iter().any(|s| s.as_str() == "offline_access") {
        // OIDC Core 11: offline_access is honoured only with prompt=consent.
        request = request.add_prompt(openidconnect::core::CoreAuthPrompt::Consent);
    }
    let (url, state, nonce) = request.url();
    show(url.as_str());
    let (code, browser) = tokio::time::timeout(LOGIN_TIMEOUT, redirect_code(listener, state.secret()))
        .await
        .map_err(|_| LoginError::TimedOut)??;
    let outcome = exchange(&client, &http, code, verifier, &nonce, issuer, client_id).await;
    // The browser hears how it ended only now, after the exchange and the
    // token's verification.
    answer(browser, outcome.as_ref().map(|_| ()).map_err(|e| e.to_string())).await;
    outcome
}

async fn exchange(
    client: &CoreClient<
        openidconnect::EndpointSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointMaybeSet,
        openidconnect::EndpointMaybeSet,
    >,
    http: &reqwest::Client,
    code: String,
    verifier: openidconnect::PkceCodeVerifier,
    nonce: &Nonce,
    issuer: &str,
    client_id: &str,
) -> Result<Tokens, LoginError> {
    let response = client
        .exchange_code(AuthorizationCode::new(code))
        .map_err(|err| LoginError::Provider(format!("the provider has no token endpoint: {err}")))?
        .set_pkce_verifier(verifier)
        .request_async(http)
        .await
        .map_err(|err| LoginError::Refused(token_error(&err)))?;
    verified_tokens(&response, &client.id_token_verifier(), nonce, issuer, client_id)
}

/// What a sign-in keeps, once its ID token verifies (signature, issuer,
/// audience, expiry, and the nonce where the flow has one).
fn verified_tokens(
    response: &openidconnect::core::CoreTokenResponse,
    verifier: &openidconnect::core::CoreIdTokenVerifier<'_>,
    nonce: impl openidconnect::NonceVerifier,
    issuer: &str,
    client_id: &str,
) -> Result<Tokens, LoginError> {
    let id_token = response
        .id_token()
        .ok_or_else(|| LoginError::Refused("the provider returned no ID token".into()))?;
    id_token
        .claims(verifier, nonce)
        .map_err(|err| LoginError::Refused(format!("the ID token does not verify: {err}")))?;
    Ok(Tokens {
        issuer: issuer.to_string(),
        client_id: client_id.to_string(),
        id_token: id_token.to_string(),
        refresh_token: response.refresh_token().map(|r| r.secret().clone()),
    })
}

/// The device and revocation endpoints, which core discovery metadata
/// does not carry.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct DeviceEndpoint {
    device_authorization_endpoint: Option<openidconnect::DeviceAuthorizationUrl>,
    #[serde(default)]
    revocation_endpoint: Option<openidconnect::RevocationUrl>,
}

impl openidconnect::AdditionalProviderMetadata for DeviceEndpoint {}

type DeviceProviderMetadata = openidconnect::ProviderMetadata<
    DeviceEndpoint,
    openidconnect::core::CoreAuthDisplay,
    openidconnect::core::CoreClientAuthMethod,
    openidconnect::core::CoreClaimName,
    openidconnect::core::CoreClaimType,
    openidconnect::core::CoreGrantType,
    openidconnect::core::CoreJweContentEncryptionAlgorithm,
    openidconnect::core::CoreJweKeyManagementAlgorithm,
    openidconnect::core::CoreJsonWebKey,
    openidconnect::core::CoreResponseMode,
    openidconnect::core::CoreResponseType,
    openidconnect::core::CoreSubjectIdentifierType,
>;

/// What a person does on another device for the device flow.
#[derive(Debug, Clone)]
pub struct DeviceCode {
    /// Where to go.
    pub verification_uri: String,
    /// What to type there.
    pub user_code: String,
    /// The same page with the code filled in, when the provider offers it.
    pub verification_uri_complete: Option<String>,
}

/// The device authorization flow (RFC 8628), for machines without a
/// browser: `show` gets the URL and the code to enter on another device;
/// the provider is polled (at the interval it asks for) until the person
/// approves, refuses, or the code expires.
pub async fn sign_in_device(
    issuer: &str,
    client_id: &str,
    show: impl FnOnce(&DeviceCode),
) -> Result<Tokens, LoginError> {
    let http = http()?;
    let url = issuer_url(issuer)?;
    let metadata = DeviceProviderMetadata::discover_async(url, &http)
        .await
        .map_err(|err| {
            LoginError::Provider(format!(
                "cannot discover {issuer} (its .well-known/openid-configuration and keys): {}",
                token_error(&err)
            ))
        })?;
    let endpoint = metadata
        .additional_metadata()
        .device_authorization_endpoint
        .clone()
        .ok_or_else(|| {
            LoginError::Provider(format!(
                "{issuer} offers no device authorization endpoint: sign in in a browser (without --device)"
            ))
        })?;
    let scopes = scopes_among(metadata.scopes_supported());
    let client = CoreClient::from_provider_metadata(metadata, ClientId::new(client_id.to_string()), None)
        .set_device_authorization_url(endpoint);
    let details: openidconnect::core::CoreDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scopes(scopes)
        .request_async(&http)
        .await
        .map_err(|err| LoginError::Refused(printable(&token_error(&err))))?;
    show(&DeviceCode {
        verification_uri: details.verification_uri().to_string(),
        user_code: details.user_code().secret().clone(),
        verification_uri_complete: details.verification_uri_complete().map(|u| u.secret().clone()),
    });
    let response = client
        .exchange_device_access_token(&details)
        .map_err(|err| LoginError::Provider(format!("the provider has no token endpoint: {err}")))?
        .request_async(&http, tokio::time::sleep, Some(LOGIN_TIMEOUT))
        .await
        .map_err(|err| LoginError::Refused(printable(&token_error(&err))))?;
    // No nonce in the device flow.
    let no_nonce = |_: Option<&Nonce>| Ok(());
    verified_tokens(&response, &client.id_token_verifier(), no_nonce, issuer, client_id)
}

/// A new ID token from the refresh token.
pub async fn refresh(tokens: &Tokens) -> Result<Tokens, LoginError> {
    let expired = |why: &str| LoginError::Expired {
        issuer: tokens.issuer.clone(),
        why: why.to_string(),
    };
    let refresh = tokens
        .refresh_token
        .as_ref()
        .ok_or_else(|| expired("the provider gave no refresh token"))?;
    let http = http()?;
    let metadata = discover(&tokens.issuer, &http).await?;
    let client = CoreClient::from_provider_metadata(metadata, ClientId::new(tokens.client_id.clone()), None);
    let response = client
        .exchange_refresh_token(&RefreshToken::new(refresh.clone()))
        .map_err(|err| LoginError::Provider(format!("the provider has no token endpoint: {err}")))?
        .request_async(&http)
        .await
        .map_err(|err| match &err {
            // Only the provider saying the grant is no more ends the session;
            // a network or server failure is for trying again.
            openidconnect::RequestTokenError::ServerResponse(response)
                if *response.error() == openidconnect::core::CoreErrorResponseType::InvalidGrant =>
            {
                expired(&token_error(&err))
            }
            _ => LoginError::Provider(format!(
                "cannot renew the token at {}: {}",
                tokens.issuer,
                token_error(&err)
            )),
        })?;
    let id_token = response
        .id_token()
        .ok_or_else(|| expired("the refresh gave no ID token"))?;
    // No nonce on a refreshed ID token.
    id_token
        .claims(&client.id_token_verifier(), |_: Option<&Nonce>| Ok(()))
        .map_err(|err| expired(&format!("the refreshed ID token does not verify: {err}")))?;
    let renewed = Tokens {
        issuer: tokens.issuer.clone(),
        client_id: tokens.client_id.clone(),
        id_token: id_token.to_string(),
        refresh_token: response
            .refresh_token()
            .map(|r| r.secret().clone())
            .or_else(|| tokens.refresh_token.clone()),
    };
    // OIDC Core 12.2: the same person, from the same issuer.
    let (before, after) = (tokens.claims(), renewed.claims());
    if before.sub != after.sub || before.iss != after.iss {
        return Err(expired("the renewed token names another subject or issuer"));
    }
    Ok(renewed)
}

/// An access token for a service, with the OAuth client credentials grant:
/// the client's own token (no person), for `resource` (RFC 8707: the
/// gateway's `service_audience`) and `scopes` as the provider wants them.
/// Not cached: a service asks again when it needs one.
pub async fn client_credentials(
    issuer: &str,
    client_id: &str,
    secret: &str,
    resource: Option<&str>,
    scopes: &[String],
) -> Result<String, LoginError> {
    let http = http()?;
    let metadata = discover(issuer, &http).await?;
    let client = CoreClient::from_provider_metadata(
        metadata,
        ClientId::new(client_id.to_string()),
        Some(ClientSecret::new(secret.to_string())),
    );
    let mut request = client
        .exchange_client_credentials()
        .map_err(|err| LoginError::Provider(format!("{issuer} has no token endpoint: {err}")))?
        .add_scopes(scopes.iter().map(|s| Scope::new(s.clone())));
    if let Some(resource) = resource {
        request = request.add_extra_param("resource", resource.to_string());
    }
    let response = request.request_async(&http).await.map_err(|err| match &err {
        openidconnect::RequestTokenError::ServerResponse(_) => {
            LoginError::Refused(format!("client {client_id} at {issuer}: {}", token_error(&err)))
        }
        _ => LoginError::Provider(format!("cannot reach {issuer}'s token endpoint: {}", token_error(&err))),
    })?;
    Ok(response.access_token().secret().clone())
}

/// Revokes the refresh token at the provider (RFC 7009), so a copy of the
/// cache is worth nothing after `sluice logout`. `Ok(false)`: there was
/// none, or the provider offers no revocation endpoint.
pub async fn revoke(tokens: &Tokens) -> Result<bool, LoginError> {
    let Some(refresh) = &tokens.refresh_token else {
        return Ok(false);
    };
    let http = http()?;
    let metadata = DeviceProviderMetadata::discover_async(issuer_url(&tokens.issuer)?, &http)
        .await
        .map_err(|err| LoginError::Provider(format!("cannot discover {}: {}", tokens.issuer, token_error(&err))))?;
    let Some(endpoint) = metadata.additional_metadata().revocation_endpoint.clone() else {
        return Ok(false);
    };
    // By hand: the oauth2 crate insists on https here, and a provider on
    // loopback (as for sign-in) is plain http. RFC 7009: a form POST; a
    // public client names itself in the body.
    let url = endpoint.url();
    if !https_or_loopback(url) {
        return Err(LoginError::Provider(format!(
            "{}'s revocation endpoint is not https; the refresh token was not sent",
            tokens.issuer
        )));
    }
    let response = http
        .post(url.clone())
        .form(&[
            ("token", refresh.as_str()),
            ("token_type_hint", "refresh_token"),
            ("client_id", tokens.client_id.as_str()),
        ])
        .send()
        .await
        .map_err(|err| LoginError::Provider(format!("cannot reach {}: {}", tokens.issuer, token_error(&err))))?;
    if !response.status().is_success() {
        return Err(LoginError::Provider(format!(
            "{} answered the revocation with HTTP {}",
            tokens.issuer,
            response.status().as_u16()
        )));
    }
    Ok(true)
}

fn token_error<E: std::error::Error>(err: &E) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Waits for the browser's redirect to `/callback` with this sign-in's
/// state, and returns the code with the browser's connection (answered
/// once the code is exchanged). Each connection is read in its own task
/// with a deadline, so an idle one cannot hold up the redirect; anything
/// else (another path, another method, a wrong or missing state) is
/// answered and waited past, so a stray request cannot end the sign-in.
/// The provider's error ends it only with the right state.
async fn redirect_code(
    listener: tokio::net::TcpListener,
    state: &str,
) -> Result<(String, tokio::net::TcpStream), LoginError> {
    let (found, mut arrived) = tokio::sync::mpsc::channel(4);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let found = found.clone();
                    let state = state.to_string();
                    tokio::spawn(async move {
                        if let Some(result) = read_redirect(stream, &state).await {
                            let _ = found.send(result).await;
                        }
                    });
                }
                // Out of descriptors, say: wait a little rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
            Some(result) = arrived.recv() => return result,
        }
    }
}

/// One connection to the redirect listener: `Some` when it is this
/// sign-in's redirect (its code, or the provider's error).
async fn read_redirect(
    mut stream: tokio::net::TcpStream,
    state: &str,
) -> Option<Result<(String, tokio::net::TcpStream), LoginError>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let refuse = |status: &str| format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    if read.is_err() {
        return None;
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let query = match (method, target.strip_prefix("/callback?")) {
        ("GET", Some(query)) => query.to_string(),
        _ => {
            let _ = stream.write_all(refuse("404 Not Found").as_bytes()).await;
            return None;
        }
    };
    let params: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    if params.get("state").map(String::as_str) != Some(state) {
        let _ = stream.write_all(refuse("400 Bad Request").as_bytes()).await;
        return None;
    }
    if let Some(error) = params.get("error") {
        let description = params
            .get("error_description")
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        let refused = LoginError::Refused(printable(&format!("{error}{description}")));
        answer(stream, Err(refused.to_string())).await;
        return Some(Err(refused));
    }
    match params.get("code") {
        Some(code) => Some(Ok((code.clone(), stream))),
        None => {
            let refused = LoginError::Refused("the redirect carried no code".into());
            answer(stream, Err(refused.to_string())).await;
            Some(Err(refused))
        }
    }
}

/// Tells the browser how the sign-in ended.
async fn answer(mut stream: tokio::net::TcpStream, outcome: Result<(), String>) {
    use tokio::io::AsyncWriteExt;
    let page = match outcome {
        Ok(()) => "Signed in to Sluice. You can close this tab and return to the terminal.".to_string(),
        Err(err) => format!("Sluice sign-in failed: {err}"),
    };
    let page = page.replace('&', "&amp;").replace('<', "&lt;");
    let body = format!("<!doctype html><meta charset=utf-8><title>Sluice</title><p>{page}</p>");
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

/// The token cache: one file per issuer under `dir` (made readable only by
/// its owner), and which issuer `sluice login` used last.
#[derive(Debug, Clone)]
pub struct TokenCache {
    dir: PathBuf,
}

impl TokenCache {
    pub fn new(dir: PathBuf) -> TokenCache {
        TokenCache { dir }
    }

    /// `$XDG_CACHE_HOME/sluice/tokens`, else `~/.cache/sluice/tokens`;
    /// never a shared directory.
    pub fn default_dir() -> Result<PathBuf, LoginError> {
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(dir).join("sluice/tokens"));
        }
        match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(home) => Ok(PathBuf::from(home).join(".cache/sluice/tokens")),
            None => Err(LoginError::Cache {
                path: PathBuf::from("~/.cache/sluice/tokens"),
                why: "neither HOME nor XDG_CACHE_HOME is set: there is no private place for tokens".into(),
            }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, issuer: &str) -> PathBuf {
        let digest = Sha256::digest(issuer.trim_end_matches('/').as_bytes());
        self.dir.join(format!("{}.json", hex::encode(&digest[..12])))
    }

    fn error(path: &Path, why: impl std::fmt::Display) -> LoginError {
        LoginError::Cache {
            path: path.to_path_buf(),
            why: why.to_string(),
        }
    }

    /// The issuer signed in to last.
    pub fn current(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("current"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    pub fn load(&self, issuer: &str) -> Result<Option<Tokens>, LoginError> {
        let path = self.file(issuer);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|err| {
                Self::error(
                    &path,
                    format!("unreadable ({err}); run sluice logout, then sluice login"),
                )
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(Self::error(&path, err)),
        }
    }

    /// Saves `tokens` (0600, in a 0700 directory) and makes their issuer
    /// the current one.
    pub fn save(&self, tokens: &Tokens) -> Result<(), LoginError> {
        self.write(tokens)?;
        self.write_file("current", tokens.issuer.as_bytes())
    }

    /// The cache directory, made if missing: a real directory (not a
    /// link), ours, and 0700.
    fn private_dir(&self) -> Result<(), LoginError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|err| Self::error(&self.dir, err))?;
        let meta = std::fs::symlink_metadata(&self.dir).map_err(|err| Self::error(&self.dir, err))?;
        // SAFETY: getuid has no preconditions and cannot fail.
        let me = unsafe { libc::getuid() };
        if !meta.is_dir() || meta.uid() != me {
            return Err(Self::error(
                &self.dir,
                "not a directory of yours; remove it or set XDG_CACHE_HOME",
            ));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|err| Self::error(&self.dir, err))?;
        }
        Ok(())
    }

    /// Saves `tokens` without changing the current issuer.
    fn write(&self, tokens: &Tokens) -> Result<(), LoginError> {
        let name = self.file(&tokens.issuer);
        let name = name
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tokens.json")
            .to_string();
        self.write_file(&name, &serde_json::to_vec_pretty(tokens).unwrap_or_default())
    }

    /// Writes `name` in the cache directory: a new temporary file of its
    /// own (0600), synced, renamed into place.
    fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), LoginError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        self.private_dir()?;
        let path = self.dir.join(name);
        let tmp = self
            .dir
            .join(format!(".{name}.{}.{:x}", std::process::id(), rand::random::<u64>()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|err| Self::error(&tmp, err))?;
        let written = file.write_all(bytes).and_then(|()| file.sync_all());
        if let Err(err) = written.and_then(|()| std::fs::rename(&tmp, &path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Self::error(&path, err));
        }
        Ok(())
    }

    /// Forgets an issuer's tokens; `false` if there were none.
    pub fn remove(&self, issuer: &str) -> Result<bool, LoginError> {
        let path = self.file(issuer);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                if self.current().as_deref() == Some(issuer) {
                    let _ = std::fs::remove_file(self.dir.join("current"));
                }
                Ok(true)
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(Self::error(&path, err)),
        }
    }

    /// A usable ID token for `issuer`, refreshed (and saved) first when it
    /// expires within a minute.
    ///
    /// Renewals are one at a time across processes (a lock file): providers
    /// rotate refresh tokens, and a second use of the old one revokes the
    /// whole session. Whoever waited reads what the first one saved.
    pub async fn fresh(&self, issuer: &str, now: i64) -> Result<Tokens, LoginError> {
        self.fresh_for(issuer, now, REFRESH_AHEAD).await
    }

    /// As [`TokenCache::fresh`], renewing when less than `left` seconds
    /// remain: for sessions that end when their token does.
    pub async fn fresh_for(&self, issuer: &str, now: i64, left: i64) -> Result<Tokens, LoginError> {
        let tokens = self
            .load(issuer)?
            .ok_or_else(|| LoginError::NotSignedIn(issuer.to_string()))?;
        if !tokens.expires_within(now, left) {
            return Ok(tokens);
        }
        self.private_dir()?;
        let lock_path = self.file(issuer).with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|err| Self::error(&lock_path, err))?;
        let held = tokio::task::spawn_blocking(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor this closure owns.
            let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
            (rc == 0).then_some(lock)
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Self::error(&lock_path, "cannot lock"))?;
        let tokens = self
            .load(issuer)?
            .ok_or_else(|| LoginError::NotSignedIn(issuer.to_string()))?;
        if !tokens.expires_within(now, left) {
            return Ok(tokens);
        }
        let refreshed = match refresh(&tokens).await {
            Ok(refreshed) => refreshed,
            // Renewing early failed (the provider is down, or gives no
            // refresh token): the token in hand still serves a while.
            Err(_) if left > REFRESH_AHEAD && !tokens.expiring(now) => return Ok(tokens),
            Err(err) => return Err(err),
        };
        self.write(&refreshed)?;
        drop(held);
        Ok(refreshed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(claims: serde_json::Value) -> Tokens {
        let part = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        Tokens {
            issuer: "https://login.example.com".into(),
            client_id: "sluice".into(),
            id_token: format!("{}.{}.sig", part(&serde_json::json!({"alg": "RS256"})), part(&claims)),
            refresh_token: Some("r".into()),
        }
    }

    #[test]
    fn the_cache_is_private_and_per_issuer() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sluice-cache-test-{}", std::process::id()));
        let cache = TokenCache::new(dir.join("tokens"));
        let tokens = token(serde_json::json!({"sub": "d", "email": "dana@example.com", "groups": ["eng"], "exp": 100}));
        cache.save(&tokens).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache.file(&tokens.issuer)), 0o600);
        assert_eq!(mode(cache.dir()), 0o700);
        assert_eq!(cache.current().as_deref(), Some("https://login.example.com"));
        let loaded = cache.load("https://login.example.com/").unwrap().unwrap();
        assert_eq!(loaded.claims().email.as_deref(), Some("dana@example.com"));
        assert_eq!(loaded.claims().groups, ["eng"]);
        assert!(loaded.expiring(50) && !loaded.expiring(39));
        // Renewing early aims at five minutes, or half the token's life.
        let hour = token(serde_json::json!({"sub": "d", "iat": 1000, "exp": 4600})).claims();
        assert_eq!(hour.renew_ahead(300), 300);
        let five_minutes = token(serde_json::json!({"sub": "d", "iat": 1000, "exp": 1300})).claims();
        assert_eq!(five_minutes.renew_ahead(300), 150);
        assert_eq!(five_minutes.renew_ahead(60), 60);
        let half_minute = token(serde_json::json!({"sub": "d", "iat": 1000, "exp": 1030})).claims();
        assert_eq!(half_minute.renew_ahead(300), 60);
        assert!(cache.load("https://other.example.com").unwrap().is_none());
        assert!(cache.remove(&tokens.issuer).unwrap());
        assert!(!cache.remove(&tokens.issuer).unwrap());
        assert!(cache.current().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
