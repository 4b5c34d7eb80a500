//! The common core: follows the gateway's requests and keeps one message
//! per request on each platform, and forwards chat decisions to the gateway,
//! which alone decides.
//!
//! One task does all posting and editing, in order: events from the stream,
//! a reconciliation against the pending list whenever the stream (re)opens
//! and every [`RECONCILE_EVERY`], and refreshes after a chat decision. Which
//! message shows which request is saved to the state file after every post,
//! so a restarted bot edits its messages rather than posting twice.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_core::api::client::{ApiClient, ClientError};
use sluice_core::approvals::{RequestState, RequestView};
use sluice_core::audit::Detail;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::discord::{Discord, DiscordRef};
use crate::render::Card;
use crate::slack::{Slack, SlackRef};

/// How often the bot compares its messages with the pending list, besides
/// following the stream: posts that failed are retried, and countdowns move.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// Ended requests whose message references are kept (to ignore late events).
const KEEP_DONE: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    Slack,
    Discord,
}

impl Platform {
    pub fn name(self) -> &'static str {
        match self {
            Platform::Slack => "slack",
            Platform::Discord => "discord",
        }
    }
}

/// One request's messages.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tracked {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<SlackRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discord: Option<DiscordRef>,
    /// The request ended and its messages say so.
    #[serde(default)]
    pub done: bool,
    /// The card the messages show now (not saved: a restart shows it again).
    #[serde(skip)]
    shown: Option<Card>,
}

/// What the state file holds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub requests: BTreeMap<u64, Tracked>,
}

impl State {
    pub fn load(path: &Path) -> anyhow::Result<State> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|err| anyhow::anyhow!("{}: not a Sluice bot state file: {err}", path.display())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(err) => Err(anyhow::anyhow!("{}: {err}", path.display())),
        }
    }

    /// Written to a temporary file and renamed over the old one, so a crash
    /// leaves one or the other.
    fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).unwrap_or_default())?;
        std::fs::rename(tmp, path)
    }

    fn prune(&mut self) {
        let done: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, t)| t.done)
            .map(|(id, _)| *id)
            .collect();
        for id in done.iter().take(done.len().saturating_sub(KEEP_DONE)) {
            self.requests.remove(id);
        }
    }
}

pub struct Engine {
    api: ApiClient,
    /// One client per platform, so the gateway records where decisions came from.
    deciders: HashMap<&'static str, ApiClient>,
    slack: Option<Slack>,
    discord: Option<Discord>,
    state: Mutex<State>,
    state_path: PathBuf,
    full_text_url: String,
    refresh: mpsc::Sender<u64>,
}

impl Engine {
    pub fn new(
        api: &str,
        token: &str,
        slack: Option<Slack>,
        discord: Option<Discord>,
        state_path: PathBuf,
        full_text_url: String,
    ) -> anyhow::Result<(Arc<Engine>, mpsc::Receiver<u64>)> {
        let state = State::load(&state_path)?;
        let (refresh, refreshes) = mpsc::channel(256);
        let client = ApiClient::new(api, Some(token));
        let deciders = [Platform::Slack, Platform::Discord]
            .into_iter()
            .map(|p| (p.name(), client.clone().via(p.name())))
            .collect();
        let engine = Engine {
            api: client,
            deciders,
            slack,
            discord,
            state: Mutex::new(state),
            state_path,
            full_text_url,
            refresh,
        };
        Ok((Arc::new(engine), refreshes))
    }

    pub fn slack(&self) -> Option<&Slack> {
        self.slack.as_ref()
    }

    pub fn discord(&self) -> Option<&Discord> {
        self.discord.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forwards a chat user's click: `person` is who the bot's mapping says
    /// they are. `Err` is the explanation to show them, and nothing changed.
    pub async fn decide(
        &self,
        platform: Platform,
        person: &str,
        chat_user: &str,
        id: u64,
        approve: bool,
        reason: Option<&str>,
    ) -> Result<(), String> {
        let api = &self.deciders[platform.name()];
        match api.decide_on_behalf(id, approve, reason, person, chat_user).await {
            Ok(view) => {
                tracing::info!(
                    request = id,
                    person,
                    chat_user,
                    platform = platform.name(),
                    state = view.state.name(),
                    "decision forwarded"
                );
                let _ = self.refresh.try_send(id);
                Ok(())
            }
            Err(ClientError::Api { status, message }) => {
                tracing::info!(request = id, person, chat_user, status, %message, "the gateway refused a chat decision");
                Err(format!("Nothing was decided: {message}"))
            }
            Err(err) => {
                tracing::warn!(request = id, error = %err, "could not reach the gateway to decide");
                Err("Nothing was decided: the bot cannot reach the Sluice gateway right now; try again, or decide in the console".into())
            }
        }
    }

    /// Follows the gateway until `shutdown`.
    pub async fn run(self: Arc<Self>, mut refreshes: mpsc::Receiver<u64>, shutdown: CancellationToken) {
        let mut cursor: Option<u64> = None;
        let mut failures = 0u32;
        loop {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return,
                opened = async {
                    match cursor {
                        Some(since) => self.api.events(since).await,
                        None => self.api.events_tail(0).await,
                    }
                } => opened,
            };
            let mut stream = match opened {
                Ok(stream) => stream,
                Err(err) => {
                    if err.status() == Some(409) {
                        // The trail was replaced: start from now, and the
                        // reconciliation covers what happened meanwhile.
                        cursor = None;
                    }
                    failures += 1;
                    let wait = Duration::from_secs(u64::from(failures.min(5)));
                    tracing::warn!(error = %err, retry_in = ?wait, "cannot follow the gateway's events");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            failures = 0;
            self.reconcile().await;
            let mut tick = tokio::time::interval(RECONCILE_EVERY);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    Some(id) = refreshes.recv() => self.sync(id).await,
                    _ = tick.tick() => self.reconcile().await,
                    event = stream.next() => match event {
                        Some(Ok(event)) => {
                            cursor = Some(event.id);
                            match event.event.detail {
                                Detail::ApprovalRequested { request, .. } | Detail::ApprovalDecided { request, .. } => {
                                    self.sync(request).await;
                                }
                                _ => {}
                            }
                        }
                        Some(Err(err)) => {
                            tracing::warn!(error = %err, "the event stream broke; resuming");
                            break;
                        }
                        None => {
                            tracing::info!("the gateway closed the event stream; resuming");
                            break;
                        }
                    },
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Every pending request gets its messages; every message of a request
    /// that ended says so.
    pub async fn reconcile(&self) {
        let views = match self.api.approvals().await {
            Ok(views) => views,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list approval requests");
                return;
            }
        };
        let listed: Vec<u64> = views.iter().map(|v| v.id).collect();
        for view in views {
            self.show(&view).await;
        }
        let open: Vec<u64> = self
            .lock()
            .requests
            .iter()
            .filter(|(id, t)| !t.done && !listed.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in open {
            self.sync(id).await;
        }
    }

    /// Shows request `id` as the gateway has it now.
    async fn sync(&self, id: u64) {
        match self.api.approval(id).await {
            Ok(view) => self.show(&view).await,
            Err(err) if err.status() == Some(404) => {
                let tracked = self.lock().requests.get(&id).is_some_and(|t| !t.done);
                if tracked {
                    self.render(id, Card::gone(id, &self.full_text_url)).await;
                }
            }
            Err(err) => tracing::warn!(request = id, error = %err, "cannot read the request"),
        }
    }

    async fn show(&self, view: &RequestView) {
        let known = self.lock().requests.contains_key(&view.id);
        if !known && view.state != RequestState::Pending {
            // It ended before the bot saw it: nobody needs a message.
            return;
        }
        self.render(view.id, Card::new(view, &self.full_text_url, chrono::Utc::now()))
            .await;
    }

    /// Posts what is missing and edits what changed.
    async fn render(&self, id: u64, card: Card) {
        let tracked = self.lock().requests.get(&id).cloned().unwrap_or_default();
        if tracked.done || tracked.shown.as_ref() == Some(&card) && self.complete(&tracked) {
            return;
        }
        let mut next = tracked.clone();
        if let Some(slack) = &self.slack {
            match &tracked.slack {
                None if card.pending() => match slack.post(&card).await {
                    Ok(at) => next.slack = Some(at),
                    Err(err) => tracing::warn!(request = id, error = %err, "could not post to Slack; will retry"),
                },
                None => {}
                Some(at) => {
                    if let Err(err) = slack.update(at, &card).await {
                        tracing::warn!(request = id, error = %err, "could not update the Slack message; will retry");
                        return;
                    }
                }
            }
        }
        if let Some(discord) = &self.discord {
            match &tracked.discord {
                None if card.pending() => match discord.post(&card).await {
                    Ok(at) => next.discord = Some(at),
                    Err(err) => tracing::warn!(request = id, error = %err, "could not post to Discord; will retry"),
                },
                None => {}
                Some(at) => {
                    if let Err(err) = discord.update(at, &card).await {
                        tracing::warn!(request = id, error = %err, "could not update the Discord message; will retry");
                        return;
                    }
                }
            }
        }
        next.done = !card.pending();
        next.shown = Some(card);
        let mut state = self.lock();
        state.requests.insert(id, next);
        state.prune();
        if let Err(err) = state.save(&self.state_path) {
            tracing::error!(path = %self.state_path.display(), error = %err, "cannot save the bot's state: a restart may post twice");
        }
    }

    /// Whether the request has a message on every platform.
    fn complete(&self, tracked: &Tracked) -> bool {
        (self.slack.is_none() || tracked.slack.is_some()) && (self.discord.is_none() || tracked.discord.is_some())
    }
}
