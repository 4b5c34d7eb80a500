//! A connection that owns its stream and read buffer and hands out whole
//! messages. Used for the handshakes on both sides (client startup and upstream
//! login); the proxy loop then takes the stream and buffer apart with
//! [`Connection::into_parts`] and does its own non-blocking IO.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::Stream;
use crate::protocol::startup::{StartupError, packet_len};
use crate::protocol::{FrameError, codec};

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection closed by the peer")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Startup(#[from] StartupError),
}

/// One typed message: its tag and body.
#[derive(Debug, Clone)]
pub struct Message {
    pub tag: u8,
    pub body: Bytes,
}

pub struct Connection {
    stream: Stream,
    buf: BytesMut,
}

impl Connection {
    pub fn new(stream: Stream) -> Connection {
        Connection {
            stream,
            buf: BytesMut::with_capacity(8 * 1024),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// Whether bytes arrived beyond what was read. After an SSLRequest this
    /// must be false: bytes sent before the TLS handshake would otherwise be
    /// read as if they came over TLS (CVE-2021-23222 and CVE-2021-23214).
    pub fn has_buffered_input(&self) -> bool {
        !self.buf.is_empty()
    }

    pub fn into_parts(self) -> (Stream, BytesMut) {
        (self.stream, self.buf)
    }

    /// Replaces the stream, as after a TLS handshake.
    pub fn map_stream<F, Fut>(self, f: F) -> impl std::future::Future<Output = io::Result<Connection>>
    where
        F: FnOnce(Stream) -> Fut,
        Fut: std::future::Future<Output = io::Result<Stream>>,
    {
        let Connection { stream, buf } = self;
        async move {
            let stream = f(stream).await?;
            Ok(Connection { stream, buf })
        }
    }

    async fn fill(&mut self) -> Result<(), ConnError> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8 * 1024);
        }
        match self.stream.read_buf(&mut self.buf).await? {
            0 => Err(ConnError::Closed),
            _ => Ok(()),
        }
    }

    /// The body of the next untyped startup packet (after its length field).
    pub async fn read_startup_packet(&mut self) -> Result<Bytes, ConnError> {
        loop {
            if let Some(len) = packet_len(&self.buf)?
                && self.buf.len() >= len
            {
                let mut packet = self.buf.split_to(len);
                packet.advance(4);
                return Ok(packet.freeze());
            }
            self.fill().await?;
        }
    }

    /// The next typed message, refusing ones over `max_len` bytes (as
    /// counted by the length field).
    pub async fn read_message(&mut self, max_len: usize) -> Result<Message, ConnError> {
        loop {
            if let Some(header) = codec::peek_header(&self.buf, max_len)? {
                if self.buf.len() >= header.total_len() {
                    let mut message = self.buf.split_to(header.total_len());
                    message.advance(codec::HEADER_LEN);
                    return Ok(Message {
                        tag: header.tag,
                        body: message.freeze(),
                    });
                }
                self.buf.reserve(header.total_len() - self.buf.len());
            }
            self.fill().await?;
        }
    }

    /// Reads exactly one byte, as the answer to an SSLRequest.
    pub async fn read_byte(&mut self) -> Result<u8, ConnError> {
        if self.buf.is_empty() {
            self.fill().await?;
        }
        Ok(self.buf.get_u8())
    }

    /// Writes everything and flushes it.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Flushes and closes the write side, so the peer reads everything sent.
    pub async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}
