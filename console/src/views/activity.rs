//! Activity: every statement and decision as it happens, newest first;
//! refused and held statements stand out. `/` filters (identity, target,
//! decision or text), Enter shows a statement whole with its
//! classification and the rule that decided it.

use std::collections::{HashMap, VecDeque};

use crossterm::event::{KeyCode, KeyEvent};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, Wrap};
use sluice_core::audit::{Detail, Event, StoredEvent};

use super::{Outcome, navigate};
use crate::app::{App, Overlay, Prompt, Purpose, short_id};
use crate::sql::highlight;
use crate::text::{clip, clock, escape, escape_lines, micros, one_line};

/// How many statements the feed keeps.
const KEEP: usize = 2000;

#[derive(Debug, Default)]
pub struct ActivityView {
    /// Oldest first.
    items: VecDeque<Item>,
    /// (session, seq) of a statement → its event id, to attach completions.
    open: HashMap<(String, u64), u64>,
    pub filter: String,
    /// Position in the filtered list, newest first.
    pub selected: usize,
    pub detail: bool,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub event: StoredEvent,
    pub done: Option<Done>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub rows: Option<u64>,
    pub duration_us: u64,
    pub sqlstate: Option<String>,
    pub skipped: bool,
}

impl ActivityView {
    pub fn note(&mut self, event: StoredEvent) {
        match &event.event.detail {
            Detail::StatementDone {
                seq,
                rows,
                duration_us,
                sqlstate,
                skipped,
                ..
            } => {
                let key = (event.event.session.clone().unwrap_or_default(), *seq);
                // Items are in id order; several may share one (a row of the
                // trail that keeps a session's statements).
                let item = self.open.remove(&key).and_then(|id| {
                    let from = self.items.partition_point(|item| item.event.id < id);
                    self.items
                        .range_mut(from..)
                        .take_while(|item| item.event.id == id)
                        .find(|item| {
                            matches!(&item.event.event.detail, Detail::Statement { seq: s, .. } if s == seq)
                                && item.event.event.session == event.event.session
                        })
                });
                if let Some(item) = item {
                    item.done = Some(Done {
                        rows: *rows,
                        duration_us: *duration_us,
                        sqlstate: sqlstate.clone(),
                        skipped: *skipped,
                    });
                }
            }
            Detail::Statement { seq, .. } => {
                let key = (event.event.session.clone().unwrap_or_default(), *seq);
                self.open.insert(key, event.id);
                self.push(event);
            }
            Detail::ApprovalRequested { .. }
            | Detail::ApprovalDecided { .. }
            | Detail::AccessGranted { .. }
            | Detail::AccessEnded { .. }
            | Detail::SessionRefused { .. }
            | Detail::AuditUnavailable { .. } => self.push(event),
            _ => {}
        }
    }

    fn push(&mut self, event: StoredEvent) {
        // Keep the selection on the same item as new ones arrive on top.
        if self.selected > 0 || self.detail {
            self.selected += usize::from(self.matches(&event));
        }
        self.items.push_back(Item { event, done: None });
        if self.items.len() > KEEP
            && let Some(old) = self.items.pop_front()
            && let Detail::Statement { seq, .. } = old.event.event.detail
        {
            self.open.remove(&(old.event.event.session.unwrap_or_default(), seq));
        }
    }

    fn matches(&self, event: &StoredEvent) -> bool {
        if self.filter.is_empty() {
            return true;
        }
        let needle = self.filter.to_lowercase();
        let e = &event.event;
        let fields = [e.identity.as_deref(), e.target.as_deref()];
        if fields.iter().flatten().any(|f| f.to_lowercase().contains(&needle)) {
            return true;
        }
        // The words on screen match, and the trail's own.
        match &e.detail {
            Detail::Statement {
                text, decision, rule, ..
            } => {
                decision.contains(&needle)
                    || decision_word(decision).to_lowercase().contains(&needle)
                    || text.to_lowercase().contains(&needle)
                    || rule.as_deref().is_some_and(|r| r.to_lowercase().contains(&needle))
            }
            other => {
                other.kind().contains(&needle)
                    || label(other).to_lowercase().contains(&needle)
                    || event.event.summary().to_lowercase().contains(&needle)
            }
        }
    }

    /// The items the filter lets through, newest first.
    pub fn visible(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().rev().filter(|item| self.matches(&item.event))
    }

    pub fn set_filter(&mut self, filter: &str) {
        self.filter = filter.to_string();
        self.selected = 0;
    }

    pub fn key(&mut self, key: KeyEvent) -> Outcome {
        if self.detail {
            return match key.code {
                KeyCode::Esc | KeyCode::Enter => {
                    self.detail = false;
                    Outcome::handled()
                }
                _ => Outcome::ignored(),
            };
        }
        let len = self.visible().count();
        if let Some(next) = navigate(self.selected, len, &key, true) {
            self.selected = next;
            return Outcome::handled();
        }
        match key.code {
            KeyCode::Char('/') => Outcome::overlay(Overlay::Prompt(Prompt::new(
                "Filter (identity, target, decision, text)",
                &self.filter,
                Purpose::ActivityFilter,
            ))),
            KeyCode::Enter if len > 0 => {
                self.detail = true;
                Outcome::handled()
            }
            KeyCode::Esc if !self.filter.is_empty() => {
                self.set_filter("");
                Outcome::handled()
            }
            _ => Outcome::ignored(),
        }
    }
}

/// A decision as the feed shows it.
fn decision_word(decision: &str) -> &'static str {
    match decision {
        "allow" => "allowed",
        "deny" => "REFUSED",
        "require_approval" => "HELD",
        _ => "?",
    }
}

/// A decision's word and style.
fn decision_style(app: &App, decision: &str) -> (&'static str, Style) {
    let style = match decision {
        "allow" => app.theme.ok(),
        "deny" => app.theme.danger(),
        "require_approval" => app.theme.warn(),
        _ => app.theme.plain(),
    };
    (decision_word(decision), style)
}

/// What an event says, in one line (for timelines).
pub fn event_line(app: &App, event: &StoredEvent) -> Line<'static> {
    let theme = app.theme;
    let at = Span::styled(format!("{} ", clock(event.event.at, app.zone)), theme.dim());
    let (what, style): (String, Style) = match &event.event.detail {
        Detail::Statement {
            text, decision, rule, ..
        } => {
            let (word, style) = decision_style(app, decision);
            let rule = rule
                .as_deref()
                .map(|r| format!(" [{}]", one_line(r)))
                .unwrap_or_default();
            (format!("{word:<8} {}{rule}", one_line(text)), style)
        }
        Detail::StatementDone {
            rows,
            duration_us,
            sqlstate,
            skipped,
            ..
        } => {
            let outcome = match (sqlstate, skipped) {
                (_, true) => "skipped".to_string(),
                (Some(code), _) => format!("failed {code}"),
                (None, _) => match rows {
                    Some(1) => "1 row".to_string(),
                    Some(n) => format!("{n} rows"),
                    None => "done".to_string(),
                },
            };
            let style = if sqlstate.is_some() {
                theme.danger()
            } else {
                theme.dim()
            };
            (format!("  done    {outcome} in {}", micros(*duration_us)), style)
        }
        detail => (describe(&event.event), other_style(app, detail)),
    };
    Line::from(vec![at, Span::styled(what, style)])
}

fn other_style(app: &App, detail: &Detail) -> Style {
    match detail {
        Detail::ApprovalRequested { .. } => app.theme.warn(),
        Detail::ApprovalDecided { decision, .. } if decision == "approved" || decision == "approval" => app.theme.ok(),
        Detail::ApprovalDecided { .. } | Detail::SessionRefused { .. } | Detail::AuditUnavailable { .. } => {
            app.theme.danger()
        }
        _ => app.theme.plain(),
    }
}

/// A short word for the decision column.
fn label(detail: &Detail) -> String {
    match detail {
        Detail::ApprovalRequested { access: Some(_), .. } => "ASKED".into(),
        Detail::ApprovalRequested { .. } => "HELD".into(),
        Detail::ApprovalDecided { decision, .. } if decision == "approval" => "approval".into(),
        Detail::ApprovalDecided { decision, .. } => one_line(decision),
        Detail::AccessGranted { .. } => "granted".into(),
        Detail::AccessEnded { .. } => "ended".into(),
        Detail::SessionRefused { .. } => "REFUSED".into(),
        Detail::AuditUnavailable { .. } => "AUDIT".into(),
        other => other.kind().replace('_', " "),
    }
}

/// An event in words, on one line, escaped (a statement: its text).
pub fn describe(event: &Event) -> String {
    match &event.detail {
        Detail::Statement { text, .. } => one_line(text),
        _ => one_line(&event.summary()),
    }
}

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    let view = &app.activity;
    if view.detail
        && let Some(item) = view.visible().nth(view.selected)
    {
        render_detail(app, item, frame, area);
        return;
    }
    let theme = app.theme;
    let filter = if view.filter.is_empty() {
        String::new()
    } else {
        format!(" filter: {} ", escape(&view.filter))
    };
    let block = Block::bordered()
        .title(Line::from(vec![
            Span::styled(" Activity ", theme.title()),
            Span::styled(filter, theme.warn()),
        ]))
        .title_bottom(Line::styled(
            " /: filter  enter: details  esc: clear filter ",
            theme.dim(),
        ));
    let rows: Vec<Row> = view
        .visible()
        .take(area.height as usize + view.selected + 1)
        .map(|item| feed_row(app, item))
        .collect();
    if rows.is_empty() {
        let text = if view.filter.is_empty() {
            "  No statements yet. They appear here the moment a client sends them."
        } else {
            "  Nothing matches the filter (esc clears it)."
        };
        frame.render_widget(
            Paragraph::new(vec![Line::raw(""), Line::styled(text, theme.dim())]).block(block),
            area,
        );
        return;
    }
    let widths = [
        Constraint::Length(8),
        Constraint::Length(16),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Min(20),
    ];
    let header = Row::new(["time", "who", "decision", "took", "statement"]).style(theme.header());
    let table = Table::new(rows, widths).header(header).block(block);
    super::draw_selectable(frame, area, table, theme, view.selected);
}

fn feed_row(app: &App, item: &Item) -> Row<'static> {
    let theme = app.theme;
    let e = &item.event.event;
    let who = format!(
        "{}@{}",
        one_line(e.identity.as_deref().unwrap_or("-")),
        one_line(e.target.as_deref().unwrap_or("-"))
    );
    let time = clock(e.at, app.zone);
    match &e.detail {
        Detail::Statement { text, decision, .. } => {
            let (word, style) = decision_style(app, decision);
            let took = match &item.done {
                Some(done) if done.sqlstate.is_some() => Span::styled(
                    format!("ERR {}", one_line(done.sqlstate.as_deref().unwrap_or(""))),
                    theme.danger(),
                ),
                Some(done) => Span::raw(micros(done.duration_us)),
                None if decision == "allow" => Span::styled("…", theme.dim()),
                None => Span::raw(""),
            };
            let row = Row::new(vec![
                Cell::from(time),
                Cell::from(clip(&who, 16).into_owned()),
                Cell::from(Span::styled(word, style)),
                Cell::from(took),
                Cell::from(one_line(text)),
            ]);
            if decision == "allow" { row } else { row.style(style) }
        }
        detail => Row::new(vec![
            Cell::from(time),
            Cell::from(clip(&who, 16).into_owned()),
            Cell::from(Span::styled(label(detail), other_style(app, detail))),
            Cell::from(""),
            Cell::from(Span::styled(describe(e), other_style(app, detail))),
        ]),
    }
}

fn render_detail(app: &App, item: &Item, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let e = &item.event.event;
    let mut lines: Vec<Line> = Vec::new();
    let field = |name: &str, value: String, style: Style| {
        Line::from(vec![
            Span::styled(format!("{name:<12}"), theme.header()),
            Span::styled(value, style),
        ])
    };
    lines.push(field(
        "who",
        format!(
            "{} on {} (session {})",
            one_line(e.identity.as_deref().unwrap_or("-")),
            one_line(e.target.as_deref().unwrap_or("-")),
            short_id(e.session.as_deref().unwrap_or("-"))
        ),
        theme.plain(),
    ));
    lines.push(field(
        "when",
        format!(
            "{} (event {})",
            e.at.with_timezone(&app.zone).format("%Y-%m-%d %H:%M:%S"),
            item.event.id
        ),
        theme.plain(),
    ));
    match &e.detail {
        Detail::Statement {
            source,
            text,
            decision,
            rule,
            refusal,
            statements,
            ..
        } => {
            let (word, style) = decision_style(app, decision);
            lines.push(field("decision", word.to_string(), style));
            lines.push(field(
                "rule",
                rule.as_deref().map(one_line).unwrap_or_else(|| "(none matched)".into()),
                theme.plain(),
            ));
            if let Some(refusal) = refusal {
                lines.push(field("told", one_line(refusal), theme.danger()));
            }
            lines.push(field("sent as", one_line(source), theme.plain()));
            if let Some(done) = &item.done {
                let outcome = match (&done.sqlstate, done.rows) {
                    (Some(code), _) => format!("failed with SQLSTATE {}", one_line(code)),
                    (None, Some(rows)) => format!("{rows} rows"),
                    (None, None) => "done".into(),
                };
                lines.push(field(
                    "result",
                    format!("{outcome} in {}", micros(done.duration_us)),
                    if done.sqlstate.is_some() {
                        theme.danger()
                    } else {
                        theme.plain()
                    },
                ));
            }
            for (n, s) in statements.iter().enumerate() {
                let label = if statements.len() > 1 {
                    format!("class #{}", n + 1)
                } else {
                    "class".into()
                };
                lines.push(field(
                    &label,
                    format!("{} ({})", one_line(&s.kind), one_line(&s.command)),
                    theme.plain(),
                ));
                if !s.relations.is_empty() {
                    lines.push(field("  relations", one_line(&s.relations.join(", ")), theme.plain()));
                }
                if !s.features.is_empty() {
                    lines.push(field("  risk", one_line(&s.features.join(", ")), theme.warn()));
                }
                if !s.tags.is_empty() {
                    lines.push(field("  tags", one_line(&s.tags.join(", ")), theme.plain()));
                }
            }
            lines.push(Line::raw(""));
            lines.extend(highlight(&escape_lines(text), theme));
        }
        detail => lines.push(field("event", describe(e), other_style(app, detail))),
    }
    let block = Block::bordered()
        .title(Span::styled(" Statement ", theme.title()))
        .title_bottom(Line::styled(" esc: back ", theme.dim()));
    let [body] = Layout::vertical([Constraint::Min(1)]).areas(area);
    frame.render_widget(Paragraph::new(lines).block(block).wrap(Wrap { trim: false }), body);
}
