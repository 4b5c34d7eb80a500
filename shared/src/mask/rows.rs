//! The result rewriter: what a session's masker does to each backend message
//! that can carry a value (DataRow, CopyData of COPY TO STDOUT, ErrorResponse,
//! NoticeResponse, NotificationResponse) before the client sees it.
//!
//! Content detectors run on every value; a value with a finding is masked in
//! place when its wire form is text (text format of any type, or the binary
//! form of a text-like type, which is the same UTF-8), and becomes NULL when
//! its wire form is some other binary structure (an array, a record, a
//! number), where rewriting bytes would corrupt it. Messages without a
//! finding are copied unchanged, without allocating.
//!
//! The rewriter knows which columns a DataRow has from the last
//! RowDescription the server sent on the session: the proxy makes sure there
//! is one before every Execute (it asks with a Describe of its own when the
//! client did not), so that rows of a portal executed without a Describe are
//! still read with their real formats.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use super::catalog::ColumnRules;
use super::detect::{DetectorSet, findings, scrub_into};
use super::{Masked, Strategy};
use crate::protocol::backend::tag;
use crate::protocol::{Cursor, DecodeError};

/// Type OIDs whose binary form is their text (UTF-8, as the client encoding
/// is UTF-8 on every session the gateway keeps).
const TEXT_LIKE: [u32; 7] = [
    25,   // text
    1043, // varchar
    1042, // bpchar
    19,   // name
    114,  // json
    142,  // xml
    705,  // unknown
];
/// jsonb's binary form: a version byte (1), then the text.
const JSONB: u32 = 3802;
/// Number types whose binary form the masker reads back into the decimal
/// digits their text form would show, for the detectors.
const INT2: u32 = 21;
const INT4: u32 = 23;
const INT8: u32 = 20;
const OID: u32 = 26;
const XID: u32 = 28;
const CID: u32 = 29;
const XID8: u32 = 5069;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const NUMERIC: u32 = 1700;

/// Ranges and multiranges of numbers, by their element type, and whether a
/// multirange. (Ranges of other types are scanned as bytes.)
fn range_of(type_oid: u32) -> Option<(u32, bool)> {
    match type_oid {
        3904 => Some((INT4, false)),
        3926 => Some((INT8, false)),
        3906 => Some((NUMERIC, false)),
        4451 => Some((INT4, true)),
        4536 => Some((INT8, true)),
        4532 => Some((NUMERIC, true)),
        _ => None,
    }
}

/// No type: a binary COPY field's (the COPY does not say).
const UNKNOWN_TYPE: u32 = 0;

/// How deep the masker reads into arrays of records of arrays...; a value
/// nested deeper is judged to have a finding (fail closed).
const MAX_NESTING: usize = 8;

/// How a column's values travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// Text format, or binary of a text-like type: mask in place.
    Text,
    /// jsonb in binary: a version byte, then text.
    JsonbBinary,
    /// Any other binary form, of this type: read as its text would show it
    /// ([`RowMasker::binary_finds`]), NULL when something is found.
    Binary { type_oid: u32 },
}

/// What a column rule does to a result column.
#[derive(Debug, Clone)]
enum Rule {
    /// The column is a masked table column (by table OID and attribute
    /// number, whatever its alias).
    Column(Arc<Strategy>),
    /// A whole row (or an array of rows) of a table with a masked column.
    Row,
    /// An expression in a statement over a table with masked columns. Any
    /// type can carry a masked value out (`ascii(substr(secret, 1, 1))` is
    /// a number): text-like ones become `[masked:expression]`, others NULL.
    Expression { text: bool },
}

/// The text a whole-row value holding a masked column becomes.
const ROW_MASK: &[u8] = b"[masked:row]";
/// The text an expression over a table with masked columns becomes.
const EXPRESSION_MASK: &[u8] = b"[masked:expression]";

/// Whether a masked expression of this type is shown as text
/// (`[masked:expression]`) rather than NULL: text-like types, jsonb, bytea,
/// records, their arrays, and user types.
fn carries_text(type_oid: u32) -> bool {
    TEXT_LIKE.contains(&type_oid)
        || matches!(
            type_oid,
            JSONB | 17 | 2249 | 1009 | 1015 | 1014 | 1003 | 199 | 3807 | 2287 | 1001 | 143 | 1263
        )
        || type_oid >= 16384
}

/// The COPY TO STDOUT in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyOut {
    None,
    Text,
    Binary,
}

/// Why a message could not be masked. The proxy ends the session rather than
/// pass it on.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("invalid {message} from upstream: {source}")]
    Decode {
        message: &'static str,
        #[source]
        source: DecodeError,
    },
    #[error("a binary COPY row could not be read, so it could not be masked")]
    BinaryCopy,
}

fn decode(message: &'static str) -> impl FnOnce(DecodeError) -> MaskError {
    move |source| MaskError::Decode { message, source }
}

/// One session's masker state.
#[derive(Debug)]
pub struct RowMasker {
    detectors: DetectorSet,
    /// Column rules for this identity on this target.
    rules: ColumnRules,
    /// Wire forms of the current result's columns; `None` before the first
    /// RowDescription (values are then read as text).
    columns: Option<Vec<Wire>>,
    /// The rule of each current column, if any (parallel to `columns`).
    column_rules: Vec<Option<Rule>>,
    copy: CopyOut,
    /// Reused for each masked value.
    scratch: Vec<u8>,
    /// Values masked so far, for the session summary and audit.
    masked: u64,
    /// The next error or notice loses its text (see `error_or_notice`).
    withhold: bool,
}

impl RowMasker {
    pub fn new(detectors: DetectorSet, rules: ColumnRules) -> RowMasker {
        RowMasker {
            detectors,
            rules,
            columns: None,
            column_rules: Vec::new(),
            copy: CopyOut::None,
            scratch: Vec::new(),
            masked: 0,
            withhold: false,
        }
    }

    /// Whether the next error or notice belongs to a statement over masked
    /// columns.
    pub fn withhold_next_message(&mut self, withhold: bool) {
        self.withhold = withhold;
    }

    /// Whether this session masks columns by rule.
    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    /// Whether a relation has columns this session masks by rule.
    pub fn masks_table(&self, schema: Option<&str>, name: &str) -> bool {
        self.rules.masks_table(schema, name)
    }

    /// Whether a column name may be one this session masks by rule.
    pub fn may_be_masked(&self, column: &str) -> bool {
        self.rules.may_be_masked(column)
    }

    /// Whether a function (by base name) may be a user-defined one that
    /// reads masked tables.
    pub fn user_function(&self, name: &str) -> bool {
        self.rules.user_function(name)
    }

    /// Values masked so far.
    pub fn masked(&self) -> u64 {
        self.masked
    }

    /// Reads a RowDescription body: the columns of the rows that follow.
    /// `sensitive`: the statement reads a table with columns masked by rule,
    /// so a column that is an expression (no table origin) of a type that
    /// can carry a masked value (text, json, records, arrays, bytea, user
    /// types) is redacted whole: `upper(secret)` must not show it.
    pub fn describe(&mut self, body: &[u8], sensitive: bool) -> Result<(), MaskError> {
        let mut cur = Cursor::new(body);
        let count = cur.count16("column count").map_err(decode("RowDescription"))?;
        let mut columns = self.columns.take().unwrap_or_default();
        columns.clear();
        self.column_rules.clear();
        for _ in 0..count {
            cur.cstr_bytes("column name").map_err(decode("RowDescription"))?;
            let table = cur.i32("table oid").map_err(decode("RowDescription"))? as u32;
            let attnum = cur.i16("attribute number").map_err(decode("RowDescription"))?;
            let type_oid = cur.i32("type oid").map_err(decode("RowDescription"))? as u32;
            let rule = if self.rules.is_empty() {
                None
            } else if let Some(strategy) = self.rules.columns.get(&(table, attnum)) {
                Some(Rule::Column(strategy.clone()))
            } else if self.rules.rowtypes.contains(&type_oid) {
                Some(Rule::Row)
            } else if sensitive && table == 0 {
                Some(Rule::Expression {
                    text: carries_text(type_oid),
                })
            } else {
                None
            };
            self.column_rules.push(rule);
            cur.i16("type length").map_err(decode("RowDescription"))?;
            cur.i32("type modifier").map_err(decode("RowDescription"))?;
            let format = cur.i16("format code").map_err(decode("RowDescription"))?;
            columns.push(match format {
                0 => Wire::Text,
                _ if TEXT_LIKE.contains(&type_oid) => Wire::Text,
                _ if type_oid == JSONB => Wire::JsonbBinary,
                _ => Wire::Binary { type_oid },
            });
        }
        cur.finish().map_err(decode("RowDescription"))?;
        self.columns = Some(columns);
        Ok(())
    }

    /// How column `index` of the current result leaves the gateway:
    /// "rule", "expression" (masked whole) or "detectors" (values with a
    /// finding masked); "clear" when no detector is on.
    pub fn column_masking(&self, index: usize) -> &'static str {
        match self.column_rules.get(index) {
            Some(Some(Rule::Expression { .. })) => "expression",
            Some(Some(_)) => "rule",
            _ if self.detectors.is_empty() => "clear",
            _ => "detectors",
        }
    }

    /// A NoData answer: no rows follow.
    pub fn no_data(&mut self) {
        if let Some(columns) = &mut self.columns {
            columns.clear();
        }
        self.column_rules.clear();
    }

    /// Reads a CopyOutResponse body: the format of the CopyData that follows.
    pub fn copy_out(&mut self, body: &[u8]) -> Result<(), MaskError> {
        let mut cur = Cursor::new(body);
        let format = cur.u8("copy format").map_err(decode("CopyOutResponse"))?;
        self.copy = if format == 0 { CopyOut::Text } else { CopyOut::Binary };
        Ok(())
    }

    /// The COPY ended (CopyDone, or an error).
    pub fn copy_done(&mut self) {
        self.copy = CopyOut::None;
    }

    /// The wire form of field `index` of a row.
    fn wire(&self, index: usize) -> Wire {
        match &self.columns {
            Some(columns) => columns.get(index).copied().unwrap_or(Wire::Text),
            None => Wire::Text,
        }
    }

    fn finds(&self, value: &[u8]) -> bool {
        findings(value, self.detectors).next().is_some()
    }

    /// Whether a field's value has a finding, read as its wire form says.
    fn field_finds(&self, wire: Wire, value: &[u8]) -> bool {
        match wire {
            Wire::JsonbBinary => self.finds(value.get(1..).unwrap_or_default()),
            Wire::Binary { type_oid } => self.binary_finds(type_oid, value, 0),
            Wire::Text => self.finds(value),
        }
    }

    /// Whether a binary value of type `type_oid` has a finding, judged as
    /// its text form would be: text on its own, numbers as their decimal
    /// digits (a card number cast to int8, xid8 or numeric), arrays,
    /// records and ranges element by element. Each element is scanned
    /// alone: in the bytes as they are, the length before a text element
    /// can read as a letter or digit joined to it (`a937-11-7919`, from an
    /// element 97 bytes long), which hides it from the detectors. A value
    /// of any other type is scanned as bytes, and also read as an array or
    /// a record when it is one (user types and arrays of them).
    fn binary_finds(&self, type_oid: u32, value: &[u8], depth: usize) -> bool {
        if depth > MAX_NESTING {
            return true;
        }
        match type_oid {
            _ if TEXT_LIKE.contains(&type_oid) => return self.finds(value),
            JSONB => return self.finds(value.get(1..).unwrap_or_default()),
            INT2 | INT4 | INT8 | OID | XID | CID | XID8 | FLOAT4 | FLOAT8 | NUMERIC => {
                let mut digits = [0u8; 64];
                return match binary_digits(type_oid, value, &mut digits) {
                    Some(len) => self.finds(&digits[..len]),
                    // Unreadable or not a whole number: judge the bytes.
                    None => self.finds(value),
                };
            }
            _ => {}
        }
        let mut found = false;
        if let Some((element, multirange)) = range_of(type_oid) {
            let mut visit = |bound: &[u8]| {
                found |= self.binary_finds(element, bound, depth + 1);
                found
            };
            let read = if multirange {
                each_multirange_bound(value, &mut visit)
            } else {
                each_range_bound(value, &mut visit)
            };
            return found || read.is_none() && self.finds(value);
        }
        if self.finds(value) {
            return true;
        }
        let mut visit = |oid: u32, element: &[u8]| {
            found |= self.binary_finds(oid, element, depth + 1);
            found
        };
        if each_array_element(value, &mut visit).is_none() {
            each_record_field(value, &mut visit);
        }
        found
    }

    /// Appends a DataRow (whole message), masked, to `out`.
    pub fn data_row(&mut self, message: &[u8], out: &mut BytesMut) -> Result<(), MaskError> {
        let body = &message[5..];
        let mut cur = Cursor::new(body);
        let count = cur.count16("field count").map_err(decode("DataRow"))?;
        // First pass: does any value need masking? Most rows: no. Where the
        // first one is (field index, byte offset) lets the rewrite copy the
        // clean fields before it without scanning them again.
        // A text value that made the row dirty is scrubbed into `scratch`
        // right away (`prescrubbed`), so it is not scanned twice.
        let mut dirty = None;
        let mut prescrubbed = false;
        for index in 0..count {
            let offset = body.len() - cur.remaining().len();
            let Some(value) = cur.nullable_value("field").map_err(decode("DataRow"))? else {
                continue;
            };
            if self.column_rules.get(index).is_some_and(Option::is_some) {
                dirty = Some((index, offset));
                break;
            }
            let wire = self.wire(index);
            let found = match wire {
                Wire::Text | Wire::JsonbBinary => {
                    let text = match wire {
                        Wire::JsonbBinary => value.get(1..).unwrap_or_default(),
                        _ => value,
                    };
                    self.scratch.clear();
                    prescrubbed = scrub_into(text, self.detectors, &mut self.scratch);
                    prescrubbed
                }
                Wire::Binary { .. } => self.field_finds(wire, value),
            };
            if found {
                dirty = Some((index, offset));
                break;
            }
        }
        let Some((first_dirty, offset)) = dirty else {
            out.extend_from_slice(message);
            return Ok(());
        };
        // Second pass: rebuild the row with new length prefixes.
        let mut cur = Cursor::new(&body[offset..]);
        out.put_u8(tag::DATA_ROW);
        let start = out.len();
        out.put_i32(0);
        out.put_slice(&body[..offset]);
        for index in first_dirty..count {
            let Some(value) = cur.nullable_value("field").map_err(decode("DataRow"))? else {
                out.put_i32(-1);
                continue;
            };
            let wire = self.wire(index);
            if let Some(rule) = self.column_rules.get(index).and_then(Option::as_ref) {
                self.masked += 1;
                match (rule, wire) {
                    (Rule::Column(strategy), Wire::Text) => {
                        self.scratch.clear();
                        match strategy.apply(value, &mut self.scratch) {
                            Masked::Value => put_value(out, &self.scratch),
                            Masked::Null => out.put_i32(-1),
                        }
                    }
                    (Rule::Row, Wire::Text) => put_value(out, ROW_MASK),
                    (Rule::Expression { text: true }, Wire::Text) => put_value(out, EXPRESSION_MASK),
                    // A binary value (jsonb, numbers, arrays, records) would
                    // not decode with masked text in it.
                    _ => out.put_i32(-1),
                }
                continue;
            }
            if let Wire::Binary { .. } = wire {
                if self.field_finds(wire, value) {
                    self.masked += 1;
                    out.put_i32(-1);
                } else {
                    put_value(out, value);
                }
                continue;
            }
            let (prefix, text) = match wire {
                Wire::JsonbBinary if !value.is_empty() => value.split_at(1),
                _ => (&value[..0], value),
            };
            let scrubbed = if prescrubbed && index == first_dirty {
                true
            } else {
                self.scratch.clear();
                scrub_into(text, self.detectors, &mut self.scratch)
            };
            if !scrubbed {
                put_value(out, value);
                continue;
            }
            self.masked += 1;
            match wire {
                Wire::Binary { .. } => out.put_i32(-1),
                Wire::Text | Wire::JsonbBinary => {
                    out.put_i32((prefix.len() + self.scratch.len()) as i32);
                    out.put_slice(prefix);
                    out.put_slice(&self.scratch);
                }
            }
        }
        cur.finish().map_err(decode("DataRow"))?;
        finish(out, start);
        Ok(())
    }

    /// Appends a CopyData of COPY TO STDOUT, masked, to `out`.
    pub fn copy_data(&mut self, message: &[u8], out: &mut BytesMut) -> Result<(), MaskError> {
        match self.copy {
            CopyOut::Binary => self.binary_copy_data(message, out),
            // Text and CSV (the protocol does not tell them apart; custom
            // delimiters, quotes and escapes are refused before the COPY
            // runs): values are masked within the runs between delimiters
            // and line ends, a quoted CSV value (which may hold commas and
            // line breaks, as a PEM key does) being one run. Masks contain
            // none of those bytes, so the row keeps its shape either way.
            CopyOut::Text | CopyOut::None => {
                let body = &message[5..];
                // Most rows: no finding, and the message is copied whole.
                // The run that makes a row dirty is scrubbed right away, and
                // the rewrite copies the clean runs before it in one piece
                // and goes on from there, so no run is scanned twice.
                let mut runs = copy_runs(body);
                let mut clean = 0;
                let boundary = loop {
                    let Some((run, boundary)) = runs.next() else {
                        out.extend_from_slice(message);
                        return Ok(());
                    };
                    self.scratch.clear();
                    if scrub_into(run, self.detectors, &mut self.scratch) {
                        break boundary;
                    }
                    clean += run.len() + usize::from(boundary.is_some());
                };
                self.masked += 1;
                out.put_u8(tag::COPY_DATA);
                let start = out.len();
                out.put_i32(0);
                out.put_slice(&body[..clean]);
                out.put_slice(&self.scratch);
                if let Some(boundary) = boundary {
                    out.put_u8(boundary);
                }
                for (run, boundary) in runs {
                    self.put_scrubbed_run(run, out);
                    if let Some(boundary) = boundary {
                        out.put_u8(boundary);
                    }
                }
                finish(out, start);
                Ok(())
            }
        }
    }

    /// Binary COPY: the server sends the header with the first row and one
    /// row per CopyData; each field with a finding becomes NULL. Its type is
    /// not known here: its bytes are scanned, and read as an array or record
    /// when they are one. (Sessions that mask refuse binary COPY before it
    /// runs, since a number's bytes say nothing; this is the second line.)
    fn binary_copy_data(&mut self, message: &[u8], out: &mut BytesMut) -> Result<(), MaskError> {
        const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
        let body = &message[5..];
        let mut cur = Cursor::new(body);
        let mut header = 0;
        if body.starts_with(SIGNATURE) {
            cur.bytes(SIGNATURE.len(), "signature")
                .map_err(|_| MaskError::BinaryCopy)?;
            cur.i32("flags").map_err(|_| MaskError::BinaryCopy)?;
            let extension = cur.i32("extension length").map_err(|_| MaskError::BinaryCopy)?;
            let extension = usize::try_from(extension).map_err(|_| MaskError::BinaryCopy)?;
            cur.bytes(extension, "extension").map_err(|_| MaskError::BinaryCopy)?;
            header = body.len() - cur.remaining().len();
        }
        // First pass: any finding at all?
        let mut dirty = false;
        let mut scan = Cursor::new(&body[header..]);
        while !scan.is_empty() {
            let count = scan.i16("field count").map_err(|_| MaskError::BinaryCopy)?;
            if count == -1 {
                continue;
            }
            for _ in 0..count.max(0) {
                if let Some(value) = scan.nullable_value("field").map_err(|_| MaskError::BinaryCopy)?
                    && self.binary_finds(UNKNOWN_TYPE, value, 0)
                {
                    dirty = true;
                }
            }
        }
        if !dirty {
            out.extend_from_slice(message);
            return Ok(());
        }
        out.put_u8(tag::COPY_DATA);
        let start = out.len();
        out.put_i32(0);
        out.put_slice(&body[..header]);
        let mut cur = Cursor::new(&body[header..]);
        while !cur.is_empty() {
            let count = cur.i16("field count").map_err(|_| MaskError::BinaryCopy)?;
            out.put_i16(count);
            for _ in 0..count.max(0) {
                match cur.nullable_value("field").map_err(|_| MaskError::BinaryCopy)? {
                    Some(value) if self.binary_finds(UNKNOWN_TYPE, value, 0) => {
                        self.masked += 1;
                        out.put_i32(-1);
                    }
                    Some(value) => put_value(out, value),
                    None => out.put_i32(-1),
                }
            }
        }
        finish(out, start);
        Ok(())
    }

    /// Appends an ErrorResponse or NoticeResponse with detectors applied to
    /// every text field (PostgreSQL echoes values in messages and details:
    /// `invalid input syntax for type integer: "123-45-6789"`).
    pub fn error_or_notice(&mut self, message_tag: u8, message: &[u8], out: &mut BytesMut) -> Result<(), MaskError> {
        let body = &message[5..];
        if std::mem::take(&mut self.withhold) {
            return self.withheld(message_tag, body, out);
        }
        // Field by field: in the body as it is, a value that begins a
        // field has the field's code letter joined to it (`M937-11-7919`),
        // which hides it from the detectors.
        let mut fields = Cursor::new(body);
        let mut dirty = false;
        loop {
            if fields.u8("field type").map_err(decode("ErrorResponse"))? == 0 {
                break;
            }
            if self.finds(fields.cstr_bytes("field").map_err(decode("ErrorResponse"))?) {
                dirty = true;
                break;
            }
        }
        if !dirty {
            out.extend_from_slice(message);
            return Ok(());
        }
        let mut cur = Cursor::new(body);
        out.put_u8(message_tag);
        let start = out.len();
        out.put_i32(0);
        loop {
            let field = cur.u8("field type").map_err(decode("ErrorResponse"))?;
            out.put_u8(field);
            if field == 0 {
                break;
            }
            let value = cur.cstr_bytes("field").map_err(decode("ErrorResponse"))?;
            self.put_scrubbed_cstr(value, out);
        }
        finish(out, start);
        Ok(())
    }

    /// An error or notice of a statement over masked columns: severity and
    /// SQLSTATE are kept, the text (which may echo a masked value) is not.
    fn withheld(&mut self, message_tag: u8, body: &[u8], out: &mut BytesMut) -> Result<(), MaskError> {
        let mut cur = Cursor::new(body);
        let (mut severity, mut code) = (&b"ERROR"[..], &b"XX000"[..]);
        loop {
            let field = cur.u8("field type").map_err(decode("ErrorResponse"))?;
            if field == 0 {
                break;
            }
            let value = cur.cstr_bytes("field").map_err(decode("ErrorResponse"))?;
            match field {
                b'V' => severity = value,
                b'C' => code = value,
                _ => {}
            }
        }
        self.masked += 1;
        out.put_u8(message_tag);
        let start = out.len();
        out.put_i32(0);
        for (field, value) in [(b'S', severity), (b'V', severity), (b'C', code)] {
            out.put_u8(field);
            out.put_slice(value);
            out.put_u8(0);
        }
        out.put_u8(b'M');
        out.put_slice(b"the statement reads columns masked for you; the server's message is withheld, since it may show a masked value (SQLSTATE ");
        out.put_slice(code);
        out.put_slice(b")\0");
        out.put_u8(0);
        finish(out, start);
        Ok(())
    }

    /// Appends a NotificationResponse with detectors applied to its channel
    /// and payload.
    pub fn notification(&mut self, message: &[u8], out: &mut BytesMut) -> Result<(), MaskError> {
        let body = &message[5..];
        let mut cur = Cursor::new(body);
        let pid = cur.i32("process id").map_err(decode("NotificationResponse"))?;
        let channel = cur.cstr_bytes("channel").map_err(decode("NotificationResponse"))?;
        let payload = cur.cstr_bytes("payload").map_err(decode("NotificationResponse"))?;
        // Each on its own: the process id's last byte, joined to the
        // channel, can read as a letter or digit (pg_notify(ssn, '')).
        if !self.finds(channel) && !self.finds(payload) {
            out.extend_from_slice(message);
            return Ok(());
        }
        out.put_u8(tag::NOTIFICATION_RESPONSE);
        let start = out.len();
        out.put_i32(0);
        out.put_i32(pid);
        self.put_scrubbed_cstr(channel, out);
        self.put_scrubbed_cstr(payload, out);
        finish(out, start);
        Ok(())
    }

    /// Appends a FunctionCallResponse; a result with a finding becomes NULL
    /// (its format, text or binary, is the caller's choice and not known here).
    pub fn function_result(&mut self, message: &[u8], out: &mut BytesMut) -> Result<(), MaskError> {
        let mut cur = Cursor::new(&message[5..]);
        match cur.nullable_value("result").map_err(decode("FunctionCallResponse"))? {
            // With column rules, any function may have read a masked column.
            Some(value) if !self.rules.is_empty() || self.finds(value) => {
                self.masked += 1;
                out.put_u8(tag::FUNCTION_CALL_RESPONSE);
                out.put_i32(8);
                out.put_i32(-1);
            }
            _ => out.extend_from_slice(message),
        }
        Ok(())
    }

    fn put_scrubbed_run(&mut self, run: &[u8], out: &mut BytesMut) {
        self.scratch.clear();
        if scrub_into(run, self.detectors, &mut self.scratch) {
            self.masked += 1;
            out.put_slice(&self.scratch);
        } else {
            out.put_slice(run);
        }
    }

    fn put_scrubbed_cstr(&mut self, value: &[u8], out: &mut BytesMut) {
        self.scratch.clear();
        if scrub_into(value, self.detectors, &mut self.scratch) {
            self.masked += 1;
            out.put_slice(&self.scratch);
        } else {
            out.put_slice(value);
        }
        out.put_u8(0);
    }
}

/// The runs of a text or CSV COPY row that [`RowMasker::copy_data`] masks
/// one by one, each with the boundary byte that ends it (none for the last):
/// tabs, commas and line ends outside quotes, and the quotes themselves, so
/// that a quoted CSV value is one run.
fn copy_runs(body: &[u8]) -> impl Iterator<Item = (&[u8], Option<u8>)> {
    let mut quoted = false;
    let mut rest = Some(body);
    std::iter::from_fn(move || {
        let text = rest?;
        let end = text.iter().position(|&b| match b {
            b'"' => {
                quoted = !quoted;
                true
            }
            b'\t' | b',' | b'\n' | b'\r' => !quoted,
            _ => false,
        });
        match end {
            Some(at) => {
                rest = Some(&text[at + 1..]);
                Some((&text[..at], Some(text[at])))
            }
            None => {
                rest = None;
                Some((text, None))
            }
        }
    })
}

fn put_value(out: &mut BytesMut, value: &[u8]) {
    out.put_i32(value.len() as i32);
    out.put_slice(value);
}

/// Writes the length prefix of a message started at `start` (its length field).
fn finish(out: &mut BytesMut, start: usize) {
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// The decimal digits of a binary integer, float or numeric of type
/// `type_oid` (its integer part; a float only when it is a whole number),
/// written into `buf` without allocating; `None` if the value is not one or
/// does not fit. Only the digits matter: detectors look for card numbers.
fn binary_digits(type_oid: u32, value: &[u8], buf: &mut [u8; 64]) -> Option<usize> {
    let whole = |f: f64| (f.is_finite() && f.fract() == 0.0 && f.abs() < 1e19).then(|| f.abs() as u64);
    let n = match type_oid {
        INT2 => u64::from(i16::from_be_bytes(value.try_into().ok()?).unsigned_abs()),
        INT4 => u64::from(i32::from_be_bytes(value.try_into().ok()?).unsigned_abs()),
        OID | XID | CID => u64::from(u32::from_be_bytes(value.try_into().ok()?)),
        INT8 => i64::from_be_bytes(value.try_into().ok()?).unsigned_abs(),
        XID8 => u64::from_be_bytes(value.try_into().ok()?),
        FLOAT4 => whole(f64::from(f32::from_be_bytes(value.try_into().ok()?)))?,
        FLOAT8 => whole(f64::from_be_bytes(value.try_into().ok()?))?,
        NUMERIC => return numeric_digits(value, buf),
        _ => return None,
    };
    let mut n = n;
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.copy_within(at.., 0);
    Some(buf.len() - at)
}

/// Reads a 4-byte big-endian length or count: `None` past the end, `Some(None)` for -1
/// (a NULL element), and `None` for any other negative value.
fn read_len(value: &[u8], at: &mut usize) -> Option<Option<usize>> {
    let bytes = value.get(*at..*at + 4)?;
    *at += 4;
    match i32::from_be_bytes(bytes.try_into().ok()?) {
        -1 => Some(None),
        n => usize::try_from(n).ok().map(Some),
    }
}

/// The next element (length, then bytes) at `at`: `Some(None)` for NULL.
fn read_element<'v>(value: &'v [u8], at: &mut usize) -> Option<Option<&'v [u8]>> {
    let Some(len) = read_len(value, at)? else {
        return Some(None);
    };
    let element = value.get(*at..at.checked_add(len)?)?;
    *at += len;
    Some(Some(element))
}

/// Calls `visit(element type, element)` on each non-NULL element of a
/// binary array, until it returns true; `None` if `value` is not exactly
/// one binary array (elements seen before that were still visited).
fn each_array_element(value: &[u8], visit: &mut dyn FnMut(u32, &[u8]) -> bool) -> Option<()> {
    let mut at = 0;
    let dims = read_len(value, &mut at)??;
    let flags = read_len(value, &mut at)??;
    let element = u32::from_be_bytes(value.get(8..12)?.try_into().ok()?);
    at = 12;
    if dims > 6 || flags > 1 {
        return None;
    }
    let mut count: usize = usize::from(dims > 0);
    for _ in 0..dims {
        let size = read_len(value, &mut at)??;
        read_len(value, &mut at)?;
        count = count.checked_mul(size)?;
    }
    if count > value.len() / 4 {
        return None;
    }
    for _ in 0..count {
        if let Some(bytes) = read_element(value, &mut at)?
            && visit(element, bytes)
        {
            return Some(());
        }
    }
    (at == value.len()).then_some(())
}

/// Calls `visit(field type, field)` on each non-NULL field of a binary
/// record, until it returns true; `None` if `value` is not exactly one.
fn each_record_field(value: &[u8], visit: &mut dyn FnMut(u32, &[u8]) -> bool) -> Option<()> {
    let mut at = 0;
    let count = read_len(value, &mut at)??;
    if count > value.len() / 8 {
        return None;
    }
    for _ in 0..count {
        let oid = u32::from_be_bytes(value.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if let Some(bytes) = read_element(value, &mut at)?
            && visit(oid, bytes)
        {
            return Some(());
        }
    }
    (at == value.len()).then_some(())
}

/// Calls `visit` on each bound of a binary range, until it returns true;
/// `None` if `value` is not exactly one.
fn each_range_bound(value: &[u8], visit: &mut dyn FnMut(&[u8]) -> bool) -> Option<()> {
    const EMPTY: u8 = 0x01;
    const LOWER_INFINITE: u8 = 0x08;
    const UPPER_INFINITE: u8 = 0x10;
    let flags = *value.first()?;
    let mut at = 1;
    if flags & EMPTY == 0 {
        for infinite in [LOWER_INFINITE, UPPER_INFINITE] {
            if flags & infinite == 0
                && let Some(bound) = read_element(value, &mut at)?
                && visit(bound)
            {
                return Some(());
            }
        }
    }
    (at == value.len()).then_some(())
}

/// [`each_range_bound`] over every range of a binary multirange.
fn each_multirange_bound(value: &[u8], visit: &mut dyn FnMut(&[u8]) -> bool) -> Option<()> {
    let mut at = 0;
    let count = read_len(value, &mut at)??;
    for _ in 0..count {
        let range = read_element(value, &mut at)??;
        each_range_bound(range, visit)?;
    }
    (at == value.len()).then_some(())
}

/// [`binary_digits`] of a numeric: ndigits, weight, sign, dscale (i16
/// each), then base-10000 digits.
fn numeric_digits(value: &[u8], buf: &mut [u8; 64]) -> Option<usize> {
    let header = value.get(..8)?;
    let ndigits = i16::from_be_bytes([header[0], header[1]]);
    let weight = i16::from_be_bytes([header[2], header[3]]);
    let ndigits = usize::try_from(ndigits).ok()?;
    let digits = value.get(8..8 + 2 * ndigits)?;
    if weight < 0 {
        buf[0] = b'0';
        return Some(1);
    }
    let integer_groups = weight as usize + 1;
    let mut len = 0;
    for group in 0..integer_groups {
        let d = match digits.get(2 * group..2 * group + 2) {
            Some(pair) => u16::from_be_bytes([pair[0], pair[1]]),
            None => 0,
        };
        let text = [
            b'0' + (d / 1000) as u8,
            b'0' + (d / 100 % 10) as u8,
            b'0' + (d / 10 % 10) as u8,
            b'0' + (d % 10) as u8,
        ];
        for b in text {
            if len == 0 && b == b'0' {
                continue;
            }
            *buf.get_mut(len)? = b;
            len += 1;
        }
    }
    if len == 0 {
        buf[0] = b'0';
        len = 1;
    }
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_description(columns: &[(u32, i16)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(columns.len() as i16).to_be_bytes());
        for (type_oid, format) in columns {
            body.extend_from_slice(b"c\0");
            body.extend_from_slice(&0i32.to_be_bytes());
            body.extend_from_slice(&0i16.to_be_bytes());
            body.extend_from_slice(&type_oid.to_be_bytes());
            body.extend_from_slice(&(-1i16).to_be_bytes());
            body.extend_from_slice(&(-1i32).to_be_bytes());
            body.extend_from_slice(&format.to_be_bytes());
        }
        body
    }

    impl RowMasker {
        fn describe_for_test(&mut self, body: &[u8]) -> Result<(), MaskError> {
            self.describe(body, false)
        }
    }

    fn data_row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut message = vec![tag::DATA_ROW, 0, 0, 0, 0];
        message.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for value in values {
            match value {
                Some(v) => {
                    message.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    message.extend_from_slice(v);
                }
                None => message.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        let len = (message.len() - 1) as i32;
        message[1..5].copy_from_slice(&len.to_be_bytes());
        message
    }

    fn fields(message: &[u8]) -> Vec<Option<Vec<u8>>> {
        let len = i32::from_be_bytes(message[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, message.len(), "length prefix");
        let mut cur = Cursor::new(&message[5..]);
        let count = cur.count16("n").unwrap();
        let values = (0..count)
            .map(|_| cur.nullable_value("v").unwrap().map(<[u8]>::to_vec))
            .collect();
        cur.finish().unwrap();
        values
    }

    #[test]
    fn clean_rows_pass_unchanged_and_dirty_ones_are_rebuilt() {
        let mut masker = RowMasker::new(DetectorSet::ALL, ColumnRules::default());
        masker
            .describe_for_test(&row_description(&[(23, 0), (25, 0), (25, 0)]))
            .unwrap();
        let clean = data_row(&[Some(b"42"), Some(b"Ada Lovelace"), None]);
        let mut out = BytesMut::new();
        masker.data_row(&clean, &mut out).unwrap();
        assert_eq!(&out[..], &clean[..]);

        let dirty = data_row(&[Some(b"42"), Some(b"ada@example.com"), None]);
        out.clear();
        masker.data_row(&dirty, &mut out).unwrap();
        let got = fields(&out);
        assert_eq!(got[0].as_deref(), Some(&b"42"[..]));
        assert_eq!(got[1].as_deref(), Some(&b"****@example.com"[..]));
        assert_eq!(got[2], None);
        assert_eq!(masker.masked(), 1);
    }

    #[test]
    fn binary_values_are_masked_in_place_or_become_null() {
        let mut masker = RowMasker::new(DetectorSet::ALL, ColumnRules::default());
        // text, jsonb, int8 and a text[] array, all binary.
        masker
            .describe_for_test(&row_description(&[(25, 1), (3802, 1), (20, 1), (1009, 1), (1700, 1)]))
            .unwrap();
        let card: i64 = 4111111111111111;
        let mut array = vec![0u8; 20];
        array.extend_from_slice(b"ada@example.com");
        // numeric 4111111111111111: weight 3, digits 4111 1111 1111 1111.
        let mut numeric = Vec::new();
        for part in [4i16, 3, 0, 0, 4111, 1111, 1111, 1111] {
            numeric.extend_from_slice(&part.to_be_bytes());
        }
        let row = data_row(&[
            Some(b"call +1 415 555 0100"),
            Some(b"\x01{\"email\": \"ada@example.com\"}"),
            Some(&card.to_be_bytes()),
            Some(&array),
            Some(&numeric),
        ]);
        let mut out = BytesMut::new();
        masker.data_row(&row, &mut out).unwrap();
        let got = fields(&out);
        assert_eq!(got[0].as_deref(), Some(&b"call [masked:phone]"[..]));
        assert_eq!(got[1].as_deref(), Some(&b"\x01{\"email\": \"****@example.com\"}"[..]));
        assert_eq!(got[2], None, "a card number stored as int8");
        assert_eq!(got[3], None, "a binary array cannot be rewritten in place");
        assert_eq!(got[4], None, "a card number stored as numeric");
        // Ordinary numbers pass.
        let row = data_row(&[None, None, Some(&42i64.to_be_bytes()), None, None]);
        out.clear();
        masker.data_row(&row, &mut out).unwrap();
        assert_eq!(&out[..], &row[..]);
    }

    #[test]
    fn copy_text_and_csv_keep_their_shape() {
        let mut masker = RowMasker::new(DetectorSet::ALL, ColumnRules::default());
        masker.copy_out(&[0, 0, 2, 0, 0, 0, 0]).unwrap();
        for (line, want) in [
            (
                &b"1\tada@example.com\t123-45-6789\n"[..],
                &b"1\t****@example.com\t[masked:ssn]\n"[..],
            ),
            (
                b"1,\"Lovelace, Ada\",ada@example.com\n",
                b"1,\"Lovelace, Ada\",****@example.com\n",
            ),
        ] {
            let mut message = vec![tag::COPY_DATA];
            message.extend_from_slice(&((line.len() + 4) as i32).to_be_bytes());
            message.extend_from_slice(line);
            let mut out = BytesMut::new();
            masker.copy_data(&message, &mut out).unwrap();
            assert_eq!(&out[5..], want);
            assert_eq!(
                i32::from_be_bytes(out[1..5].try_into().unwrap()) as usize,
                want.len() + 4
            );
        }
    }

    #[test]
    fn a_quoted_csv_value_is_one_run() {
        let mut masker = RowMasker::new(DetectorSet::ALL, ColumnRules::default());
        masker.copy_out(&[0, 0, 1, 0, 0]).unwrap();
        let line = b"1,\"-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x\n-----END RSA PRIVATE KEY-----\"\n";
        let mut message = vec![tag::COPY_DATA];
        message.extend_from_slice(&((line.len() + 4) as i32).to_be_bytes());
        message.extend_from_slice(line);
        let mut out = BytesMut::new();
        masker.copy_data(&message, &mut out).unwrap();
        assert_eq!(&out[5..], b"1,\"[masked:private_key]\"\n");
    }

    #[test]
    fn errors_and_notifications_are_scrubbed() {
        let mut masker = RowMasker::new(DetectorSet::ALL, ColumnRules::default());
        let mut error = BytesMut::new();
        crate::protocol::backend::ErrorFields::new(
            crate::protocol::backend::Severity::Error,
            "22P02",
            "invalid input syntax for type integer: \"123-45-6789\"",
        )
        .encode(&mut error);
        let mut out = BytesMut::new();
        masker.error_or_notice(tag::ERROR_RESPONSE, &error, &mut out).unwrap();
        let got = crate::protocol::backend::ReceivedError::decode(&out[5..]).unwrap();
        assert_eq!(got.message, "invalid input syntax for type integer: \"[masked:ssn]\"");
        assert_eq!(got.code, "22P02");

        let mut note = vec![tag::NOTIFICATION_RESPONSE, 0, 0, 0, 0];
        note.extend_from_slice(&7i32.to_be_bytes());
        note.extend_from_slice(b"ch\0ada@example.com\0");
        let len = (note.len() - 1) as i32;
        note[1..5].copy_from_slice(&len.to_be_bytes());
        out.clear();
        masker.notification(&note, &mut out).unwrap();
        assert_eq!(&out[5..], b"\0\0\0\x07ch\0****@example.com\0");

        // A value at the start of a field follows the field's code letter
        // (RAISE EXCEPTION USING MESSAGE = ssn sends `M123-45-6789`).
        let mut error = BytesMut::new();
        crate::protocol::backend::ErrorFields::new(crate::protocol::backend::Severity::Error, "P0001", "123-45-6789")
            .encode(&mut error);
        out.clear();
        masker.error_or_notice(tag::ERROR_RESPONSE, &error, &mut out).unwrap();
        let got = crate::protocol::backend::ReceivedError::decode(&out[5..]).unwrap();
        assert_eq!(got.message, "[masked:ssn]");

        // A channel follows the process id, whose last byte may be a digit
        // (pg_notify(ssn, '')).
        let mut note = vec![tag::NOTIFICATION_RESPONSE, 0, 0, 0, 0];
        note.extend_from_slice(&0x34i32.to_be_bytes());
        note.extend_from_slice(b"123-45-6789\0\0");
        let len = (note.len() - 1) as i32;
        note[1..5].copy_from_slice(&len.to_be_bytes());
        out.clear();
        masker.notification(&note, &mut out).unwrap();
        assert_eq!(&out[5..], b"\0\0\0\x34[masked:ssn]\0\0");
    }

    /// A one-dimensional binary array of `element` values.
    fn binary_array(element: u32, values: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for word in [1i32, 0, element as i32, values.len() as i32, 1] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        for value in values {
            out.extend_from_slice(&(value.len() as i32).to_be_bytes());
            out.extend_from_slice(value);
        }
        out
    }

    fn binary_record(fields: &[(u32, &[u8])]) -> Vec<u8> {
        let mut out = (fields.len() as i32).to_be_bytes().to_vec();
        for (oid, value) in fields {
            out.extend_from_slice(&oid.to_be_bytes());
            out.extend_from_slice(&(value.len() as i32).to_be_bytes());
            out.extend_from_slice(value);
        }
        out
    }

    #[test]
    fn binary_arrays_records_ranges_and_numbers_are_read_as_their_text() {
        // What a probe used: values whose bytes hid them from the detectors.
        let card: i64 = 5555555555554444;
        // A bpchar(97) element: its length, 97, reads as an `a` joined to it.
        let mut ssn = b"937-11-7919".to_vec();
        ssn.resize(97, b' ');
        let mut phone = b"+1-415-555-0101".to_vec();
        phone.resize(48, b' ');
        let mut numeric = Vec::new();
        for part in [4i16, 3, 0, 0, 5555, 5555, 5555, 4444] {
            numeric.extend_from_slice(&part.to_be_bytes());
        }
        let mut range = vec![0x02u8]; // lower inclusive, both bounds present
        for bound in [card, card + 1] {
            range.extend_from_slice(&8i32.to_be_bytes());
            range.extend_from_slice(&bound.to_be_bytes());
        }
        let mut multirange = 1i32.to_be_bytes().to_vec();
        multirange.extend_from_slice(&(range.len() as i32).to_be_bytes());
        multirange.extend_from_slice(&range);
        let nested = binary_array(2249, &[&binary_record(&[(1042, &ssn)])]);
        let cases: [(&str, u32, Vec<u8>); 10] = [
            ("xid8", XID8, card.to_be_bytes().to_vec()),
            ("float8", FLOAT8, (card as f64).to_be_bytes().to_vec()),
            ("int8[]", 1016, binary_array(INT8, &[&card.to_be_bytes()])),
            ("numeric[]", 1231, binary_array(NUMERIC, &[&numeric])),
            ("bpchar[] of an ssn", 1014, binary_array(1042, &[&ssn])),
            ("bpchar[] of a phone", 1014, binary_array(1042, &[&phone])),
            (
                "record",
                2249,
                binary_record(&[(INT8, &card.to_be_bytes()), (23, &100i32.to_be_bytes())]),
            ),
            ("record[] of bpchar", 2287, nested),
            ("int8range", 3926, range),
            ("int8multirange", 4536, multirange),
        ];
        let masker = RowMasker::new(DetectorSet::ALL, ColumnRules::default());
        for (name, oid, value) in &cases {
            assert!(masker.binary_finds(*oid, value, 0), "{name}");
            // Arrays and records under a type the masker does not know (a
            // user type, an array of one) are read as what they are.
            if [1016, 1231, 1014, 2249, 2287].contains(oid) {
                assert!(masker.binary_finds(90000, value, 0), "{name} as a user type");
            }
        }
        // Ordinary values pass: numbers, text, and the same shapes without
        // a sensitive value.
        for (oid, value) in [
            (INT4, 4155550i32.to_be_bytes().to_vec()),
            (FLOAT8, 1.5f64.to_be_bytes().to_vec()),
            (1016, binary_array(INT8, &[&42i64.to_be_bytes(), &7i64.to_be_bytes()])),
            (1014, binary_array(1042, &[&[b'x'; 97]])),
            (2249, binary_record(&[(25, b"hello"), (23, &100i32.to_be_bytes())])),
        ] {
            assert!(!masker.binary_finds(oid, &value, 0), "{oid}");
        }
        // Too deep to read: judged found.
        let mut deep = binary_record(&[(25, b"x")]);
        for _ in 0..=MAX_NESTING {
            deep = binary_record(&[(2249, &deep)]);
        }
        assert!(masker.binary_finds(2249, &deep, 0));
    }

    #[test]
    fn binary_digits_read_int8_and_numeric() {
        let mut buf = [0u8; 64];
        let n = binary_digits(INT8, &(-1234567890123i64).to_be_bytes(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"1234567890123");
        let mut numeric = Vec::new();
        for part in [2i16, 1, 0, 2, 12, 3400] {
            numeric.extend_from_slice(&part.to_be_bytes());
        }
        // 12 3400 with weight 1: 123400
        let n = binary_digits(NUMERIC, &numeric, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"123400");
        assert_eq!(binary_digits(NUMERIC, b"\x00\x01", &mut buf), None);
    }
}
