//! `sluice bot --config bot.toml`: the gateway to follow and the chat
//! platforms to post in. Secrets come from the environment or files, never
//! inline; errors name the file, the key and what to write.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A secret read from the environment or a file; its `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[secret]")
    }
}

/// The bot's configuration, validated.
#[derive(Debug, Clone)]
pub struct BotConfig {
    /// The control API, `http://127.0.0.1:7480`.
    pub api: String,
    /// How the bot signs in to the control API (as the machine identity
    /// listed in the gateway's `[[api.delegates]]`).
    pub credential: Credential,
    /// Which message shows which request, kept across restarts.
    pub state: PathBuf,
    /// Where the whole statement can be read: `{id}` is the request id.
    pub full_text_url: String,
    pub slack: Option<SlackConfig>,
    pub discord: Option<DiscordConfig>,
}

/// The bot's own identity at the gateway.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A static service token (`[[identity.tokens]]`).
    Token(Secret),
    /// OAuth client credentials at the gateway's OIDC issuer
    /// (`[[identity.oidc.services]]`): short-lived tokens, renewed.
    ClientCredentials {
        issuer: String,
        client_id: String,
        secret: Secret,
        resource: Option<String>,
        scopes: Vec<String>,
    },
}

#[derive(Debug, Clone)]
pub struct SlackConfig {
    pub bot_token: Secret,
    /// HTTP mode: the app's signing secret.
    pub signing_secret: Option<Secret>,
    /// Socket Mode: the app-level token (`xapp-`, scope
    /// `connections:write`); interactions arrive over a websocket the bot
    /// opens, and no endpoint listens.
    pub app_token: Option<Secret>,
    pub channel: String,
    /// The interactions endpoint (the Slack app's Request URL is
    /// `https://YOUR-HOST/slack/interactions`).
    pub listen: SocketAddr,
    /// The Web API's base URL.
    pub api_url: String,
    /// Slack user id → Sluice identity.
    pub users: BTreeMap<String, String>,
    /// Unlisted users are mapped by their profile email (`users.info`).
    pub map_by_email: bool,
}

#[derive(Debug, Clone)]
pub struct DiscordConfig {
    pub bot_token: Secret,
    /// HTTP mode: the application's Ed25519 public key. `None`: gateway
    /// mode (interactions arrive over the bot's gateway connection, and no
    /// endpoint listens).
    pub public_key: Option<[u8; 32]>,
    pub channel_id: u64,
    /// The interactions endpoint (the application's Interactions Endpoint
    /// URL is `https://YOUR-HOST/discord/interactions`).
    pub listen: SocketAddr,
    /// Where REST requests go instead of `https://discord.com` (a proxy).
    pub api_url: Option<String>,
    /// Discord user id → Sluice identity.
    pub users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway: RawGateway,
    slack: Option<RawSlack>,
    discord: Option<RawDiscord>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    api: String,
    token_env: Option<String>,
    token_file: Option<String>,
    state: Option<String>,
    full_text_url: Option<String>,
    client_credentials: Option<RawClientCredentials>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientCredentials {
    issuer: String,
    client_id: String,
    secret_env: Option<String>,
    secret_file: Option<String>,
    resource: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlack {
    bot_token_env: Option<String>,
    bot_token_file: Option<String>,
    signing_secret_env: Option<String>,
    signing_secret_file: Option<String>,
    mode: Option<String>,
    app_token_env: Option<String>,
    app_token_file: Option<String>,
    channel: String,
    listen: Option<String>,
    api_url: Option<String>,
    #[serde(default)]
    users: BTreeMap<String, String>,
    #[serde(default)]
    map_by_email: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscord {
    bot_token_env: Option<String>,
    bot_token_file: Option<String>,
    mode: Option<String>,
    public_key: Option<String>,
    channel_id: String,
    listen: Option<String>,
    api_url: Option<String>,
    #[serde(default)]
    users: BTreeMap<String, String>,
}

/// A configuration the bot cannot run with.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    file: String,
    message: String,
}

impl BotConfig {
    pub fn load(path: &Path) -> Result<BotConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            file: path.display().to_string(),
            message: format!("cannot read it: {err}"),
        })?;
        BotConfig::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// `env` reads an environment variable (tests pass their own).
    pub fn parse(text: &str, path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<BotConfig, ConfigError> {
        let file = path.display().to_string();
        let fail = |message: String| ConfigError {
            file: file.clone(),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|err| {
            let line = err
                .span()
                .map(|span| format!("line {}: ", text[..span.start].lines().count().max(1)))
                .unwrap_or_default();
            fail(format!("{line}{}", err.message()))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let secret = |what: &str, var: &Option<String>, file: &Option<String>| -> Result<Secret, ConfigError> {
            let value = match (var, file) {
                (Some(var), None) => env(var).ok_or_else(|| {
                    fail(format!(
                        "{what}_env = \"{var}\", and the environment has no {var}; export it"
                    ))
                })?,
                (None, Some(name)) => {
                    let secret_path = base.join(name);
                    std::fs::read_to_string(&secret_path)
                        .map_err(|err| fail(format!("{what}_file: cannot read {}: {err}", secret_path.display())))?
                }
                (Some(_), Some(_)) => return Err(fail(format!("give {what}_env or {what}_file, not both"))),
                (None, None) => {
                    return Err(fail(format!(
                        "{what} is missing: write {what}_env = \"VARIABLE\" or {what}_file = \"FILE\" (never the secret itself)"
                    )));
                }
            };
            let value = value.trim().to_string();
            if value.is_empty() {
                return Err(fail(format!("{what} is empty")));
            }
            Ok(Secret(value))
        };
        let listen = |what: &str, value: &Option<String>, default: &str| -> Result<SocketAddr, ConfigError> {
            let value = value.as_deref().unwrap_or(default);
            value.parse().map_err(|_| {
                fail(format!(
                    "{what}.listen = \"{value}\" is not an address; write \"127.0.0.1:3000\""
                ))
            })
        };
        let api = raw.gateway.api.trim_end_matches('/').to_string();
        if !(api.starts_with("http://") || api.starts_with("https://")) {
            return Err(fail(format!(
                "gateway.api = \"{api}\": write the control API's URL, such as \"http://127.0.0.1:7480\""
            )));
        }
        let credential = match raw.gateway.client_credentials {
            Some(cc) => {
                if raw.gateway.token_env.is_some() || raw.gateway.token_file.is_some() {
                    return Err(fail(
                        "give gateway.token_env/token_file or [gateway.client_credentials], not both".to_string(),
                    ));
                }
                if cc.issuer.trim().is_empty() || cc.client_id.trim().is_empty() {
                    return Err(fail(
                        "gateway.client_credentials needs issuer (the gateway's OIDC issuer) and client_id".to_string(),
                    ));
                }
                Credential::ClientCredentials {
                    issuer: cc.issuer.trim().to_string(),
                    client_id: cc.client_id.trim().to_string(),
                    secret: secret("gateway.client_credentials.secret", &cc.secret_env, &cc.secret_file)?,
                    resource: cc.resource,
                    scopes: cc.scopes,
                }
            }
            None => Credential::Token(secret(
                "gateway.token",
                &raw.gateway.token_env,
                &raw.gateway.token_file,
            )?),
        };
        let state = base.join(raw.gateway.state.as_deref().unwrap_or("sluice-bot-state.json"));
        let full_text_url = raw
            .gateway
            .full_text_url
            .unwrap_or_else(|| format!("{api}/v1/approvals/{{id}}"));
        let slack = match raw.slack {
            None => None,
            Some(slack) => {
                for (user, identity) in &slack.users {
                    if identity.trim().is_empty() {
                        return Err(fail(format!("slack.users: {user} maps to an empty identity")));
                    }
                }
                if slack.channel.trim().is_empty() {
                    return Err(fail("slack.channel: write the channel id (C0123456) to post in".into()));
                }
                let (signing_secret, app_token) = match slack.mode.as_deref().unwrap_or("http") {
                    "http" => (
                        Some(secret(
                            "slack.signing_secret",
                            &slack.signing_secret_env,
                            &slack.signing_secret_file,
                        )?),
                        None,
                    ),
                    "socket" => (
                        None,
                        Some(secret("slack.app_token", &slack.app_token_env, &slack.app_token_file)?),
                    ),
                    other => {
                        return Err(fail(format!(
                            "slack.mode = \"{other}\": write \"http\" (an interactions endpoint) or \"socket\" (Socket Mode)"
                        )));
                    }
                };
                Some(SlackConfig {
                    bot_token: secret("slack.bot_token", &slack.bot_token_env, &slack.bot_token_file)?,
                    signing_secret,
                    app_token,
                    channel: slack.channel,
                    listen: listen("slack", &slack.listen, "127.0.0.1:3000")?,
                    api_url: slack
                        .api_url
                        .unwrap_or_else(|| "https://slack.com/api".into())
                        .trim_end_matches('/')
                        .to_string(),
                    users: slack.users,
                    map_by_email: slack.map_by_email,
                })
            }
        };
        let discord = match raw.discord {
            None => None,
            Some(discord) => {
                let public_key = match (discord.mode.as_deref().unwrap_or("http"), &discord.public_key) {
                    ("http", Some(text)) => {
                        let mut key = [0u8; 32];
                        if hex::decode_to_slice(text.trim(), &mut key).is_err()
                            || serenity::interactions_endpoint::Verifier::try_new(key).is_err()
                        {
                            return Err(fail(
                                "discord.public_key: write the application's public key (64 hex digits, from the \
                                 Developer Portal's General Information page)"
                                    .into(),
                            ));
                        }
                        Some(key)
                    }
                    ("http", None) => {
                        return Err(fail(
                            "discord.public_key is missing: the interactions endpoint checks every request with it \
                             (or set mode = \"gateway\")"
                                .into(),
                        ));
                    }
                    ("gateway", _) => None,
                    (other, _) => {
                        return Err(fail(format!(
                            "discord.mode = \"{other}\": write \"http\" (an interactions endpoint) or \"gateway\" (the bot's gateway connection)"
                        )));
                    }
                };
                let channel_id = discord
                    .channel_id
                    .parse::<u64>()
                    .ok()
                    .filter(|id| *id != 0)
                    .ok_or_else(|| {
                        fail(format!(
                            "discord.channel_id = \"{}\": write the channel's id (a number: Developer Mode, right-click the channel, Copy ID)",
                            discord.channel_id
                        ))
                    })?;
                for (user, identity) in &discord.users {
                    if user.parse::<u64>().is_err() || identity.trim().is_empty() {
                        return Err(fail(format!(
                            "discord.users: \"{user}\" = \"{identity}\": keys are Discord user ids (numbers), values identities"
                        )));
                    }
                }
                Some(DiscordConfig {
                    bot_token: secret("discord.bot_token", &discord.bot_token_env, &discord.bot_token_file)?,
                    public_key,
                    channel_id,
                    listen: listen("discord", &discord.listen, "127.0.0.1:3001")?,
                    api_url: discord.api_url.map(|url| url.trim_end_matches('/').to_string()),
                    users: discord.users,
                })
            }
        };
        if slack.is_none() && discord.is_none() {
            return Err(fail(
                "neither [slack] nor [discord] is configured: the bot needs somewhere to post".into(),
            ));
        }
        Ok(BotConfig {
            api,
            credential,
            state,
            full_text_url,
            slack,
            discord,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("bot-token".into()),
            "SLACK_BOT" => Some("xoxb-1".into()),
            "SLACK_SECRET" => Some("secret".into()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<BotConfig, ConfigError> {
        BotConfig::parse(text, Path::new("/etc/sluice/bot.toml"), &env)
    }

    const SLACK: &str = "[gateway]\napi = \"http://127.0.0.1:7480/\"\ntoken_env = \"TOKEN\"\n\n\
        [slack]\nbot_token_env = \"SLACK_BOT\"\nsigning_secret_env = \"SLACK_SECRET\"\nchannel = \"C1\"\n\
        [slack.users]\nU1 = \"carol@example.com\"\n";

    #[test]
    fn a_slack_configuration() {
        let config = parse(SLACK).unwrap();
        assert_eq!(config.api, "http://127.0.0.1:7480");
        assert_eq!(config.full_text_url, "http://127.0.0.1:7480/v1/approvals/{id}");
        assert_eq!(config.state, Path::new("/etc/sluice/sluice-bot-state.json"));
        let slack = config.slack.unwrap();
        assert_eq!(slack.api_url, "https://slack.com/api");
        assert_eq!(slack.users["U1"], "carol@example.com");
        assert!(config.discord.is_none());
    }

    #[test]
    fn the_shipped_examples_parse() {
        let env = |name: &str| Some(format!("{name}-value"));
        for file in ["bot-slack.toml", "bot-discord.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config").join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            let config = BotConfig::parse(&text, &path, &env).unwrap_or_else(|err| panic!("{err}"));
            assert!(
                matches!(&config.credential, Credential::Token(token) if token.expose() == "SLUICE_BOT_TOKEN-value"),
                "{config:?}"
            );
            assert!(!format!("{config:?}").contains("-value"), "a secret in Debug");
            assert!(config.slack.is_some() || config.discord.is_some());
        }
    }

    #[test]
    fn client_credentials_replace_the_token() {
        let text = SLACK.replace(
            "token_env = \"TOKEN\"\n",
            "[gateway.client_credentials]\nissuer = \"https://login.example.com\"\nclient_id = \"approval-bot\"\n\
             secret_env = \"TOKEN\"\nresource = \"urn:sluice\"\n",
        );
        let config = parse(&text).unwrap();
        match &config.credential {
            Credential::ClientCredentials {
                issuer,
                client_id,
                secret,
                resource,
                ..
            } => {
                assert_eq!(
                    (issuer.as_str(), client_id.as_str()),
                    ("https://login.example.com", "approval-bot")
                );
                assert_eq!(secret.expose(), "bot-token");
                assert_eq!(resource.as_deref(), Some("urn:sluice"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{config:?}").contains("bot-token"), "a secret in Debug");
        let both = text.replace(
            "[gateway.client_credentials]",
            "token_env = \"TOKEN\"\n[gateway.client_credentials]",
        );
        assert!(parse(&both).unwrap_err().to_string().contains("not both"));
    }

    #[test]
    fn mistakes_are_named() {
        let err = parse(&SLACK.replace("TOKEN\"", "MISSING\"")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/sluice/bot.toml: gateway.token_env = \"MISSING\", and the environment has no MISSING; export it"
        );
        let err = parse(&SLACK.replace("channel = \"C1\"", "channel = \"C1\"\nchanel = 1")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/etc/sluice/bot.toml: line 8: unknown field `chanel`"),
            "{err}"
        );
        let socket = SLACK.replace(
            "channel = \"C1\"",
            "channel = \"C1\"\nmode = \"socket\"\napp_token_env = \"MISSING\"",
        );
        let err = parse(&socket).unwrap_err();
        assert!(err.to_string().contains("slack.app_token_env = \"MISSING\""), "{err}");
        let err = parse(&SLACK.replace("channel = \"C1\"", "channel = \"C1\"\nmode = \"sockets\"")).unwrap_err();
        assert!(
            err.to_string().contains("slack.mode = \"sockets\": write \"http\""),
            "{err}"
        );
        let err = parse("[gateway]\napi = \"http://x\"\ntoken_env = \"TOKEN\"\n").unwrap_err();
        assert!(err.to_string().contains("neither [slack] nor [discord]"), "{err}");
        let discord = "[gateway]\napi = \"http://x\"\ntoken_env = \"TOKEN\"\n[discord]\nbot_token_env = \"TOKEN\"\n\
                       public_key = \"abc\"\nchannel_id = \"1\"\n";
        let err = parse(discord).unwrap_err();
        assert!(err.to_string().contains("discord.public_key"), "{err}");
        let gateway = discord.replace("public_key = \"abc\"\n", "mode = \"gateway\"\n");
        assert_eq!(parse(&gateway).unwrap().discord.unwrap().public_key, None);
        let err = parse(&discord.replace("public_key = \"abc\"\n", "")).unwrap_err();
        assert!(err.to_string().contains("discord.public_key is missing"), "{err}");
    }
}
