//! `sluice connect TARGET`: a loopback tunnel that native clients use
//! without a password; it logs them in to the gateway with the signed-in
//! user's token (`sluice_core::tunnel`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::Context;
use sluice_core::identity::login::TokenCache;
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

pub struct ConnectArgs<'a> {
    pub target: &'a str,
    pub port: u16,
    pub gateway: &'a str,
    pub ca: Option<&'a Path>,
    pub issuer: Option<String>,
}

pub async fn run(args: ConnectArgs<'_>) -> anyhow::Result<()> {
    anyhow::ensure!(
        tunnel::CHECKS_PEER_USER,
        "sluice connect needs Linux: this system does not say which user owns a connection, and the tunnel \
         lets only you in; use `PGPASSWORD=$(sluice token)` with TLS instead"
    );
    anyhow::ensure!(
        !args.target.is_empty(),
        "name the target: sluice connect TARGET (the database name clients use at the gateway)"
    );
    let cache = TokenCache::new(TokenCache::default_dir()?);
    let issuer = crate::login_cmd::issuer(&cache, args.issuer)?;
    let (host, port, tls) = crate::gateway_address(args.gateway, "--gateway", args.ca)?;
    let encrypted = tls.is_some();
    // A token now: a user who is not signed in hears it here, not from
    // their client later.
    let signed_in = SignedIn { cache, issuer };
    let tokens = signed_in
        .cache
        .fresh(&signed_in.issuer, chrono::Utc::now().timestamp())
        .await?;
    let claims = tokens.claims();
    let who = claims.email.unwrap_or(claims.sub);
    let gateway = Gateway { host, port, tls };
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let tunnel = Tunnel::bind(listen, args.target, gateway, signed_in)
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
