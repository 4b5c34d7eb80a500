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
    AuthorizationCode, ClientId, CsrfToken, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge, RedirectUrl,
    RefreshToken, Scope, TokenResponse,
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

/// What the cache keeps for one issuer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tokens {
    pub issuer: String,
    pub client_id: String,
    /// The ID token: what clients present to the gateway.
    pub id_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

/// The claims of an ID token that people want to see (`sluice whoami`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub exp: i64,
}

impl Tokens {
    /// The ID token's claims, read without verifying it (it came from the
    /// provider over TLS and was verified at sign-in; the gateway verifies
    /// it again at every use).
    pub fn claims(&self) -> Claims {
        self.id_token
            .split('.')
            .nth(1)
            .and_then(|payload| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok())
            .and_then(|json| serde_json::from_slice(&json).ok())
            .unwrap_or_default()
    }

    /// Whether the ID token is expired, or will be within a minute.
    pub fn expiring(&self, now: i64) -> bool {
        self.claims().exp <= now + REFRESH_AHEAD
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

async fn discover(issuer: &str, http: &reqwest::Client) -> Result<CoreProviderMetadata, LoginError> {
    let url = IssuerUrl::new(issuer.to_string())
        .map_err(|err| LoginError::Provider(format!("{issuer} is not an issuer URL: {err}")))?;
    CoreProviderMetadata::discover_async(url, http)
        .await
        .map_err(|err| LoginError::Provider(format!("cannot read {issuer}/.well-known/openid-configuration: {err}")))
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
    let client = CoreClient::from_provider_metadata(metadata, ClientId::new(client_id.to_string()), None)
        .set_redirect_uri(redirect);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, state, nonce) = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .add_scope(Scope::new("email".into()))
        .add_scope(Scope::new("groups".into()))
        .add_scope(Scope::new("offline_access".into()))
        .set_pkce_challenge(challenge)
        .url();
    show(url.as_str());
    let code = tokio::time::timeout(LOGIN_TIMEOUT, redirect_code(listener, state.secret()))
        .await
        .map_err(|_| LoginError::TimedOut)??;
    let response = client
        .exchange_code(AuthorizationCode::new(code))
        .map_err(|err| LoginError::Provider(format!("the provider has no token endpoint: {err}")))?
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .map_err(|err| LoginError::Refused(token_error(&err)))?;
    let id_token = response
        .id_token()
        .ok_or_else(|| LoginError::Refused("the provider returned no ID token".into()))?;
    id_token
        .claims(&client.id_token_verifier(), &nonce)
        .map_err(|err| LoginError::Refused(format!("the ID token does not verify: {err}")))?;
    Ok(Tokens {
        issuer: issuer.to_string(),
        client_id: client_id.to_string(),
        id_token: id_token.to_string(),
        refresh_token: response.refresh_token().map(|r| r.secret().clone()),
    })
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
        .map_err(|err| expired(&token_error(&err)))?;
    let id_token = response
        .id_token()
        .ok_or_else(|| expired("the refresh gave no ID token"))?;
    // No nonce on a refreshed ID token.
    id_token
        .claims(&client.id_token_verifier(), |_: Option<&Nonce>| Ok(()))
        .map_err(|err| expired(&format!("the refreshed ID token does not verify: {err}")))?;
    Ok(Tokens {
        issuer: tokens.issuer.clone(),
        client_id: tokens.client_id.clone(),
        id_token: id_token.to_string(),
        refresh_token: response
            .refresh_token()
            .map(|r| r.secret().clone())
            .or_else(|| tokens.refresh_token.clone()),
    })
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

/// Waits for the browser's redirect to `/callback`, answers it, and returns
/// the code. Requests with another path are answered 404 and waited past; a
/// wrong state or an error from the provider ends the sign-in.
async fn redirect_code(listener: tokio::net::TcpListener, state: &str) -> Result<String, LoginError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let line = String::from_utf8_lossy(&request);
        let target = line.split_whitespace().nth(1).unwrap_or_default().to_string();
        let Some(query) = target.strip_prefix("/callback?") else {
            let _ = stream
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            continue;
        };
        let params: std::collections::HashMap<String, String> =
            url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        let outcome = if let Some(error) = params.get("error") {
            let description = params
                .get("error_description")
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            Err(LoginError::Refused(format!("{error}{description}")))
        } else if params.get("state").map(String::as_str) != Some(state) {
            Err(LoginError::Refused(
                "the redirect's state does not match this sign-in (another tab or an old link?)".into(),
            ))
        } else {
            params
                .get("code")
                .cloned()
                .ok_or_else(|| LoginError::Refused("the redirect carried no code".into()))
        };
        let page = match &outcome {
            Ok(_) => "Signed in to Sluice. You can close this tab and return to the terminal.".to_string(),
            Err(err) => format!("Sluice sign-in failed: {err}"),
        };
        let page = page.replace('&', "&amp;").replace('<', "&lt;");
        let body = format!("<!doctype html><meta charset=utf-8><title>Sluice</title><p>{page}</p>");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        return outcome;
    }
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

    /// `$XDG_CACHE_HOME/sluice/tokens`, else `~/.cache/sluice/tokens`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("sluice/tokens");
        }
        match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(home) => PathBuf::from(home).join(".cache/sluice/tokens"),
            None => std::env::temp_dir().join("sluice-tokens"),
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
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|err| Self::error(&self.dir, err))?;
        let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
        let path = self.file(&tokens.issuer);
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|err| Self::error(&tmp, err))?;
        file.write_all(&serde_json::to_vec_pretty(tokens).unwrap_or_default())
            .and_then(|()| file.sync_all())
            .map_err(|err| Self::error(&tmp, err))?;
        std::fs::rename(&tmp, &path).map_err(|err| Self::error(&path, err))?;
        std::fs::write(self.dir.join("current"), &tokens.issuer).map_err(|err| Self::error(&self.dir, err))?;
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
    pub async fn fresh(&self, issuer: &str, now: i64) -> Result<Tokens, LoginError> {
        let tokens = self
            .load(issuer)?
            .ok_or_else(|| LoginError::NotSignedIn(issuer.to_string()))?;
        if !tokens.expiring(now) {
            return Ok(tokens);
        }
        let refreshed = refresh(&tokens).await?;
        self.save(&refreshed)?;
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
        assert!(cache.load("https://other.example.com").unwrap().is_none());
        assert!(cache.remove(&tokens.issuer).unwrap());
        assert!(!cache.remove(&tokens.issuer).unwrap());
        assert!(cache.current().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
