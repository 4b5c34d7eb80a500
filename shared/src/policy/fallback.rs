//! Statements sqlparser cannot parse, recognised by their keywords.
//!
//! Only forms whose meaning the keywords settle are recognised here (`TABLE
//! t`, `DO ...`, `CHECKPOINT`, `ALTER SYSTEM`...). Everything else stays
//! `unknown`, which policy never allows silently.

use std::ops::Range;

use super::class::{Access, Feature, Features, Kind, Relation, StatementClass};
use super::scan::{ScanOptions, Scanner, TokenKind};

/// A token as the fallback sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok<'a> {
    /// An unquoted word, upper-cased for matching, and as written.
    Word(String, &'a str),
    Quoted(&'a str),
    Str,
    Dollar(&'a str),
    Other(&'a str),
}

fn tokens(text: &str) -> Option<(Vec<Tok<'_>>, Vec<Range<usize>>)> {
    let mut out = Vec::new();
    let mut spans = Vec::new();
    for token in Scanner::new(text, ScanOptions::default()) {
        let token = token.ok()?;
        let raw = &text[token.span.clone()];
        out.push(match token.kind {
            TokenKind::Word => Tok::Word(raw.to_ascii_uppercase(), raw),
            TokenKind::QuotedIdent => Tok::Quoted(raw),
            TokenKind::String => Tok::Str,
            TokenKind::DollarString => Tok::Dollar(raw),
            TokenKind::Comment => continue,
            _ => Tok::Other(raw),
        });
        spans.push(token.span);
    }
    Some((out, spans))
}

fn is_word(token: Option<&Tok<'_>>, word: &str) -> bool {
    matches!(token, Some(Tok::Word(w, _)) if w == word)
}

/// Whether code mentions EXECUTE as a word (dynamic SQL in PL/pgSQL). Looks
/// everywhere, strings and comments included: a false alarm only makes the
/// decision stricter.
pub fn mentions_execute(code: &str) -> bool {
    let bytes = code.as_bytes();
    let word_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
    let lower = code.to_ascii_lowercase();
    let mut from = 0;
    while let Some(found) = lower[from..].find("execute") {
        let start = from + found;
        let end = start + "execute".len();
        let before = start == 0 || !word_char(bytes[start - 1]);
        let after = end >= bytes.len() || !word_char(bytes[end]);
        if before && after {
            return true;
        }
        from = end;
    }
    false
}

fn class(kind: Kind, command: &str, opaque: bool) -> StatementClass {
    StatementClass {
        kind,
        relations: Vec::new(),
        features: Features::default(),
        opaque,
        note: Some("recognised by its keywords (the parser does not support this statement)".into()),
        command: command.into(),
        prepared: None,
    }
}

/// Reads `[schema.]name` from tokens, folding unquoted parts.
fn qualified_name(tokens: &[Tok<'_>]) -> Option<(Option<String>, String, usize)> {
    let part = |token: &Tok<'_>| match token {
        Tok::Word(_, raw) => Some(raw.to_ascii_lowercase()),
        Tok::Quoted(raw) => Some(raw[1..raw.len() - 1].replace("\"\"", "\"")),
        _ => None,
    };
    let first = part(tokens.first()?)?;
    if matches!(tokens.get(1), Some(Tok::Other("."))) {
        let second = part(tokens.get(2)?)?;
        return Some((Some(first), second, 3));
    }
    Some((None, first, 1))
}

/// Classifies what the parser rejected, or `None` if this is not a form
/// recognised here.
pub fn classify(text: &str) -> Option<StatementClass> {
    let (tokens, spans) = tokens(text)?;
    // Only ever one statement: the splitter cut at semicolons already, and a
    // fallback must not recognise a prefix of something longer.
    if tokens.contains(&Tok::Other(";")) {
        return None;
    }
    let first = match tokens.first()? {
        Tok::Word(word, _) => word.as_str(),
        _ => return None,
    };
    let second = tokens.get(1);
    match first {
        // TABLE [ONLY] name [*]: exactly that and nothing more.
        "TABLE" => {
            let mut rest = &tokens[1..];
            if is_word(rest.first(), "ONLY") && rest.len() > 1 {
                rest = &rest[1..];
            }
            let (schema, name, used) = qualified_name(rest)?;
            let rest = &rest[used..];
            if !(rest.is_empty() || rest == [Tok::Other("*")]) {
                return None;
            }
            let mut class = class(Kind::Read, "TABLE", false);
            class.relations.push(Relation {
                schema,
                name,
                access: Access::Read,
            });
            Some(class)
        }
        "DO" => {
            let mut class = class(Kind::Procedural, "DO", true);
            if mentions_execute(text) {
                class.features.insert(Feature::DynamicSql);
            }
            Some(class)
        }
        "CREATE" => {
            let mut rest = &tokens[1..];
            if is_word(rest.first(), "OR") && is_word(rest.get(1), "REPLACE") {
                rest = &rest[2..];
            }
            match rest.first() {
                Some(Tok::Word(w, _)) if w == "FUNCTION" || w == "PROCEDURE" => {
                    let mut class = class(Kind::Procedural, &format!("CREATE {w}"), true);
                    if mentions_execute(text) {
                        class.features.insert(Feature::DynamicSql);
                    }
                    Some(class)
                }
                Some(Tok::Word(w, _)) if w == "RULE" => Some(class(Kind::Ddl, "CREATE RULE", true)),
                _ => None,
            }
        }
        "CHECKPOINT" if tokens.len() == 1 => Some(class(Kind::Admin, "CHECKPOINT", false)),
        "ALTER" if is_word(second, "SYSTEM") => {
            let mut class = class(Kind::Admin, "ALTER SYSTEM", false);
            class.features.insert(Feature::SystemConfig);
            Some(class)
        }
        "ALTER" if is_word(second, "DEFAULT") && is_word(tokens.get(2), "PRIVILEGES") => {
            let mut class = class(Kind::Dcl, "ALTER DEFAULT PRIVILEGES", false);
            class.features.insert(Feature::Grant);
            Some(class)
        }
        "SECURITY" if is_word(second, "LABEL") => Some(class(Kind::Dcl, "SECURITY LABEL", false)),
        "IMPORT" if is_word(second, "FOREIGN") => {
            let mut class = class(Kind::Ddl, "IMPORT FOREIGN SCHEMA", true);
            class.features.insert(Feature::ForeignData);
            Some(class)
        }
        "LOAD" => {
            let mut class = class(Kind::Admin, "LOAD", false);
            class.features.insert(Feature::Extension);
            Some(class)
        }
        "CLUSTER" | "REINDEX" | "VACUUM" | "ANALYZE" | "ANALYSE" => Some(class(Kind::Utility, first, false)),
        "REFRESH" if is_word(second, "MATERIALIZED") && is_word(tokens.get(2), "VIEW") => {
            let mut rest = &tokens[3..];
            if is_word(rest.first(), "CONCURRENTLY") {
                rest = &rest[1..];
            }
            let (schema, name, _) = qualified_name(rest)?;
            let mut class = class(Kind::Utility, "REFRESH MATERIALIZED VIEW", false);
            class.relations.push(Relation {
                schema,
                name,
                access: Access::Ddl,
            });
            Some(class)
        }
        "MOVE" => Some(class(Kind::Read, "MOVE", false)),
        "COPY" => copy(text, &tokens, &spans),
        "PREPARE" if is_word(second, "TRANSACTION") => Some(class(Kind::Transaction, "PREPARE TRANSACTION", false)),
        "COMMIT" | "ROLLBACK" if is_word(second, "PREPARED") => {
            Some(class(Kind::Transaction, &format!("{first} PREPARED"), false))
        }
        _ => None,
    }
}

/// `COPY table [(columns)] FROM|TO target ...` and `COPY (query) TO target
/// ...`, whatever options follow (sqlparser rejects some, such as
/// `(freeze on)`, which pgbench sends).
fn copy(text: &str, tokens: &[Tok<'_>], spans: &[Range<usize>]) -> Option<StatementClass> {
    let mut at = 1;
    let mut source = None;
    let mut query = None;
    if tokens.get(at) == Some(&Tok::Other("(")) {
        // A query: up to the matching parenthesis.
        let mut depth = 0usize;
        let start = at;
        loop {
            match tokens.get(at)? {
                Tok::Other("(") => depth += 1,
                Tok::Other(")") => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            at += 1;
        }
        let inner = &text[spans[start].end..spans[at].start];
        query = Some(super::classify::classify(
            inner,
            &super::classify::ClassifyOptions::default(),
        ));
        at += 1;
    } else {
        let (schema, name, used) = qualified_name(&tokens[at..])?;
        source = Some((schema, name));
        at += used;
        if tokens.get(at) == Some(&Tok::Other("(")) {
            while tokens.get(at)? != &Tok::Other(")") {
                at += 1;
            }
            at += 1;
        }
    }
    let to = match tokens.get(at) {
        Some(Tok::Word(w, _)) if w == "TO" => true,
        Some(Tok::Word(w, _)) if w == "FROM" => false,
        _ => return None,
    };
    let mut features = Features::default();
    match tokens.get(at + 1) {
        Some(Tok::Word(w, _)) if w == "STDIN" || w == "STDOUT" => {}
        Some(Tok::Word(w, _)) if w == "PROGRAM" => features.insert(Feature::CopyProgram),
        Some(Tok::Str) => features.insert(Feature::CopyFile),
        _ => return None,
    }
    let mut class = class(if to { Kind::CopyOut } else { Kind::CopyIn }, "COPY", false);
    class.features = features;
    if let Some((schema, name)) = source {
        class.relations.push(Relation {
            schema,
            name,
            access: if to { Access::Read } else { Access::Write },
        });
    }
    if let Some(query) = query {
        let [inner] = query.statements.as_slice() else {
            return None;
        };
        if !to || matches!(inner.kind, Kind::Unknown) {
            return None;
        }
        // COPY (DELETE ... RETURNING *) TO STDOUT writes.
        if inner.kind == Kind::Write {
            class.kind = Kind::Write;
        }
        class.relations.extend(inner.relations.iter().cloned());
        class.features = class.features.union(inner.features);
        class.opaque = inner.opaque;
    }
    Some(class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_statement() {
        let class = classify("TABLE ONLY public.\"Orders\" *").unwrap();
        assert_eq!(class.kind, Kind::Read);
        assert_eq!(class.relations[0].schema.as_deref(), Some("public"));
        assert_eq!(class.relations[0].name, "Orders");
        assert!(classify("TABLE t; DROP TABLE x").is_none());
        assert!(classify("TABLE t WHERE x").is_none());
    }

    #[test]
    fn do_blocks_and_dynamic_sql() {
        let class = classify("DO $$ BEGIN EXECUTE 'DROP TABLE t'; END $$").unwrap();
        assert_eq!(class.kind, Kind::Procedural);
        assert!(class.opaque);
        assert!(class.features.contains(Feature::DynamicSql));
        let class = classify("DO $$ BEGIN PERFORM executed_total(); END $$").unwrap();
        assert!(!class.features.contains(Feature::DynamicSql));
    }

    #[test]
    fn copy_with_options_the_parser_rejects() {
        let class = classify("copy pgbench_accounts from stdin with (freeze on)").unwrap();
        assert_eq!(class.kind, Kind::CopyIn);
        assert_eq!(class.relations[0].name, "pgbench_accounts");
        assert_eq!(class.relations[0].access, Access::Write);
        let class = classify("COPY (SELECT * FROM secret WHERE a = ')') TO PROGRAM 'x' WITH (freeze on)").unwrap();
        assert!(class.features.contains(Feature::CopyProgram));
        assert_eq!(class.relations[0].name, "secret");
        let class = classify("COPY (DELETE FROM t WHERE id = 1 RETURNING *) TO STDOUT WITH (freeze on)").unwrap();
        assert_eq!(class.kind, Kind::Write);
        assert!(classify("COPY t FROM STDIN; DROP TABLE t").is_none());
    }

    #[test]
    fn only_known_forms() {
        assert_eq!(classify("ALTER SYSTEM SET work_mem = '1GB'").unwrap().kind, Kind::Admin);
        assert_eq!(classify("CHECKPOINT").unwrap().kind, Kind::Admin);
        assert!(classify("CHECKPOINT now").is_none());
        assert!(classify("FROBNICATE everything").is_none());
        assert!(mentions_execute("x; EXECUTE y"));
        assert!(!mentions_execute("executes execute_me"));
    }
}
