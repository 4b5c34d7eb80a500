//! `sluice connect TARGET`: a loopback tunnel that native clients use
//! without a password; it logs them in to the gateway with the signed-in
//! user's token (`sluice_core::tunnel`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::Context;
use sluice_core::identity::login::{self, TokenCache};
use sluice_core::tunnel::{self, Gateway, TokenSource, Tunnel};

/// A connection gets a token with at least this long left (renewed first
/// otherwise; a provider whose tokens live shorter is asked each time).
const TUNNEL_TOKEN_LEFT: i64 = 300;

/// The token of the signed-in user, renewed through the cache (which
/// serialises renewals across processes).
struct SignedIn {
    cache: TokenCache,
    issuer: String,
}

impl TokenSource for SignedIn {
    async fn token(&self) -> Result<String, String> {
        // A session ends when its token does: give each one a token with
        // a few minutes in it, not one about to lapse.
        self.cache
            .fresh_for(&self.issuer, chrono::Utc::now().timestamp(), TUNNEL_TOKEN_LEFT)
            .await
            .map(|tokens| tokens.id_token)
            .map_err(|err| err.to_string())
    }
}

/// A service's token from the client credentials grant, asked for again
/// when the one it holds has less than [`TUNNEL_TOKEN_LEFT`] (or half its
/// life) left.
struct Service {
    args: crate::login_cmd::ServiceArgs,
    issuer: String,
    secret: String,
    /// The token and when to ask for the next one.
    held: tokio::sync::Mutex<Option<(String, i64)>>,
}

impl TokenSource for Service {
    async fn token(&self) -> Result<String, String> {
        let mut held = self.held.lock().await;
        let now = chrono::Utc::now().timestamp();
        if let Some((token, renew_at)) = held.as_ref()
            && *renew_at > now
        {
            return Ok(token.clone());
        }
        let token = self
            .args
            .token(&self.issuer, &self.secret)
            .await
            .map_err(|err| err.to_string())?;
        // Read unverified, only to know when to ask again.
        let claims = login::token_claims(&token);
        *held = Some((token.clone(), claims.exp - claims.renew_ahead(TUNNEL_TOKEN_LEFT)));
        Ok(token)
    }
}

pub struct ConnectArgs<'a> {
    pub target: &'a str,
    pub port: u16,
    pub gateway: &'a str,
    pub ca: Option<&'a Path>,
    pub issuer: Option<String>,
}

/// `service`: sign in as this service instead of the person of `sluice
/// login`.
pub async fn run(args: ConnectArgs<'_>, service: Option<crate::login_cmd::ServiceArgs>) -> anyhow::Result<()> {
    anyhow::ensure!(
        tunnel::CHECKS_PEER_USER,
        "sluice connect needs Linux: this system does not say which user owns a connection, and the tunnel \
         lets only you in; use `PGPASSWORD=$(sluice token)` with TLS instead"
    );
    anyhow::ensure!(
        !args.target.is_empty(),
        "name the target: sluice connect TARGET (the database name clients use at the gateway)"
    );
    let (host, port, tls) = crate::gateway_address(args.gateway, "--gateway", args.ca)?;
    let gateway = Gateway { host, port, tls };
    // A token now: a user who is not signed in (or a service whose secret
    // is wrong) hears it here, not from their client later.
    match service {
        Some(service) => {
            let (issuer, secret) = service.credentials()?;
            let who = format!("service {}", service.client_id);
            let source = Service {
                args: service,
                issuer,
                secret,
                held: tokio::sync::Mutex::new(None),
            };
            source.token().await.map_err(anyhow::Error::msg)?;
            serve(&args, gateway, source, &who).await
        }
        None => {
            let cache = TokenCache::new(TokenCache::default_dir()?);
            let issuer = crate::login_cmd::issuer(&cache, args.issuer.clone())?;
            let tokens = cache
                .fresh_for(&issuer, chrono::Utc::now().timestamp(), TUNNEL_TOKEN_LEFT)
                .await?;
            let claims = tokens.claims();
            let who = claims.email.unwrap_or(claims.sub);
            serve(&args, gateway, SignedIn { cache, issuer }, &who).await
        }
    }
}

/// Binds the tunnel, says how to use it, and serves until ctrl-c.
async fn serve<T: TokenSource>(args: &ConnectArgs<'_>, gateway: Gateway, tokens: T, who: &str) -> anyhow::Result<()> {
    let encrypted = gateway.tls.is_some();
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let tunnel = Tunnel::bind(listen, args.target, gateway, tokens)
        .await
        .with_context(|| format!("listening on {listen} (another tunnel on that port? choose one with --port)"))?;
    let local = tunnel.local_addr()?;
    let dbname = quote_conninfo(args.target);
    eprintln!(
        "Tunnel to target {:?} at {} ({}), as {who}; listening on {local}.",
        args.target,
        args.gateway,
        if encrypted { "TLS" } else { "plaintext on loopback" },
    );
    eprintln!("Connect with no password:\n");
    println!("psql \"host={} port={} dbname={dbname}\"", local.ip(), local.port());
    eprintln!(
        "\nJDBC: jdbc:postgresql://{}:{}/{}",
        local.ip(),
        local.port(),
        urlencoding(args.target)
    );
    eprintln!("Only your user may connect. Ctrl-C ends the tunnel (open sessions carry on).");
    tunnel.run(crate::shutdown_on_signal()?).await;
    Ok(())
}

/// A conninfo value, quoted when it needs to be.
fn quote_conninfo(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\', '"']) {
        return value.to_string();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Percent-encodes what a URL path segment cannot hold.
fn urlencoding(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_quote_what_they_must() {
        assert_eq!(quote_conninfo("shop"), "shop");
        assert_eq!(quote_conninfo("my shop"), "'my shop'");
        assert_eq!(quote_conninfo("o'neil"), "'o\\'neil'");
        assert_eq!(urlencoding("my shop"), "my%20shop");
    }
}
