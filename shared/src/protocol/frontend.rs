//! Frontend (client to server) messages: decoders for the ones the gateway
//! reads, encoders for the ones it sends upstream on its own behalf.

use bytes::BytesMut;

use super::codec::MessageBuilder;
use super::cursor::{Cursor, DecodeError};
use super::{CANCEL_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE};

/// The longest prepared statement or portal name PostgreSQL tells apart
/// (NAMEDATALEN - 1): it keys both by their first 63 bytes, and shortens
/// longer SQL identifiers to as many whole characters.
pub const MAX_NAME_BYTES: usize = 63;

/// Message type bytes sent by clients.
pub mod tag {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const TERMINATE: u8 = b'X';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const FUNCTION_CALL: u8 = b'F';
    /// PasswordMessage, SASLInitialResponse and SASLResponse share this tag.
    pub const PASSWORD: u8 = b'p';
}

/// A simple Query: one string that may hold several statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    pub sql: &'a str,
}

impl<'a> Query<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Query<'a>, DecodeError> {
        let mut cur = Cursor::new(body);
        let sql = cur.cstr("query")?;
        cur.finish()?;
        Ok(Query { sql })
    }

    pub fn encode(sql: &str, out: &mut BytesMut) {
        MessageBuilder::new(out, tag::QUERY).cstr(sql).finish();
    }
}

/// Parse: prepares one statement under a name (empty for the unnamed one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a str,
    pub sql: &'a str,
    /// Number of parameter type OIDs the client specified.
    pub param_type_count: usize,
}

impl<'a> Parse<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Parse<'a>, DecodeError> {
        let mut cur = Cursor::new(body);
        let name = cur.cstr("statement name")?;
        let sql = cur.cstr("query")?;
        let param_type_count = cur.count16("parameter type count")?;
        cur.bytes(param_type_count * 4, "parameter types")?;
        cur.finish()?;
        Ok(Parse {
            name,
            sql,
            param_type_count,
        })
    }

    /// Encodes a Parse without parameter types.
    pub fn encode(name: &str, sql: &str, out: &mut BytesMut) {
        MessageBuilder::new(out, tag::PARSE)
            .cstr(name)
            .cstr(sql)
            .i16(0)
            .finish();
    }
}

/// The PasswordMessage a client sends after AuthenticationCleartextPassword.
/// Sluice reads the password as a bearer token.
pub fn decode_password(body: &[u8]) -> Result<&str, DecodeError> {
    let mut cur = Cursor::new(body);
    let password = cur.cstr("password")?;
    cur.finish()?;
    Ok(password)
}

/// A StartupMessage for protocol 3.0 with the given parameters.
pub fn encode_startup<'p>(params: impl IntoIterator<Item = (&'p str, &'p str)>, out: &mut BytesMut) {
    let mut msg = MessageBuilder::untyped(out);
    msg.i32(PROTOCOL_3_0);
    for (name, value) in params {
        msg.cstr(name).cstr(value);
    }
    msg.u8(0).finish();
}

/// An SSLRequest packet.
pub fn encode_ssl_request(out: &mut BytesMut) {
    MessageBuilder::untyped(out).i32(SSL_REQUEST_CODE).finish();
}

/// A CancelRequest packet for a backend.
pub fn encode_cancel_request(process_id: i32, secret_key: i32, out: &mut BytesMut) {
    MessageBuilder::untyped(out)
        .i32(CANCEL_REQUEST_CODE)
        .i32(process_id)
        .i32(secret_key)
        .finish();
}

/// A cleartext or md5 PasswordMessage.
pub fn encode_password(password: &str, out: &mut BytesMut) {
    MessageBuilder::new(out, tag::PASSWORD).cstr(password).finish();
}

/// The SASLInitialResponse that opens a SCRAM exchange.
pub fn encode_sasl_initial(mechanism: &str, data: &[u8], out: &mut BytesMut) {
    MessageBuilder::new(out, tag::PASSWORD)
        .cstr(mechanism)
        .i32(data.len() as i32)
        .bytes(data)
        .finish();
}

/// A SASLResponse continuing a SCRAM exchange.
pub fn encode_sasl_response(data: &[u8], out: &mut BytesMut) {
    MessageBuilder::new(out, tag::PASSWORD).bytes(data).finish();
}

/// Flush: asks the server to send what it has.
/// Describe of a portal (`kind` b'P') or prepared statement (b'S').
pub fn encode_describe(kind: u8, name: &str, out: &mut BytesMut) {
    MessageBuilder::new(out, tag::DESCRIBE).u8(kind).cstr(name).finish();
}

pub fn encode_flush(out: &mut BytesMut) {
    MessageBuilder::new(out, tag::FLUSH).finish();
}

/// Terminate.
pub fn encode_terminate(out: &mut BytesMut) {
    MessageBuilder::new(out, tag::TERMINATE).finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_round_trip() {
        let mut buf = BytesMut::new();
        Query::encode("SELECT 1", &mut buf);
        assert_eq!(buf[0], tag::QUERY);
        assert_eq!(Query::decode(&buf[5..]).unwrap().sql, "SELECT 1");
    }

    #[test]
    fn parse_round_trip_and_validation() {
        let mut buf = BytesMut::new();
        Parse::encode("s1", "SELECT $1", &mut buf);
        let parse = Parse::decode(&buf[5..]).unwrap();
        assert_eq!((parse.name, parse.sql, parse.param_type_count), ("s1", "SELECT $1", 0));

        // Claims three parameter types but carries one.
        let body = b"s1\0SELECT $1\0\x00\x03\x00\x00\x00\x17";
        assert_eq!(
            Parse::decode(body),
            Err(DecodeError::Truncated {
                field: "parameter types"
            })
        );
    }

    #[test]
    fn query_with_trailing_garbage_is_rejected() {
        assert_eq!(
            Query::decode(b"SELECT 1\0DROP TABLE t\0"),
            Err(DecodeError::TrailingBytes { extra: 13 })
        );
    }

    #[test]
    fn startup_layout() {
        let mut buf = BytesMut::new();
        encode_startup([("user", "u"), ("database", "d")], &mut buf);
        assert_eq!(&buf[..], b"\0\0\0\x1b\0\x03\0\0user\0u\0database\0d\0\0");
    }
}
