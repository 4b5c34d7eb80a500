//! A lexer that reads SQL the way PostgreSQL's own lexer (`scan.l`) does,
//! as far as statement boundaries and token classes go.
//!
//! The classifier must never see one statement where the server runs two. So
//! statement boundaries come from this scanner, which follows the server's
//! rules for quotes (`''`, `E'\''`), dollar quotes (`$tag$`, and `$` inside
//! identifiers), nested block comments and line comments; sqlparser then
//! parses each piece, and any disagreement between the two makes the
//! statement `unknown`. The scanner does no allocation beyond the vector of
//! statement spans it returns.

use std::ops::Range;

/// What a token is, as far as the gateway cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An unquoted identifier or keyword.
    Word,
    /// A `"quoted"` (or `U&"quoted"`) identifier.
    QuotedIdent,
    /// A string constant: `'...'`, `E'...'`, `B'...'`, `X'...'`, `N'...'`, `U&'...'`.
    String,
    /// A dollar-quoted string: `$$...$$` or `$tag$...$tag$`.
    DollarString,
    /// A number.
    Number,
    /// A parameter placeholder: `$1`.
    Param,
    /// `;` outside quotes and comments.
    Semicolon,
    /// Any other character (operators, punctuation).
    Other,
    /// `-- ...` or `/* ... */`.
    Comment,
}

/// One token: its kind and where it is in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub kind: TokenKind,
    pub span: Range<usize>,
}

/// Why a text cannot be scanned completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("unterminated quoted string")]
    UnterminatedString,
    #[error("unterminated quoted identifier")]
    UnterminatedIdentifier,
    #[error("unterminated dollar-quoted string")]
    UnterminatedDollarQuote,
    #[error("unterminated /* comment")]
    UnterminatedComment,
}

/// How the session reads string constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanOptions {
    /// With `standard_conforming_strings` off, a backslash escapes the next
    /// character in every `'...'` string, not only in `E'...'`.
    pub standard_conforming_strings: bool,
}

impl Default for ScanOptions {
    fn default() -> ScanOptions {
        ScanOptions {
            standard_conforming_strings: true,
        }
    }
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b'\x0b')
}

/// Iterates over the tokens of a text. Whitespace is skipped.
pub struct Scanner<'a> {
    text: &'a [u8],
    pos: usize,
    options: ScanOptions,
    failed: bool,
}

impl<'a> Scanner<'a> {
    pub fn new(text: &'a str, options: ScanOptions) -> Scanner<'a> {
        Scanner {
            text: text.as_bytes(),
            pos: 0,
            options,
            failed: false,
        }
    }

    fn peek(&self, offset: usize) -> Option<u8> {
        self.text.get(self.pos + offset).copied()
    }

    /// A quoted string whose opening quote is at `self.pos`. `backslash`
    /// says whether a backslash escapes the next character.
    fn quoted(&mut self, quote: u8, backslash: bool) -> Result<(), ScanError> {
        self.pos += 1;
        loop {
            let Some(b) = self.peek(0) else {
                return Err(if quote == b'"' {
                    ScanError::UnterminatedIdentifier
                } else {
                    ScanError::UnterminatedString
                });
            };
            if backslash && b == b'\\' {
                self.pos += 2;
                continue;
            }
            self.pos += 1;
            if b == quote {
                // A doubled quote stands for one and the string goes on.
                if self.peek(0) == Some(quote) {
                    self.pos += 1;
                    continue;
                }
                return Ok(());
            }
        }
    }

    /// A dollar quote if one starts at `self.pos`: `$$` or `$tag$`.
    fn dollar_tag_len(&self) -> Option<usize> {
        let rest = &self.text[self.pos..];
        if rest.get(1) == Some(&b'$') {
            return Some(2);
        }
        let first = *rest.get(1)?;
        if !is_ident_start(first) {
            return None;
        }
        let mut end = 2;
        while let Some(&b) = rest.get(end) {
            if b == b'$' {
                return Some(end + 1);
            }
            // A tag is an identifier without `$`.
            if !(is_ident_start(b) || b.is_ascii_digit()) {
                return None;
            }
            end += 1;
        }
        None
    }

    fn dollar_string(&mut self, tag_len: usize) -> Result<(), ScanError> {
        let tag = &self.text[self.pos..self.pos + tag_len];
        let body_start = self.pos + tag_len;
        let found = self.text[body_start..]
            .windows(tag_len)
            .position(|window| window == tag)
            .ok_or(ScanError::UnterminatedDollarQuote)?;
        self.pos = body_start + found + tag_len;
        Ok(())
    }

    fn block_comment(&mut self) -> Result<(), ScanError> {
        self.pos += 2;
        let mut depth = 1;
        while depth > 0 {
            match (self.peek(0), self.peek(1)) {
                (Some(b'/'), Some(b'*')) => {
                    depth += 1;
                    self.pos += 2;
                }
                (Some(b'*'), Some(b'/')) => {
                    depth -= 1;
                    self.pos += 2;
                }
                (Some(_), _) => self.pos += 1,
                (None, _) => return Err(ScanError::UnterminatedComment),
            }
        }
        Ok(())
    }

    fn next_token(&mut self) -> Option<Result<Token, ScanError>> {
        while self.peek(0).is_some_and(is_space) {
            self.pos += 1;
        }
        let start = self.pos;
        let b = self.peek(0)?;
        let next = self.peek(1);
        let kind = match b {
            b'-' if next == Some(b'-') => {
                while self.peek(0).is_some_and(|b| b != b'\n' && b != b'\r') {
                    self.pos += 1;
                }
                TokenKind::Comment
            }
            b'/' if next == Some(b'*') => {
                if let Err(err) = self.block_comment() {
                    return Some(Err(err));
                }
                TokenKind::Comment
            }
            b'\'' => {
                let backslash = !self.options.standard_conforming_strings;
                if let Err(err) = self.quoted(b'\'', backslash) {
                    return Some(Err(err));
                }
                TokenKind::String
            }
            b'"' => {
                if let Err(err) = self.quoted(b'"', false) {
                    return Some(Err(err));
                }
                TokenKind::QuotedIdent
            }
            // E'...' escapes with backslashes; B'', X'', N'' do not.
            b'e' | b'E' | b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if next == Some(b'\'') => {
                self.pos += 1;
                let backslash = matches!(b, b'e' | b'E') || !self.options.standard_conforming_strings;
                if let Err(err) = self.quoted(b'\'', backslash) {
                    return Some(Err(err));
                }
                TokenKind::String
            }
            b'u' | b'U' if next == Some(b'&') && matches!(self.peek(2), Some(b'\'') | Some(b'"')) => {
                self.pos += 2;
                let quote = self.text[self.pos];
                let backslash = quote == b'\'' && !self.options.standard_conforming_strings;
                if let Err(err) = self.quoted(quote, backslash) {
                    return Some(Err(err));
                }
                if quote == b'"' {
                    TokenKind::QuotedIdent
                } else {
                    TokenKind::String
                }
            }
            b'$' if next.is_some_and(|b| b.is_ascii_digit()) => {
                self.pos += 1;
                while self.peek(0).is_some_and(|b| b.is_ascii_digit()) {
                    self.pos += 1;
                }
                TokenKind::Param
            }
            b'$' => match self.dollar_tag_len() {
                Some(tag_len) => {
                    if let Err(err) = self.dollar_string(tag_len) {
                        return Some(Err(err));
                    }
                    TokenKind::DollarString
                }
                None => {
                    self.pos += 1;
                    TokenKind::Other
                }
            },
            b';' => {
                self.pos += 1;
                TokenKind::Semicolon
            }
            b if is_ident_start(b) => {
                self.pos += 1;
                while self.peek(0).is_some_and(is_ident_cont) {
                    self.pos += 1;
                }
                TokenKind::Word
            }
            b if b.is_ascii_digit() || (b == b'.' && next.is_some_and(|n| n.is_ascii_digit())) => {
                self.pos += 1;
                loop {
                    match self.peek(0) {
                        // A signed exponent (`3E-2`) is part of the number.
                        Some(b'e' | b'E')
                            if matches!(self.peek(1), Some(b'+' | b'-'))
                                && self.peek(2).is_some_and(|b| b.is_ascii_digit()) =>
                        {
                            self.pos += 3
                        }
                        Some(b) if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' => self.pos += 1,
                        _ => break,
                    }
                }
                TokenKind::Number
            }
            _ => {
                // One character; multi-byte UTF-8 sequences that are not
                // identifier starts cannot occur (bytes >= 0x80 start words).
                self.pos += 1;
                TokenKind::Other
            }
        };
        Some(Ok(Token {
            kind,
            span: start..self.pos,
        }))
    }
}

impl Iterator for Scanner<'_> {
    type Item = Result<Token, ScanError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let token = self.next_token();
        if matches!(token, Some(Err(_))) {
            self.failed = true;
        }
        token
    }
}

/// The statements of a text, as the server would split them: each span runs
/// from a statement's first token to its last (comments between statements
/// belong to no statement), and empty statements (`;;`) are left out.
pub fn split_statements(text: &str, options: ScanOptions) -> Result<Vec<Range<usize>>, ScanError> {
    let mut statements = Vec::new();
    let mut current: Option<Range<usize>> = None;
    for token in Scanner::new(text, options) {
        let token = token?;
        match token.kind {
            TokenKind::Semicolon => {
                if let Some(span) = current.take() {
                    statements.push(span);
                }
            }
            TokenKind::Comment => {}
            _ => match &mut current {
                Some(span) => span.end = token.span.end,
                None => current = Some(token.span),
            },
        }
    }
    if let Some(span) = current {
        statements.push(span);
    }
    Ok(statements)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> Vec<&str> {
        split_statements(text, ScanOptions::default())
            .unwrap()
            .into_iter()
            .map(|span| &text[span])
            .collect()
    }

    fn kinds(text: &str) -> Vec<TokenKind> {
        Scanner::new(text, ScanOptions::default())
            .map(|t| t.unwrap().kind)
            .collect()
    }

    #[test]
    fn splits_on_top_level_semicolons_only() {
        assert_eq!(split("SELECT 1; SELECT 2;"), vec!["SELECT 1", "SELECT 2"]);
        assert_eq!(split(";; SELECT 1 ;;"), vec!["SELECT 1"]);
        assert_eq!(split("SELECT ';'; SELECT \";\""), vec!["SELECT ';'", "SELECT \";\""]);
        assert_eq!(
            split("SELECT 1 -- ; not here\n; SELECT 2"),
            vec!["SELECT 1", "SELECT 2"]
        );
        assert!(split("  -- only a comment\n  /* and another */ ").is_empty());
    }

    #[test]
    fn standard_strings_treat_backslash_literally() {
        // With standard_conforming_strings on (the default), 'a\' ends the
        // string, so the server really runs the DROP.
        assert_eq!(
            split(r"SELECT 'a\'; DROP TABLE t; --'"),
            vec![r"SELECT 'a\'", "DROP TABLE t"]
        );
        // In an E'' string the backslash escapes the quote: one statement.
        assert_eq!(split(r"SELECT E'a\'; DROP TABLE t; --'").len(), 1);
        // With the setting off, a plain string escapes too.
        let off = ScanOptions {
            standard_conforming_strings: false,
        };
        let spans = split_statements(r"SELECT 'a\'; DROP TABLE t; --'", off).unwrap();
        assert_eq!(spans.len(), 1);
    }

    #[test]
    fn doubled_quotes_and_prefixes() {
        assert_eq!(split("SELECT 'it''s; fine'; SELECT 2").len(), 2);
        assert_eq!(split("SELECT U&'d\\0061t\\+000061'; SELECT 2").len(), 2);
        assert_eq!(split("SELECT B'1010', X'ff', N'x;y'").len(), 1);
        assert_eq!(split("SELECT \"a\"\"b;c\"").len(), 1);
        // An identifier ending in e followed by a string is not an E string.
        assert_eq!(kinds("xe'a'"), vec![TokenKind::Word, TokenKind::String]);
    }

    #[test]
    fn dollar_quotes_tags_and_params() {
        assert_eq!(split("SELECT $$a;b$$; SELECT $tag$ x $$ ; y $tag$").len(), 2);
        assert_eq!(kinds("$1 $tag$x$tag$"), vec![TokenKind::Param, TokenKind::DollarString]);
        // `$` inside an identifier does not open a dollar quote.
        assert_eq!(kinds("foo$bar$ ;"), vec![TokenKind::Word, TokenKind::Semicolon]);
        // Tags are case sensitive and the closing tag must match exactly.
        assert_eq!(split("SELECT $a$ $A$ ; $a$; SELECT 2").len(), 2);
        assert_eq!(
            split_statements("SELECT $a$ never closed", ScanOptions::default()),
            Err(ScanError::UnterminatedDollarQuote)
        );
    }

    #[test]
    fn nested_block_comments() {
        assert_eq!(
            split("SELECT 1 /* outer /* inner; */ still comment; */ ; SELECT 2"),
            vec!["SELECT 1", "SELECT 2"]
        );
        assert_eq!(
            split_statements("SELECT 1 /* /* */", ScanOptions::default()),
            Err(ScanError::UnterminatedComment)
        );
    }

    #[test]
    fn unterminated_quotes_are_errors() {
        assert_eq!(
            split_statements("SELECT 'abc", ScanOptions::default()),
            Err(ScanError::UnterminatedString)
        );
        assert_eq!(
            split_statements("SELECT \"abc", ScanOptions::default()),
            Err(ScanError::UnterminatedIdentifier)
        );
        assert_eq!(
            split_statements(r"SELECT E'abc\'", ScanOptions::default()),
            Err(ScanError::UnterminatedString)
        );
    }

    #[test]
    fn words_numbers_and_multibyte() {
        assert_eq!(
            kinds("SELECT 1.5e3, .5, café FROM t"),
            vec![
                TokenKind::Word,
                TokenKind::Number,
                TokenKind::Other,
                TokenKind::Number,
                TokenKind::Other,
                TokenKind::Word,
                TokenKind::Word,
                TokenKind::Word
            ]
        );
    }
}
