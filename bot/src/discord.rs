//! Discord: messages through the REST API (serenity's HTTP client); button
//! clicks and the deny-reason modal through the HTTP interactions endpoint,
//! whose requests must carry the application's Ed25519 signature, or
//! through the gateway connection of a normal bot.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::Utc;
use serde_json::{Value, json};
use serenity::all::{
    ButtonStyle, ChannelId, CreateActionRow, CreateAllowedMentions, CreateButton, CreateEmbed, CreateMessage,
    EditMessage, MessageId,
};
use serenity::http::{Http, HttpBuilder};
use serenity::interactions_endpoint::Verifier;

use crate::config::DiscordConfig;
use crate::engine::{Engine, Platform};
use crate::render::{Card, Outcome};
use crate::verify;

/// Where a request's message is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiscordRef {
    pub channel: u64,
    pub message: u64,
}

pub struct Discord {
    config: DiscordConfig,
    http: Http,
    /// HTTP mode: checks each interaction's signature. `None` in gateway mode.
    verifier: Option<Verifier>,
}

/// Interaction types and response types of Discord's API.
const PING: u64 = 1;
const COMPONENT: u64 = 3;
const MODAL_SUBMIT: u64 = 5;
const PONG: u64 = 1;
const MESSAGE: u64 = 4;
const DEFERRED_UPDATE: u64 = 6;
const MODAL: u64 = 9;
/// Only the clicking user sees the message.
const EPHEMERAL: u64 = 1 << 6;

impl Discord {
    pub fn new(config: DiscordConfig) -> anyhow::Result<Discord> {
        let verifier = match config.public_key {
            Some(key) => Some(Verifier::try_new(key).map_err(|err| anyhow::anyhow!("discord.public_key: {err}"))?),
            None => None,
        };
        Ok(Discord {
            http: http(&config),
            verifier,
            config,
        })
    }

    /// Where the interactions endpoint listens; `None` in gateway mode.
    pub fn listen(&self) -> Option<std::net::SocketAddr> {
        self.verifier.is_some().then_some(self.config.listen)
    }

    fn http_client(&self) -> Http {
        http(&self.config)
    }

    pub async fn post(&self, card: &Card) -> anyhow::Result<DiscordRef> {
        let message = CreateMessage::new()
            .content(format!("Request {}: {}", card.id, status(card)))
            .embed(embed(card))
            .components(components(card))
            .allowed_mentions(CreateAllowedMentions::new());
        let posted = ChannelId::new(self.config.channel_id)
            .send_message(&self.http, message)
            .await?;
        Ok(DiscordRef {
            channel: posted.channel_id.get(),
            message: posted.id.get(),
        })
    }

    pub async fn update(&self, at: &DiscordRef, card: &Card) -> anyhow::Result<()> {
        let edit = EditMessage::new()
            .content(format!("Request {}: {}", card.id, status(card)))
            .embed(embed(card))
            .components(components(card))
            .allowed_mentions(CreateAllowedMentions::new());
        ChannelId::new(at.channel)
            .edit_message(&self.http, MessageId::new(at.message), edit)
            .await?;
        Ok(())
    }

    fn identity_of(&self, user: &str) -> Option<String> {
        self.config.users.get(user).cloned()
    }
}

fn http(config: &DiscordConfig) -> Http {
    let mut builder = HttpBuilder::new(&config.bot_token);
    if let Some(url) = &config.api_url {
        // The rate limiter builds its requests without the proxy.
        builder = builder.proxy(url.as_str()).ratelimiter_disabled(true);
    }
    builder.build()
}

fn status(card: &Card) -> String {
    match &card.outcome {
        None => "waiting for approval".into(),
        Some(outcome) => escape(&outcome.line()),
    }
}

/// Text outside code blocks: markdown characters lose their meaning, and
/// `<@id>` cannot become a mention (nothing pings anyway: every message
/// allows no mentions).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(
            c,
            '\\' | '*' | '_' | '~' | '`' | '|' | '>' | '<' | '#' | '[' | ']' | '(' | ')'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn embed(card: &Card) -> CreateEmbed {
    let colour = match &card.outcome {
        None => 0xE0A100,
        Some(Outcome::Approved { .. }) => 0x2E9E44,
        Some(Outcome::Denied { .. }) => 0xC62828,
        Some(_) => 0x757575,
    };
    let mut description = String::new();
    if !card.requester.is_empty() {
        let groups = if card.groups.is_empty() {
            String::new()
        } else {
            format!(" ({})", escape(&card.groups.join(", ")))
        };
        description.push_str(&format!(
            "**{}**{groups} on **{}**\n",
            escape(&card.requester),
            escape(&card.target)
        ));
    }
    if let Some(access) = &card.access {
        description.push_str(&format!("Asks for {}\n", escape(access)));
    }
    if !card.statement.is_empty() {
        description.push_str(&format!("```sql\n{}\n```", card.statement.replace('`', "\u{2cb}")));
        if card.truncated > 0 {
            description.push_str(&format!(
                "…{} more characters: [full text]({}) (or the console's Approvals view)\n",
                card.truncated, card.full_text_url
            ));
        }
    }
    let mut embed = CreateEmbed::new()
        .title(format!("{} · request {}", card.title, card.id))
        .description(description)
        .colour(colour);
    if !card.classification.is_empty() {
        embed = embed.field("Classification", escape(&card.classification.join("\n")), false);
    }
    if !card.rule.is_empty() {
        let reason = card
            .reason
            .as_deref()
            .map(|r| format!(": {}", escape(r)))
            .unwrap_or_default();
        embed = embed.field("Rule", format!("{}{reason}", escape(&card.rule)), false);
    }
    match &card.outcome {
        None => {
            embed = embed.field("Approvals", escape(&card.approvals_line()), true).field(
                "Time left",
                // Discord shows the relative time live, in each reader's clock.
                format!("<t:{0}:R> (<t:{0}:T>)", card.expires.timestamp()),
                true,
            );
            if !card.approve_via.is_empty() {
                embed = embed.field("Approve only through", card.approve_via.join(" or "), true);
            }
        }
        Some(outcome) => embed = embed.field("Outcome", escape(&outcome.line()), false),
    }
    embed
}

fn components(card: &Card) -> Vec<CreateActionRow> {
    if !card.pending() {
        return Vec::new();
    }
    vec![CreateActionRow::Buttons(vec![
        CreateButton::new(format!("sluice:approve:{}", card.id))
            .label("Approve")
            .style(ButtonStyle::Success),
        CreateButton::new(format!("sluice:deny:{}", card.id))
            .label("Deny")
            .style(ButtonStyle::Danger),
    ])]
}

/// `POST /discord/interactions`: the application's Interactions Endpoint URL.
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/discord/interactions", post(interactions))
        .with_state(engine)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn ephemeral(text: &str) -> Value {
    json!({"type": MESSAGE, "data": {"content": text, "flags": EPHEMERAL, "allowed_mentions": {"parse": []}}})
}

async fn interactions(State(engine): State<Arc<Engine>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(discord) = engine.discord() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(verifier) = &discord.verifier else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if let Err(err) = verify::verify_discord(
        verifier,
        header(&headers, "x-signature-timestamp"),
        header(&headers, "x-signature-ed25519"),
        &body,
        Utc::now().timestamp(),
    ) {
        tracing::warn!(error = %err, "refused a Discord request: its signature does not hold");
        return (StatusCode::UNAUTHORIZED, format!("invalid request signature: {err}")).into_response();
    }
    let Ok(payload) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "expected a JSON interaction").into_response();
    };
    let user = payload["member"]["user"]["id"]
        .as_str()
        .or_else(|| payload["user"]["id"].as_str())
        .unwrap_or_default()
        .to_string();
    let custom_id = payload["data"]["custom_id"].as_str().unwrap_or_default().to_string();
    let act = match payload["type"].as_u64() {
        Some(PING) => return axum::Json(json!({"type": PONG})).into_response(),
        Some(COMPONENT) => Act::Click { user, custom_id },
        Some(MODAL_SUBMIT) => {
            let reason = payload["data"]["components"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|row| row["components"].as_array().into_iter().flatten())
                .find(|c| c["custom_id"] == "reason")
                .and_then(|c| c["value"].as_str())
                .map(str::to_string);
            Act::Submit {
                user,
                custom_id,
                reason,
            }
        }
        _ => return (StatusCode::BAD_REQUEST, "unsupported interaction type").into_response(),
    };
    axum::Json(respond(&engine, discord, act).await).into_response()
}

/// What a Discord user did, from either transport.
enum Act {
    /// A button: `sluice:approve:ID` or `sluice:deny:ID`.
    Click { user: String, custom_id: String },
    /// The deny form: `sluice:deny_reason:ID`.
    Submit {
        user: String,
        custom_id: String,
        reason: Option<String>,
    },
}

/// The interaction response for `act`, after forwarding any decision.
async fn respond(engine: &Engine, discord: &Discord, act: Act) -> Value {
    let deferred = json!({"type": DEFERRED_UPDATE});
    let request = |custom_id: &str, prefix: &str| custom_id.strip_prefix(prefix).and_then(|id| id.parse::<u64>().ok());
    match act {
        Act::Click { user, custom_id } => {
            let Some(person) = discord.identity_of(&user) else {
                return ephemeral(&unmapped(&user));
            };
            if let Some(id) = request(&custom_id, "sluice:approve:") {
                match engine.decide(Platform::Discord, &person, &user, id, true, None).await {
                    // The message changes when the gateway's event arrives.
                    Ok(()) => deferred,
                    Err(why) => ephemeral(&why),
                }
            } else if let Some(id) = request(&custom_id, "sluice:deny:") {
                json!({
                    "type": MODAL,
                    "data": {
                        "custom_id": format!("sluice:deny_reason:{id}"),
                        "title": format!("Deny request {id}"),
                        "components": [{"type": 1, "components": [{
                            "type": 4, "custom_id": "reason", "style": 2,
                            "label": "Why (shown to the requester, recorded)",
                            "required": false, "max_length": 1000
                        }]}]
                    }
                })
            } else {
                deferred
            }
        }
        Act::Submit {
            user,
            custom_id,
            reason,
        } => {
            let Some(id) = request(&custom_id, "sluice:deny_reason:") else {
                return deferred;
            };
            let Some(person) = discord.identity_of(&user) else {
                return ephemeral(&unmapped(&user));
            };
            let reason = reason.as_deref().map(str::trim).filter(|r| !r.is_empty());
            match engine
                .decide(Platform::Discord, &person, &user, id, false, reason)
                .await
            {
                Ok(()) => deferred,
                Err(why) => ephemeral(&why),
            }
        }
    }
}

/// Gateway mode: the bot connects to Discord's gateway like any bot and
/// receives interactions there, answering each through the REST API, so it
/// needs no public URL. No intents: interactions come without any.
pub async fn gateway_mode(engine: Arc<Engine>, shutdown: tokio_util::sync::CancellationToken) {
    use serenity::all::{ClientBuilder, GatewayIntents};
    let Some(discord) = engine.discord() else { return };
    let mut failures = 0u32;
    loop {
        let built = ClientBuilder::new_with_http(discord.http_client(), GatewayIntents::empty())
            .event_handler(Handler { engine: engine.clone() })
            .await;
        match built {
            Ok(mut client) => {
                let shards = client.shard_manager.clone();
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        shards.shutdown_all().await;
                        return;
                    }
                    ended = client.start() => match ended {
                        Ok(()) => tracing::info!("the Discord gateway connection ended; reconnecting"),
                        Err(err) => {
                            failures += 1;
                            tracing::warn!(error = %err, "the Discord gateway connection failed");
                        }
                    },
                }
            }
            Err(err) => {
                failures += 1;
                tracing::warn!(error = %err, "cannot start the Discord gateway client");
            }
        }
        let wait = std::time::Duration::from_secs(u64::from(failures.clamp(1, 30)));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

struct Handler {
    engine: Arc<Engine>,
}

#[serenity::async_trait]
impl serenity::all::EventHandler for Handler {
    async fn ready(&self, _: serenity::all::Context, ready: serenity::all::Ready) {
        tracing::info!(user = %ready.user.name, "connected to the Discord gateway");
    }

    async fn interaction_create(&self, ctx: serenity::all::Context, interaction: serenity::all::Interaction) {
        use serenity::all::{ActionRowComponent, Interaction};
        let Some(discord) = self.engine.discord() else { return };
        let (id, token, act) = match interaction {
            Interaction::Component(click) => (
                click.id,
                click.token,
                Act::Click {
                    user: click.user.id.to_string(),
                    custom_id: click.data.custom_id,
                },
            ),
            Interaction::Modal(submit) => {
                let reason = submit
                    .data
                    .components
                    .iter()
                    .flat_map(|row| row.components.iter())
                    .find_map(|c| match c {
                        ActionRowComponent::InputText(input) if input.custom_id == "reason" => input.value.clone(),
                        _ => None,
                    });
                (
                    submit.id,
                    submit.token,
                    Act::Submit {
                        user: submit.user.id.to_string(),
                        custom_id: submit.data.custom_id,
                        reason,
                    },
                )
            }
            _ => return,
        };
        let answer = respond(&self.engine, discord, act).await;
        if let Err(err) = ctx
            .http
            .create_interaction_response(id, &token, &answer, Vec::new())
            .await
        {
            tracing::warn!(error = %err, "could not answer a Discord interaction");
        }
    }
}

fn unmapped(user: &str) -> String {
    format!(
        "Sluice does not know who Discord user {user} is, so nothing was decided. Ask an admin to map you in the bot's [discord.users]."
    )
}
