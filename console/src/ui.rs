//! Drawing: the tab bar, the current view, the message line and whatever
//! overlay is up. Reads the state, changes nothing.

use ratatui::Frame;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph, Tabs, Wrap};

use crate::action::Link;
use crate::app::{App, Level, Overlay, Tab};
use crate::text::{escape, one_line};
use crate::views;

pub fn render(app: &App, frame: &mut Frame) {
    let footer = app.footer.len() as u16;
    let [top, body, bottom, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
        Constraint::Length(footer),
    ])
    .areas(frame.area());
    let guidance: Vec<Line> = app
        .footer
        .iter()
        .map(|text| Line::styled(one_line(text), app.theme.dim()))
        .collect();
    frame.render_widget(Paragraph::new(guidance), foot);
    render_tabs(app, frame, top);
    match app.tab {
        Tab::Live => views::live::render(app, frame, body),
        Tab::Activity => views::activity::render(app, frame, body),
        Tab::Approvals => views::approvals::render(app, frame, body),
        Tab::Shell => views::shell::render(app, frame, body),
        Tab::Replay => views::replay::render(app, frame, body),
    }
    render_status(app, frame, bottom);
    match &app.overlay {
        Some(Overlay::Help) => render_help(app, frame),
        Some(Overlay::Confirm { question, .. }) => {
            let lines = vec![
                Line::raw(one_line(question)),
                Line::raw(""),
                Line::from(vec![
                    Span::styled("y", app.theme.key()),
                    Span::raw(": yes   "),
                    Span::styled("n", app.theme.key()),
                    Span::raw(": no"),
                ]),
            ];
            popup(app, frame, " Confirm ", lines, 60, 7);
        }
        Some(Overlay::Prompt(prompt)) => {
            let lines = vec![
                Line::from(vec![
                    Span::raw(escape(&prompt.input).into_owned()),
                    Span::styled("█", app.theme.key()),
                ]),
                Line::raw(""),
                Line::styled("enter: ok   esc: cancel", app.theme.dim()),
            ];
            // Tall enough for the whole answer as it wraps.
            let width = 70u16.min(frame.area().width);
            let input = crate::text::width(&escape(&prompt.input)) + 1;
            let rows = input.div_ceil(width.saturating_sub(2).max(1) as usize) as u16;
            popup(app, frame, &format!(" {} ", prompt.title), lines, 70, rows + 4);
        }
        None => {}
    }
}

fn render_tabs(app: &App, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let pending = app.approvals.pending().count();
    let titles: Vec<Line> = Tab::ALL
        .iter()
        .enumerate()
        .map(|(i, tab)| {
            let mut spans = vec![
                Span::styled(format!("{}", i + 1), theme.key()),
                Span::raw(format!(" {}", tab.title())),
            ];
            if *tab == Tab::Approvals && pending > 0 {
                spans.push(Span::styled(format!(" ({pending})"), theme.warn()));
            }
            Line::from(spans)
        })
        .collect();
    // Narrow screens keep the tabs whole: the address gives way first.
    let address = if area.width >= 100 {
        format!(" {}", app.api)
    } else {
        String::new()
    };
    let link = match &app.link {
        Link::Connected => Span::styled(format!("●{address}"), theme.ok()),
        Link::Connecting => Span::styled(format!("○ connecting{address}"), theme.warn()),
        Link::Reconnecting { attempt, .. } => {
            Span::styled(format!("○ reconnecting{address} ({attempt})"), theme.warn())
        }
        Link::Refused { .. } => Span::styled(format!("✗ token refused{address}"), theme.danger()),
    };
    let link_width = link.content.chars().count() as u16 + 1;
    let [tabs, right] = Layout::horizontal([Constraint::Min(10), Constraint::Length(link_width)]).areas(area);
    frame.render_widget(
        Tabs::new(titles)
            .select(app.tab.index())
            .highlight_style(theme.selected())
            .divider("│"),
        tabs,
    );
    frame.render_widget(Paragraph::new(Line::from(link)).right_aligned(), right);
}

fn render_status(app: &App, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let line = match (&app.status, &app.link) {
        (Some(status), _) => {
            let style = match status.level {
                Level::Error => theme.danger(),
                Level::Warn => theme.warn(),
                Level::Ok => theme.ok(),
                Level::Info => theme.plain(),
            };
            Line::styled(one_line(&status.text), style)
        }
        (None, Link::Reconnecting { error, .. }) => Line::styled(
            format!("lost the gateway: {} (retrying)", one_line(error)),
            theme.warn(),
        ),
        (None, Link::Refused { error }) => Line::styled(
            format!("{} (check --token or SLUICE_TOKEN)", one_line(error)),
            theme.danger(),
        ),
        (None, _) => Line::from(vec![
            Span::styled("?", theme.key()),
            Span::styled(" help  ", theme.dim()),
            Span::styled("1-5", theme.key()),
            Span::styled("/", theme.dim()),
            Span::styled("tab", theme.key()),
            Span::styled(" views  ", theme.dim()),
            Span::styled("q", theme.key()),
            Span::styled(" quit", theme.dim()),
        ]),
    };
    frame.render_widget(Paragraph::new(line), area);
}

/// The key bindings of the view the operator is in.
pub fn bindings(tab: Tab) -> &'static [(&'static str, &'static str)] {
    match tab {
        Tab::Live => &[
            ("↑ ↓", "select a session"),
            ("enter", "the session's live timeline (↑↓ scroll, esc: back)"),
            ("k", "end the session (admins; asks first)"),
            ("r", "refresh now"),
        ],
        Tab::Activity => &[
            ("↑ ↓ j k", "select"),
            ("enter", "the whole statement, its classification and rule"),
            ("/", "filter by identity, target, decision or text"),
            ("esc", "clear the filter"),
        ],
        Tab::Approvals => &[
            ("↑ ↓ j k", "select a request"),
            ("enter", "read the statement whole"),
            ("a", "approve (a long statement is shown whole first)"),
            ("d", "deny, with a reason"),
        ],
        Tab::Shell => &[
            ("enter", "run, once the text ends with ;"),
            ("ctrl-r / F5", "run the text as it is"),
            ("↑ ↓", "history (at the first / last line)"),
            ("ctrl-c", "cancel the running query, or clear the text"),
            ("ctrl-t, \\c NAME", "choose the target"),
            ("PgUp PgDn", "scroll the results a page"),
            ("ctrl/alt-arrows", "scroll the results a row / column"),
            ("F1", "this help (letters, digits, ? are text here)"),
        ],
        Tab::Replay => &[
            ("enter", "replay the selected session"),
            ("/", "filter by identity, target or date"),
            ("space", "play / pause"),
            ("← →", "step one event"),
            ("+ -", "playback speed"),
            ("e", "export the session as JSON lines"),
            ("esc", "back to the sessions"),
        ],
    }
}

fn render_help(app: &App, frame: &mut Frame) {
    let theme = app.theme;
    let mut lines = vec![Line::styled(format!("{} view", app.tab.title()), theme.title())];
    for (keys, what) in bindings(app.tab) {
        lines.push(Line::from(vec![
            Span::styled(format!("  {keys:<18}"), theme.key()),
            Span::raw(*what),
        ]));
    }
    lines.push(Line::raw(""));
    lines.push(Line::styled("Everywhere", theme.title()));
    for (keys, what) in [
        ("1-5, tab", "switch views"),
        ("?, F1", "this help"),
        ("q, ctrl-c", "quit (not while typing in the shell)"),
    ] {
        lines.push(Line::from(vec![
            Span::styled(format!("  {keys:<18}"), theme.key()),
            Span::raw(what),
        ]));
    }
    let height = lines.len() as u16 + 2;
    popup(app, frame, " Keys (esc closes) ", lines, 72, height);
}

fn popup(app: &App, frame: &mut Frame, title: &str, lines: Vec<Line>, width: u16, height: u16) {
    let area = frame.area();
    let [row] = Layout::vertical([Constraint::Length(height.min(area.height))])
        .flex(Flex::Center)
        .areas(area);
    let [cell] = Layout::horizontal([Constraint::Length(width.min(area.width))])
        .flex(Flex::Center)
        .areas(row);
    frame.render_widget(Clear, cell);
    frame.render_widget(
        Paragraph::new(lines)
            .block(Block::bordered().title(Span::styled(title.to_string(), app.theme.title())))
            .wrap(Wrap { trim: false }),
        cell,
    );
}
