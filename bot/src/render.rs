//! What a chat message says about a request, before any platform's
//! formatting: one [`Card`] per request, rendered again whenever the request
//! moves. Free text (statement, reasons) passes the masker's content
//! detectors and loses control and invisible characters first: no clear
//! PII or secrets in chat, and nothing that rearranges the message.

use chrono::{DateTime, Utc};
use sluice_core::approvals::{RequestState, RequestView};
use sluice_core::mask::{DetectorSet, scrub};

/// The longest statement excerpt a message carries, in characters. Slack
/// sections hold 3000, Discord embed fields 1024: this fits both.
pub const STATEMENT_CHARS: usize = 900;

/// A request as a chat message shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    pub id: u64,
    /// "Approval needed" or "Access request".
    pub title: String,
    pub requester: String,
    pub groups: Vec<String>,
    pub target: String,
    /// For an access request: what it asks for ("writer for 30m").
    pub access: Option<String>,
    /// The statement excerpt, masked; `truncated` counts the characters left out.
    pub statement: String,
    pub truncated: usize,
    /// "DELETE (write) orders (write) · risk: no_where".
    pub classification: Vec<String>,
    pub rule: String,
    pub reason: Option<String>,
    pub needed: u32,
    /// Approvals so far: "dave (slack)".
    pub approvals: Vec<String>,
    pub expires: DateTime<Utc>,
    /// The time left when the card was made, in whole minutes over a
    /// minute ("4m"): the message is edited as it changes.
    pub left: String,
    /// Where an approval counts, when a rule restricts it.
    pub approve_via: Vec<String>,
    /// Where the whole statement can be read.
    pub full_text_url: String,
    /// `None` while pending; then how it ended.
    pub outcome: Option<Outcome>,
}

/// How a request ended, as the message says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Approved {
        by: Vec<String>,
        at: DateTime<Utc>,
    },
    Denied {
        by: String,
        reason: Option<String>,
    },
    Expired,
    Cancelled,
    /// The gateway no longer knows it (it restarted meanwhile).
    Gone,
}

impl Outcome {
    /// "Approved by carol at 10:42 UTC", "Denied by carol: not now", "Expired".
    pub fn line(&self) -> String {
        match self {
            Outcome::Approved { by, at } => format!("Approved by {} at {} UTC", by.join(", "), at.format("%H:%M")),
            Outcome::Denied {
                by,
                reason: Some(reason),
            } => format!("Denied by {by}: {reason}"),
            Outcome::Denied { by, reason: None } => format!("Denied by {by}"),
            Outcome::Expired => "Expired: nobody decided in time".into(),
            Outcome::Cancelled => "Cancelled: the client left or cancelled the statement".into(),
            Outcome::Gone => {
                "No longer pending: the gateway no longer lists this request (it restarted or replaced its trail); \
                 the audit trail has how it ended"
                    .into()
            }
        }
    }
}

/// Text from the gateway made safe for a chat message: detectors' findings
/// masked, control and invisible characters replaced (newlines and tabs
/// kept where `multiline`).
pub fn clean(text: &str, multiline: bool) -> String {
    match scrub(text.as_bytes(), DetectorSet::ALL) {
        Some(bytes) => plain(&String::from_utf8_lossy(&bytes), multiline),
        None => plain(text, multiline),
    }
}

/// Names the gateway verified (identities, groups, rules, targets): shown
/// as they are, less control and invisible characters. An approver's email
/// is the point of the message, not a leak.
pub fn name(text: &str) -> String {
    plain(text, false)
}

fn plain(text: &str, multiline: bool) -> String {
    text.chars()
        .map(|c| match c {
            '\n' | '\t' if multiline => c,
            '\n' | '\t' => ' ',
            c if c.is_control() || sluice_core::text::is_invisible(c) => '\u{fffd}',
            c => c,
        })
        .collect()
}

impl Card {
    /// The card of `view` at `now`.
    pub fn new(view: &RequestView, full_text_url: &str, now: DateTime<Utc>) -> Card {
        let statement = clean(&view.statement, true);
        let total = statement.chars().count();
        let (statement, truncated) = if total > STATEMENT_CHARS {
            (
                statement.chars().take(STATEMENT_CHARS).collect(),
                total - STATEMENT_CHARS,
            )
        } else {
            (statement, 0)
        };
        let classification = view
            .statements
            .iter()
            .map(|s| {
                let mut line = format!("{} ({})", name(&s.command), name(&s.kind));
                if !s.relations.is_empty() {
                    line.push_str(&format!(" {}", clean(&s.relations.join(", "), false)));
                }
                if !s.features.is_empty() {
                    line.push_str(&format!(" · risk: {}", name(&s.features.join(", "))));
                }
                if !s.tags.is_empty() {
                    line.push_str(&format!(" · tags: {}", name(&s.tags.join(", "))));
                }
                line
            })
            .collect();
        let outcome = match view.state {
            RequestState::Pending => None,
            RequestState::Approved => Some(Outcome::Approved {
                by: view.approvals.iter().map(|a| name(&a.by)).collect(),
                at: view.approvals.last().map_or(view.created, |a| a.at),
            }),
            RequestState::Denied => Some(Outcome::Denied {
                by: name(view.denied_by.as_deref().unwrap_or("an approver")),
                reason: view.denial_reason.as_deref().map(|r| clean(r, false)),
            }),
            RequestState::Expired => Some(Outcome::Expired),
            RequestState::Cancelled => Some(Outcome::Cancelled),
        };
        Card {
            id: view.id,
            title: if view.access.is_some() {
                "Access request".into()
            } else {
                "Approval needed".into()
            },
            requester: name(&view.requester),
            groups: view.groups.iter().map(|g| name(g)).collect(),
            target: name(&view.target),
            access: view.access.as_ref().map(|a| {
                format!(
                    "grant {} for {}",
                    name(&a.grant),
                    sluice_core::config::human_duration(std::time::Duration::from_secs(a.seconds))
                )
            }),
            statement,
            truncated,
            classification,
            rule: name(&view.rule),
            reason: view.reason.as_deref().map(|r| clean(r, false)),
            needed: view.needed,
            approvals: view
                .approvals
                .iter()
                .map(|a| format!("{} ({})", name(&a.by), name(&a.via)))
                .collect(),
            expires: view.expires,
            left: left(view.expires, now),
            approve_via: view.approve_via.clone(),
            full_text_url: full_text_url.replace("{id}", &view.id.to_string()),
            outcome,
        }
    }

    /// The card for a request the gateway no longer knows.
    pub fn gone(id: u64, full_text_url: &str) -> Card {
        Card {
            id,
            title: "Approval request".into(),
            requester: String::new(),
            groups: Vec::new(),
            target: String::new(),
            access: None,
            statement: String::new(),
            truncated: 0,
            classification: Vec::new(),
            rule: String::new(),
            reason: None,
            needed: 1,
            approvals: Vec::new(),
            expires: DateTime::<Utc>::MIN_UTC,
            left: String::new(),
            approve_via: Vec::new(),
            full_text_url: full_text_url.replace("{id}", &id.to_string()),
            outcome: Some(Outcome::Gone),
        }
    }

    pub fn pending(&self) -> bool {
        self.outcome.is_none()
    }

    /// "1 of 2 approvals: dave (slack)".
    pub fn approvals_line(&self) -> String {
        let so_far = if self.approvals.is_empty() {
            String::new()
        } else {
            format!(": {}", self.approvals.join(", "))
        };
        format!(
            "{} of {} approval{}{so_far}",
            self.approvals.len(),
            self.needed,
            plural(self.needed)
        )
    }

    /// "expires 10:47:12 UTC (in 4m)".
    pub fn expiry_line(&self) -> String {
        format!("expires {} UTC (in {})", self.expires.format("%H:%M:%S"), self.left)
    }
}

/// The time left, in whole minutes over a minute.
fn left(expires: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (expires - now).num_seconds().max(0) as u64;
    let shown = if seconds >= 60 { seconds / 60 * 60 } else { seconds };
    sluice_core::config::human_duration(std::time::Duration::from_secs(shown))
}

/// `text` escaped character by character (`escape` writes one character's
/// escaped form) and cut so that the result has at most `max` characters,
/// ending in "…" when cut: never inside an escape, never over a platform's
/// limit for the field.
pub fn fit(text: &str, max: usize, escape: impl Fn(char, &mut String)) -> String {
    let mut out = String::new();
    let mut piece = String::new();
    let mut count = 0;
    // Where the text must stop if anything is left out, to leave room for "…".
    let mut cut_at: Option<usize> = None;
    for c in text.chars() {
        piece.clear();
        escape(c, &mut piece);
        let n = piece.chars().count();
        if count + n > max.saturating_sub(1) && cut_at.is_none() {
            cut_at = Some(out.len());
        }
        if count + n > max {
            out.truncate(cut_at.unwrap_or(out.len()));
            out.push('…');
            return out;
        }
        out.push_str(&piece);
        count += n;
    }
    out
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sluice_core::approvals::Approval;
    use sluice_core::audit::StatementRecord;

    pub(crate) fn view() -> RequestView {
        let created = DateTime::parse_from_rfc3339("2026-11-29T10:40:00Z").unwrap().to_utc();
        RequestView {
            id: 42,
            state: RequestState::Pending,
            requester: "bob@example.com".into(),
            groups: vec!["oncall".into()],
            target: "shop".into(),
            session: "s1".into(),
            statement: "DELETE FROM orders WHERE email = 'ann@example.com'\n\u{202e}".into(),
            rule: "orders-need-a-lead".into(),
            reason: Some("call 555-867-5309 if unsure".into()),
            approvers: vec!["leads".into()],
            needed: 2,
            approvals: vec![Approval {
                by: "dave@example.com".into(),
                at: created,
                via: "console".into(),
                chat_user: None,
            }],
            created,
            expires: created + chrono::Duration::minutes(5),
            denied_by: None,
            denial_reason: None,
            access: None,
            statements: vec![StatementRecord {
                kind: "write".into(),
                command: "DELETE".into(),
                relations: vec!["orders (write)".into()],
                features: vec!["touches_finance".into()],
                tags: vec!["pii".into()],
            }],
            approve_via: Vec::new(),
        }
    }

    #[test]
    fn a_card_masks_and_describes() {
        let now = view().created + chrono::Duration::seconds(61);
        let card = Card::new(&view(), "https://sluice.example/v1/approvals/{id}", now);
        assert_eq!(
            card.statement,
            "DELETE FROM orders WHERE email = '****@example.com'\n\u{fffd}"
        );
        assert!(!card.reason.as_deref().unwrap().contains("867"), "{:?}", card.reason);
        assert_eq!(
            card.classification,
            ["DELETE (write) orders (write) · risk: touches_finance · tags: pii"]
        );
        assert_eq!(card.approvals_line(), "1 of 2 approvals: dave@example.com (console)");
        assert_eq!(card.full_text_url, "https://sluice.example/v1/approvals/42");
        assert_eq!(card.expiry_line(), "expires 10:45:00 UTC (in 3m)");
        let later = Card::new(&view(), "u", now + chrono::Duration::seconds(30));
        assert_eq!(later.left, card.left, "the same minute: no edit");
        let last = Card::new(&view(), "u", view().expires - chrono::Duration::seconds(20));
        assert_eq!(last.left, "20s");
        assert!(card.pending());
    }

    #[test]
    fn long_statements_are_cut_on_a_character() {
        let mut long = view();
        long.statement = format!("SELECT '{}'", "é".repeat(2000));
        let card = Card::new(&long, "u", long.created);
        assert_eq!(card.statement.chars().count(), STATEMENT_CHARS);
        assert_eq!(card.truncated, 2009 - STATEMENT_CHARS);
    }

    #[test]
    fn fitting_never_splits_an_escape_nor_overruns() {
        let entity = |c: char, out: &mut String| match c {
            '<' => out.push_str("&lt;"),
            c => out.push(c),
        };
        assert_eq!(fit("a<b", 10, entity), "a&lt;b");
        assert_eq!(fit("a<b", 6, entity), "a&lt;b");
        assert_eq!(fit("a<bc", 6, entity), "a&lt;…");
        assert_eq!(fit("a<bc", 5, entity), "a…");
        let long = "<".repeat(1000);
        let fitted = fit(&long, 3000, entity);
        assert!(
            fitted.chars().count() <= 3000 && fitted.ends_with('…'),
            "{}",
            fitted.len()
        );
        assert!(fitted.trim_end_matches('…').ends_with("&lt;"));
    }

    #[test]
    fn outcomes() {
        let mut denied = view();
        denied.state = RequestState::Denied;
        denied.denied_by = Some("carol@example.com".into());
        denied.denial_reason = Some("not during\nthe sale".into());
        assert_eq!(
            Card::new(&denied, "u", denied.created).outcome.unwrap().line(),
            "Denied by carol@example.com: not during the sale"
        );
        let mut approved = view();
        approved.state = RequestState::Approved;
        assert_eq!(
            Card::new(&approved, "u", approved.created).outcome.unwrap().line(),
            "Approved by dave@example.com at 10:40 UTC"
        );
    }
}
