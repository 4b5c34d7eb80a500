//! The PostgreSQL frontend/backend protocol, version 3.0, as typed values.
//!
//! This layer knows bytes and message layouts only: it frames messages
//! (`codec`), decodes the ones the gateway must read (`frontend`, `backend`,
//! `startup`) and encodes the ones the gateway writes itself. It does no IO and
//! knows nothing of sessions, identities or policy.

pub mod backend;
pub mod codec;
pub mod frontend;
pub mod startup;

mod cursor;

pub use codec::{FrameError, HEADER_LEN, Header};
pub use cursor::{Cursor, DecodeError};

/// Protocol version 3.0 as it appears in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 196_608;

/// The request code of an SSLRequest packet.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;

/// The request code of a GSSENCRequest packet (sent first by libpq 16+).
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;

/// The request code of a CancelRequest packet.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// PostgreSQL's own limit for a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// Transaction status reported by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// Not in a transaction block.
    Idle,
    /// In a transaction block.
    InTransaction,
    /// In a failed transaction block; statements are refused until it ends.
    Failed,
}

impl TxStatus {
    /// Decodes the status byte of a ReadyForQuery message.
    pub fn from_byte(byte: u8) -> Option<TxStatus> {
        match byte {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    /// The status byte as it appears on the wire.
    pub fn as_byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}
