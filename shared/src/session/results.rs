//! The result seam: every backend message bound for the client leaves through
//! [`ResultSeam::forward`], and nowhere else.
//!
//! With masking on (the default), the seam's [`RowMasker`] rewrites DataRow,
//! CopyData (COPY TO STDOUT), ErrorResponse, NoticeResponse and
//! NotificationResponse so that values the content detectors find, and
//! columns the rules name, never reach the client in clear. RowDescription
//! ([`ResultSeam::describe`]), NoData and CopyOutResponse
//! ([`ResultSeam::observe`]) are seen whoever they are for (the proxy's own
//! Describe before an Execute included), so the masker always knows the
//! columns and formats of the rows that follow.
//!
//! A message the masker cannot read is not passed on: the seam records the
//! failure and the proxy ends the session.

use bytes::BytesMut;

use crate::mask::{MaskError, RowMasker};
use crate::protocol::backend::tag;

/// The path values take from the database to the client.
#[derive(Debug, Default)]
pub struct ResultSeam {
    /// Messages that carried values, for the session's summary.
    rows: u64,
    /// `None` when this session sees clear values (an unmask grant).
    masker: Option<RowMasker>,
    failure: Option<MaskError>,
}

impl ResultSeam {
    pub fn new(masker: Option<RowMasker>) -> ResultSeam {
        ResultSeam {
            rows: 0,
            masker,
            failure: None,
        }
    }

    /// Notes a RowDescription, whoever it is for. `sensitive`: the statement
    /// reads a table with columns masked by rule, so its expression columns
    /// are masked too.
    pub fn describe(&mut self, message: &[u8], sensitive: bool) {
        let Some(masker) = &mut self.masker else { return };
        if let Err(err) = masker.describe(&message[5..], sensitive) {
            self.failure.get_or_insert(err);
        }
    }

    /// Whether the next ErrorResponse or NoticeResponse belongs to a
    /// statement over masked columns, and must lose its text.
    pub fn withhold_next_message(&mut self, withhold: bool) {
        if let Some(masker) = &mut self.masker {
            masker.withhold_next_message(withhold);
        }
    }

    /// How column `index` of the current result leaves the gateway (see
    /// [`RowMasker::column_masking`]); "clear" without a masker.
    pub fn column_masking(&self, index: usize) -> &'static str {
        self.masker.as_ref().map_or("clear", |m| m.column_masking(index))
    }

    /// Whether this session masks columns by rule.
    pub fn has_rules(&self) -> bool {
        self.masker.as_ref().is_some_and(RowMasker::has_rules)
    }

    /// Whether a column name may be one this session masks by rule.
    pub fn may_be_masked(&self, column: &str) -> bool {
        self.masker.as_ref().is_some_and(|m| m.may_be_masked(column))
    }

    /// Whether a relation has columns this session masks by rule.
    pub fn masks_table(&self, schema: Option<&str>, name: &str) -> bool {
        self.masker.as_ref().is_some_and(|m| m.masks_table(schema, name))
    }

    /// Whether a function a statement calls may be a user-defined one that
    /// reads tables with columns this session masks by rule.
    pub fn user_function(&self, name: &str) -> bool {
        self.masker.as_ref().is_some_and(|m| m.user_function(name))
    }

    /// Whether values are masked on this session.
    pub fn masking(&self) -> bool {
        self.masker.is_some()
    }

    /// Notes a backend message that describes what follows, whoever it is
    /// for: RowDescription, NoData, CopyOutResponse, and the ends of COPY.
    #[inline]
    pub fn observe(&mut self, message_tag: u8, message: &[u8]) {
        let Some(masker) = &mut self.masker else { return };
        let result = match message_tag {
            tag::NO_DATA => {
                masker.no_data();
                Ok(())
            }
            tag::COPY_OUT_RESPONSE | tag::COPY_BOTH_RESPONSE => masker.copy_out(&message[5..]),
            tag::COPY_DONE | tag::ERROR_RESPONSE | tag::READY_FOR_QUERY => {
                masker.copy_done();
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(err) = result {
            self.failure.get_or_insert(err);
        }
    }

    /// Appends what the client receives for one complete backend message
    /// (tag, length and body).
    #[inline]
    pub fn forward(&mut self, message_tag: u8, message: &[u8], out: &mut BytesMut) {
        if message_tag == tag::DATA_ROW {
            self.rows += 1;
        }
        let Some(masker) = &mut self.masker else {
            out.extend_from_slice(message);
            return;
        };
        let result = match message_tag {
            tag::DATA_ROW => masker.data_row(message, out),
            tag::COPY_DATA => masker.copy_data(message, out),
            tag::ERROR_RESPONSE | tag::NOTICE_RESPONSE => masker.error_or_notice(message_tag, message, out),
            tag::NOTIFICATION_RESPONSE => masker.notification(message, out),
            tag::FUNCTION_CALL_RESPONSE => masker.function_result(message, out),
            _ => {
                out.extend_from_slice(message);
                Ok(())
            }
        };
        if let Err(err) = result {
            self.failure.get_or_insert(err);
        }
    }

    /// A message the masker could not read, if there was one: the session
    /// must end, since its result cannot be passed on safely.
    pub fn take_failure(&mut self) -> Option<MaskError> {
        self.failure.take()
    }

    /// Asks to pass a backend message too large to hold whole (over the
    /// proxy's streaming threshold) in chunks, unseen. With masking on, no
    /// message that carries values may pass unseen: the proxy then holds it
    /// whole (up to `server.max_message_size`) or ends the session.
    pub fn start_streaming(&mut self, message_tag: u8) -> bool {
        if self.masker.is_some() {
            return false;
        }
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

    /// Values the masker replaced so far.
    pub fn masked(&self) -> u64 {
        self.masker.as_ref().map_or(0, RowMasker::masked)
    }
}
