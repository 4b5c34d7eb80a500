//! The bot's own sign-in to the control API: a static service token, or
//! OAuth client credentials at the gateway's OIDC issuer, renewed before
//! each token runs out.

use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use sluice_core::api::client::SharedToken;
use sluice_core::identity::login;

use crate::config::{Credential, Secret};

/// Asked for again this long before the token expires.
const RENEW_AHEAD: i64 = 300;
/// The shortest wait between two requests for a token (also after a
/// failure), so a provider that hands out short tokens is not hammered.
const MIN_WAIT: Duration = Duration::from_secs(10);

/// The bot's token now, and for client credentials the task that keeps it
/// fresh.
pub(crate) async fn sign_in(credential: &Credential) -> anyhow::Result<(SharedToken, Option<BoxFuture<'static, ()>>)> {
    match credential {
        Credential::Token(token) => Ok((SharedToken::new(token.expose()), None)),
        Credential::ClientCredentials {
            issuer,
            client_id,
            secret,
            resource,
            scopes,
        } => {
            let request = Request {
                issuer: issuer.clone(),
                client_id: client_id.clone(),
                secret: secret.clone(),
                resource: resource.clone(),
                scopes: scopes.clone(),
            };
            let first = request
                .token()
                .await
                .map_err(|err| anyhow::anyhow!("signing in to {issuer} as {client_id} (client credentials): {err}"))?;
            let token = SharedToken::new(&first);
            let renewal = renew(request, token.clone(), first).boxed();
            Ok((token, Some(renewal)))
        }
    }
}

struct Request {
    issuer: String,
    client_id: String,
    secret: Secret,
    resource: Option<String>,
    scopes: Vec<String>,
}

impl Request {
    async fn token(&self) -> Result<String, login::LoginError> {
        login::client_credentials(
            &self.issuer,
            &self.client_id,
            self.secret.expose(),
            self.resource.as_deref(),
            &self.scopes,
        )
        .await
    }
}

/// Replaces `shared` with a new token before `current` runs out, forever.
async fn renew(request: Request, shared: SharedToken, mut current: String) {
    loop {
        let claims = login::token_claims(&current);
        let left = claims.exp - chrono::Utc::now().timestamp();
        let wait =
            Duration::from_secs(u64::try_from(left - claims.renew_ahead(RENEW_AHEAD)).unwrap_or(0)).max(MIN_WAIT);
        tokio::time::sleep(wait).await;
        match request.token().await {
            Ok(token) => {
                shared.set(&token);
                current = token;
            }
            // The old token may still be good; the next try comes soon.
            Err(err) => tracing::warn!(error = %err, client = %request.client_id, "cannot renew the bot's token"),
        }
    }
}
