//! One stream type for every transport a session uses, so the session logic
//! is written once: plain TCP, Unix sockets (upstream), and TLS on either side.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A connected byte stream.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A client connection after the gateway accepted its TLS handshake.
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// An upstream connection after the gateway's TLS handshake with the server.
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Why [`request_tls`] gave no TLS stream.
#[derive(Debug)]
pub enum TlsRequestError {
    /// Writing the SSLRequest or reading the answer failed.
    Io(io::Error),
    /// The server answered N (or E): it does not offer TLS.
    Refused,
    /// The server answered something no PostgreSQL server sends.
    Unexpected(u8),
    /// The TLS handshake failed (certificate, name, protocol).
    Handshake(io::Error),
}

/// Asks a PostgreSQL server (or a gateway) for TLS as libpq does: an
/// SSLRequest, its one-byte answer, then the handshake.
pub async fn request_tls(
    mut tcp: TcpStream,
    config: std::sync::Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
) -> Result<Stream, TlsRequestError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = bytes::BytesMut::new();
    crate::protocol::frontend::encode_ssl_request(&mut request);
    tcp.write_all(&request).await.map_err(TlsRequestError::Io)?;
    // Read exactly one byte straight from the socket: anything a man in the
    // middle injects after it goes to rustls and fails the handshake,
    // instead of being read as the server's answer (CVE-2021-23222).
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(TlsRequestError::Io)?;
    match answer[0] {
        b'S' => {}
        b'N' | b'E' => return Err(TlsRequestError::Refused),
        other => return Err(TlsRequestError::Unexpected(other)),
    }
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(TlsRequestError::Handshake)?;
    Ok(Stream::ClientTls(Box::new(stream)))
}

/// Whether a host name (as written, without brackets) is this machine:
/// `localhost` or a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::ServerTls(_) | Stream::ClientTls(_))
    }
}

macro_rules! delegate {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).$method($($arg),*),
            Stream::Unix(s) => Pin::new(s).$method($($arg),*),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).$method($($arg),*),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).$method($($arg),*),
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
        }
    }
}
