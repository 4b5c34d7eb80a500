//! Approvals: what waits for a decision (held statements and access
//! requests, with the time left) and what was decided lately. `a`
//! approves, `d` denies with a reason. The gateway decides whether the
//! operator may: its refusals (your own request, not an approver) are
//! shown as they come.

use crossterm::event::{KeyCode, KeyEvent};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, Wrap};
use sluice_core::approvals::{RequestState, RequestView};

use super::{Outcome, navigate};
use crate::action::Command;
use crate::app::{App, Overlay, Prompt, Purpose, Status};
use crate::sql::highlight;
use crate::text::{clock, duration, escape_lines, one_line};

#[derive(Debug, Default)]
pub struct ApprovalsView {
    /// Pending first (oldest first), then recent decisions (newest first),
    /// as the gateway lists them.
    pub list: Vec<RequestView>,
    pub selected: usize,
    pub error: Option<String>,
    /// The selected request's statement read whole, scrolled to this line.
    pub reading: Option<usize>,
    /// Requests whose statement was read whole (a long one must be, before
    /// `a` approves it).
    read: std::collections::HashSet<u64>,
}

/// A statement longer than this (lines, or characters) is approved only
/// after it was read whole: the detail pane may not show all of it.
const SHORT_LINES: usize = 6;
const SHORT_CHARS: usize = 400;

fn is_long(statement: &str) -> bool {
    statement.lines().count() > SHORT_LINES || statement.chars().count() > SHORT_CHARS
}

impl ApprovalsView {
    pub fn set(&mut self, list: Vec<RequestView>) {
        let selected = self
            .list
            .get(self.selected)
            .map(|r| (r.id, r.state == RequestState::Pending));
        self.list = list;
        self.error = None;
        // The selection follows its request. When that request has just
        // ended (it was pending), it moves to what waits now (pending ones
        // are listed first), so that `a` acts on something that can be
        // decided; a decided request the operator chose to look at stays.
        let follow = selected
            .and_then(|(id, was_pending)| self.list.iter().position(|r| r.id == id).map(|at| (at, was_pending)));
        self.selected = match follow {
            Some((at, true)) if self.list[at].state != RequestState::Pending && self.pending().next().is_some() => 0,
            Some((at, _)) => at,
            None => self.selected,
        }
        .min(self.list.len().saturating_sub(1));
        if self.list.get(self.selected).map(|r| r.id) != selected.map(|(id, _)| id) {
            self.reading = None;
        }
        let ids: std::collections::HashSet<u64> = self.list.iter().map(|r| r.id).collect();
        self.read.retain(|id| ids.contains(id));
    }

    pub fn pending(&self) -> impl Iterator<Item = &RequestView> {
        self.list.iter().filter(|r| r.state == RequestState::Pending)
    }

    pub fn key(&mut self, key: KeyEvent) -> Outcome {
        if let Some(top) = self.reading {
            let lines = self.list.get(self.selected).map_or(0, |r| r.statement.lines().count());
            let moved = match key.code {
                KeyCode::Esc | KeyCode::Enter => {
                    self.reading = None;
                    return Outcome::handled();
                }
                KeyCode::Down | KeyCode::Char('j') => Some(top + 1),
                KeyCode::Up | KeyCode::Char('k') => Some(top.saturating_sub(1)),
                KeyCode::PageDown | KeyCode::Char(' ') => Some(top + 10),
                KeyCode::PageUp => Some(top.saturating_sub(10)),
                KeyCode::Home => Some(0),
                KeyCode::End => Some(lines),
                _ => None,
            };
            if let Some(top) = moved {
                self.reading = Some(top.min(lines.saturating_sub(1)));
                return Outcome::handled();
            }
        } else if let Some(next) = navigate(self.selected, self.list.len(), &key, true) {
            self.selected = next;
            return Outcome::handled();
        }
        let Some(request) = self.list.get(self.selected) else {
            return Outcome::ignored();
        };
        let pending = request.state == RequestState::Pending;
        if self.reading.is_some() {
            self.read.insert(request.id);
        }
        match key.code {
            KeyCode::Enter if !request.statement.is_empty() => {
                self.reading = Some(0);
                Outcome::handled()
            }
            KeyCode::Char('a') if pending && is_long(&request.statement) && !self.read.contains(&request.id) => {
                self.reading = Some(0);
                Outcome::status(Status::info(format!(
                    "request {}: the statement is long; read it whole, then a approves",
                    request.id
                )))
            }
            KeyCode::Char('a') if pending => Outcome {
                handled: true,
                commands: vec![Command::Decide {
                    id: request.id,
                    approve: true,
                    reason: None,
                }],
                status: Some(Status::info(format!("approving request {}...", request.id))),
                overlay: None,
            },
            KeyCode::Char('d') if pending => Outcome::overlay(Overlay::Prompt(Prompt::new(
                format!(
                    "Deny request {}: reason (shown to {})",
                    request.id,
                    one_line(&request.requester)
                ),
                "",
                Purpose::Deny(request.id),
            ))),
            KeyCode::Char('a' | 'd') => Outcome::status(Status::error(format!(
                "request {} is {}: nothing to decide",
                request.id,
                request.state.name()
            ))),
            _ => Outcome::ignored(),
        }
    }
}

/// The selected request's statement, whole, from line `top`.
fn render_reader(app: &App, r: &RequestView, top: usize, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let lines = escape_lines(&r.statement);
    let total = lines.len();
    let shown = area.height.saturating_sub(2) as usize;
    // The end shows a whole last page.
    let top = top.min(total.saturating_sub(shown));
    let last = (top + shown).min(total);
    let block = Block::bordered()
        .title(Span::styled(
            format!(
                " Request {} by {}: lines {}-{} of {total} ",
                r.id,
                one_line(&r.requester),
                (top + 1).min(last),
                last
            ),
            theme.title(),
        ))
        .title_bottom(Line::styled(
            " ↑↓ PgUp PgDn: scroll  a: approve  d: deny  esc: back ",
            theme.dim(),
        ));
    let text: Vec<Line> = highlight(&lines, theme).into_iter().skip(top).collect();
    frame.render_widget(Paragraph::new(text).block(block).wrap(Wrap { trim: false }), area);
}

fn what(request: &RequestView) -> String {
    match &request.access {
        Some(access) => format!(
            "access: grant {} for {}",
            one_line(&access.grant),
            duration(chrono::Duration::seconds(access.seconds as i64))
        ),
        None => one_line(&request.statement),
    }
}

fn state_style(app: &App, state: RequestState) -> Style {
    match state {
        RequestState::Pending => app.theme.warn(),
        RequestState::Approved => app.theme.ok(),
        RequestState::Denied => app.theme.danger(),
        RequestState::Expired | RequestState::Cancelled => app.theme.dim(),
    }
}

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let view = &app.approvals;
    if let (Some(top), Some(request)) = (view.reading, view.list.get(view.selected)) {
        render_reader(app, request, top, frame, area);
        return;
    }
    let pending = view.pending().count();
    let title = Line::from(vec![
        Span::styled(" Approvals ", theme.title()),
        Span::styled(
            format!("{pending} pending "),
            if pending > 0 { theme.warn() } else { theme.dim() },
        ),
        match &view.error {
            Some(error) => Span::styled(format!(" {} ", one_line(error)), theme.danger()),
            None => Span::raw(""),
        },
    ]);
    let block = Block::bordered()
        .title(title)
        .title_bottom(Line::styled(" a: approve  d: deny  ↑↓: select ", theme.dim()));
    if view.list.is_empty() {
        let empty = Paragraph::new(vec![
            Line::raw(""),
            Line::styled("  Nothing waits for a decision.", theme.dim()),
            Line::styled(
                "  Statements held for approval and access requests appear here, with the time they have left.",
                theme.dim(),
            ),
        ])
        .block(block);
        frame.render_widget(empty, area);
        return;
    }
    let list_height = (view.list.len() as u16 + 3).min(area.height / 2).max(5);
    let [top, bottom] = Layout::vertical([Constraint::Length(list_height), Constraint::Min(4)]).areas(area);
    let header = Row::new(["id", "state", "requester", "target", "asks", "approvals", "left"]).style(theme.header());
    let rows = view.list.iter().map(|r| {
        let left = if r.state == RequestState::Pending {
            let left = r.expires - app.now;
            let style = if left.num_seconds() < 60 {
                theme.danger()
            } else {
                theme.warn()
            };
            if left > chrono::Duration::zero() {
                Span::styled(duration(left), style)
            } else {
                Span::styled("expiring", style)
            }
        } else {
            Span::raw("")
        };
        Row::new(vec![
            Cell::from(r.id.to_string()),
            Cell::from(Span::styled(r.state.name(), state_style(app, r.state))),
            Cell::from(one_line(&r.requester)),
            Cell::from(one_line(&r.target)),
            Cell::from(what(r)),
            Cell::from(format!("{}/{}", r.approvals.len(), r.needed)),
            Cell::from(left),
        ])
    });
    let widths = [
        Constraint::Length(5),
        Constraint::Length(9),
        Constraint::Length(12),
        Constraint::Length(10),
        Constraint::Min(20),
        Constraint::Length(9),
        Constraint::Length(8),
    ];
    let table = Table::new(rows, widths).header(header).block(block);
    super::draw_selectable(frame, top, table, theme, view.selected);
    if let Some(request) = view.list.get(view.selected) {
        render_request(app, request, frame, bottom);
    }
}

fn render_request(app: &App, r: &RequestView, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let field = |name: &str, value: String, style: Style| {
        Line::from(vec![
            Span::styled(format!("{name:<11}"), theme.header()),
            Span::styled(value, style),
        ])
    };
    let groups = if r.groups.is_empty() {
        String::new()
    } else {
        format!(" ({})", one_line(&r.groups.join(", ")))
    };
    let mut lines = vec![
        field(
            "requester",
            format!("{}{groups} on {}", one_line(&r.requester), one_line(&r.target)),
            theme.plain(),
        ),
        field(
            if r.access.is_some() { "grant" } else { "rule" },
            one_line(&r.rule),
            theme.plain(),
        ),
    ];
    if let Some(reason) = &r.reason {
        lines.push(field("why", one_line(reason), theme.plain()));
    }
    let features: Vec<&str> = r
        .statements
        .iter()
        .flat_map(|s| s.features.iter().map(String::as_str))
        .collect();
    if !features.is_empty() {
        lines.push(field("risk", one_line(&features.join(", ")), theme.warn()));
    }
    let kinds: Vec<String> = r
        .statements
        .iter()
        .map(|s| {
            if s.relations.is_empty() {
                s.kind.clone()
            } else {
                format!("{} {}", s.kind, s.relations.join(", "))
            }
        })
        .collect();
    if !kinds.is_empty() {
        lines.push(field("class", one_line(&kinds.join("; ")), theme.plain()));
    }
    let approvals: Vec<String> = r
        .approvals
        .iter()
        .map(|a| {
            let chat = a
                .chat_user
                .as_deref()
                .map(|user| format!(" (user {})", one_line(user)))
                .unwrap_or_default();
            format!(
                "{} at {} via {}{chat}",
                one_line(&a.by),
                clock(a.at, app.zone),
                one_line(&a.via)
            )
        })
        .collect();
    lines.push(field(
        "approvers",
        format!(
            "{} of {} ({} so far{})",
            r.needed,
            one_line(&r.approvers.join(", ")),
            r.approvals.len(),
            if approvals.is_empty() {
                String::new()
            } else {
                format!(": {}", approvals.join("; "))
            }
        ),
        theme.plain(),
    ));
    if !r.approve_via.is_empty() {
        lines.push(field(
            "approve in",
            format!("{} only", one_line(&r.approve_via.join(" or "))),
            theme.warn(),
        ));
    }
    match r.state {
        RequestState::Pending => lines.push(field(
            "expires",
            format!("{} (in {})", clock(r.expires, app.zone), duration(r.expires - app.now)),
            theme.warn(),
        )),
        RequestState::Denied => lines.push(field(
            "denied",
            format!(
                "by {}{}",
                one_line(r.denied_by.as_deref().unwrap_or("?")),
                r.denial_reason
                    .as_deref()
                    .map(|x| format!(": {}", one_line(x)))
                    .unwrap_or_default()
            ),
            theme.danger(),
        )),
        state => lines.push(field("state", state.name().to_string(), state_style(app, state))),
    }
    if let Some(access) = &r.access
        && let Some(until) = access.until
    {
        lines.push(field("grant until", clock(until, app.zone), theme.plain()));
    }
    // The statement first, after who and which rule: it is what is being
    // approved. What does not fit is announced, never silently cut.
    let mut statement: Vec<Line> = Vec::new();
    if !r.statement.is_empty() {
        let text = escape_lines(&r.statement);
        // The statement comes before the other fields, which give way.
        let room = (area.height.saturating_sub(2) as usize).saturating_sub(3).max(1);
        let total = text.len();
        let highlighted = highlight(&text, theme);
        let width = area.width.saturating_sub(2) as usize;
        let too_wide = text.iter().any(|l| crate::text::width(l) > width);
        if total <= room && !too_wide {
            statement.extend(highlighted);
        } else {
            statement.extend(highlighted.into_iter().take(room.saturating_sub(1).max(1)));
            statement.push(Line::styled(
                format!("⋯ the statement goes on ({total} lines): enter reads it whole"),
                theme.warn(),
            ));
        }
        statement.push(Line::raw(""));
    }
    let fields = lines.split_off(2.min(lines.len()));
    lines.extend(statement);
    lines.extend(fields);
    let block = Block::bordered().title(Span::styled(format!(" Request {} ", r.id), theme.title()));
    frame.render_widget(Paragraph::new(lines).block(block), area);
}
