//! Masking strategies: what a masked column value becomes.
//!
//! A strategy rewrites one whole value (the bytes of one field of one row)
//! and sees nothing else. It appends to a buffer the caller owns, so the row
//! rewriter can build a whole DataRow in one reused allocation, and it never
//! assumes valid UTF-8.

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What [`Strategy::Redact`] writes when configuration gives no text, and what
/// [`Strategy::Email`] writes for a value that is not an address.
pub const DEFAULT_REDACTION: &str = "[masked]";

/// Prefix of [`Strategy::Hash`] tokens, so a reader can tell a token from data.
pub const HASH_PREFIX: &str = "h:";

/// Hex digits in a hash token: 64 bits, enough that distinct values in one
/// result practically never share a token, short enough to read.
const HASH_HEX_DIGITS: usize = 16;

/// How a column value is masked.
#[derive(Debug, Clone)]
pub enum Strategy {
    /// Replace the value with fixed text, whatever it was (even empty).
    Redact { text: String },
    /// Keep the last `keep_last` characters and write one `*` for each other
    /// character; a value of `keep_last` characters or fewer is all stars.
    /// Characters are Unicode scalar values; an invalid UTF-8 sequence counts
    /// as one, as a client decoding it lossily would show it.
    Partial { keep_last: usize },
    /// Keep what follows the last `@` (`****@example.com`); after the last
    /// one, because only then can nothing before the domain survive. A value
    /// without `@` becomes [`DEFAULT_REDACTION`].
    Email,
    /// A keyed deterministic token, `h:` and 16 hex digits of
    /// HMAC-SHA256(key, value): equal values give equal tokens, so joins,
    /// `GROUP BY` and `DISTINCT` on masked columns still work, while without
    /// the key nobody can test guesses against a token.
    Hash { key: Arc<HashKey> },
    /// SQL NULL.
    Null,
}

/// What [`Strategy::apply`] produced.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masked {
    /// The masked value was appended to the buffer.
    Value,
    /// The field becomes SQL NULL; nothing was appended.
    Null,
}

impl Strategy {
    /// Appends the masked form of `value` to `out`. Empty values: redact and
    /// hash still give their text and token (an empty string is data too);
    /// partial and email leave them empty, as there is nothing to hide.
    pub fn apply(&self, value: &[u8], out: &mut Vec<u8>) -> Masked {
        match self {
            Strategy::Redact { text } => out.extend_from_slice(text.as_bytes()),
            Strategy::Partial { keep_last } => partial(value, *keep_last, out),
            Strategy::Email => email(value, out),
            Strategy::Hash { key } => key.write_token(value, out),
            Strategy::Null => return Masked::Null,
        }
        Masked::Value
    }

    /// Reads a strategy as configuration writes it: `redact`, `redact:TEXT`,
    /// `partial:N`, `email`, `hash` or `null`. `hash` takes the gateway's
    /// hash key, which lives with the other secrets, not in the rule.
    pub fn parse(spec: &str, hash_key: Option<&Arc<HashKey>>) -> Result<Strategy, StrategyError> {
        let (name, argument) = match spec.split_once(':') {
            Some((name, argument)) => (name, Some(argument)),
            None => (spec, None),
        };
        let spec = || spec.to_owned();
        match (name, argument) {
            ("redact", None) => Ok(Strategy::Redact {
                text: DEFAULT_REDACTION.to_owned(),
            }),
            ("redact", Some("")) => Err(StrategyError::RedactText { spec: spec() }),
            ("redact", Some(text)) => Ok(Strategy::Redact { text: text.to_owned() }),
            ("partial", Some(count)) => match count.parse() {
                Ok(keep_last) => Ok(Strategy::Partial { keep_last }),
                Err(_) => Err(StrategyError::PartialCount { spec: spec() }),
            },
            ("partial", None) => Err(StrategyError::PartialCount { spec: spec() }),
            ("email", None) => Ok(Strategy::Email),
            ("hash", None) => hash_key
                .map(|key| Strategy::Hash { key: Arc::clone(key) })
                .ok_or(StrategyError::MissingHashKey),
            ("null", None) => Ok(Strategy::Null),
            ("email", Some(_)) => Err(StrategyError::UnexpectedArgument {
                spec: spec(),
                name: "email",
            }),
            ("hash", Some(_)) => Err(StrategyError::UnexpectedArgument {
                spec: spec(),
                name: "hash",
            }),
            ("null", Some(_)) => Err(StrategyError::UnexpectedArgument {
                spec: spec(),
                name: "null",
            }),
            _ => Err(StrategyError::Unknown { spec: spec() }),
        }
    }
}

/// The configuration spelling, as [`Strategy::parse`] reads it; audit records
/// name strategies this way. A hash key is never shown.
impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::Redact { text } if text == DEFAULT_REDACTION => f.write_str("redact"),
            Strategy::Redact { text } => write!(f, "redact:{text}"),
            Strategy::Partial { keep_last } => write!(f, "partial:{keep_last}"),
            Strategy::Email => f.write_str("email"),
            Strategy::Hash { .. } => f.write_str("hash"),
            Strategy::Null => f.write_str("null"),
        }
    }
}

/// Why a strategy or hash key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrategyError {
    #[error(
        "unknown masking strategy `{spec}`: write one of `redact`, `redact:TEXT`, `partial:N`, `email`, `hash` or `null`"
    )]
    Unknown { spec: String },
    #[error("masking strategy `{spec}` needs the number of characters to keep, as in `partial:4`")]
    PartialCount { spec: String },
    #[error(
        "masking strategy `{spec}` needs the replacement text after the colon, as in `redact:hidden`, or write `redact` for `{DEFAULT_REDACTION}`"
    )]
    RedactText { spec: String },
    #[error("masking strategy `{spec}` takes no argument: write `{name}`")]
    UnexpectedArgument { spec: String, name: &'static str },
    #[error("masking strategy `hash` needs a masking hash key, and none is configured")]
    MissingHashKey,
    #[error(
        "a masking hash key must be at least {min} bytes, this one has {len}: generate one with `openssl rand -hex 32`",
        min = HashKey::MIN_LEN
    )]
    ShortHashKey { len: usize },
}

/// The secret behind [`Strategy::Hash`]. Holds the HMAC state already keyed,
/// so that each value costs two SHA-256 compressions, not four. Its `Debug`
/// never shows the key.
#[derive(Clone)]
pub struct HashKey {
    mac: Hmac<Sha256>,
}

impl HashKey {
    /// Shortest key accepted: a short key could be found by trying keys
    /// against a token whose value is known.
    pub const MIN_LEN: usize = 16;

    pub fn new(key: &[u8]) -> Result<HashKey, StrategyError> {
        if key.len() < HashKey::MIN_LEN {
            return Err(StrategyError::ShortHashKey { len: key.len() });
        }
        // HMAC takes keys of any length (longer ones are hashed), so this
        // cannot fail for any input.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
        Ok(HashKey { mac })
    }

    fn write_token(&self, value: &[u8], out: &mut Vec<u8>) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut mac = self.mac.clone();
        mac.update(value);
        let tag = mac.finalize().into_bytes();
        out.extend_from_slice(HASH_PREFIX.as_bytes());
        for &byte in &tag[..HASH_HEX_DIGITS / 2] {
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0x0f)]);
        }
    }
}

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashKey(..)")
    }
}

fn partial(value: &[u8], keep_last: usize, out: &mut Vec<u8>) {
    let total = char_starts(value).count();
    let hidden = if total <= keep_last { total } else { total - keep_last };
    let kept_from = char_starts(value).nth(hidden).unwrap_or(value.len());
    out.resize(out.len() + hidden, b'*');
    out.extend_from_slice(&value[kept_from..]);
}

/// The byte offset where each character of `value` starts, an invalid UTF-8
/// sequence counting as one character.
fn char_starts(value: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut chunk_at = 0;
    value.utf8_chunks().flat_map(move |chunk| {
        let start = chunk_at;
        let valid = chunk.valid();
        let invalid_at = start + valid.len();
        chunk_at = invalid_at + chunk.invalid().len();
        valid
            .char_indices()
            .map(move |(offset, _)| start + offset)
            .chain((!chunk.invalid().is_empty()).then_some(invalid_at))
    })
}

fn email(value: &[u8], out: &mut Vec<u8>) {
    if value.is_empty() {
        return;
    }
    match value.iter().rposition(|&b| b == b'@') {
        Some(at) => {
            out.extend_from_slice(b"****");
            out.extend_from_slice(&value[at..]);
        }
        None => out.extend_from_slice(DEFAULT_REDACTION.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn key(bytes: &[u8]) -> Arc<HashKey> {
        Arc::new(HashKey::new(bytes).expect("long enough"))
    }

    /// The masked bytes of `value`, or `None` for NULL.
    fn apply(strategy: &Strategy, value: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match strategy.apply(value, &mut out) {
            Masked::Value => Some(out),
            Masked::Null => {
                assert!(out.is_empty(), "NULL writes nothing");
                None
            }
        }
    }

    fn apply_str(strategy: &Strategy, value: &str) -> String {
        String::from_utf8(apply(strategy, value.as_bytes()).expect("a value")).expect("UTF-8 in, UTF-8 out")
    }

    fn partial(keep_last: usize) -> Strategy {
        Strategy::Partial { keep_last }
    }

    #[test]
    fn redact_replaces_any_value_with_its_text() {
        let redact = Strategy::parse("redact", None).unwrap();
        assert_eq!(apply_str(&redact, "123-45-6789"), "[masked]");
        assert_eq!(apply_str(&redact, ""), "[masked]");
        let custom = Strategy::Redact {
            text: "REDACTED".to_owned(),
        };
        assert_eq!(apply(&custom, b"\xff\xfe"), Some(b"REDACTED".to_vec()));
    }

    #[test]
    fn partial_keeps_the_last_characters() {
        assert_eq!(apply_str(&partial(4), "4111111111111111"), "************1111");
        assert_eq!(apply_str(&partial(4), "12345"), "*2345");
        assert_eq!(apply_str(&partial(0), "secret"), "******");
        assert_eq!(apply_str(&partial(1), "x"), "*");
    }

    #[test]
    fn partial_counts_characters_not_bytes() {
        assert_eq!(apply_str(&partial(3), "héllo wörld"), "********rld");
        assert_eq!(apply_str(&partial(3), "wörld"), "**rld");
        assert_eq!(apply_str(&partial(4), "wörld"), "*örld");
        assert_eq!(apply_str(&partial(2), "ab😀c"), "**😀c");
        assert_eq!(apply_str(&partial(1), "😀😀😀"), "**😀");
        assert_eq!(apply_str(&partial(2), "東京都港区"), "***港区");
    }

    #[test]
    fn partial_masks_short_values_entirely() {
        assert_eq!(apply_str(&partial(4), "abcd"), "****");
        assert_eq!(apply_str(&partial(4), "abc"), "***");
        assert_eq!(apply_str(&partial(4), "é😀"), "**");
        assert_eq!(apply_str(&partial(4), ""), "");
    }

    #[test]
    fn partial_counts_an_invalid_sequence_as_one_character() {
        assert_eq!(apply(&partial(2), b"ab\xffcd"), Some(b"***cd".to_vec()));
        assert_eq!(apply(&partial(1), b"\xff\xfe"), Some(b"*\xfe".to_vec()));
        // A truncated multi-byte sequence is one invalid sequence.
        assert_eq!(apply(&partial(1), b"\xe2\x82ab"), Some(b"**b".to_vec()));
        assert_eq!(apply(&partial(3), b"\xe2\x82ab"), Some(b"***".to_vec()));
    }

    #[test]
    fn email_keeps_the_domain() {
        assert_eq!(apply_str(&Strategy::Email, "jane.doe@example.com"), "****@example.com");
        assert_eq!(apply_str(&Strategy::Email, "@example.com"), "****@example.com");
        assert_eq!(apply_str(&Strategy::Email, "jane@"), "****@");
        // Only what follows the last `@` survives.
        assert_eq!(apply_str(&Strategy::Email, "\"a@b\"@example.com"), "****@example.com");
        assert_eq!(apply_str(&Strategy::Email, "a@x.com, b@y.com"), "****@y.com");
    }

    #[test]
    fn email_redacts_what_is_not_an_address_and_keeps_empty_empty() {
        assert_eq!(apply_str(&Strategy::Email, "not an address"), "[masked]");
        assert_eq!(apply_str(&Strategy::Email, ""), "");
    }

    #[test]
    fn hash_is_deterministic_and_keyed() {
        let hash = Strategy::Hash { key: key(KEY) };
        let token = apply_str(&hash, "jane@example.com");
        assert_eq!(token, apply_str(&hash, "jane@example.com"));
        assert_ne!(token, apply_str(&hash, "jane@example.org"));
        let other = Strategy::Hash {
            key: key(b"fedcba9876543210fedcba9876543210"),
        };
        assert_ne!(token, apply_str(&other, "jane@example.com"));
    }

    #[test]
    fn hash_tokens_are_a_prefix_and_sixteen_hex_digits() {
        let hash = Strategy::Hash { key: key(KEY) };
        for value in ["", "x", "a much longer value with spaces and ünïcödé"] {
            let token = apply_str(&hash, value);
            let hex = token.strip_prefix(HASH_PREFIX).expect("prefixed");
            assert_eq!(hex.len(), HASH_HEX_DIGITS, "{token}");
            assert!(
                hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{token}"
            );
        }
        assert_ne!(apply_str(&hash, ""), apply_str(&hash, " "));
    }

    /// RFC 4231 test case 1: HMAC-SHA256 with twenty 0x0b bytes as the key,
    /// over "Hi There", starts b0344c61d8db3853.
    #[test]
    fn hash_is_hmac_sha256() {
        let hash = Strategy::Hash { key: key(&[0x0b; 20]) };
        assert_eq!(apply_str(&hash, "Hi There"), "h:b0344c61d8db3853");
    }

    #[test]
    fn short_hash_keys_are_refused_and_keys_never_printed() {
        let error = HashKey::new(b"too short").unwrap_err();
        assert_eq!(error, StrategyError::ShortHashKey { len: 9 });
        assert_eq!(
            error.to_string(),
            "a masking hash key must be at least 16 bytes, this one has 9: generate one with `openssl rand -hex 32`"
        );
        let strategy = Strategy::Hash { key: key(KEY) };
        assert_eq!(format!("{strategy:?}"), "Hash { key: HashKey(..) }");
        assert_eq!(strategy.to_string(), "hash");
    }

    #[test]
    fn null_gives_sql_null() {
        assert_eq!(apply(&Strategy::Null, b"123-45-6789"), None);
        assert_eq!(apply(&Strategy::Null, b""), None);
    }

    #[test]
    fn apply_appends_to_the_buffer() {
        let mut out = b"row:".to_vec();
        assert_eq!(partial(2).apply(b"abcd", &mut out), Masked::Value);
        assert_eq!(Strategy::Email.apply(b"j@example.com", &mut out), Masked::Value);
        assert_eq!(Strategy::Null.apply(b"gone", &mut out), Masked::Null);
        assert_eq!(out, b"row:**cd****@example.com");
    }

    #[test]
    fn parse_reads_every_strategy_and_displays_it_back() {
        let key = key(KEY);
        for spec in [
            "redact",
            "redact:REDACTED",
            "redact:a:b",
            "partial:4",
            "partial:0",
            "email",
            "hash",
            "null",
        ] {
            let strategy = Strategy::parse(spec, Some(&key)).unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(strategy.to_string(), spec);
        }
        assert!(matches!(Strategy::parse("redact:a:b", None), Ok(Strategy::Redact { text }) if text == "a:b"));
        assert!(matches!(
            Strategy::parse("partial:4", None),
            Ok(Strategy::Partial { keep_last: 4 })
        ));
        assert!(matches!(Strategy::parse("hash", Some(&key)), Ok(Strategy::Hash { .. })));
    }

    #[test]
    fn parse_errors_quote_the_spec_and_say_what_to_write() {
        let cases = [
            (
                "mask",
                "unknown masking strategy `mask`: write one of `redact`, `redact:TEXT`, `partial:N`, `email`, `hash` or `null`",
            ),
            (
                "Partial:4",
                "unknown masking strategy `Partial:4`: write one of `redact`, `redact:TEXT`, `partial:N`, `email`, `hash` or `null`",
            ),
            (
                "partial",
                "masking strategy `partial` needs the number of characters to keep, as in `partial:4`",
            ),
            (
                "partial:",
                "masking strategy `partial:` needs the number of characters to keep, as in `partial:4`",
            ),
            (
                "partial:-1",
                "masking strategy `partial:-1` needs the number of characters to keep, as in `partial:4`",
            ),
            (
                "partial:four",
                "masking strategy `partial:four` needs the number of characters to keep, as in `partial:4`",
            ),
            (
                "redact:",
                "masking strategy `redact:` needs the replacement text after the colon, as in `redact:hidden`, or write `redact` for `[masked]`",
            ),
            (
                "email:domain",
                "masking strategy `email:domain` takes no argument: write `email`",
            ),
            ("null:", "masking strategy `null:` takes no argument: write `null`"),
            (
                "hash:sha256",
                "masking strategy `hash:sha256` takes no argument: write `hash`",
            ),
            (
                "hash",
                "masking strategy `hash` needs a masking hash key, and none is configured",
            ),
            (
                "",
                "unknown masking strategy ``: write one of `redact`, `redact:TEXT`, `partial:N`, `email`, `hash` or `null`",
            ),
        ];
        for (spec, message) in cases {
            let error = Strategy::parse(spec, None).expect_err(spec);
            assert_eq!(error.to_string(), message, "{spec:?}");
        }
    }
}
