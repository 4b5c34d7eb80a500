//! The client side of a session's opening: SSL and GSSAPI negotiation, the
//! StartupMessage and its parameters, and the bearer token sent as a password.

use std::net::SocketAddr;

use bytes::BytesMut;

use super::Shared;
use crate::conn::{ConnError, Connection};
use crate::identity::Identity;
use crate::net::Stream;
use crate::protocol::backend::{self, ErrorFields, Severity};
use crate::protocol::frontend::{self, tag};
use crate::protocol::startup::StartupPacket;

/// A password message holds a token: ID tokens with many groups run to a few
/// kilobytes, never to this.
const MAX_PASSWORD_MESSAGE: usize = 64 * 1024;

/// Why a session ended before it began.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Tell the client this (a FATAL error), then close.
    Refuse(ErrorFields),
    /// The client left or the connection broke; there is nobody to tell.
    Gone(String),
}

impl From<ConnError> for Failure {
    fn from(err: ConnError) -> Failure {
        match err {
            ConnError::Closed | ConnError::Io(_) => Failure::Gone(err.to_string()),
            ConnError::Frame(_) | ConnError::Startup(_) => Failure::Refuse(ErrorFields::new(
                Severity::Fatal,
                "08P01",
                format!("invalid startup: {err}"),
            )),
        }
    }
}

fn fatal(code: &'static str, message: impl Into<String>) -> Failure {
    Failure::Refuse(ErrorFields::new(Severity::Fatal, code, message))
}

/// What the opening packets asked for.
pub(crate) enum Opening {
    /// A session: the connection (TLS by now, if negotiated) and its parameters.
    Session { conn: Connection, params: StartupParams },
    /// A CancelRequest; the connection is finished.
    Cancel { process_id: i32, secret_key: i32 },
}

/// Reads packets until a StartupMessage or CancelRequest, upgrading to TLS on
/// request. A failure comes with the connection, when there still is one, so
/// the client can be told why.
pub(crate) async fn negotiate(mut conn: Connection, shared: &Shared) -> Result<Opening, (Failure, Option<Connection>)> {
    loop {
        let packet = match conn.read_startup_packet().await {
            Ok(packet) => packet,
            Err(err) => return Err((err.into(), Some(conn))),
        };
        let packet = match StartupPacket::decode(&packet) {
            Ok(packet) => packet,
            Err(err) => return Err((fatal("08P01", format!("invalid startup packet: {err}")), Some(conn))),
        };
        let answer = match packet {
            StartupPacket::SslRequest => match &shared.tls {
                Some(acceptor) if !conn.is_tls() => {
                    if conn.has_buffered_input() {
                        let failure = fatal("08P01", "received unencrypted data after SSL request");
                        return Err((failure, Some(conn)));
                    }
                    if let Err(err) = conn.send(b"S").await {
                        return Err((Failure::Gone(err.to_string()), None));
                    }
                    let acceptor = acceptor.clone();
                    conn = conn
                        .map_stream(|stream| async move {
                            match stream {
                                Stream::Tcp(tcp) => {
                                    acceptor.accept(tcp).await.map(|tls| Stream::ServerTls(Box::new(tls)))
                                }
                                other => Ok(other),
                            }
                        })
                        .await
                        .map_err(|err| {
                            // Worth an operator's eye: usually a client that
                            // does not trust the gateway's certificate.
                            tracing::info!(error = %err, "TLS handshake with a client failed");
                            (Failure::Gone(format!("TLS handshake failed: {err}")), None)
                        })?;
                    continue;
                }
                _ => b"N",
            },
            StartupPacket::GssEncRequest => b"N",
            StartupPacket::Cancel { process_id, secret_key } => {
                return Ok(Opening::Cancel { process_id, secret_key });
            }
            StartupPacket::Startup { major, minor, params } => {
                if major != 3 {
                    let failure = fatal(
                        "0A000",
                        format!("unsupported frontend protocol {major}.{minor}: Sluice supports 3.0"),
                    );
                    return Err((failure, Some(conn)));
                }
                let params = match StartupParams::screen(&params) {
                    Ok(params) => params,
                    Err(error) => return Err((Failure::Refuse(error), Some(conn))),
                };
                if minor > 0 || !params.protocol_options.is_empty() {
                    // Protocol 3.x asks for features the gateway does not
                    // offer: say which version and options it speaks.
                    let unrecognized: Vec<&str> = params.protocol_options.iter().map(String::as_str).collect();
                    let mut out = BytesMut::new();
                    backend::encode_negotiate_protocol_version(0, &unrecognized, &mut out);
                    if let Err(err) = conn.send(&out).await {
                        return Err((Failure::Gone(err.to_string()), None));
                    }
                }
                return Ok(Opening::Session { conn, params });
            }
        };
        // Declining SSL or GSSAPI encryption: the client goes on in the clear.
        if let Err(err) = conn.send(answer).await {
            return Err((Failure::Gone(err.to_string()), None));
        }
    }
}

/// Asks for the token, reads it and verifies it.
pub(crate) async fn authenticate(
    conn: &mut Connection,
    shared: &Shared,
    peer: SocketAddr,
) -> Result<Identity, Failure> {
    let plaintext_allowed = shared.config.server.allow_plaintext && peer.ip().is_loopback();
    if !conn.is_tls() && !plaintext_allowed {
        // Refuse before asking, so the token is never sent in the clear.
        return Err(Failure::Refuse(
            ErrorFields::new(
                Severity::Fatal,
                "28000",
                "Sluice accepts tokens over TLS only, and this connection is not encrypted",
            )
            .with_hint("connect with sslmode=require (or verify-full with the gateway's CA)"),
        ));
    }
    let mut out = BytesMut::new();
    backend::encode_auth_cleartext(&mut out);
    conn.send(&out).await.map_err(|e| Failure::Gone(e.to_string()))?;
    let message = conn.read_message(MAX_PASSWORD_MESSAGE).await?;
    if message.tag != tag::PASSWORD {
        return Err(fatal(
            "08P01",
            format!(
                "expected a password message, got message type {}",
                crate::protocol::codec::printable(message.tag)
            ),
        ));
    }
    let token = frontend::decode_password(&message.body)
        .map_err(|err| fatal("08P01", format!("invalid password message: {err}")))?;
    shared.verifier.verify(token).await.map_err(|err| {
        tracing::warn!(reason = err.kind(), "authentication failed");
        Failure::Refuse(
            ErrorFields::new(Severity::Fatal, err.sqlstate(), format!("authentication failed: {err}"))
                .with_hint("use a Sluice token as the password: `sluice token`, or a configured service token"),
        )
    })
}

/// Startup parameters as the gateway accepts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StartupParams {
    /// The client's user name: informational only, identity comes from the token.
    pub user: String,
    /// The target the client asked for, by name (its `database` parameter).
    pub target: String,
    pub application_name: Option<String>,
    /// Parameters to pass on to the upstream server, already checked.
    pub forward: Vec<(String, String)>,
    /// `_pq_.` protocol options the client asked for; none are supported.
    pub protocol_options: Vec<String>,
}

/// Run-time parameters a client may set at startup. They cannot change who
/// the session is or how statements are read; anything else a client could
/// set here would escape the statement gate, so it is refused.
pub(super) const ALLOWED_PARAMETERS: &[&str] = &[
    "application_name",
    "bytea_output",
    "client_encoding",
    "client_min_messages",
    "datestyle",
    "default_transaction_deferrable",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "extra_float_digits",
    "geqo",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "intervalstyle",
    "jit",
    "lc_messages",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "lock_timeout",
    "search_path",
    "standard_conforming_strings",
    "statement_timeout",
    "timezone",
    "work_mem",
];

/// Client encodings whose bytes mean what the gateway's UTF-8 parser reads.
/// Others (GBK, SJIS, BIG5...) can hide a quote inside a multibyte character.
pub(crate) fn encoding_is_safe(value: &str) -> bool {
    matches!(
        value.to_ascii_uppercase().replace(['-', '_'], "").as_str(),
        "UTF8" | "UNICODE" | "SQLASCII"
    )
}

impl StartupParams {
    pub(crate) fn screen(params: &[(&str, &str)]) -> Result<StartupParams, ErrorFields> {
        let refuse = |message: String| ErrorFields::new(Severity::Fatal, "42501", message);
        let mut user = None;
        let mut database = None;
        let mut application_name = None;
        let mut forward = Vec::new();
        let mut protocol_options = Vec::new();
        let mut settings: Vec<(String, String)> = Vec::new();
        for &(name, value) in params {
            match name {
                "user" => user = Some(value.to_string()),
                "database" => database = Some(value.to_string()),
                "replication" => {
                    if !matches!(value.to_ascii_lowercase().as_str(), "false" | "off" | "no" | "0") {
                        return Err(ErrorFields::new(
                            Severity::Fatal,
                            "0A000",
                            "replication connections are not supported through Sluice",
                        ));
                    }
                }
                "options" => {
                    for (name, value) in split_options(value).map_err(refuse)? {
                        settings.push((name, value));
                    }
                }
                name if name.starts_with("_pq_.") => protocol_options.push(name.to_string()),
                name => settings.push((name.to_string(), value.to_string())),
            }
        }
        for (name, value) in settings {
            let lower = name.to_ascii_lowercase();
            if !ALLOWED_PARAMETERS.contains(&lower.as_str()) {
                return Err(refuse(format!(
                    "startup parameter \"{name}\" is not allowed through Sluice; set it with SET after connecting, where policy applies"
                )));
            }
            if lower == "client_encoding" && !encoding_is_safe(&value) {
                return Err(ErrorFields::new(
                    Severity::Fatal,
                    "22023",
                    format!("client_encoding \"{value}\" is not supported through Sluice: use UTF8"),
                ));
            }
            if lower == "standard_conforming_strings" && !value.eq_ignore_ascii_case("on") {
                return Err(refuse(
                    "standard_conforming_strings must stay on through Sluice: with it off, backslashes change how strings end"
                        .to_string(),
                ));
            }
            if lower == "application_name" {
                application_name = Some(value.clone());
            }
            forward.push((name, value));
        }
        let user = user.filter(|u| !u.is_empty()).ok_or_else(|| {
            ErrorFields::new(
                Severity::Fatal,
                "28000",
                "no PostgreSQL user name specified in startup packet",
            )
        })?;
        let target = database.filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
        Ok(StartupParams {
            user,
            target,
            application_name,
            forward,
            protocol_options,
        })
    }
}

/// Splits the `options` parameter the way PostgreSQL does (whitespace
/// separates, backslash escapes) and reads `-c name=value` and `--name=value`
/// switches. Any other switch is refused: it would configure the backend
/// outside the statement gate.
fn split_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_whitespace() {
            if in_word {
                words.push(std::mem::take(&mut word));
                in_word = false;
            }
        } else if c == '\\' {
            if let Some(next) = chars.next() {
                word.push(next);
            }
            in_word = true;
        } else {
            word.push(c);
            in_word = true;
        }
    }
    if in_word {
        words.push(word);
    }
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words.next().ok_or_else(|| "options: -c needs name=value".to_string())?
        } else if let Some(rest) = word.strip_prefix("-c") {
            rest.to_string()
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_string()
        } else {
            return Err(format!(
                "options: \"{word}\" is not allowed through Sluice; only -c name=value settings are"
            ));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("options: \"{setting}\" is not name=value"))?;
        settings.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_driver_parameters_pass() {
        // What JDBC sends.
        let params = StartupParams::screen(&[
            ("user", "alice"),
            ("database", "shop"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
            ("extra_float_digits", "3"),
            ("application_name", "PostgreSQL JDBC Driver"),
        ])
        .unwrap();
        assert_eq!(params.target, "shop");
        assert_eq!(params.user, "alice");
        assert_eq!(params.forward.len(), 5);
        assert_eq!(params.application_name.as_deref(), Some("PostgreSQL JDBC Driver"));
    }

    #[test]
    fn database_defaults_to_user() {
        let params = StartupParams::screen(&[("user", "shop")]).unwrap();
        assert_eq!(params.target, "shop");
        assert!(StartupParams::screen(&[("database", "shop")]).is_err());
    }

    #[test]
    fn role_and_session_settings_are_refused() {
        for (name, value) in [
            ("role", "postgres"),
            ("session_authorization", "postgres"),
            ("app.tenant_id", "7"),
            ("default_transaction_read_only", "off"),
        ] {
            let result = StartupParams::screen(&[("user", "u"), (name, value)]);
            if name == "default_transaction_read_only" {
                assert!(result.is_ok());
            } else {
                let err = result.unwrap_err();
                assert!(err.message.contains(name), "{}", err.message);
            }
        }
    }

    #[test]
    fn options_are_parsed_like_postgres() {
        let params = StartupParams::screen(&[
            ("user", "u"),
            ("options", "-c statement_timeout=5s --search-path=app\\ x"),
        ])
        .unwrap();
        assert_eq!(
            params.forward,
            vec![
                ("statement_timeout".to_string(), "5s".to_string()),
                ("search_path".to_string(), "app x".to_string())
            ]
        );
        let err = StartupParams::screen(&[("user", "u"), ("options", "-c role=admin")]).unwrap_err();
        assert!(err.message.contains("\"role\""), "{}", err.message);
        assert!(StartupParams::screen(&[("user", "u"), ("options", "-d 5")]).is_err());
    }

    #[test]
    fn unsafe_encodings_and_string_modes_are_refused() {
        assert!(StartupParams::screen(&[("user", "u"), ("client_encoding", "GBK")]).is_err());
        assert!(StartupParams::screen(&[("user", "u"), ("client_encoding", "sql_ascii")]).is_ok());
        assert!(StartupParams::screen(&[("user", "u"), ("standard_conforming_strings", "off")]).is_err());
    }

    #[test]
    fn replication_and_protocol_options() {
        assert!(StartupParams::screen(&[("user", "u"), ("replication", "database")]).is_err());
        let params = StartupParams::screen(&[("user", "u"), ("_pq_.compression", "on")]).unwrap();
        assert_eq!(params.protocol_options, vec!["_pq_.compression"]);
        assert!(params.forward.is_empty());
    }
}
