//! The write-ahead journal (`sync = "normal"`): where a statement's event
//! becomes durable before the statement goes upstream, without an SQLite
//! commit (and a thread switch) per statement.
//!
//! One preallocated file beside the trail (`<path>-ahead`), mapped into
//! memory and used as a ring. Whoever records an event copies its stored
//! form into the ring, under the writer queue's lock: a store into the page
//! cache, which survives a crash of the gateway (kill -9) exactly as an
//! SQLite commit with `synchronous = NORMAL` does, with no system call and
//! no wakeup. The writer thread moves events into SQLite in large batches
//! behind it and keeps, in the same transaction, how far into the journal
//! it got ([`Mark`]). At the next start, what the journal holds beyond that
//! mark is written to the trail first ([`Journal::recover`]).
//!
//! A record is `len: u32, check: u32, seq: u64`, then `len` bytes of the
//! event's JSON, padded to 8 bytes. `seq` numbers journal records without
//! gaps for ever (it continues across restarts), so the bytes a ring lap
//! left behind (lower numbers) and a record cut short by a crash (its check
//! fails) both end the recovery walk. A record that would cross the end of
//! the ring is written at its start, after a marker (`len = u32::MAX`).

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::AuditError;

/// The ring's size in a new journal (one that exists keeps the size in its
/// header until the gateway has recovered it: [`Journal::capacity`]).
/// Sessions are slowed down once half of it waits for the writer
/// (`Journal::crowded`), so this bounds how far SQLite may lag behind and
/// how long an outage of the SQLite file is absorbed. Small, because the
/// ring goes through the cache with everything else on the machine: with
/// 16 MiB (the size before) every record was cold by the time the ring
/// came round, and writing it evicted PostgreSQL's and pgbench's lines.
/// Side by side in one `bench/pgbench.sh` run (two audit-on gateways, six
/// paired rounds at each of -c 10 and -c 50), 4 MiB did better in ten of
/// the twelve rounds; separate runs on a shared host vary by more than
/// that difference. A quarter of it (one batch) holds about 100 ms of
/// pgbench -S at 15,000 TPS (some 650 bytes per transaction).
pub const CAPACITY: u64 = 4 << 20;

/// The sizes a journal's header may give: what `open` accepts.
const CAPACITY_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(1 << 30);

/// The file header: magic, then the ring's capacity.
const HEADER: u64 = 4096;
const MAGIC: &[u8; 16] = b"sluice-journal-1";

const RECORD_HEADER: u64 = 16;
const WRAP: u32 = u32::MAX;

/// A position in the journal: the logical offset (it only grows; the ring
/// position is `offset % capacity`) and the sequence number of the record
/// that goes there next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    pub offset: u64,
    pub seq: u64,
}

/// The mapped journal file. Writes happen only under the writer queue's
/// lock (the caller's `&mut Mark` is that state), reads only at recovery.
pub struct Journal {
    path: PathBuf,
    map: NonNull<u8>,
    /// The ring's size, from the header.
    capacity: u64,
    /// Mapped for writing (the gateway's); a reader's view is not.
    writable: bool,
    /// Keeps the descriptor (and the flock'd writer that owns it) alive
    /// with the mapping.
    _file: std::fs::File,
}

// SAFETY: the mapping is plain shared memory; every write to it goes
// through `append` under the writer queue's mutex, and reads happen only in
// `recover`, before any session can append.
unsafe impl Send for Journal {}
unsafe impl Sync for Journal {}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `open` made; nothing uses it
        // after drop.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), (HEADER + self.capacity) as usize);
        }
    }
}

/// The journal's path for a trail at `path`. Not `-journal` or `-wal`: those
/// are SQLite's own.
pub fn path_for(trail: &Path) -> PathBuf {
    let mut name = trail.as_os_str().to_owned();
    name.push("-ahead");
    PathBuf::from(name)
}

impl Journal {
    /// Opens the journal, creating (and fully allocating, so that a write
    /// into the mapping can never find the disk full) a new one of
    /// [`CAPACITY`] if there is none. One that exists keeps its own size
    /// (from its header) for recovery. The trail's writer lock must be
    /// held.
    pub fn open(path: &Path) -> Result<Journal, AuditError> {
        let setup = |reason: String| AuditError::Setup {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| setup(format!("cannot open the audit journal: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| setup(format!("cannot read the audit journal's size: {e}")))?
            .len();
        if len > 0 {
            let capacity = header_capacity(path, &file, len)?;
            return Journal::map(path, file, true, capacity);
        }
        // SAFETY: a descriptor this function owns.
        let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, (HEADER + CAPACITY) as libc::off_t) };
        if err != 0 {
            let _ = std::fs::remove_file(path);
            return Err(setup(format!(
                "cannot allocate the audit journal ({} MiB): {}",
                CAPACITY >> 20,
                std::io::Error::from_raw_os_error(err)
            )));
        }
        let journal = Journal::map(path, file, true, CAPACITY)?;
        journal.bytes_mut(0, 16).copy_from_slice(MAGIC);
        journal.bytes_mut(16, 8).copy_from_slice(&CAPACITY.to_le_bytes());
        Ok(journal)
    }

    /// A reader's view of the journal beside a trail (for `sluice audit
    /// verify`), mapped read-only and without the writer lock: `None` when
    /// there is none. Only [`Journal::recover`] is meaningful on it; a
    /// running gateway may be appending meanwhile, and a record it has not
    /// finished fails its check and ends the walk.
    pub fn open_read_only(path: &Path) -> Result<Option<Journal>, AuditError> {
        let setup = |reason: String| AuditError::Setup {
            path: path.to_path_buf(),
            reason,
        };
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(setup(format!("cannot open the audit journal: {err}"))),
        };
        let len = file
            .metadata()
            .map_err(|e| setup(format!("cannot read the audit journal's size: {e}")))?
            .len();
        let capacity = header_capacity(path, &file, len)?;
        Ok(Some(Journal::map(path, file, false, capacity)?))
    }

    /// Maps the whole file (whose size the caller checked or allocated:
    /// the header and a ring of `capacity`), shared, writable for the
    /// gateway, read-only for a reader.
    fn map(path: &Path, file: std::fs::File, writable: bool, capacity: u64) -> Result<Journal, AuditError> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: maps the whole file on a descriptor the journal keeps
        // open for the mapping's life; its size is the mapping's.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (HEADER + capacity) as usize,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        let setup = |reason: String| AuditError::Setup {
            path: path.to_path_buf(),
            reason,
        };
        if map == libc::MAP_FAILED {
            return Err(setup(format!(
                "cannot map the audit journal: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Journal {
            path: path.to_path_buf(),
            map: NonNull::new(map.cast()).ok_or_else(|| setup("mmap returned null".into()))?,
            capacity,
            writable,
            _file: file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ring's size: [`CAPACITY`] for a journal this version made.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn bytes(&self, at: u64, len: u64) -> &[u8] {
        debug_assert!(at + len <= HEADER + self.capacity);
        // SAFETY: within the mapping (checked by the callers' arithmetic).
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(at as usize), len as usize) }
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes_mut(&self, at: u64, len: u64) -> &mut [u8] {
        debug_assert!(at + len <= HEADER + self.capacity);
        // SAFETY: within the mapping; writers are serialised by the queue
        // lock (see the type's comment), so no two slices overlap in time.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr().add(at as usize), len as usize) }
    }

    /// Copies one event's JSON in at `next` and moves `next` past it; `None`
    /// (and nothing written) when it does not fit before `ingested`, the
    /// oldest position the writer still needs, or is too large for the
    /// journal (a quarter of the ring: one huge statement must not fill
    /// it). The caller holds the queue lock.
    pub fn append(&self, next: &mut Mark, ingested: u64, json: &[u8]) -> Option<()> {
        let capacity = self.capacity;
        if !self.writable {
            return None;
        }
        let size = RECORD_HEADER + (json.len() as u64).next_multiple_of(8);
        if json.len() as u64 > capacity / 4 {
            return None;
        }
        let pos = next.offset % capacity;
        let to_end = capacity - pos;
        let skip = if size > to_end { to_end } else { 0 };
        if next.offset + skip + size - ingested > capacity {
            return None;
        }
        if skip > 0 {
            self.bytes_mut(HEADER + pos, 4).copy_from_slice(&WRAP.to_le_bytes());
            next.offset += skip;
        }
        let at = HEADER + next.offset % capacity;
        write_record(self.bytes_mut(at, size), next.seq, json);
        next.offset += size;
        next.seq += 1;
        Some(())
    }

    /// Whether more than half a ring of `capacity` waits for the writer:
    /// sessions then wait before their next statement, so that SQLite
    /// keeps up.
    pub fn crowded(capacity: u64, next: u64, ingested: u64) -> bool {
        next - ingested > capacity / 2
    }

    /// Whether a quarter of the ring waits for the writer: enough for one
    /// batch, so the writer stops letting events gather and takes them,
    /// long before the ring is crowded. (Waiting out the gathering time
    /// instead would stall every session once a fast enough load crowds
    /// the ring within it.)
    pub fn batch_ready(capacity: u64, next: u64, ingested: u64) -> bool {
        next - ingested >= capacity / 4
    }

    /// Maps the pages after `next` writable now (half a ring ahead: as far
    /// as sessions go before they wait), from the writer thread, so that
    /// the session that copies an event there does not fault and wait in
    /// the kernel; `done` is how far that was done already (it only grows).
    pub fn prefault(&self, next: u64, done: &mut u64) {
        const PAGE: u64 = 4096;
        let capacity = self.capacity;
        let target = next + capacity / 2;
        let mut at = (*done).max(next) / PAGE * PAGE;
        while at < target {
            let pos = at % capacity;
            let len = (target - at).min(capacity - pos);
            // SAFETY: a range inside the mapping (HEADER and `pos` are
            // page-aligned); MADV_POPULATE_WRITE only faults pages in (it
            // changes no data). Kernels before 5.14 refuse it, and then the
            // first write faults as usual.
            unsafe {
                libc::madvise(
                    self.map.as_ptr().add((HEADER + pos) as usize).cast(),
                    len as usize,
                    libc::MADV_POPULATE_WRITE,
                );
            }
            at += len;
        }
        *done = (*done).max(target);
    }

    /// The events recorded after `from`, in order, each with the mark after
    /// it: what a crash left in the journal and not in the trail.
    pub fn recover(&self, from: Mark) -> Vec<(Mark, String)> {
        let capacity = self.capacity;
        let mut out = Vec::new();
        let mut at = from;
        let end = from.offset + capacity;
        while at.offset + RECORD_HEADER <= end {
            let pos = at.offset % capacity;
            let len = u32::from_le_bytes(self.bytes(HEADER + pos, 4).try_into().unwrap_or_default());
            if len == WRAP {
                at.offset += capacity - pos;
                continue;
            }
            let size = RECORD_HEADER + u64::from(len).next_multiple_of(8);
            if u64::from(len) > capacity / 4 || size > capacity - pos || at.offset + size > end {
                break;
            }
            let head = self.bytes(HEADER + pos, RECORD_HEADER);
            let stored_check = u32::from_le_bytes(head[4..8].try_into().unwrap_or_default());
            let seq = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
            let json = self.bytes(HEADER + pos + RECORD_HEADER, u64::from(len));
            if seq != at.seq || stored_check != check(seq, json) {
                break;
            }
            let Ok(json) = std::str::from_utf8(json) else { break };
            at.offset += size;
            at.seq += 1;
            out.push((at, json.to_string()));
        }
        out
    }
}

/// The ring's size an existing journal's header gives, checked against
/// the file's length (`len`).
fn header_capacity(path: &Path, file: &std::fs::File, len: u64) -> Result<u64, AuditError> {
    use std::os::unix::fs::FileExt as _;
    let mut header = [0u8; 24];
    let read = file.read_exact_at(&mut header, 0);
    let capacity = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
    if read.is_err() || &header[..16] != MAGIC {
        return Err(AuditError::Setup {
            path: path.to_path_buf(),
            reason: format!(
                "{} is not a Sluice audit journal of this version; if the gateway is stopped and the trail \
                 verifies, remove it",
                path.display()
            ),
        });
    }
    if !CAPACITY_RANGE.contains(&capacity) || !capacity.is_multiple_of(4096) || len != HEADER + capacity {
        return Err(AuditError::Setup {
            path: path.to_path_buf(),
            reason: format!(
                "{} is not a journal this gateway can use ({len} bytes, its header gives a ring of {capacity}); \
                 if the gateway is stopped and the trail verifies, remove it",
                path.display()
            ),
        });
    }
    Ok(capacity)
}

/// Writes a record (`len`, `check`, `seq`, the JSON padded with zeros) into
/// `record`, exactly its size.
///
/// Ordinary stores, no fence: the queue lock's release publishes the
/// record like any other write, and a crash of the gateway loses nothing
/// a store has written (the mapping is the page cache). Non-temporal
/// stores with a fence (which kept the ring out of the cache) were
/// measured against this side by side, two audit-on gateways in one
/// `bench/pgbench.sh` run, six rounds: at -c 50 they cost the gateway 9.5
/// us per transaction over the audit-off one, ordinary stores 8.1, and
/// the TPS ratio was the same (0.93); at -c 10 the host's steal time
/// (up to 16%) hid any difference. So the simpler code.
fn write_record(record: &mut [u8], seq: u64, json: &[u8]) {
    debug_assert_eq!(
        record.len() as u64,
        RECORD_HEADER + (json.len() as u64).next_multiple_of(8)
    );
    let (header, body) = record.split_at_mut(RECORD_HEADER as usize);
    let (bytes, padding) = body.split_at_mut(json.len());
    bytes.copy_from_slice(json);
    padding.fill(0);
    header[0..4].copy_from_slice(&(json.len() as u32).to_le_bytes());
    header[4..8].copy_from_slice(&check(seq, json).to_le_bytes());
    header[8..16].copy_from_slice(&seq.to_le_bytes());
}

/// A cheap check over a record: enough to tell a whole record from one a
/// crash cut short or from old bytes (it is not what makes the trail
/// tamper-evident: the hash chain is). The last partial word counts padded
/// with zeros.
fn check(seq: u64, bytes: &[u8]) -> u32 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = seq ^ K ^ (bytes.len() as u64).rotate_left(32);
    let mut words = bytes.chunks_exact(8);
    for word in words.by_ref() {
        h = (h ^ u64::from_le_bytes(word.try_into().unwrap_or_default()))
            .wrapping_mul(K)
            .rotate_left(31);
    }
    let mut last = [0u8; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    let h = (h ^ u64::from_le_bytes(last)).wrapping_mul(K);
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(name: &str) -> (PathBuf, Journal) {
        let dir = std::env::temp_dir().join(format!("sluice-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = path_for(&dir.join("audit.db"));
        let journal = Journal::open(&path).unwrap();
        (dir, journal)
    }

    #[test]
    fn a_record_is_its_length_check_sequence_and_bytes_padded_with_zeros() {
        // At any alignment; every length
        // around a word's end; over old bytes, which the padding replaces.
        for offset in [0usize, 8, 4] {
            for len in 0..=25usize {
                let json: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                let size = 16 + len.next_multiple_of(8);
                let mut words = vec![u64::MAX; (offset + size).div_ceil(8) + 1];
                let bytes = &mut bytes_of(&mut words)[offset..offset + size];
                write_record(bytes, 7 + len as u64, &json);
                assert_eq!(&bytes[0..4], &(len as u32).to_le_bytes(), "len {len}");
                assert_eq!(&bytes[4..8], &check(7 + len as u64, &json).to_le_bytes(), "len {len}");
                assert_eq!(&bytes[8..16], &(7 + len as u64).to_le_bytes(), "len {len}");
                assert_eq!(&bytes[16..16 + len], &json[..], "len {len}");
                assert!(bytes[16 + len..].iter().all(|b| *b == 0), "len {len}");
            }
        }
    }

    /// `words` as bytes (8-aligned at the start).
    fn bytes_of(words: &mut [u64]) -> &mut [u8] {
        // SAFETY: u64 has no invalid bit patterns and u8 no alignment.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
    }

    #[test]
    fn a_readers_view_sees_what_the_writer_appended_and_cannot_write() {
        let (dir, journal) = journal("reader");
        let path = journal.path().to_path_buf();
        let mut next = Mark::default();
        for n in 0..3 {
            journal
                .append(&mut next, 0, format!("{{\"n\":{n}}}").as_bytes())
                .unwrap();
        }
        let view = Journal::open_read_only(&path).unwrap().expect("the journal exists");
        // While the writer still holds it, as `sluice audit verify` does.
        let seen = view.recover(Mark::default());
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[2].1, "{\"n\":2}");
        assert_eq!(view.recover(seen[0].0).len(), 2);
        let mut from = next;
        assert!(
            view.append(&mut from, 0, b"{}").is_none(),
            "a reader's view does not write"
        );
        drop(journal);
        assert!(Journal::open_read_only(&dir.join("none")).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_come_back_in_order_across_the_ring_end_and_stale_ones_do_not() {
        let (dir, journal) = journal("ring");
        // Start near the end of the ring so that records wrap.
        let start = Mark {
            offset: 3 * CAPACITY - 100,
            seq: 41,
        };
        let mut next = start;
        let texts: Vec<String> = (0..5)
            .map(|n| format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(n * 7)))
            .collect();
        for text in &texts {
            journal.append(&mut next, start.offset, text.as_bytes()).unwrap();
        }
        let back = journal.recover(start);
        assert_eq!(back.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>(), texts);
        assert_eq!(back.last().unwrap().0, next);
        // From the middle: only what follows.
        assert_eq!(journal.recover(back[1].0).len(), 3);
        // Nothing after the last record (what follows is old or empty).
        assert!(journal.recover(next).is_empty());
        // A record cut short (its bytes changed) ends the walk there.
        let pos = HEADER + back[2].0.offset % CAPACITY + 20;
        journal.bytes_mut(pos, 1)[0] ^= 0xff;
        assert_eq!(journal.recover(start).len(), 3);
        drop(journal);
        // The file opens again; another file does not.
        assert!(Journal::open(&path_for(&dir.join("audit.db"))).is_ok());
        std::fs::write(dir.join("other"), b"not a journal").unwrap();
        let err = Journal::open(&dir.join("other")).unwrap_err();
        assert!(err.to_string().contains("not a Sluice audit journal"), "{err}");
        // A journal's header, the wrong length.
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&CAPACITY.to_le_bytes());
        std::fs::write(dir.join("short"), &header).unwrap();
        let err = Journal::open(&dir.join("short")).unwrap_err();
        assert!(err.to_string().contains("not a journal this gateway can use"), "{err}");
        assert!(Journal::open_read_only(&dir.join("short")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_ring_takes_nothing_more_until_the_writer_catches_up() {
        let (dir, journal) = journal("full");
        let mut next = Mark::default();
        let big = vec![b'a'; (CAPACITY / 4 - 64) as usize];
        let mut n = 0;
        while journal.append(&mut next, 0, &big).is_some() {
            n += 1;
        }
        assert!(n >= 3, "{n}");
        assert!(Journal::crowded(journal.capacity(), next.offset, 0));
        let half = next.offset - CAPACITY / 2;
        assert!(journal.append(&mut next, half, &big).is_some());
        assert!(
            journal
                .append(&mut next, 0, &vec![b'a'; CAPACITY as usize / 4 + 1])
                .is_none(),
            "too large for the journal"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
