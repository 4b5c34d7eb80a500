//! Framing: where one typed message ends and the next begins, and a writer that
//! fills in the length prefix of messages the gateway builds itself.

use bytes::{BufMut, BytesMut};

/// A typed message starts with a tag byte and a 32-bit length that counts itself.
pub const HEADER_LEN: usize = 5;

/// The header of one typed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The message type byte (`b'Q'`, `b'D'`, ...).
    pub tag: u8,
    /// Length of the body, excluding the tag and the length field itself.
    pub body_len: usize,
}

impl Header {
    /// Bytes the whole message occupies on the wire.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.body_len
    }
}

/// A message header that cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field is below the 4 bytes it must count.
    #[error("message type {} has an invalid length {len}", printable(*tag))]
    BadLength { tag: u8, len: i32 },
    /// The length field exceeds what this side accepts.
    #[error("message type {} of {len} bytes exceeds the limit of {max} bytes", printable(*tag))]
    TooLarge {
        tag: u8,
        /// The length field: the body plus the four bytes of the field itself.
        len: usize,
        max: usize,
    },
}

/// Renders a tag byte for a message: `'Q'` or `0x00`.
pub fn printable(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", tag as char)
    } else {
        format!("0x{tag:02x}")
    }
}

/// Reads the header at the start of `buf`, if all five bytes are there.
///
/// `max_len` bounds the length field (the body plus its own four bytes, as
/// PostgreSQL counts a message's size) so that a peer cannot make the gateway
/// reserve memory by announcing a huge message.
pub fn peek_header(buf: &[u8], max_len: usize) -> Result<Option<Header>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength { tag, len });
    }
    if len as usize > max_len {
        return Err(FrameError::TooLarge {
            tag,
            len: len as usize,
            max: max_len,
        });
    }
    Ok(Some(Header {
        tag,
        body_len: len as usize - 4,
    }))
}

/// Builds one message in place in an output buffer and patches its length.
pub struct MessageBuilder<'a> {
    buf: &'a mut BytesMut,
    start: usize,
}

impl<'a> MessageBuilder<'a> {
    /// Starts a typed message with `tag`.
    pub fn new(buf: &'a mut BytesMut, tag: u8) -> MessageBuilder<'a> {
        buf.put_u8(tag);
        let start = buf.len();
        buf.put_i32(0);
        MessageBuilder { buf, start }
    }

    /// Starts an untyped message (startup, SSLRequest, CancelRequest).
    pub fn untyped(buf: &'a mut BytesMut) -> MessageBuilder<'a> {
        let start = buf.len();
        buf.put_i32(0);
        MessageBuilder { buf, start }
    }

    pub fn u8(&mut self, value: u8) -> &mut Self {
        self.buf.put_u8(value);
        self
    }

    pub fn i16(&mut self, value: i16) -> &mut Self {
        self.buf.put_i16(value);
        self
    }

    pub fn i32(&mut self, value: i32) -> &mut Self {
        self.buf.put_i32(value);
        self
    }

    pub fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.buf.put_slice(value);
        self
    }

    /// A string followed by its NUL terminator. Interior NUL bytes are dropped,
    /// because the receiver would read them as the end of the string.
    pub fn cstr(&mut self, value: &str) -> &mut Self {
        if value.as_bytes().contains(&0) {
            self.buf.extend(value.as_bytes().iter().copied().filter(|&b| b != 0));
        } else {
            self.buf.put_slice(value.as_bytes());
        }
        self.buf.put_u8(0);
        self
    }

    /// Writes the length prefix. Messages the gateway builds are small; one
    /// over 2 GiB would be a bug, so it is clamped rather than wrapped.
    pub fn finish(&mut self) {
        let len = self.buf.len() - self.start;
        let len = i32::try_from(len).unwrap_or(i32::MAX);
        self.buf[self.start..self.start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_needs_five_bytes() {
        assert_eq!(peek_header(b"Q\0\0\0", 100), Ok(None));
        assert_eq!(
            peek_header(b"Q\0\0\0\x09", 100),
            Ok(Some(Header { tag: b'Q', body_len: 5 }))
        );
    }

    #[test]
    fn lengths_below_four_and_above_the_limit_are_rejected() {
        assert_eq!(
            peek_header(b"Q\0\0\0\x03", 100),
            Err(FrameError::BadLength { tag: b'Q', len: 3 })
        );
        // A length field of 2 GB.
        assert!(matches!(
            peek_header(b"Q\x7f\xff\xff\xff", 64 << 20),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            peek_header(b"Q\xff\xff\xff\xff", 64 << 20),
            Err(FrameError::BadLength { len: -1, .. })
        ));
    }

    #[test]
    fn builder_patches_length_and_strips_nul() {
        let mut buf = BytesMut::new();
        MessageBuilder::new(&mut buf, b'Q').cstr("a\0b").finish();
        assert_eq!(&buf[..], b"Q\0\0\0\x07ab\0");
    }

    #[test]
    fn printable_tags() {
        assert_eq!(printable(b'Q'), "'Q'");
        assert_eq!(printable(0), "0x00");
    }
}
