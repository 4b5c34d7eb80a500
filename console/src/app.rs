//! The console's state and the one function that changes it.

use std::collections::VecDeque;

use chrono::{DateTime, FixedOffset, Utc};
use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use sluice_core::audit::{Detail, StoredEvent};

use crate::action::{Action, Command, Link};
use crate::theme::Theme;
use crate::views::Outcome;
use crate::views::activity::ActivityView;
use crate::views::approvals::ApprovalsView;
use crate::views::live::LiveView;
use crate::views::replay::ReplayView;
use crate::views::shell::ShellView;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Live,
    Activity,
    Approvals,
    Shell,
    Replay,
}

impl Tab {
    pub const ALL: [Tab; 5] = [Tab::Live, Tab::Activity, Tab::Approvals, Tab::Shell, Tab::Replay];

    pub fn title(self) -> &'static str {
        match self {
            Tab::Live => "Live",
            Tab::Activity => "Activity",
            Tab::Approvals => "Approvals",
            Tab::Shell => "Shell",
            Tab::Replay => "Replay",
        }
    }

    pub fn index(self) -> usize {
        Tab::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Ok,
    Warn,
    Error,
}

/// The message line at the bottom: what just happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub level: Level,
    pub text: String,
}

impl Status {
    pub fn info(text: impl Into<String>) -> Status {
        Status {
            level: Level::Info,
            text: text.into(),
        }
    }
    pub fn ok(text: impl Into<String>) -> Status {
        Status {
            level: Level::Ok,
            text: text.into(),
        }
    }
    pub fn error(text: impl Into<String>) -> Status {
        Status {
            level: Level::Error,
            text: text.into(),
        }
    }
}

/// What sits on top of the view and takes the keys first.
#[derive(Debug, Clone, PartialEq)]
pub enum Overlay {
    Help,
    /// y runs the command (none: quits); n or Esc does not.
    Confirm {
        question: String,
        command: Option<Command>,
    },
    Prompt(Prompt),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub title: String,
    pub input: String,
    pub purpose: Purpose,
    /// What `input` was when the prompt opened: Esc puts a filter back.
    pub before: String,
}

impl Prompt {
    pub fn new(title: impl Into<String>, input: &str, purpose: Purpose) -> Prompt {
        Prompt {
            title: title.into(),
            input: input.to_string(),
            purpose,
            before: input.to_string(),
        }
    }
}

/// What a prompt's answer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The reason for denying this request.
    Deny(u64),
    ActivityFilter,
    ReplayFilter,
    ShellTarget,
}

/// Per-second counts for the Live header's sparklines.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// The epoch second of `buckets[0]`.
    first: i64,
    buckets: VecDeque<Bucket>,
}

#[derive(Debug, Clone, Default)]
pub struct Bucket {
    pub statements: u64,
    pub blocked: u64,
    pub pending: u64,
    /// Run times (µs) of statements that ended in this second.
    pub durations: Vec<u64>,
}

/// Seconds of history the sparklines can show.
const STATS_WINDOW: i64 = 300;

impl Stats {
    fn bucket(&mut self, second: i64) -> Option<&mut Bucket> {
        if self.buckets.is_empty() {
            self.first = second;
        }
        if second < self.first {
            return None;
        }
        // Far ahead of what is kept (an idle gateway, an old backlog event):
        // start again there rather than fill the gap second by second.
        if second >= self.first + self.buckets.len() as i64 + STATS_WINDOW {
            self.buckets.clear();
            self.first = second;
        }
        while self.first + (self.buckets.len() as i64) <= second {
            self.buckets.push_back(Bucket::default());
        }
        while self.buckets.len() as i64 > STATS_WINDOW {
            self.buckets.pop_front();
            self.first += 1;
        }
        let index = (second - self.first) as usize;
        self.buckets.get_mut(index)
    }

    fn get(&self, second: i64) -> Option<&Bucket> {
        if second < self.first {
            return None;
        }
        self.buckets.get((second - self.first) as usize)
    }

    /// One value per second, the `n` seconds up to `now` (oldest first).
    pub fn series(&self, now: i64, n: usize, value: impl Fn(&Bucket) -> u64) -> Vec<u64> {
        (0..n as i64)
            .rev()
            .map(|back| self.get(now - back).map_or(0, &value))
            .collect()
    }

    /// p50 and p99 run time (µs) of statements that ended in the last
    /// `seconds` before `now`.
    pub fn latency(&self, now: i64, seconds: i64) -> Option<(u64, u64)> {
        let mut all: Vec<u64> = (0..seconds)
            .filter_map(|back| self.get(now - back))
            .flat_map(|b| b.durations.iter().copied())
            .collect();
        if all.is_empty() {
            return None;
        }
        all.sort_unstable();
        let at = |q: f64| all[(((all.len() - 1) as f64) * q).round() as usize];
        Some((at(0.5), at(0.99)))
    }

    /// Statements per second over the last `seconds`.
    pub fn rate(&self, now: i64, seconds: i64, value: impl Fn(&Bucket) -> u64) -> f64 {
        let total: u64 = (1..=seconds).filter_map(|back| self.get(now - back)).map(value).sum();
        total as f64 / seconds as f64
    }

    pub fn note_pending(&mut self, now: DateTime<Utc>, pending: u64) {
        if let Some(bucket) = self.bucket(now.timestamp()) {
            bucket.pending = pending;
        }
    }

    fn note(&mut self, event: &StoredEvent) {
        let second = event.event.at.timestamp();
        match &event.event.detail {
            Detail::Statement { decision, .. } => {
                if let Some(bucket) = self.bucket(second) {
                    bucket.statements += 1;
                    bucket.blocked += u64::from(decision != "allow");
                }
            }
            Detail::StatementDone {
                duration_us, skipped, ..
            } if !skipped => {
                if let Some(bucket) = self.bucket(second) {
                    bucket.durations.push(*duration_us);
                }
            }
            _ => {}
        }
    }
}

/// Everything the console shows.
#[derive(Debug)]
pub struct App {
    pub tab: Tab,
    /// The time everything is drawn at (countdowns, "since"): moved by
    /// ticks, so that drawing is a function of the state.
    pub now: DateTime<Utc>,
    /// The operator's time zone.
    pub zone: FixedOffset,
    pub theme: Theme,
    /// The control API's address, for the header.
    pub api: String,
    pub link: Link,
    pub live: LiveView,
    pub activity: ActivityView,
    pub approvals: ApprovalsView,
    pub shell: ShellView,
    pub replay: ReplayView,
    pub stats: Stats,
    pub overlay: Option<Overlay>,
    pub status: Option<Status>,
    /// When the status was set: it fades after a while.
    pub status_at: DateTime<Utc>,
    pub quit: bool,
    /// Ask before quitting (the demo: quitting removes its database).
    pub confirm_quit: bool,
    /// The newest event id seen (the id of the trail's row it came in).
    pub last_event: u64,
    /// Lines of guidance at the bottom (the demo's how-to-connect).
    pub footer: Vec<String>,
}

impl App {
    pub fn new(api: &str, target: &str, now: DateTime<Utc>, zone: FixedOffset, theme: Theme) -> App {
        App {
            tab: Tab::Live,
            now,
            zone,
            theme,
            api: api.to_string(),
            link: Link::Connecting,
            live: LiveView::default(),
            activity: ActivityView::default(),
            approvals: ApprovalsView::default(),
            shell: ShellView::new(target),
            replay: ReplayView::new(zone),
            stats: Stats::default(),
            overlay: None,
            status: None,
            status_at: now,
            quit: false,
            confirm_quit: false,
            last_event: 0,
            footer: Vec::new(),
        }
    }

    fn apply(&mut self, outcome: Outcome, commands: &mut Vec<Command>) {
        commands.extend(outcome.commands);
        if let Some(overlay) = outcome.overlay {
            self.overlay = Some(overlay);
        }
        if let Some(status) = outcome.status {
            self.status = Some(status);
        }
    }

    fn switch(&mut self, tab: Tab, commands: &mut Vec<Command>) {
        self.tab = tab;
        if tab == Tab::Replay && self.replay.needs_loading() {
            self.replay.loading = true;
            commands.push(Command::LoadPastSessions);
        }
    }

    /// Whether keys go to a text field (the shell always takes typing:
    /// `q`, digits and `?` are text there, not commands).
    fn typing(&self) -> bool {
        self.tab == Tab::Shell
    }
}

/// How long a message stays in the message line (errors longer).
const STATUS_FOR: i64 = 8;
const ERROR_FOR: i64 = 30;

/// Applies one action; returns the work it asks for.
pub fn update(app: &mut App, action: Action) -> Vec<Command> {
    let before = app.status.clone();
    let commands = apply(app, action);
    if app.status != before {
        app.status_at = app.now;
    }
    commands
}

fn apply(app: &mut App, action: Action) -> Vec<Command> {
    let mut commands = Vec::new();
    match action {
        Action::Key(key) => {
            if key.kind != KeyEventKind::Release {
                on_key(app, key, &mut commands);
            }
        }
        Action::Paste(text) => {
            if let Some(Overlay::Prompt(prompt)) = &mut app.overlay {
                // A prompt's answer goes to people (a denial's reason reaches
                // the requester's client): nothing invisible goes with it.
                let clean: String = text
                    .chars()
                    .map(|c| if c == '\n' || c == '\r' || c == '\t' { ' ' } else { c })
                    .filter(|c| !sluice_core::text::is_invisible(*c))
                    .collect();
                prompt.input.push_str(&clean);
            } else if app.tab == Tab::Shell && app.overlay.is_none() {
                app.shell.paste(&text);
            }
        }
        Action::Tick(now) => {
            app.now = now;
            let keep = match &app.status {
                Some(status) if status.level == Level::Error => ERROR_FOR,
                _ => STATUS_FOR,
            };
            if (now - app.status_at).num_seconds() >= keep {
                app.status = None;
            }
            app.replay.tick(now);
            if let Some(running) = app.shell.running {
                app.shell.elapsed_ms = (now - running).num_milliseconds().max(0) as u64;
            }
        }
        Action::Link(link) => {
            app.link = link;
        }
        Action::StreamReset => {
            // Ids start again: the feed (kept by id) starts again too.
            app.last_event = 0;
            let filter = std::mem::take(&mut app.activity.filter);
            app.activity = ActivityView::default();
            app.activity.set_filter(&filter);
            app.status = Some(Status {
                level: Level::Warn,
                text: "the gateway's audit trail starts afresh (it was replaced or reset): following its newest events"
                    .into(),
            });
        }
        Action::Event(event) => {
            // Events a row of the trail keeps together (a statement with its
            // completion, a session's statements) share its id and come one
            // after the other; a stream that resumes starts after a whole row.
            if event.id >= app.last_event {
                app.last_event = event.id;
                app.stats.note(&event);
                if app.live.note(&event) || approval_event(&event.event.detail) {
                    commands.push(Command::Refresh);
                }
                app.activity.note(*event);
            }
        }
        Action::Sessions(result) => match result {
            Ok(sessions) => app.live.set_sessions(sessions),
            Err(error) => app.live.error = Some(error),
        },
        Action::Approvals(result) => match result {
            Ok(list) => {
                app.approvals.set(list);
                let pending = app.approvals.pending().count() as u64;
                app.stats.note_pending(app.now, pending);
            }
            Err(error) => app.approvals.error = Some(error),
        },
        Action::Decided {
            id,
            approve,
            reason,
            result,
        } => {
            // A denial the gateway refused (its reason, say) comes back to
            // the prompt with what was typed.
            if let (Err(_), false, Some(reason), None) = (&result, approve, &reason, &app.overlay) {
                app.overlay = Some(Overlay::Prompt(Prompt::new(
                    format!("Deny request {id}: reason (fix it and press enter again)"),
                    reason,
                    Purpose::Deny(id),
                )));
            }
            if result.is_ok() {
                app.approvals.reading = None;
            }
            app.status = Some(match result {
                Ok(view) => {
                    let state = view.state.name();
                    let verb = if approve { "approved" } else { "denied" };
                    let done = view.approvals.len();
                    if approve && state == "pending" {
                        Status::ok(format!(
                            "request {id}: your approval is in ({done} of {} needed)",
                            view.needed
                        ))
                    } else {
                        Status::ok(format!("request {id} {verb}"))
                    }
                }
                Err(error) => Status::error(format!("request {id}: {error}")),
            });
            commands.push(Command::Refresh);
        }
        Action::Killed { session, result } => {
            app.status = Some(match result {
                Ok(()) => Status::ok(format!("session {} ended", short_id(&session))),
                Err(error) => Status::error(format!("could not end session {}: {error}", short_id(&session))),
            });
            commands.push(Command::Refresh);
        }
        Action::Timeline { session, result } => app.live.set_timeline(&session, result),
        Action::PastSessions(result) => app.replay.set_sessions(result),
        Action::Recording { session, result } => app.replay.set_recording(&session, result, app.now),
        Action::Exported(result) => {
            app.status = Some(match result {
                Ok(path) => Status::ok(format!("session exported to {path}")),
                Err(error) => Status::error(format!("export failed: {error}")),
            });
        }
        Action::QueryNotice(text) => app.shell.notice(text),
        Action::QueryDone(result) => {
            app.shell.done(result);
            // "cancelling..." and the like are over; the result says the rest.
            if app.status.as_ref().is_some_and(|s| s.level == Level::Info) {
                app.status = None;
            }
        }
    }
    commands
}

fn approval_event(detail: &Detail) -> bool {
    matches!(
        detail,
        Detail::ApprovalRequested { .. }
            | Detail::ApprovalDecided { .. }
            | Detail::AccessGranted { .. }
            | Detail::AccessEnded { .. }
    )
}

/// The last part of a session id, enough to tell sessions apart on screen
/// (ids are UUIDv7: their first part is the time, alike for sessions that
/// start together).
pub fn short_id(id: &str) -> &str {
    let count = id.chars().count();
    let start = id.char_indices().nth(count.saturating_sub(8)).map_or(0, |(i, _)| i);
    &id[start..]
}

fn on_key(app: &mut App, key: KeyEvent, commands: &mut Vec<Command>) {
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    if let Some(overlay) = app.overlay.take() {
        app.overlay = on_overlay_key(app, overlay, key, commands);
        return;
    }
    // The keys that work everywhere, even while typing.
    match key.code {
        KeyCode::F(1) => {
            app.overlay = Some(Overlay::Help);
            return;
        }
        KeyCode::Tab | KeyCode::BackTab => {
            let step = if key.code == KeyCode::Tab {
                1
            } else {
                Tab::ALL.len() - 1
            };
            let next = Tab::ALL[(app.tab.index() + step) % Tab::ALL.len()];
            app.switch(next, commands);
            return;
        }
        _ => {}
    }
    let outcome = match app.tab {
        Tab::Live => app.live.key(key),
        Tab::Activity => app.activity.key(key),
        Tab::Approvals => app.approvals.key(key),
        Tab::Shell => app.shell.key(key),
        Tab::Replay => app.replay.key(key),
    };
    if outcome.handled {
        app.apply(outcome, commands);
        return;
    }
    if app.typing() {
        return;
    }
    match key.code {
        KeyCode::Char('q') => quit(app),
        KeyCode::Char('c') if ctrl => quit(app),
        KeyCode::Char('?') => app.overlay = Some(Overlay::Help),
        KeyCode::Char(c @ '1'..='5') => {
            let tab = Tab::ALL[(c as u8 - b'1') as usize];
            app.switch(tab, commands);
        }
        KeyCode::Char('r') => commands.push(Command::Refresh),
        KeyCode::Esc => app.status = None,
        _ => {}
    }
}

fn quit(app: &mut App) {
    let question = if app.confirm_quit {
        Some("Quit? The demo stops and its database and files are removed.")
    } else if app.shell.running.is_some() {
        Some("Quit? A query is running in the shell; it is cancelled.")
    } else if !app.shell.text().trim().is_empty() {
        Some("Quit? The shell holds SQL you have not run.")
    } else {
        None
    };
    match question {
        Some(question) => {
            app.overlay = Some(Overlay::Confirm {
                question: question.into(),
                command: None,
            })
        }
        None => app.quit = true,
    }
}

/// Keys while an overlay is up; returns the overlay that stays (if any).
fn on_overlay_key(app: &mut App, overlay: Overlay, key: KeyEvent, commands: &mut Vec<Command>) -> Option<Overlay> {
    match overlay {
        Overlay::Help => match key.code {
            KeyCode::Esc | KeyCode::Char('?' | 'q') | KeyCode::Enter | KeyCode::F(1) => None,
            _ => Some(Overlay::Help),
        },
        Overlay::Confirm { question, command } => match key.code {
            KeyCode::Char('y' | 'Y') => {
                match command {
                    Some(command) => commands.push(command),
                    None => app.quit = true,
                }
                None
            }
            KeyCode::Char('n' | 'N') | KeyCode::Esc => {
                app.status = Some(Status::info("cancelled"));
                None
            }
            _ => Some(Overlay::Confirm { question, command }),
        },
        Overlay::Prompt(mut prompt) => match key.code {
            KeyCode::Esc => {
                match prompt.purpose {
                    Purpose::Deny(_) => app.status = Some(Status::info("not denied")),
                    Purpose::ActivityFilter => app.activity.set_filter(&prompt.before),
                    Purpose::ReplayFilter => app.replay.set_filter(&prompt.before),
                    Purpose::ShellTarget => {}
                }
                None
            }
            KeyCode::Enter => {
                submit(app, prompt, commands);
                None
            }
            KeyCode::Backspace => {
                prompt.input.pop();
                live_filter(app, &prompt);
                Some(Overlay::Prompt(prompt))
            }
            KeyCode::Char('u') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                prompt.input.clear();
                live_filter(app, &prompt);
                Some(Overlay::Prompt(prompt))
            }
            KeyCode::Char(c)
                if !key.modifiers.contains(KeyModifiers::CONTROL) && !sluice_core::text::is_invisible(c) =>
            {
                prompt.input.push(c);
                live_filter(app, &prompt);
                Some(Overlay::Prompt(prompt))
            }
            _ => Some(Overlay::Prompt(prompt)),
        },
    }
}

/// Filters apply as they are typed.
fn live_filter(app: &mut App, prompt: &Prompt) {
    match prompt.purpose {
        Purpose::ActivityFilter => app.activity.set_filter(&prompt.input),
        Purpose::ReplayFilter => app.replay.set_filter(&prompt.input),
        _ => {}
    }
}

fn submit(app: &mut App, prompt: Prompt, commands: &mut Vec<Command>) {
    let input = prompt.input.trim().to_string();
    match prompt.purpose {
        Purpose::Deny(id) => {
            commands.push(Command::Decide {
                id,
                approve: false,
                reason: (!input.is_empty()).then_some(input),
            });
            app.status = Some(Status::info(format!("denying request {id}...")));
        }
        Purpose::ActivityFilter => app.activity.set_filter(&input),
        Purpose::ReplayFilter => app.replay.set_filter(&input),
        Purpose::ShellTarget => {
            if !input.is_empty() {
                app.shell.target = input;
                app.status = Some(Status::info(format!("shell target: {}", app.shell.target)));
            }
        }
    }
}
