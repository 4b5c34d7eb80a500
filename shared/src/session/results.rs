//! The result seam: every backend message bound for the client leaves through
//! [`ResultSeam::forward`], and nowhere else.
//!
//! Today the seam copies messages unchanged. It is where the masker sits: it
//! will read RowDescription (table OID and attribute number per column, kept
//! per statement and per portal using the proxy's `PendingQueue`), rewrite
//! DataRow values and their length prefixes, rewrite CopyData rows of
//! COPY TO STDOUT, and scrub values echoed in ErrorResponse, NoticeResponse and
//! NotificationResponse. Because the proxy loop already routes every message
//! here with its tag, masking changes this file, not the loop.

use bytes::BytesMut;

use crate::protocol::backend::tag;

/// The path values take from the database to the client.
#[derive(Debug, Default)]
pub struct ResultSeam {
    /// Messages that carried values, for the session's summary.
    rows: u64,
}

impl ResultSeam {
    /// Appends what the client receives for one complete backend message
    /// (tag, length and body).
    #[inline]
    pub fn forward(&mut self, message_tag: u8, message: &[u8], out: &mut BytesMut) {
        if message_tag == tag::DATA_ROW {
            self.rows += 1;
        }
        out.extend_from_slice(message);
    }

    /// Asks to pass a backend message too large to hold whole (over the
    /// proxy's streaming threshold) in chunks, unseen. A masker that must see
    /// a row whole answers no for the tags it rewrites, and the proxy then
    /// ends the session instead of passing the message unread.
    pub fn start_streaming(&mut self, message_tag: u8) -> bool {
        match message_tag {
            tag::DATA_ROW => {
                self.rows += 1;
                true
            }
            tag::COPY_DATA | tag::FUNCTION_CALL_RESPONSE => true,
            _ => false,
        }
    }

    /// DataRow messages passed to the client so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }
}
