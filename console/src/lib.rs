//! `sluice console`: the operator's terminal view of a gateway.
//!
//! It talks to the gateway only through the control API (sessions,
//! approvals, the event stream) and the PostgreSQL port (the shell), never
//! through the audit database. Layout: [`action`] (what happens),
//! [`app`] (the state and `update`), [`views`] (one module per view:
//! state, keys, drawing), [`ui`] (the frame), [`effects`] (commands carried
//! out), [`text`] (escaping untrusted text), and this file (the terminal,
//! the background tasks and the loop that joins them).

pub mod action;
pub mod app;
pub mod effects;
pub mod sql;
pub mod text;
pub mod theme;
pub mod ui;
pub mod views;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{Local, Utc};
use crossterm::event::{Event as TermEvent, EventStream};
use futures_util::StreamExt as _;
use sluice_core::api::client::ApiClient;
use tokio::sync::mpsc;

use action::{Action, Command, Link};
use app::App;

/// How the console is started.
#[derive(Debug, Clone)]
pub struct Options {
    /// The control API: `http://127.0.0.1:7480`.
    pub api: String,
    /// Renewed behind the console when it comes from the login cache.
    pub token: sluice_core::api::client::SharedToken,
    /// The gateway's PostgreSQL listener, for the shell.
    pub postgres: effects::Postgres,
    /// The shell's first target.
    pub target: String,
    /// Where logs go (never the screen).
    pub log_file: PathBuf,
    /// The shell's history (None: not kept).
    pub history_file: Option<PathBuf>,
    /// Lines shown at the bottom (the demo's how-to-connect).
    pub footer: Vec<String>,
    /// Ask before quitting (the demo).
    pub confirm_quit: bool,
}

/// Actions waiting for the loop, at most.
const QUEUE: usize = 4096;
/// How many recent events the Activity view starts with.
const BACKLOG: u64 = 500;
/// How often live sessions and approvals are fetched.
const POLL: Duration = Duration::from_secs(1);
/// How often countdowns and playback move.
const TICK: Duration = Duration::from_millis(250);

/// Runs the console until the operator quits.
pub async fn run(options: Options) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        anyhow::bail!("the console draws on a terminal: run it in one (stdin and stdout are not a terminal here)");
    }
    init_logging(&options.log_file)?;
    let api = ApiClient::with_shared_token(&options.api, options.token.clone()).via("console");
    // Bounded: the stream and the runner wait rather than pile up events
    // when drawing falls behind.
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let export_dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let runner = effects::Runner::new(
        api.clone(),
        options.postgres.clone(),
        tx.clone(),
        options.history_file.clone(),
        export_dir,
    );
    let zone = *Local::now().offset();
    let mut app = App::new(
        &options.api,
        &options.target,
        Utc::now(),
        zone,
        theme::Theme::from_env(),
    );
    app.footer = options.footer.clone();
    app.confirm_quit = options.confirm_quit;
    if let Some(path) = &options.history_file {
        app.shell.history = effects::load_history(path);
    }

    let mut terminal = Terminal::enter()?;
    let background = background_tasks(api, runner.clone(), tx.clone());
    let mut input = EventStream::new();
    terminal.draw(&app)?;
    loop {
        let action = tokio::select! {
            Some(action) = rx.recv() => action,
            Some(event) = input.next() => match event {
                Ok(TermEvent::Key(key)) => Action::Key(key),
                Ok(TermEvent::Paste(text)) => Action::Paste(text),
                Ok(TermEvent::Resize(..)) => Action::Tick(Utc::now()),
                Ok(_) => continue,
                Err(err) => {
                    tracing::error!(error = %err, "reading the terminal failed");
                    break;
                }
            },
        };
        let mut batch = vec![action];
        // Drain what else is waiting, then draw once.
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        for action in batch {
            for command in app::update(&mut app, action) {
                if matches!(command, Command::RunQuery { .. }) {
                    app.shell.started(app.now);
                }
                runner.run(command);
            }
        }
        if app.quit {
            break;
        }
        terminal.draw(&app)?;
    }
    for task in background {
        task.abort();
    }
    drop(terminal);
    Ok(())
}

/// The event stream, the poll and the clock.
fn background_tasks(
    api: ApiClient,
    runner: effects::Runner,
    tx: mpsc::Sender<Action>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let stream = {
        let tx = tx.clone();
        tokio::spawn(async move { follow_events(api, tx).await })
    };
    let poll = tokio::spawn(async move {
        let mut interval = tokio::time::interval(POLL);
        loop {
            interval.tick().await;
            if runner.refresh().await {
                // A refused token does not become good by asking twice a
                // second.
                tokio::time::sleep(REFUSED_RETRY).await;
            }
        }
    });
    let tick = tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK);
        loop {
            interval.tick().await;
            if tx.send(Action::Tick(Utc::now())).await.is_err() {
                return;
            }
        }
    });
    vec![stream, poll, tick]
}

/// Follows the gateway's event stream; after any loss, reconnects with
/// `since` = the last event seen, so nothing is missed or shown twice. A
/// token the gateway refuses is said so, and tried again only slowly.
pub async fn follow_events(api: ApiClient, tx: mpsc::Sender<Action>) {
    let mut last: Option<u64> = None;
    let mut attempt = 0u32;
    loop {
        let opened = match last {
            Some(since) => api.events(since).await,
            None => api.events_tail(BACKLOG).await,
        };
        let error = match opened {
            Ok(mut stream) => {
                attempt = 0;
                if tx.send(Action::Link(Link::Connected)).await.is_err() {
                    return;
                }
                // A fresh start from the tail: everything after the
                // backlog comes by id from here on.
                last.get_or_insert(0);
                loop {
                    match stream.next().await {
                        Some(Ok(event)) => {
                            last = Some(event.id);
                            if tx.send(Action::Event(Box::new(event))).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(err)) => break err,
                        None => {
                            break sluice_core::api::client::ClientError::Decode(
                                "the gateway closed the event stream".into(),
                            );
                        }
                    }
                }
            }
            Err(err) => err,
        };
        attempt += 1;
        if error.status() == Some(409) && last.is_some() {
            // The trail behind the gateway is not the one the cursor came
            // from: start again from its newest events.
            tracing::warn!(error = %error, "the gateway's trail was replaced; following it afresh");
            last = None;
            if tx.send(Action::StreamReset).await.is_err() {
                return;
            }
            continue;
        }
        let (link, wait) = match error.status() {
            Some(401 | 403) => (
                Link::Refused {
                    error: error.to_string(),
                },
                REFUSED_RETRY,
            ),
            _ => (
                Link::Reconnecting {
                    attempt,
                    error: error.to_string(),
                },
                Duration::from_millis(500 * u64::from(attempt.min(10))),
            ),
        };
        tracing::warn!(error = %error, attempt, "event stream lost; reconnecting");
        if tx.send(Action::Link(link)).await.is_err() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

/// How long to wait before trying a refused token again.
const REFUSED_RETRY: Duration = Duration::from_secs(15);

/// Sends logs to `path` (appending). The first call in a process wins.
pub fn init_logging(path: &std::path::Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the console log {}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    Ok(())
}

/// The terminal in raw mode on the alternate screen; restored when dropped
/// and on a panic.
struct Terminal {
    inner: ratatui::DefaultTerminal,
}

impl Terminal {
    fn enter() -> anyhow::Result<Terminal> {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            hook(info);
        }));
        let inner = ratatui::try_init().context("setting up the terminal")?;
        let _ = crossterm::execute!(std::io::stdout(), crossterm::event::EnableBracketedPaste);
        Ok(Terminal { inner })
    }

    fn draw(&mut self, app: &App) -> anyhow::Result<()> {
        self.inner.draw(|frame| ui::render(app, frame)).context("drawing")?;
        Ok(())
    }
}

fn restore() {
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::DisableBracketedPaste);
    ratatui::restore();
    let _ = std::io::stdout().flush();
}

impl Drop for Terminal {
    fn drop(&mut self) {
        restore();
    }
}

#[cfg(test)]
mod snapshots;
