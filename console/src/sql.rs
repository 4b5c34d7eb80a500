//! SQL syntax highlighting for display. It only colours: a text it cannot
//! read is drawn plain, never altered. The input is already escaped
//! ([`crate::text`]), so it holds no control characters.

use ratatui::text::{Line, Span};

use crate::theme::Theme;

const KEYWORDS: &[&str] = &[
    "ALTER",
    "ALL",
    "AND",
    "ANALYZE",
    "AS",
    "ASC",
    "BEGIN",
    "BETWEEN",
    "BY",
    "CALL",
    "CASCADE",
    "CASE",
    "COMMIT",
    "COPY",
    "CREATE",
    "CROSS",
    "DEFAULT",
    "DELETE",
    "DESC",
    "DISTINCT",
    "DO",
    "DROP",
    "ELSE",
    "END",
    "EXECUTE",
    "EXISTS",
    "EXPLAIN",
    "FALSE",
    "FETCH",
    "FOR",
    "FROM",
    "FULL",
    "FUNCTION",
    "GRANT",
    "GROUP",
    "HAVING",
    "ILIKE",
    "IN",
    "INDEX",
    "INNER",
    "INSERT",
    "INTO",
    "IS",
    "JOIN",
    "LEFT",
    "LIKE",
    "LIMIT",
    "MERGE",
    "NOT",
    "NULL",
    "OFFSET",
    "ON",
    "OR",
    "ORDER",
    "OUTER",
    "PREPARE",
    "RETURNING",
    "REVOKE",
    "RIGHT",
    "ROLLBACK",
    "SCHEMA",
    "SELECT",
    "SET",
    "SHOW",
    "TABLE",
    "THEN",
    "TO",
    "TRUE",
    "TRUNCATE",
    "UNION",
    "UPDATE",
    "USING",
    "VACUUM",
    "VALUES",
    "VIEW",
    "WHEN",
    "WHERE",
    "WITH",
];

/// What the end of a line leaves open, for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Open {
    #[default]
    Nothing,
    Comment(u32),
    Quote(char),
}

/// `lines` (one statement, already escaped and split) highlighted.
pub fn highlight(lines: &[String], theme: Theme) -> Vec<Line<'static>> {
    let mut open = Open::Nothing;
    lines
        .iter()
        .map(|line| {
            let (spans, next) = highlight_line(line, open, theme);
            open = next;
            Line::from(spans)
        })
        .collect()
}

fn highlight_line(line: &str, mut open: Open, theme: Theme) -> (Vec<Span<'static>>, Open) {
    let chars: Vec<char> = line.chars().collect();
    let mut spans = Vec::new();
    let mut i = 0;
    let text = |from: usize, to: usize| chars[from..to].iter().collect::<String>();
    while i < chars.len() {
        let start = i;
        match open {
            Open::Comment(depth) => {
                let mut depth = depth;
                while i < chars.len() && depth > 0 {
                    if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                    } else if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                spans.push(Span::styled(text(start, i), theme.comment()));
                open = if depth == 0 {
                    Open::Nothing
                } else {
                    Open::Comment(depth)
                };
                continue;
            }
            Open::Quote(q) => {
                let mut closed = false;
                while i < chars.len() {
                    if chars[i] == q {
                        if chars.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        i += 1;
                        closed = true;
                        break;
                    }
                    i += 1;
                }
                let style = if q == '"' { theme.plain() } else { theme.string() };
                spans.push(Span::styled(text(start, i), style));
                open = if closed { Open::Nothing } else { Open::Quote(q) };
                continue;
            }
            Open::Nothing => {}
        }
        let c = chars[i];
        if c == '-' && chars.get(i + 1) == Some(&'-') {
            spans.push(Span::styled(text(i, chars.len()), theme.comment()));
            break;
        }
        if c == '/' && chars.get(i + 1) == Some(&'*') {
            open = Open::Comment(1);
            i += 2;
            // The opening is drawn with the rest of the comment.
            let (mut rest, next) = highlight_line(&text(i, chars.len()), open, theme);
            spans.push(Span::styled("/*".to_string(), theme.comment()));
            spans.append(&mut rest);
            return (spans, next);
        }
        if c == '\'' || c == '"' {
            open = Open::Quote(c);
            i += 1;
            let (mut rest, next) = highlight_line(&text(i, chars.len()), open, theme);
            let style = if c == '"' { theme.plain() } else { theme.string() };
            spans.push(Span::styled(c.to_string(), style));
            spans.append(&mut rest);
            return (spans, next);
        }
        if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            spans.push(Span::styled(text(start, i), theme.number()));
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$') {
                i += 1;
            }
            let word = text(start, i);
            let keyword = KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(&word));
            spans.push(Span::styled(
                word,
                if keyword { theme.keyword() } else { theme.plain() },
            ));
            continue;
        }
        while i < chars.len() && !(chars[i].is_alphanumeric() || "_'\"-/".contains(chars[i])) {
            i += 1;
        }
        if i == start {
            i += 1;
        }
        spans.push(Span::raw(text(start, i)));
    }
    (spans, open)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn styled(line: &Line<'_>, theme: Theme) -> Vec<(String, &'static str)> {
        line.spans
            .iter()
            .map(|s| {
                let kind = if s.style == theme.keyword() {
                    "kw"
                } else if s.style == theme.string() {
                    "str"
                } else if s.style == theme.number() {
                    "num"
                } else if s.style == theme.comment() {
                    "comment"
                } else {
                    ""
                };
                (s.content.to_string(), kind)
            })
            .collect()
    }

    #[test]
    fn keywords_strings_numbers_and_comments() {
        let theme = Theme { color: true };
        let lines = highlight(
            &["delete from orders where id = 42 and note = 'it''s' -- why".into()],
            theme,
        );
        let spans = styled(&lines[0], theme);
        assert!(spans.contains(&("delete".into(), "kw")));
        assert!(spans.contains(&("orders".into(), "")));
        assert!(spans.contains(&("42".into(), "num")));
        assert!(spans.contains(&("'".into(), "str")));
        assert!(spans.contains(&("it''s'".into(), "str")));
        assert!(spans.contains(&("-- why".into(), "comment")));
        let all: String = lines[0].spans.iter().map(|s| s.content.as_ref()).collect();
        assert_eq!(all, "delete from orders where id = 42 and note = 'it''s' -- why");
    }

    #[test]
    fn comments_and_strings_carry_over_lines() {
        let theme = Theme { color: true };
        let lines = highlight(&["select /* a".into(), "b */ 1, 'x".into(), "y' from t".into()], theme);
        assert_eq!(styled(&lines[1], theme)[0], ("b */".into(), "comment"));
        assert_eq!(styled(&lines[2], theme)[0], ("y'".into(), "str"));
        assert!(styled(&lines[2], theme).contains(&("from".into(), "kw")));
    }
}
