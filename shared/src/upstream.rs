//! The gateway's own connection to a target: TCP or Unix socket, TLS per the
//! target's mode, and login as the mapped upstream role with SCRAM-SHA-256,
//! md5, a cleartext password or trust. Clients never see these credentials.

use std::io;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{Secret, Target, UpstreamAddress};
use crate::conn::{ConnError, Connection};
use crate::net::{Stream, TlsRequestError};
use crate::protocol::backend::{self, Authentication, BackendKeyData, ReceivedError, tag};
use crate::protocol::{TxStatus, frontend};
use crate::tls::UpstreamTlsConnector;

/// Upstream messages during login are small; anything larger is not PostgreSQL.
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// Why the gateway could not open a session on a target.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {address}: {source}")]
    Connect { address: String, source: io::Error },
    #[error("no answer from {address} within {after:?}")]
    Timeout { address: String, after: Duration },
    #[error("{address} does not accept TLS, but the target requires it")]
    TlsRefused { address: String },
    #[error("TLS handshake with {address} failed: {source}")]
    Tls { address: String, source: io::Error },
    #[error("{address} asks role {role} for a password, and none is configured")]
    PasswordRequired { address: String, role: String },
    #[error("{address} asks for an authentication method the gateway does not support ({method})")]
    UnsupportedAuth { address: String, method: String },
    #[error("SCRAM authentication with {address} failed: {source}")]
    Scram { address: String, source: io::Error },
    #[error("{address} refused role {role}: {message} (SQLSTATE {code})")]
    Refused {
        address: String,
        role: String,
        code: String,
        message: String,
    },
    #[error("{address} broke the protocol during login: {reason}")]
    Protocol { address: String, reason: String },
}

impl UpstreamError {
    fn from_conn(address: &str, err: ConnError) -> UpstreamError {
        match err {
            ConnError::Io(source) => UpstreamError::Connect {
                address: address.to_string(),
                source,
            },
            other => UpstreamError::Protocol {
                address: address.to_string(),
                reason: other.to_string(),
            },
        }
    }
}

/// What the gateway needs to log in to a target.
pub struct Login<'a> {
    pub target: &'a Target,
    pub tls: Option<&'a UpstreamTlsConnector>,
    pub role: &'a str,
    pub password: Option<&'a Secret>,
    /// Startup parameters passed on from the client (already checked).
    pub params: &'a [(String, String)],
}

/// A logged-in upstream connection, ready for queries.
pub struct Upstream {
    pub conn: Connection,
    /// The backend's real process id and cancel key.
    pub key: BackendKeyData,
    /// ParameterStatus and NoticeResponse messages received during login,
    /// encoded as received, to be replayed to the client in order.
    pub greeting: BytesMut,
    pub status: TxStatus,
}

/// Opens a stream to the target, with TLS when its mode asks for it.
pub async fn open_stream(target: &Target, tls: Option<&UpstreamTlsConnector>) -> Result<Stream, UpstreamError> {
    let address = target.address.to_string();
    let connect = async {
        let tcp = match &target.address {
            UpstreamAddress::Tcp { host, port } => {
                let tcp =
                    TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(|source| UpstreamError::Connect {
                            address: address.clone(),
                            source,
                        })?;
                tcp.set_nodelay(true).ok();
                tcp
            }
            UpstreamAddress::Unix { dir, port } => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let unix = UnixStream::connect(&path)
                    .await
                    .map_err(|source| UpstreamError::Connect {
                        address: address.clone(),
                        source,
                    })?;
                return Ok(Stream::Unix(unix));
            }
        };
        let Some(tls) = tls else {
            return Ok(Stream::Tcp(tcp));
        };
        crate::net::request_tls(tcp, tls.config.clone(), tls.server_name.clone())
            .await
            .map_err(|err| match err {
                TlsRequestError::Io(source) => UpstreamError::Connect {
                    address: address.clone(),
                    source,
                },
                TlsRequestError::Refused => UpstreamError::TlsRefused {
                    address: address.clone(),
                },
                TlsRequestError::Unexpected(other) => UpstreamError::Protocol {
                    address: address.clone(),
                    reason: format!("unexpected answer 0x{other:02x} to SSLRequest"),
                },
                TlsRequestError::Handshake(source) => UpstreamError::Tls {
                    address: address.clone(),
                    source,
                },
            })
    };
    tokio::time::timeout(target.connect_timeout, connect)
        .await
        .map_err(|_| UpstreamError::Timeout {
            address: address.clone(),
            after: target.connect_timeout,
        })?
}

/// Connects and logs in as `login.role`.
pub async fn connect(login: Login<'_>) -> Result<Upstream, UpstreamError> {
    let stream = open_stream(login.target, login.tls).await?;
    let address = login.target.address.to_string();
    let timeout = login.target.connect_timeout;
    tokio::time::timeout(timeout, authenticate(Connection::new(stream), &login, &address))
        .await
        .map_err(|_| UpstreamError::Timeout {
            address: address.clone(),
            after: timeout,
        })?
}

async fn authenticate(mut conn: Connection, login: &Login<'_>, address: &str) -> Result<Upstream, UpstreamError> {
    let mut out = BytesMut::new();
    let params = [("user", login.role), ("database", login.target.database.as_str())]
        .into_iter()
        .chain(login.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    frontend::encode_startup(params, &mut out);
    send(&mut conn, &out, address).await?;

    let password = || {
        login.password.ok_or_else(|| UpstreamError::PasswordRequired {
            address: address.to_string(),
            role: login.role.to_string(),
        })
    };
    let scram_error = |source| UpstreamError::Scram {
        address: address.to_string(),
        source,
    };
    let mut scram: Option<ScramSha256> = None;
    let mut scram_verified = false;
    let mut greeting = BytesMut::new();
    let mut key = None;
    loop {
        let message = conn
            .read_message(MAX_LOGIN_MESSAGE)
            .await
            .map_err(|err| UpstreamError::from_conn(address, err))?;
        let protocol = |reason: String| UpstreamError::Protocol {
            address: address.to_string(),
            reason,
        };
        out.clear();
        match message.tag {
            tag::AUTHENTICATION => {
                let auth = Authentication::decode(&message.body).map_err(|e| protocol(e.to_string()))?;
                match auth {
                    Authentication::Ok => {
                        // A server that skips SCRAM's final message would skip
                        // proving that it knows the password: refuse it.
                        if scram.is_some() && !scram_verified {
                            return Err(protocol("AuthenticationOk before SCRAM completed".into()));
                        }
                    }
                    Authentication::CleartextPassword => {
                        frontend::encode_password(password()?.expose(), &mut out);
                    }
                    Authentication::Md5Password { salt } => {
                        let hash = md5_hash(login.role.as_bytes(), password()?.expose().as_bytes(), salt);
                        frontend::encode_password(&hash, &mut out);
                    }
                    Authentication::Sasl { mechanisms } => {
                        if !mechanisms.contains(&SCRAM_SHA_256) {
                            return Err(UpstreamError::UnsupportedAuth {
                                address: address.to_string(),
                                method: format!("SASL {}", mechanisms.join(", ")),
                            });
                        }
                        let client = ScramSha256::new(password()?.expose().as_bytes(), ChannelBinding::unsupported());
                        frontend::encode_sasl_initial(SCRAM_SHA_256, client.message(), &mut out);
                        scram = Some(client);
                    }
                    Authentication::SaslContinue { data } => {
                        let client = scram
                            .as_mut()
                            .ok_or_else(|| protocol("SASLContinue without SASL".into()))?;
                        client.update(data).map_err(scram_error)?;
                        frontend::encode_sasl_response(client.message(), &mut out);
                    }
                    Authentication::SaslFinal { data } => {
                        let client = scram
                            .as_mut()
                            .ok_or_else(|| protocol("SASLFinal without SASL".into()))?;
                        client.finish(data).map_err(scram_error)?;
                        scram_verified = true;
                    }
                    Authentication::Unsupported { code } => {
                        return Err(UpstreamError::UnsupportedAuth {
                            address: address.to_string(),
                            method: format!("authentication request code {code}"),
                        });
                    }
                }
                if !out.is_empty() {
                    send(&mut conn, &out, address).await?;
                }
            }
            tag::PARAMETER_STATUS | tag::NOTICE_RESPONSE => {
                greeting.put_u8(message.tag);
                greeting.put_i32(message.body.len() as i32 + 4);
                greeting.put_slice(&message.body);
            }
            tag::BACKEND_KEY_DATA => {
                key = Some(BackendKeyData::decode(&message.body).map_err(|e| protocol(e.to_string()))?);
            }
            tag::NEGOTIATE_PROTOCOL_VERSION => {}
            tag::READY_FOR_QUERY => {
                let status = backend::decode_ready_for_query(&message.body).map_err(|e| protocol(e.to_string()))?;
                let key = key.ok_or_else(|| protocol("ReadyForQuery before BackendKeyData".into()))?;
                return Ok(Upstream {
                    conn,
                    key,
                    greeting,
                    status,
                });
            }
            tag::ERROR_RESPONSE => {
                let error = ReceivedError::decode(&message.body).map_err(|e| protocol(e.to_string()))?;
                return Err(UpstreamError::Refused {
                    address: address.to_string(),
                    role: login.role.to_string(),
                    code: error.code.to_string(),
                    message: error.message.to_string(),
                });
            }
            other => {
                return Err(protocol(format!(
                    "unexpected message {} during login",
                    crate::protocol::codec::printable(other)
                )));
            }
        }
    }
}

async fn send(conn: &mut Connection, bytes: &[u8], address: &str) -> Result<(), UpstreamError> {
    conn.send(bytes).await.map_err(|source| UpstreamError::Connect {
        address: address.to_string(),
        source,
    })
}

/// Sends a CancelRequest for a backend of this target, as PostgreSQL expects:
/// on a fresh connection (TLS when the target uses it), with no reply.
pub async fn send_cancel(
    target: &Target,
    tls: Option<&UpstreamTlsConnector>,
    key: BackendKeyData,
) -> Result<(), UpstreamError> {
    let mut stream = open_stream(target, tls).await?;
    let mut request = BytesMut::new();
    frontend::encode_cancel_request(key.process_id, key.secret_key, &mut request);
    let address = target.address.to_string();
    stream
        .write_all(&request)
        .await
        .map_err(|source| UpstreamError::Connect {
            address: address.clone(),
            source,
        })?;
    stream.flush().await.ok();
    // PostgreSQL closes the connection once it has read the request; waiting
    // for that makes the cancel happen before the client hears back.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(target.connect_timeout, stream.read(&mut sink)).await;
    Ok(())
}
