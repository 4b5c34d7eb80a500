//! The five views. Each keeps its own state, turns the keys it owns into
//! state changes and [`Command`]s, and draws itself from that state only.

pub mod activity;
pub mod approvals;
pub mod live;
pub mod replay;
pub mod shell;

use crossterm::event::{KeyCode, KeyEvent};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::widgets::{Table, TableState};

use crate::action::Command;
use crate::app::{Overlay, Status};

/// What a view did with a key.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The view used the key; otherwise the app's global keys get it.
    pub handled: bool,
    pub commands: Vec<Command>,
    pub overlay: Option<Overlay>,
    pub status: Option<Status>,
}

impl Outcome {
    pub fn handled() -> Outcome {
        Outcome {
            handled: true,
            ..Outcome::default()
        }
    }
    pub fn ignored() -> Outcome {
        Outcome::default()
    }
    pub fn command(command: Command) -> Outcome {
        Outcome {
            handled: true,
            commands: vec![command],
            ..Outcome::default()
        }
    }
    pub fn overlay(overlay: Overlay) -> Outcome {
        Outcome {
            handled: true,
            overlay: Some(overlay),
            ..Outcome::default()
        }
    }
    pub fn status(status: Status) -> Outcome {
        Outcome {
            handled: true,
            status: Some(status),
            ..Outcome::default()
        }
    }
}

/// Moves a selection in a list of `len` by the usual keys (arrows, j/k
/// where the view allows, page keys, home/end); `None` if the key is not
/// one of them.
pub fn navigate(selected: usize, len: usize, key: &KeyEvent, vim: bool) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let last = len - 1;
    let next = match key.code {
        KeyCode::Up => selected.saturating_sub(1),
        KeyCode::Char('k') if vim => selected.saturating_sub(1),
        KeyCode::Down => (selected + 1).min(last),
        KeyCode::Char('j') if vim => (selected + 1).min(last),
        KeyCode::PageUp => selected.saturating_sub(10),
        KeyCode::PageDown => (selected + 10).min(last),
        KeyCode::Home => 0,
        KeyCode::End => last,
        _ => return None,
    };
    Some(next)
}

/// Draws a list whose `selected` row stands out (highlighted, with a
/// marker that shows without colour too) and stays in view.
pub fn draw_selectable(frame: &mut Frame, area: Rect, table: Table<'_>, theme: crate::theme::Theme, selected: usize) {
    let table = table.row_highlight_style(theme.selected()).highlight_symbol("▶ ");
    let mut state = TableState::default().with_selected(Some(selected));
    frame.render_stateful_widget(table, area, &mut state);
}
