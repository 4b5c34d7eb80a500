//! A client that speaks the protocol byte by byte, for what real drivers never
//! send: garbage, truncated and oversized messages, old protocol versions,
//! hand-built pipelines and fastpath calls.

use std::collections::HashMap;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A typed message: tag and body.
pub type Msg = (u8, Vec<u8>);

/// Builds a typed message.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A NUL-terminated string.
pub fn cstr(s: &str) -> Vec<u8> {
    let mut out = s.as_bytes().to_vec();
    out.push(0);
    out
}

pub fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cstr(sql))
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = cstr(name);
    body.extend(cstr(sql));
    body.extend(0i16.to_be_bytes());
    msg(b'P', &body)
}

/// Bind with no parameters and text results.
pub fn bind(portal: &str, statement: &str) -> Vec<u8> {
    let mut body = cstr(portal);
    body.extend(cstr(statement));
    body.extend([0, 0, 0, 0, 0, 0]);
    msg(b'B', &body)
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut body = cstr(portal);
    body.extend(max_rows.to_be_bytes());
    msg(b'E', &body)
}

/// Close of a prepared statement (`b'S'`) or a portal (`b'P'`).
pub fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    body.extend(cstr(name));
    msg(b'C', &body)
}

pub fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

/// A Parse of `name`, then Sync: a statement prepared on its own.
pub fn prepare(name: &str, sql: &str) -> Vec<u8> {
    [parse(name, sql), sync()].concat()
}

/// Statement `name` bound to the unnamed portal and executed for up to
/// `max_rows` rows (0: all), then Sync.
pub fn run(name: &str, max_rows: i32) -> Vec<u8> {
    [bind("", name), execute("", max_rows), sync()].concat()
}

/// `sql` through the unnamed statement and portal, then Sync: one
/// statement as drivers send it (JDBC asks for 1 row when it wants none).
pub fn unnamed(sql: &str, max_rows: i32) -> Vec<u8> {
    [parse("", sql), run("", max_rows)].concat()
}

/// A statement that fails, without Sync: `SELECT 1/0` through the unnamed
/// statement and portal. PostgreSQL fails it at the Bind (it folds the
/// constant when planning) and then skips every message up to the next
/// Sync, a Query's too.
pub fn failing() -> Vec<u8> {
    [parse("", "SELECT 1/0"), bind("", ""), execute("", 0)].concat()
}

pub fn flush() -> Vec<u8> {
    msg(b'H', &[])
}

/// An untyped startup packet.
pub fn startup_packet(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend(cstr(k));
        body.extend(cstr(v));
    }
    body.push(0);
    let mut out = (body.len() as i32 + 4).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// The fields of an ErrorResponse or NoticeResponse body.
pub fn fields(body: &[u8]) -> HashMap<char, String> {
    let mut out = HashMap::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        out.insert(code as char, String::from_utf8_lossy(&tail[..end]).into_owned());
        rest = &tail[(end + 1).min(tail.len())..];
    }
    out
}

/// The columns of a DataRow body, as text.
pub fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let mut buf = body;
    let n = buf.get_i16();
    (0..n)
        .map(|_| {
            let len = buf.get_i32();
            if len < 0 {
                return None;
            }
            let value = String::from_utf8_lossy(&buf[..len as usize]).into_owned();
            buf.advance(len as usize);
            Some(value)
        })
        .collect()
}

pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
}

/// What the gateway said after a successful login.
pub struct Greeting {
    pub process_id: i32,
    pub secret_key: i32,
    pub params: HashMap<String, String>,
}

impl RawClient {
    pub async fn connect(addr: std::net::SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect to gateway");
        RawClient {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Closes the sending side, as a client that stops mid-message.
    pub async fn close_write(&mut self) {
        self.stream.shutdown().await.expect("shutdown");
    }

    /// Sends a 3.0 startup for `db` and the token, and reads the greeting.
    pub async fn login(&mut self, db: &str, token: &str) -> Greeting {
        self.send(&startup_packet(196_608, &[("user", "raw"), ("database", db)]))
            .await;
        let (tag, body) = self.recv().await.expect("auth request");
        assert_eq!(
            (tag, &body[..]),
            (b'R', &[0, 0, 0, 3][..]),
            "expected a cleartext password request"
        );
        self.send(&msg(b'p', &cstr(token))).await;
        self.greeting().await
    }

    /// Reads AuthenticationOk .. ReadyForQuery.
    pub async fn greeting(&mut self) -> Greeting {
        let mut greeting = Greeting {
            process_id: 0,
            secret_key: 0,
            params: HashMap::new(),
        };
        for (tag, body) in self.until_ready().await {
            match tag {
                b'K' => {
                    let mut b = &body[..];
                    greeting.process_id = b.get_i32();
                    greeting.secret_key = b.get_i32();
                }
                b'S' => {
                    let parts: Vec<&[u8]> = body.split(|&b| b == 0).collect();
                    greeting.params.insert(
                        String::from_utf8_lossy(parts[0]).into_owned(),
                        String::from_utf8_lossy(parts[1]).into_owned(),
                    );
                }
                b'E' => panic!("login failed: {:?}", fields(&body)),
                _ => {}
            }
        }
        greeting
    }

    /// The next message, or `None` once the gateway closed the connection.
    pub async fn recv(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    let body = self.buf[5..1 + len].to_vec();
                    self.buf.advance(1 + len);
                    return Some((tag, body));
                }
            }
            let n = tokio::time::timeout(super::PATIENCE, self.stream.read_buf(&mut self.buf))
                .await
                .expect("timed out waiting for the gateway")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// Reads one raw byte (the answer to SSLRequest or GSSENCRequest).
    pub async fn recv_byte(&mut self) -> u8 {
        if self.buf.is_empty() {
            self.stream.read_buf(&mut self.buf).await.expect("read");
        }
        self.buf.get_u8()
    }

    /// Messages up to and including ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let message = self.recv().await.expect("connection closed before ReadyForQuery");
            let done = message.0 == b'Z';
            out.push(message);
            if done {
                return out;
            }
        }
    }

    /// Reads until the connection closes, returning everything received.
    pub async fn until_closed(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(message) = self.recv().await {
            out.push(message);
        }
        out
    }

    /// Sends `sql` as a simple Query and returns the rows of its result.
    pub async fn simple(&mut self, sql: &str) -> Vec<Vec<Option<String>>> {
        self.send(&query(sql)).await;
        let messages = self.until_ready().await;
        if let Some((_, body)) = messages.iter().find(|(t, _)| *t == b'E') {
            panic!("{sql}: {:?}", fields(body));
        }
        messages
            .iter()
            .filter(|(t, _)| *t == b'D')
            .map(|(_, body)| data_row(body))
            .collect()
    }
}

/// The tags of a message list, as a string ("12CZ").
pub fn tags(messages: &[Msg]) -> String {
    messages.iter().map(|(t, _)| *t as char).collect()
}

/// The first ErrorResponse's fields.
pub fn first_error(messages: &[Msg]) -> HashMap<char, String> {
    messages
        .iter()
        .find(|(t, _)| *t == b'E')
        .map(|(_, body)| fields(body))
        .unwrap_or_else(|| panic!("no ErrorResponse in {}", tags(messages)))
}
