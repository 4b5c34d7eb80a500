//! Statements sqlparser cannot parse, recognised by their keywords.
//!
//! Only forms whose meaning the keywords settle are recognised here (`TABLE
//! t`, `DO ...`, `CHECKPOINT`, `ALTER SYSTEM`...). Everything else stays
//! `unknown`, which policy never allows silently.

use std::ops::Range;

use super::class::{Access, Feature, Features, Kind, Relation, StatementClass, WrittenValues};
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
    const WORD: &[u8] = b"execute";
    let bytes = code.as_bytes();
    let word_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
    bytes.windows(WORD.len()).enumerate().any(|(start, window)| {
        window.eq_ignore_ascii_case(WORD)
            && (start == 0 || !word_char(bytes[start - 1]))
            && bytes.get(start + WORD.len()).is_none_or(|&b| !word_char(b))
    })
}

/// Whether `sql` has EXECUTE as a keyword that may run a prepared
/// statement: outside string constants and comments (as the server reads
/// them, with its `standard_conforming_strings`), and not as the privilege
/// in `GRANT EXECUTE ON` (ON is reserved: no statement is named by it).
/// Text the scanner cannot read counts.
pub fn executes_keyword(sql: &str, standard_conforming_strings: bool) -> bool {
    let options = ScanOptions {
        standard_conforming_strings,
    };
    let mut after_execute = false;
    for token in Scanner::new(sql, options) {
        let Ok(token) = token else {
            return true;
        };
        match token.kind {
            TokenKind::Comment => {}
            TokenKind::Word => {
                let word = &sql[token.span.clone()];
                if after_execute && !word.eq_ignore_ascii_case("on") {
                    return true;
                }
                after_execute = word.eq_ignore_ascii_case("execute");
            }
            _ if after_execute => return true,
            _ => {}
        }
    }
    after_execute
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
        functions: Vec::new(),
        // What an unparsed write stores cannot be followed.
        written: WrittenValues {
            assignments: Vec::new(),
            opaque: kind == Kind::Write || opaque,
        },
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
                Some(Tok::Word(w, _))
                    if w == "SERVER" || w == "FOREIGN" || (w == "USER" && is_word(rest.get(1), "MAPPING")) =>
                {
                    let mut class = class(Kind::Ddl, &format!("CREATE {w}"), true);
                    class.features.insert(Feature::ForeignData);
                    Some(class)
                }
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
        "CLUSTER" | "REINDEX" | "VACUUM" | "ANALYZE" | "ANALYSE" => maintenance(first, &tokens[1..]),
        "SET" => set(&tokens[1..]),
        "ALTER" if is_word(second, "EXTENSION") => {
            let mut class = class(Kind::Ddl, "ALTER EXTENSION", false);
            class.features.insert(Feature::Alter);
            class.features.insert(Feature::Extension);
            Some(class)
        }
        // Role membership and other forms the parser rejects: what they
        // grant on is not read here, so they may touch anything.
        "GRANT" | "REVOKE" => {
            let mut class = class(Kind::Dcl, first, true);
            class.features.insert(Feature::Grant);
            Some(class)
        }
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
        // Forms the parser does not read (`FETCH c`, `FETCH NEXT c`).
        "FETCH" => Some(class(Kind::Read, "FETCH", false)),
        "COPY" => copy(text, &tokens, &spans),
        "PREPARE" if is_word(second, "TRANSACTION") => Some(class(Kind::Transaction, "PREPARE TRANSACTION", false)),
        "COMMIT" | "ROLLBACK" if is_word(second, "PREPARED") => {
            Some(class(Kind::Transaction, &format!("{first} PREPARED"), false))
        }
        _ => None,
    }
}

/// A comma-separated list of `[schema.]name [(columns)]` filling all of
/// `tokens`, or `None` if anything else is there.
fn relation_list(tokens: &[Tok<'_>], access: Access) -> Option<Vec<Relation>> {
    let mut relations = Vec::new();
    let mut at = 0;
    while at < tokens.len() {
        let (schema, name, used) = qualified_name(&tokens[at..])?;
        relations.push(Relation { schema, name, access });
        at += used;
        if tokens.get(at) == Some(&Tok::Other("(")) {
            while tokens.get(at)? != &Tok::Other(")") {
                at += 1;
            }
            at += 1;
        }
        match tokens.get(at) {
            None => break,
            Some(Tok::Other(",")) if at + 1 < tokens.len() => at += 1,
            Some(_) => return None,
        }
    }
    Some(relations)
}

/// Skips a parenthesised option list, if there is one.
fn skip_options<'t, 'a>(tokens: &'t [Tok<'a>]) -> Option<&'t [Tok<'a>]> {
    if tokens.first() != Some(&Tok::Other("(")) {
        return Some(tokens);
    }
    let close = tokens.iter().position(|t| t == &Tok::Other(")"))?;
    Some(&tokens[close + 1..])
}

/// VACUUM, ANALYZE, CLUSTER and REINDEX with the tables they maintain. A
/// form whose tables are not read here (a whole database or schema, an
/// index) may touch any table, so it is opaque.
fn maintenance(command: &str, tokens: &[Tok<'_>]) -> Option<StatementClass> {
    let mut rest = skip_options(tokens)?;
    let words: &[&str] = match command {
        "VACUUM" => &["FULL", "FREEZE", "VERBOSE", "ANALYZE", "ANALYSE"],
        "ANALYZE" | "ANALYSE" => &["VERBOSE"],
        "CLUSTER" => &["VERBOSE"],
        _ => &[],
    };
    while let Some(Tok::Word(w, _)) = rest.first() {
        if !words.contains(&w.as_str()) {
            break;
        }
        rest = &rest[1..];
    }
    let mut class = class(Kind::Utility, command, false);
    let relations = match command {
        "REINDEX" => {
            let what = match rest.first() {
                Some(Tok::Word(w, _)) => w.clone(),
                _ => return None,
            };
            rest = &rest[1..];
            if is_word(rest.first(), "CONCURRENTLY") {
                rest = &rest[1..];
            }
            match what.as_str() {
                "TABLE" => relation_list(rest, Access::Ddl).filter(|r| r.len() == 1)?,
                "INDEX" | "SCHEMA" | "DATABASE" | "SYSTEM" => Vec::new(),
                _ => return None,
            }
        }
        "CLUSTER" => {
            // CLUSTER table [USING index]
            let using = rest.iter().position(|t| is_word(Some(t), "USING"));
            let (table, index) = match using {
                Some(at) => (&rest[..at], &rest[at + 1..]),
                None => (rest, &rest[rest.len()..]),
            };
            if using.is_some() && relation_list(index, Access::Ddl).is_none_or(|r| r.len() != 1) {
                return None;
            }
            let relations = relation_list(table, Access::Ddl)?;
            if relations.len() > 1 {
                return None;
            }
            relations
        }
        _ => relation_list(rest, Access::Ddl)?,
    };
    class.opaque = relations.is_empty();
    class.relations = relations;
    Some(class)
}

/// `SET [SESSION | LOCAL] ...` forms the parser rejects (`SET ROLE TO
/// 'name'`): what is being set decides the features, whatever the value.
fn set(tokens: &[Tok<'_>]) -> Option<StatementClass> {
    let mut rest = tokens;
    if matches!(rest.first(), Some(Tok::Word(w, _)) if w == "SESSION" || w == "LOCAL")
        && !is_word(rest.get(1), "AUTHORIZATION")
    {
        rest = &rest[1..];
    }
    let mut class = class(Kind::Session, "SET", false);
    let name = match rest.first()? {
        Tok::Word(w, _) if w == "SESSION" && is_word(rest.get(1), "AUTHORIZATION") => {
            class.features.insert(Feature::SessionAuthorization);
            return Some(class);
        }
        Tok::Word(w, _) if w == "ROLE" => "role".to_string(),
        Tok::Word(_, raw) => raw.to_ascii_lowercase(),
        // Setting names are case-insensitive, quoted or not.
        Tok::Quoted(raw) => raw[1..raw.len() - 1].to_ascii_lowercase(),
        _ => return None,
    };
    match name.as_str() {
        "role" => class.features.insert(Feature::SetRole),
        "session_authorization" => class.features.insert(Feature::SessionAuthorization),
        "search_path" => class.features.insert(Feature::SearchPath),
        // Whatever the value: the parser could not read it, so assume off.
        "standard_conforming_strings" => class.features.insert(Feature::NonstandardStrings),
        _ => {}
    }
    Some(class)
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
    fn maintenance_keeps_its_tables() {
        let names = |sql: &str| {
            let class = classify(sql).unwrap();
            (
                class.relations.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                class.opaque,
            )
        };
        assert_eq!(
            names("VACUUM (VERBOSE, ANALYZE) api_keys"),
            (vec!["api_keys (ddl)".into()], false)
        );
        assert_eq!(
            names("vacuum full analyze a, s.b (x, y)"),
            (vec!["a (ddl)".into(), "s.b (ddl)".into()], false)
        );
        assert_eq!(
            names("CLUSTER api_keys USING api_keys_pkey"),
            (vec!["api_keys (ddl)".into()], false)
        );
        assert_eq!(
            names("REINDEX TABLE CONCURRENTLY \"Keys\""),
            (vec!["Keys (ddl)".into()], false)
        );
        // No table named: any table.
        assert_eq!(names("VACUUM"), (vec![], true));
        assert_eq!(names("REINDEX INDEX api_keys_pkey"), (vec![], true));
        assert!(classify("VACUUM a b").is_none());
        assert!(classify("REINDEX TABLE a, b").is_none());
    }

    #[test]
    fn set_forms_the_parser_rejects() {
        let class = classify("set role to 'postgres'").unwrap();
        assert!(class.features.contains(Feature::SetRole));
        let class = classify("SET LOCAL \"Role\" TO 'postgres'").unwrap();
        assert!(class.features.contains(Feature::SetRole));
        let class = classify("SET SESSION AUTHORIZATION 'x' 'y'").unwrap();
        assert!(class.features.contains(Feature::SessionAuthorization));
    }

    #[test]
    fn only_known_forms() {
        assert_eq!(classify("ALTER SYSTEM SET work_mem = '1GB'").unwrap().kind, Kind::Admin);
        assert_eq!(classify("CHECKPOINT").unwrap().kind, Kind::Admin);
        assert!(classify("CHECKPOINT now").is_none());
        assert!(classify("FROBNICATE everything").is_none());
        assert!(mentions_execute("x; EXECUTE y"));
        assert!(!mentions_execute("executes execute_me"));
        assert!(mentions_execute("EXPLAIN ANALYZE/**/eXeCuTe p1"));
        assert!(mentions_execute("CREATE TABLE c AS EXECUTE"));
        assert!(!mentions_execute("SELECT 1 AS executed_at, préexecute"));
        for sql in [
            "EXPLAIN ANALYZE EXECUTE p1",
            "explain (analyze) /* x */ execute\"P\"",
            "SELECT 'a' EXECUTE",
            "SELECT 'unterminated EXECUTE",
        ] {
            assert!(executes_keyword(sql, true), "{sql}");
        }
        for sql in [
            "SELECT 'execute p1' -- EXECUTE p1",
            "GRANT EXECUTE ON FUNCTION f() TO r",
            "SELECT $$EXECUTE p1$$",
        ] {
            assert!(!executes_keyword(sql, true), "{sql}");
        }
        // Read as the server reads it: without standard strings the
        // backslash escapes the quote, and the EXECUTE is in the string.
        let sql = "SELECT 'a\\' EXECUTE p1 '";
        assert!(executes_keyword(sql, true));
        assert!(!executes_keyword(sql, false));
    }
}
