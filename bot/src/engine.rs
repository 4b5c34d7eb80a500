//! The common core: follows the gateway's requests and keeps one message
//! per request on each platform, and forwards chat decisions to the gateway,
//! which alone decides.
//!
//! One task does all posting and editing, in order: events from the stream,
//! a reconciliation against the pending list whenever the stream (re)opens
//! (or cannot) and every [`RECONCILE_EVERY`], and refreshes after a chat
//! decision. Which message shows which request (and the stream's cursor) is
//! saved to the state file after every post, so a restarted bot resumes
//! where it was and edits its messages rather than posting twice.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
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
/// following the stream: posts that failed are retried, and the time left
/// moves.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// The longest a chat platform's API call may take before the bot moves on
/// (and retries at the next reconciliation).
const CHAT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a click waits for the gateway's answer: the platforms give an
/// interaction three seconds, in which a click may also have waited
/// [`KEEP_WAIT`] for its message.
const DECIDE_TIMEOUT: Duration = Duration::from_millis(2200);

/// Edits of one message that may fail in a row before the bot stops trying
/// (a deleted message, a channel the bot left).
const MAX_FAILURES: u32 = 5;

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

/// A message the bot posted, and what it shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Posted<R> {
    pub at: R,
    /// The card the message shows (not saved: a restart shows it again).
    #[serde(skip)]
    shown: Option<Card>,
    /// Edits that failed in a row.
    #[serde(default)]
    failures: u32,
    /// The bot stopped editing it after [`MAX_FAILURES`].
    #[serde(default)]
    gave_up: bool,
}

impl<R> Posted<R> {
    fn new(at: R, card: &Card) -> Posted<R> {
        Posted {
            at,
            shown: Some(card.clone()),
            failures: 0,
            gave_up: false,
        }
    }

    fn settled(&self, card: &Card) -> bool {
        self.gave_up || self.shown.as_ref() == Some(card)
    }
}

/// One request's messages.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tracked {
    /// When the gateway made the request: with the id, what identifies it
    /// (ids start again on a new trail).
    pub created: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<Posted<SlackRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discord: Option<Posted<DiscordRef>>,
    /// The request ended and its messages say so.
    #[serde(default)]
    pub done: bool,
}

/// What the state file holds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// The last event seen, to resume the stream after a restart.
    #[serde(default)]
    pub cursor: Option<u64>,
    pub requests: BTreeMap<u64, Tracked>,
}

impl State {
    /// The saved state; a file that cannot be read is set aside (and the
    /// bot starts afresh: old messages' buttons are then refused).
    pub fn load(path: &Path) -> anyhow::Result<State> {
        match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(state) => Ok(state),
                Err(err) => {
                    let aside = path.with_extension(format!("corrupt-{}", Utc::now().timestamp()));
                    tracing::error!(
                        path = %path.display(), moved_to = %aside.display(), error = %err,
                        "the bot's state file is unreadable; starting afresh (old messages' buttons will be refused)"
                    );
                    std::fs::rename(path, &aside)?;
                    Ok(State::default())
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(err) => Err(anyhow::anyhow!("{}: {err}", path.display())),
        }
    }

    /// Written to a temporary file, synced and renamed over the old one,
    /// so a crash leaves one or the other whole.
    fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(self).unwrap_or_default())?;
        file.sync_all()?;
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
    /// Told whenever a request's messages are kept ([`Engine::store`]).
    kept: tokio::sync::Notify,
    state_path: PathBuf,
    full_text_url: String,
    refresh: mpsc::Sender<u64>,
}

/// How long a click on a request whose message the bot has not kept yet
/// waits for it. A platform shows a message as it answers the bot's post,
/// so a quick click can arrive before the bot has read that answer.
const KEEP_WAIT: Duration = Duration::from_millis(500);

impl Engine {
    pub fn new(
        api: &str,
        token: sluice_core::api::client::SharedToken,
        slack: Option<Slack>,
        discord: Option<Discord>,
        state_path: PathBuf,
        full_text_url: String,
    ) -> anyhow::Result<(Arc<Engine>, mpsc::Receiver<u64>)> {
        let state = State::load(&state_path)?;
        let (refresh, refreshes) = mpsc::channel(256);
        let client = ApiClient::with_shared_token(api, token);
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
            kept: tokio::sync::Notify::new(),
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

    fn save(&self, state: &State) {
        if let Err(err) = state.save(&self.state_path) {
            tracing::error!(path = %self.state_path.display(), error = %err, "cannot save the bot's state: a restart may post twice");
        }
    }

    /// Whether `message` (a Slack ts, a Discord message id) is the message
    /// the bot posted for request `id` on `platform`. A click on any other
    /// (an older trail's request with the same id, a message from before
    /// the state was lost) decides nothing. While the bot has no message
    /// for the request on `platform`, it waits up to [`KEEP_WAIT`] for one:
    /// a post in flight.
    pub async fn is_message_of(&self, platform: Platform, id: u64, message: &str) -> bool {
        let deadline = tokio::time::Instant::now() + KEEP_WAIT;
        loop {
            // Made before the look, so that a message kept in between wakes it.
            let kept = self.kept.notified();
            if let Some(ours) = self.message_kept(platform, id) {
                return ours == message;
            }
            if tokio::time::timeout_at(deadline, kept).await.is_err() {
                return false;
            }
        }
    }

    /// The message the bot keeps for request `id` on `platform`, if any.
    fn message_kept(&self, platform: Platform, id: u64) -> Option<String> {
        let state = self.lock();
        let tracked = state.requests.get(&id)?;
        match platform {
            Platform::Slack => tracked.slack.as_ref().map(|p| p.at.ts.clone()),
            Platform::Discord => tracked.discord.as_ref().map(|p| p.at.message.to_string()),
        }
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
        let asked = api.decide_on_behalf(id, approve, reason, person, chat_user);
        match tokio::time::timeout(DECIDE_TIMEOUT, asked).await {
            Ok(Ok(view)) => {
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
            Ok(Err(ClientError::Api { status, message })) => {
                tracing::info!(request = id, person, chat_user, status, %message, "the gateway refused a chat decision");
                Err(format!("Nothing was decided: {message}"))
            }
            Ok(Err(err)) => {
                tracing::warn!(request = id, error = %err, "could not reach the gateway to decide");
                Err("Nothing was decided: the bot cannot reach the Sluice gateway right now; try again, or decide in the console".into())
            }
            Err(_) => {
                tracing::warn!(request = id, "the gateway did not answer a decision in time");
                let _ = self.refresh.try_send(id);
                Err("The gateway did not answer in time: the message shows the outcome once it is known; if it does not change, try again".into())
            }
        }
    }

    /// Follows the gateway until `shutdown`.
    pub async fn run(self: Arc<Self>, mut refreshes: mpsc::Receiver<u64>, shutdown: CancellationToken) {
        let mut cursor: Option<u64> = self.lock().cursor;
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
                    // Without the stream (a gateway with its trail off
                    // serves none), the pending list still is polled.
                    self.reconcile().await;
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
                    _ = tick.tick() => {
                        self.keep_cursor(cursor);
                        self.reconcile().await;
                    }
                    event = stream.next() => match event {
                        Some(Ok(event)) => {
                            cursor = Some(event.id);
                            match event.event.detail {
                                Detail::ApprovalRequested { request, .. } | Detail::ApprovalDecided { request, .. } => {
                                    self.keep_cursor(cursor);
                                    self.sync(request).await;
                                }
                                _ => {}
                            }
                        }
                        // An event this bot cannot read (a newer gateway's):
                        // skipped, the reconciliation covers requests.
                        Some(Err(ClientError::Decode(err))) => {
                            tracing::warn!(error = %err, "skipped an event the bot cannot read");
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
            self.keep_cursor(cursor);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Remembers the stream's position (saved with the next change, and on
    /// each reconciliation).
    fn keep_cursor(&self, cursor: Option<u64>) {
        let mut state = self.lock();
        if state.cursor != cursor {
            state.cursor = cursor;
            self.save(&state);
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
                    self.render(id, None, Card::gone(id, &self.full_text_url)).await;
                }
            }
            Err(err) => tracing::warn!(request = id, error = %err, "cannot read the request"),
        }
    }

    async fn show(&self, view: &RequestView) {
        let known = self.lock().requests.get(&view.id).cloned();
        match known {
            Some(tracked) if tracked.created.is_some_and(|c| c != view.created) => {
                // The same id, another request (a new trail): the old
                // messages end, the new request gets its own.
                tracing::warn!(
                    request = view.id,
                    "a new request reuses the id of an old one; retiring its messages"
                );
                self.render(view.id, tracked.created, Card::gone(view.id, &self.full_text_url))
                    .await;
                self.lock().requests.remove(&view.id);
                if view.state != RequestState::Pending {
                    return;
                }
            }
            None if view.state != RequestState::Pending => {
                // It ended before the bot saw it: nobody needs a message.
                return;
            }
            _ => {}
        }
        let card = Card::new(view, &self.full_text_url, Utc::now());
        self.render(view.id, Some(view.created), card).await;
    }

    /// Posts what is missing and edits what changed, each platform on its
    /// own: one platform's failure neither loses nor blocks the other's.
    async fn render(&self, id: u64, created: Option<DateTime<Utc>>, card: Card) {
        let mut tracked = self.lock().requests.get(&id).cloned().unwrap_or_default();
        if tracked.done {
            return;
        }
        if tracked.created.is_none() {
            tracked.created = created;
        }
        if let Some(slack) = &self.slack {
            tracked.slack = keep(slack, id, tracked.slack.take(), &card).await;
            self.store(id, &tracked);
        }
        if let Some(discord) = &self.discord {
            tracked.discord = keep(discord, id, tracked.discord.take(), &card).await;
        }
        tracked.done = !card.pending()
            && tracked.slack.as_ref().is_none_or(|p| p.settled(&card))
            && tracked.discord.as_ref().is_none_or(|p| p.settled(&card));
        self.store(id, &tracked);
    }

    /// Keeps `tracked` (with the cards shown, in memory) and writes the
    /// state file only when what it holds changed: a reconciliation that
    /// finds every message as it should be writes nothing.
    fn store(&self, id: u64, tracked: &Tracked) {
        let persisted = |t: Option<&Tracked>| t.and_then(|t| serde_json::to_value(t).ok());
        let mut state = self.lock();
        let changed = persisted(state.requests.get(&id)) != persisted(Some(tracked));
        state.requests.insert(id, tracked.clone());
        if changed {
            state.prune();
            self.save(&state);
        }
        self.kept.notify_waiters();
    }
}

/// A chat platform's messages, as the engine uses them.
pub trait Messenger {
    /// Where a message is (a Slack channel and ts, a Discord message id).
    type At;
    const NAME: &'static str;
    fn post(&self, card: &Card) -> impl std::future::Future<Output = anyhow::Result<Self::At>> + Send;
    fn update(&self, at: &Self::At, card: &Card) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

/// One platform's message for a request: posted while the request is
/// pending and has none, edited when its card changed.
async fn keep<M: Messenger>(
    messenger: &M,
    id: u64,
    posted: Option<Posted<M::At>>,
    card: &Card,
) -> Option<Posted<M::At>> {
    let platform = M::NAME;
    match posted {
        None if card.pending() => match tokio::time::timeout(CHAT_TIMEOUT, messenger.post(card)).await {
            Ok(Ok(at)) => Some(Posted::new(at, card)),
            Ok(Err(err)) => {
                tracing::warn!(request = id, error = %err, "could not post to {platform}; will retry");
                None
            }
            Err(_) => {
                tracing::warn!(request = id, "{platform} did not answer a post in time; will retry");
                None
            }
        },
        None => None,
        Some(mut posted) if !posted.settled(card) => {
            let outcome = match tokio::time::timeout(CHAT_TIMEOUT, messenger.update(&posted.at, card)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(anyhow::anyhow!("no answer within {CHAT_TIMEOUT:?}")),
            };
            match outcome {
                Ok(()) => {
                    posted.shown = Some(card.clone());
                    posted.failures = 0;
                }
                Err(err) => {
                    posted.failures += 1;
                    if posted.failures >= MAX_FAILURES {
                        posted.gave_up = true;
                        tracing::error!(request = id, error = %err, "could not update the {platform} message {MAX_FAILURES} times; leaving it");
                    } else {
                        tracing::warn!(request = id, error = %err, "could not update the {platform} message; will retry");
                    }
                }
            }
            Some(posted)
        }
        Some(posted) => Some(posted),
    }
}
