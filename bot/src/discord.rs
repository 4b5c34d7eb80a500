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
use crate::render::{Card, Outcome, fit};
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

    fn identity_of(&self, user: &str) -> Option<String> {
        self.config.users.get(user).cloned()
    }
}

impl crate::engine::Messenger for Discord {
    type At = DiscordRef;
    const NAME: &'static str = "Discord";

    async fn post(&self, card: &Card) -> anyhow::Result<DiscordRef> {
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

    async fn update(&self, at: &DiscordRef, card: &Card) -> anyhow::Result<()> {
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
}

fn http(config: &DiscordConfig) -> Http {
    let mut builder = HttpBuilder::new(config.bot_token.expose());
    if let Some(url) = &config.api_url {
        // The rate limiter builds its requests without the proxy.
        builder = builder.proxy(url.as_str()).ratelimiter_disabled(true);
    }
    builder.build()
}

fn status(card: &Card) -> String {
    match &card.outcome {
        None => "waiting for approval".into(),
        Some(outcome) => fit(&outcome.line(), 1900, markdown),
    }
}

/// One character outside code blocks: markdown characters lose their
/// meaning, and `<@id>` cannot become a mention (nothing pings anyway:
/// every message allows no mentions).
fn markdown(c: char, out: &mut String) {
    if matches!(
        c,
        '\\' | '*' | '_' | '~' | '`' | '|' | '>' | '<' | '#' | '[' | ']' | '(' | ')'
    ) {
        out.push('\\');
    }
    out.push(c);
}

/// Text outside code blocks, whole.
pub fn escape(text: &str) -> String {
    fit(text, usize::MAX, markdown)
}

/// Discord's limits: an embed field's value holds 1024 characters, the
/// description 4096, the whole embed 6000; the budgets below keep the sum
/// under that.
const FIELD: usize = 1000;

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
            format!(" ({})", fit(&card.groups.join(", "), 300, markdown))
        };
        description.push_str(&format!(
            "**{}**{groups} on **{}**\n",
            fit(&card.requester, 200, markdown),
            fit(&card.target, 200, markdown)
        ));
    }
    if let Some(access) = &card.access {
        description.push_str(&format!("Asks for {}\n", fit(access, 300, markdown)));
    }
    if !card.statement.is_empty() {
        // The card's statement is at most 900 characters; a backtick
        // becomes another character, so nothing closes the block.
        let code = fit(&card.statement, 1000, |c, out| {
            out.push(if c == '`' { '\u{2cb}' } else { c })
        });
        description.push_str(&format!("```sql\n{code}\n```"));
        if card.truncated > 0 {
            description.push_str(&format!(
                "…{} more characters: [full text]({}) (or the console's Approvals view)\n",
                card.truncated,
                fit(&card.full_text_url, 250, |c, out| out.push(if c == ')' {
                    '_'
                } else {
                    c
                }))
            ));
        }
    }
    let mut embed = CreateEmbed::new()
        .title(format!("{} · request {}", card.title, card.id))
        .description(description)
        .colour(colour);
    if !card.classification.is_empty() {
        embed = embed.field(
            "Classification",
            fit(&card.classification.join("\n"), FIELD, markdown),
            false,
        );
    }
    if !card.rule.is_empty() {
        let reason = card
            .reason
            .as_deref()
            .map(|r| format!(": {}", fit(r, FIELD - 220, markdown)))
            .unwrap_or_default();
        embed = embed.field("Rule", format!("{}{reason}", fit(&card.rule, 200, markdown)), false);
    }
    match &card.outcome {
        None => {
            embed = embed
                .field("Approvals", fit(&card.approvals_line(), FIELD, markdown), true)
                .field(
                    "Time left",
                    // Discord shows the relative time live, in each reader's clock.
                    format!("<t:{0}:R> (<t:{0}:T>)", card.expires.timestamp()),
                    true,
                );
            if !card.approve_via.is_empty() {
                embed = embed.field("Approve only through", card.approve_via.join(" or "), true);
            }
        }
        Some(outcome) => embed = embed.field("Outcome", fit(&outcome.line(), FIELD, markdown), false),
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
    let content = fit(text, 1900, markdown);
    json!({"type": MESSAGE, "data": {"content": content, "flags": EPHEMERAL, "allowed_mentions": {"parse": []}}})
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
        Some(COMPONENT) => Act::Click {
            user,
            custom_id,
            message: payload["message"]["id"].as_str().unwrap_or_default().to_string(),
        },
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
    /// A button: `sluice:approve:ID` or `sluice:deny:ID`, on `message`.
    Click {
        user: String,
        custom_id: String,
        message: String,
    },
    /// The deny form: `sluice:deny_reason:ID:MESSAGE`.
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
        Act::Click {
            user,
            custom_id,
            message,
        } => {
            let approving = request(&custom_id, "sluice:approve:");
            let denying = request(&custom_id, "sluice:deny:");
            let Some(id) = approving.or(denying) else {
                return deferred;
            };
            if !engine.is_message_of(Platform::Discord, id, &message).await {
                return ephemeral(&not_current(id));
            }
            let Some(person) = discord.identity_of(&user) else {
                return ephemeral(&unmapped(&user));
            };
            if let Some(id) = approving {
                match engine.decide(Platform::Discord, &person, &user, id, true, None).await {
                    // The message changes when the gateway's event arrives.
                    Ok(()) => deferred,
                    Err(why) => ephemeral(&why),
                }
            } else {
                json!({
                    "type": MODAL,
                    "data": {
                        "custom_id": format!("sluice:deny_reason:{id}:{message}"),
                        "title": format!("Deny request {id}"),
                        "components": [{"type": 1, "components": [{
                            "type": 4, "custom_id": "reason", "style": 2,
                            "label": "Why (shown to the requester, recorded)",
                            "required": false, "max_length": 1000
                        }]}]
                    }
                })
            }
        }
        Act::Submit {
            user,
            custom_id,
            reason,
        } => {
            let Some((id, message)) = custom_id
                .strip_prefix("sluice:deny_reason:")
                .and_then(|rest| rest.split_once(':'))
                .and_then(|(id, message)| Some((id.parse::<u64>().ok()?, message)))
            else {
                return deferred;
            };
            if !engine.is_message_of(Platform::Discord, id, message).await {
                return ephemeral(&not_current(id));
            }
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
                    message: click.message.id.to_string(),
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

fn not_current(id: u64) -> String {
    format!(
        "This is not the message the bot keeps for request {id} (an older request, or from before the bot lost its state), so nothing was decided. Use the newest message for it, or the console."
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::view;

    #[test]
    fn fields_stay_within_discords_limits() {
        let mut hostile = view();
        hostile.statement = "`".repeat(5000);
        hostile.reason = Some("*".repeat(5000));
        hostile.rule = "_".repeat(5000);
        hostile.groups = vec!["#".repeat(5000)];
        hostile.statements = (0..100).map(|_| hostile.statements[0].clone()).collect();
        for state in [
            sluice_core::approvals::RequestState::Pending,
            sluice_core::approvals::RequestState::Denied,
        ] {
            hostile.state = state;
            hostile.denied_by = Some("carol".into());
            hostile.denial_reason = Some("(".repeat(1000));
            let card = Card::new(&hostile, "https://x/{id}", hostile.created);
            let embed = serde_json::to_value(embed(&card)).unwrap();
            let description = embed["description"].as_str().unwrap();
            assert!(description.chars().count() <= 4096);
            assert_eq!(description.matches("```").count(), 2, "{description}");
            let mut total = description.chars().count() + embed["title"].as_str().unwrap().chars().count();
            for field in embed["fields"].as_array().unwrap() {
                let value = field["value"].as_str().unwrap().chars().count();
                assert!(value <= 1024, "{field}");
                total += value + field["name"].as_str().unwrap().chars().count();
            }
            assert!(total <= 6000, "{total}");
            assert!(status(&card).chars().count() <= 1990);
        }
    }
}
