//! What the audit trail records: one [`Event`] per thing that happened, as a
//! JSON document. The document is what the hash chain covers, so its
//! serialization is part of the trail's format: fields are only ever added.
//! One exception, before any release: the statements of a
//! [`Detail::Statements`] row leave out the session, identity and target
//! their row has, and the classification and columns an earlier member of
//! the row has; only readers that fill them in ([`Event::expand`], from
//! this version on) show them. A trail is read by the binary that wrote
//! it, or a later one.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// One thing that happened at the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When it happened.
    #[serde(serialize_with = "serialize_at")]
    pub at: DateTime<Utc>,
    /// The session it happened in (a failed login has one too: the id of
    /// the connection that tried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Who: the verified identity's name, once there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Where: the target's name, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(flatten)]
    pub detail: Detail,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Detail {
    /// A client logged in and its upstream session is open.
    SessionOpened {
        client: String,
        #[serde(default)]
        application: String,
        tls: bool,
        upstream_role: String,
        #[serde(default)]
        subject: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        email: Option<String>,
        #[serde(default)]
        groups: Vec<String>,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
    /// Statement events of one session that the writer took in one batch
    /// and stored as one row (see `writer::rows`): fewer rows, hashes and
    /// index entries per statement. The envelope is the first one's, and
    /// the statements' own session, identity and target are left out
    /// (they are the row's; rows written by earlier versions repeat them). Readers
    /// see the statements themselves, with the row's envelope
    /// ([`StoredEvent::expand`](super::StoredEvent::expand)).
    ///
    /// A session runs the same few statement shapes over and over, so a
    /// member may also leave out its classification (`statements`) or its
    /// completion's `columns` when an earlier member of the row has the
    /// same, byte for byte: `same_statements` and `same_columns` list
    /// those members as `[member, earlier]` pairs (indexes into
    /// `statements`, in increasing order of `member`), and readers copy
    /// the part over ([`Event::expand`]). Rows written by earlier
    /// versions have neither list and repeat every part.
    Statements {
        statements: Vec<Event>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        same_statements: Vec<[u32; 2]>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        same_columns: Vec<[u32; 2]>,
    },
    /// A login or session start that did not succeed.
    SessionRefused {
        client: String,
        /// The user name the client sent, if it got that far.
        #[serde(default)]
        user: String,
        code: String,
        reason: String,
    },
    /// A statement text the client sent, and what the gateway decided. The
    /// text has the content detectors' findings masked.
    Statement {
        /// Position of the statement in its session, from 1; its
        /// [`Detail::StatementDone`] carries the same number.
        seq: u64,
        /// How it arrived: "query", "execute" (of a prepared statement),
        /// "parse" (refused when prepared), "bind" (refused, or held for
        /// approval, at its Bind) or "function_call".
        source: String,
        text: String,
        /// "allow", "deny" or "require_approval".
        decision: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
        /// What the client was told, when it was refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refusal: Option<String>,
        /// Each statement of the text, as the classifier read it.
        #[serde(default)]
        statements: Vec<StatementRecord>,
        /// How it ended, when that was known before the writer stored it
        /// (almost always): the trail then keeps the statement and its
        /// completion as one event, and readers see the two
        /// ([`StoredEvent::expand`](super::StoredEvent::expand)). Last, so
        /// that its stored form is the statement's with this appended
        /// ([`join_completion`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        done: Option<Completion>,
    },
    /// How an allowed statement ended. Its fields after `seq` are
    /// [`Completion`]'s, in the same order.
    StatementDone {
        seq: u64,
        /// Rows returned or affected, when the server said.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rows: Option<u64>,
        duration_us: u64,
        /// The SQLSTATE when it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sqlstate: Option<String>,
        /// It never ran: an earlier message of its extended-protocol batch
        /// failed, and the server skipped the rest.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        skipped: bool,
        /// The columns of its results, in order (a string of several
        /// statements may return several): what the client got, from
        /// where, and how it was masked.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        columns: Vec<ColumnRecord>,
        /// The first rows of the result as the client received them (masked),
        /// with the content detectors run on them again whatever the
        /// session's masking, and long values cut.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        sample: Vec<Vec<Option<String>>>,
    },
    /// A session that sees clear values, by this grant.
    UnmaskGrantUsed { grant: String },
    /// The session ended.
    SessionClosed {
        reason: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        detail: String,
        statements: u64,
        refused: u64,
    },
    /// Statements were refused because the trail could not record them;
    /// written once it can again.
    AuditUnavailable { refused: u64, error: String },
    /// A statement was held for approval, or (with `access`) a grant was
    /// asked for.
    ApprovalRequested {
        request: u64,
        rule: String,
        statement: String,
        approvers: Vec<String>,
        needed: u32,
        expires: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        access: Option<AccessAsk>,
    },
    /// An approved access request: the grant holds until `until`.
    AccessGranted {
        request: u64,
        grant: String,
        /// The holder's subject (`sub`), which the grant is bound to.
        subject: String,
        /// RFC 3339.
        until: String,
    },
    /// A grant from an access request ended: "expired".
    AccessEnded {
        request: u64,
        grant: String,
        reason: String,
    },
    /// An approval request moved: one approval of several ("approval"),
    /// "approved", "denied", "expired" or "cancelled".
    ApprovalDecided {
        request: u64,
        decision: String,
        /// The approver; empty when the gateway ended it (expiry, the
        /// client left).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        by: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Where it was decided: "api", "console", "slack", "discord" or
        /// "gateway".
        via: String,
        /// The chat bot that decided on the approver's behalf.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delegate: Option<String>,
        /// The chat user who clicked (Slack or Discord user id).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chat_user: Option<String>,
    },
    /// Retention removed the oldest events, through a signed head (which
    /// stays, so that the chain still verifies from there).
    AuditPruned {
        /// Events older than this were due.
        before: String,
        through_id: u64,
        events: u64,
    },
}

impl Detail {
    /// The event type's name, as stored in the `kind` column.
    pub fn kind(&self) -> &'static str {
        match self {
            Detail::SessionOpened { .. } => "session_opened",
            Detail::SessionRefused { .. } => "session_refused",
            Detail::Statement { .. } => "statement",
            Detail::Statements { .. } => "statements",
            Detail::StatementDone { .. } => "statement_done",
            Detail::UnmaskGrantUsed { .. } => "unmask_grant_used",
            Detail::SessionClosed { .. } => "session_closed",
            Detail::AuditUnavailable { .. } => "audit_unavailable",
            Detail::AuditPruned { .. } => "audit_pruned",
            Detail::ApprovalRequested { .. } => "approval_requested",
            Detail::ApprovalDecided { .. } => "approval_decided",
            Detail::AccessGranted { .. } => "access_granted",
            Detail::AccessEnded { .. } => "access_ended",
        }
    }
}

/// How a statement ended: [`Detail::StatementDone`] without its `seq`,
/// field for field, so that the stored forms line up
/// ([`join_completion`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    pub duration_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<ColumnRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sample: Vec<Vec<Option<String>>>,
}

impl Completion {
    /// Its stored form, as [`join_completion`] takes it.
    pub fn to_json(&self) -> String {
        // As `Event::to_json`: serializing these types cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    /// [`Completion::to_json`], written into `buf` (a session's, reused)
    /// without serde, as the text `join_completion` takes: a session
    /// writes one per statement.
    pub fn write_json<'b>(&self, buf: &'b mut String) -> &'b str {
        self.write_fields(buf);
        buf
    }

    /// [`Completion::write_json`], and where in `buf` it wrote
    /// `,"columns":[…]` (none without columns): what [`Record::join`]
    /// keeps for a row to share.
    pub fn write_fields(&self, buf: &mut String) -> Option<std::ops::Range<usize>> {
        self.view(&self.sample_rows()).write_fields(buf)
    }

    /// Its sample rows in their stored form.
    pub fn sample_rows(&self) -> SampleRows {
        let mut sample = SampleRows::default();
        for row in &self.sample {
            let mut writer = sample.row();
            for value in row {
                writer.value(value.as_deref());
            }
            writer.finish();
        }
        sample
    }

    /// This completion borrowed, with `sample`, its [`Completion::sample_rows`].
    pub fn view<'a>(&'a self, sample: &'a SampleRows) -> CompletionView<'a> {
        CompletionView {
            rows: self.rows,
            duration_us: self.duration_us,
            sqlstate: self.sqlstate.as_deref(),
            skipped: self.skipped,
            columns: &self.columns,
            sample,
        }
    }

    /// The completion of statement `seq` as an event of its own.
    pub fn into_done(self, seq: u64) -> Detail {
        Detail::StatementDone {
            seq,
            rows: self.rows,
            duration_us: self.duration_us,
            sqlstate: self.sqlstate,
            skipped: self.skipped,
            columns: self.columns,
            sample: self.sample,
        }
    }

    /// A [`Detail::StatementDone`]'s completion and its `seq`.
    pub fn of_done(detail: Detail) -> Option<(u64, Completion)> {
        match detail {
            Detail::StatementDone {
                seq,
                rows,
                duration_us,
                sqlstate,
                skipped,
                columns,
                sample,
            } => Some((
                seq,
                Completion {
                    rows,
                    duration_us,
                    sqlstate,
                    skipped,
                    columns,
                    sample,
                },
            )),
            _ => None,
        }
    }
}

/// How a statement ended, as a session has it when it records that: a
/// [`Completion`]'s fields borrowed, its columns shared with the
/// session's other statements of the same shape and its sample rows in
/// their stored form ([`SampleRows`]), so that recording a completion
/// allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct CompletionView<'a> {
    pub rows: Option<u64>,
    pub duration_us: u64,
    pub sqlstate: Option<&'a str>,
    pub skipped: bool,
    pub columns: &'a [ColumnRecord],
    pub sample: &'a SampleRows,
}

impl CompletionView<'_> {
    /// [`Completion::to_json`] of the completion this stands for, written
    /// into `buf` (a session's, reused) without serde, as the text
    /// [`join_completion`] takes; and where in `buf` it wrote
    /// `,"columns":[…]` (none without columns): what [`Record::join`]
    /// keeps for a row to share.
    pub fn write_fields(&self, buf: &mut String) -> Option<std::ops::Range<usize>> {
        // Every field named: one added to the struct is an error here
        // until it is written.
        let CompletionView {
            rows,
            duration_us,
            sqlstate,
            skipped,
            columns,
            sample,
        } = *self;
        let mut number = itoa::Buffer::new();
        buf.clear();
        buf.push('{');
        if let Some(rows) = rows {
            buf.push_str("\"rows\":");
            buf.push_str(number.format(rows));
            buf.push(',');
        }
        buf.push_str("\"duration_us\":");
        buf.push_str(number.format(duration_us));
        push_json_field(buf, ",\"sqlstate\":", sqlstate);
        if skipped {
            buf.push_str(",\"skipped\":true");
        }
        let columns_at = buf.len();
        if !columns.is_empty() {
            buf.push_str(",\"columns\":[");
            for (n, column) in columns.iter().enumerate() {
                let ColumnRecord {
                    name,
                    origin,
                    masking,
                    tags,
                } = column;
                if n > 0 {
                    buf.push(',');
                }
                buf.push_str("{\"name\":");
                push_json_str(buf, name);
                push_json_field(buf, ",\"origin\":", origin.as_deref());
                buf.push_str(",\"masking\":");
                push_json_str(buf, masking);
                if !tags.is_empty() {
                    buf.push_str(",\"tags\":");
                    push_json_strs(buf, tags.iter().map(|tag| Some(tag.as_str())));
                }
                buf.push('}');
            }
            buf.push(']');
        }
        let columns = (buf.len() > columns_at).then_some(columns_at..buf.len());
        if !sample.is_empty() {
            buf.push_str(",\"sample\":[");
            buf.push_str(&sample.json);
            buf.push(']');
        }
        buf.push('}');
        columns
    }

    /// The completion this stands for, owned: for one recorded as an event
    /// of its own.
    pub fn to_completion(&self) -> Completion {
        Completion {
            rows: self.rows,
            duration_us: self.duration_us,
            sqlstate: self.sqlstate.map(str::to_string),
            skipped: self.skipped,
            columns: self.columns.to_vec(),
            sample: self.sample.to_rows(),
        }
    }
}

/// A statement's sample rows ([`Completion`]'s `sample`) in their stored
/// form as a session gathers them: each row a JSON array of strings and
/// nulls, the rows separated by commas, without the brackets around them.
/// One buffer for all of a statement's rows, which a session hands on to
/// its next statement: sampling a row allocates nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SampleRows {
    json: String,
    rows: usize,
}

impl SampleRows {
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Bytes its buffer holds: whether it is worth keeping for reuse.
    pub fn capacity(&self) -> usize {
        self.json.capacity()
    }

    /// No rows; the buffer stays.
    pub fn clear(&mut self) {
        self.json.clear();
        self.rows = 0;
    }

    /// Starts a row: its values follow ([`SampleRow::value`]), and it
    /// counts once [`SampleRow::finish`]ed. A row dropped before that
    /// (its message did not read) leaves nothing behind.
    pub fn row(&mut self) -> SampleRow<'_> {
        let start = self.json.len();
        if self.rows > 0 {
            self.json.push(',');
        }
        self.json.push('[');
        SampleRow {
            rows: self,
            start,
            values: 0,
            finished: false,
        }
    }

    /// Adds the first `n` rows of `other` (a portal's later pieces, to
    /// its statement).
    pub fn extend_from(&mut self, other: &SampleRows, n: usize) {
        let n = n.min(other.rows);
        if n == 0 {
            return;
        }
        let end = row_ends(&other.json).nth(n - 1).unwrap_or(other.json.len());
        if self.rows > 0 {
            self.json.push(',');
        }
        self.json.push_str(&other.json[..end]);
        self.rows += n;
    }

    /// The rows as values.
    pub fn to_rows(&self) -> Vec<Vec<Option<String>>> {
        // Written by `row`, so it reads (an empty list otherwise, which
        // only loses the sample).
        serde_json::from_str(&format!("[{}]", self.json)).unwrap_or_default()
    }
}

/// Where each row of a [`SampleRows`]' text ends (after its `]`): at
/// depth 0, outside strings.
fn row_ends(json: &str) -> impl Iterator<Item = usize> + '_ {
    let (mut in_string, mut escaped, mut depth) = (false, false, 0u32);
    json.bytes().enumerate().filter_map(move |(at, byte)| {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            return None;
        }
        match byte {
            b'"' => in_string = true,
            b'[' => depth += 1,
            b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some(at + 1);
                }
            }
            _ => {}
        }
        None
    })
}

/// A row being added to [`SampleRows`].
pub struct SampleRow<'s> {
    rows: &'s mut SampleRows,
    start: usize,
    values: usize,
    finished: bool,
}

impl SampleRow<'_> {
    /// Its next value (`None`: SQL NULL).
    pub fn value(&mut self, value: Option<&str>) {
        if self.values > 0 {
            self.rows.json.push(',');
        }
        self.values += 1;
        match value {
            Some(value) => push_json_str(&mut self.rows.json, value),
            None => self.rows.json.push_str("null"),
        }
    }

    pub fn finish(mut self) {
        self.rows.json.push(']');
        self.rows.rows += 1;
        self.finished = true;
    }
}

impl Drop for SampleRow<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.rows.json.truncate(self.start);
        }
    }
}

/// Joins a completion to its statement in their stored forms, in place:
/// `statement` (without `done`) becomes what serializing it with `done`
/// set gives, and `completion` is [`Completion::to_json`]; nothing is
/// serialized again. False, and nothing changed, when they are not such
/// stored forms.
pub fn join_completion(statement: &mut String, completion: &str) -> bool {
    if !completion.starts_with('{') || !completion.ends_with('}') || !statement.ends_with('}') {
        return false;
    }
    statement.pop();
    statement.push_str(",\"done\":");
    statement.push_str(completion);
    statement.push('}');
    true
}

/// A completion's stored form ([`Completion::to_json`]) without its
/// opening brace: what follows a `statement_done` event's `seq`.
fn completion_rest(fields: &str) -> Option<&str> {
    fields.strip_prefix('{').filter(|rest| rest.ends_with('}'))
}

/// Appends a `statement_done` event's tag, `seq` and the completion's
/// fields (`rest`: [`completion_rest`]) after its envelope, closing it.
fn push_done_fields(out: &mut String, seq: u64, rest: &str) {
    out.push_str(",\"type\":\"statement_done\",\"seq\":");
    out.push_str(itoa::Buffer::new().format(seq));
    if rest != "}" {
        out.push(',');
    }
    out.push_str(rest);
}

/// Where a statement event's stored form has its `type` tag, after its
/// envelope (`at`, `session`, `identity`, `target`): inside a JSON string
/// every quote is escaped, so the first such tag is the real one.
fn statement_tag(stored: &str) -> Option<usize> {
    // Built once: `str::find` builds its searcher on every call, and the
    // writer looks for the tag in every statement it groups.
    static TAG: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"type\":\"statement\","));
    TAG.find(stored.as_bytes())
}

/// How many of the different classifications (and column lists) a row
/// has seen last a member's is compared with: a session's transaction of
/// a few statement shapes, repeated, shares them all.
const SHARED_KEPT: usize = 4;

/// The stored form of a [`Detail::Statements`] row, built from the
/// records of a session's statement events: the row takes the first
/// one's envelope (`at`, `session`, `identity`, `target`) and its members
/// leave theirs out; a member whose classification or columns one of the
/// last few different ones of the row has, byte for byte, leaves them
/// out too, and the row lists it (`same_statements`, `same_columns`).
/// Without shared parts, what it builds is exactly what serializing the
/// row's `Event` gives with its members' envelope left out; either way,
/// [`Event::expand`] reads every member back whole (both tested).
pub struct StatementsRow<'r> {
    json: String,
    members: u32,
    statements: Recent<'r>,
    columns: Recent<'r>,
    same_statements: Vec<[u32; 2]>,
    same_columns: Vec<[u32; 2]>,
}

/// The parts a row has seen last, each with the member that has it,
/// most recent first.
#[derive(Default)]
struct Recent<'r>(Vec<(u32, &'r str)>);

impl<'r> Recent<'r> {
    /// The earlier member with `part`; else `part` is kept as `member`'s.
    fn earlier(&mut self, member: u32, part: &'r str) -> Option<u32> {
        if let Some(at) = self.0.iter().position(|&(_, seen)| seen == part) {
            self.0[..=at].rotate_right(1);
            return Some(self.0[0].0);
        }
        if self.0.len() == SHARED_KEPT {
            self.0.pop();
        }
        self.0.insert(0, (member, part));
        None
    }
}

impl<'r> StatementsRow<'r> {
    /// A row that starts with `first`, with room for `capacity` bytes;
    /// `None` when `first` is not the stored form of a statement event.
    pub fn start(first: &'r Record, capacity: usize) -> Option<StatementsRow<'r>> {
        let tag = member_tag(first)?;
        let mut json = String::with_capacity(capacity);
        json.push_str(&first.json[..tag]);
        json.push_str("\"type\":\"statements\",\"statements\":[");
        let mut row = StatementsRow {
            json,
            members: 0,
            statements: Recent::default(),
            columns: Recent::default(),
            same_statements: Vec::new(),
            same_columns: Vec::new(),
        };
        row.push_member(first, tag);
        Some(row)
    }

    /// Adds a statement event of the row's session.
    pub fn push(&mut self, member: &'r Record) {
        self.json.push(',');
        match member_tag(member) {
            Some(tag) => self.push_member(member, tag),
            // Not a statement's stored form: whole, as it is.
            None => {
                self.members += 1;
                self.json.push_str(&member.json);
            }
        }
    }

    /// The row's stored form.
    pub fn finish(mut self) -> String {
        self.json.push(']');
        for (name, pairs) in [
            (",\"same_statements\":[", &self.same_statements),
            (",\"same_columns\":[", &self.same_columns),
        ] {
            if pairs.is_empty() {
                continue;
            }
            self.json.push_str(name);
            let mut number = itoa::Buffer::new();
            for (n, [member, earlier]) in pairs.iter().enumerate() {
                if n > 0 {
                    self.json.push(',');
                }
                self.json.push('[');
                self.json.push_str(number.format(*member));
                self.json.push(',');
                self.json.push_str(number.format(*earlier));
                self.json.push(']');
            }
            self.json.push(']');
        }
        self.json.push('}');
        self.json
    }

    /// A statement's stored form (its tag at `tag`) as the row's member:
    /// its `at`, then what follows its envelope, without the parts an
    /// earlier member has.
    fn push_member(&mut self, member: &'r Record, tag: usize) {
        let n = self.members;
        self.members += 1;
        let stored = member.json.as_str();
        let at = member.parts.at as usize;
        // Parts that do not match the stored form are not used at all.
        let trusted = member.parts.tag as usize == tag && at > 0 && at < tag && stored.is_char_boundary(at);
        let parts = if trusted { member.parts } else { Parts::default() };
        if trusted {
            self.json.push_str(&stored[..at]);
            self.json.push(',');
        } else {
            // Written by serde: `at` is the first field, a string without
            // quotes or escapes in it.
            const AT: &str = "{\"at\":\"";
            let at_end = stored
                .strip_prefix(AT)
                .and_then(|rest| rest.find('"'))
                .map(|end| AT.len() + end + 2)
                .filter(|&end| end <= tag && stored.get(end - 2..end) == Some("\","));
            match at_end {
                Some(end) => self.json.push_str(&stored[..end]),
                None => {
                    self.json.push_str(stored);
                    return;
                }
            }
        }
        let mut from = tag;
        for (span, name, recent, same) in [
            (
                parts.statements,
                ",\"statements\":[",
                &mut self.statements,
                &mut self.same_statements,
            ),
            (
                parts.columns,
                ",\"columns\":[",
                &mut self.columns,
                &mut self.same_columns,
            ),
        ] {
            let Some(range) = span.range().filter(|range| range.start >= from) else {
                continue;
            };
            let Some(part) = stored
                .get(range.clone())
                .filter(|part| part.starts_with(name) && part.ends_with(']'))
            else {
                continue;
            };
            if let Some(earlier) = recent.earlier(n, part) {
                self.json.push_str(&stored[from..range.start]);
                from = range.end;
                same.push([n, earlier]);
            }
        }
        self.json.push_str(&stored[from..]);
    }
}

/// Where a statement event's stored form has its `type` tag: where its
/// writer put it, or found.
fn member_tag(record: &Record) -> Option<usize> {
    let tag = record.parts.tag as usize;
    if tag > 0
        && record
            .json
            .get(tag..)
            .is_some_and(|rest| rest.starts_with("\"type\":\"statement\","))
    {
        return Some(tag);
    }
    statement_tag(&record.json)
}

/// One column of a statement's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnRecord {
    /// As the client saw it (aliases included).
    pub name: String,
    /// `schema.table.column` it comes from, when the gateway knows the
    /// column: those of tagged relations and tagged or masked columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// How its values left the gateway: "rule" (a masking rule replaced
    /// them), "expression" (an expression over masked data, masked whole),
    /// "detectors" (values the content detectors flag are masked) or
    /// "clear" (the session holds the unmask grant, or masking is off).
    pub masking: String,
    /// Tags of its origin, from `[[audit.tags]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// What an access request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessAsk {
    /// The grant's name in the policy.
    pub grant: String,
    /// For how long once approved, in seconds.
    pub seconds: u64,
}

/// One statement of a text, as classified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementRecord {
    pub kind: String,
    pub command: String,
    /// `schema.name (access)`, or `name (access)` when unqualified.
    #[serde(default)]
    pub relations: Vec<String>,
    #[serde(default)]
    pub features: Vec<String>,
    /// Tags of the relations it touches (`[[audit.tags]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl StatementRecord {
    pub fn of(statement: &crate::policy::StatementClass, tags: &[crate::config::TagRule]) -> StatementRecord {
        let mut tagged: Vec<String> = tags
            .iter()
            .filter(|rule| {
                statement
                    .relations
                    .iter()
                    .any(|r| rule.relations.iter().any(|p| p.covers(r.schema.as_deref(), &r.name)))
            })
            .map(|rule| rule.tag.clone())
            .collect();
        tagged.dedup();
        StatementRecord {
            kind: statement.kind.name().into(),
            command: statement.command.clone(),
            relations: statement.relations.iter().map(ToString::to_string).collect(),
            features: statement.features.iter().map(|f| f.name().to_string()).collect(),
            tags: tagged,
        }
    }
}

/// A statement's classified statements as the trail records them, with
/// their stored form, serialized once: a session runs the same few
/// statement shapes over and over, and each of its statement events
/// takes this text as it is ([`Record::statement`]).
#[derive(Debug, PartialEq, Eq)]
pub struct StatementRecords {
    records: Vec<StatementRecord>,
    json: String,
}

impl StatementRecords {
    pub fn new(records: Vec<StatementRecord>) -> StatementRecords {
        // As `Event::to_json`: serializing these cannot fail.
        let json = serde_json::to_string(&records).unwrap_or_else(|_| "[]".into());
        StatementRecords { records, json }
    }

    /// No statements (a text the gateway has not classified), shared.
    pub fn none() -> Arc<StatementRecords> {
        static NONE: std::sync::LazyLock<Arc<StatementRecords>> =
            std::sync::LazyLock::new(|| Arc::new(StatementRecords::new(Vec::new())));
        NONE.clone()
    }

    pub fn records(&self) -> &[StatementRecord] {
        &self.records
    }
}

/// Appends `value` to `out` as a JSON string, escaped exactly as
/// serde_json escapes it (quote, backslash and the control characters),
/// so that a stored form written piece by piece is byte for byte what
/// serializing its event gives.
fn push_json_str(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let bytes = value.as_bytes();
    let mut start = 0;
    let mut at = 0;
    while at < bytes.len() {
        // Eight bytes at a time while none of them needs escaping: most
        // text has nothing to escape, and a session writes a statement's
        // text, source and decision this way for every statement.
        if let Some(word) = bytes.get(at..at + 8).and_then(|w| <[u8; 8]>::try_from(w).ok())
            && !needs_escape(u64::from_le_bytes(word))
        {
            at += 8;
            continue;
        }
        let chunk = &bytes[at..(at + 8).min(bytes.len())];
        for (at, &byte) in (at..).zip(chunk) {
            if byte >= 0x20 && byte != b'"' && byte != b'\\' {
                continue;
            }
            // An ASCII byte: `at` is a character boundary.
            out.push_str(&value[start..at]);
            start = at + 1;
            match byte {
                b'"' => out.push_str("\\\""),
                b'\\' => out.push_str("\\\\"),
                b'\n' => out.push_str("\\n"),
                b'\r' => out.push_str("\\r"),
                b'\t' => out.push_str("\\t"),
                0x08 => out.push_str("\\b"),
                0x0c => out.push_str("\\f"),
                _ => {
                    out.push_str("\\u00");
                    out.push(char::from(HEX[usize::from(byte >> 4)]));
                    out.push(char::from(HEX[usize::from(byte & 0xf)]));
                }
            }
        }
        at += 8;
    }
    out.push_str(&value[start..]);
    out.push('"');
}

/// Whether any of the eight bytes in `word` is one JSON escapes: a control
/// character (below 0x20), a quote or a backslash. Exact: the usual
/// "has a byte less than n" and "has a zero byte" tests can only go wrong
/// in bytes above one that really matches. Bytes of multi-byte UTF-8
/// characters (0x80 and up) never match.
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH;
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    let quote = has_zero(word ^ (ONES * u64::from(b'"')));
    let backslash = has_zero(word ^ (ONES * u64::from(b'\\')));
    (control | quote | backslash) != 0
}

/// Appends `name` (`,"name":`) and `value` to `out`, when there is a value.
fn push_json_field(out: &mut String, name: &str, value: Option<&str>) {
    if let Some(value) = value {
        out.push_str(name);
        push_json_str(out, value);
    }
}

/// Appends `values` to `out` as a JSON array of strings and nulls.
fn push_json_strs<'v>(out: &mut String, values: impl Iterator<Item = Option<&'v str>>) {
    out.push('[');
    for (n, value) in values.enumerate() {
        if n > 0 {
            out.push(',');
        }
        match value {
            Some(value) => push_json_str(out, value),
            None => out.push_str("null"),
        }
    }
    out.push(']');
}

/// Appends `at` in its stored form ([`serialize_at`]) to `out`.
fn push_at(out: &mut String, at: &DateTime<Utc>) {
    let mut buf = [0u8; 30];
    match stored_at(at, &mut buf) {
        Some(text) => {
            out.push('"');
            out.push_str(text);
            out.push('"');
        }
        // Outside the years 0 to 9999, or a leap second: chrono's form
        // (its serializer writes this text).
        None => push_json_str(out, &at.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
    }
}

/// Fills in the part a row's member left out from the earlier member
/// that has it (`pairs`: [`Detail::Statements`]'s `same_statements` or
/// `same_columns`). A pair that does not point back to an earlier member,
/// or at a member that has the part already, changes nothing.
fn share<T: Clone>(members: &mut [Event], pairs: &[[u32; 2]], part: impl Fn(&mut Event) -> Option<&mut Vec<T>>) {
    for &[member, earlier] in pairs {
        let (member, earlier) = (member as usize, earlier as usize);
        if earlier >= member || member >= members.len() {
            continue;
        }
        let (before, after) = members.split_at_mut(member);
        if let (Some(from), Some(to)) = (part(&mut before[earlier]), part(&mut after[0]))
            && to.is_empty()
        {
            to.clone_from(from);
        }
    }
}

impl Event {
    pub fn now(detail: Detail) -> Event {
        Event {
            at: Utc::now(),
            session: None,
            identity: None,
            target: None,
            detail,
        }
    }

    pub fn in_session(mut self, session: &str) -> Event {
        self.session = Some(session.into());
        self
    }

    pub fn by(mut self, identity: &str, target: &str) -> Event {
        self.identity = Some(identity.into());
        self.target = Some(target.into());
        self
    }

    /// The events this one stands for, in order, into `out`: itself; for
    /// a statement kept with its completion, the statement and then the
    /// completion ([`Event::take_completion`]); for several statements
    /// kept as one row, each of them so.
    pub fn expand(mut self, out: &mut Vec<Event>) {
        match &mut self.detail {
            Detail::Statements {
                statements,
                same_statements,
                same_columns,
            } => {
                let mut members = std::mem::take(statements);
                share(&mut members, same_statements, |member| match &mut member.detail {
                    Detail::Statement { statements, .. } => Some(statements),
                    _ => None,
                });
                share(&mut members, same_columns, |member| match &mut member.detail {
                    Detail::Statement { done: Some(done), .. } => Some(&mut done.columns),
                    _ => None,
                });
                for mut statement in members {
                    for (theirs, row) in [
                        (&mut statement.session, &self.session),
                        (&mut statement.identity, &self.identity),
                        (&mut statement.target, &self.target),
                    ] {
                        if theirs.is_none() {
                            theirs.clone_from(row);
                        }
                    }
                    statement.expand(out);
                }
            }
            _ => {
                let done = self.take_completion();
                out.push(self);
                out.extend(done);
            }
        }
    }

    /// Takes a statement's completion out of it (see [`Detail::Statement`]'s
    /// `done`), as the [`Detail::StatementDone`] event it stands for, timed
    /// at the statement's time plus its duration.
    pub fn take_completion(&mut self) -> Option<Event> {
        let Detail::Statement { seq, done, .. } = &mut self.detail else {
            return None;
        };
        let done = done.take()?;
        let took = chrono::Duration::microseconds(i64::try_from(done.duration_us).unwrap_or(i64::MAX));
        Some(Event {
            at: self.at.checked_add_signed(took).unwrap_or(self.at),
            session: self.session.clone(),
            identity: self.identity.clone(),
            target: self.target.clone(),
            detail: done.into_done(*seq),
        })
    }

    /// The stored form: the bytes the chain hashes.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: no maps with non-string keys,
        // no custom serializers that error.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"type\":\"unserializable\",\"error\":\"{e}\"}}"))
    }

    /// What happened, in one line of plain text for people (`sluice audit
    /// show`, the console). Not escaped: texts in it come from clients and
    /// approvers, and whoever draws it must make control characters
    /// harmless.
    pub fn summary(&self) -> String {
        match &self.detail {
            Detail::SessionOpened {
                client,
                application,
                tls,
                upstream_role,
                ..
            } => format!(
                "session opened by {} from {client} ({}{}), upstream role {upstream_role}",
                self.identity.as_deref().unwrap_or("?"),
                if application.is_empty() {
                    "no application name"
                } else {
                    application
                },
                if *tls { ", TLS" } else { "" }
            ),
            Detail::SessionRefused {
                client,
                user,
                code,
                reason,
            } => {
                format!("session refused ({code}) for {user:?} from {client}: {reason}")
            }
            Detail::Statement {
                seq,
                source,
                text,
                decision,
                rule,
                refusal,
                ..
            } => {
                let rule = rule.as_deref().map(|r| format!(" by rule {r:?}")).unwrap_or_default();
                let refusal = refusal.as_deref().map(|r| format!(" -- {r}")).unwrap_or_default();
                format!("#{seq} {source} {decision}{rule}: {text}{refusal}")
            }
            Detail::StatementDone {
                seq,
                rows,
                duration_us,
                sqlstate,
                skipped,
                ..
            } => {
                let outcome = match (sqlstate, skipped) {
                    (_, true) => "skipped (an earlier message of its batch failed)".to_string(),
                    (Some(code), _) => format!("failed with SQLSTATE {code}"),
                    (None, _) => "ok".to_string(),
                };
                let rows = rows.map(|r| format!(", {r} rows")).unwrap_or_default();
                format!("#{seq} done: {outcome}{rows}, {:.3} ms", *duration_us as f64 / 1000.0)
            }
            Detail::Statements { statements, .. } => format!("{} statements", statements.len()),
            Detail::UnmaskGrantUsed { grant } => format!("unmask grant {grant:?} used: this session sees clear values"),
            Detail::SessionClosed {
                reason,
                detail,
                statements,
                refused,
            } => {
                let detail = if detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({detail})")
                };
                format!("session closed: {reason}{detail}; {statements} statements, {refused} refused")
            }
            Detail::AuditUnavailable { refused, error } => {
                format!("the trail was unavailable ({error}); {refused} statements were refused meanwhile")
            }
            Detail::ApprovalRequested {
                request,
                rule,
                approvers,
                needed,
                expires,
                access: Some(access),
                ..
            } => format!(
                "asked for grant {rule:?} for {}: request {request}, {needed} of {} until {expires}",
                crate::config::human_duration(std::time::Duration::from_secs(access.seconds)),
                approvers.join(", ")
            ),
            Detail::ApprovalRequested {
                request,
                rule,
                approvers,
                needed,
                expires,
                ..
            } => format!(
                "held for approval: request {request} (rule {rule:?}), {needed} of {} until {expires}",
                approvers.join(", ")
            ),
            Detail::AccessGranted {
                request, grant, until, ..
            } => format!("grant {grant:?} holds until {until} (request {request})"),
            Detail::AccessEnded { request, grant, reason } => {
                format!("grant {grant:?} ended: {reason} (request {request})")
            }
            Detail::ApprovalDecided {
                request,
                decision,
                by,
                reason,
                via,
                delegate,
                chat_user,
            } => {
                let by = if by.is_empty() {
                    String::new()
                } else {
                    format!(" by {by}")
                };
                let reason = reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
                let chat = match (chat_user, delegate) {
                    (Some(user), Some(bot)) => format!(", user {user} through {bot}"),
                    (Some(user), None) => format!(", user {user}"),
                    (None, Some(bot)) => format!(", through {bot}"),
                    (None, None) => String::new(),
                };
                format!("request {request} {decision}{by} (via {via}{chat}){reason}")
            }
            Detail::AuditPruned {
                before,
                through_id,
                events,
            } => format!("retention removed {events} events older than {before} (through event {through_id})"),
        }
    }

    /// `at` as stored: RFC 3339 in UTC with microseconds, so that text order
    /// is time order.
    pub fn at_text(&self) -> String {
        self.at.to_rfc3339_opts(SecondsFormat::Micros, true)
    }
}

/// `at` in the stored form: RFC 3339 in UTC with as many fractional
/// digits as it needs (none, 3, 6 or 9), exactly what chrono's serializer
/// writes, without its formatting machinery (which writes, and serde_json
/// escapes, a character at a time: a third of an event's serialization).
fn serialize_at<S: serde::Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 30];
    match stored_at(at, &mut buf) {
        Some(text) => serializer.serialize_str(text),
        None => at.serialize(serializer),
    }
}

/// [`serialize_at`]'s text, for the years 0 to 9999 and times that are
/// not leap seconds (else None: chrono's formatting then).
fn stored_at<'b>(at: &DateTime<Utc>, buf: &'b mut [u8; 30]) -> Option<&'b str> {
    use chrono::{Datelike, Timelike};
    let (date, time) = (at.date_naive(), at.time());
    let year = u32::try_from(date.year()).ok().filter(|year| *year <= 9999)?;
    let nanos = time.nanosecond();
    if nanos >= 1_000_000_000 {
        return None;
    }
    let (fraction, digits) = match nanos {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    let mut put = |at: usize, mut value: u32, width: usize| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year, 4);
    put(5, date.month(), 2);
    put(8, date.day(), 2);
    put(11, time.hour(), 2);
    put(14, time.minute(), 2);
    put(17, time.second(), 2);
    let mut len = 19;
    if digits > 0 {
        put(20, fraction, digits);
        len = 20 + digits;
    }
    for (at, byte) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.')] {
        buf[at] = byte;
    }
    buf[len] = b'Z';
    std::str::from_utf8(&buf[..=len]).ok()
}

/// An event as the store takes it: its stored form, serialized once by
/// whoever records it (a session, on its own thread), and the columns the
/// trail is searched by. The rest of the event (statement text,
/// classification, samples: a dozen allocations) is freed where it was
/// made: memory allocated on one thread and freed on another costs any
/// allocator more (glibc's much more: the binary uses mimalloc), and this
/// keeps that to the JSON and a reference to the envelope, which a
/// session's statements share (other events have one of their own).
#[derive(Debug, Clone)]
pub struct Record {
    /// [`Event::to_json`]: the bytes the chain hashes.
    pub json: String,
    pub at: DateTime<Utc>,
    pub kind: &'static str,
    /// A statement's or completion's number in its session (else 0).
    pub seq: u64,
    /// Who and where. A session's statements share one
    /// ([`Record::statement`]): nothing to copy, and one reference count
    /// to drop where the writer frees them.
    pub envelope: Arc<Envelope>,
    /// Where a statement's stored form has what a row of statements
    /// takes apart, when whoever wrote it knows.
    pub parts: Parts,
}

/// Byte offsets into a statement's stored form ([`Record::json`]) of the
/// pieces a [`Detail::Statements`] row takes apart: the member leaves out
/// the envelope and, when an earlier member has the same, its
/// classification and its columns ([`StatementsRow`]). Known for the
/// statements sessions write ([`Record::statement`], [`Record::join`]):
/// the writer then neither searches the text nor parses it. All zero
/// (unknown) for other records; a row takes those whole. Nothing changes
/// a record's `json` once built but [`Record::join`], which keeps these
/// true; the row still checks that each lands on what it names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Parts {
    /// The end of `{"at":"…"`.
    at: u32,
    /// The start of `"type":"statement"`, after the envelope.
    tag: u32,
    /// `,"statements":[…]`.
    statements: Span,
    /// `,"columns":[…]` in the joined completion.
    columns: Span,
}

/// A byte range; empty when not known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// `range`, if it has bytes and fits in a `u32` (a stored form over 4
    /// GiB is far over the journal's and a row's limits anyway).
    fn of(range: std::ops::Range<usize>) -> Span {
        match (u32::try_from(range.start), u32::try_from(range.end)) {
            (Ok(start), Ok(end)) if start < end => Span { start, end },
            _ => Span::default(),
        }
    }

    fn range(self) -> Option<std::ops::Range<usize>> {
        (self.start < self.end).then_some(self.start as usize..self.end as usize)
    }
}

/// An event's session, identity and target ([`Event`]'s fields).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    pub session: Option<String>,
    pub identity: Option<String>,
    pub target: Option<String>,
}

impl Envelope {
    /// A session's, for its statements' [`Record::statement`].
    pub fn of_session(session: &str, identity: &str, target: &str) -> Arc<Envelope> {
        Arc::new(Envelope {
            session: Some(session.into()),
            identity: Some(identity.into()),
            target: Some(target.into()),
        })
    }
}

/// A statement event's fields after the envelope, borrowed: what
/// [`Record::statement`] serializes, to the same stored form as
/// [`Detail::Statement`] (without `done`, which its completion adds).
#[derive(Debug, Clone, Copy)]
pub struct StatementView<'a> {
    pub seq: u64,
    pub source: &'a str,
    pub text: &'a str,
    pub decision: &'a str,
    pub rule: Option<&'a str>,
    pub refusal: Option<&'a str>,
    pub statements: &'a StatementRecords,
}

/// Bytes a statement's stored form is allocated with beyond what
/// [`Record::statement`] expects it to take, for its completion to join
/// it without growing it (a pgbench row's takes about a hundred).
const COMPLETION_ROOM: usize = 192;

impl Record {
    pub fn new(event: Event) -> Record {
        let json = event.to_json();
        Record::stored(event, json)
    }

    /// A statement event of the session `envelope` is, written from
    /// borrowed parts: the stored form [`Event::to_json`] gives for the
    /// same event, without building it (a dozen allocations, freed on the
    /// writer's thread) or running serde over it (its classification is
    /// serialized already, [`StatementRecords`]). Sessions record one per
    /// statement. It writes [`Detail::Statement`]'s fields in their serde
    /// order: a field added there must be added here (the test that
    /// compares the two builds every field, so it stops compiling). It is
    /// written into `buffer` (emptied first): sessions pass one the writer
    /// is done with ([`Auditor::write_ahead_statement`]).
    ///
    /// [`Auditor::write_ahead_statement`]: super::Auditor::write_ahead_statement
    pub fn statement(buffer: String, at: DateTime<Utc>, envelope: &Arc<Envelope>, view: StatementView<'_>) -> Record {
        let fields = [
            (",\"session\":", envelope.session.as_deref()),
            (",\"identity\":", envelope.identity.as_deref()),
            (",\"target\":", envelope.target.as_deref()),
        ];
        let optional = [(",\"rule\":", view.rule), (",\"refusal\":", view.refusal)];
        // Sized once: the field names and fixed values take at most 250
        // bytes; a statement that runs gets its completion joined. (Text
        // that needs escaping grows it.)
        let strings = [view.source, view.text, view.decision]
            .into_iter()
            .chain(fields.iter().chain(&optional).filter_map(|(_, value)| *value))
            .map(str::len)
            .sum::<usize>();
        let room = if view.refusal.is_none() { COMPLETION_ROOM } else { 0 };
        let mut json = buffer;
        json.clear();
        json.reserve(256 + strings + view.statements.json.len() + room);
        json.push_str("{\"at\":");
        push_at(&mut json, &at);
        let at_end = json.len();
        for (name, value) in fields {
            push_json_field(&mut json, name, value);
        }
        json.push(',');
        let tag = json.len();
        json.push_str("\"type\":\"statement\",\"seq\":");
        json.push_str(itoa::Buffer::new().format(view.seq));
        json.push_str(",\"source\":");
        push_json_str(&mut json, view.source);
        json.push_str(",\"text\":");
        push_json_str(&mut json, view.text);
        json.push_str(",\"decision\":");
        push_json_str(&mut json, view.decision);
        for (name, value) in optional {
            push_json_field(&mut json, name, value);
        }
        let statements = json.len();
        json.push_str(",\"statements\":");
        json.push_str(&view.statements.json);
        let parts = Parts {
            at: u32::try_from(at_end).unwrap_or(0),
            tag: u32::try_from(tag).unwrap_or(0),
            statements: Span::of(statements..json.len()),
            columns: Span::default(),
        };
        json.push('}');
        Record {
            json,
            at,
            kind: "statement",
            seq: view.seq,
            envelope: envelope.clone(),
            parts,
        }
    }

    /// An event with the stored form it was read from.
    pub fn stored(event: Event, json: String) -> Record {
        let Event {
            at,
            session,
            identity,
            target,
            detail,
        } = event;
        let seq = match detail {
            Detail::Statement { seq, .. } | Detail::StatementDone { seq, .. } => seq,
            _ => 0,
        };
        Record {
            json,
            at,
            kind: detail.kind(),
            seq,
            envelope: Arc::new(Envelope {
                session,
                identity,
                target,
            }),
            parts: Parts::default(),
        }
    }

    pub fn session(&self) -> Option<&str> {
        self.envelope.session.as_deref()
    }

    /// Joins its completion ([`Completion::to_json`]) to this statement
    /// ([`join_completion`]); `columns`, where the completion has its
    /// `,"columns":[…]` ([`Completion::write_fields`]), if known.
    pub fn join(&mut self, completion: &str, columns: Option<std::ops::Range<usize>>) -> bool {
        // Where the completion goes: after `,"done":`, in place of the
        // statement's closing brace.
        let at = self.json.len().saturating_sub(1) + ",\"done\":".len();
        if !join_completion(&mut self.json, completion) {
            return false;
        }
        self.parts.columns = columns.map_or_else(Span::default, |c| Span::of(at + c.start..at + c.end));
        true
    }

    /// Writes into `into` the stored form of this statement's completion
    /// as an event of its own ([`Detail::StatementDone`]) with only `at`
    /// and `session` in its envelope, from `fields`
    /// ([`Completion::write_json`]): exactly what serde gives for that
    /// event (tested), its `at` copied from this stored form when
    /// [`Parts`] says where. What `Auditor::complete` journals for a
    /// completion that joined its statement in the queue: recovery joins
    /// it to the statement again, by session and number. False, and
    /// `into` left as it was, when `fields` is not a completion's stored
    /// form.
    pub fn write_done(&self, into: &mut String, fields: &str) -> bool {
        let Some(rest) = completion_rest(fields) else {
            return false;
        };
        into.clear();
        match self.json.get(..self.parts.at as usize) {
            Some(at) if at.starts_with("{\"at\":\"") && at.ends_with('"') && at.len() > 8 => into.push_str(at),
            _ => {
                into.push_str("{\"at\":");
                push_at(into, &self.at);
            }
        }
        push_json_field(into, ",\"session\":", self.session());
        push_done_fields(into, self.seq, rest);
        true
    }

    /// The completion of statement `seq` of the session `envelope` as an
    /// event of its own ([`Detail::StatementDone`]) at `at`, from `fields`
    /// ([`CompletionView::write_fields`]): what serializing that event
    /// gives (tested), written by hand into `buffer` (emptied first). What
    /// a session records for a completion whose statement the writer took
    /// before it ended. `None` when `fields` is not a completion's stored
    /// form.
    pub fn done(buffer: String, at: DateTime<Utc>, envelope: &Arc<Envelope>, seq: u64, fields: &str) -> Option<Record> {
        let rest = completion_rest(fields)?;
        let mut json = buffer;
        json.clear();
        json.push_str("{\"at\":");
        push_at(&mut json, &at);
        push_json_field(&mut json, ",\"session\":", envelope.session.as_deref());
        push_json_field(&mut json, ",\"identity\":", envelope.identity.as_deref());
        push_json_field(&mut json, ",\"target\":", envelope.target.as_deref());
        push_done_fields(&mut json, seq, rest);
        Some(Record {
            json,
            at,
            kind: "statement_done",
            seq,
            envelope: envelope.clone(),
            parts: Parts::default(),
        })
    }

    /// The event back from its stored form (for the live stream).
    pub fn event(&self) -> Result<Event, serde_json::Error> {
        serde_json::from_str(&self.json)
    }

    /// `at` as stored ([`Event::at_text`]).
    pub fn at_text(&self) -> String {
        self.at.to_rfc3339_opts(SecondsFormat::Micros, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_of_its_own_is_written_as_serde_writes_it() {
        let completion = Completion {
            rows: Some(3),
            duration_us: 250,
            sqlstate: Some("22012".into()),
            skipped: false,
            columns: vec![ColumnRecord {
                name: "e\"mail".into(),
                origin: Some("public.customers.email".into()),
                masking: "rule".into(),
                tags: vec!["pii".into()],
            }],
            sample: vec![vec![Some("****@example.com".into()), None]],
        };
        let event = Event::now(completion.clone().into_done(7)).in_session("s1");
        let mut scratch = String::new();
        let fields = completion.write_json(&mut scratch).to_string();
        // Its statement, as a session writes it (its `at` copied) and as
        // serde does (formatted again), joined or not.
        let envelope = Envelope::of_session("s1", "alice", "shop");
        let records = StatementRecords::new(vec![]);
        let view = StatementView {
            seq: 7,
            source: "query",
            text: "SELECT 1",
            decision: "allow",
            rule: None,
            refusal: None,
            statements: &records,
        };
        let written = Record::statement(String::new(), event.at, &envelope, view);
        let mut joined = Record::statement(String::new(), event.at, &envelope, view);
        assert!(joined.join(&fields, None));
        let serde = Record::new(serde_json::from_str(&written.json).unwrap());
        assert_eq!(serde.parts, Parts::default());
        // As an event of its own, with the whole envelope, at any time.
        let whole = event.clone().by("alice", "shop");
        let own = Record::done("left over".into(), whole.at, &envelope, 7, &fields).unwrap();
        assert_eq!(own.json, whole.to_json());
        assert_eq!((own.kind, own.seq), ("statement_done", 7));
        assert!(Record::done(String::new(), whole.at, &envelope, 7, "[]").is_none());
        let bare = Completion {
            rows: None,
            duration_us: 1,
            sqlstate: None,
            skipped: false,
            columns: vec![],
            sample: vec![],
        };
        let at = DateTime::parse_from_rfc3339("2026-12-03T10:00:00Z").unwrap().to_utc();
        let own = Record::done(String::new(), at, &envelope, 8, &bare.to_json()).unwrap();
        let expected = Event {
            at,
            ..Event::now(bare.into_done(8)).in_session("s1").by("alice", "shop")
        };
        assert_eq!(own.json, expected.to_json());
        for statement in [written, joined, serde] {
            let mut done = String::from("left over");
            assert!(statement.write_done(&mut done, &fields));
            assert_eq!(done, event.to_json());
            assert_eq!(serde_json::from_str::<Event>(&done).unwrap(), event);
            assert!(!statement.write_done(&mut done, "not a completion"));
            assert_eq!(done, event.to_json(), "left as it was");
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_does_at_every_position() {
        // Each byte JSON escapes, a multi-byte character and plain text,
        // at every offset within and across the eight-byte words.
        let specials = [
            "\"", "\\", "\n", "\r", "\t", "\u{8}", "\u{c}", "\u{0}", "\u{1f}", "\u{7f}", "é", "€", "😀", " ", "a",
        ];
        for len in 0..=20 {
            for special in specials {
                for at in 0..=len {
                    let value = format!("{}{special}{}", "x".repeat(at), "y".repeat(len - at));
                    let mut out = String::new();
                    push_json_str(&mut out, &value);
                    assert_eq!(out, serde_json::to_string(&value).unwrap(), "{value:?}");
                }
            }
        }
        let mixed = "SELECT \"ssn\" FROM t WHERE note = 'a\\b\tc\n' -- ünïcode \u{1}";
        let mut out = String::new();
        push_json_str(&mut out, mixed);
        assert_eq!(out, serde_json::to_string(mixed).unwrap());
        for byte in 0u8..=0x7f {
            let word = u64::from_le_bytes([b'a', b'b', byte, b'c', b'd', b'e', b'f', b'g']);
            let escaped = byte < 0x20 || byte == b'"' || byte == b'\\';
            assert_eq!(needs_escape(word), escaped, "byte {byte:#x}");
        }
        assert!(!needs_escape(u64::from_le_bytes(
            *"ab\u{e9}\u{20ac}c".as_bytes().first_chunk().unwrap()
        )));
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        let event = Event::now(Detail::Statement {
            seq: 3,
            source: "query".into(),
            text: "SELECT 1".into(),
            decision: "allow".into(),
            rule: Some("reads".into()),
            refusal: None,
            statements: vec![StatementRecord {
                kind: "read".into(),
                command: "SELECT".into(),
                relations: vec!["public.t (read)".into()],
                features: vec![],
                tags: vec!["pii".into()],
            }],
            done: None,
        })
        .in_session("s1")
        .by("alice", "shop");
        let json = event.to_json();
        assert!(json.contains("\"type\":\"statement\""), "{json}");
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.detail.kind(), "statement");
        assert!(event.at_text().ends_with('Z'));
    }

    fn statement(text: &str) -> Event {
        Event::now(Detail::Statement {
            seq: 41,
            source: "query".into(),
            text: text.into(),
            decision: "allow".into(),
            rule: None,
            refusal: None,
            statements: vec![],
            done: None,
        })
        .in_session("s\"1")
        .by("a\"type\":\"statement_done\",\"seq\":7,", "shop")
    }

    fn completion() -> Completion {
        Completion {
            rows: Some(2),
            duration_us: 1500,
            sqlstate: None,
            skipped: false,
            columns: vec![ColumnRecord {
                name: "seq\":9,".into(),
                origin: None,
                masking: "detectors".into(),
                tags: vec![],
            }],
            sample: vec![vec![Some("}".into()), None]],
        }
    }

    fn done_of(statement: &Event, done: &Completion) -> Event {
        let Detail::Statement { seq, .. } = statement.detail else {
            unreachable!()
        };
        Event {
            at: statement.at + chrono::Duration::microseconds(done.duration_us as i64),
            session: statement.session.clone(),
            identity: statement.identity.clone(),
            target: statement.target.clone(),
            detail: Detail::StatementDone {
                seq,
                rows: done.rows,
                duration_us: done.duration_us,
                sqlstate: done.sqlstate.clone(),
                skipped: done.skipped,
                columns: done.columns.clone(),
                sample: done.sample.clone(),
            },
        }
    }

    #[test]
    fn a_row_of_statements_is_what_serializing_it_gives_and_expands_to_them() {
        let mut first = statement("SELECT '\"type\":\"statement\",'");
        let Detail::Statement { done, .. } = &mut first.detail else {
            unreachable!()
        };
        *done = Some(completion());
        let second = statement("}]");
        let third = statement("SELECT 3");
        // Records serde wrote: the row finds where their parts are.
        let records = [&first, &second, &third].map(|event| Record::new(event.clone()));
        let mut row = StatementsRow::start(&records[0], 0).unwrap();
        row.push(&records[1]);
        row.push(&records[2]);
        let json = row.finish();
        let row = Event {
            at: first.at,
            session: first.session.clone(),
            identity: first.identity.clone(),
            target: first.target.clone(),
            detail: Detail::Statements {
                statements: [&first, &second, &third]
                    .map(|member| Event {
                        session: None,
                        identity: None,
                        target: None,
                        ..member.clone()
                    })
                    .to_vec(),
                same_statements: vec![],
                same_columns: vec![],
            },
        };
        // Members are stored without the envelope the row has.
        assert_eq!(json, row.to_json());
        assert_eq!(json.matches("\"session\":").count(), 1, "{json}");
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, row);
        let mut events = Vec::new();
        back.expand(&mut events);
        let mut bare = first.clone();
        let done = bare.take_completion().unwrap();
        let expected = [bare, done, second.clone(), third.clone()];
        assert_eq!(events, expected);
        // A row whose members repeat the envelope (as earlier versions
        // wrote them) reads the same.
        let mut whole = row.clone();
        whole.detail = Detail::Statements {
            statements: vec![first.clone(), second, third],
            same_statements: vec![],
            same_columns: vec![],
        };
        let mut events = Vec::new();
        serde_json::from_str::<Event>(&whole.to_json())
            .unwrap()
            .expand(&mut events);
        assert_eq!(events, expected);
        // Only a statement's stored form starts a row.
        let grant = Record::new(Event::now(Detail::UnmaskGrantUsed { grant: "g".into() }));
        assert!(StatementsRow::start(&grant, 0).is_none());
    }

    #[test]
    fn a_row_shares_its_members_classifications_and_columns_and_expands_them_back() {
        let envelope = Envelope::of_session("s\"1", "alice", "shop");
        let class = |relation: &str| {
            StatementRecords::new(vec![StatementRecord {
                kind: "read".into(),
                command: "SELECT".into(),
                relations: vec![format!("{relation} (read)")],
                features: vec![],
                tags: vec!["pii".into()],
            }])
        };
        let (orders, customers) = (class("orders"), class("customers"));
        let columns = |names: &[&str]| -> Vec<ColumnRecord> {
            names
                .iter()
                .map(|name| ColumnRecord {
                    name: name.to_string(),
                    origin: Some(format!("public.orders.{name}")),
                    masking: "detectors".into(),
                    tags: vec!["finance".into()],
                })
                .collect()
        };
        // (classification, columns of its completion; None: not joined)
        let members: [(&StatementRecords, Option<Vec<ColumnRecord>>); 7] = [
            (&orders, Some(columns(&["id", "status"]))),
            (&orders, Some(columns(&["id", "status"]))),
            (&customers, Some(columns(&["email"]))),
            (&orders, Some(columns(&["email"]))),
            (&orders, None),
            (&customers, Some(vec![])),
            (&customers, Some(columns(&["id", "status"]))),
        ];
        let mut scratch = String::new();
        let at = Utc::now();
        let mut records = Vec::new();
        let mut expected = Vec::new();
        for (n, (statements, columns)) in members.iter().enumerate() {
            let text = format!("SELECT {n}, '\"statements\":[],\"columns\":[]'");
            let view = StatementView {
                seq: n as u64 + 1,
                source: "query",
                text: &text,
                decision: "allow",
                rule: None,
                refusal: None,
                statements,
            };
            let mut record = Record::statement(String::new(), at, &envelope, view);
            let mut event: Event = serde_json::from_str(&record.json).unwrap();
            if let Some(columns) = columns {
                let completion = Completion {
                    rows: Some(1),
                    duration_us: 10 + n as u64,
                    sqlstate: None,
                    skipped: false,
                    columns: columns.clone(),
                    sample: vec![vec![Some(format!("value {n}"))]],
                };
                let at_columns = completion.write_fields(&mut scratch);
                assert!(record.join(&scratch, at_columns));
                let Detail::Statement { done, .. } = &mut event.detail else {
                    unreachable!()
                };
                *done = Some(completion);
            }
            assert_eq!(record.json, event.to_json());
            records.push(record);
            event.expand(&mut expected);
        }
        // Parts that no longer match what the record holds are not used:
        // here member 1's, with a field more before its classification.
        let mut shifted: Event = serde_json::from_str(&records[1].json).unwrap();
        let Detail::Statement { rule, seq, .. } = &mut shifted.detail else {
            unreachable!()
        };
        (*rule, *seq) = (Some("moved".into()), 8);
        records.push(Record {
            json: shifted.to_json(),
            ..records[1].clone()
        });
        shifted.expand(&mut expected);
        let mut row = StatementsRow::start(&records[0], 0).unwrap();
        for record in &records[1..] {
            row.push(record);
        }
        let json = row.finish();
        // Member 1 has member 0's classification and columns; 3 the
        // classification of 0 and the columns of 2; 4 (no completion) the
        // classification of 0; 5 (no columns) and 6 the classification of
        // 2, and 6 the columns of 0; 7 shares nothing.
        assert!(
            json.ends_with(
                "],\"same_statements\":[[1,0],[3,0],[4,0],[5,2],[6,2]],\"same_columns\":[[1,0],[3,2],[6,0]]}"
            ),
            "{json}"
        );
        // Stored: the two classifications and column lists once each, and
        // the last member whole.
        assert_eq!(json.matches("\"relations\":").count(), 3, "{json}");
        assert_eq!(json.matches("\"columns\":").count(), 3, "{json}");
        // The same row with nothing shared is larger by what was left out.
        let unshared: Vec<Record> = records
            .iter()
            .map(|r| Record {
                parts: Parts::default(),
                ..r.clone()
            })
            .collect();
        let mut row = StatementsRow::start(&unshared[0], 0).unwrap();
        for record in &unshared[1..] {
            row.push(record);
        }
        let whole = row.finish();
        // Members 1, 3, 4, 5 and 6 left out their classification, and those
        // of them with columns their columns.
        let length = |span: Span| span.range().map_or(0, |r| r.len());
        let left_out: usize = [1, 3, 4, 5, 6]
            .into_iter()
            .map(|member| length(records[member].parts.statements) + length(records[member].parts.columns))
            .sum();
        let pairs = ",\"same_statements\":[[1,0],[3,0],[4,0],[5,2],[6,2]],\"same_columns\":[[1,0],[3,2],[6,0]]".len();
        assert_eq!(json.len() + left_out, whole.len() + pairs);
        let back: Event = serde_json::from_str(&json).unwrap();
        let mut events = Vec::new();
        back.clone().expand(&mut events);
        assert_eq!(events, expected);
        // Serialized again (as the live stream sends a row), the same.
        let mut events = Vec::new();
        serde_json::from_str::<Event>(&back.to_json())
            .unwrap()
            .expand(&mut events);
        assert_eq!(events, expected);
        // A pair that does not point back to an earlier member, or at a
        // member that has the part, changes nothing.
        let Detail::Statements {
            statements,
            same_statements,
            ..
        } = &back.detail
        else {
            unreachable!()
        };
        let mut odd = back.clone();
        odd.detail = Detail::Statements {
            statements: statements.clone(),
            same_statements: [[0, 0], [2, 0], [9, 0], [1, 3]]
                .into_iter()
                .chain(same_statements.iter().copied())
                .collect(),
            same_columns: vec![],
        };
        let mut events = Vec::new();
        odd.expand(&mut events);
        let relations = |events: &[Event]| -> Vec<Vec<String>> {
            events
                .iter()
                .filter_map(|e| match &e.detail {
                    Detail::Statement { statements, .. } => {
                        Some(statements.iter().flat_map(|s| s.relations.clone()).collect())
                    }
                    _ => None,
                })
                .collect()
        };
        assert_eq!(relations(&events), relations(&expected));
    }

    #[test]
    fn times_are_stored_as_chrono_writes_them() {
        use chrono::TimeZone;
        let chrono_form = |at: &DateTime<Utc>| {
            let mut out = Vec::new();
            at.serialize(&mut serde_json::Serializer::new(&mut out)).unwrap();
            String::from_utf8(out).unwrap()
        };
        let ours = |at: &DateTime<Utc>| {
            let mut out = Vec::new();
            serialize_at(at, &mut serde_json::Serializer::new(&mut out)).unwrap();
            String::from_utf8(out).unwrap()
        };
        let second = Utc.with_ymd_and_hms(2026, 11, 29, 23, 5, 9).unwrap();
        let mut times = vec![Utc::now(), Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap()];
        for nanos in [
            0,
            7_000_000,
            120_000_000,
            7_000,
            123_456_000,
            1,
            999_999_999,
            100_000_010,
        ] {
            times.push(second + chrono::Duration::nanoseconds(nanos));
            times.push(Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap() + chrono::Duration::nanoseconds(nanos));
        }
        for at in &times {
            let mut buf = [0u8; 30];
            assert!(stored_at(at, &mut buf).is_some(), "{at:?}");
            assert_eq!(ours(at), chrono_form(at));
        }
        // Outside what it writes itself (years beyond 9999 or before 0, a
        // leap second): chrono's own form.
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        for at in [
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 6, 1, 0, 0, 0).unwrap(),
            leap,
        ] {
            let mut buf = [0u8; 30];
            assert!(stored_at(&at, &mut buf).is_none(), "{at:?}");
            assert_eq!(ours(&at), chrono_form(&at));
        }
        // And the stored form reads back as the same time.
        for at in times {
            let back: DateTime<Utc> = serde_json::from_str(&ours(&at)).unwrap();
            assert_eq!(back, at);
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut every_ascii: String = (0u8..=0x7f).map(char::from).collect();
        every_ascii.push_str("é€😀\u{80}\u{2028}\u{fffd}");
        let mut values = vec![String::new(), every_ascii.clone()];
        // Each character alone, and between others (escapes at the
        // start, the end and next to each other).
        for c in every_ascii.chars() {
            values.push(c.to_string());
            values.push(format!("a{c}{c}b"));
        }
        for value in values {
            let mut ours = String::from("x");
            push_json_str(&mut ours, &value);
            assert_eq!(ours[1..], serde_json::to_string(&value).unwrap(), "{value:?}");
        }
    }

    #[test]
    fn a_statement_serialized_from_its_parts_is_its_events_stored_form() {
        let envelopes = [
            Envelope::of_session("s\"1", "a\"type\":\"statement\",", "shop\u{7f}"),
            Arc::new(Envelope {
                session: None,
                identity: Some("alice".into()),
                target: None,
            }),
        ];
        let statements = [
            StatementRecord {
                kind: "read".into(),
                command: "SELECT".into(),
                relations: vec!["public.t (read)".into(), "\"we\"\"ird\" (read)".into()],
                features: vec!["cte".into()],
                tags: vec!["pii".into()],
            },
            StatementRecord {
                kind: "write".into(),
                command: "DELETE".into(),
                relations: vec![],
                features: vec![],
                tags: vec![],
            },
        ];
        let texts = ["SELECT 1", "", "SELECT '\"}\\\n\t\u{1}é😀'", &"x".repeat(5000)];
        // Now, and times outside what the stored form writes itself (a
        // leap second, a year past 9999): chrono's form.
        let times = [
            Utc::now(),
            chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
                .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
                .unwrap()
                .and_utc(),
            chrono::NaiveDate::from_ymd_opt(12000, 1, 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .unwrap()
                .and_utc(),
        ];
        let optional = [
            (None, None),
            (Some("reads \"all\""), None),
            (None, Some("refused: \u{0}")),
            (Some("r"), Some("refused")),
        ];
        for (n, text) in texts.into_iter().enumerate() {
            let records = StatementRecords::new(statements[..n % 3].to_vec());
            let envelope = &envelopes[n % 2];
            for (rule, refusal) in optional {
                let view = StatementView {
                    seq: [1, 9, 1 << 40, u64::MAX][n],
                    source: "query",
                    text,
                    decision: "deny",
                    rule,
                    refusal,
                    statements: &records,
                };
                for at in times {
                    let record = Record::statement(String::new(), at, envelope, view);
                    let event = Event {
                        at,
                        session: envelope.session.clone(),
                        identity: envelope.identity.clone(),
                        target: envelope.target.clone(),
                        detail: Detail::Statement {
                            seq: view.seq,
                            source: view.source.into(),
                            text: text.into(),
                            decision: view.decision.into(),
                            rule: rule.map(Into::into),
                            refusal: refusal.map(Into::into),
                            statements: view.statements.records().to_vec(),
                            done: None,
                        },
                    };
                    assert_eq!(record.json, event.to_json());
                    assert_eq!((record.kind, record.seq, record.at), ("statement", view.seq, at));
                    // Where a row takes it apart.
                    let parts = record.parts;
                    let mut at_text = String::new();
                    push_at(&mut at_text, &at);
                    assert_eq!(&record.json[..parts.at as usize], format!("{{\"at\":{at_text}"));
                    assert!(record.json[parts.tag as usize..].starts_with("\"type\":\"statement\","));
                    assert_eq!(member_tag(&record), statement_tag(&record.json));
                    assert_eq!(
                        &record.json[parts.statements.range().unwrap()],
                        format!(",\"statements\":{}", records.json)
                    );
                    assert_eq!(parts.columns, Span::default());
                    assert!(Arc::ptr_eq(&record.envelope, envelope));
                    // Room for its completion to join it without growing it
                    // (a refused statement has none).
                    let room = if refusal.is_none() { COMPLETION_ROOM } else { 0 };
                    assert!(record.json.capacity() >= record.json.len() + room, "{n}");
                }
            }
        }
    }

    #[test]
    fn a_completion_written_by_hand_is_what_serde_writes() {
        let column = |name: &str, origin: Option<&str>, tags: &[&str]| ColumnRecord {
            name: name.into(),
            origin: origin.map(Into::into),
            masking: "rule".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        };
        let mut scratch = String::from("left over");
        let completions = [
            Completion {
                rows: None,
                duration_us: 0,
                sqlstate: None,
                skipped: false,
                columns: vec![],
                sample: vec![],
            },
            Completion {
                rows: Some(u64::MAX),
                duration_us: 12,
                sqlstate: Some("57014".into()),
                skipped: true,
                columns: vec![
                    column("a\"b", Some("public.t.\\c"), &["pii", "fin\u{1}ance"]),
                    column("", None, &[]),
                    column("o", Some("public.t.o"), &[]),
                    column("t", None, &["pii"]),
                ],
                sample: vec![vec![None, Some("\n".into())], vec![], vec![Some("é😀".into())]],
            },
            completion(),
        ];
        for done in completions {
            assert_eq!(done.write_json(&mut scratch), serde_json::to_string(&done).unwrap());
            assert_eq!(serde_json::from_str::<Completion>(&scratch).unwrap(), done);
            // Where a row finds its columns.
            let columns = done.write_fields(&mut scratch);
            let expected = (!done.columns.is_empty())
                .then(|| format!(",\"columns\":{}", serde_json::to_string(&done.columns).unwrap()));
            assert_eq!(columns.map(|c| scratch[c].to_string()), expected);
        }
    }

    #[test]
    fn sample_rows_are_their_stored_form_and_split_where_their_rows_end() {
        // Values that look like the rows' own brackets and separators.
        let rows: Vec<Vec<Option<String>>> = vec![
            vec![Some("],[".into()), None],
            vec![],
            vec![Some("\\\"]".into()), Some("[\"x\"]".into())],
            vec![None],
        ];
        let mut sample = SampleRows::default();
        for row in &rows {
            let mut writer = sample.row();
            for value in row {
                writer.value(value.as_deref());
            }
            writer.finish();
        }
        // A row dropped unfinished (its message did not read) leaves nothing.
        let mut broken = sample.row();
        broken.value(Some("half"));
        drop(broken);
        assert_eq!(sample.len(), 4);
        assert_eq!(format!("[{}]", sample.json), serde_json::to_string(&rows).unwrap());
        assert_eq!(sample.to_rows(), rows);
        for n in 0..=5 {
            let mut first = SampleRows::default();
            first.row().finish();
            first.extend_from(&sample, n);
            let mut expected = vec![vec![]];
            expected.extend(rows.iter().take(n).cloned());
            assert_eq!(first.len(), expected.len(), "{n}");
            assert_eq!(first.to_rows(), expected, "{n}");
        }
        let mut none = SampleRows::default();
        none.extend_from(&sample, 2);
        assert_eq!(none.to_rows(), rows[..2]);
        sample.clear();
        assert!(sample.is_empty() && sample.to_rows().is_empty());
        assert!(sample.capacity() > 0, "the buffer stays");
    }

    #[test]
    fn a_merged_statement_is_what_serializing_it_with_its_completion_gives() {
        // Texts that look like the markers the merge looks for, in every
        // string before and after them.
        for text in ["SELECT 1", "SELECT '\"type\":\"statement_done\",\"seq\":1,}'", "}"] {
            let bare = statement(text);
            let done = done_of(&bare, &completion());
            let mut whole = bare.clone();
            if let Detail::Statement { done, .. } = &mut whole.detail {
                *done = Some(completion());
            }
            let mut merged = bare.to_json();
            let mut scratch = String::from("x");
            assert_eq!(completion().write_json(&mut scratch), completion().to_json());
            assert!(join_completion(&mut merged, &completion().to_json()));
            assert_eq!(merged, whole.to_json());
            let mut back: Event = serde_json::from_str(&merged).unwrap();
            assert_eq!(back, whole);
            // Read back, it is the two events again.
            assert_eq!(back.take_completion(), Some(done));
            assert_eq!(back, bare);
        }
        let bare = statement("x").to_json();
        let mut merged = bare.clone();
        assert!(!join_completion(&mut merged, "\"not an object\""));
        assert_eq!(merged, bare, "nothing changed");
    }
}
