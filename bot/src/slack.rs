//! Slack: messages through the Web API (slack-morphism); button clicks and
//! the deny-reason modal through the interactions endpoint, whose requests
//! must carry Slack's signature, or through Socket Mode.

use std::sync::Arc;
use std::time::Duration;

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
use crate::render::{Card, Outcome, fit};
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
    /// The bot's own workspace (`auth.test`), for `map_by_email`.
    team: tokio::sync::OnceCell<String>,
}

/// The buttons' action ids; their value is the request id.
const APPROVE: &str = "sluice_approve";
const DENY: &str = "sluice_deny";
/// The deny modal's callback id; its private metadata is "ID:MESSAGE_TS".
const DENY_MODAL: &str = "sluice_deny_reason";

/// How long a lookup or an ephemeral reply may take inside an interaction
/// (Slack gives it three seconds).
const QUICK: Duration = Duration::from_millis(1500);

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
        let token = SlackApiToken::new(SlackApiTokenValue(config.bot_token.expose().to_string()));
        Ok(Slack {
            client: SlackClient::new(connector),
            token,
            config,
            team: tokio::sync::OnceCell::new(),
        })
    }

    /// Where the interactions endpoint listens; `None` in Socket Mode.
    pub fn listen(&self) -> Option<std::net::SocketAddr> {
        self.config.app_token.is_none().then_some(self.config.listen)
    }

    /// A message only `user` sees, in `channel`.
    async fn tell(&self, channel: &str, user: &str, text: &str) {
        let session = self.client.open_session(&self.token);
        let request = SlackApiChatPostEphemeralRequest::new(
            SlackChannelId(channel.to_string()),
            SlackUserId(user.to_string()),
            SlackMessageContent::new().with_text(fit(text, 2000, mrkdwn)),
        );
        match tokio::time::timeout(QUICK, session.chat_post_ephemeral(&request)).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(user, error = %err, "could not tell a Slack user why their click did nothing")
            }
            Err(_) => tracing::warn!(user, "Slack did not take an ephemeral reply in time"),
        }
    }

    async fn open_deny_modal(&self, trigger_id: &str, id: u64, message: &str) -> anyhow::Result<()> {
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
                .with_private_metadata(format!("{id}:{message}")),
        );
        let request = SlackApiViewsOpenRequest::new(SlackTriggerId(trigger_id.to_string()), view);
        tokio::time::timeout(QUICK, session.views_open(&request))
            .await
            .map_err(|_| anyhow::anyhow!("views.open took too long"))??;
        Ok(())
    }

    /// The Sluice identity of a Slack user: from `[slack.users]`, else (with
    /// `map_by_email`) the email of a full member of the bot's own
    /// workspace (not a guest, a bot, a deleted account or a user from
    /// another organisation through Slack Connect).
    async fn identity_of(&self, user: &str) -> Option<String> {
        if let Some(identity) = self.config.users.get(user) {
            return Some(identity.clone());
        }
        if !self.config.map_by_email {
            return None;
        }
        let session = self.client.open_session(&self.token);
        let team = self
            .team
            .get_or_try_init(|| async {
                match tokio::time::timeout(QUICK, session.auth_test()).await {
                    Ok(Ok(me)) => Ok(me.team_id.0),
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(_) => Err("auth.test took too long".to_string()),
                }
            })
            .await;
        let team = match team {
            Ok(team) => team.clone(),
            Err(err) => {
                tracing::warn!(error = %err, "auth.test failed: cannot map Slack users by email");
                return None;
            }
        };
        let request = SlackApiUsersInfoRequest::new(SlackUserId(user.to_string()));
        let info = match tokio::time::timeout(QUICK, session.users_info(&request)).await {
            Ok(Ok(info)) => info.user,
            Ok(Err(err)) => {
                tracing::warn!(user, error = %err, "users.info failed: cannot map the Slack user by email");
                return None;
            }
            Err(_) => {
                tracing::warn!(user, "users.info took too long");
                return None;
            }
        };
        let flags = &info.flags;
        let member = info.team_id.as_ref().is_some_and(|t| t.0 == team)
            && info.deleted != Some(true)
            && flags.is_bot != Some(true)
            && flags.is_app_user != Some(true)
            && flags.is_restricted != Some(true)
            && flags.is_ultra_restricted != Some(true)
            && flags.is_stranger != Some(true)
            && flags.is_invited_user != Some(true);
        if !member {
            tracing::info!(user, "not mapped by email: not a full member of the bot's workspace");
            return None;
        }
        info.profile.and_then(|p| p.email).map(|e| e.0)
    }
}

impl crate::engine::Messenger for Slack {
    type At = SlackRef;
    const NAME: &'static str = "Slack";

    async fn post(&self, card: &Card) -> anyhow::Result<SlackRef> {
        let session = self.client.open_session(&self.token);
        let request = SlackApiChatPostMessageRequest::new(SlackChannelId(self.config.channel.clone()), content(card));
        let posted = session.chat_post_message(&request).await?;
        Ok(SlackRef {
            channel: posted.channel.0,
            ts: posted.ts.0,
        })
    }

    async fn update(&self, at: &SlackRef, card: &Card) -> anyhow::Result<()> {
        let session = self.client.open_session(&self.token);
        let request = SlackApiChatUpdateRequest::new(
            SlackChannelId(at.channel.clone()),
            content(card),
            SlackTs(at.ts.clone()),
        );
        session.chat_update(&request).await?;
        Ok(())
    }
}

/// One character for Slack's mrkdwn: `&`, `<` and `>` are entities, so
/// nothing from a statement or a reason becomes a link or a mention
/// (`<!channel>`).
fn mrkdwn(c: char, out: &mut String) {
    match c {
        '&' => out.push_str("&amp;"),
        '<' => out.push_str("&lt;"),
        '>' => out.push_str("&gt;"),
        c => out.push(c),
    }
}

/// Inside a code block: also no backtick, so nothing closes the block.
fn in_code(c: char, out: &mut String) {
    match c {
        '`' => out.push('\u{2cb}'),
        c => mrkdwn(c, out),
    }
}

/// Text for Slack's mrkdwn, whole.
pub fn escape(text: &str) -> String {
    fit(text, usize::MAX, mrkdwn)
}

/// A mrkdwn text object shown verbatim: URLs and channel names in it stay
/// text.
fn md(text: String) -> SlackBlockText {
    SlackBlockText::MarkDown(SlackBlockMarkDownText::new(text).with_verbatim(true))
}

/// Slack's limits: a section's text and a context element's text take at
/// most 3000 characters; a context holds at most 10 elements.
const SECTION: usize = 3000;

fn content(card: &Card) -> SlackMessageContent {
    let mut blocks: Vec<SlackBlock> = Vec::new();
    let who = if card.groups.is_empty() {
        format!("*{}*", fit(&card.requester, 200, mrkdwn))
    } else {
        format!(
            "*{}* ({})",
            fit(&card.requester, 200, mrkdwn),
            fit(&card.groups.join(", "), 400, mrkdwn)
        )
    };
    let headline = match &card.outcome {
        Some(Outcome::Gone) => format!("*{}* · request {}", card.title, card.id),
        _ => format!(
            "*{}* · request {}\n{who} on *{}*",
            card.title,
            card.id,
            fit(&card.target, 200, mrkdwn)
        ),
    };
    blocks.push(SlackSectionBlock::new().with_text(md(headline)).into());
    if let Some(access) = &card.access {
        let text = format!("Asks for {}", fit(access, 400, mrkdwn));
        blocks.push(SlackSectionBlock::new().with_text(md(text)).into());
    }
    if !card.statement.is_empty() {
        let mut text = format!("```{}```", fit(&card.statement, SECTION - 400, in_code));
        if card.truncated > 0 {
            text.push_str(&format!(
                "\n…{} more characters: <{}|full text> (or the console's Approvals view)",
                card.truncated,
                fit(&card.full_text_url, 250, mrkdwn)
            ));
        }
        blocks.push(SlackSectionBlock::new().with_text(md(text)).into());
    }
    let mut context: Vec<String> = Vec::new();
    if !card.classification.is_empty() {
        context.push(fit(&card.classification.join("\n"), 1500, mrkdwn));
    }
    if !card.rule.is_empty() {
        let reason = card
            .reason
            .as_deref()
            .map(|r| format!(": {}", fit(r, 1200, mrkdwn)))
            .unwrap_or_default();
        context.push(format!("Rule *{}*{reason}", fit(&card.rule, 200, mrkdwn)));
    }
    if card.pending() {
        // Slack shows the time in each reader's time zone.
        let mut line = format!(
            "{} · expires <!date^{}^{{time_secs}}|{} UTC> (in {})",
            fit(&card.approvals_line(), 1500, mrkdwn),
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
        let elements = context
            .into_iter()
            .map(|c| SlackContextBlockElement::MarkDown(SlackBlockMarkDownText::new(c).with_verbatim(true)))
            .collect();
        blocks.push(SlackContextBlock::new(elements).into());
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
            let text = format!("{mark} *{}*", fit(&outcome.line(), SECTION - 100, mrkdwn));
            blocks.push(SlackSectionBlock::new().with_text(md(text)).into());
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
        .with_text(fit(&fallback, 1000, mrkdwn))
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
    let Some(secret) = slack.config.signing_secret.as_ref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if let Err(err) = verify::verify_slack(
        secret.expose(),
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
    match dispatch(engine, payload).await {
        Some(answer) => axum::Json(answer).into_response(),
        None => StatusCode::OK.into_response(),
    }
}

/// Acts on one interaction payload (from the HTTP endpoint or Socket Mode).
/// A button click is acknowledged at once and handled meanwhile (Slack
/// wants an answer within three seconds, and the decision shows on the
/// message); a modal submission is handled first, since its answer may be
/// the form's error. `Some` is a response body for Slack.
async fn dispatch(engine: Arc<Engine>, payload: Value) -> Option<Value> {
    if payload["type"] == "block_actions" {
        tokio::spawn(async move {
            if let Some(slack) = engine.slack() {
                click(&engine, slack, &payload).await;
            }
        });
        return None;
    }
    let slack = engine.slack()?;
    if payload["type"] == "view_submission" && payload["view"]["callback_id"] == DENY_MODAL {
        return submit(&engine, slack, &payload).await;
    }
    None
}

/// A button: Approve decides; Deny opens the reason form.
async fn click(engine: &Engine, slack: &Slack, payload: &Value) {
    let user = payload["user"]["id"].as_str().unwrap_or_default();
    let channel = payload["channel"]["id"].as_str().unwrap_or_default();
    let message = payload["message"]["ts"]
        .as_str()
        .or_else(|| payload["container"]["message_ts"].as_str())
        .unwrap_or_default();
    let action = &payload["actions"][0];
    let (Some(action_id), Some(id)) = (
        action["action_id"].as_str(),
        action["value"].as_str().and_then(|v| v.parse::<u64>().ok()),
    ) else {
        return;
    };
    if !engine.is_message_of(Platform::Slack, id, message).await {
        slack.tell(channel, user, &not_current(id)).await;
        return;
    }
    let Some(person) = slack.identity_of(user).await else {
        slack.tell(channel, user, &unmapped(user)).await;
        return;
    };
    match action_id {
        APPROVE => {
            if let Err(why) = engine.decide(Platform::Slack, &person, user, id, true, None).await {
                slack.tell(channel, user, &why).await;
            }
        }
        DENY => {
            let trigger = payload["trigger_id"].as_str().unwrap_or_default();
            if let Err(err) = slack.open_deny_modal(trigger, id, message).await {
                tracing::warn!(error = %err, "could not open the deny modal");
                slack
                    .tell(
                        channel,
                        user,
                        "Could not open the reason form; try again, or deny in the console",
                    )
                    .await;
            }
        }
        _ => {}
    }
}

/// The deny form, sent: the reason goes with the denial; a refusal is
/// shown in the form.
async fn submit(engine: &Engine, slack: &Slack, payload: &Value) -> Option<Value> {
    let user = payload["user"]["id"].as_str().unwrap_or_default();
    let view = &payload["view"];
    let (id, message) = view["private_metadata"].as_str()?.split_once(':')?;
    let id = id.parse::<u64>().ok()?;
    let reason = view["state"]["values"]["reason"]["reason"]["value"]
        .as_str()
        .map(str::trim)
        .filter(|r| !r.is_empty());
    let outcome = if !engine.is_message_of(Platform::Slack, id, message).await {
        Err(not_current(id))
    } else {
        match slack.identity_of(user).await {
            None => Err(unmapped(user)),
            Some(person) => engine.decide(Platform::Slack, &person, user, id, false, reason).await,
        }
    };
    outcome
        .err()
        .map(|why| json!({"response_action": "errors", "errors": {"reason": fit(&why, 1000, |c, out| out.push(c))}}))
}

/// Socket Mode: interactions arrive over a websocket the bot opens
/// (`apps.connections.open` with the app-level token), so the bot needs no
/// public URL. Each envelope is acknowledged (with the response body when
/// there is one); Slack's `disconnect` (it rotates connections) and any
/// loss reconnect.
pub async fn socket_mode(engine: Arc<Engine>, shutdown: tokio_util::sync::CancellationToken) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let Some(slack) = engine.slack() else { return };
    let Some(app_token) = slack.config.app_token.as_ref() else {
        return;
    };
    let app_token = SlackApiToken::new(SlackApiTokenValue(app_token.expose().to_string()));
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
                        dispatch(engine.clone(), envelope["payload"].clone()).await
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
        let wait = Duration::from_secs(u64::from(failures.min(30)));
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

fn not_current(id: u64) -> String {
    format!(
        "This is not the message the bot keeps for request {id} (an older request, or from before the bot lost its state), so nothing was decided. Use the newest message for it, or the console."
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::view;

    fn text_lengths(content: &SlackMessageContent) -> Vec<usize> {
        let blocks = serde_json::to_value(content.blocks.as_ref().unwrap()).unwrap();
        let mut lengths = Vec::new();
        for block in blocks.as_array().unwrap() {
            if let Some(text) = block["text"]["text"].as_str() {
                lengths.push(text.chars().count());
            }
            if let Some(elements) = block["elements"].as_array()
                && block["type"] == "context"
            {
                assert!(elements.len() <= 10);
                for element in elements {
                    lengths.push(element["text"].as_str().unwrap().chars().count());
                }
            }
        }
        lengths
    }

    #[test]
    fn nothing_from_a_statement_becomes_markup_or_overruns() {
        let mut hostile = view();
        hostile.statement = format!("SELECT '<!channel> <https://evil|x> ``` @here' {}", "<".repeat(2000));
        hostile.reason = Some("&".repeat(5000));
        hostile.rule = "r".repeat(5000);
        hostile.groups = vec!["g".repeat(3000)];
        hostile.statements = (0..20).map(|_| hostile.statements[0].clone()).collect();
        let card = Card::new(&hostile, "https://sluice.example/v1/approvals/{id}", hostile.created);
        let content = content(&card);
        let json = serde_json::to_string(&content).unwrap();
        assert!(!json.contains("<!channel>"), "{json}");
        assert!(!json.contains("<https://evil"), "{json}");
        assert!(json.contains("&lt;!channel&gt;"));
        // One code block, opened and closed by the bot only.
        let section = json.split("```").count();
        assert_eq!(section, 3, "{json}");
        for length in text_lengths(&content) {
            assert!(length <= SECTION, "{length}");
        }
        let mut denied = hostile.clone();
        denied.state = sluice_core::approvals::RequestState::Denied;
        denied.denied_by = Some("carol".into());
        denied.denial_reason = Some("<".repeat(1000));
        let content = super::content(&Card::new(&denied, "u", denied.created));
        for length in text_lengths(&content) {
            assert!(length <= SECTION, "{length}");
        }
    }
}
