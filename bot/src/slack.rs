//! Slack: messages through the Web API (slack-morphism); button clicks and
//! the deny-reason modal through the interactions endpoint, whose requests
//! must carry Slack's signature, or through Socket Mode.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::Utc;
use serde_json::{Value, json};
use slack_morphism::prelude::*;

use crate::config::SlackConfig;
use crate::engine::{Engine, Platform};
use crate::render::{Card, Outcome};
use crate::verify;

type Connector =
    SlackClientHyperConnector<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>>;

/// Where a request's message is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlackRef {
    pub channel: String,
    pub ts: String,
}

pub struct Slack {
    config: SlackConfig,
    client: SlackClient<Connector>,
    token: SlackApiToken,
}

/// The buttons' action ids; their value is the request id.
const APPROVE: &str = "sluice_approve";
const DENY: &str = "sluice_deny";
/// The deny modal's callback id; its private metadata is the request id.
const DENY_MODAL: &str = "sluice_deny_reason";

impl Slack {
    pub fn new(config: SlackConfig) -> anyhow::Result<Slack> {
        // The system's roots (none found is not an error here: a plain
        // http:// base URL needs none, and https fails with a clear error).
        let tls = sluice_core::tls::client_config(None)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let connector = SlackClientHyperConnector::with_connector(https).with_slack_api_url(&config.api_url);
        let token = SlackApiToken::new(SlackApiTokenValue(config.bot_token.clone()));
        Ok(Slack {
            client: SlackClient::new(connector),
            token,
            config,
        })
    }

    /// Where the interactions endpoint listens; `None` in Socket Mode.
    pub fn listen(&self) -> Option<std::net::SocketAddr> {
        self.config.app_token.is_none().then_some(self.config.listen)
    }

    pub async fn post(&self, card: &Card) -> anyhow::Result<SlackRef> {
        let session = self.client.open_session(&self.token);
        let request = SlackApiChatPostMessageRequest::new(SlackChannelId(self.config.channel.clone()), content(card));
        let posted = session.chat_post_message(&request).await?;
        Ok(SlackRef {
            channel: posted.channel.0,
            ts: posted.ts.0,
        })
    }

    pub async fn update(&self, at: &SlackRef, card: &Card) -> anyhow::Result<()> {
        let session = self.client.open_session(&self.token);
        let request = SlackApiChatUpdateRequest::new(
            SlackChannelId(at.channel.clone()),
            content(card),
            SlackTs(at.ts.clone()),
        );
        session.chat_update(&request).await?;
        Ok(())
    }

    /// A message only `user` sees, in `channel`.
    async fn tell(&self, channel: &str, user: &str, text: &str) {
        let session = self.client.open_session(&self.token);
        let request = SlackApiChatPostEphemeralRequest::new(
            SlackChannelId(channel.to_string()),
            SlackUserId(user.to_string()),
            SlackMessageContent::new().with_text(escape(text)),
        );
        if let Err(err) = session.chat_post_ephemeral(&request).await {
            tracing::warn!(user, error = %err, "could not tell a Slack user why their click did nothing");
        }
    }

    async fn open_deny_modal(&self, trigger_id: &str, id: u64) -> anyhow::Result<()> {
        let session = self.client.open_session(&self.token);
        let input = SlackInputBlock::new(
            "Why (shown to the requester and recorded)".into(),
            SlackInputBlockElement::PlainTextInput(
                SlackBlockPlainTextInputElement::new()
                    .with_action_id(SlackActionId("reason".into()))
                    .with_multiline(true)
                    .with_max_length(1000),
            ),
        )
        .with_block_id(SlackBlockId("reason".into()))
        .with_optional(true);
        let view = SlackView::Modal(
            SlackModalView::new(format!("Deny request {id}").into(), vec![input.into()])
                .with_submit("Deny".into())
                .with_close("Cancel".into())
                .with_callback_id(SlackCallbackId(DENY_MODAL.into()))
                .with_private_metadata(id.to_string()),
        );
        session
            .views_open(&SlackApiViewsOpenRequest::new(
                SlackTriggerId(trigger_id.to_string()),
                view,
            ))
            .await?;
        Ok(())
    }

    /// The Sluice identity of a Slack user: from `[slack.users]`, else (with
    /// `map_by_email`) their profile email.
    async fn identity_of(&self, user: &str) -> Option<String> {
        if let Some(identity) = self.config.users.get(user) {
            return Some(identity.clone());
        }
        if !self.config.map_by_email {
            return None;
        }
        let session = self.client.open_session(&self.token);
        match session
            .users_info(&SlackApiUsersInfoRequest::new(SlackUserId(user.to_string())))
            .await
        {
            Ok(info) => info.user.profile.and_then(|p| p.email).map(|e| e.0),
            Err(err) => {
                tracing::warn!(user, error = %err, "users.info failed: cannot map the Slack user by email");
                None
            }
        }
    }
}

/// Text for Slack's mrkdwn: `&`, `<` and `>` are entities, so nothing in a
/// statement can become a link or a mention (`<!channel>`).
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A code block that nothing in `text` can close.
fn code(text: &str) -> String {
    format!("```{}```", escape(&text.replace('`', "\u{2cb}")))
}

fn content(card: &Card) -> SlackMessageContent {
    let mut blocks: Vec<SlackBlock> = Vec::new();
    let who = if card.groups.is_empty() {
        format!("*{}*", escape(&card.requester))
    } else {
        format!("*{}* ({})", escape(&card.requester), escape(&card.groups.join(", ")))
    };
    let headline = match &card.outcome {
        Some(Outcome::Gone) => format!("*{}* · request {}", card.title, card.id),
        _ => format!(
            "*{}* · request {}\n{who} on *{}*",
            card.title,
            card.id,
            escape(&card.target)
        ),
    };
    blocks.push(SlackSectionBlock::new().with_text(md!(headline)).into());
    if let Some(access) = &card.access {
        blocks.push(
            SlackSectionBlock::new()
                .with_text(md!(format!("Asks for {}", escape(access))))
                .into(),
        );
    }
    if !card.statement.is_empty() {
        let mut text = code(&card.statement);
        if card.truncated > 0 {
            text.push_str(&format!(
                "\n…{} more characters: <{}|full text> (or the console's Approvals view)",
                card.truncated,
                escape(&card.full_text_url)
            ));
        }
        blocks.push(SlackSectionBlock::new().with_text(md!(text)).into());
    }
    let mut context: Vec<String> = card.classification.iter().map(|c| escape(c)).collect();
    if !card.rule.is_empty() {
        let reason = card
            .reason
            .as_deref()
            .map(|r| format!(": {}", escape(r)))
            .unwrap_or_default();
        context.push(format!("Rule *{}*{reason}", escape(&card.rule)));
    }
    if card.pending() {
        // Slack shows the time in each reader's time zone.
        let mut line = format!(
            "{} · expires <!date^{}^{{time_secs}}|{} UTC> (in {})",
            escape(&card.approvals_line()),
            card.expires.timestamp(),
            card.expires.format("%H:%M:%S"),
            escape(&card.left)
        );
        if !card.approve_via.is_empty() {
            line.push_str(&format!(" · approve only through {}", card.approve_via.join(" or ")));
        }
        context.push(line);
    }
    if !context.is_empty() {
        blocks.push(
            SlackContextBlock::new(
                context
                    .into_iter()
                    .map(|c| SlackContextBlockElement::MarkDown(SlackBlockMarkDownText::new(c)))
                    .collect(),
            )
            .into(),
        );
    }
    match &card.outcome {
        None => {
            let id = card.id.to_string();
            blocks.push(
                SlackActionsBlock::new(vec![
                    SlackActionBlockElement::Button(
                        SlackBlockButtonElement::new("Approve".into())
                            .with_action_id(SlackActionId(APPROVE.into()))
                            .with_value(id.clone())
                            .with_style(SlackBlockButtonStyle::Primary),
                    ),
                    SlackActionBlockElement::Button(
                        SlackBlockButtonElement::new("Deny".into())
                            .with_action_id(SlackActionId(DENY.into()))
                            .with_value(id)
                            .with_style(SlackBlockButtonStyle::Danger),
                    ),
                ])
                .into(),
            );
        }
        Some(outcome) => {
            let mark = match outcome {
                Outcome::Approved { .. } => ":white_check_mark:",
                Outcome::Denied { .. } => ":no_entry:",
                _ => ":hourglass:",
            };
            blocks.push(
                SlackSectionBlock::new()
                    .with_text(md!(format!("{mark} *{}*", escape(&outcome.line()))))
                    .into(),
            );
        }
    }
    let fallback = match &card.outcome {
        None => format!(
            "Request {}: {} asks to run a statement on {}",
            card.id, card.requester, card.target
        ),
        Some(outcome) => format!("Request {}: {}", card.id, outcome.line()),
    };
    SlackMessageContent::new()
        .with_text(escape(&fallback))
        .with_blocks(blocks)
}

/// `POST /slack/interactions`: the Slack app's Interactivity Request URL.
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/slack/interactions", post(interactions))
        .with_state(engine)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn interactions(State(engine): State<Arc<Engine>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(slack) = engine.slack() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(secret) = slack.config.signing_secret.as_deref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if let Err(err) = verify::verify_slack(
        secret,
        header(&headers, "x-slack-request-timestamp"),
        header(&headers, "x-slack-signature"),
        &body,
        Utc::now().timestamp(),
    ) {
        tracing::warn!(error = %err, "refused a Slack request: its signature does not hold");
        return (StatusCode::UNAUTHORIZED, format!("signature refused: {err}")).into_response();
    }
    let Some(payload) = url::form_urlencoded::parse(&body)
        .find(|(key, _)| key == "payload")
        .and_then(|(_, value)| serde_json::from_str::<Value>(&value).ok())
    else {
        return (StatusCode::BAD_REQUEST, "expected a form with a JSON payload").into_response();
    };
    match handle(&engine, slack, &payload).await {
        Some(answer) => axum::Json(answer).into_response(),
        None => StatusCode::OK.into_response(),
    }
}

/// Acts on one interaction payload (from the HTTP endpoint or Socket
/// Mode); `Some` is a response body for Slack (a modal's errors).
async fn handle(engine: &Engine, slack: &Slack, payload: &Value) -> Option<Value> {
    let user = payload["user"]["id"].as_str().unwrap_or_default().to_string();
    match payload["type"].as_str() {
        Some("block_actions") => {
            let action = &payload["actions"][0];
            let channel = payload["channel"]["id"].as_str().unwrap_or_default().to_string();
            let (Some(action_id), Some(id)) = (
                action["action_id"].as_str(),
                action["value"].as_str().and_then(|v| v.parse::<u64>().ok()),
            ) else {
                return None;
            };
            let Some(person) = slack.identity_of(&user).await else {
                slack.tell(&channel, &user, &unmapped(&user)).await;
                return None;
            };
            match action_id {
                APPROVE => {
                    if let Err(why) = engine.decide(Platform::Slack, &person, &user, id, true, None).await {
                        slack.tell(&channel, &user, &why).await;
                    }
                }
                DENY => {
                    let trigger = payload["trigger_id"].as_str().unwrap_or_default();
                    if let Err(err) = slack.open_deny_modal(trigger, id).await {
                        tracing::warn!(error = %err, "could not open the deny modal");
                        slack
                            .tell(
                                &channel,
                                &user,
                                "Could not open the reason form; try again, or deny in the console",
                            )
                            .await;
                    }
                }
                _ => {}
            }
            None
        }
        Some("view_submission") if payload["view"]["callback_id"] == DENY_MODAL => {
            let view = &payload["view"];
            let id = view["private_metadata"].as_str().and_then(|v| v.parse::<u64>().ok())?;
            let reason = view["state"]["values"]["reason"]["reason"]["value"]
                .as_str()
                .map(str::trim)
                .filter(|r| !r.is_empty());
            let outcome = match slack.identity_of(&user).await {
                None => Err(unmapped(&user)),
                Some(person) => engine.decide(Platform::Slack, &person, &user, id, false, reason).await,
            };
            outcome
                .err()
                .map(|why| json!({"response_action": "errors", "errors": {"reason": why}}))
        }
        _ => None,
    }
}

/// Socket Mode: interactions arrive over a websocket the bot opens
/// (`apps.connections.open` with the app-level token), so the bot needs no
/// public URL. Each envelope is acknowledged once handled, with the
/// response body when there is one; Slack's `disconnect` (it rotates
/// connections) and any loss reconnect.
pub async fn socket_mode(engine: Arc<Engine>, shutdown: tokio_util::sync::CancellationToken) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let Some(slack) = engine.slack() else { return };
    let Some(app_token) = slack.config.app_token.as_deref() else {
        return;
    };
    let app_token = SlackApiToken::new(SlackApiTokenValue(app_token.to_string()));
    let mut failures = 0u32;
    loop {
        let opened = slack
            .client
            .open_session(&app_token)
            .apps_connections_open(&SlackApiAppsConnectionOpenRequest::new())
            .await;
        let connected = match opened {
            Ok(open) => tokio_tungstenite::connect_async(open.url.0.as_str())
                .await
                .map_err(anyhow::Error::from),
            Err(err) => Err(anyhow::Error::from(err)),
        };
        match connected {
            Ok((mut socket, _)) => {
                failures = 0;
                tracing::info!("connected to Slack in Socket Mode");
                loop {
                    let frame = tokio::select! {
                        _ = shutdown.cancelled() => {
                            let _ = socket.close(None).await;
                            return;
                        }
                        frame = socket.next() => frame,
                    };
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) | None => break,
                        Some(Ok(_)) => continue,
                        Some(Err(err)) => {
                            tracing::warn!(error = %err, "the Socket Mode connection broke");
                            break;
                        }
                    };
                    let Ok(envelope) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    if envelope["type"] == "disconnect" {
                        tracing::info!(reason = %envelope["reason"], "Slack asked to reconnect");
                        break;
                    }
                    let Some(envelope_id) = envelope["envelope_id"].as_str() else {
                        continue;
                    };
                    let answer = if envelope["type"] == "interactive" {
                        handle(&engine, slack, &envelope["payload"]).await
                    } else {
                        None
                    };
                    let mut ack = json!({"envelope_id": envelope_id});
                    if let Some(answer) = answer {
                        ack["payload"] = answer;
                    }
                    if let Err(err) = socket.send(Message::Text(ack.to_string().into())).await {
                        tracing::warn!(error = %err, "could not acknowledge a Socket Mode envelope");
                        break;
                    }
                }
            }
            Err(err) => {
                failures += 1;
                tracing::warn!(error = %err, "cannot open a Socket Mode connection");
            }
        }
        let wait = std::time::Duration::from_secs(u64::from(failures.min(30)));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn unmapped(user: &str) -> String {
    format!(
        "Sluice does not know who Slack user {user} is, so nothing was decided. Ask an admin to map you in the bot's [slack.users]."
    )
}
