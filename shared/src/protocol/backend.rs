//! Backend (server to client) messages: decoders for the ones the gateway
//! reads from upstream, encoders for the ones it sends clients itself.

use bytes::BytesMut;

use super::TxStatus;
use super::codec::MessageBuilder;
use super::cursor::{Cursor, DecodeError};

/// Message type bytes sent by servers.
pub mod tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const DATA_ROW: u8 = b'D';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    pub const NO_DATA: u8 = b'n';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ROW_DESCRIPTION: u8 = b'T';
}

/// An Authentication request from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication<'a> {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    /// SASL with the mechanisms the server offers.
    Sasl {
        mechanisms: Vec<&'a str>,
    },
    SaslContinue {
        data: &'a [u8],
    },
    SaslFinal {
        data: &'a [u8],
    },
    /// Kerberos, GSSAPI, SSPI: not supported by the gateway's upstream side.
    Unsupported {
        code: i32,
    },
}

impl<'a> Authentication<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Authentication<'a>, DecodeError> {
        let mut cur = Cursor::new(body);
        let code = cur.i32("authentication code")?;
        let auth = match code {
            0 => Authentication::Ok,
            3 => Authentication::CleartextPassword,
            5 => {
                let salt = cur.bytes(4, "md5 salt")?;
                Authentication::Md5Password {
                    salt: [salt[0], salt[1], salt[2], salt[3]],
                }
            }
            10 => {
                let mut mechanisms = Vec::new();
                loop {
                    let mechanism = cur.cstr("SASL mechanism")?;
                    if mechanism.is_empty() {
                        break;
                    }
                    mechanisms.push(mechanism);
                }
                Authentication::Sasl { mechanisms }
            }
            11 => Authentication::SaslContinue { data: cur.remaining() },
            12 => Authentication::SaslFinal { data: cur.remaining() },
            code => Authentication::Unsupported { code },
        };
        Ok(auth)
    }
}

/// AuthenticationOk.
pub fn encode_auth_ok(out: &mut BytesMut) {
    MessageBuilder::new(out, tag::AUTHENTICATION).i32(0).finish();
}

/// AuthenticationCleartextPassword: asks the client for its token.
pub fn encode_auth_cleartext(out: &mut BytesMut) {
    MessageBuilder::new(out, tag::AUTHENTICATION).i32(3).finish();
}

/// BackendKeyData.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKeyData {
    pub process_id: i32,
    pub secret_key: i32,
}

impl BackendKeyData {
    pub fn decode(body: &[u8]) -> Result<BackendKeyData, DecodeError> {
        let mut cur = Cursor::new(body);
        let process_id = cur.i32("process id")?;
        let secret_key = cur.i32("secret key")?;
        cur.finish()?;
        Ok(BackendKeyData { process_id, secret_key })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        MessageBuilder::new(out, tag::BACKEND_KEY_DATA)
            .i32(self.process_id)
            .i32(self.secret_key)
            .finish();
    }
}

/// ParameterStatus: a run-time parameter the server reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterStatus<'a> {
    pub name: &'a str,
    pub value: &'a str,
}

impl<'a> ParameterStatus<'a> {
    pub fn decode(body: &'a [u8]) -> Result<ParameterStatus<'a>, DecodeError> {
        let mut cur = Cursor::new(body);
        let name = cur.cstr("parameter name")?;
        let value = cur.cstr("parameter value")?;
        cur.finish()?;
        Ok(ParameterStatus { name, value })
    }
}

/// ReadyForQuery's transaction status.
pub fn decode_ready_for_query(body: &[u8]) -> Result<TxStatus, DecodeError> {
    let mut cur = Cursor::new(body);
    let byte = cur.u8("transaction status")?;
    cur.finish()?;
    TxStatus::from_byte(byte).ok_or(DecodeError::BadValue {
        field: "transaction status",
        value: byte.into(),
    })
}

/// ReadyForQuery.
pub fn encode_ready_for_query(status: TxStatus, out: &mut BytesMut) {
    MessageBuilder::new(out, tag::READY_FOR_QUERY)
        .u8(status.as_byte())
        .finish();
}

/// NegotiateProtocolVersion: tells a client asking for 3.x (x > 0) that the
/// gateway speaks 3.0 and which `_pq_.` options it did not recognise.
pub fn encode_negotiate_protocol_version(newest_minor: i32, unrecognized: &[&str], out: &mut BytesMut) {
    let mut msg = MessageBuilder::new(out, tag::NEGOTIATE_PROTOCOL_VERSION);
    msg.i32(newest_minor).i32(unrecognized.len() as i32);
    for option in unrecognized {
        msg.cstr(option);
    }
    msg.finish();
}

/// Severity of an error or notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Ends the statement; the session stays usable.
    Error,
    /// Ends the session.
    Fatal,
    Notice,
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
            Severity::Warning => "WARNING",
        }
    }
}

/// An ErrorResponse or NoticeResponse the gateway writes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: Severity,
    /// SQLSTATE code, five characters.
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorFields {
    pub fn new(severity: Severity, code: &'static str, message: impl Into<String>) -> ErrorFields {
        ErrorFields {
            severity,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> ErrorFields {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> ErrorFields {
        self.hint = Some(hint.into());
        self
    }

    /// Encodes as ErrorResponse (errors, fatals) or NoticeResponse (notices, warnings).
    pub fn encode(&self, out: &mut BytesMut) {
        let tag = match self.severity {
            Severity::Error | Severity::Fatal => tag::ERROR_RESPONSE,
            Severity::Notice | Severity::Warning => tag::NOTICE_RESPONSE,
        };
        let mut msg = MessageBuilder::new(out, tag);
        let severity = self.severity.as_str();
        msg.u8(b'S').cstr(severity).u8(b'V').cstr(severity);
        msg.u8(b'C').cstr(self.code).u8(b'M').cstr(&self.message);
        if let Some(detail) = &self.detail {
            msg.u8(b'D').cstr(detail);
        }
        if let Some(hint) = &self.hint {
            msg.u8(b'H').cstr(hint);
        }
        msg.u8(0).finish();
    }
}

/// The fields of an ErrorResponse or NoticeResponse received from upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceivedError<'a> {
    pub severity: &'a str,
    pub code: &'a str,
    pub message: &'a str,
}

impl<'a> ReceivedError<'a> {
    pub fn decode(body: &'a [u8]) -> Result<ReceivedError<'a>, DecodeError> {
        let mut cur = Cursor::new(body);
        let mut error = ReceivedError::default();
        loop {
            let field = cur.u8("error field type")?;
            if field == 0 {
                break;
            }
            let value = cur.cstr("error field")?;
            match field {
                b'V' => error.severity = value,
                b'S' if error.severity.is_empty() => error.severity = value,
                b'C' => error.code = value,
                b'M' => error.message = value,
                _ => {}
            }
        }
        Ok(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_round_trip() {
        let mut buf = BytesMut::new();
        ErrorFields::new(Severity::Fatal, "28P01", "token expired")
            .with_hint("run sluice login")
            .encode(&mut buf);
        assert_eq!(buf[0], tag::ERROR_RESPONSE);
        let got = ReceivedError::decode(&buf[5..]).unwrap();
        assert_eq!(got.severity, "FATAL");
        assert_eq!(got.code, "28P01");
        assert_eq!(got.message, "token expired");
    }

    #[test]
    fn notice_uses_notice_tag() {
        let mut buf = BytesMut::new();
        ErrorFields::new(Severity::Notice, "00000", "hello").encode(&mut buf);
        assert_eq!(buf[0], tag::NOTICE_RESPONSE);
    }

    #[test]
    fn authentication_requests() {
        assert_eq!(
            Authentication::decode(b"\0\0\0\x05abcd").unwrap(),
            Authentication::Md5Password { salt: *b"abcd" }
        );
        assert_eq!(
            Authentication::decode(b"\0\0\0\x0aSCRAM-SHA-256\0\0").unwrap(),
            Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256"]
            }
        );
        assert!(Authentication::decode(b"\0\0\0\x05ab").is_err());
    }

    #[test]
    fn ready_for_query_status() {
        assert_eq!(decode_ready_for_query(b"T"), Ok(TxStatus::InTransaction));
        assert!(decode_ready_for_query(b"X").is_err());
    }
}
