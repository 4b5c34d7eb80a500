//! `sluice login`, `logout`, `whoami` and `token`: a person's OpenID
//! Connect sign-in, kept in the token cache (`sluice_core::identity::login`).

use anyhow::Context;
use sluice_core::identity::login::{self, TokenCache, Tokens};

fn cache() -> anyhow::Result<TokenCache> {
    Ok(TokenCache::new(TokenCache::default_dir()?))
}

/// The issuer given, or the one signed in to last.
pub(crate) fn issuer(cache: &TokenCache, given: Option<String>) -> anyhow::Result<String> {
    // As given: discovery compares the issuer exactly (a trailing slash
    // included).
    given
        .or_else(|| cache.current())
        .context("no issuer: pass --issuer URL (or set SLUICE_ISSUER), or sign in first with sluice login --issuer URL")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub async fn login(issuer_arg: Option<String>, client_id: Option<String>, device: bool) -> anyhow::Result<()> {
    let cache = cache()?;
    let issuer = issuer(&cache, issuer_arg)?;
    // Signing in again keeps the client id this issuer was signed in with.
    let client_id = client_id
        .or_else(|| cache.load(&issuer).ok().flatten().map(|tokens| tokens.client_id))
        .unwrap_or_else(|| "sluice".to_string());
    let tokens = if device {
        login::sign_in_device(&issuer, &client_id, |code| {
            eprintln!(
                "On any device, open {} and enter the code {}",
                login::printable(&code.verification_uri),
                login::printable(&code.user_code)
            );
            if let Some(complete) = &code.verification_uri_complete {
                eprintln!("(or open {}, which has the code in it)", login::printable(complete));
            }
            eprintln!("Waiting for you to approve...");
        })
        .await?
    } else {
        login::sign_in(&issuer, &client_id, |url| {
            eprintln!("Sign in to {issuer} in your browser; if it does not open, open this URL:\n\n  {url}\n");
            open_browser(url);
        })
        .await?
    };
    cache.save(&tokens)?;
    eprintln!("Signed in: {}", describe(&tokens));
    Ok(())
}

pub async fn logout(issuer_arg: Option<String>) -> anyhow::Result<()> {
    let cache = cache()?;
    let issuer = issuer(&cache, issuer_arg)?;
    // The provider first, so a copy of the cache stops working too; the
    // local tokens go either way.
    if let Ok(Some(tokens)) = cache.load(&issuer) {
        match login::revoke(&tokens).await {
            Ok(true) => eprintln!("Revoked the refresh token at {issuer}."),
            Ok(false) => {}
            Err(err) => eprintln!("Could not revoke the refresh token at {issuer} ({err}); removing it here anyway."),
        }
    }
    if cache.remove(&issuer)? {
        eprintln!(
            "Signed out of {issuer}: its tokens are removed from {}",
            cache.dir().display()
        );
    } else {
        eprintln!("Not signed in to {issuer}: nothing to remove");
    }
    Ok(())
}

pub async fn whoami(issuer_arg: Option<String>) -> anyhow::Result<()> {
    let cache = cache()?;
    let issuer = issuer(&cache, issuer_arg)?;
    // What the cache holds: no renewal (and no network) to answer.
    let tokens = cache
        .load(&issuer)?
        .with_context(|| format!("not signed in to {issuer}: run sluice login"))?;
    let claims = tokens.claims();
    println!("{}", claims.email.as_deref().unwrap_or(&claims.sub));
    println!("  subject  {}", claims.sub);
    println!(
        "  groups   {}",
        if claims.groups.is_empty() {
            "(none)".to_string()
        } else {
            claims.groups.join(", ")
        }
    );
    println!("  issuer   {}", tokens.issuer);
    println!("  expires  {}", expiry(&tokens));
    Ok(())
}

/// Prints a fresh ID token, for clients that take it as a password (over
/// TLS: it is a bearer credential).
pub async fn token(issuer_arg: Option<String>) -> anyhow::Result<()> {
    let cache = cache()?;
    let issuer = issuer(&cache, issuer_arg)?;
    let tokens = cache.fresh(&issuer, now()).await?;
    println!("{}", tokens.id_token);
    Ok(())
}

/// How often the console checks its cached token; it is renewed within a
/// minute of expiring, so a check every 20 s never lets it lapse.
const RENEW_CHECK: std::time::Duration = std::time::Duration::from_secs(20);

/// The signed-in user's ID token for a long-running client (the console),
/// and the task that keeps it fresh through the cache: the same renewal,
/// lock and refresh-token rotation as `sluice token`.
pub async fn renewed_token() -> anyhow::Result<(
    sluice_core::api::client::SharedToken,
    impl std::future::Future<Output = ()> + Send + 'static,
)> {
    let cache = cache()?;
    let issuer = issuer(&cache, None)?;
    let tokens = cache.fresh(&issuer, now()).await?;
    let token = sluice_core::api::client::SharedToken::new(&tokens.id_token);
    let shared = token.clone();
    let renewal = async move {
        let mut warned = false;
        loop {
            tokio::time::sleep(RENEW_CHECK).await;
            match cache.fresh(&issuer, now()).await {
                Ok(tokens) => {
                    shared.set(&tokens.id_token);
                    warned = false;
                }
                // Logged once per failure streak (the console's log file);
                // the API's refusal shows on screen when the token lapses.
                Err(err) if !warned => {
                    tracing::warn!(error = %err, "cannot renew the console's token");
                    warned = true;
                }
                Err(_) => {}
            }
        }
    };
    Ok((token, renewal))
}

pub struct ServiceArgs {
    pub issuer: Option<String>,
    pub client_id: String,
    pub resource: Option<String>,
    pub scopes: Vec<String>,
}

impl ServiceArgs {
    /// The issuer and the client secret (from the environment only).
    pub fn credentials(&self) -> anyhow::Result<(String, String)> {
        let issuer = self
            .issuer
            .clone()
            .context("no issuer: pass --issuer URL (or set SLUICE_ISSUER)")?;
        let secret = std::env::var("SLUICE_CLIENT_SECRET")
            .ok()
            .filter(|s| !s.is_empty())
            .context("no client secret: set SLUICE_CLIENT_SECRET (it is never taken from the command line, where other users could read it)")?;
        Ok((issuer, secret))
    }

    /// A new access token for the service.
    pub async fn token(&self, issuer: &str, secret: &str) -> Result<String, login::LoginError> {
        login::client_credentials(issuer, &self.client_id, secret, self.resource.as_deref(), &self.scopes).await
    }
}

/// Prints a service's access token from the client credentials grant.
pub async fn service_token(args: ServiceArgs) -> anyhow::Result<()> {
    let (issuer, secret) = args.credentials()?;
    println!("{}", args.token(&issuer, &secret).await?);
    Ok(())
}

fn expiry(tokens: &Tokens) -> String {
    let claims = tokens.claims();
    let at = chrono::DateTime::from_timestamp(claims.exp, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "unknown".into());
    let left = claims.exp - now();
    let refresh = if tokens.refresh_token.is_some() {
        "; renewed when it runs out"
    } else {
        "; sign in again then"
    };
    if left > 0 {
        format!("{at} (in {}m){refresh}", left / 60)
    } else {
        format!("{at} (expired){refresh}")
    }
}

fn describe(tokens: &Tokens) -> String {
    let claims = tokens.claims();
    let groups = if claims.groups.is_empty() {
        "no groups".to_string()
    } else {
        format!("groups {}", claims.groups.join(", "))
    };
    format!(
        "{} ({groups}); ID token until {}",
        claims.email.as_deref().unwrap_or(&claims.sub),
        expiry(tokens)
    )
}

/// Opens `url` in the desktop's browser when there is a desktop; the URL is
/// printed either way.
fn open_browser(url: &str) {
    let desktop = std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    let opener = if cfg!(target_os = "macos") {
        Some("open")
    } else if desktop {
        Some("xdg-open")
    } else {
        None
    };
    if let Some(opener) = opener {
        let _ = std::process::Command::new(opener)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}
