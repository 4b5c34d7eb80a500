//! Replay: a past session as its user lived it. Pick a session (`/`
//! filters by identity, target or date), then step through its events
//! (←/→), or play them back in real time or faster (space, +/-), with the
//! statement, its decision, approval waits, masked result samples, errors
//! and durations, and a scrubber for the position. `e` exports the session
//! as JSON lines.

use chrono::{DateTime, FixedOffset, Utc};
use crossterm::event::{KeyCode, KeyEvent};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, LineGauge, Paragraph, Row, Table, Wrap};
use sluice_core::audit::{Detail, SessionSummary, StoredEvent};

use super::{Outcome, navigate};
use crate::action::Command;
use crate::app::{App, Overlay, Prompt, Purpose, Status, short_id};
use crate::sql::highlight;
use crate::text::{clip, clock, duration, escape_lines, micros, one_line};

/// Playback speeds, ×.
const SPEEDS: [u32; 7] = [1, 2, 4, 8, 16, 32, 64];

#[derive(Debug)]
pub struct ReplayView {
    /// The operator's zone, in which start times are shown and filtered.
    pub zone: FixedOffset,
    pub sessions: Vec<SessionSummary>,
    pub loading: bool,
    pub error: Option<String>,
    pub filter: String,
    pub selected: usize,
    pub player: Option<Player>,
}

#[derive(Debug)]
pub struct Player {
    pub session: String,
    pub events: Vec<StoredEvent>,
    pub position: usize,
    pub playing: bool,
    /// Index in [`SPEEDS`].
    pub speed: usize,
    /// The session's time being shown, while playing.
    pub clock: DateTime<Utc>,
    /// The wall-clock time of the last tick, while playing.
    pub last_tick: Option<DateTime<Utc>>,
    pub loading: bool,
    pub error: Option<String>,
}

impl Player {
    fn at(&self) -> Option<DateTime<Utc>> {
        self.events.get(self.position).map(|e| e.event.at)
    }

    fn step(&mut self, forward: bool) {
        if forward {
            self.position = (self.position + 1).min(self.events.len().saturating_sub(1));
        } else {
            self.position = self.position.saturating_sub(1);
        }
        if let Some(at) = self.at() {
            self.clock = at;
        }
    }
}

impl ReplayView {
    pub fn new(zone: FixedOffset) -> ReplayView {
        ReplayView {
            zone,
            sessions: Vec::new(),
            loading: false,
            error: None,
            filter: String::new(),
            selected: 0,
            player: None,
        }
    }

    /// Whether entering the view should (re)load the list: every time, so
    /// that sessions that started meanwhile are there.
    pub fn needs_loading(&self) -> bool {
        !self.loading && self.player.is_none()
    }

    pub fn set_sessions(&mut self, result: Result<Vec<SessionSummary>, String>) {
        self.loading = false;
        let selected = self.visible().nth(self.selected).map(|s| s.session.clone());
        match result {
            Ok(sessions) => {
                self.sessions = sessions;
                self.error = None;
            }
            Err(error) => self.error = Some(error),
        }
        // The selection stays on its session when the list is reloaded.
        let follow = selected.and_then(|id| self.visible().position(|s| s.session == id));
        self.selected = follow
            .unwrap_or(self.selected)
            .min(self.visible().count().saturating_sub(1));
    }

    pub fn set_recording(&mut self, session: &str, result: Result<Vec<StoredEvent>, String>, now: DateTime<Utc>) {
        let Some(player) = &mut self.player else { return };
        if player.session != session {
            return;
        }
        player.loading = false;
        match result {
            Ok(events) => {
                player.clock = events.first().map_or(now, |e| e.event.at);
                player.events = events;
            }
            Err(error) => player.error = Some(error),
        }
    }

    pub fn set_filter(&mut self, filter: &str) {
        self.filter = filter.to_string();
        self.selected = 0;
    }

    pub fn visible(&self) -> impl Iterator<Item = &SessionSummary> {
        let needle = self.filter.to_lowercase();
        let zone = self.zone;
        self.sessions.iter().filter(move |s| {
            // The start as the list shows it (the operator's zone) and as
            // stored (UTC) both match.
            let shown = started(s, zone);
            needle.is_empty()
                || [
                    s.identity.as_deref(),
                    s.target.as_deref(),
                    Some(s.started.as_str()),
                    Some(shown.as_str()),
                    Some(&s.session),
                ]
                .into_iter()
                .flatten()
                .any(|f| f.to_lowercase().contains(&needle))
        })
    }

    /// Moves playback on to `now`.
    pub fn tick(&mut self, now: DateTime<Utc>) {
        let Some(player) = &mut self.player else { return };
        if !player.playing {
            return;
        }
        let Some(last) = player.last_tick.replace(now) else {
            return;
        };
        let elapsed = (now - last) * SPEEDS[player.speed] as i32;
        player.clock += elapsed;
        while player.position + 1 < player.events.len() && player.events[player.position + 1].event.at <= player.clock {
            player.position += 1;
        }
        if player.position + 1 >= player.events.len() {
            player.playing = false;
            player.last_tick = None;
        }
    }

    pub fn key(&mut self, key: KeyEvent) -> Outcome {
        if let Some(player) = &mut self.player {
            return match key.code {
                KeyCode::Esc => {
                    self.player = None;
                    Outcome::handled()
                }
                KeyCode::Char(' ') => {
                    if player.position + 1 >= player.events.len() {
                        player.position = 0;
                    }
                    player.playing = !player.playing;
                    player.last_tick = None;
                    if let Some(at) = player.at() {
                        player.clock = at;
                    }
                    Outcome::handled()
                }
                KeyCode::Right | KeyCode::Char('l') => {
                    player.playing = false;
                    player.step(true);
                    Outcome::handled()
                }
                KeyCode::Left | KeyCode::Char('h') => {
                    player.playing = false;
                    player.step(false);
                    Outcome::handled()
                }
                KeyCode::Home => {
                    player.position = 0;
                    player.step(false);
                    Outcome::handled()
                }
                KeyCode::End => {
                    player.position = player.events.len().saturating_sub(1);
                    player.step(true);
                    Outcome::handled()
                }
                KeyCode::Char('+' | '=') => {
                    player.speed = (player.speed + 1).min(SPEEDS.len() - 1);
                    Outcome::handled()
                }
                KeyCode::Char('-') => {
                    player.speed = player.speed.saturating_sub(1);
                    Outcome::handled()
                }
                KeyCode::Char('e') if !player.events.is_empty() => Outcome {
                    handled: true,
                    commands: vec![Command::Export {
                        session: player.session.clone(),
                        events: player.events.clone(),
                    }],
                    status: Some(Status::info("exporting...")),
                    overlay: None,
                },
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
                "Filter sessions (identity, target, date)",
                &self.filter,
                Purpose::ReplayFilter,
            ))),
            KeyCode::Char('r') => {
                self.loading = true;
                Outcome::command(Command::LoadPastSessions)
            }
            KeyCode::Enter => {
                let Some(session) = self.visible().nth(self.selected).map(|s| s.session.clone()) else {
                    return Outcome::ignored();
                };
                self.player = Some(Player {
                    session: session.clone(),
                    events: Vec::new(),
                    position: 0,
                    playing: false,
                    speed: 0,
                    clock: DateTime::<Utc>::MIN_UTC,
                    last_tick: None,
                    loading: true,
                    error: None,
                });
                Outcome::command(Command::LoadRecording { session })
            }
            KeyCode::Esc if !self.filter.is_empty() => {
                self.set_filter("");
                Outcome::handled()
            }
            _ => Outcome::ignored(),
        }
    }
}

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    match &app.replay.player {
        Some(player) => render_player(app, player, frame, area),
        None => render_sessions(app, frame, area),
    }
}

/// When a session started, as the list shows it.
fn started(session: &SessionSummary, zone: FixedOffset) -> String {
    DateTime::parse_from_rfc3339(&session.started)
        .map(|t| crate::text::date_time(t.with_timezone(&Utc), zone))
        .unwrap_or_else(|_| one_line(&session.started))
}

fn render_sessions(app: &App, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let view = &app.replay;
    let mut title = vec![Span::styled(" Past sessions ", theme.title())];
    if !view.filter.is_empty() {
        title.push(Span::styled(
            format!(" filter: {} ", one_line(&view.filter)),
            theme.warn(),
        ));
    }
    if let Some(error) = &view.error {
        title.push(Span::styled(format!(" {} ", one_line(error)), theme.danger()));
    }
    let block = Block::bordered()
        .title(Line::from(title))
        .title_bottom(Line::styled(" enter: replay  /: filter  r: reload ", theme.dim()));
    let sessions: Vec<&SessionSummary> = view.visible().collect();
    if sessions.is_empty() {
        let text = if view.loading {
            "  loading sessions..."
        } else if view.filter.is_empty() {
            "  No sessions recorded yet."
        } else {
            "  No session matches the filter (esc clears it)."
        };
        frame.render_widget(
            Paragraph::new(vec![Line::raw(""), Line::styled(text, theme.dim())]).block(block),
            area,
        );
        return;
    }
    let header =
        Row::new(["started", "identity", "target", "client", "stmts", "refused", "ended"]).style(theme.header());
    let rows = sessions.iter().map(|s| {
        let started = started(s, app.zone);
        let ended = match (&s.closed, s.refused_at_start) {
            (_, true) => Span::styled("login refused", theme.danger()),
            (Some(reason), _) => Span::raw(clip(&one_line(reason), 14).into_owned()),
            (None, _) => Span::styled("open", theme.ok()),
        };
        Row::new(vec![
            Cell::from(started),
            Cell::from(clip(&one_line(s.identity.as_deref().unwrap_or("-")), 10).into_owned()),
            Cell::from(clip(&one_line(s.target.as_deref().unwrap_or("-")), 10).into_owned()),
            Cell::from(one_line(s.client.as_deref().unwrap_or("-"))),
            Cell::from(s.statements.to_string()),
            Cell::from(s.refused.to_string()),
            Cell::from(ended),
        ])
    });
    // 80 columns hold them all; the start (what sessions are picked by)
    // is never cut.
    let widths = [
        Constraint::Length(16),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Min(8),
        Constraint::Length(5),
        Constraint::Length(7),
        Constraint::Length(14),
    ];
    let table = Table::new(rows, widths).header(header).block(block);
    super::draw_selectable(frame, area, table, theme, view.selected);
}

fn render_player(app: &App, player: &Player, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let [scrubber, body] = Layout::vertical([Constraint::Length(3), Constraint::Min(4)]).areas(area);
    let first = player.events.first().map(|e| e.event.at);
    let last = player.events.last().map(|e| e.event.at);
    // While playing, the session's clock (which moves between events);
    // otherwise the current event's time.
    let now = if player.playing {
        Some(player.clock)
    } else {
        player.at()
    };
    let (ratio, label) = match (first, last, now) {
        (Some(first), Some(last), Some(at)) => {
            let at = at.clamp(first, last);
            let total = (last - first).num_milliseconds().max(1) as f64;
            let ratio = ((at - first).num_milliseconds() as f64 / total).clamp(0.0, 1.0);
            (
                ratio,
                format!(
                    "{} / {}  event {}/{}",
                    duration(at - first),
                    duration(last - first),
                    player.position + 1,
                    player.events.len()
                ),
            )
        }
        _ => (0.0, "no events".to_string()),
    };
    let state = if player.playing {
        Span::styled(format!(" ▶ playing ×{} ", SPEEDS[player.speed]), theme.ok())
    } else {
        Span::styled(format!(" ⏸ paused ×{} ", SPEEDS[player.speed]), theme.dim())
    };
    let gauge = LineGauge::default()
        .block(
            Block::bordered()
                .title(Line::from(vec![
                    Span::styled(
                        format!(" Replay of session {} ", short_id(&player.session)),
                        theme.title(),
                    ),
                    state,
                ]))
                .title_bottom(Line::styled(
                    " space: play/pause  ←→: step  +/-: speed  e: export  esc: back ",
                    theme.dim(),
                )),
        )
        .filled_style(theme.chart())
        .ratio(ratio)
        .label(label);
    frame.render_widget(gauge, scrubber);
    if player.loading || player.error.is_some() {
        let text = match &player.error {
            Some(error) => Line::styled(one_line(error), theme.danger()),
            None => Line::styled("loading the session...", theme.dim()),
        };
        frame.render_widget(Paragraph::new(text).block(Block::bordered()), body);
        return;
    }
    let [list, detail] = Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)]).areas(body);
    let width = list.width.saturating_sub(2) as usize;
    let rows = player.events.iter().map(|e| {
        let line = super::activity::event_line(app, e);
        let text: String = line.spans.iter().map(|s| s.content.as_ref()).collect();
        let style = line.spans.last().map(|s| s.style).unwrap_or_default();
        Row::new(vec![Cell::from(Span::styled(clip(&text, width).into_owned(), style))])
    });
    let table = Table::new(rows, [Constraint::Min(10)])
        .block(Block::bordered().title(Span::styled(" Timeline ", theme.title())));
    super::draw_selectable(frame, list, table, theme, player.position);
    if let Some(event) = player.events.get(player.position) {
        render_event(app, player, event, frame, detail);
    }
}

fn render_event(app: &App, player: &Player, event: &StoredEvent, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let field = |name: &str, value: String, style: Style| {
        Line::from(vec![
            Span::styled(format!("{name:<10}"), theme.header()),
            Span::styled(value, style),
        ])
    };
    let e = &event.event;
    let mut lines = vec![field(
        "at",
        format!("{} (event {})", clock(e.at, app.zone), event.id),
        theme.plain(),
    )];
    match &e.detail {
        Detail::Statement {
            seq,
            text,
            decision,
            rule,
            refusal,
            statements,
            ..
        } => {
            let style = match decision.as_str() {
                "allow" => theme.ok(),
                "deny" => theme.danger(),
                _ => theme.warn(),
            };
            lines.push(field("decision", decision.replace('_', " "), style));
            if let Some(rule) = rule {
                lines.push(field("rule", one_line(rule), theme.plain()));
            }
            if let Some(refusal) = refusal {
                lines.push(field("told", one_line(refusal), theme.danger()));
            }
            let features: Vec<&str> = statements
                .iter()
                .flat_map(|s| s.features.iter().map(String::as_str))
                .collect();
            if !features.is_empty() {
                lines.push(field("risk", features.join(", "), theme.warn()));
            }
            // What became of it, from its completion later in the timeline.
            let done = player
                .events
                .iter()
                .skip(player.position)
                .find_map(|later| match &later.event.detail {
                    Detail::StatementDone {
                        seq: s,
                        rows,
                        duration_us,
                        sqlstate,
                        ..
                    } if s == seq => Some((*rows, *duration_us, sqlstate.clone())),
                    _ => None,
                });
            if let Some((rows, us, sqlstate)) = done {
                let outcome = match (sqlstate, rows) {
                    (Some(code), _) => format!("failed with SQLSTATE {}", one_line(&code)),
                    (None, Some(rows)) => format!("{rows} rows"),
                    (None, None) => "done".into(),
                };
                lines.push(field("result", format!("{outcome} in {}", micros(us)), theme.plain()));
            }
            lines.push(Line::raw(""));
            lines.extend(highlight(&escape_lines(text), theme));
        }
        Detail::StatementDone {
            seq,
            rows,
            duration_us,
            sqlstate,
            columns,
            sample,
            ..
        } => {
            // The statement it completes, from earlier in the timeline.
            let statement =
                player.events[..player.position]
                    .iter()
                    .rev()
                    .find_map(|earlier| match &earlier.event.detail {
                        Detail::Statement { seq: s, text, .. } if s == seq => Some(text),
                        _ => None,
                    });
            if let Some(text) = statement {
                lines.push(field("statement", one_line(text), theme.plain()));
            }
            lines.push(field("took", micros(*duration_us), theme.plain()));
            if let Some(rows) = rows {
                lines.push(field("rows", rows.to_string(), theme.plain()));
            }
            if let Some(code) = sqlstate {
                lines.push(field("error", format!("SQLSTATE {}", one_line(code)), theme.danger()));
            }
            if !columns.is_empty() {
                let names: Vec<String> = columns
                    .iter()
                    .map(|c| {
                        if c.masking == "clear" || c.masking == "detectors" {
                            one_line(&c.name)
                        } else {
                            format!("{} ({})", one_line(&c.name), one_line(&c.masking))
                        }
                    })
                    .collect();
                lines.push(field("columns", names.join(", "), theme.plain()));
            }
            if !sample.is_empty() {
                lines.push(field(
                    "sample",
                    "(as the client received it, masked)".into(),
                    theme.dim(),
                ));
                for row in sample {
                    let values: Vec<String> = row
                        .iter()
                        .map(|v| v.as_deref().map_or_else(|| "NULL".to_string(), one_line))
                        .collect();
                    lines.push(Line::raw(format!("  {}", values.join(" | "))));
                }
            }
        }
        Detail::ApprovalDecided { request, .. } => {
            lines.push(field("event", super::activity::describe(e), theme.plain()));
            // How long the statement waited.
            let asked = player.events.iter().find_map(|other| match &other.event.detail {
                Detail::ApprovalRequested { request: r, .. } if r == request => Some(other.event.at),
                _ => None,
            });
            if let Some(asked) = asked {
                lines.push(field("waited", duration(e.at - asked), theme.warn()));
            }
        }
        _ => lines.push(field("event", super::activity::describe(e), theme.plain())),
    }
    frame.render_widget(
        Paragraph::new(lines)
            .block(Block::bordered().title(Span::styled(" Event ", theme.title())))
            .wrap(Wrap { trim: false }),
        area,
    );
}
