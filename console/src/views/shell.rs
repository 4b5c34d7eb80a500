//! Shell: SQL through the gateway's PostgreSQL port under the operator's
//! own identity, so policy, approvals and masking apply as for anyone.
//!
//! Enter runs the text once it ends with `;` (as psql does), otherwise it
//! starts a new line; ctrl-r runs it as it is. ↑/↓ walk the history at the
//! first/last line. ctrl-c cancels a running query (or clears the text).
//! Esc moves to the results (arrows scroll, digits switch views); `i` or
//! Enter comes back. `\c NAME` or ctrl-t picks the target.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Position, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};

use super::Outcome;
use crate::action::{Command, QueryError, QueryOutcome};
use crate::app::{App, Level, Overlay, Prompt, Purpose, Status};
use crate::sql::highlight;
use crate::text::{clip, escape, one_line, width};

/// History entries kept (and saved).
pub const HISTORY: usize = 500;

#[derive(Debug)]
pub struct ShellView {
    pub lines: Vec<String>,
    /// Cursor: line, and char index in it.
    pub row: usize,
    pub col: usize,
    pub history: Vec<String>,
    /// Walking the history: which entry, and the text being written before.
    browsing: Option<(usize, Vec<String>)>,
    pub target: String,
    /// When the running query started.
    pub running: Option<chrono::DateTime<chrono::Utc>>,
    pub elapsed_ms: u64,
    pub result: Option<QueryOutcome>,
    /// Notices and errors of the last query, in order.
    pub messages: Vec<(Level, String)>,
    /// Results scrolled to: first row, first column.
    pub scroll_row: usize,
    pub scroll_col: usize,
    /// The result's column widths, measured when it came.
    pub widths: Vec<u16>,
}

impl ShellView {
    pub fn new(target: &str) -> ShellView {
        ShellView {
            lines: vec![String::new()],
            row: 0,
            col: 0,
            history: Vec::new(),
            browsing: None,
            target: target.to_string(),
            running: None,
            elapsed_ms: 0,
            result: None,
            messages: Vec::new(),
            scroll_row: 0,
            scroll_col: 0,
            widths: Vec::new(),
        }
    }

    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    fn set_text(&mut self, text: &str) {
        self.lines = text.split('\n').map(str::to_string).collect();
        self.row = self.lines.len() - 1;
        self.col = self.lines[self.row].chars().count();
    }

    fn byte(&self) -> usize {
        let line = &self.lines[self.row];
        line.char_indices().nth(self.col).map_or(line.len(), |(i, _)| i)
    }

    fn insert(&mut self, c: char) {
        let at = self.byte();
        self.lines[self.row].insert(at, c);
        self.col += 1;
        self.browsing = None;
    }

    /// Inserts pasted text at the cursor (a line at a time: a large paste
    /// costs its length, not its length squared).
    pub fn paste(&mut self, text: &str) {
        self.browsing = None;
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        for (n, part) in text.split('\n').enumerate() {
            if n > 0 {
                self.newline();
            }
            let at = self.byte();
            self.lines[self.row].insert_str(at, part);
            self.col += part.chars().count();
        }
    }

    fn newline(&mut self) {
        let at = self.byte();
        let rest = self.lines[self.row].split_off(at);
        self.lines.insert(self.row + 1, rest);
        self.row += 1;
        self.col = 0;
    }

    fn backspace(&mut self) {
        if self.col > 0 {
            self.col -= 1;
            let at = self.byte();
            self.lines[self.row].remove(at);
        } else if self.row > 0 {
            let line = self.lines.remove(self.row);
            self.row -= 1;
            self.col = self.lines[self.row].chars().count();
            self.lines[self.row].push_str(&line);
        }
    }

    fn history_step(&mut self, back: bool) -> bool {
        if self.history.is_empty() {
            return false;
        }
        let (index, draft) = match self.browsing.take() {
            Some(state) => state,
            None if back => (self.history.len(), self.lines.clone()),
            None => return false,
        };
        let next = if back { index.checked_sub(1) } else { Some(index + 1) };
        match next {
            Some(i) if i < self.history.len() => {
                let entry = self.history[i].clone();
                self.set_text(&entry);
                self.browsing = Some((i, draft));
            }
            Some(_) => {
                // Past the newest: the draft comes back.
                self.lines = draft;
                self.row = self.lines.len() - 1;
                self.col = self.lines[self.row].chars().count();
            }
            None => self.browsing = Some((index, draft)),
        }
        true
    }

    /// Runs the text (or handles `\c target`).
    fn run(&mut self) -> Outcome {
        let sql = self.text().trim().to_string();
        if sql.is_empty() {
            return Outcome::handled();
        }
        if let Some(target) = sql
            .strip_prefix("\\c")
            .filter(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
        {
            let target = target.trim().trim_end_matches(';').trim();
            self.lines = vec![String::new()];
            self.row = 0;
            self.col = 0;
            if target.is_empty() {
                return Outcome::status(Status::info(format!("shell target: {}", self.target)));
            }
            self.target = target.to_string();
            return Outcome::status(Status::info(format!("shell target: {}", self.target)));
        }
        if self.running.is_some() {
            return Outcome::status(Status::error("a query is running: ctrl-c cancels it"));
        }
        if self.target.is_empty() {
            return Outcome::status(Status::error(
                "no target yet: type \\c NAME (or press ctrl-t) to choose the database to run on",
            ));
        }
        if self.history.last() != Some(&sql) {
            self.history.push(sql.clone());
            if self.history.len() > HISTORY {
                self.history.remove(0);
            }
        }
        self.browsing = None;
        self.lines = vec![String::new()];
        self.row = 0;
        self.col = 0;
        self.messages.clear();
        self.result = None;
        self.scroll_row = 0;
        self.scroll_col = 0;
        self.elapsed_ms = 0;
        Outcome {
            handled: true,
            commands: vec![
                Command::RunQuery {
                    target: self.target.clone(),
                    sql,
                },
                Command::SaveHistory {
                    entries: self.history.clone(),
                },
            ],
            overlay: None,
            status: None,
        }
    }

    /// Marks the query as started (the runner's clock starts too).
    pub fn started(&mut self, now: chrono::DateTime<chrono::Utc>) {
        self.running = Some(now);
    }

    pub fn notice(&mut self, text: String) {
        self.messages.push((Level::Warn, text));
    }

    pub fn done(&mut self, result: Result<QueryOutcome, QueryError>) {
        self.running = None;
        match result {
            Ok(outcome) => {
                self.elapsed_ms = outcome.elapsed_ms;
                self.widths = column_widths(&outcome);
                self.result = Some(outcome);
            }
            Err(error) => {
                self.elapsed_ms = error.elapsed_ms;
                let code = error.code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default();
                self.messages
                    .push((Level::Error, format!("ERROR{code}: {}", error.message)));
                if let Some(detail) = error.detail {
                    self.messages.push((Level::Error, format!("DETAIL: {detail}")));
                }
                if let Some(hint) = error.hint {
                    self.messages.push((Level::Info, format!("HINT: {hint}")));
                }
            }
        }
    }

    pub fn key(&mut self, key: KeyEvent) -> Outcome {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl && key.code == KeyCode::Char('c') {
            if self.running.is_some() {
                return Outcome {
                    handled: true,
                    commands: vec![Command::CancelQuery],
                    status: Some(Status::info("cancelling the query...")),
                    overlay: None,
                };
            }
            if self.text().is_empty() {
                return Outcome::ignored();
            }
            self.lines = vec![String::new()];
            self.row = 0;
            self.col = 0;
            self.browsing = None;
            return Outcome::handled();
        }
        if ctrl && key.code == KeyCode::Char('t') {
            return Outcome::overlay(Overlay::Prompt(Prompt::new(
                "Target (the database name clients use)",
                &self.target,
                Purpose::ShellTarget,
            )));
        }
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        let scrolls = (ctrl || alt) && !matches!(key.code, KeyCode::Char(_) | KeyCode::Enter)
            || matches!(key.code, KeyCode::PageUp | KeyCode::PageDown);
        if scrolls && let Some(outcome) = self.scroll(key) {
            return outcome;
        }
        match key.code {
            KeyCode::Char('r') if ctrl => self.run(),
            KeyCode::F(5) => self.run(),
            KeyCode::Enter if key.modifiers.contains(KeyModifiers::ALT) => self.run(),
            KeyCode::Enter => {
                let text = self.text();
                let trimmed = text.trim_end();
                let switch = trimmed.trim_start().strip_prefix("\\c");
                if self.row + 1 == self.lines.len()
                    && (trimmed.ends_with(';') || switch.is_some_and(|rest| rest.is_empty() || rest.starts_with(' ')))
                {
                    self.run()
                } else {
                    self.newline();
                    Outcome::handled()
                }
            }
            KeyCode::Char(c) if !ctrl => {
                self.insert(c);
                Outcome::handled()
            }
            KeyCode::Backspace => {
                self.backspace();
                Outcome::handled()
            }
            KeyCode::Delete => {
                let at = self.byte();
                if at < self.lines[self.row].len() {
                    self.lines[self.row].remove(at);
                } else if self.row + 1 < self.lines.len() {
                    let next = self.lines.remove(self.row + 1);
                    self.lines[self.row].push_str(&next);
                }
                Outcome::handled()
            }
            KeyCode::Left => {
                if self.col > 0 {
                    self.col -= 1;
                } else if self.row > 0 {
                    self.row -= 1;
                    self.col = self.lines[self.row].chars().count();
                }
                Outcome::handled()
            }
            KeyCode::Right => {
                if self.col < self.lines[self.row].chars().count() {
                    self.col += 1;
                } else if self.row + 1 < self.lines.len() {
                    self.row += 1;
                    self.col = 0;
                }
                Outcome::handled()
            }
            KeyCode::Home => {
                self.col = 0;
                Outcome::handled()
            }
            KeyCode::End => {
                self.col = self.lines[self.row].chars().count();
                Outcome::handled()
            }
            KeyCode::Up if self.row == 0 => {
                self.history_step(true);
                Outcome::handled()
            }
            KeyCode::Down if self.row + 1 == self.lines.len() => {
                self.history_step(false);
                Outcome::handled()
            }
            KeyCode::Up | KeyCode::Down => {
                self.row = if key.code == KeyCode::Up {
                    self.row - 1
                } else {
                    self.row + 1
                };
                self.col = self.col.min(self.lines[self.row].chars().count());
                Outcome::handled()
            }
            // Everything else (tabs, F1) is the app's.
            _ => Outcome::ignored(),
        }
    }

    /// Result scrolling, while the editor keeps the keys it needs:
    /// PageUp/PageDown by pages, ctrl/alt with ↑↓ by rows and ←→ by
    /// columns, ctrl/alt with Home/End to the first and last rows.
    fn scroll(&mut self, key: KeyEvent) -> Option<Outcome> {
        let rows = self.result.as_ref().map_or(0, |r| r.rows.len());
        let columns = self.result.as_ref().map_or(0, |r| r.columns.len());
        // Past the last page the view shows the last page: count from it.
        let at = self.scroll_row.min(rows.saturating_sub(PAGE));
        match key.code {
            KeyCode::Down => self.scroll_row = (at + 1).min(rows.saturating_sub(1)),
            KeyCode::Up => self.scroll_row = at.saturating_sub(1),
            KeyCode::PageDown => self.scroll_row = (at + PAGE).min(rows.saturating_sub(1)),
            KeyCode::PageUp => self.scroll_row = at.saturating_sub(PAGE),
            KeyCode::Right => self.scroll_col = (self.scroll_col + 1).min(columns.saturating_sub(1)),
            KeyCode::Left => self.scroll_col = self.scroll_col.saturating_sub(1),
            KeyCode::Home => {
                self.scroll_row = 0;
                self.scroll_col = 0;
            }
            // The drawing shows the last whole page from there.
            KeyCode::End => self.scroll_row = rows.saturating_sub(1),
            _ => return None,
        }
        Some(Outcome::handled())
    }
}

/// Rows a page of results scrolls by.
const PAGE: usize = 20;

/// The widest a result column is drawn.
const MAX_COLUMN: usize = 40;

pub fn render(app: &App, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let shell = &app.shell;
    // The editor takes what its text needs, up to a third of the view; the
    // messages (each wrapped) up to half of what is left. On a very short
    // screen the results go first.
    let editor_height = (shell.lines.len() as u16 + 2).min((area.height / 3).max(3));
    let message_width = area.width.saturating_sub(2).max(1) as usize;
    let message_lines: Vec<Line> = shell
        .messages
        .iter()
        .flat_map(|(level, text)| {
            let style = match level {
                Level::Error => theme.danger(),
                Level::Warn => theme.warn(),
                _ => theme.plain(),
            };
            // Wrapped here, by columns, so that the count below is exact.
            wrap(&one_line(text), message_width)
                .into_iter()
                .map(move |part| Line::styled(part, style))
        })
        .collect();
    let message_height = if shell.messages.is_empty() {
        0
    } else {
        (message_lines.len() as u16 + 2).min((area.height.saturating_sub(editor_height) / 2).max(3))
    };
    let [editor, messages, results] = Layout::vertical([
        Constraint::Length(editor_height),
        Constraint::Length(message_height),
        Constraint::Min(0),
    ])
    .areas(area);
    let status = match shell.running {
        Some(_) => Span::styled(format!(" running {} ", millis(shell.elapsed_ms)), theme.warn()),
        None => Span::raw(""),
    };
    let editor_style = theme.title();
    let block = Block::bordered()
        .title(Line::from(vec![
            Span::styled(format!(" SQL on {} ", one_line(&shell.target)), editor_style),
            status,
        ]))
        .title_bottom(Line::styled(
            " enter after ; runs  ctrl-r: run  ctrl-c: cancel  PgUp/PgDn: results  F1: keys ",
            theme.dim(),
        ));
    let inner = block.inner(editor);
    let escaped: Vec<String> = shell.lines.iter().map(|l| escape(l).into_owned()).collect();
    // Keep the cursor in view: its line, and its column (long lines scroll
    // sideways; wide characters count two columns).
    let top = shell.row.saturating_sub(inner.height.saturating_sub(1) as usize);
    let before: String = shell.lines[shell.row].chars().take(shell.col).collect();
    let cursor = width(&escape(&before)) as u16;
    let left = cursor.saturating_sub(inner.width.saturating_sub(1));
    let text: Vec<Line> = highlight(&escaped, theme).into_iter().skip(top).collect();
    frame.render_widget(Paragraph::new(text).block(block).scroll((0, left)), editor);
    if app.overlay.is_none() {
        let x = inner.x + cursor - left;
        let y = inner.y + (shell.row - top) as u16;
        if x < inner.right() && y < inner.bottom() {
            frame.set_cursor_position(Position::new(x, y));
        }
    }
    if message_height > 0 {
        // What came last (the error, its hint) stays in view.
        let skip = message_lines
            .len()
            .saturating_sub(message_height.saturating_sub(2) as usize);
        let lines: Vec<Line> = message_lines.into_iter().skip(skip).collect();
        frame.render_widget(
            Paragraph::new(lines).block(Block::bordered().title(Span::styled(" Messages ", theme.title()))),
            messages,
        );
    }
    render_results(app, frame, results);
}

/// `text` in pieces of at most `columns` columns.
fn wrap(text: &str, columns: usize) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut used = 0;
    for c in text.chars() {
        let w = unicode_width::UnicodeWidthChar::width(c).unwrap_or(0);
        if used + w > columns && used > 0 {
            parts.push(String::new());
            used = 0;
        }
        used += w;
        if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    parts
}

/// A shell run time: `<1ms`, `12ms`, `4.2s`.
fn millis(ms: u64) -> String {
    match ms {
        0 => "<1ms".to_string(),
        ms if ms < 1000 => format!("{ms}ms"),
        ms => crate::text::duration(chrono::Duration::milliseconds(ms as i64)),
    }
}

fn render_results(app: &App, frame: &mut Frame, area: Rect) {
    let theme = app.theme;
    let shell = &app.shell;
    let focus = theme.title();
    let Some(result) = &shell.result else {
        let hint = if shell.running.is_some() {
            "  waiting for the gateway..."
        } else {
            "  Results appear here. Policy, approvals and masking apply to you as to anyone."
        };
        let block = Block::bordered().title(Span::styled(" Results ", focus));
        frame.render_widget(
            Paragraph::new(vec![Line::raw(""), Line::styled(hint, theme.dim())]).block(block),
            area,
        );
        return;
    };
    let summary = {
        let what = if result.columns.is_empty() {
            result.tags.iter().map(|t| one_line(t)).collect::<Vec<_>>().join(", ")
        } else {
            format!(
                "{} row{}{}",
                result.rows.len(),
                if result.rows.len() == 1 { "" } else { "s" },
                if result.truncated { " (more not kept)" } else { "" }
            )
        };
        format!(" {what} in {} ", millis(result.elapsed_ms))
    };
    let block = Block::bordered().title(Line::from(vec![
        Span::styled(" Results ", focus),
        Span::styled(summary, theme.ok()),
    ]));
    if result.columns.is_empty() {
        frame.render_widget(Paragraph::new("").block(block), area);
        return;
    }
    // As many whole columns as fit from the scrolled-to one (at least
    // one); the rest are a → away. Widths were measured once, when the
    // result came, so columns do not shift while scrolling.
    let first_column = shell.scroll_col.min(result.columns.len() - 1);
    let room = area.width.saturating_sub(2);
    let mut used = 0u16;
    let mut widths: Vec<Constraint> = Vec::new();
    for w in shell.widths.iter().skip(first_column) {
        if !widths.is_empty() && used + w > room {
            break;
        }
        used += w + 1;
        widths.push(Constraint::Length(*w));
    }
    let shown = widths.len();
    // Only the rows that fit are built: a result of thousands of rows costs
    // a page per frame. Scrolled past the end, the last page shows.
    let page = area.height.saturating_sub(3) as usize;
    let first_row = shell.scroll_row.min(result.rows.len().saturating_sub(page));
    // Where the view is, as it is drawn.
    let last_row = (first_row + page).min(result.rows.len());
    let position = format!(
        " rows {}-{} of {}  column {}/{}  (PgUp/PgDn, ctrl-arrows) ",
        (first_row + 1).min(last_row),
        last_row,
        result.rows.len(),
        first_column + 1,
        result.columns.len()
    );
    let block = block.title_bottom(Line::styled(position, theme.dim()));
    let header = Row::new(
        result.columns[first_column..]
            .iter()
            .take(shown)
            .map(|c| Cell::from(escape(c).into_owned())),
    )
    .style(theme.header());
    let column_widths = &shell.widths[first_column..];
    let rows = result.rows.iter().skip(first_row).take(page).map(|row| {
        Row::new(
            row.iter()
                .skip(first_column)
                .take(shown)
                .zip(column_widths)
                .map(|(value, w)| match value {
                    // Values as they are (leading spaces, tabs and line breaks
                    // shown, not folded), cut to their column with a mark.
                    Some(v) => Cell::from(clip(&escape(v), *w as usize).into_owned()),
                    None => Cell::from(Span::styled("NULL", theme.null())),
                }),
        )
    });
    frame.render_widget(Table::new(rows, widths).header(header).block(block), area);
}

/// Column widths for a result: its header and values (the first rows),
/// escaped, between 4 and [`MAX_COLUMN`] columns.
fn column_widths(result: &QueryOutcome) -> Vec<u16> {
    (0..result.columns.len())
        .map(|i| {
            let values = result
                .rows
                .iter()
                .take(1000)
                .map(|row| row.get(i).and_then(|v| v.as_deref()).map_or(4, |v| width(&escape(v))))
                .max()
                .unwrap_or(0);
            width(&escape(&result.columns[i])).max(values).clamp(4, MAX_COLUMN) as u16
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossterm::event::KeyEventKind;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn typed(shell: &mut ShellView, text: &str) {
        for c in text.chars() {
            shell.key(key(KeyCode::Char(c)));
        }
    }

    #[test]
    fn enter_runs_only_a_finished_statement() {
        let mut shell = ShellView::new("shop");
        typed(&mut shell, "select 1");
        let outcome = shell.key(key(KeyCode::Enter));
        assert!(outcome.commands.is_empty());
        assert_eq!(shell.lines, vec!["select 1", ""]);
        typed(&mut shell, "from t;");
        let outcome = shell.key(key(KeyCode::Enter));
        assert_eq!(
            outcome.commands[0],
            Command::RunQuery {
                target: "shop".into(),
                sql: "select 1\nfrom t;".into()
            }
        );
        assert_eq!(shell.text(), "");
        assert_eq!(shell.history, vec!["select 1\nfrom t;"]);
    }

    #[test]
    fn history_walks_back_and_returns_the_draft() {
        let mut shell = ShellView::new("shop");
        shell.history = vec!["select 1;".into(), "select 2;".into()];
        typed(&mut shell, "draft");
        shell.key(key(KeyCode::Up));
        assert_eq!(shell.text(), "select 2;");
        shell.key(key(KeyCode::Up));
        assert_eq!(shell.text(), "select 1;");
        shell.key(key(KeyCode::Up));
        assert_eq!(shell.text(), "select 1;");
        shell.key(key(KeyCode::Down));
        shell.key(key(KeyCode::Down));
        assert_eq!(shell.text(), "draft");
    }

    #[test]
    fn backslash_c_switches_target_without_running() {
        let mut shell = ShellView::new("shop");
        typed(&mut shell, "\\c billing");
        let outcome = shell.key(key(KeyCode::Enter));
        assert!(outcome.commands.is_empty());
        assert_eq!(shell.target, "billing");
        // \copy is not \c: it is sent (and the gateway says what it thinks).
        typed(&mut shell, "\\copy orders to stdout;");
        let outcome = shell.key(key(KeyCode::Enter));
        assert_eq!(shell.target, "billing");
        assert!(matches!(&outcome.commands[0], Command::RunQuery { sql, .. } if sql == "\\copy orders to stdout;"));
    }

    #[test]
    fn a_large_paste_lands_whole_at_the_cursor() {
        let mut shell = ShellView::new("shop");
        typed(&mut shell, "select ");
        let long = "x".repeat(200_000);
        shell.paste(&format!("'{long}'\r\nfrom t;"));
        assert_eq!(shell.lines.len(), 2);
        assert_eq!(shell.lines[0].len(), 7 + 200_002);
        assert_eq!((shell.row, shell.col), (1, 7));
    }

    #[test]
    fn ctrl_c_cancels_a_running_query_and_clears_otherwise() {
        let mut shell = ShellView::new("shop");
        typed(&mut shell, "select pg_sleep(10);");
        shell.key(key(KeyCode::Enter));
        shell.started(chrono::Utc::now());
        let ctrl_c = KeyEvent {
            code: KeyCode::Char('c'),
            modifiers: KeyModifiers::CONTROL,
            kind: KeyEventKind::Press,
            state: crossterm::event::KeyEventState::NONE,
        };
        assert_eq!(shell.key(ctrl_c).commands, vec![Command::CancelQuery]);
        shell.done(Err(QueryError {
            message: "canceling statement due to user request".into(),
            detail: None,
            hint: None,
            code: Some("57014".into()),
            elapsed_ms: 5,
        }));
        typed(&mut shell, "half");
        assert!(shell.key(ctrl_c).commands.is_empty());
        assert_eq!(shell.text(), "");
        assert_eq!(
            shell.messages[0].1,
            "ERROR (57014): canceling statement due to user request"
        );
    }
}
