//! Untrusted text made safe to draw, and the small formats every view uses.
//!
//! Statement texts, identity names, application names and result values all
//! come from people the operator does not control. A terminal interprets
//! control characters (an escape sequence can move the cursor, change
//! colours, retitle the window or worse), so nothing reaches the screen
//! without passing [`escape`] or [`one_line`] first.

use std::borrow::Cow;
use std::fmt::Write as _;

use chrono::{DateTime, FixedOffset, Utc};

/// `text` with every control character shown as a visible escape: `\n`,
/// `\t`, `\r` as themselves, ESC as `\e`, other C0/C1 controls and DEL as
/// `\x..` / `\u{..}`, and the bidirectional overrides (which reorder what
/// follows them on screen) as `\u{..}` too.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

/// Like [`escape`], for texts drawn on several lines: line breaks stay
/// line breaks (a lone `\r` does not).
pub fn escape_lines(text: &str) -> Vec<String> {
    text.split('\n')
        .map(|line| escape(line.strip_suffix('\r').unwrap_or(line)).into_owned())
        .collect()
}

/// `text` on one line: runs of whitespace (line breaks included) become one
/// space, the rest as [`escape`].
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.trim().chars() {
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        push_escaped(&mut out, c);
    }
    out
}

fn needs_escape(c: char) -> bool {
    is_hidden(c)
}

pub use sluice_core::text::is_hidden;

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\t' => out.push_str("\\t"),
        '\r' => out.push_str("\\r"),
        '\x1b' => out.push_str("\\e"),
        c if (c as u32) < 0x100 && c.is_control() => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if needs_escape(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

/// How many terminal columns `text` takes.
pub fn width(text: &str) -> usize {
    unicode_width::UnicodeWidthStr::width(text)
}

/// The first `width` columns of `text`, with `…` when cut (wide characters
/// count two).
pub fn clip(text: &str, width: usize) -> Cow<'_, str> {
    if self::width(text) <= width {
        return Cow::Borrowed(text);
    }
    if width == 0 {
        return Cow::Borrowed("");
    }
    let mut cut = String::new();
    let mut used = 0;
    for c in text.chars() {
        let w = unicode_width::UnicodeWidthChar::width(c).unwrap_or(0);
        if used + w > width - 1 {
            break;
        }
        used += w;
        cut.push(c);
    }
    Cow::Owned(cut + "…")
}

/// A duration the way people say it: `850ms`, `4.2s`, `3m12s`, `2h05m`.
pub fn duration(d: chrono::Duration) -> String {
    let ms = d.num_milliseconds().max(0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms / 1000;
    if secs < 10 {
        return format!("{}.{}s", secs, (ms % 1000) / 100);
    }
    if secs < 60 {
        return format!("{secs}s");
    }
    let mins = secs / 60;
    if mins < 60 {
        return format!("{}m{:02}s", mins, secs % 60);
    }
    let hours = mins / 60;
    if hours < 48 {
        return format!("{}h{:02}m", hours, mins % 60);
    }
    format!("{}d{:02}h", hours / 24, hours % 24)
}

/// A statement's run time from microseconds: `0.31ms`, `12ms`, `4.2s`.
pub fn micros(us: u64) -> String {
    if us < 1000 {
        format!("{:.2}ms", us as f64 / 1000.0)
    } else if us < 1_000_000 {
        format!("{}ms", us / 1000)
    } else {
        duration(chrono::Duration::microseconds(us as i64))
    }
}

/// A time of day in the operator's zone, for lists: `14:03:27`.
pub fn clock(at: DateTime<Utc>, zone: FixedOffset) -> String {
    at.with_timezone(&zone).format("%H:%M:%S").to_string()
}

/// A date and time in the operator's zone: `2026-11-29 14:03`.
pub fn date_time(at: DateTime<Utc>, zone: FixedOffset) -> String {
    at.with_timezone(&zone).format("%Y-%m-%d %H:%M").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("a\x1b[2Jb"), "a\\e[2Jb");
        assert_eq!(escape("bell\x07"), "bell\\x07");
        assert_eq!(escape("c1\u{9b}31m"), "c1\\x9b31m");
        assert_eq!(escape("del\x7f"), "del\\x7f");
        assert_eq!(escape("rtl\u{202e}txt"), "rtl\\u{202e}txt");
        assert_eq!(escape("two\nlines"), "two\\nlines");
        // A joined emoji sequence falls apart into its (narrow-counted) parts.
        assert_eq!(escape("👩\u{200d}👧"), "👩\\u{200d}👧");
    }

    #[test]
    fn one_line_folds_whitespace_and_escapes() {
        assert_eq!(one_line("  SELECT *\n  FROM\tt  "), "SELECT * FROM t");
        assert_eq!(one_line("x\x1b]0;title\x07"), "x\\e]0;title\\x07");
    }

    #[test]
    fn escape_lines_keeps_line_breaks_only() {
        assert_eq!(escape_lines("a\r\nb\x1bc\rd"), vec!["a", "b\\ec\\rd"]);
    }

    #[test]
    fn clip_marks_what_it_cut() {
        assert_eq!(clip("abcdef", 10), "abcdef");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abcdef", 0), "");
        assert_eq!(clip("漢字漢字", 8), "漢字漢字");
        assert_eq!(clip("漢字漢字", 6), "漢字…");
        assert_eq!(width("漢字a"), 5);
    }

    #[test]
    fn durations_read_like_speech() {
        let d = chrono::Duration::milliseconds;
        assert_eq!(duration(d(850)), "850ms");
        assert_eq!(duration(d(4_250)), "4.2s");
        assert_eq!(duration(d(42_000)), "42s");
        assert_eq!(duration(d(192_000)), "3m12s");
        assert_eq!(duration(d(7_500_000)), "2h05m");
        assert_eq!(duration(d(-5)), "0ms");
        assert_eq!(micros(310), "0.31ms");
        assert_eq!(micros(12_400), "12ms");
    }
}
