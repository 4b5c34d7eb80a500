//! `sluice bot`: approvals in Slack and Discord.
//!
//! When a statement is held or an access request is made, the bot posts a
//! message with Approve and Deny buttons in the team's channel; a click is
//! forwarded to the gateway on behalf of the clicking person (mapped from
//! their chat user id), and the gateway, the only authority, decides. The
//! message is edited whenever the request moves, wherever it was decided.
//!
//! - [`engine`]: follows the gateway's event stream and keeps the messages.
//! - [`slack`], [`discord`]: the platforms' APIs and interaction endpoints.
//! - [`render`]: what a message says, masked. [`verify`]: signatures.

pub mod config;
mod credential;
pub mod discord;
pub mod engine;
pub mod render;
pub mod slack;
pub mod verify;

use std::net::SocketAddr;

use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::BotConfig;

/// A bot bound to its listeners, not yet running.
pub struct Bot {
    engine: std::sync::Arc<engine::Engine>,
    refreshes: tokio::sync::mpsc::Receiver<u64>,
    listeners: Vec<(TcpListener, axum::Router)>,
    /// Renews a client-credentials token while the bot runs.
    renewal: Option<futures_util::future::BoxFuture<'static, ()>>,
}

impl Bot {
    /// Binds the interaction endpoints (one listener per distinct address).
    pub async fn bind(config: BotConfig) -> anyhow::Result<Bot> {
        let slack = config.slack.clone().map(slack::Slack::new).transpose()?;
        let discord = config.discord.clone().map(discord::Discord::new).transpose()?;
        let (token, renewal) = credential::sign_in(&config.credential).await?;
        let (engine, refreshes) = engine::Engine::new(
            &config.api,
            token,
            slack,
            discord,
            config.state.clone(),
            config.full_text_url.clone(),
        )?;
        let mut routes: Vec<(SocketAddr, axum::Router)> = Vec::new();
        let mut add = |addr: SocketAddr, router: axum::Router| match routes.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, existing)) => *existing = std::mem::take(existing).merge(router),
            None => routes.push((addr, router)),
        };
        if let Some(addr) = engine.slack().and_then(slack::Slack::listen) {
            add(addr, slack::router(engine.clone()));
        }
        if let Some(addr) = engine.discord().and_then(discord::Discord::listen) {
            add(addr, discord::router(engine.clone()));
        }
        let mut listeners = Vec::new();
        for (addr, router) in routes {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|err| anyhow::anyhow!("cannot listen for interactions on {addr}: {err}"))?;
            listeners.push((listener, router));
        }
        Ok(Bot {
            engine,
            refreshes,
            listeners,
            renewal,
        })
    }

    /// Where the interaction endpoints listen (Slack's first when both).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(listener, _)| listener.local_addr().ok())
            .collect()
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut servers = tokio::task::JoinSet::new();
        for (listener, router) in self.listeners {
            let stop = shutdown.clone();
            servers.spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            });
        }
        if self.engine.slack().is_some_and(|s| s.listen().is_none()) {
            servers.spawn(slack::socket_mode(self.engine.clone(), shutdown.clone()).map(Ok));
        }
        if self.engine.discord().is_some_and(|d| d.listen().is_none()) {
            servers.spawn(discord::gateway_mode(self.engine.clone(), shutdown.clone()).map(Ok));
        }
        if let Some(renewal) = self.renewal {
            let stop = shutdown.clone();
            servers.spawn(async move {
                tokio::select! {
                    () = renewal => {}
                    () = stop.cancelled() => {}
                }
                Ok(())
            });
        }
        self.engine.run(self.refreshes, shutdown.clone()).await;
        while let Some(result) = servers.join_next().await {
            result??;
        }
        Ok(())
    }
}
