//! Live: the gateway's pulse (statements/s, blocked/s, pending approvals,
//! latency) and its running sessions. Enter opens a session's timeline as
//! it happens; `k` ends a session (admins), after a confirmation.

use crossterm::event::{KeyCode, KeyEvent};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Sparkline, Table};
use sluice_core::audit::{Detail, StoredEvent};
use sluice_core::live::{LiveSummary, SessionState};

use super::{Outcome, navigate};
use crate::action::Command;
use crate::app::{App, Overlay, short_id};
use crate::text::{clip, duration, escape, micros, one_line};

#[derive(Debug, Default)]
pub struct LiveView {
    pub sessions: Vec<LiveSummary>,
    pub selected: usize,
    /// Why the last poll failed.
    pub error: Option<String>,
    /// The session whose timeline is open.
    pub panel: Option<Panel>,
}

#[derive(Debug)]
pub struct Panel {
    pub session: String,
    pub events: Vec<StoredEvent>,
    pub loading: bool,
    pub error: Option<String>,
    /// Events of the session the stream brought while its timeline was
    /// loading: those the timeline ends before are added after it.
    early: Vec<StoredEvent>,
    /// Lines scrolled back from the newest (0: following the newest).
    pub back: usize,
}

impl Panel {
    fn new(session: &str) -> Panel {
        Panel {
            session: session.to_string(),
            events: Vec::new(),
            loading: true,
            error: None,
            early: Vec::new(),
            back: 0,
        }
    }
}

impl LiveView {
    pub fn set_sessions(&mut self, mut sessions: Vec<LiveSummary>) {
        let selected = self.sessions.get(self.selected).map(|s| s.id.clone());
        sessions.sort_by(|a, b| a.started.cmp(&b.started).then_with(|| a.id.cmp(&b.id)));
        self.sessions = sessions;
        self.error = None;
        // The selection follows its session when others come and go.
        self.selected = selected
            .and_then(|id| self.sessions.iter().position(|s| s.id == id))
            .unwrap_or(self.selected)
            .min(self.sessions.len().saturating_sub(1));
    }

    /// Takes an event from the stream; true when the session list changed
    /// (a session opened or closed).
    pub fn note(&mut self, event: &StoredEvent) -> bool {
        if let Some(panel) = &mut self.panel
            && event.event.session.as_deref() == Some(panel.session.as_str())
        {
            if panel.loading {
                panel.early.push(event.clone());
            } else if panel.events.last().is_none_or(|last| last.id <= event.id) {
                // Events of one row of the trail share its id (the stream
                // never sends a row twice).
                panel.events.push(event.clone());
            }
        }
        matches!(
            event.event.detail,
            Detail::SessionOpened { .. } | Detail::SessionClosed { .. }
        )
    }

    pub fn set_timeline(&mut self, session: &str, result: Result<Vec<StoredEvent>, String>) {
        let Some(panel) = &mut self.panel else { return };
        if panel.session != session {
            return;
        }
        panel.loading = false;
        let early = std::mem::take(&mut panel.early);
        match result {
            Ok(events) => {
                let last = events.last().map_or(0, |e| e.id);
                panel.events = events;
                panel.events.extend(early.into_iter().filter(|e| e.id > last));
            }
            Err(error) => {
                panel.error = Some(error);
                panel.events = early;
            }
        }
    }

    pub fn key(&mut self, key: KeyEvent) -> Outcome {
        if let Some(panel) = &mut self.panel {
            let last = panel.events.len().saturating_sub(1);
            panel.back = match key.code {
                KeyCode::Esc | KeyCode::Enter => {
                    self.panel = None;
                    return Outcome::handled();
                }
                KeyCode::Up | KeyCode::Char('k') => (panel.back + 1).min(last),
                KeyCode::Down | KeyCode::Char('j') => panel.back.saturating_sub(1),
                KeyCode::PageUp => (panel.back + 10).min(last),
                KeyCode::PageDown => panel.back.saturating_sub(10),
                KeyCode::Home => last,
                KeyCode::End => 0,
                _ => return Outcome::ignored(),
            };
            return Outcome::handled();
        }
        if let Some(next) = navigate(self.selected, self.sessions.len(), &key, false) {
            self.selected = next;
            return Outcome::handled();
        }
        let Some(session) = self.sessions.get(self.selected) else {
            return Outcome::ignored();
        };
        match key.code {
            KeyCode::Enter => {
                self.panel = Some(Panel::new(&session.id));
                Outcome::command(Command::LoadTimeline {
                    session: session.id.clone(),
                })
            }
            KeyCode::Char('k') => Outcome::overlay(Overlay::Confirm {
                question: format!(
                    "End session {} of {} on {}? Its client is disconnected and its transaction rolled back.",
                    short_id(&session.id),
                    escape(&session.identity),
                    escape(&session.target)
                ),
                command: Some(Command::Kill {
                    session: session.id.clone(),
                }),
            }),
            _ => Outcome::ignored(),
        }
    }
}

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    let [header, table] = Layout::vertical([Constraint::Length(5), Constraint::Min(3)]).areas(area);
    render_pulse(app, frame, header);
    match &app.live.panel {
        Some(panel) => render_panel(app, panel, frame, table),
        None => render_sessions(app, frame, table),
    }
}

fn render_pulse(app: &App, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let now = app.now.timestamp();
    let cells = Layout::horizontal([Constraint::Ratio(1, 4); 4]).split(area);
    let width = cells[0].width.saturating_sub(2) as usize;
    let stats = &app.stats;
    let per_second = |v: f64| {
        if v >= 10.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    let latency = stats.latency(now, 10);
    let p99_series = stats.series(now, width, |b| {
        let mut d = b.durations.clone();
        d.sort_unstable();
        d.get(((d.len().max(1) - 1) as f64 * 0.99).round() as usize)
            .copied()
            .unwrap_or(0)
    });
    let panels: [(String, Vec<u64>); 4] = [
        (
            format!("stmts/s {}", per_second(stats.rate(now, 5, |b| b.statements))),
            stats.series(now, width, |b| b.statements),
        ),
        (
            format!("blocked/s {}", per_second(stats.rate(now, 5, |b| b.blocked))),
            stats.series(now, width, |b| b.blocked),
        ),
        (
            format!("pending {}", app.approvals.pending().count()),
            stats.series(now, width, |b| b.pending),
        ),
        (
            match latency {
                Some((p50, p99)) => format!("p50 {} p99 {}", micros(p50), micros(p99)),
                None => "p50/p99 -".to_string(),
            },
            p99_series,
        ),
    ];
    for ((title, data), cell) in panels.into_iter().zip(cells.iter()) {
        let block = Block::bordered().title(Span::styled(title, theme.title()));
        let spark = Sparkline::default().block(block).data(&data).style(theme.chart());
        frame.render_widget(spark, *cell);
    }
}

fn render_sessions(app: &App, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let live = &app.live;
    let title = match &live.error {
        Some(error) => Line::from(vec![
            Span::styled(" Sessions ", theme.title()),
            Span::styled(format!(" {} ", one_line(error)), theme.danger()),
        ]),
        None => Line::from(Span::styled(
            format!(" Sessions ({}) ", live.sessions.len()),
            theme.title(),
        )),
    };
    let block = Block::bordered().title(title);
    if live.sessions.is_empty() {
        let body = match &live.error {
            // Nothing is known: say why rather than "no sessions".
            Some(error) => vec![
                Line::raw(""),
                Line::styled(
                    format!("  Cannot list the sessions: {}", one_line(error)),
                    theme.danger(),
                ),
            ],
            None => vec![
                Line::raw(""),
                Line::styled("  No sessions right now.", theme.dim()),
                Line::styled(
                    "  Sessions appear here as soon as a client connects through the gateway.",
                    theme.dim(),
                ),
            ],
        };
        let empty = Paragraph::new(body).block(block);
        frame.render_widget(empty, area);
        return;
    }
    let header = Row::new([
        "identity",
        "target",
        "application",
        "since",
        "stmts",
        "state",
        "last statement",
    ])
    .style(theme.header());
    let rows = live.sessions.iter().map(|s| {
        let (state, style) = match s.state {
            SessionState::Idle => ("idle", theme.dim()),
            SessionState::Running => ("running", theme.ok()),
            SessionState::Held => ("HELD", theme.warn()),
        };
        let statements = if s.refused > 0 {
            format!("{} ({}✗)", s.statements, s.refused)
        } else {
            s.statements.to_string()
        };
        Row::new(vec![
            Cell::from(clip(&one_line(&s.identity), 14).into_owned()),
            Cell::from(clip(&one_line(&s.target), 10).into_owned()),
            Cell::from(clip(&one_line(&s.application), 12).into_owned()),
            Cell::from(duration(app.now - s.started)),
            Cell::from(statements),
            Cell::from(Span::styled(state, style)),
            Cell::from(one_line(&s.last_statement)),
        ])
    });
    let widths = [
        Constraint::Length(14),
        Constraint::Length(10),
        Constraint::Length(12),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Min(10),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(block.title_bottom(Line::styled(" enter: timeline  k: end session ", theme.dim())));
    super::draw_selectable(frame, area, table, theme, live.selected);
}

fn render_panel(app: &App, panel: &Panel, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let who = app
        .live
        .sessions
        .iter()
        .find(|s| s.id == panel.session)
        .map(|s| format!("{} on {}", one_line(&s.identity), one_line(&s.target)))
        .unwrap_or_else(|| "ended".to_string());
    let block = Block::bordered()
        .title(Span::styled(
            format!(" Session {} ({who}) ", short_id(&panel.session)),
            theme.title(),
        ))
        .title_bottom(Line::styled(
            if panel.back > 0 {
                " ↑↓ PgUp PgDn: scroll  end: follow the newest  esc: back "
            } else {
                " ↑↓ PgUp PgDn: scroll back  esc: back "
            },
            theme.dim(),
        ));
    let mut lines: Vec<Line> = Vec::new();
    if panel.loading {
        lines.push(Line::styled("loading the timeline...", theme.dim()));
    }
    if let Some(error) = &panel.error {
        lines.push(Line::styled(one_line(error), theme.danger()));
    }
    for event in &panel.events {
        lines.push(super::activity::event_line(app, event));
    }
    // The newest at the bottom, in view unless scrolled back.
    let inner = area.height.saturating_sub(2) as usize;
    let end = lines
        .len()
        .saturating_sub(panel.back.min(lines.len().saturating_sub(inner)));
    let skip = end.saturating_sub(inner);
    let lines: Vec<Line> = lines.into_iter().skip(skip).take(end - skip).collect();
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::audit::Event;

    fn event(id: u64, session: &str) -> StoredEvent {
        StoredEvent {
            id,
            event: Event::now(Detail::UnmaskGrantUsed { grant: "g".into() }).in_session(session),
        }
    }

    #[test]
    fn events_that_arrive_while_the_timeline_loads_are_kept_once() {
        let mut live = LiveView {
            panel: Some(Panel::new("s")),
            ..LiveView::default()
        };
        live.note(&event(5, "s"));
        live.note(&event(6, "other"));
        live.note(&event(7, "s"));
        live.set_timeline("s", Ok(vec![event(1, "s"), event(5, "s")]));
        live.note(&event(8, "s"));
        // A row of the trail that keeps several events gives each.
        live.note(&event(8, "s"));
        let ids: Vec<u64> = live.panel.unwrap().events.iter().map(|e| e.id).collect();
        assert_eq!(ids, [1, 5, 7, 8, 8]);
    }

    #[test]
    fn the_timeline_scrolls_back_and_follows_again() {
        let mut live = LiveView {
            panel: Some(Panel::new("s")),
            ..LiveView::default()
        };
        live.set_timeline("s", Ok((1..=30).map(|id| event(id, "s")).collect()));
        let key = |code| KeyEvent::new(code, crossterm::event::KeyModifiers::NONE);
        live.key(key(KeyCode::PageUp));
        assert_eq!(live.panel.as_ref().unwrap().back, 10);
        live.key(key(KeyCode::Home));
        assert_eq!(live.panel.as_ref().unwrap().back, 29);
        live.key(key(KeyCode::End));
        assert_eq!(live.panel.as_ref().unwrap().back, 0);
    }
}
