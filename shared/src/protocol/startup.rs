//! The untyped packets that open a connection: StartupMessage, SSLRequest,
//! GSSENCRequest and CancelRequest.

use super::cursor::{Cursor, DecodeError};
use super::{CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET, SSL_REQUEST_CODE};

/// What the first packet on a connection asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket<'a> {
    /// SSLRequest: the client wants TLS before the StartupMessage.
    SslRequest,
    /// GSSENCRequest: the client offers GSSAPI encryption.
    GssEncRequest,
    /// CancelRequest for a backend.
    Cancel { process_id: i32, secret_key: i32 },
    /// StartupMessage with its protocol version and parameters, in order.
    Startup {
        major: u16,
        minor: u16,
        params: Vec<(&'a str, &'a str)>,
    },
}

/// A startup packet that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("startup packet length {0} is outside the allowed 8..={MAX_STARTUP_PACKET} bytes")]
    BadLength(i32),
    #[error("malformed startup packet: {0}")]
    Malformed(#[from] DecodeError),
}

/// Length of the untyped packet at the start of `buf`, once its 4-byte length
/// field has arrived.
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    Ok(Some(len as usize))
}

impl<'a> StartupPacket<'a> {
    /// Decodes a packet body (after its length field).
    pub fn decode(body: &'a [u8]) -> Result<StartupPacket<'a>, StartupError> {
        let mut cur = Cursor::new(body);
        let code = cur.i32("protocol version")?;
        let packet = match code {
            SSL_REQUEST_CODE => StartupPacket::SslRequest,
            GSSENC_REQUEST_CODE => StartupPacket::GssEncRequest,
            CANCEL_REQUEST_CODE => {
                let process_id = cur.i32("process id")?;
                let secret_key = cur.i32("secret key")?;
                StartupPacket::Cancel { process_id, secret_key }
            }
            version => {
                let major = (version >> 16) as u16;
                let minor = (version & 0xffff) as u16;
                let mut params = Vec::new();
                if major == 3 {
                    loop {
                        let name = cur.cstr("parameter name")?;
                        if name.is_empty() {
                            break;
                        }
                        let value = cur.cstr("parameter value")?;
                        params.push((name, value));
                    }
                }
                return Ok(StartupPacket::Startup { major, minor, params });
            }
        };
        cur.finish()?;
        Ok(packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frontend;
    use bytes::BytesMut;

    #[test]
    fn startup_round_trip() {
        let mut buf = BytesMut::new();
        frontend::encode_startup([("user", "alice"), ("database", "shop")], &mut buf);
        let len = packet_len(&buf).unwrap().unwrap();
        assert_eq!(len, buf.len());
        assert_eq!(
            StartupPacket::decode(&buf[4..]).unwrap(),
            StartupPacket::Startup {
                major: 3,
                minor: 0,
                params: vec![("user", "alice"), ("database", "shop")]
            }
        );
    }

    #[test]
    fn cancel_and_ssl_requests() {
        let mut buf = BytesMut::new();
        frontend::encode_cancel_request(42, -7, &mut buf);
        assert_eq!(
            StartupPacket::decode(&buf[4..]).unwrap(),
            StartupPacket::Cancel {
                process_id: 42,
                secret_key: -7
            }
        );
        let mut buf = BytesMut::new();
        frontend::encode_ssl_request(&mut buf);
        assert_eq!(StartupPacket::decode(&buf[4..]).unwrap(), StartupPacket::SslRequest);
    }

    #[test]
    fn protocol_two_is_reported_not_parsed() {
        let body = [0u8, 2, 0, 0, b'x', b'y'];
        assert!(matches!(
            StartupPacket::decode(&body).unwrap(),
            StartupPacket::Startup { major: 2, .. }
        ));
    }

    #[test]
    fn lengths_are_bounded() {
        assert_eq!(packet_len(b"\x7f\xff\xff\xff"), Err(StartupError::BadLength(i32::MAX)));
        assert_eq!(packet_len(b"\0\0\0\x04"), Err(StartupError::BadLength(4)));
        assert_eq!(packet_len(b"\0\0"), Ok(None));
    }

    #[test]
    fn unterminated_parameters_are_malformed() {
        let body = b"\0\x03\0\0user\0ali";
        assert!(matches!(StartupPacket::decode(body), Err(StartupError::Malformed(_))));
    }
}
