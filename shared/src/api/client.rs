//! A typed client for the control API, for the console, the bot and tests.

use serde::de::DeserializeOwned;

use super::{ErrorBody, Health, Killed};
use crate::audit::{SessionSummary, StoredEvent};
use crate::live::LiveSummary;

/// A bearer token that a renewal task can replace while clients hold it:
/// every clone sees the newest. Its `Debug` hides it.
#[derive(Clone, Default)]
pub struct SharedToken(std::sync::Arc<std::sync::RwLock<String>>);

impl SharedToken {
    pub fn new(token: &str) -> SharedToken {
        SharedToken(std::sync::Arc::new(std::sync::RwLock::new(token.to_string())))
    }

    pub fn get(&self) -> String {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, token: &str) {
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        if *current != token {
            *current = token.to_string();
        }
    }
}

impl std::fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedToken([token])")
    }
}

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway answered with an error; `message` is its explanation.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("cannot reach the control API at {base}: {source}")]
    Transport {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the control API sent something unreadable: {0}")]
    Decode(String),
}

impl ClientError {
    /// The HTTP status, for an error the gateway answered with.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one gateway's control API, acting with one token.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: Option<SharedToken>,
    http: reqwest::Client,
    /// Where decisions are said to come from ("api" when unset).
    via: Option<String>,
}

impl ApiClient {
    /// `base`: `http://127.0.0.1:7480`. `token`: the caller's Sluice token.
    pub fn new(base: &str, token: Option<&str>) -> ApiClient {
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.map(SharedToken::new),
            http: reqwest::Client::new(),
            via: None,
        }
    }

    /// A client whose token is renewed behind it (the console's, from the
    /// login cache).
    pub fn with_shared_token(base: &str, token: SharedToken) -> ApiClient {
        ApiClient {
            token: Some(token),
            ..ApiClient::new(base, None)
        }
    }

    /// Decisions made through this client are recorded as made in `via`
    /// ("console").
    pub fn via(mut self, via: &str) -> ApiClient {
        self.via = Some(via.to_string());
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn transport(&self) -> impl Fn(reqwest::Error) -> ClientError + '_ {
        |source| ClientError::Transport {
            base: self.base.clone(),
            source,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token.get()),
            None => request,
        };
        let response = request.send().await.map_err(self.transport())?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let text = response.text().await.map_err(self.transport())?;
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|body| body.error)
            .unwrap_or(text);
        Err(ClientError::Api { status, message })
    }

    async fn json<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let response = self.send(request).await?;
        let bytes = response.bytes().await.map_err(self.transport())?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `/health`. A degraded gateway answers 503 with the same body, which
    /// this returns rather than an error.
    pub async fn health(&self) -> Result<Health, ClientError> {
        let response = self
            .http
            .get(self.url("/health"))
            .send()
            .await
            .map_err(self.transport())?;
        let bytes = response.bytes().await.map_err(self.transport())?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn metrics(&self) -> Result<String, ClientError> {
        let response = self.send(self.http.get(self.url("/metrics"))).await?;
        response.text().await.map_err(self.transport())
    }

    pub async fn sessions(&self) -> Result<Vec<LiveSummary>, ClientError> {
        self.json(self.http.get(self.url("/v1/sessions"))).await
    }

    pub async fn past_sessions(&self, limit: u64) -> Result<Vec<SessionSummary>, ClientError> {
        self.json(self.http.get(self.url(&format!("/v1/sessions/past?limit={limit}"))))
            .await
    }

    pub async fn timeline(&self, session: &str) -> Result<Vec<StoredEvent>, ClientError> {
        self.json(self.http.get(self.url(&format!("/v1/sessions/{session}/timeline"))))
            .await
    }

    pub async fn kill(&self, session: &str) -> Result<Killed, ClientError> {
        self.json(self.http.post(self.url(&format!("/v1/sessions/{session}/kill"))))
            .await
    }

    pub async fn lineage(
        &self,
        query: &crate::audit::LineageQuery,
    ) -> Result<Vec<crate::audit::LineageRow>, ClientError> {
        let mut params = Vec::new();
        for (key, value) in [
            ("relation", &query.relation),
            ("tag", &query.tag),
            ("identity", &query.identity),
        ] {
            if let Some(value) = value {
                params.push((key, value.as_str()));
            }
        }
        self.json(self.http.get(self.url("/v1/lineage")).query(&params)).await
    }

    pub async fn approvals(&self) -> Result<Vec<crate::approvals::RequestView>, ClientError> {
        self.json(self.http.get(self.url("/v1/approvals"))).await
    }

    pub async fn approval(&self, id: u64) -> Result<crate::approvals::RequestView, ClientError> {
        self.json(self.http.get(self.url(&format!("/v1/approvals/{id}")))).await
    }

    /// Approves (or, with `approve = false`, denies) request `id`.
    pub async fn decide(
        &self,
        id: u64,
        approve: bool,
        reason: Option<&str>,
    ) -> Result<crate::approvals::RequestView, ClientError> {
        let body = super::DecisionBody {
            reason: reason.map(str::to_string),
            via: self.via.clone(),
            on_behalf_of: None,
            chat_user: None,
        };
        self.post_decision(id, approve, &body).await
    }

    /// A chat bot's decision (its token listed in `[[api.delegates]]`): on
    /// behalf of `person`, for chat user `chat_user` who clicked, through
    /// this client's `via` ("slack", "discord").
    pub async fn decide_on_behalf(
        &self,
        id: u64,
        approve: bool,
        reason: Option<&str>,
        person: &str,
        chat_user: &str,
    ) -> Result<crate::approvals::RequestView, ClientError> {
        let body = super::DecisionBody {
            reason: reason.map(str::to_string),
            via: self.via.clone(),
            on_behalf_of: Some(person.to_string()),
            chat_user: Some(chat_user.to_string()),
        };
        self.post_decision(id, approve, &body).await
    }

    async fn post_decision(
        &self,
        id: u64,
        approve: bool,
        body: &super::DecisionBody,
    ) -> Result<crate::approvals::RequestView, ClientError> {
        let verb = if approve { "approve" } else { "deny" };
        self.json(
            self.http
                .post(self.url(&format!("/v1/approvals/{id}/{verb}")))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(body).unwrap_or_default()),
        )
        .await
    }

    /// Asks for a time-bound grant (`sluice request`): the new request, or
    /// the caller's pending one for the same grant and target.
    pub async fn request_access(
        &self,
        body: &super::AccessRequestBody,
    ) -> Result<crate::approvals::RequestView, ClientError> {
        self.json(
            self.http
                .post(self.url("/v1/access-requests"))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(body).unwrap_or_default()),
        )
        .await
    }

    /// Grants that hold now: all of them for a viewer, the caller's own
    /// otherwise.
    pub async fn grants(&self) -> Result<Vec<crate::approvals::GrantView>, ClientError> {
        self.json(self.http.get(self.url("/v1/grants"))).await
    }

    /// Ends the grant of access request `request` before its time.
    pub async fn revoke_grant(
        &self,
        request: u64,
        reason: Option<&str>,
    ) -> Result<crate::approvals::GrantView, ClientError> {
        let body = super::DecisionBody {
            reason: reason.map(str::to_string),
            ..super::DecisionBody::default()
        };
        self.json(
            self.http
                .post(self.url(&format!("/v1/grants/{request}/revoke")))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(&body).unwrap_or_default()),
        )
        .await
    }

    /// The live event stream, from after `since` (0: from the start).
    pub async fn events(&self, since: u64) -> Result<EventStream, ClientError> {
        self.event_stream(&format!("since={since}")).await
    }

    /// The live event stream, starting with the newest `tail` events of the
    /// trail.
    pub async fn events_tail(&self, tail: u64) -> Result<EventStream, ClientError> {
        self.event_stream(&format!("tail={tail}")).await
    }

    async fn event_stream(&self, query: &str) -> Result<EventStream, ClientError> {
        let response = self
            .send(self.http.get(self.url(&format!("/v1/events?{query}"))))
            .await?;
        Ok(EventStream {
            response,
            buffer: Vec::new(),
            base: self.base.clone(),
            scanned: 0,
            expanded: std::collections::VecDeque::new(),
        })
    }
}

/// Server-sent events, read one at a time.
#[derive(Debug)]
pub struct EventStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    base: String,
    /// How much of `buffer` holds no complete block (see `find_blank_line`).
    scanned: usize,
    /// The rest of the events of the row just read (the stream sends the
    /// trail's rows; one may keep several events), next first.
    expanded: std::collections::VecDeque<StoredEvent>,
}

impl EventStream {
    /// The next event; `None` when the gateway closed the stream. A row
    /// of the trail that keeps several events (a statement with its
    /// completion, statements of one session) comes as each of them, one
    /// after the other, with the row's id ([`StoredEvent::expand`]).
    pub async fn next(&mut self) -> Option<Result<StoredEvent, ClientError>> {
        loop {
            if let Some(event) = self.expanded.pop_front() {
                return Some(Ok(event));
            }
            match self.next_row().await? {
                Ok(row) => {
                    let mut events = Vec::new();
                    row.expand(&mut events);
                    self.expanded.extend(events);
                }
                Err(err) => return Some(Err(err)),
            }
        }
    }

    /// The next row of the trail, as sent.
    async fn next_row(&mut self) -> Option<Result<StoredEvent, ClientError>> {
        loop {
            if let Some(end) = find_blank_line(&self.buffer, self.scanned) {
                self.scanned = 0;
                let block: Vec<u8> = self.buffer.drain(..end.1).collect();
                let text = String::from_utf8_lossy(&block[..end.0]);
                let mut kind = "message";
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        kind = if value.trim() == "error" { "error" } else { "event" };
                    } else if let Some(value) = line.strip_prefix("data:") {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(value.strip_prefix(' ').unwrap_or(value));
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                if kind == "error" {
                    return Some(Err(ClientError::Api {
                        status: 200,
                        message: data,
                    }));
                }
                return Some(serde_json::from_str(&data).map_err(|e| ClientError::Decode(e.to_string())));
            }
            self.scanned = self.buffer.len();
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) => return None,
                Err(source) => {
                    return Some(Err(ClientError::Transport {
                        base: self.base.clone(),
                        source,
                    }));
                }
            }
        }
    }
}

/// Where the first event block ends: (end of its text, end of the blank
/// line). The first `scanned` bytes were looked at before (a row can be
/// large and come in many chunks): only the last three of them again.
fn find_blank_line(buffer: &[u8], scanned: usize) -> Option<(usize, usize)> {
    let mut i = scanned.saturating_sub(3);
    while i + 1 < buffer.len() {
        if buffer[i] == b'\n' && buffer[i + 1] == b'\n' {
            return Some((i, i + 2));
        }
        if i + 3 < buffer.len() && &buffer[i..i + 4] == b"\r\n\r\n" {
            return Some((i, i + 4));
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::find_blank_line;

    /// A block's end is found whichever chunk it straddles, looking again
    /// only at the last bytes already scanned.
    #[test]
    fn a_block_end_split_across_chunks_is_found() {
        for end in ["\n\n", "\r\n\r\n"] {
            let block = format!("data: {{}}{end}");
            for split in 0..block.len() {
                let first = &block.as_bytes()[..split];
                let scanned = if find_blank_line(first, 0).is_none() { split } else { 0 };
                assert_eq!(
                    find_blank_line(block.as_bytes(), scanned),
                    Some((8, block.len())),
                    "{end:?} split at {split}"
                );
            }
        }
    }
}
