//! Dynamic masking: the pure core that decides what a sensitive value
//! becomes before it reaches a client, the audit log or the console.
//!
//! Two pieces live here, both without IO or async:
//!
//! - [`detect`]: content detectors that find emails, phone numbers, cards,
//!   national ids, IBANs, tokens and private keys inside a value. They cover
//!   values with no column origin (expressions, function results, views), so
//!   masking works with zero configuration, and they run on every such value
//!   of every row: no allocation unless something matched.
//! - [`strategy`]: what a column value covered by a rule becomes (redacted,
//!   partially kept, email domain kept, keyed hash, NULL).
//!
//! - [`rows`]: the rewriter the result seam uses per session: detectors on
//!   every value of DataRow (text and binary formats), CopyData of COPY TO
//!   STDOUT (text, CSV, binary), errors, notices, notifications and function
//!   call results.
//!
//! - [`catalog`]: column rules (`schema.table.column` and name patterns)
//!   resolved to table OIDs and attribute numbers, which RowDescription
//!   carries whatever alias a query uses.

pub mod catalog;
pub mod detect;
pub mod rows;
pub mod strategy;

pub use detect::{Detector, DetectorError, DetectorSet, Finding, Findings, findings, scrub, scrub_into};
pub use rows::{MaskError, RowMasker};
pub use strategy::{HashKey, Masked, Strategy, StrategyError};
