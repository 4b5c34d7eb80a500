//! A bounds-checked reader over a message body.
//!
//! Every decoder reads through `Cursor`, so a truncated or lying message is a
//! `DecodeError` naming what was missing, never a panic or an out-of-bounds read.

use std::str;

/// What was wrong with a message body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body ended before a field that the message type requires.
    #[error("message ends before its {field} field")]
    Truncated { field: &'static str },
    /// A string field has no terminating NUL byte.
    #[error("the {field} field has no terminating NUL byte")]
    Unterminated { field: &'static str },
    /// A text field is not valid UTF-8.
    #[error("the {field} field is not valid UTF-8 (Sluice requires client_encoding UTF8)")]
    NotUtf8 { field: &'static str },
    /// A count or length field is negative or larger than the message.
    #[error("the {field} field holds an impossible value {value}")]
    BadValue { field: &'static str, value: i64 },
    /// The body has bytes left over after its last field.
    #[error("{extra} unexpected bytes after the last field")]
    TrailingBytes { extra: usize },
}

/// Reads fields from a message body front to back.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    /// Whether everything has been read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Fails unless everything has been read.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { extra: self.buf.len() })
        }
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        let (&first, rest) = self.buf.split_first().ok_or(DecodeError::Truncated { field })?;
        self.buf = rest;
        Ok(first)
    }

    pub fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        let bytes = self.bytes(2, field)?;
        Ok(i16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        let bytes = self.bytes(4, field)?;
        Ok(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// A non-negative 16-bit count.
    pub fn count16(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let value = self.i16(field)?;
        usize::try_from(value).map_err(|_| DecodeError::BadValue {
            field,
            value: value.into(),
        })
    }

    /// Exactly `len` bytes.
    pub fn bytes(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < len {
            return Err(DecodeError::Truncated { field });
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    /// A NUL-terminated byte string, without its terminator.
    pub fn cstr_bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = memchr_nul(self.buf).ok_or(DecodeError::Unterminated { field })?;
        let value = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(value)
    }

    /// A NUL-terminated UTF-8 string, without its terminator.
    pub fn cstr(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let bytes = self.cstr_bytes(field)?;
        str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8 { field })
    }

    /// A value prefixed by a 32-bit length where -1 means NULL.
    pub fn nullable_value(&mut self, field: &'static str) -> Result<Option<&'a [u8]>, DecodeError> {
        let len = self.i32(field)?;
        match len {
            -1 => Ok(None),
            len if len < 0 => Err(DecodeError::BadValue {
                field,
                value: len.into(),
            }),
            len => self.bytes(len as usize, field).map(Some),
        }
    }
}

fn memchr_nul(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_in_order() {
        let mut cur = Cursor::new(b"ab\0\x00\x01\x00\x00\x00\x02xyz");
        assert_eq!(cur.cstr("name").unwrap(), "ab");
        assert_eq!(cur.i16("count").unwrap(), 1);
        assert_eq!(cur.nullable_value("value").unwrap(), Some(&b"xy"[..]));
        assert_eq!(cur.finish(), Err(DecodeError::TrailingBytes { extra: 1 }));
    }

    #[test]
    fn truncation_is_an_error_not_a_panic() {
        let mut cur = Cursor::new(b"\x00\x00\x00\x09abc");
        assert_eq!(
            cur.nullable_value("param"),
            Err(DecodeError::Truncated { field: "param" })
        );
        let mut cur = Cursor::new(b"no terminator");
        assert_eq!(cur.cstr("query"), Err(DecodeError::Unterminated { field: "query" }));
        let mut cur = Cursor::new(b"\xff\xfe\0");
        assert_eq!(cur.cstr("query"), Err(DecodeError::NotUtf8 { field: "query" }));
    }

    #[test]
    fn negative_lengths_other_than_null_are_rejected() {
        let mut cur = Cursor::new(b"\xff\xff\xff\xfe");
        assert!(matches!(
            cur.nullable_value("param"),
            Err(DecodeError::BadValue { value: -2, .. })
        ));
        let mut cur = Cursor::new(b"\xff\xff");
        assert!(matches!(
            cur.count16("formats"),
            Err(DecodeError::BadValue { value: -1, .. })
        ));
    }
}
