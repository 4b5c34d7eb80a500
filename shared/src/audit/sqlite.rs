//! The embedded audit store: one SQLite file in WAL mode.
//!
//! Only the writer thread writes (`SqliteStore::open`); the CLI reads with
//! its own read-only connection (`SqliteStore::open_read_only`), which WAL
//! lets it do while the gateway runs. Event ids are chain positions,
//! assigned here, without gaps.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::chain::{self, GENESIS, Hash, PublicKey, SignedHead};
use super::event::{Event, Record};
use super::journal::Mark;
use super::{AuditError, AuditStore, SyncMode};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    session TEXT,
    identity TEXT,
    target TEXT,
    body TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_session ON events (session, id);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS heads (
    id INTEGER PRIMARY KEY,
    hash BLOB NOT NULL,
    signature BLOB NOT NULL,
    signed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS journal (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    next_offset INTEGER NOT NULL,
    next_seq INTEGER NOT NULL
);
";

/// An audit trail in one SQLite file.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// The writer's lock (`<path>-lock`, flock'd): two gateways appending
    /// to one trail would each extend the chain from their own head.
    _lock: Option<std::fs::File>,
    /// The last event's id and hash (0 and [`GENESIS`] when empty).
    head: (u64, Hash),
    /// How far into the write-ahead journal the trail has its events.
    journal: Mark,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("head", &self.head.0)
            .finish()
    }
}

fn sql_error<'a>(path: &'a Path, what: &'static str) -> impl Fn(rusqlite::Error) -> AuditError + 'a {
    move |source| AuditError::Sqlite {
        path: path.to_path_buf(),
        what,
        source,
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the trail for writing.
    pub fn open(path: &Path, sync: SyncMode) -> Result<SqliteStore, AuditError> {
        let lock = lock_writer(path)?;
        let err = sql_error(path, "opening the audit database");
        let conn = Connection::open(path).map_err(&err)?;
        // Something else holding the trail's write lock for a second makes
        // it unavailable: sessions are refused rather than left hanging.
        conn.busy_timeout(std::time::Duration::from_secs(1)).map_err(&err)?;
        // A new trail gets 16 KiB pages (SQLite's default is 4): a batch of
        // events then takes a quarter of the page writes and system calls,
        // and the writer about a fifth less time per event. Only an empty
        // file takes it; an existing trail keeps its size.
        conn.execute_batch("PRAGMA page_size = 16384;").map_err(&err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(&err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(AuditError::Setup {
                path: path.to_path_buf(),
                reason: format!("SQLite would not use WAL mode (it kept \"{mode}\")"),
            });
        }
        let synchronous = match sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        };
        // With NORMAL, checkpoints are the only fsyncs: a larger WAL (16
        // MiB rather than 4) makes them a quarter as frequent. A page cache
        // of 32 MiB (rather than 2) keeps the index pages a batch updates in
        // memory instead of reading them back from the file each commit.
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |row| row.get(0)).map_err(&err)?;
        let checkpoint_pages = (16 << 20) / page_size.max(512);
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {synchronous}; PRAGMA wal_autocheckpoint = {checkpoint_pages}; \
             PRAGMA cache_size = -32768;"
        ))
        .map_err(&err)?;
        conn.execute_batch(SCHEMA)
            .map_err(sql_error(path, "creating the audit tables"))?;
        let head = read_head(&conn).map_err(sql_error(path, "reading the chain head"))?;
        let journal = read_journal_mark(&conn).map_err(sql_error(path, "reading the journal position"))?;
        Ok(SqliteStore {
            conn,
            path: path.to_path_buf(),
            _lock: Some(lock),
            head,
            journal,
        })
    }

    /// Opens an existing trail for reading only.
    pub fn open_read_only(path: &Path) -> Result<SqliteStore, AuditError> {
        if !path.exists() {
            return Err(AuditError::Setup {
                path: path.to_path_buf(),
                reason: "there is no audit database at this path".into(),
            });
        }
        let err = sql_error(path, "opening the audit database");
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(&err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(&err)?;
        let head = read_head(&conn).map_err(sql_error(path, "reading the chain head"))?;
        // A trail older than the journal has no position: nothing after it.
        let journal = read_journal_mark(&conn).unwrap_or_default();
        Ok(SqliteStore {
            conn,
            path: path.to_path_buf(),
            _lock: None,
            head,
            journal,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where in the write-ahead journal the trail reaches: what follows
    /// there is recorded but not yet in the trail.
    pub fn journal_position(&self) -> Mark {
        self.journal
    }

    /// Events in order, filtered.
    /// The id of the newest event (0 for an empty trail).
    pub fn last_id(&self) -> Result<u64, AuditError> {
        read_head(&self.conn)
            .map(|(id, _)| id)
            .map_err(sql_error(&self.path, "reading the newest event"))
    }

    /// Events in order, filtered: a row that keeps several (a statement
    /// and its completion, statements of one session) gives each
    /// ([`StoredEvent::expand`]). Filters and `limit` apply to rows: a
    /// row's time and identity are its first event's.
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<StoredEvent>, AuditError> {
        let rows = self.rows(filter)?;
        let mut out = Vec::with_capacity(rows.len() * 2);
        for row in rows {
            row.expand(&mut out);
        }
        Ok(out)
    }

    /// The trail's rows in order, filtered, as stored: a statement kept
    /// with its completion is one (the event stream's unit, whose cursor is
    /// the row's id).
    pub fn rows(&self, filter: &EventFilter) -> Result<Vec<StoredEvent>, AuditError> {
        let err = sql_error(&self.path, "reading audit events");
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, body FROM events \
                 WHERE (?1 IS NULL OR session = ?1) AND (?2 IS NULL OR at >= ?2) AND (?3 IS NULL OR at < ?3) \
                   AND (?4 IS NULL OR identity = ?4) AND id > ?6 \
                 ORDER BY id LIMIT ?5",
            )
            .map_err(&err)?;
        let limit = filter.limit.map_or(-1, |l| l as i64);
        let rows = stmt
            .query_map(
                params![
                    filter.session,
                    filter.since,
                    filter.until,
                    filter.identity,
                    limit,
                    filter.after_id.unwrap_or(0) as i64
                ],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)),
            )
            .map_err(&err)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row.map_err(&err)?;
            let event = serde_json::from_str(&body).map_err(|e| AuditError::Setup {
                path: self.path.clone(),
                reason: format!("event {id} cannot be read: {e}"),
            })?;
            out.push(StoredEvent { id: id as u64, event });
        }
        Ok(out)
    }

    /// The highest approval request id recorded (0 when none).
    pub fn max_request_id(&self) -> Result<u64, AuditError> {
        let max: Option<i64> = self
            .conn
            .query_row(
                "SELECT MAX(json_extract(body, '$.request')) FROM events WHERE kind = 'approval_requested'",
                [],
                |row| row.get(0),
            )
            .map_err(sql_error(&self.path, "reading approval requests"))?;
        Ok(max.unwrap_or(0).max(0) as u64)
    }

    /// Approval requests with no end recorded: their sessions are gone
    /// after a restart.
    pub fn open_requests(&self) -> Result<Vec<OpenRequest>, AuditError> {
        let err = sql_error(&self.path, "reading approval requests");
        let mut stmt = self
            .conn
            .prepare(
                "SELECT json_extract(r.body, '$.request'), r.session, r.identity, r.target FROM events r \
                 WHERE r.kind = 'approval_requested' AND NOT EXISTS (\
                   SELECT 1 FROM events d WHERE d.kind = 'approval_decided' \
                   AND json_extract(d.body, '$.request') = json_extract(r.body, '$.request') \
                   AND json_extract(d.body, '$.decision') <> 'approval')",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |row| {
                Ok(OpenRequest {
                    request: row.get::<_, i64>(0)? as u64,
                    session: row.get(1)?,
                    identity: row.get(2)?,
                    target: row.get(3)?,
                })
            })
            .map_err(&err)?;
        rows.collect::<Result<_, _>>().map_err(&err)
    }

    /// Grants from approved access requests with no end recorded (some may
    /// have expired while the gateway was down), each with its event's id
    /// and time. Only grants whose request and approval are on the trail
    /// too (same request, grant, identity and target) count.
    pub fn open_grants(&self) -> Result<Vec<OpenGrant>, AuditError> {
        let err = sql_error(&self.path, "reading access grants");
        let mut stmt = self
            .conn
            .prepare(
                "SELECT json_extract(g.body, '$.request'), json_extract(g.body, '$.grant'), g.identity, \
                 json_extract(g.body, '$.subject'), g.target, json_extract(g.body, '$.until'), g.id, g.at \
                 FROM events g \
                 WHERE g.kind = 'access_granted' AND NOT EXISTS (\
                   SELECT 1 FROM events e WHERE e.kind = 'access_ended' \
                   AND json_extract(e.body, '$.request') = json_extract(g.body, '$.request')) \
                 AND EXISTS (\
                   SELECT 1 FROM events r WHERE r.kind = 'approval_requested' AND r.id < g.id \
                   AND json_extract(r.body, '$.request') = json_extract(g.body, '$.request') \
                   AND json_extract(r.body, '$.access.grant') = json_extract(g.body, '$.grant') \
                   AND r.identity IS g.identity AND r.target IS g.target) \
                 AND EXISTS (\
                   SELECT 1 FROM events d WHERE d.kind = 'approval_decided' AND d.id < g.id \
                   AND json_extract(d.body, '$.request') = json_extract(g.body, '$.request') \
                   AND json_extract(d.body, '$.decision') = 'approved')",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, Option<String>>(4)?,
                    row.get::<_, String>(5)?,
                    row.get::<_, i64>(6)?,
                    row.get::<_, String>(7)?,
                ))
            })
            .map_err(&err)?;
        let mut grants = Vec::new();
        for row in rows {
            let (request, grant, identity, subject, target, until, id, at) = row.map_err(&err)?;
            // A row this gateway did not write cannot be read as a grant:
            // skipped, so a damaged trail grants nothing.
            let (Ok(until), Ok(at)) = (
                chrono::DateTime::parse_from_rfc3339(&until),
                chrono::DateTime::parse_from_rfc3339(&at),
            ) else {
                continue;
            };
            grants.push(OpenGrant {
                id: id.max(0) as u64,
                granted_at: at.with_timezone(&chrono::Utc),
                grant: crate::approvals::GrantView {
                    request: request.max(0) as u64,
                    grant,
                    identity: identity.unwrap_or_default(),
                    subject,
                    target: target.unwrap_or_default(),
                    until: until.with_timezone(&chrono::Utc),
                },
            });
        }
        Ok(grants)
    }

    /// Sessions, newest first. The newest `limit` sessions are found from
    /// the end of the trail (each starts with its opening or its refusal),
    /// and only their events are read, through the session index: the cost
    /// follows what is shown, not the size of the trail.
    pub fn sessions(&self, limit: u64) -> Result<Vec<SessionSummary>, AuditError> {
        let err = sql_error(&self.path, "reading audit sessions");
        let mut stmt = self
            .conn
            .prepare(
                "WITH recent AS ( \
                   SELECT session FROM events \
                   WHERE kind IN ('session_opened', 'session_refused') AND session IS NOT NULL \
                   ORDER BY id DESC LIMIT ?1) \
                 SELECT e.session, MIN(e.at), MAX(e.at), MAX(e.identity), MAX(e.target), \
                   SUM(CASE e.kind WHEN 'statement' THEN 1 \
                     WHEN 'statements' THEN json_array_length(e.body, '$.statements') ELSE 0 END), \
                   SUM(CASE e.kind WHEN 'statement' THEN json_extract(e.body, '$.refusal') IS NOT NULL \
                     WHEN 'statements' THEN (SELECT COUNT(*) FROM json_each(e.body, '$.statements') \
                       WHERE json_extract(value, '$.refusal') IS NOT NULL) ELSE 0 END) \
                     + SUM(e.kind = 'approval_decided' \
                           AND json_extract(e.body, '$.decision') IN ('denied', 'expired', 'cancelled')), \
                   MAX(CASE WHEN e.kind = 'session_closed' THEN json_extract(e.body, '$.reason') END), \
                   MAX(CASE WHEN e.kind = 'session_opened' THEN json_extract(e.body, '$.client') \
                            WHEN e.kind = 'session_refused' THEN json_extract(e.body, '$.client') END), \
                   MAX(e.kind = 'session_refused') \
                 FROM recent r JOIN events e ON e.session = r.session \
                 GROUP BY e.session ORDER BY MIN(e.id) DESC",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([limit as i64], |row| {
                Ok(SessionSummary {
                    session: row.get(0)?,
                    started: row.get(1)?,
                    last: row.get(2)?,
                    identity: row.get(3)?,
                    target: row.get(4)?,
                    statements: row.get::<_, i64>(5)? as u64,
                    refused: row.get::<_, i64>(6)? as u64,
                    closed: row.get(7)?,
                    client: row.get(8)?,
                    refused_at_start: row.get::<_, i64>(9)? != 0,
                })
            })
            .map_err(&err)?;
        rows.collect::<Result<_, _>>().map_err(&err)
    }
}

/// An approval request the trail shows no end of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    pub request: u64,
    pub session: Option<String>,
    pub identity: Option<String>,
    pub target: Option<String>,
}

/// A grant the trail shows approved and not ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenGrant {
    /// The `access_granted` event's id.
    pub id: u64,
    /// When it was recorded.
    pub granted_at: chrono::DateTime<chrono::Utc>,
    pub grant: crate::approvals::GrantView,
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub session: Option<String>,
    pub identity: Option<String>,
    /// RFC 3339 times, as stored (UTC).
    pub since: Option<String>,
    pub until: Option<String>,
    /// Only events after this id.
    pub after_id: Option<u64>,
    pub limit: Option<u64>,
}

/// An event with its place in the chain.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredEvent {
    pub id: u64,
    #[serde(flatten)]
    pub event: Event,
}

impl StoredEvent {
    /// The events this row of the trail stands for, in order, into `out`,
    /// each with the row's id ([`Event::expand`]): itself; a statement
    /// kept with its completion (`done`) and then the completion; or the
    /// statements of a [`crate::audit::Detail::Statements`] row.
    pub fn expand(self, out: &mut Vec<StoredEvent>) {
        let mut events = Vec::new();
        self.event.expand(&mut events);
        out.extend(events.into_iter().map(|event| StoredEvent { id: self.id, event }));
    }
}

/// One session, summed up from its events.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionSummary {
    pub session: String,
    pub started: String,
    pub last: String,
    pub identity: Option<String>,
    pub target: Option<String>,
    pub client: Option<String>,
    pub statements: u64,
    /// Statements refused at the gate, and held ones that were denied,
    /// expired or cancelled (as the live session counts them).
    pub refused: u64,
    /// The close reason, once closed.
    pub closed: Option<String>,
    /// The login or session start was refused.
    pub refused_at_start: bool,
}

/// Takes the trail's writer lock, or says who holds it.
fn lock_writer(path: &Path) -> Result<std::fs::File, AuditError> {
    use std::os::fd::AsRawFd as _;
    let mut name = path.as_os_str().to_owned();
    name.push("-lock");
    let lock_path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|err| AuditError::Setup {
            path: path.to_path_buf(),
            reason: format!("cannot open its lock file {}: {err}", lock_path.display()),
        })?;
    // SAFETY: flock on a file descriptor this function owns; no memory is
    // shared with the kernel.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        return Err(AuditError::Setup {
            path: path.to_path_buf(),
            reason: "another process (a second gateway?) is writing this trail; each gateway needs its own audit path"
                .into(),
        });
    }
    Ok(file)
}

fn read_head(conn: &Connection) -> rusqlite::Result<(u64, Hash)> {
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row("SELECT id, hash FROM events ORDER BY id DESC LIMIT 1", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()?;
    Ok(match row {
        Some((id, hash)) => (id as u64, hash.try_into().unwrap_or(GENESIS)),
        None => (0, GENESIS),
    })
}

/// The journal position kept with the trail (the start when none is).
fn read_journal_mark(conn: &Connection) -> rusqlite::Result<Mark> {
    let row: Option<(i64, i64)> = conn
        .query_row("SELECT next_offset, next_seq FROM journal WHERE one = 1", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()?;
    Ok(row.map_or(Mark::default(), |(offset, seq)| Mark {
        offset: offset as u64,
        seq: seq as u64,
    }))
}

impl AuditStore for SqliteStore {
    fn append_records(&mut self, records: &[&Record], journal: Option<Mark>) -> Result<u64, AuditError> {
        let err = sql_error(&self.path, "writing audit events");
        let tx = self.conn.transaction().map_err(&err)?;
        let (mut id, mut prev) = self.head;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO events (id, at, kind, session, identity, target, body, prev_hash, hash) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(&err)?;
            for record in records {
                id += 1;
                let hash = chain::event_hash(id, &prev, &record.json);
                insert
                    .execute(params![
                        id as i64,
                        record.at_text(),
                        record.kind,
                        record.envelope.session,
                        record.envelope.identity,
                        record.envelope.target,
                        record.json,
                        &prev[..],
                        &hash[..],
                    ])
                    .map_err(&err)?;
                prev = hash;
            }
        }
        if let Some(mark) = journal {
            // In the same transaction as the events: after a crash, the
            // journal is replayed from exactly where the trail ends.
            tx.prepare_cached("INSERT OR REPLACE INTO journal (one, next_offset, next_seq) VALUES (1, ?1, ?2)")
                .and_then(|mut stmt| stmt.execute(params![mark.offset as i64, mark.seq as i64]))
                .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        // Only a committed batch moves the head: a failed one is retried
        // from the same place.
        self.head = (id, prev);
        if let Some(mark) = journal {
            self.journal = mark;
        }
        Ok(id)
    }

    fn journal_mark(&self) -> Mark {
        self.journal
    }

    fn head(&self) -> (u64, Hash) {
        self.head
    }

    fn prune(&mut self, before: &str) -> Result<Option<(u64, u64)>, AuditError> {
        let err = sql_error(&self.path, "removing old audit events");
        let tx = self.conn.transaction().map_err(&err)?;
        // The newest signed head at or before the cut; its event is older
        // than `before`, so everything up to it is too (ids follow time).
        let through: Option<i64> = tx
            .query_row(
                "SELECT h.id FROM heads h JOIN events e ON e.id = h.id WHERE e.at < ?1 \
                 ORDER BY h.id DESC LIMIT 1",
                [before],
                |row| row.get(0),
            )
            .optional()
            .map_err(&err)?;
        let Some(through) = through else {
            return Ok(None);
        };
        let removed = tx
            .execute("DELETE FROM events WHERE id <= ?1", [through])
            .map_err(&err)? as u64;
        // Older heads anchor nothing any more; the one at the cut does.
        tx.execute("DELETE FROM heads WHERE id < ?1", [through]).map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok((removed > 0).then_some((through as u64, removed)))
    }

    fn record_head(&mut self, head: &SignedHead) -> Result<(), AuditError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO heads (id, hash, signature, signed_at) VALUES (?1, ?2, ?3, ?4)",
                params![
                    head.id as i64,
                    &head.hash[..],
                    &head.signature[..],
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                ],
            )
            .map_err(sql_error(&self.path, "recording a signed head"))?;
        Ok(())
    }
}

/// The outcome of walking a trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub events: u64,
    pub first_id: u64,
    pub last_id: u64,
    /// Signed heads whose signature and hash were checked.
    pub signed_heads: u64,
    /// The newest signed position.
    pub last_signed: Option<u64>,
    /// The first problem found, with the event id it concerns.
    pub broken: Option<Broken>,
}

/// Where and how a trail is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub id: u64,
    pub reason: String,
}

impl Verification {
    fn break_at(&mut self, id: u64, reason: String) {
        self.broken.get_or_insert(Broken { id, reason });
    }

    pub fn ok(&self) -> bool {
        self.broken.is_none()
    }

    /// Events after the newest signed head: intact as far as the chain
    /// shows, but not yet covered by a signature.
    pub fn unsigned_tail(&self) -> u64 {
        match self.last_signed {
            Some(signed) => self.last_id.saturating_sub(signed),
            None => self.events,
        }
    }
}

impl SqliteStore {
    /// Walks the whole chain: every link, every signed head in the table,
    /// and the head file kept outside the database when given. Stops at the
    /// first problem.
    pub fn verify(&self, key: &PublicKey, head_file: Option<&SignedHead>) -> Result<Verification, AuditError> {
        let err = sql_error(&self.path, "reading the audit trail");
        let mut heads: Vec<(u64, Hash, Vec<u8>)> = Vec::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT id, hash, signature FROM heads ORDER BY id")
                .map_err(&err)?;
            let rows = stmt
                .query_map([], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, Vec<u8>>(1)?,
                        row.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .map_err(&err)?;
            for row in rows {
                let (id, hash, signature) = row.map_err(&err)?;
                heads.push((id as u64, hash.try_into().unwrap_or([0xff; 32]), signature));
            }
        }
        let mut report = Verification {
            events: 0,
            first_id: 0,
            last_id: 0,
            signed_heads: 0,
            last_signed: None,
            broken: None,
        };
        // Every signed head must carry the gateway's signature, whatever
        // happened to the events.
        for (id, hash, signature) in &heads {
            let head = SignedHead {
                id: *id,
                hash: *hash,
                signature: signature.clone(),
            };
            if !head.verify(key) {
                report.break_at(
                    *id,
                    format!("the signed head at event {id} does not carry this key's signature (re-signed or forged)"),
                );
                return Ok(report);
            }
        }
        if let Some(file) = head_file
            && !file.verify(key)
        {
            report.break_at(
                file.id,
                "the head file's signature is not this key's (forged or from another gateway)".into(),
            );
            return Ok(report);
        }

        let mut stmt = self
            .conn
            .prepare("SELECT id, at, kind, session, identity, target, body, prev_hash, hash FROM events ORDER BY id")
            .map_err(&err)?;
        let mut rows = stmt.query([]).map_err(&err)?;
        let mut expected_id: Option<u64> = None;
        let mut prev = GENESIS;
        let mut signed = heads.iter().peekable();
        while let Some(row) = rows.next().map_err(&err)? {
            let id = row.get::<_, i64>(0).map_err(&err)? as u64;
            let at: String = row.get(1).map_err(&err)?;
            let kind: String = row.get(2).map_err(&err)?;
            let session: Option<String> = row.get(3).map_err(&err)?;
            let identity: Option<String> = row.get(4).map_err(&err)?;
            let target: Option<String> = row.get(5).map_err(&err)?;
            let body: String = row.get(6).map_err(&err)?;
            let stored_prev: Vec<u8> = row.get(7).map_err(&err)?;
            let stored_hash: Vec<u8> = row.get(8).map_err(&err)?;
            match expected_id {
                None => {
                    report.first_id = id;
                    if id != 1 {
                        // Retention removed what came before: the chain must
                        // continue from a signed head at the cut.
                        match heads.iter().find(|(h, _, _)| *h == id - 1) {
                            Some((_, hash, _)) => prev = *hash,
                            None => {
                                report.break_at(id,
                                    format!("the trail starts at event {id}, and no signed head marks events 1..{} as removed by retention (deleted)", id - 1),
                                );
                                return Ok(report);
                            }
                        }
                    }
                }
                Some(expected) if id != expected => {
                    report.break_at(
                        expected,
                        format!("event {expected} is missing: the next event is {id} (deleted)"),
                    );
                    return Ok(report);
                }
                Some(_) => {}
            }
            if stored_prev.as_slice() != prev {
                report.break_at(
                    id,
                    format!(
                        "event {id} does not follow event {}: its link to it is wrong (reordered, deleted or inserted)",
                        id.saturating_sub(1)
                    ),
                );
                return Ok(report);
            }
            let hash = chain::event_hash(id, &prev, &body);
            if stored_hash.as_slice() != hash {
                report.break_at(
                    id,
                    format!(
                        "event {id} was changed after it was written: its content does not match its hash (edited)"
                    ),
                );
                return Ok(report);
            }
            // The columns that queries filter on must say what the hashed
            // body says.
            let columns_match = serde_json::from_str::<Event>(&body).is_ok_and(|event| {
                event.at_text() == at
                    && event.detail.kind() == kind
                    && event.session == session
                    && event.identity == identity
                    && event.target == target
            });
            if !columns_match {
                report.break_at(id,
                    format!("event {id}'s columns (time, kind, session, identity, target) differ from its hashed content (edited)"),
                );
                return Ok(report);
            }
            while let Some((head_id, head_hash, _)) = signed.peek() {
                if *head_id > id {
                    break;
                }
                if *head_id == id {
                    if *head_hash != hash {
                        report.break_at(
                            id,
                            format!(
                                "the signed head at event {id} names another hash: events up to {id} were rewritten"
                            ),
                        );
                        return Ok(report);
                    }
                    report.signed_heads += 1;
                    report.last_signed = Some(id);
                }
                signed.next();
            }
            if let Some(file) = head_file
                && file.id == id
                && file.hash != hash
            {
                report.break_at(
                    id,
                    format!("the head file names another hash for event {id}: the trail was rewritten"),
                );
                return Ok(report);
            }
            prev = hash;
            expected_id = Some(id + 1);
            report.last_id = id;
            report.events += 1;
        }
        if let Some(file) = head_file {
            if file.id > report.last_id {
                report.break_at(
                    report.last_id + 1,
                    format!(
                        "the trail ends at event {}, but the head file signed event {} (truncated)",
                        report.last_id, file.id
                    ),
                );
                return Ok(report);
            }
            if report.last_signed.is_none_or(|s| s < file.id) {
                report.last_signed = Some(file.id);
            }
        }
        if let Some((id, _, _)) = signed.next() {
            report.break_at(
                *id,
                format!(
                    "the trail ends at event {}, but a head was signed at event {id} (truncated)",
                    report.last_id
                ),
            );
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::Signer;
    use crate::audit::event::Detail;

    struct Trail {
        dir: PathBuf,
        store: SqliteStore,
        signer: Signer,
    }

    fn trail(name: &str, events: u64) -> Trail {
        let dir = std::env::temp_dir().join(format!("sluice-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut store = SqliteStore::open(&dir.join("audit.db"), SyncMode::Normal).unwrap();
        let signer = Signer::load_or_create(&dir.join("audit.key")).unwrap();
        for n in 0..events {
            let event = Event::now(Detail::UnmaskGrantUsed { grant: format!("g{n}") })
                .in_session("s")
                .by("alice", "shop");
            store.append(&[event]).unwrap();
            if n % 4 == 3 {
                let (id, hash) = store.head();
                store.record_head(&signer.sign_head(id, hash)).unwrap();
            }
        }
        Trail { dir, store, signer }
    }

    impl Trail {
        fn verify(&self) -> Verification {
            self.store.verify(&self.signer.public_key(), None).unwrap()
        }

        fn sql(&self, sql: &str) {
            self.store.conn.execute_batch(sql).unwrap();
        }
    }

    impl Drop for Trail {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn an_intact_trail_verifies() {
        let mut trail = trail("intact", 10);
        let report = trail.verify();
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.events, report.first_id, report.last_id), (10, 1, 10));
        assert_eq!((report.signed_heads, report.last_signed), (2, Some(8)));
        assert_eq!(report.unsigned_tail(), 2);
        // Reopening continues the chain where it was (once the first
        // writer let go).
        trail.store = SqliteStore::open_read_only(&trail.dir.join("audit.db")).unwrap();
        let mut again = SqliteStore::open(&trail.dir.join("audit.db"), SyncMode::Normal).unwrap();
        assert_eq!(again.head().0, 10);
        again
            .append(&[Event::now(Detail::UnmaskGrantUsed { grant: "x".into() })])
            .unwrap();
        assert!(again.verify(&trail.signer.public_key(), None).unwrap().ok());
    }

    #[test]
    fn an_edited_event_is_found() {
        let trail = trail("edited", 10);
        trail.sql("UPDATE events SET body = replace(body, 'g5', 'g6') WHERE id = 6");
        let broken = trail.verify().broken.unwrap();
        assert_eq!(broken.id, 6, "{broken:?}");
        assert!(broken.reason.contains("edited"), "{broken:?}");
    }

    #[test]
    fn an_edited_column_is_found() {
        let trail = trail("column", 10);
        trail.sql("UPDATE events SET identity = 'mallory' WHERE id = 3");
        let broken = trail.verify().broken.unwrap();
        assert_eq!(broken.id, 3, "{broken:?}");
        assert!(broken.reason.contains("columns"), "{broken:?}");
    }

    #[test]
    fn a_deleted_event_is_found() {
        let trail = trail("deleted", 10);
        trail.sql("DELETE FROM events WHERE id = 4");
        let broken = trail.verify().broken.unwrap();
        assert_eq!(broken.id, 4, "{broken:?}");
        assert!(broken.reason.contains("missing"), "{broken:?}");
    }

    #[test]
    fn a_swapped_pair_is_found() {
        let trail = trail("swapped", 10);
        trail.sql(
            "UPDATE events SET id = -5 WHERE id = 5; UPDATE events SET id = 5 WHERE id = 6; \
             UPDATE events SET id = 6 WHERE id = -5;",
        );
        let broken = trail.verify().broken.unwrap();
        assert_eq!(broken.id, 5, "{broken:?}");
    }

    #[test]
    fn a_truncated_tail_is_found() {
        let trail = trail("truncated", 10);
        trail.sql("DELETE FROM events WHERE id > 6");
        let broken = trail.verify().broken.unwrap();
        assert!(broken.reason.contains("truncated"), "{broken:?}");
        // Also when the signed heads go with it, if the head file outside
        // the database still names the newer head.
        let other = self::trail("truncated-file", 10);
        let (id, hash) = other.store.head();
        let file = other.signer.sign_head(id, hash);
        other.sql("DELETE FROM events WHERE id > 6; DELETE FROM heads WHERE id > 6");
        let report = other.store.verify(&other.signer.public_key(), Some(&file)).unwrap();
        assert!(report.broken.unwrap().reason.contains("head file signed event 10"));
    }

    #[test]
    fn a_rewritten_and_rehashed_chain_is_found() {
        let trail = trail("rewritten", 10);
        // Rewrite event 2 and recompute every hash after it, as someone
        // with write access to the file (but not the key) could.
        let mut rows: Vec<(i64, String)> = Vec::new();
        {
            let mut stmt = trail
                .store
                .conn
                .prepare("SELECT id, body FROM events ORDER BY id")
                .unwrap();
            let mut q = stmt.query([]).unwrap();
            while let Some(row) = q.next().unwrap() {
                rows.push((row.get(0).unwrap(), row.get(1).unwrap()));
            }
        }
        let mut prev = GENESIS;
        for (id, body) in rows {
            let body = if id == 2 { body.replace("g1", "gX") } else { body };
            let hash = chain::event_hash(id as u64, &prev, &body);
            trail
                .store
                .conn
                .execute(
                    "UPDATE events SET body = ?1, prev_hash = ?2, hash = ?3 WHERE id = ?4",
                    params![body, &prev[..], &hash[..], id],
                )
                .unwrap();
            prev = hash;
        }
        let broken = trail.verify().broken.unwrap();
        assert_eq!(broken.id, 4, "{broken:?}");
        assert!(broken.reason.contains("rewritten"), "{broken:?}");
        // Re-signing the heads with another key is caught too.
        let forger = Signer::from_pem(&{
            let dir = trail.dir.join("forger.key");
            let _ = Signer::load_or_create(&dir).unwrap();
            std::fs::read_to_string(&dir).unwrap()
        })
        .unwrap();
        for id in [4u64, 8] {
            let hash: Vec<u8> = trail
                .store
                .conn
                .query_row("SELECT hash FROM events WHERE id = ?1", [id as i64], |r| r.get(0))
                .unwrap();
            let head = forger.sign_head(id, hash.try_into().unwrap());
            trail
                .store
                .conn
                .execute(
                    "UPDATE heads SET hash = ?1, signature = ?2 WHERE id = ?3",
                    params![&head.hash[..], &head.signature[..], id as i64],
                )
                .unwrap();
        }
        let broken = trail.verify().broken.unwrap();
        assert!(broken.reason.contains("re-signed or forged"), "{broken:?}");
    }

    #[test]
    fn retention_removes_whole_segments_and_the_rest_still_verifies() {
        let mut trail = trail("pruned", 10);
        assert_eq!(
            trail.store.prune("2000-01-01T00:00:00Z").unwrap(),
            None,
            "nothing is that old"
        );
        // Everything is old enough: the cut is the newest signed head (8),
        // never past it.
        assert_eq!(trail.store.prune("2999-01-01T00:00:00Z").unwrap(), Some((8, 8)));
        let report = trail.verify();
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.first_id, report.last_id, report.events), (9, 10, 2));
        trail
            .store
            .append(&[Event::now(Detail::UnmaskGrantUsed { grant: "later".into() })])
            .unwrap();
        assert!(trail.verify().ok());
        // Without the head at the cut, the missing events are a deletion.
        trail.sql("DELETE FROM heads WHERE id = 8");
        let broken = trail.verify().broken.unwrap();
        assert_eq!(broken.id, 9);
        assert!(broken.reason.contains("deleted"), "{broken:?}");
    }

    #[test]
    fn requests_without_an_end_are_found_after_a_restart() {
        let mut trail = trail("requests", 0);
        let requested = |request| {
            Event::now(Detail::ApprovalRequested {
                request,
                rule: "r".into(),
                statement: "DELETE FROM orders".into(),
                approvers: vec!["leads".into()],
                needed: 2,
                expires: "2026-01-01T00:00:00Z".into(),
                access: None,
            })
            .in_session("s")
            .by("bob", "shop")
        };
        let decided = |request, decision: &str| {
            Event::now(Detail::ApprovalDecided {
                request,
                decision: decision.into(),
                by: "carol".into(),
                reason: None,
                via: "api".into(),
                delegate: None,
                chat_user: None,
            })
        };
        trail
            .store
            .append(&[
                requested(3),
                requested(4),
                decided(3, "approval"),
                decided(4, "denied"),
                requested(5),
            ])
            .unwrap();
        let open: Vec<u64> = trail.store.open_requests().unwrap().iter().map(|o| o.request).collect();
        assert_eq!(open, [3, 5], "one approval of two does not end a request");
        assert_eq!(trail.store.max_request_id().unwrap(), 5);
        trail
            .store
            .append(&[decided(3, "expired"), decided(5, "cancelled")])
            .unwrap();
        assert!(trail.store.open_requests().unwrap().is_empty());
    }

    #[test]
    fn grants_without_an_end_are_found_after_a_restart() {
        let mut trail = trail("grants", 0);
        let requested = |request, grant: &str| {
            Event::now(Detail::ApprovalRequested {
                request,
                rule: grant.into(),
                statement: String::new(),
                approvers: vec!["leads".into()],
                needed: 1,
                expires: "2030-01-01T00:00:00Z".into(),
                access: Some(crate::audit::AccessAsk {
                    grant: grant.into(),
                    seconds: 60,
                }),
            })
            .by("bob", "shop")
        };
        let approved = |request| {
            Event::now(Detail::ApprovalDecided {
                request,
                decision: "approved".into(),
                by: "carol".into(),
                reason: None,
                via: "api".into(),
                delegate: None,
                chat_user: None,
            })
            .by("bob", "shop")
        };
        let granted = |request, until: &str| {
            Event::now(Detail::AccessGranted {
                request,
                grant: "writer".into(),
                subject: "sub-bob".into(),
                until: until.into(),
            })
            .by("bob", "shop")
        };
        let until = "2030-01-01T00:00:00+00:00";
        trail
            .store
            .append(&[
                requested(1, "writer"),
                approved(1),
                granted(1, until),
                requested(2, "writer"),
                approved(2),
                granted(2, until),
                Event::now(Detail::AccessEnded {
                    request: 2,
                    grant: "writer".into(),
                    reason: "expired".into(),
                }),
                // Unreadable, never approved, approved for another grant.
                requested(3, "writer"),
                approved(3),
                granted(3, "not a time"),
                requested(4, "writer"),
                granted(4, until),
                requested(5, "reader"),
                approved(5),
                granted(5, until),
            ])
            .unwrap();
        let open = trail.store.open_grants().unwrap();
        assert_eq!(
            open.len(),
            1,
            "only a requested, approved, unended, readable grant: {open:?}"
        );
        let grant = &open[0].grant;
        assert_eq!(open[0].id, 3);
        assert_eq!(
            (
                grant.request,
                grant.grant.as_str(),
                grant.identity.as_str(),
                grant.subject.as_str()
            ),
            (1, "writer", "bob", "sub-bob")
        );
        assert_eq!(
            (grant.target.as_str(), grant.until.to_rfc3339()),
            ("shop", until.to_string())
        );
    }

    #[test]
    fn a_second_writer_is_refused() {
        let trail = trail("locked", 1);
        let err = SqliteStore::open(&trail.dir.join("audit.db"), SyncMode::Normal).unwrap_err();
        assert!(err.to_string().contains("another process"), "{err}");
        assert!(SqliteStore::open_read_only(&trail.dir.join("audit.db")).is_ok());
    }

    #[test]
    fn a_trail_with_no_signed_head_reports_everything_unsigned() {
        let trail = trail("unsigned", 3);
        let report = trail.verify();
        assert!(report.ok());
        assert_eq!((report.last_signed, report.unsigned_tail()), (None, 3));
    }
}
