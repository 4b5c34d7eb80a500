//! Request signatures of the chat platforms: nothing reaches a decision
//! unless the platform signed it, recently.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How old (or how far in the future) a signed request may be, in seconds.
/// Slack documents five minutes; Discord the same is plenty.
pub const MAX_AGE: i64 = 300;

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the request has no {0} header")]
    Missing(&'static str),
    #[error("the request's timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("the request's timestamp is {0} s away from now (more than {MAX_AGE} s): a replay, or a clock out of step")]
    Stale(i64),
    #[error("the signature does not match the body")]
    Mismatch,
}

/// Slack's signature of a request body: `v0=` and the hex HMAC-SHA256 of
/// `v0:{timestamp}:{body}` under the signing secret.
pub fn slack_signature(signing_secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(signing_secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

fn fresh(timestamp: Option<&str>, header: &'static str, now: i64) -> Result<(), SignatureError> {
    let timestamp = timestamp.ok_or(SignatureError::Missing(header))?;
    let at: i64 = timestamp.trim().parse().map_err(|_| SignatureError::BadTimestamp)?;
    let age = now.saturating_sub(at);
    if age.abs() > MAX_AGE {
        return Err(SignatureError::Stale(age));
    }
    Ok(())
}

/// Checks Slack's `X-Slack-Signature` and `X-Slack-Request-Timestamp` for
/// `body`, at `now` (Unix seconds). The comparison is constant-time.
pub fn verify_slack(
    signing_secret: &str,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    fresh(timestamp, "X-Slack-Request-Timestamp", now)?;
    let timestamp = timestamp.unwrap_or_default();
    let signature = signature.ok_or(SignatureError::Missing("X-Slack-Signature"))?;
    let hex_part = signature.strip_prefix("v0=").ok_or(SignatureError::Mismatch)?;
    let given = hex::decode(hex_part).map_err(|_| SignatureError::Mismatch)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(signing_secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    mac.verify_slice(&given).map_err(|_| SignatureError::Mismatch)
}

/// Checks Discord's `X-Signature-Ed25519` and `X-Signature-Timestamp` for
/// `body` with the application's public key, and that the timestamp is
/// recent (serenity's verifier checks only the signature).
pub fn verify_discord(
    verifier: &serenity::interactions_endpoint::Verifier,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    fresh(timestamp, "X-Signature-Timestamp", now)?;
    let signature = signature.ok_or(SignatureError::Missing("X-Signature-Ed25519"))?;
    verifier
        .verify(signature, timestamp.unwrap_or_default(), body)
        .map_err(|()| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Slack's published example ("Verifying requests from Slack").
    const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const TIMESTAMP: &str = "1531420618";
    const BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const EXPECTED: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    #[test]
    fn slacks_published_example() {
        assert_eq!(slack_signature(SECRET, TIMESTAMP, BODY.as_bytes()), EXPECTED);
        let at = 1531420618;
        assert_eq!(
            verify_slack(SECRET, Some(TIMESTAMP), Some(EXPECTED), BODY.as_bytes(), at + 10),
            Ok(())
        );
    }

    #[test]
    fn slack_refuses_stale_wrong_and_tampered() {
        let at = 1531420618;
        let body = BODY.as_bytes();
        assert_eq!(
            verify_slack(SECRET, Some(TIMESTAMP), Some(EXPECTED), body, at + 301),
            Err(SignatureError::Stale(301))
        );
        assert_eq!(
            verify_slack(SECRET, Some(TIMESTAMP), Some(EXPECTED), body, at - 301),
            Err(SignatureError::Stale(-301))
        );
        let wrong = slack_signature("another-secret", TIMESTAMP, body);
        assert_eq!(
            verify_slack(SECRET, Some(TIMESTAMP), Some(&wrong), body, at),
            Err(SignatureError::Mismatch)
        );
        let tampered = BODY.replace("user_id=U2CERLKJA", "user_id=U2CERLKJB");
        assert_eq!(
            verify_slack(SECRET, Some(TIMESTAMP), Some(EXPECTED), tampered.as_bytes(), at),
            Err(SignatureError::Mismatch)
        );
        // The timestamp is signed too: moving it breaks the signature.
        assert_eq!(
            verify_slack(SECRET, Some("1531420619"), Some(EXPECTED), body, at),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_slack(SECRET, None, Some(EXPECTED), body, at),
            Err(SignatureError::Missing("X-Slack-Request-Timestamp"))
        );
        assert_eq!(
            verify_slack(SECRET, Some(TIMESTAMP), None, body, at),
            Err(SignatureError::Missing("X-Slack-Signature"))
        );
        assert_eq!(
            verify_slack(SECRET, Some(TIMESTAMP), Some("v0=zz"), body, at),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_slack(SECRET, Some("soon"), Some(EXPECTED), body, at),
            Err(SignatureError::BadTimestamp)
        );
    }

    #[test]
    fn discord_ed25519_with_a_generated_key() {
        use ed25519_dalek::Signer;
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[8u8; 32]);
        let verifier = serenity::interactions_endpoint::Verifier::try_new(key.verifying_key().to_bytes()).unwrap();
        let body = br#"{"type":1}"#;
        let now = 1_700_000_000;
        let ts = now.to_string();
        let sign = |key: &ed25519_dalek::SigningKey, ts: &str, body: &[u8]| {
            hex::encode(key.sign(&[ts.as_bytes(), body].concat()).to_bytes())
        };
        let good = sign(&key, &ts, body);
        assert_eq!(verify_discord(&verifier, Some(&ts), Some(&good), body, now), Ok(()));
        assert_eq!(
            verify_discord(&verifier, Some(&ts), Some(&good), br#"{"type":2}"#, now),
            Err(SignatureError::Mismatch)
        );
        let later = (now + 1).to_string();
        assert_eq!(
            verify_discord(&verifier, Some(&later), Some(&good), body, now),
            Err(SignatureError::Mismatch)
        );
        let wrong_key = sign(&other, &ts, body);
        assert_eq!(
            verify_discord(&verifier, Some(&ts), Some(&wrong_key), body, now),
            Err(SignatureError::Mismatch)
        );
        let old = (now - 600).to_string();
        let signed_old = sign(&key, &old, body);
        assert_eq!(
            verify_discord(&verifier, Some(&old), Some(&signed_old), body, now),
            Err(SignatureError::Stale(600))
        );
        assert_eq!(
            verify_discord(&verifier, Some(&ts), Some("not hex"), body, now),
            Err(SignatureError::Mismatch)
        );
    }
}
