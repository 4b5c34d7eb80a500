//! `sluice audit`: verify, browse and export the audit trail from the shell.
//! Reads the trail with its own read-only connection, so it works while the
//! gateway runs.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use sluice_core::Config;
use sluice_core::audit::{Detail, EventFilter, PublicKey, Signer, SqliteStore, StoredEvent, read_head_file};

/// Where the trail and its files are: from flags, else from the config.
pub struct TrailFiles {
    pub path: PathBuf,
    pub key_file: Option<PathBuf>,
    pub head_file: Option<PathBuf>,
}

impl TrailFiles {
    pub fn resolve(
        config: &Path,
        path: Option<PathBuf>,
        key_file: Option<PathBuf>,
        head_file: Option<PathBuf>,
    ) -> anyhow::Result<TrailFiles> {
        if let Some(path) = path {
            return Ok(TrailFiles {
                path,
                key_file,
                head_file,
            });
        }
        let config = Config::load(config).with_context(|| {
            format!(
                "give --path to the audit database, or a configuration with --config (read {})",
                config.display()
            )
        })?;
        Ok(TrailFiles {
            path: config.audit.path.clone(),
            key_file: key_file.or(Some(config.audit.key_file.clone())),
            head_file: head_file.or(Some(config.audit.head_file.clone())),
        })
    }

    fn open(&self) -> anyhow::Result<SqliteStore> {
        SqliteStore::open_read_only(&self.path).map_err(anyhow::Error::from)
    }

    /// The signed head kept beside the trail, if there is a head file.
    fn head(&self) -> anyhow::Result<Option<sluice_core::audit::SignedHead>> {
        match &self.head_file {
            Some(path) => Ok(read_head_file(path)?),
            None => Ok(None),
        }
    }
}

/// The public key: given as hex, or derived from the signing key file.
fn public_key(given: Option<&str>, files: &TrailFiles) -> anyhow::Result<PublicKey> {
    if let Some(hex) = given {
        return PublicKey::parse(hex)
            .with_context(|| format!("--public-key {hex:?} is not an Ed25519 public key (64 hex digits)"));
    }
    let Some(key_file) = &files.key_file else {
        bail!("give --public-key (64 hex digits, from `sluice audit public-key`) or --key-file");
    };
    let text = std::fs::read_to_string(key_file)
        .with_context(|| format!("reading the signing key {} (or give --public-key)", key_file.display()))?;
    let signer = Signer::from_pem(&text).map_err(|reason| anyhow::anyhow!("{}: {reason}", key_file.display()))?;
    Ok(signer.public_key())
}

/// `sluice audit verify`: exit 0 when intact, 1 when broken.
pub fn verify(files: &TrailFiles, key: Option<&str>) -> anyhow::Result<i32> {
    let key = public_key(key, files)?;
    let store = files.open()?;
    let head = files.head()?;
    let report = store.verify(&key, head.as_ref())?;
    let path = files.path.display();
    match &report.broken {
        Some(broken) => {
            println!("audit trail {path}: BROKEN at event {}", broken.id);
            println!("  {}", broken.reason);
            println!("  checked {} events before it", report.events);
            Ok(1)
        }
        None => {
            println!("audit trail {path}: intact");
            if report.events == 0 {
                println!("  events     none yet");
            } else {
                println!(
                    "  events     {}..{} ({} events)",
                    report.first_id, report.last_id, report.events
                );
            }
            match report.last_signed {
                Some(signed) => println!(
                    "  signed     up to event {signed} ({} signed heads checked{})",
                    report.signed_heads,
                    match &head {
                        Some(head) => format!("; head file: event {}", head.id),
                        None => "; no head file".into(),
                    }
                ),
                None => println!("  signed     no signed head yet"),
            }
            if report.unsigned_tail() > 0 {
                println!(
                    "  unsigned   {} events after the last signed head (the gateway signs every sign_every events or sign_interval)",
                    report.unsigned_tail()
                );
            }
            println!("  key        {}", key.to_hex());
            pending_in_journal(files, &store);
            Ok(0)
        }
    }
}

/// Events the write-ahead journal holds beyond the trail: recorded (their
/// statements may have run) but not in the trail, so not verified yet. A
/// running gateway moves them within moments; after a crash, its next start
/// does.
fn pending_in_journal(files: &TrailFiles, store: &sluice_core::audit::SqliteStore) {
    let path = sluice_core::audit::journal_path(&files.path);
    match sluice_core::audit::Journal::open_read_only(&path) {
        Ok(Some(journal)) => {
            let pending = journal.recover(store.journal_position());
            if !pending.is_empty() {
                println!(
                    "  pending    {} records in the write-ahead journal ({}) are not in the trail yet: a running \
                     gateway adds them within moments; after a crash, its next start does (verify again then)",
                    pending.len(),
                    path.display()
                );
            }
        }
        Ok(None) => {}
        Err(err) => println!("  pending    cannot read the write-ahead journal: {err}"),
    }
}

/// `sluice audit public-key`.
pub fn print_public_key(files: &TrailFiles) -> anyhow::Result<()> {
    println!("{}", public_key(None, files)?.to_hex());
    Ok(())
}

/// `sluice audit sessions`.
pub fn sessions(files: &TrailFiles, limit: u64) -> anyhow::Result<()> {
    let store = files.open()?;
    let sessions = store.sessions(limit)?;
    if sessions.is_empty() {
        println!("no sessions in {}", files.path.display());
        return Ok(());
    }
    println!(
        "{:<32}  {:<27}  {:<16}  {:<12}  {:>10}  {:>7}  END",
        "SESSION", "STARTED", "IDENTITY", "TARGET", "STATEMENTS", "REFUSED"
    );
    for s in sessions {
        let end = if s.refused_at_start {
            "refused at start".to_string()
        } else {
            s.closed.clone().unwrap_or_else(|| "open".into())
        };
        println!(
            "{:<32}  {:<27}  {:<16}  {:<12}  {:>10}  {:>7}  {end}",
            s.session,
            s.started,
            printable(s.identity.as_deref().unwrap_or("-")),
            printable(s.target.as_deref().unwrap_or("-")),
            s.statements,
            s.refused
        );
    }
    Ok(())
}

/// `sluice audit show SESSION`.
pub fn show(files: &TrailFiles, session: &str) -> anyhow::Result<()> {
    let store = files.open()?;
    let events = store.events(&EventFilter {
        session: Some(session.to_string()),
        ..EventFilter::default()
    })?;
    if events.is_empty() {
        bail!(
            "no session {session:?} in {} (see `sluice audit sessions`)",
            files.path.display()
        );
    }
    for stored in &events {
        println!("{}", describe(stored));
    }
    Ok(())
}

/// One line per event (and, for a completion, its columns and sample), for
/// people.
fn describe(stored: &StoredEvent) -> String {
    let event = &stored.event;
    let at = event.at.to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut what = printable(&event.summary());
    if let Detail::StatementDone { columns, sample, .. } = &event.detail {
        if !columns.is_empty() {
            let described: Vec<String> = columns
                .iter()
                .map(|c| {
                    let origin = c.origin.as_deref().map(|o| format!(" <- {o}")).unwrap_or_default();
                    let tags = if c.tags.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", c.tags.join(", "))
                    };
                    format!("{}{origin} [{}{tags}]", c.name, c.masking)
                })
                .collect();
            what.push_str(&format!(
                "\n{:>8}  {:24}  columns: {}",
                "",
                "",
                printable(&described.join(", "))
            ));
        }
        if !sample.is_empty() {
            let width = sample[0].len().min(columns.len());
            let names: Vec<&str> = columns[..width].iter().map(|c| c.name.as_str()).collect();
            what.push_str(&format!("\n{:>8}  {:24}  | {}", "", "", printable(&names.join(" | "))));
            for row in sample {
                let values: Vec<&str> = row.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect();
                what.push_str(&format!("\n{:>8}  {:24}  | {}", "", "", printable(&values.join(" | "))));
            }
        }
    }
    format!("{:>8}  {at}  {what}", stored.id)
}

/// Control characters would let a statement text rewrite the terminal: they
/// become spaces. Other characters that are not seen but change what is
/// (bidirectional overrides, zero-width spaces) are shown escaped, as the
/// console shows them: `\u{202e}`.
fn printable(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            c if c.is_control() => out.push(' '),
            c if sluice_core::text::is_invisible(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// `--since` / `--until`: an RFC 3339 time, a date (UTC midnight), or an
/// age such as `30d`, `12h` or `15m`.
pub fn parse_time(text: &str, now: DateTime<Utc>) -> anyhow::Result<String> {
    let time = if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        time.with_timezone(&Utc)
    } else if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        date.and_hms_opt(0, 0, 0).context("midnight")?.and_utc()
    } else {
        let (number, unit) = text.split_at(text.len().saturating_sub(1));
        let n: i64 = number.parse().with_context(|| {
            format!("{text:?} is not a time: write 2026-11-01, 2026-11-01T10:00:00Z or an age like 30d")
        })?;
        let age = match unit {
            "d" => chrono::Duration::days(n),
            "h" => chrono::Duration::hours(n),
            "m" => chrono::Duration::minutes(n),
            "s" => chrono::Duration::seconds(n),
            _ => bail!("{text:?}: an age ends in d, h, m or s"),
        };
        now - age
    };
    Ok(time.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// `sluice audit lineage`: who touched a relation or tagged data, or what
/// an identity touched.
pub fn lineage(files: &TrailFiles, query: &sluice_core::audit::LineageQuery) -> anyhow::Result<()> {
    if query.relation.is_none() && query.tag.is_none() && query.identity.is_none() {
        bail!("say what to trace: --relation customers, --tag pii or --identity alice (or several)");
    }
    let store = files.open()?;
    let events = store.events(&EventFilter::default())?;
    let rows = sluice_core::audit::lineage(&events, query);
    if rows.is_empty() {
        println!("nothing in {} matches", files.path.display());
        return Ok(());
    }
    println!(
        "{:<24}  {:<22}  {:<10}  {:<24}  {:<6}  {:<7}  {:>10}  {:<27}  TAGS",
        "IDENTITY", "LABELS", "TARGET", "RELATION", "ACCESS", "VALUES", "STATEMENTS", "LAST"
    );
    for row in rows {
        let labels: Vec<String> = row.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<24}  {:<22}  {:<10}  {:<24}  {:<6}  {:<7}  {:>10}  {:<27}  {}",
            printable(&row.identity),
            printable(&labels.join(",")),
            printable(&row.target),
            printable(&row.relation),
            row.access,
            if row.masked { "masked" } else { "clear" },
            row.statements,
            row.last,
            row.tags.iter().cloned().collect::<Vec<_>>().join(",")
        );
        if !row.columns.is_empty() {
            let columns: Vec<String> = row
                .columns
                .iter()
                .map(|(name, masking)| format!("{name} ({})", masking.iter().cloned().collect::<Vec<_>>().join("/")))
                .collect();
            println!("{:<24}  columns: {}", "", printable(&columns.join(", ")));
        }
    }
    Ok(())
}

/// `sluice audit report`: the evidence pack for a period, as Markdown and
/// JSON in `out`. Exit 1 when the chain does not verify.
pub fn report(
    files: &TrailFiles,
    key: Option<&str>,
    since: &str,
    until: Option<&str>,
    out: &Path,
) -> anyhow::Result<i32> {
    let now = Utc::now();
    let since = parse_time(since, now)?;
    let until = match until {
        Some(until) => parse_time(until, now)?,
        None => now.to_rfc3339_opts(SecondsFormat::Micros, true),
    };
    let key = public_key(key, files)?;
    let store = files.open()?;
    let head = files.head()?;
    let verification = store.verify(&key, head.as_ref())?;
    let events = store.events(&EventFilter {
        since: Some(since.clone()),
        until: Some(until.clone()),
        ..EventFilter::default()
    })?;
    let report = sluice_core::audit::report::build(&events, &since, &until, &verification);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let md = out.join("sluice-evidence.md");
    let json = out.join("sluice-evidence.json");
    std::fs::write(&md, report.markdown()).with_context(|| format!("writing {}", md.display()))?;
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("evidence for {since} to {until}: {} events", report.events);
    println!("  {}", md.display());
    println!("  {}", json.display());
    println!("  audit trail: {}", report.chain);
    Ok(if report.chain_intact { 0 } else { 1 })
}

/// `sluice audit export`.
pub fn export(files: &TrailFiles, since: Option<&str>, until: Option<&str>, format: &str) -> anyhow::Result<()> {
    let now = Utc::now();
    let filter = EventFilter {
        since: since.map(|t| parse_time(t, now)).transpose()?,
        until: until.map(|t| parse_time(t, now)).transpose()?,
        ..EventFilter::default()
    };
    let store = files.open()?;
    let events = store.events(&filter)?;
    // A row of the trail may keep several events (a statement with its
    // completion, a session's statements): `part` numbers them, so that
    // (id, part) names each event once.
    let parts: Vec<u64> = events
        .iter()
        .scan(None, |last: &mut Option<(u64, u64)>, stored| {
            let part = match *last {
                Some((id, part)) if id == stored.id => part + 1,
                _ => 0,
            };
            *last = Some((stored.id, part));
            Some(part)
        })
        .collect();
    use std::io::Write as _;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match format {
        "jsonl" => {
            for (stored, part) in events.into_iter().zip(parts) {
                let mut value = serde_json::to_value(&stored.event)?;
                if let Some(object) = value.as_object_mut() {
                    object.insert("id".into(), stored.id.into());
                    object.insert("part".into(), part.into());
                }
                writeln!(out, "{value}")?;
            }
        }
        "csv" => {
            writeln!(out, "id,part,at,type,session,identity,target,decision,text,event")?;
            for (stored, part) in events.into_iter().zip(parts) {
                let event = &stored.event;
                let (decision, text) = match &event.detail {
                    Detail::Statement { decision, text, .. } => (decision.as_str(), text.as_str()),
                    _ => ("", ""),
                };
                let fields = [
                    stored.id.to_string(),
                    part.to_string(),
                    event.at.to_rfc3339_opts(SecondsFormat::Micros, true),
                    event.detail.kind().to_string(),
                    event.session.clone().unwrap_or_default(),
                    event.identity.clone().unwrap_or_default(),
                    event.target.clone().unwrap_or_default(),
                    decision.to_string(),
                    text.to_string(),
                    event.to_json(),
                ];
                let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                writeln!(out, "{}", row.join(","))?;
            }
        }
        other => bail!("--format {other:?}: write jsonl or csv"),
    }
    out.flush()?;
    Ok(())
}

/// A CSV field, quoted when it must be (RFC 4180). A leading `=`, `+`, `-`
/// or `@` gets a quote prefix so that spreadsheets do not run it.
fn csv_field(value: &str) -> String {
    let guarded = if value.starts_with(['=', '+', '-', '@']) {
        format!("'{value}")
    } else {
        value.to_string()
    };
    if guarded.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", guarded.replace('"', "\"\""))
    } else {
        guarded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_in_every_documented_form() {
        let now = DateTime::parse_from_rfc3339("2026-11-29T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_time("30d", now).unwrap(), "2026-10-30T12:00:00.000000Z");
        assert_eq!(parse_time("2h", now).unwrap(), "2026-11-29T10:00:00.000000Z");
        assert_eq!(parse_time("2026-11-01", now).unwrap(), "2026-11-01T00:00:00.000000Z");
        assert_eq!(
            parse_time("2026-11-01T10:00:00+01:00", now).unwrap(),
            "2026-11-01T09:00:00.000000Z"
        );
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("5w", now).is_err());
    }

    #[test]
    fn csv_fields_are_quoted_and_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
    }

    #[test]
    fn a_deny_reason_with_control_characters_cannot_rewrite_the_terminal() {
        use sluice_core::audit::{Detail, Event, StoredEvent};
        let stored = StoredEvent {
            id: 9,
            event: Event::now(Detail::ApprovalDecided {
                request: 3,
                decision: "denied".into(),
                by: "carol".into(),
                reason: Some("no\x1b[2J\x1b]0;owned\x07".into()),
                via: "api".into(),
                delegate: None,
                chat_user: None,
            }),
        };
        let line = describe(&stored);
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert!(
            line.ends_with("request 3 denied by carol (via api): no [2J ]0;owned "),
            "{line:?}"
        );
        // A bidirectional override would show the text reversed.
        assert_eq!(printable("SELECT 1 -- \u{202e}etadpu"), "SELECT 1 -- \\u{202e}etadpu");
    }
}
