//! `sluice connect`: a local listener on loopback that native clients
//! (psql, DBeaver, JDBC) reach without a password. Each connection is
//! forwarded to the gateway, with TLS when configured, and the user's
//! current token is sent as the password the gateway asks for. The client
//! never sees the token, and the tunnel never sees a statement: after the
//! login it copies bytes.
//!
//! Only the user who runs the tunnel may use it: on Linux each connection's
//! owner is looked up in `/proc/net/tcp` and compared with ours, and a
//! connection that cannot be matched is refused.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::conn::{Connection, Message};
use crate::net::{Stream, TlsRequestError, request_tls};
use crate::protocol::backend::tag;
use crate::protocol::backend::{self, Authentication, ErrorFields, Severity};
use crate::protocol::frontend;
use crate::protocol::startup::StartupPacket;

/// How long a client may take to send its startup packet, and the gateway
/// to answer the login.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages the gateway sends before the session starts are small; an
/// ErrorResponse is the largest.
const MAX_LOGIN_MESSAGE: usize = 64 * 1024;

/// Gives the token to send, renewed when it runs out. The error says what
/// the user should do (it reaches their client as the FATAL message).
pub trait TokenSource: Send + Sync + 'static {
    fn token(&self) -> impl Future<Output = Result<String, String>> + Send;
}

/// Where the tunnel forwards to.
#[derive(Clone)]
pub struct Gateway {
    pub host: String,
    pub port: u16,
    /// TLS to the gateway, verifying its certificate and name; `None` for
    /// plaintext (a gateway on loopback).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Gateway {
    fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A connection to the gateway, TLS negotiated as PostgreSQL does it.
    async fn open(&self) -> Result<Stream, String> {
        let address = self.address();
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|err| format!("cannot reach the gateway at {address}: {err}"))?;
        tcp.set_nodelay(true).ok();
        let Some(config) = &self.tls else {
            // In the clear, the token goes to whoever listens there: on
            // loopback another user could have taken the port. Only a
            // listener of ours (or root's) gets it.
            let owner = match (tcp.peer_addr(), tcp.local_addr()) {
                (Ok(gateway), Ok(us)) => peer_uid(gateway, us),
                (Err(err), _) | (_, Err(err)) => Err(err.to_string()),
            };
            // SAFETY: getuid has no preconditions and cannot fail.
            let us = unsafe { libc::getuid() };
            return match owner {
                Ok(uid) if uid == us || uid == 0 => Ok(Stream::Tcp(tcp)),
                Ok(uid) => Err(format!(
                    "the listener at {address} belongs to uid {uid}, not to you or root, so the tunnel will not send it your token in the clear; give the gateway's CA with --ca to use TLS"
                )),
                Err(reason) => Err(format!(
                    "cannot tell who listens at {address} ({reason}), so the tunnel will not send it your token in the clear; give the gateway's CA with --ca to use TLS"
                )),
            };
        };
        let name = ServerName::try_from(self.host.clone())
            .map_err(|_| format!("\"{}\" is not a host name TLS can verify", self.host))?;
        request_tls(tcp, config.clone(), name).await.map_err(|err| match err {
            TlsRequestError::Io(err) => format!("gateway {address}: {err}"),
            TlsRequestError::Refused | TlsRequestError::Unexpected(_) => format!(
                "the gateway at {address} does not offer TLS; connect to its TLS listener or, for a gateway on this machine, leave out --ca"
            ),
            TlsRequestError::Handshake(err) => format!("TLS with the gateway at {address} failed: {err}"),
        })
    }
}

/// A bound tunnel for one target.
pub struct Tunnel<T> {
    listener: TcpListener,
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    target: String,
    gateway: Gateway,
    tokens: T,
    /// The uid whose connections are served.
    owner: u32,
}

impl<T: TokenSource> Tunnel<T> {
    /// Listens on `listen` (a loopback address) for clients of `target`.
    pub async fn bind(listen: SocketAddr, target: &str, gateway: Gateway, tokens: T) -> std::io::Result<Tunnel<T>> {
        if !listen.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the tunnel listens on loopback only, not {listen}: anyone who reaches it connects as you"),
            ));
        }
        let listener = TcpListener::bind(listen).await?;
        Ok(Tunnel {
            listener,
            shared: Arc::new(Shared {
                target: target.to_string(),
                gateway,
                tokens,
                // SAFETY: getuid has no preconditions and cannot fail.
                owner: unsafe { libc::getuid() },
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections until `stop` is cancelled. Connections already
    /// forwarded carry on until their client or the gateway ends them.
    pub async fn run(self, stop: CancellationToken) {
        let local = self.listener.local_addr().ok();
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = stop.cancelled() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            tcp.set_nodelay(true).ok();
            let shared = self.shared.clone();
            tokio::spawn(async move {
                let owner = local.map_or(Err("unknown listener address".to_string()), |local| {
                    peer_uid(peer, local)
                });
                serve(shared, tcp, peer, owner).await;
            });
        }
    }
}

/// Serves one client: its startup, the gateway's login with the token, then
/// bytes both ways.
async fn serve<T: TokenSource>(shared: Arc<Shared<T>>, tcp: TcpStream, peer: SocketAddr, owner: Result<u32, String>) {
    let mut client = Connection::new(Stream::Tcp(tcp));
    let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, open(&shared, &mut client, owner)).await;
    let gateway = match opened {
        Ok(Ok(Some(gateway))) => gateway,
        Ok(Ok(None)) => return,
        Ok(Err(refusal)) => {
            tracing::info!(%peer, reason = %refusal.message, "connection refused");
            let mut out = BytesMut::new();
            refusal.encode(&mut out);
            let _ = client.send(&out).await;
            client.close().await;
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "connection closed: the login took over {HANDSHAKE_TIMEOUT:?}");
            let mut out = BytesMut::new();
            refuse(
                "08006",
                format!(
                    "sluice connect gave up on this connection after {}s: its startup or the login to the gateway did not finish",
                    HANDSHAKE_TIMEOUT.as_secs()
                ),
            )
            .encode(&mut out);
            let _ = client.send(&out).await;
            return;
        }
    };
    tracing::info!(%peer, target = %shared.target, "connection forwarded");
    let (mut client, client_in) = client.into_parts();
    let (mut server, server_in) = gateway.into_parts();
    let relayed = async {
        server.write_all(&client_in).await?;
        client.write_all(&server_in).await?;
        tokio::io::copy_bidirectional(&mut client, &mut server).await
    };
    match relayed.await {
        Ok((up, down)) => tracing::info!(%peer, bytes_up = up, bytes_down = down, "connection closed"),
        Err(err) => tracing::info!(%peer, error = %err, "connection ended"),
    }
}

fn refuse(code: &'static str, message: impl Into<String>) -> ErrorFields {
    ErrorFields::new(Severity::Fatal, code, message)
}

/// The client's opening and the gateway's login. `None` when there is
/// nothing more to do (a forwarded cancel, a client that left).
async fn open<T: TokenSource>(
    shared: &Shared<T>,
    client: &mut Connection,
    owner: Result<u32, String>,
) -> Result<Option<Connection>, ErrorFields> {
    let params = loop {
        let Ok(packet) = client.read_startup_packet().await else {
            return Ok(None);
        };
        let packet =
            StartupPacket::decode(&packet).map_err(|err| refuse("08P01", format!("invalid startup packet: {err}")))?;
        match packet {
            // The hop to this listener stays on the machine: no TLS here;
            // the hop to the gateway has its own.
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                if client.send(b"N").await.is_err() {
                    return Ok(None);
                }
            }
            StartupPacket::Cancel { process_id, secret_key } => {
                // Cancels carry the gateway's keys and no credential; they
                // are checked too, so other users cannot cancel ours.
                check_owner(&owner, shared.owner)?;
                forward_cancel(&shared.gateway, process_id, secret_key).await;
                return Ok(None);
            }
            StartupPacket::Startup { major, minor, params } => {
                check_owner(&owner, shared.owner)?;
                if major != 3 {
                    return Err(refuse(
                        "0A000",
                        format!("unsupported frontend protocol {major}.{minor}: Sluice supports 3.0"),
                    ));
                }
                let unrecognized: Vec<&str> = params
                    .iter()
                    .map(|(name, _)| *name)
                    .filter(|name| name.starts_with("_pq_."))
                    .collect();
                if minor > 0 || !unrecognized.is_empty() {
                    // The gateway speaks 3.0: say so here, since it only
                    // ever hears 3.0 from the tunnel.
                    let mut out = BytesMut::new();
                    backend::encode_negotiate_protocol_version(0, &unrecognized, &mut out);
                    if client.send(&out).await.is_err() {
                        return Ok(None);
                    }
                }
                break startup_params(&params, &shared.target)?;
            }
        }
    };

    let token = shared.tokens.token().await.map_err(|reason| {
        refuse("28000", format!("sluice connect has no usable token: {reason}"))
            .with_hint("run sluice login, then connect again (the tunnel can stay up)")
    })?;
    let unavailable = |reason: String| {
        refuse("08001", reason).with_hint("check that the gateway runs and that sluice connect --gateway points at it")
    };
    let stream = shared.gateway.open().await.map_err(unavailable)?;
    let mut gateway = Connection::new(stream);
    let mut out = BytesMut::new();
    frontend::encode_startup(params.iter().map(|(k, v)| (k.as_str(), v.as_str())), &mut out);
    gateway
        .send(&out)
        .await
        .map_err(|err| unavailable(format!("the gateway closed the connection: {err}")))?;
    // Until AuthenticationOk: answer the password request with the token;
    // pass on anything else the client should see.
    loop {
        let message = gateway
            .read_message(MAX_LOGIN_MESSAGE)
            .await
            .map_err(|err| unavailable(format!("the gateway ended the login: {err}")))?;
        if message.tag != tag::AUTHENTICATION {
            relay(client, &message).await;
            if message.tag == tag::ERROR_RESPONSE {
                // The gateway refused (a FATAL with its reason): the client
                // has it, and the gateway closes.
                return Ok(None);
            }
            continue;
        }
        match Authentication::decode(&message.body) {
            Ok(Authentication::CleartextPassword) => {
                let mut out = BytesMut::new();
                frontend::encode_password(&token, &mut out);
                gateway
                    .send(&out)
                    .await
                    .map_err(|err| unavailable(format!("the gateway closed the connection: {err}")))?;
            }
            Ok(Authentication::Ok) => {
                relay(client, &message).await;
                return Ok(Some(gateway));
            }
            Ok(_) | Err(_) => {
                return Err(unavailable(format!(
                    "{} asked for a kind of authentication a Sluice gateway never asks for: is it a Sluice gateway?",
                    shared.gateway.address()
                )));
            }
        }
    }
}

/// Passes one message from the gateway to the client as it came.
async fn relay(client: &mut Connection, message: &Message) {
    let mut out = BytesMut::with_capacity(message.body.len() + 5);
    out.extend_from_slice(&[message.tag]);
    out.extend_from_slice(&((message.body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&message.body);
    // A client gone now is nobody's to tell.
    let _ = client.send(&out).await;
}

fn check_owner(owner: &Result<u32, String>, us: u32) -> Result<(), ErrorFields> {
    match owner {
        Ok(uid) if *uid == us => Ok(()),
        Ok(uid) => Err(refuse(
            "28000",
            format!("this sluice connect tunnel belongs to uid {us}; connections from uid {uid} are refused"),
        )
        .with_hint("run your own tunnel: sluice login, then sluice connect TARGET")),
        Err(reason) => Err(refuse(
            "28000",
            format!("this sluice connect tunnel cannot tell which user is connecting ({reason}), so it refuses"),
        )),
    }
}

/// The parameters sent on to the gateway: the client's, with the database
/// set to the tunnel's target. A client that names another database is
/// refused rather than quietly connected somewhere it did not ask for;
/// naming none (libpq then uses the user name) means the target.
fn startup_params(params: &[(&str, &str)], target: &str) -> Result<Vec<(String, String)>, ErrorFields> {
    let user = params.iter().find(|(k, _)| *k == "user").map(|(_, v)| *v).unwrap_or("");
    let mut out = Vec::with_capacity(params.len() + 1);
    for &(name, value) in params {
        if name.starts_with("_pq_.") {
            continue;
        }
        if name == "database" {
            if !value.is_empty() && value != target && value != user {
                return Err(refuse(
                    "3D000",
                    format!("this tunnel is for target \"{target}\", not \"{value}\""),
                )
                .with_hint(format!(
                    "use dbname={target}, or run another tunnel: sluice connect {value} --port N"
                )));
            }
            continue;
        }
        out.push((name.to_string(), value.to_string()));
    }
    if user.is_empty() {
        // The gateway wants a user name (identity comes from the token).
        out.push((
            "user".to_string(),
            std::env::var("USER").unwrap_or_else(|_| "sluice".into()),
        ));
    }
    out.push(("database".to_string(), target.to_string()));
    Ok(out)
}

/// Passes a CancelRequest on to the gateway, which knows the key.
async fn forward_cancel(gateway: &Gateway, process_id: i32, secret_key: i32) {
    let Ok(mut stream) = gateway.open().await else {
        tracing::warn!("cannot forward a cancel request: the gateway is unreachable");
        return;
    };
    let mut out = BytesMut::new();
    frontend::encode_cancel_request(process_id, secret_key, &mut out);
    if stream.write_all(&out).await.is_ok() {
        let _ = stream.flush().await;
        // The gateway closes once it has the request; wait for that, so the
        // cancel lands before the client hears back.
        let mut sink = [0u8; 16];
        let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read(&mut sink)).await;
    }
}

/// The uid owning the client end of a loopback TCP connection: the socket
/// whose local address is `peer` and remote address is our `local`.
#[cfg(target_os = "linux")]
fn peer_uid(peer: SocketAddr, local: SocketAddr) -> Result<u32, String> {
    let read = |table: &str| std::fs::read_to_string(table).map_err(|err| format!("reading {table}: {err}"));
    if let (SocketAddr::V4(v4_peer), SocketAddr::V4(v4_local)) = (peer, local) {
        if let Some(uid) = find_uid(&read("/proc/net/tcp")?, peer, local) {
            return Ok(uid);
        }
        // A dual-stack socket (listening on [::]) shows IPv4 addresses as
        // ::ffff:a.b.c.d in the IPv6 table.
        let mapped = |a: std::net::SocketAddrV4| SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port());
        return find_uid(&read("/proc/net/tcp6")?, mapped(v4_peer), mapped(v4_local))
            .ok_or_else(|| format!("no entry for {peer} in /proc/net/tcp or /proc/net/tcp6"));
    }
    find_uid(&read("/proc/net/tcp6")?, peer, local).ok_or_else(|| format!("no entry for {peer} in /proc/net/tcp6"))
}

#[cfg(not(target_os = "linux"))]
fn peer_uid(_peer: SocketAddr, _local: SocketAddr) -> Result<u32, String> {
    Err("this operating system does not say which user owns a TCP connection".to_string())
}

/// Whether this OS lets the tunnel check who connects (the tunnel
/// refuses every connection where it cannot).
pub const CHECKS_PEER_USER: bool = cfg!(target_os = "linux");

/// Finds the uid column of the `/proc/net/tcp{,6}` line for the socket
/// `local` → `remote` (as the kernel prints addresses: each 32-bit word
/// in host byte order, in hex; the port in hex).
fn find_uid(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let (local, remote) = (proc_address(local), proc_address(remote));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 7 && fields[1].eq_ignore_ascii_case(&local) && fields[2].eq_ignore_ascii_case(&remote))
            .then(|| fields[7].parse().ok())
            .flatten()
    })
}

fn proc_address(addr: SocketAddr) -> String {
    let ip = match addr {
        SocketAddr::V4(v4) => format!("{:08X}", u32::from_ne_bytes(v4.ip().octets())),
        SocketAddr::V6(v6) => v6
            .ip()
            .octets()
            .chunks(4)
            .map(|word| format!("{:08X}", u32::from_ne_bytes([word[0], word[1], word[2], word[3]])))
            .collect(),
    };
    format!("{ip}:{:04X}", addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_the_tunnels_target() {
        let params = startup_params(&[("user", "dana"), ("database", "dana")], "shop").unwrap();
        assert_eq!(
            params,
            [("user".into(), "dana".into()), ("database".into(), "shop".into())]
        );
        let params = startup_params(&[("user", "dana"), ("application_name", "psql")], "shop").unwrap();
        assert_eq!(params.last().unwrap(), &("database".to_string(), "shop".to_string()));
        assert!(startup_params(&[("user", "dana"), ("database", "shop")], "shop").is_ok());
        let refused = startup_params(&[("user", "dana"), ("database", "billing")], "shop").unwrap_err();
        assert_eq!(refused.code, "3D000");
        assert!(
            refused.message.contains("\"shop\", not \"billing\""),
            "{}",
            refused.message
        );
        let params = startup_params(&[("user", "dana"), ("_pq_.x", "1")], "shop").unwrap();
        assert!(params.iter().all(|(k, _)| !k.starts_with("_pq_.")));
    }

    #[test]
    fn proc_net_tcp_lines_are_matched_both_ways() {
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:6543".parse().unwrap();
        let (p, l) = (proc_address(peer), proc_address(local));
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {l} {p} 01 00000000:00000000 00:00000000 00000000  1000 0 1\n\
             1: {p} {l} 01 00000000:00000000 00:00000000 00000000  1001 0 2\n"
        );
        // The client's socket is the one whose local address is the peer.
        assert_eq!(find_uid(&table, peer, local), Some(1001));
        assert_eq!(find_uid(&table, local, peer), Some(1000));
        assert_eq!(find_uid(&table, "127.0.0.1:1".parse().unwrap(), local), None);
        if cfg!(target_endian = "little") {
            // As the kernel prints them (x86-64 and arm64 are little-endian).
            assert_eq!(p, "0100007F:9C40");
            let v6: SocketAddr = "[::1]:6543".parse().unwrap();
            assert_eq!(proc_address(v6), "00000000000000000000000001000000:198F");
        }
    }

    #[test]
    fn the_owner_check_fails_closed() {
        assert!(check_owner(&Ok(1000), 1000).is_ok());
        let other = check_owner(&Ok(1001), 1000).unwrap_err();
        assert!(other.message.contains("uid 1001 are refused"), "{}", other.message);
        assert!(check_owner(&Err("no entry".into()), 1000).is_err());
    }
}
