//! The classifier: statement text in, [`Classification`] out. Pure: no IO,
//! no clock, no configuration beyond [`ClassifyOptions`].
//!
//! 1. The text is split into statements by [`scan`](super::scan), which
//!    follows PostgreSQL's lexer.
//! 2. Each statement, with its comments blanked out, is tokenized by
//!    sqlparser; the two lexers must agree on the sequence of words, quoted
//!    identifiers, strings and parameters, or the statement is `unknown`.
//! 3. sqlparser parses the tokens (with a recursion limit) into exactly one
//!    statement, which [`Walker`] turns into a kind, relations and features.
//! 4. What sqlparser cannot parse goes to [`fallback`](super::fallback), which
//!    recognises a few forms by their keywords; anything else is `unknown`.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    self, CopySource, CopyTarget, Expr, FromTable, FunctionArg, FunctionArgExpr, FunctionArguments, GrantObjects,
    ObjectName, ObjectNamePart, ObjectType, Query, SetExpr, Statement, TableFactor, TableObject, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use super::class::{
    Access, Assigned, Classification, Feature, Features, Kind, PreparedRef, Relation, StatementClass, WrittenValues,
};
use super::fallback;
use super::scan::{self, ScanOptions, Scanner, TokenKind};

/// Limits that keep the classifier safe from hostile input.
#[derive(Debug, Clone, Copy)]
pub struct ClassifyOptions {
    /// Statements longer than this (in bytes) are `unknown` without parsing.
    pub max_statement_length: usize,
    /// Nesting depth at which sqlparser gives up (parse bombs).
    pub recursion_limit: usize,
    /// The session's `standard_conforming_strings`; off makes everything
    /// `unknown`, since sqlparser reads strings the standard way only.
    pub standard_conforming_strings: bool,
}

impl Default for ClassifyOptions {
    fn default() -> ClassifyOptions {
        ClassifyOptions {
            max_statement_length: 1 << 20,
            recursion_limit: 50,
            standard_conforming_strings: true,
        }
    }
}

/// Classifies a Query or Parse text.
pub fn classify(sql: &str, options: &ClassifyOptions) -> Classification {
    classify_text(sql, options)
}

thread_local! {
    /// Set while a text is classified when its class depends on more than
    /// its shape (see [`classify_with_shape`]).
    static SHAPE_SENSITIVE: Cell<bool> = const { Cell::new(false) };
}

/// Notes that the class being built depends on a number's value, or on a
/// reading (fallback scanner, error message) that sees the whole text.
fn shape_sensitive() {
    SHAPE_SENSITIVE.set(true);
}

/// Classifies a text and says whether the class also holds for every text
/// of the same shape ([`shape_key`]): texts that differ from it only in the
/// values of plain numbers. That holds unless the classifier read a
/// number's value (a constant WHERE such as `1 = 1`, an `ANALYZE 0` option,
/// a setting's value), or fell back to reading the text itself, or could not
/// classify (unknown and opaque statements are never shared).
pub fn classify_with_shape(sql: &str, options: &ClassifyOptions) -> (Classification, bool) {
    SHAPE_SENSITIVE.set(false);
    let classification = classify_text(sql, options);
    let shareable = !SHAPE_SENSITIVE.replace(false)
        && classification
            .statements
            .iter()
            .all(|s| s.kind != Kind::Unknown && !s.opaque);
    (classification, shareable)
}

/// The cache key shared by texts that differ only in plain numbers: the text
/// with each such number replaced by a NUL character (which no statement
/// text contains). `None` when the text has no plain number, or contains a
/// NUL itself.
///
/// A plain number is digits with an optional fraction and exponent
/// (`42`, `1.5`, `2e10`) with no identifier character or `.` on either side,
/// so that no lexer can read it, or what surrounds it, another way.
pub fn shape_key(sql: &str) -> Option<String> {
    let bytes = sql.as_bytes();
    if bytes.contains(&0) {
        return None;
    }
    let mut key: Option<String> = None;
    let mut copied = 0;
    for token in Scanner::new(sql, ScanOptions::default()) {
        let Ok(token) = token else { return None };
        if token.kind != TokenKind::Number || !plain_number(bytes, token.span.clone()) {
            continue;
        }
        let key = key.get_or_insert_with(|| String::with_capacity(sql.len()));
        key.push_str(&sql[copied..token.span.start]);
        key.push('\0');
        copied = token.span.end;
    }
    let mut key = key?;
    key.push_str(&sql[copied..]);
    Some(key)
}

fn plain_number(bytes: &[u8], span: std::ops::Range<usize>) -> bool {
    let joins = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'.') || b >= 0x80;
    if span.start > 0 && joins(bytes[span.start - 1]) {
        return false;
    }
    if bytes.get(span.end).is_some_and(|&b| joins(b)) {
        return false;
    }
    let number = &bytes[span];
    let digits = |s: &[u8]| -> usize { s.iter().take_while(|b| b.is_ascii_digit()).count() };
    let mut at = digits(number);
    if at == 0 {
        return false;
    }
    if number.get(at) == Some(&b'.') {
        let fraction = digits(&number[at + 1..]);
        if fraction == 0 {
            return false;
        }
        at += 1 + fraction;
    }
    if matches!(number.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(number.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        let exponent = digits(&number[at..]);
        if exponent == 0 {
            return false;
        }
        at += exponent;
    }
    at == number.len()
}

fn classify_text(sql: &str, options: &ClassifyOptions) -> Classification {
    if sql.len() > options.max_statement_length {
        return single_unknown(format!(
            "the statement is {} bytes long, over the classifier's limit of {} bytes",
            sql.len(),
            options.max_statement_length
        ));
    }
    if !options.standard_conforming_strings {
        return single_unknown(
            "standard_conforming_strings is off in this session, so string constants cannot be read reliably",
        );
    }
    let scan_options = ScanOptions {
        standard_conforming_strings: true,
    };
    let spans = match scan::split_statements(sql, scan_options) {
        Ok(spans) => spans,
        Err(err) => return single_unknown(format!("the text cannot be read: {err}")),
    };
    let statements = spans
        .into_iter()
        .map(|span| classify_one(&sql[span], options))
        .collect();
    Classification { statements }
}

fn single_unknown(reason: impl Into<String>) -> Classification {
    Classification {
        statements: vec![StatementClass::unknown(reason)],
    }
}

/// The text with every comment replaced by spaces (same length), so that no
/// difference in how two lexers end a comment can change what they read.
/// Borrowed when there is no comment, which is the common case.
fn blank_comments(text: &str) -> Cow<'_, str> {
    let mut bytes: Option<Vec<u8>> = None;
    for token in Scanner::new(text, ScanOptions::default()).flatten() {
        if token.kind == TokenKind::Comment {
            bytes.get_or_insert_with(|| text.as_bytes().to_vec())[token.span].fill(b' ');
        }
    }
    match bytes {
        // Only whole comments were replaced, by ASCII spaces: still UTF-8.
        Some(bytes) => Cow::Owned(String::from_utf8(bytes).unwrap_or_default()),
        None => Cow::Borrowed(text),
    }
}

/// The parts of a token stream both lexers must agree on, borrowed from
/// either lexer's output.
#[derive(Debug, Clone, Copy)]
enum Sig<'a> {
    /// An unquoted word, as written.
    Word(&'a str),
    /// A quoted identifier's value, already unescaped (the parser's).
    Quoted(&'a str),
    /// A quoted identifier between its quotes, `""` still doubled (ours).
    QuotedRaw(&'a str),
    Str,
    Dollar,
    Param,
}

impl Sig<'_> {
    fn agrees(self, other: Sig<'_>) -> bool {
        match (self, other) {
            (Sig::Word(a), Sig::Word(b)) => a.eq_ignore_ascii_case(b),
            (Sig::QuotedRaw(raw), Sig::Quoted(value)) | (Sig::Quoted(value), Sig::QuotedRaw(raw)) => {
                unescaped_eq(raw, value)
            }
            (Sig::Str, Sig::Str) | (Sig::Dollar, Sig::Dollar) | (Sig::Param, Sig::Param) => true,
            _ => false,
        }
    }
}

/// Whether `raw` with each `""` read as `"` equals `value`.
fn unescaped_eq(raw: &str, value: &str) -> bool {
    let mut raw = raw.bytes();
    let mut value = value.bytes();
    loop {
        match (raw.next(), value.next()) {
            (None, None) => return true,
            (Some(b'"'), Some(b'"')) => {
                if raw.next() != Some(b'"') {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

fn our_signature(text: &str) -> impl Iterator<Item = Sig<'_>> {
    Scanner::new(text, ScanOptions::default())
        .flatten()
        .filter_map(move |token| {
            let raw = &text[token.span];
            match token.kind {
                TokenKind::Word => Some(Sig::Word(raw)),
                TokenKind::QuotedIdent => {
                    let inner = raw.trim_start_matches("U&").trim_start_matches("u&");
                    Some(Sig::QuotedRaw(&inner[1..inner.len() - 1]))
                }
                TokenKind::String => Some(Sig::Str),
                TokenKind::DollarString => Some(Sig::Dollar),
                TokenKind::Param => Some(Sig::Param),
                _ => None,
            }
        })
}

fn parser_signature(tokens: &[TokenWithSpan]) -> impl Iterator<Item = Sig<'_>> {
    tokens.iter().filter_map(|token| match &token.token {
        Token::Word(word) => match word.quote_style {
            None => Some(Sig::Word(&word.value)),
            Some('"') => Some(Sig::Quoted(&word.value)),
            Some(_) => Some(Sig::Str),
        },
        Token::SingleQuotedString(_)
        | Token::DoubleQuotedString(_)
        | Token::EscapedStringLiteral(_)
        | Token::NationalStringLiteral(_)
        | Token::HexStringLiteral(_)
        | Token::UnicodeStringLiteral(_)
        | Token::SingleQuotedByteStringLiteral(_)
        | Token::DoubleQuotedByteStringLiteral(_)
        | Token::TripleSingleQuotedString(_)
        | Token::TripleDoubleQuotedString(_)
        | Token::SingleQuotedRawStringLiteral(_)
        | Token::DoubleQuotedRawStringLiteral(_) => Some(Sig::Str),
        Token::DollarQuotedString(_) => Some(Sig::Dollar),
        Token::Placeholder(p) if p.starts_with('$') => Some(Sig::Param),
        _ => None,
    })
}

/// Whether both lexers read the same words, identifiers, strings and
/// parameters in the same order.
fn signatures_agree(tokens: &[TokenWithSpan], text: &str) -> bool {
    let mut ours = our_signature(text);
    let mut theirs = parser_signature(tokens);
    loop {
        match (ours.next(), theirs.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.agrees(b) => {}
            _ => return false,
        }
    }
}

/// The fallback scanner's class of a text, or `otherwise`. Either reads the
/// text itself, so the class is never shared with texts of the same shape.
fn fallback_or(text: &str, otherwise: impl FnOnce() -> StatementClass) -> StatementClass {
    shape_sensitive();
    fallback::classify(text).unwrap_or_else(otherwise)
}

fn classify_one(text: &str, options: &ClassifyOptions) -> StatementClass {
    let text = blank_comments(text);
    let dialect = PostgreSqlDialect {};
    let tokens = match Tokenizer::new(&dialect, &text).tokenize_with_location() {
        Ok(tokens) => tokens,
        Err(err) => return fallback_or(&text, || StatementClass::unknown(err.to_string())),
    };
    if !signatures_agree(&tokens, &text) {
        return StatementClass::unknown(
            "the statement's quoting is read differently by PostgreSQL's rules and by the parser",
        );
    }
    let parsed = Parser::new(&dialect)
        .with_recursion_limit(options.recursion_limit)
        .with_tokens_with_locations(tokens)
        .parse_statements();
    match parsed {
        Ok(statements) if statements.len() == 1 => {
            let class = Walker::classify(&statements[0]);
            if class.kind != Kind::Unknown {
                return class;
            }
            // sqlparser read it as something this classifier does not know
            // (often another dialect's statement of the same name, such as
            // Hive's LOAD): the keywords may still settle it.
            fallback_or(&text, || {
                let command = class.command.clone();
                StatementClass {
                    note: Some(format!("the gateway does not classify {command} statements")),
                    ..class
                }
            })
        }
        Ok(statements) => StatementClass::unknown(format!(
            "the parser found {} statements where PostgreSQL finds one",
            statements.len()
        )),
        Err(err) => fallback_or(&text, || StatementClass::unknown(err.to_string())),
    }
}

/// A name as PostgreSQL resolves it: unquoted parts fold to lower case.
fn ident(ident: &ast::Ident) -> String {
    match ident.quote_style {
        None => ident.value.to_ascii_lowercase(),
        Some(_) => ident.value.clone(),
    }
}

/// `[catalog.][schema.]name` as (schema, name); `None` for anything else.
fn split_name(name: &ObjectName) -> Option<(Option<String>, String)> {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|part| match part {
            ObjectNamePart::Identifier(id) => Some(ident(id)),
            ObjectNamePart::Function(_) => None,
        })
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [name] => Some((None, name.clone())),
        [schema, name] | [_, schema, name] => Some((Some(schema.clone()), name.clone())),
        _ => None,
    }
}

/// The last part of a function's name, lower-cased.
fn function_base_name(name: &ObjectName) -> String {
    name.0
        .last()
        .and_then(|part| match part {
            ObjectNamePart::Identifier(id) => Some(ident(id)),
            ObjectNamePart::Function(_) => None,
        })
        .unwrap_or_default()
}

/// A setting's name as PostgreSQL looks it up: every part, case-insensitive
/// whether quoted or not (`SET "ROLE"` is `SET role`).
fn setting_name(name: &ObjectName) -> String {
    let mut out = String::new();
    for part in &name.0 {
        if !out.is_empty() {
            out.push('.');
        }
        match part {
            ObjectNamePart::Identifier(id) => out.push_str(&id.value.to_ascii_lowercase()),
            ObjectNamePart::Function(_) => out.push('?'),
        }
    }
    out
}

/// Whether an EXPLAIN executes its statement: `ANALYZE`, or the option
/// `(ANALYZE [true|on|1|...])` in the parenthesised list.
fn explain_executes(analyze: bool, options: &Option<Vec<ast::UtilityOption>>) -> bool {
    analyze
        || options.iter().flatten().any(|option| {
            option.name.value.eq_ignore_ascii_case("analyze")
                && option.arg.as_ref().is_none_or(|arg| !option_is_false(arg))
        })
}

/// A boolean option argument that is false (`false`, `off`, `0`, `no`).
fn option_is_false(arg: &Expr) -> bool {
    let word = match arg {
        Expr::Value(value) => match &value.value {
            Value::Boolean(b) => return !b,
            Value::Number(n, _) => {
                shape_sensitive();
                return n.parse::<f64>().is_ok_and(|n| n == 0.0);
            }
            Value::SingleQuotedString(s) => s.to_ascii_lowercase(),
            _ => return false,
        },
        Expr::Identifier(id) => id.value.to_ascii_lowercase(),
        _ => return false,
    };
    matches!(word.as_str(), "false" | "off" | "no" | "0" | "f" | "n" | "of")
}

/// Whether a table factor is sqlparser's reading of `ONLY name`: a table
/// named ONLY (unquoted) with an alias.
fn only_table(name: &ObjectName, alias: &Option<ast::TableAlias>) -> Option<ObjectName> {
    let [ObjectNamePart::Identifier(first)] = name.0.as_slice() else {
        return None;
    };
    if first.quote_style.is_some() || !first.value.eq_ignore_ascii_case("only") {
        return None;
    }
    let alias = alias.as_ref()?;
    if !alias.columns.is_empty() {
        return None;
    }
    Some(ObjectName(vec![ObjectNamePart::Identifier(alias.name.clone())]))
}

/// Risk features of calling a function, by its (base) name.
fn function_features(name: &str, args: &[FunctionArg]) -> Features {
    let mut features = Features::default();
    match name {
        "pg_read_file"
        | "pg_read_binary_file"
        | "pg_ls_dir"
        | "pg_stat_file"
        | "pg_ls_logdir"
        | "pg_ls_waldir"
        | "pg_ls_tmpdir"
        | "pg_ls_archive_statusdir"
        | "pg_ls_logicalsnapdir"
        | "pg_ls_logicalmapdir"
        | "pg_ls_replslotdir"
        | "pg_file_write"
        | "pg_file_rename"
        | "pg_file_unlink"
        | "pg_file_sync"
        | "pg_logdir_ls" => features.insert(Feature::FileAccess),
        "lo_import" | "lo_export" | "lo_from_bytea" | "lo_get" | "lo_put" | "lo_create" | "lo_creat" | "lo_unlink"
        | "lo_open" | "loread" | "lowrite" | "lo_truncate" | "lo_truncate64" => features.insert(Feature::LargeObject),
        name if name.starts_with("dblink") => features.insert(Feature::ForeignData),
        "pg_terminate_backend"
        | "pg_cancel_backend"
        | "pg_reload_conf"
        | "pg_rotate_logfile"
        | "pg_switch_wal"
        | "pg_create_restore_point"
        | "pg_promote"
        | "pg_wal_replay_pause"
        | "pg_wal_replay_resume"
        | "pg_backup_start"
        | "pg_backup_stop"
        | "pg_start_backup"
        | "pg_stop_backup"
        | "pg_log_backend_memory_contexts"
        | "pg_import_system_collations"
        | "pg_logical_emit_message"
        | "pg_replication_slot_advance" => features.insert(Feature::ServerAdmin),
        name if name.starts_with("pg_stat_reset")
            || name.starts_with("pg_create_") && name.ends_with("_replication_slot")
            || name.starts_with("pg_copy_") && name.ends_with("_replication_slot")
            || name == "pg_drop_replication_slot"
            || name.starts_with("pg_logical_slot_")
            || name.starts_with("pg_replication_origin_") =>
        {
            features.insert(Feature::ServerAdmin)
        }
        // These run SQL given as a string, or dump whole tables, schemas or
        // the database: what they read is invisible to the gateway. Text
        // search has two: ts_stat(query) and ts_rewrite(tsquery, query)
        // (its other form takes no query, but the name alone cannot tell);
        // the tablefunc extension's crosstab and connectby run theirs too.
        name if name.starts_with("crosstab") || name == "connectby" => features.insert(Feature::DynamicSql),
        "ts_stat"
        | "ts_rewrite"
        | "query_to_xml"
        | "query_to_xmlschema"
        | "query_to_xml_and_xmlschema"
        | "cursor_to_xml"
        | "cursor_to_xmlschema"
        | "table_to_xml"
        | "table_to_xmlschema"
        | "table_to_xml_and_xmlschema"
        | "schema_to_xml"
        | "schema_to_xmlschema"
        | "schema_to_xml_and_xmlschema"
        | "database_to_xml"
        | "database_to_xmlschema"
        | "database_to_xml_and_xmlschema" => features.insert(Feature::DynamicSql),
        "set_config" => {
            features.insert(Feature::SetConfig);
            // A literal setting name says exactly what changes; anything
            // else could be any setting, including the role.
            match first_string_argument(args)
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                Some("role") => features.insert(Feature::SetRole),
                Some("session_authorization") => features.insert(Feature::SessionAuthorization),
                Some("standard_conforming_strings") => features.insert(Feature::NonstandardStrings),
                Some("search_path") => features.insert(Feature::SearchPath),
                Some(_) => {}
                None => {
                    features.insert(Feature::SetRole);
                    features.insert(Feature::NonstandardStrings);
                    features.insert(Feature::SearchPath);
                }
            }
        }
        _ => {}
    }
    features
}

fn first_string_argument(args: &[FunctionArg]) -> Option<String> {
    match args.first()? {
        FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(value))) => match &value.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// A relation named in a string, as `'schema.name'::regclass` reads it.
fn regclass_name(text: &str) -> Option<(Option<String>, String)> {
    let part = |p: &str| {
        let p = p.trim();
        if p.len() >= 2 && p.starts_with('"') && p.ends_with('"') {
            Some(p[1..p.len() - 1].replace("\"\"", "\""))
        } else if !p.is_empty() && !p.contains('"') {
            Some(p.to_ascii_lowercase())
        } else {
            None
        }
    };
    match text.rsplit_once('.') {
        Some((schema, name)) if !schema.contains('.') => Some((Some(part(schema)?), part(name)?)),
        Some(_) => None,
        None => Some((None, part(text)?)),
    }
}

/// Whether a WHERE clause is true for every row (as far as constants show).
fn trivially_true(expr: &Expr) -> bool {
    matches!(constant(expr), Some(Constant::Bool(true)))
}

#[derive(Debug, Clone, PartialEq)]
enum Constant {
    Bool(bool),
    Number(f64),
    Text(String),
    Null,
}

/// Folds an expression made of literals; `None` if it depends on a row.
fn constant(expr: &Expr) -> Option<Constant> {
    use ast::BinaryOperator as Op;
    use ast::UnaryOperator as Un;
    match expr {
        Expr::Nested(inner) => constant(inner),
        Expr::Value(value) => match &value.value {
            Value::Boolean(b) => Some(Constant::Bool(*b)),
            Value::Number(n, _) => {
                shape_sensitive();
                n.parse().ok().map(Constant::Number)
            }
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => Some(Constant::Text(s.clone())),
            Value::Null => Some(Constant::Null),
            _ => None,
        },
        Expr::UnaryOp { op: Un::Not, expr } => match constant(expr)? {
            Constant::Bool(b) => Some(Constant::Bool(!b)),
            _ => None,
        },
        Expr::UnaryOp { op: Un::Minus, expr } => match constant(expr)? {
            Constant::Number(n) => Some(Constant::Number(-n)),
            _ => None,
        },
        Expr::IsTrue(inner) => Some(Constant::Bool(constant(inner)? == Constant::Bool(true))),
        Expr::IsNotFalse(inner) => Some(Constant::Bool(constant(inner)? != Constant::Bool(false))),
        Expr::IsNotNull(inner) => Some(Constant::Bool(constant(inner)? != Constant::Null)),
        Expr::IsNull(inner) => Some(Constant::Bool(constant(inner)? == Constant::Null)),
        Expr::IsFalse(inner) => Some(Constant::Bool(constant(inner)? == Constant::Bool(false))),
        Expr::IsNotTrue(inner) => Some(Constant::Bool(constant(inner)? != Constant::Bool(true))),
        Expr::InList { expr, list, negated } => {
            // True for every row when the constant is in a constant list.
            let value = constant(expr)?;
            let mut found = false;
            for item in list {
                found |= compare(&value, &constant(item)?)? == std::cmp::Ordering::Equal;
            }
            Some(Constant::Bool(found != *negated))
        }
        Expr::Between {
            expr,
            negated,
            low,
            high,
        } => match (constant(expr)?, constant(low)?, constant(high)?) {
            (Constant::Number(v), Constant::Number(l), Constant::Number(h)) => {
                Some(Constant::Bool((l <= v && v <= h) != *negated))
            }
            _ => None,
        },
        Expr::Cast { expr, .. } => match constant(expr)? {
            Constant::Text(t) if matches!(t.to_ascii_lowercase().as_str(), "t" | "true" | "yes" | "on" | "1") => {
                Some(Constant::Bool(true))
            }
            other => Some(other),
        },
        Expr::BinaryOp { left, op, right } => {
            // `x = x` is true for every row where x is not null: near enough
            // to "every row" for a guardrail.
            if matches!(op, Op::Eq | Op::GtEq | Op::LtEq) && left == right && !matches!(**left, Expr::Value(_)) {
                return Some(Constant::Bool(true));
            }
            match op {
                Op::Or => {
                    let (l, r) = (constant(left), constant(right));
                    if l == Some(Constant::Bool(true)) || r == Some(Constant::Bool(true)) {
                        return Some(Constant::Bool(true));
                    }
                    match (l?, r?) {
                        (Constant::Bool(a), Constant::Bool(b)) => Some(Constant::Bool(a || b)),
                        _ => None,
                    }
                }
                Op::And => match (constant(left)?, constant(right)?) {
                    (Constant::Bool(a), Constant::Bool(b)) => Some(Constant::Bool(a && b)),
                    _ => None,
                },
                Op::Eq | Op::NotEq | Op::Lt | Op::LtEq | Op::Gt | Op::GtEq => {
                    let ordering = compare(&constant(left)?, &constant(right)?)?;
                    use std::cmp::Ordering::*;
                    Some(Constant::Bool(match op {
                        Op::Eq => ordering == Equal,
                        Op::NotEq => ordering != Equal,
                        Op::Lt => ordering == Less,
                        Op::LtEq => ordering != Greater,
                        Op::Gt => ordering == Greater,
                        _ => ordering != Less,
                    }))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Orders two constants of the same type; `None` for NULL or mixed types,
/// whose comparison PostgreSQL resolves by rules not followed here.
fn compare(a: &Constant, b: &Constant) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Constant::Number(a), Constant::Number(b)) => a.partial_cmp(b),
        (Constant::Text(a), Constant::Text(b)) => Some(a.cmp(b)),
        (Constant::Bool(a), Constant::Bool(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

/// CTE names visible at some point of a query, and how CTE bodies nest.
struct Scope {
    /// CTE names visible here (innermost last).
    visible: Vec<String>,
    /// For a query with a WITH clause: where its CTE bodies are, so that
    /// each body can be given exactly the names it may see.
    with: Option<WithFrame>,
}

struct WithFrame {
    /// The CTE bodies, by address.
    bodies: Vec<*const Query>,
    names: Vec<String>,
    recursive: bool,
    /// Names visible outside this WITH.
    outer: Vec<String>,
}

/// Walks one parsed statement, collecting relations and features.
struct Walker {
    relations: BTreeSet<Relation>,
    features: Features,
    scopes: Vec<Scope>,
    /// How many CTE bodies enclose the current node.
    cte_depth: usize,
    /// A write (INSERT, UPDATE, DELETE, MERGE) anywhere in the statement.
    writes: bool,
    /// Names of procedural bodies (DO, CREATE FUNCTION) to scan for EXECUTE.
    bodies: Vec<String>,
    /// Inside a plain EXPLAIN: statements are planned, never run.
    plan_only: bool,
    /// Functions called, by base name.
    functions: BTreeSet<String>,
    /// Where written values come from.
    written: WrittenValues,
    /// A WITH, a subquery in FROM or a table function somewhere: values
    /// can reach a write under names the classifier does not follow.
    renames: bool,
    /// An INSERT, UPDATE or MERGE: the statement stores values (a DELETE
    /// does not).
    stores_values: bool,
}

impl Walker {
    fn classify(statement: &Statement) -> StatementClass {
        let mut walker = Walker {
            relations: BTreeSet::new(),
            features: Features::default(),
            scopes: Vec::new(),
            cte_depth: 0,
            writes: false,
            bodies: Vec::new(),
            plan_only: false,
            functions: BTreeSet::new(),
            written: WrittenValues::default(),
            renames: false,
            stores_values: false,
        };
        let _ = statement.visit(&mut walker);
        let (kind, command) = walker.top_level(statement);
        for body in &walker.bodies {
            if fallback::mentions_execute(body) {
                walker.features.insert(Feature::DynamicSql);
            }
        }
        let opaque = matches!(kind, Kind::Procedural | Kind::Unknown)
            || walker.features.contains(Feature::DynamicSql)
            || matches!(statement, Statement::Execute { .. });
        let prepared = match statement {
            Statement::Prepare { name, .. } => Some(PreparedRef::Prepare(ident(name))),
            Statement::Execute { name: Some(name), .. } => Some(PreparedRef::Execute(function_base_name(name))),
            Statement::Deallocate { name, .. }
                if name.value.eq_ignore_ascii_case("all") && name.quote_style.is_none() =>
            {
                Some(PreparedRef::Deallocate(None))
            }
            Statement::Deallocate { name, .. } => Some(PreparedRef::Deallocate(Some(ident(name)))),
            Statement::Discard { .. } => Some(PreparedRef::Deallocate(None)),
            _ => None,
        };
        StatementClass {
            kind,
            relations: walker.relations.into_iter().collect(),
            features: walker.features,
            opaque,
            note: None,
            command,
            prepared,
            functions: walker.functions.into_iter().collect(),
            written: WrittenValues {
                // A write whose values may come through renamed columns
                // (a CTE's, a derived table's, a table function's) cannot
                // be followed column by column.
                opaque: walker.written.opaque || (walker.stores_values && walker.renames),
                ..walker.written
            },
        }
    }

    fn add(&mut self, name: &ObjectName, access: Access) {
        if let Some((schema, name)) = split_name(name) {
            self.relations.insert(Relation { schema, name, access });
        }
    }

    fn visible(&self) -> &[String] {
        self.scopes.last().map(|s| s.visible.as_slice()).unwrap_or(&[])
    }

    /// A table reference in FROM: a relation, unless it names a visible CTE.
    fn table_reference(&mut self, name: &ObjectName) {
        if let [ObjectNamePart::Identifier(only)] = name.0.as_slice() {
            let name = ident(only);
            if self.visible().contains(&name) {
                return;
            }
        }
        self.add(name, Access::Read);
    }

    /// The kind and command of the top-level statement; adds the relations
    /// named outside table references (DDL targets and the like).
    fn top_level(&mut self, statement: &Statement) -> (Kind, String) {
        use Kind::*;
        let kind = match statement {
            Statement::Query(query) => {
                if let SetExpr::Select(select) = query.body.as_ref()
                    && let Some(into) = &select.into
                {
                    self.features.insert(Feature::CopiesData);
                    for target in &into.targets {
                        if let Some(name) = expr_object_name(target) {
                            self.add(&name, Access::Ddl);
                        }
                    }
                    return (Ddl, "SELECT INTO".into());
                }
                if self.features.contains(Feature::ServerAdmin) {
                    Admin
                } else if self.writes {
                    Write
                } else {
                    Read
                }
            }
            Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) | Statement::Merge(_) => Write,
            Statement::Truncate(truncate) => {
                self.features.insert(Feature::Truncate);
                for target in &truncate.table_names {
                    self.add(&target.name, Access::Write);
                }
                Write
            }
            Statement::Copy {
                source,
                to,
                target,
                options,
                legacy_options,
                ..
            } => {
                let custom = options.iter().any(|o| {
                    matches!(
                        o,
                        ast::CopyOption::Delimiter(_) | ast::CopyOption::Quote(_) | ast::CopyOption::Escape(_)
                    )
                }) || legacy_options.iter().any(|o| match o {
                    ast::CopyLegacyOption::Delimiter(_) => true,
                    ast::CopyLegacyOption::Csv(csv) => csv.iter().any(|c| {
                        matches!(
                            c,
                            ast::CopyLegacyCsvOption::Quote(_) | ast::CopyLegacyCsvOption::Escape(_)
                        )
                    }),
                    _ => false,
                });
                if custom {
                    self.features.insert(Feature::CopyCustomFormat);
                }
                let binary = options
                    .iter()
                    .any(|o| matches!(o, ast::CopyOption::Format(f) if f.value.eq_ignore_ascii_case("binary")))
                    || legacy_options
                        .iter()
                        .any(|o| matches!(o, ast::CopyLegacyOption::Binary));
                if binary {
                    self.features.insert(Feature::CopyBinary);
                }
                match target {
                    CopyTarget::Program { .. } => self.features.insert(Feature::CopyProgram),
                    CopyTarget::File { .. } => self.features.insert(Feature::CopyFile),
                    CopyTarget::Stdin | CopyTarget::Stdout => {}
                }
                if let CopySource::Table { table_name, .. } = source {
                    self.add(table_name, if *to { Access::Read } else { Access::Write });
                }
                // COPY (DELETE ... RETURNING *) TO STDOUT writes.
                if self.writes {
                    Write
                } else if *to {
                    CopyOut
                } else {
                    CopyIn
                }
            }
            Statement::Explain {
                analyze,
                options,
                statement: inner,
                ..
            } => {
                if explain_executes(*analyze, options) {
                    // EXPLAIN ANALYZE runs the statement: it is what it explains.
                    let (kind, _) = self.top_level(inner);
                    if self.writes || matches!(kind, Write | Ddl) {
                        self.features.insert(Feature::ExplainAnalyzeWrite);
                    }
                    return (kind, "EXPLAIN ANALYZE".into());
                }
                self.top_level(inner);
                Utility
            }
            Statement::ExplainTable { table_name, .. } => {
                self.add(table_name, Access::Read);
                Utility
            }
            Statement::Prepare { statement: inner, .. } => {
                self.features.insert(Feature::PreparedSql);
                let (kind, _) = self.top_level(inner);
                return (kind, "PREPARE".into());
            }
            Statement::Execute { .. } => {
                self.features.insert(Feature::PreparedSql);
                Utility
            }
            Statement::Deallocate { .. } => Session,
            Statement::Declare { .. } => Read,
            Statement::Fetch { .. } | Statement::Close { .. } => Read,
            Statement::CreateTable(create) => {
                self.add(&create.name, Access::Ddl);
                if create.query.is_some() {
                    self.features.insert(Feature::CopiesData);
                }
                Ddl
            }
            Statement::CreateView(view) => {
                self.add(&view.name, Access::Ddl);
                if view.materialized {
                    self.features.insert(Feature::CopiesData);
                }
                Ddl
            }
            Statement::CreateIndex(index) => {
                self.add(&index.table_name, Access::Ddl);
                Ddl
            }
            Statement::AlterTable(alter) => {
                self.features.insert(Feature::Alter);
                self.add(&alter.name, Access::Ddl);
                Ddl
            }
            Statement::AlterIndex { name, .. } | Statement::AlterView { name, .. } => {
                self.features.insert(Feature::Alter);
                self.add(name, Access::Ddl);
                Ddl
            }
            Statement::AlterSchema(_)
            | Statement::AlterType(_)
            | Statement::AlterFunction(_)
            | Statement::AlterCollation(_)
            | Statement::AlterOperator(_)
            | Statement::AlterOperatorFamily(_)
            | Statement::AlterOperatorClass(_)
            | Statement::AlterPolicy(_)
            | Statement::AlterTextSearch(_) => {
                self.features.insert(Feature::Alter);
                Ddl
            }
            Statement::AlterRole { .. } | Statement::AlterUser(_) => {
                self.features.insert(Feature::Alter);
                Dcl
            }
            Statement::Drop {
                object_type,
                names,
                table,
                ..
            } => {
                self.features.insert(Feature::Drop);
                if matches!(
                    object_type,
                    ObjectType::Table | ObjectType::View | ObjectType::MaterializedView | ObjectType::Sequence
                ) {
                    for name in names {
                        self.add(name, Access::Ddl);
                    }
                }
                if let Some(table) = table {
                    self.add(table, Access::Ddl);
                }
                if matches!(object_type, ObjectType::Role | ObjectType::User) {
                    Dcl
                } else {
                    Ddl
                }
            }
            Statement::DropFunction(_)
            | Statement::DropDomain(_)
            | Statement::DropProcedure { .. }
            | Statement::DropPolicy(_)
            | Statement::DropTrigger(_)
            | Statement::DropExtension(_)
            | Statement::DropOperator(_)
            | Statement::DropOperatorFamily(_)
            | Statement::DropOperatorClass(_) => {
                self.features.insert(Feature::Drop);
                Ddl
            }
            Statement::CreateSchema { .. }
            | Statement::CreateDatabase { .. }
            | Statement::CreateSequence { .. }
            | Statement::CreateType { .. }
            | Statement::CreateDomain(_)
            | Statement::CreatePolicy(_)
            | Statement::CreateCollation(_)
            | Statement::CreateOperator(_)
            | Statement::CreateOperatorFamily(_)
            | Statement::CreateOperatorClass(_)
            | Statement::CreateTextSearch(_)
            | Statement::Comment { .. } => Ddl,
            Statement::CreateTrigger(trigger) => {
                self.add(&trigger.table_name, Access::Ddl);
                Ddl
            }
            Statement::CreateServer(_) => {
                self.features.insert(Feature::ForeignData);
                Ddl
            }
            Statement::CreateExtension(_) => {
                self.features.insert(Feature::Extension);
                Ddl
            }
            Statement::CreateFunction(function) => {
                if let Some(body) = &function.function_body {
                    self.bodies.push(body_text(body));
                }
                Procedural
            }
            Statement::CreateProcedure { .. } => Procedural,
            Statement::Call(_) => Procedural,
            Statement::CreateRole(_) | Statement::CreateUser(_) => Dcl,
            Statement::Grant(grant) => {
                self.features.insert(Feature::Grant);
                self.grant_objects(grant.objects.as_ref());
                Dcl
            }
            Statement::Revoke(revoke) => {
                self.features.insert(Feature::Grant);
                self.grant_objects(revoke.objects.as_ref());
                Dcl
            }
            Statement::Set(set) => self.set(set),
            Statement::Reset(reset) => {
                match &reset.reset {
                    ast::Reset::ConfigurationParameter(name) => match setting_name(name).as_str() {
                        // RESET restores the server's default, which may be off.
                        "standard_conforming_strings" => self.features.insert(Feature::NonstandardStrings),
                        "search_path" => self.features.insert(Feature::SearchPath),
                        _ => {}
                    },
                    ast::Reset::ALL => self.features.insert(Feature::SearchPath),
                    ast::Reset::SessionAuthorization => {}
                }
                Session
            }
            Statement::ShowVariable { .. } | Statement::Discard { .. } => Session,
            Statement::StartTransaction { statements, .. } => {
                if statements.is_empty() {
                    Transaction
                } else {
                    return (Unknown, "BEGIN ... END block".into());
                }
            }
            Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. } => Transaction,
            Statement::Lock(lock) => {
                for target in &lock.tables {
                    self.add(&target.name, Access::Read);
                }
                Utility
            }
            Statement::Vacuum(vacuum) => {
                if let Some(name) = &vacuum.table_name {
                    self.add(name, Access::Ddl);
                }
                Utility
            }
            Statement::Analyze(analyze) => {
                if let Some(name) = &analyze.table_name {
                    self.add(name, Access::Ddl);
                }
                Utility
            }
            Statement::LISTEN { .. } | Statement::UNLISTEN { .. } | Statement::NOTIFY { .. } => Utility,
            // Everything else is either not PostgreSQL or not understood well
            // enough here to allow it without a human.
            _ => {
                return (Unknown, command_of(statement));
            }
        };
        (kind, command_of(statement))
    }

    fn grant_objects(&mut self, objects: Option<&GrantObjects>) {
        if let Some(GrantObjects::Tables(names) | GrantObjects::Views(names) | GrantObjects::Sequences(names)) = objects
        {
            for name in names {
                self.add(name, Access::Ddl);
            }
        }
    }

    fn set(&mut self, set: &ast::Set) -> Kind {
        match set {
            ast::Set::SetRole { .. } => self.features.insert(Feature::SetRole),
            ast::Set::SetSessionAuthorization(_) => self.features.insert(Feature::SessionAuthorization),
            ast::Set::SingleAssignment { variable, values, .. } => self.set_variable(variable, values),
            ast::Set::MultipleAssignments { assignments } => {
                for assignment in assignments {
                    self.set_variable(&assignment.name, std::slice::from_ref(&assignment.value));
                }
            }
            ast::Set::ParenthesizedAssignments { variables, values } => {
                for variable in variables {
                    self.set_variable(variable, values);
                }
            }
            ast::Set::SetTransaction { .. } => return Kind::Transaction,
            _ => {}
        }
        Kind::Session
    }

    fn set_variable(&mut self, variable: &ObjectName, values: &[Expr]) {
        match setting_name(variable).as_str() {
            "role" => self.features.insert(Feature::SetRole),
            "search_path" => self.features.insert(Feature::SearchPath),
            "session_authorization" => self.features.insert(Feature::SessionAuthorization),
            "standard_conforming_strings" => {
                let stays_on = values.iter().all(|value| match value {
                    Expr::Value(v) => match &v.value {
                        Value::Boolean(b) => *b,
                        Value::SingleQuotedString(s) => {
                            matches!(s.to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1")
                        }
                        Value::Number(n, _) => {
                            shape_sensitive();
                            n == "1"
                        }
                        _ => false,
                    },
                    Expr::Identifier(id) => matches!(id.value.to_ascii_lowercase().as_str(), "on" | "true" | "yes"),
                    _ => false,
                });
                if !stays_on {
                    self.features.insert(Feature::NonstandardStrings);
                }
            }
            _ => {}
        }
    }

    /// A write statement at any depth: its target, and the no-WHERE check.
    fn write_statement(&mut self, statement: &Statement) {
        let plan_only = self.plan_only;
        // A planned-only write reads the catalog, and changes nothing.
        let access = if plan_only { Access::Read } else { Access::Write };
        let mut no_where = |selection: &Option<Expr>| {
            if !plan_only && selection.as_ref().is_none_or(trivially_true) {
                self.features.insert(Feature::NoWhere);
            }
        };
        match statement {
            Statement::Insert(insert) => {
                if let TableObject::TableName(name) = &insert.table {
                    let name = name.clone();
                    self.add(&name, access);
                }
                self.written_by_insert(insert);
            }
            Statement::Update(update) => {
                no_where(&update.selection);
                if let Some(name) = factor_table(&update.table.relation) {
                    self.add(&name, access);
                }
                self.written_by_update(update);
            }
            Statement::Delete(delete) => {
                no_where(&delete.selection);
                let from = match &delete.from {
                    FromTable::WithFromKeyword(tables) | FromTable::WithoutKeyword(tables) => tables,
                };
                let targets: Vec<ObjectName> = if delete.tables.is_empty() {
                    from.iter().filter_map(|t| factor_table(&t.relation)).collect()
                } else {
                    delete.tables.clone()
                };
                for name in targets {
                    self.add(&name, access);
                }
            }
            Statement::Merge(merge) => {
                if let Some(name) = factor_table(&merge.table) {
                    self.add(&name, access);
                }
                // Its actions read the source's rows in ways not followed here.
                self.written.opaque = true;
            }
            _ => return,
        }
        if plan_only {
            return;
        }
        self.writes = true;
        if self.cte_depth > 0 {
            self.features.insert(Feature::DataModifyingCte);
        }
    }
}

impl Walker {
    /// An UPDATE's assignments: each target column and what its value reads.
    fn written_by_update(&mut self, update: &ast::Update) {
        if self.plan_only {
            return;
        }
        self.stores_values = true;
        let mut names = ValueReads::default();
        let _ = update.table.visit(&mut names);
        if let Some(from) = &update.from {
            let _ = from.visit(&mut names);
        }
        for assignment in &update.assignments {
            self.assigned(
                &assignment_targets(&assignment.target),
                &assignment.value,
                &names.tables,
            );
        }
    }

    /// An INSERT: what its rows read (for every column it fills), and its
    /// ON CONFLICT DO UPDATE assignments.
    fn written_by_insert(&mut self, insert: &ast::Insert) {
        if self.plan_only {
            return;
        }
        self.stores_values = true;
        let mut names = ValueReads::default();
        if let TableObject::TableName(name) = &insert.table {
            names.tables.push(last_part(name));
        }
        if let Some(alias) = &insert.table_alias {
            names.tables.push(ident(&alias.alias));
        }
        names.tables.push("excluded".into());
        if let Some(source) = &insert.source {
            self.assigned(&[String::new()], source.as_ref(), &[]);
        }
        if let Some(ast::OnInsert::OnConflict(ast::OnConflict {
            action: ast::OnConflictAction::DoUpdate(update),
            ..
        })) = &insert.on
        {
            for assignment in &update.assignments {
                self.assigned(
                    &assignment_targets(&assignment.target),
                    &assignment.value,
                    &names.tables,
                );
            }
        }
    }

    /// One value (an expression, or an INSERT's source query) written to
    /// `targets`; `tables`: the tables in scope around it.
    fn assigned(&mut self, targets: &[String], value: &impl Visit, tables: &[String]) {
        let mut reads = ValueReads::default();
        let _ = value.visit(&mut reads);
        reads.tables.extend(tables.iter().cloned());
        // A table or its alias used as a value is its whole row.
        let whole_rows = reads.wildcard || reads.columns.iter().any(|c| reads.tables.contains(c));
        for target in targets {
            self.written.assignments.push(Assigned {
                column: target.clone(),
                reads: reads.columns.clone(),
                functions: reads.functions.clone(),
                tables: reads.tables.clone(),
                whole_rows,
            });
        }
    }
}

/// Whether a FROM item can bring values in under names of its own: a
/// subquery, a table function, UNNEST... unless all it reads is constants
/// and parameters (`FROM (VALUES ($1, $2)) v(a, b)`, `unnest($1::int[])`,
/// which ORMs use for bulk writes).
fn introduces_renames(factor: &TableFactor) -> bool {
    let reads_columns = |node: &dyn VisitDyn| {
        let mut reads = ValueReads::default();
        node.visit_dyn(&mut reads);
        !reads.columns.is_empty() || reads.wildcard || !reads.tables.is_empty()
    };
    match factor {
        TableFactor::Table { args: None, .. } | TableFactor::NestedJoin { .. } => false,
        TableFactor::Derived { subquery, .. } => !constant_rows(subquery),
        TableFactor::Table { args: Some(args), .. } => reads_columns(&args.args),
        TableFactor::Function { args, .. } => reads_columns(args),
        TableFactor::UNNEST { array_exprs, .. } => reads_columns(array_exprs),
        _ => true,
    }
}

/// Object-safe visiting, so that `introduces_renames` can look into the
/// argument lists of several FROM items alike.
trait VisitDyn {
    fn visit_dyn(&self, visitor: &mut ValueReads);
}

impl<T: Visit> VisitDyn for T {
    fn visit_dyn(&self, visitor: &mut ValueReads) {
        let _ = self.visit(visitor);
    }
}

/// Whether a query is a VALUES list of constants and parameters.
fn constant_rows(query: &Query) -> bool {
    if query.with.is_some() {
        return false;
    }
    match query.body.as_ref() {
        SetExpr::Values(values) => {
            let mut reads = ValueReads::default();
            let _ = values.visit(&mut reads);
            reads.columns.is_empty() && !reads.wildcard && reads.tables.is_empty()
        }
        _ => false,
    }
}

/// The columns an assignment writes; for `(a, b) = (SELECT ...)` which
/// value goes where is not followed, so each is unnamed.
fn assignment_targets(target: &ast::AssignmentTarget) -> Vec<String> {
    match target {
        ast::AssignmentTarget::ColumnName(name) => vec![last_part(name)],
        ast::AssignmentTarget::Tuple(names) => names.iter().map(|_| String::new()).collect(),
    }
}

/// The last part of a dotted name, folded like an identifier.
fn last_part(name: &ObjectName) -> String {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(id)) => ident(id),
        _ => String::new(),
    }
}

/// What a value expression (or query) reads: column names, functions, the
/// tables and aliases it names, and whether it takes every column.
#[derive(Default)]
struct ValueReads {
    columns: Vec<String>,
    functions: Vec<String>,
    tables: Vec<String>,
    wildcard: bool,
}

impl Visitor for ValueReads {
    type Break = ();

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Identifier(id) => self.columns.push(ident(id)),
            Expr::CompoundIdentifier(ids) => {
                if let Some(last) = ids.last() {
                    self.columns.push(ident(last));
                }
            }
            Expr::Wildcard(_) | Expr::QualifiedWildcard(..) => self.wildcard = true,
            Expr::Function(function) => {
                self.functions.push(function_base_name(&function.name));
                if let FunctionArguments::List(list) = &function.args {
                    // to_jsonb(c.*), row_to_json(c.*): a whole row.
                    self.wildcard |= list.args.iter().any(|arg| {
                        matches!(
                            arg,
                            ast::FunctionArg::Unnamed(ast::FunctionArgExpr::QualifiedWildcard(_))
                                | ast::FunctionArg::Named {
                                    arg: ast::FunctionArgExpr::QualifiedWildcard(_),
                                    ..
                                }
                        )
                    });
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        fn takes_all(body: &SetExpr) -> bool {
            match body {
                SetExpr::Select(select) => select.projection.iter().any(|item| {
                    matches!(
                        item,
                        ast::SelectItem::Wildcard(_) | ast::SelectItem::QualifiedWildcard(..)
                    )
                }),
                SetExpr::Table(_) => true,
                SetExpr::SetOperation { left, right, .. } => takes_all(left) || takes_all(right),
                SetExpr::Query(query) => takes_all(&query.body),
                _ => false,
            }
        }
        self.wildcard |= takes_all(&query.body);
        for name in table_commands(&query.body) {
            self.tables.push(last_part(&name));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table { name, alias, .. } = factor {
            self.tables.push(last_part(name));
            if let Some(alias) = alias {
                self.tables.push(ident(&alias.name));
            }
        }
        ControlFlow::Continue(())
    }
}

/// The tables a query's body reads with the `TABLE name` command, as an
/// operand of UNION, EXCEPT or INTERSECT (`SELECT ... UNION ALL TABLE
/// keys`): no table factor names them, so the visitor's table hook never
/// sees them. (A parenthesised query is a query of its own, visited apart.)
fn table_commands(body: &SetExpr) -> Vec<ObjectName> {
    let mut names = Vec::new();
    let mut stack = vec![body];
    while let Some(body) = stack.pop() {
        match body {
            SetExpr::Table(table) => {
                let Some(name) = &table.table_name else { continue };
                let parts = table.schema_name.iter().chain(std::iter::once(name));
                names.push(ObjectName(
                    parts
                        .map(|part| ObjectNamePart::Identifier(ast::Ident::new(part.as_str())))
                        .collect(),
                ));
            }
            SetExpr::SetOperation { left, right, .. } => {
                stack.push(left);
                stack.push(right);
            }
            _ => {}
        }
    }
    names
}

/// The table a table factor names (resolving `ONLY name`), if it is one.
fn factor_table(factor: &TableFactor) -> Option<ObjectName> {
    match factor {
        TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } => Some(only_table(name, alias).unwrap_or_else(|| name.clone())),
        _ => None,
    }
}

/// `SELECT ... INTO name`: the target as an object name.
fn expr_object_name(expr: &Expr) -> Option<ObjectName> {
    match expr {
        Expr::Identifier(id) => Some(ObjectName(vec![ObjectNamePart::Identifier(id.clone())])),
        Expr::CompoundIdentifier(ids) => Some(ObjectName(
            ids.iter().cloned().map(ObjectNamePart::Identifier).collect(),
        )),
        _ => None,
    }
}

/// The source text of a function body, to look for dynamic SQL in.
fn body_text(body: &ast::CreateFunctionBody) -> String {
    match body {
        ast::CreateFunctionBody::AsBeforeOptions { body, .. }
        | ast::CreateFunctionBody::AsAfterOptions(body)
        | ast::CreateFunctionBody::Return(body) => body.to_string(),
        ast::CreateFunctionBody::AsBeginEnd(statements) => statements.to_string(),
        ast::CreateFunctionBody::AsReturnExpr(expr) => expr.to_string(),
        ast::CreateFunctionBody::AsReturnSelect(select) => select.to_string(),
    }
}

/// The statement's command, for messages: "DELETE", "CREATE TABLE"...
fn command_of(statement: &Statement) -> String {
    let text = statement.to_string();
    let mut words = text.split_whitespace();
    let first = words.next().unwrap_or("").to_string();
    let keyword = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase() || c == '_');
    match first.as_str() {
        // The object type is part of these commands.
        "CREATE" | "DROP" | "ALTER" | "COMMENT" => {
            let mut command = first;
            for word in words.take_while(|w| keyword(w)).take(3) {
                if matches!(word, "IF" | "NOT" | "EXISTS" | "ON") {
                    break;
                }
                command.push(' ');
                command.push_str(word);
            }
            command
        }
        _ => first,
    }
}

impl Visitor for Walker {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        let pointer = query as *const Query;
        // Is this query the body of a CTE of an enclosing WITH? Then it sees
        // the CTEs before it (all of them, for WITH RECURSIVE).
        let mut visible = self.visible().to_vec();
        let mut is_cte_body = false;
        if let Some(frame) = self.scopes.last().and_then(|s| s.with.as_ref())
            && let Some(index) = frame.bodies.iter().position(|b| *b == pointer)
        {
            visible = frame.outer.clone();
            let upto = if frame.recursive { frame.names.len() } else { index };
            visible.extend(frame.names[..upto].iter().cloned());
            is_cte_body = true;
        }
        if is_cte_body {
            self.cte_depth += 1;
        }
        let with = query.with.as_ref().map(|with| WithFrame {
            bodies: with.cte_tables.iter().map(|cte| &*cte.query as *const Query).collect(),
            names: with.cte_tables.iter().map(|cte| ident(&cte.alias.name)).collect(),
            recursive: with.recursive,
            outer: visible.clone(),
        });
        if let Some(frame) = &with {
            // The query's own body sees every CTE of its WITH.
            visible.extend(frame.names.iter().cloned());
        }
        self.renames |= query
            .with
            .as_ref()
            .is_some_and(|with| with.cte_tables.iter().any(|cte| !constant_rows(&cte.query)));
        self.scopes.push(Scope { visible, with });
        // `... UNION TABLE keys`: a table read with no table factor.
        for name in table_commands(&query.body) {
            self.table_reference(&name);
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        self.scopes.pop();
        // Leaving a CTE body: find out whether this query was one.
        let pointer = query as *const Query;
        if let Some(frame) = self.scopes.last().and_then(|s| s.with.as_ref())
            && frame.bodies.contains(&pointer)
        {
            self.cte_depth -= 1;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        // A table renamed column by column (`t AS k(a, b)`) counts too.
        let renamed_columns = match factor {
            TableFactor::Table { alias, .. } | TableFactor::NestedJoin { alias, .. } => {
                alias.as_ref().is_some_and(|a| !a.columns.is_empty())
            }
            _ => false,
        };
        self.renames |= renamed_columns || introduces_renames(factor);
        match factor {
            TableFactor::Table { name, alias, args, .. } => match args {
                // A function in FROM, such as generate_series(1, 10).
                Some(args) => {
                    let function = function_base_name(name);
                    self.features = self.features.union(function_features(&function, &args.args));
                    self.functions.insert(function);
                }
                None => match only_table(name, alias) {
                    Some(real) => self.add(&real, Access::Read),
                    None => self.table_reference(name),
                },
            },
            TableFactor::Function { name, args, .. } => {
                let function = function_base_name(name);
                self.features = self.features.union(function_features(&function, args));
                self.functions.insert(function);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(function) = expr {
            let args = match &function.args {
                FunctionArguments::List(list) => list.args.as_slice(),
                _ => &[],
            };
            let name = function_base_name(&function.name);
            let features = function_features(&name, args);
            self.features = self.features.union(features);
            self.functions.insert(name.clone());
            // Advancing or setting a sequence is a write: PostgreSQL refuses
            // both in a read-only transaction.
            if matches!(name.as_str(), "nextval" | "setval") && !self.plan_only {
                self.writes = true;
                if let Some((schema, name)) = first_string_argument(args).as_deref().and_then(regclass_name) {
                    self.relations.insert(Relation {
                        schema,
                        name,
                        access: Access::Write,
                    });
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        if let Statement::Explain { analyze, options, .. } = statement
            && !explain_executes(*analyze, options)
        {
            // Planned, not run: what it would write, it only reads about.
            self.plan_only = true;
        }
        self.write_statement(statement);
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> StatementClass {
        let classification = classify(sql, &ClassifyOptions::default());
        assert_eq!(classification.statements.len(), 1, "{sql}: {classification:?}");
        classification.statements.into_iter().next().unwrap()
    }

    fn rels(class: &StatementClass) -> Vec<String> {
        class.relations.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn shape_keys_replace_only_plain_numbers() {
        assert_eq!(
            shape_key("SELECT abalance FROM pgbench_accounts WHERE aid = 4217;").as_deref(),
            Some("SELECT abalance FROM pgbench_accounts WHERE aid = \0;")
        );
        assert_eq!(
            shape_key("SELECT 1.5, 2e10, 3E-2 FROM t LIMIT 10").as_deref(),
            Some("SELECT \0, \0, \0 FROM t LIMIT \0")
        );
        // Numbers in strings, quoted names and comments are text, not numbers.
        assert_eq!(shape_key("SELECT '42', \"7\" /* 9 */ FROM t -- 3").as_deref(), None);
        // Anything a lexer could read another way stays as written.
        for text in [
            "SELECT 1e FROM t",
            "SELECT 1. FROM t",
            "SELECT .5 FROM t",
            "SELECT 1.5.3",
            "SELECT 1UNION SELECT 2x",
            "SELECT t1, t.1, $1, x$1, 0x1F",
            "SELECT 1é",
            "SELECT 'unterminated 1",
        ] {
            let key = shape_key(text);
            assert!(
                key.as_deref()
                    .is_none_or(|k| k.matches('\0').count() < text.matches(char::is_numeric).count()),
                "{text}: {key:?}"
            );
        }
        assert_eq!(
            shape_key("SELECT 1UNION SELECT 2").as_deref(),
            Some("SELECT 1UNION SELECT \0")
        );
        assert_eq!(shape_key("SELECT 0x1F, 7").as_deref(), Some("SELECT 0x1F, \0"));
        assert_eq!(shape_key("SELECT 1\0"), None, "a text with a NUL has no shape");
    }

    #[test]
    fn classes_that_read_a_number_are_not_shared() {
        let shared = |sql: &str| classify_with_shape(sql, &ClassifyOptions::default()).1;
        assert!(shared("SELECT abalance FROM pgbench_accounts WHERE aid = 4217"));
        assert!(shared(
            "UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = 3"
        ));
        assert!(shared("DELETE FROM orders WHERE id = 3"));
        // A constant WHERE is judged by its numbers' values.
        assert!(!shared("DELETE FROM orders WHERE 1 = 2"));
        assert!(!shared("DELETE FROM orders WHERE 2 > 1"));
        assert!(!shared("UPDATE orders SET note = 'x' WHERE 1 BETWEEN 0 AND 2"));
        assert!(!shared("EXPLAIN (ANALYZE 0) DELETE FROM orders"));
        assert!(!shared("SET standard_conforming_strings = 1"));
        // What the walker cannot see into, and the fallback scanner's reads.
        assert!(!shared("DO $$ BEGIN PERFORM 1; END $$"));
        assert!(!shared("VACUUM (VERBOSE) orders"));
        assert!(!shared("SELEC 1"));
    }

    #[test]
    fn cte_names_are_not_tables_but_scoping_is_exact() {
        let class = one("WITH x AS (SELECT * FROM orders) SELECT * FROM x");
        assert_eq!(rels(&class), vec!["orders (read)"]);
        // In a non-recursive WITH, an earlier CTE cannot see a later one: the
        // name refers to the real table.
        let class = one("WITH a AS (SELECT * FROM secret), secret AS (SELECT 1) SELECT * FROM a");
        assert_eq!(rels(&class), vec!["secret (read)"]);
        let class = one("WITH RECURSIVE r AS (SELECT 1 UNION ALL SELECT 1 FROM r) SELECT * FROM r");
        assert!(class.relations.is_empty(), "{class:?}");
        // A CTE does not shadow a schema-qualified name.
        let class = one("WITH orders AS (SELECT 1) SELECT * FROM public.orders");
        assert_eq!(rels(&class), vec!["public.orders (read)"]);
    }

    #[test]
    fn called_functions_are_listed_wherever_they_are() {
        let class = one("WITH x AS (SELECT \"Leak\"() AS v) SELECT s.get_secret(1), upper(v) \
             FROM x, generate_series(1, 2) WHERE lower(v) = ANY (SELECT my_list())");
        assert_eq!(
            class.functions,
            ["Leak", "generate_series", "get_secret", "lower", "my_list", "upper"]
        );
        assert!(one("SELECT 1").functions.is_empty());
        assert_eq!(one("INSERT INTO t VALUES (f(1))").functions, ["f"]);
    }

    #[test]
    fn only_is_the_table_not_a_table_named_only() {
        let class = one("DELETE FROM ONLY users WHERE id = 1");
        assert_eq!(class.kind, Kind::Write);
        assert!(rels(&class).contains(&"users (write)".to_string()), "{class:?}");
        assert!(!rels(&class).iter().any(|r| r.starts_with("only")));
        let class = one("SELECT * FROM \"ONLY\" u");
        assert_eq!(rels(&class), vec!["ONLY (read)"]);
    }

    #[test]
    fn trivially_true_where() {
        for sql in [
            "DELETE FROM t",
            "DELETE FROM t WHERE 1=1",
            "UPDATE t SET a = 1 WHERE true",
            "DELETE FROM t WHERE NOT false OR id = 3",
            "DELETE FROM t WHERE id = id",
            "DELETE FROM t WHERE 'a' = 'a' AND 2 > 1",
            "DELETE FROM t WHERE (1 = 1) IS TRUE",
        ] {
            assert!(one(sql).features.contains(Feature::NoWhere), "{sql}");
        }
        for sql in ["DELETE FROM t WHERE id = 3", "UPDATE t SET a = 1 WHERE id > 0 OR false"] {
            assert!(!one(sql).features.contains(Feature::NoWhere), "{sql}");
        }
    }

    #[test]
    fn comment_tricks_do_not_hide_relations() {
        let class = one("SELECT 1 --x\r, secret FROM t");
        assert_eq!(rels(&class), vec!["t (read)"]);
        let classification = classify("SELECT 1 /* ; */ ; DROP TABLE t", &ClassifyOptions::default());
        assert_eq!(classification.statements.len(), 2);
        assert_eq!(classification.statements[1].kind, Kind::Ddl);
    }

    #[test]
    fn parse_bombs_are_unknown_not_crashes() {
        let deep = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
        assert_eq!(one(&deep).kind, Kind::Unknown);
        let options = ClassifyOptions {
            max_statement_length: 100,
            ..ClassifyOptions::default()
        };
        let long = format!("SELECT '{}'", "x".repeat(200));
        let classification = classify(&long, &options);
        assert_eq!(classification.statements[0].kind, Kind::Unknown);
    }

    #[test]
    fn writes_say_where_their_values_come_from() {
        let written = |sql: &str| one(sql).written;
        let update = written("UPDATE t AS x SET a = upper(x.\"B\"), c = 1 FROM u WHERE x.id = u.id");
        let a = &update.assignments[0];
        assert_eq!((a.column.as_str(), a.reads.as_slice()), ("a", &["B".to_string()][..]));
        assert_eq!(a.functions, ["upper"]);
        assert!(a.tables.contains(&"t".to_string()) && a.tables.contains(&"u".to_string()));
        assert!(!a.whole_rows);
        assert!(update.assignments[1].reads.is_empty());
        assert!(written("UPDATE t x SET a = x::text").assignments[0].whole_rows);
        assert!(written("UPDATE t SET a = to_jsonb(t.*)::text").assignments[0].whole_rows);
        let sub = written("UPDATE t SET a = (SELECT k.s FROM keys k LIMIT 1)");
        assert_eq!(sub.assignments[0].reads, ["s"]);
        assert!(sub.assignments[0].tables.contains(&"keys".to_string()));
        let insert = written("INSERT INTO t (a) SELECT s FROM keys");
        assert_eq!(insert.assignments[0].column, "");
        assert_eq!(insert.assignments[0].reads, ["s"]);
        // (The parser may not read TABLE here: then the write is opaque.)
        let table = written("INSERT INTO t TABLE keys");
        assert!(
            table.opaque || table.assignments.iter().any(|a| a.whole_rows),
            "{table:?}"
        );
        assert!(written("INSERT INTO t SELECT * FROM keys").assignments[0].whole_rows);
        let values = written("INSERT INTO t VALUES (1, 'x')");
        assert!(values.assignments.iter().all(|a| a.reads.is_empty() && !a.whole_rows));
        let upsert = written("INSERT INTO t (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET a = EXCLUDED.s");
        assert_eq!(upsert.assignments.last().unwrap().reads, ["s"]);
        let cte = written("WITH w AS (UPDATE t SET a = s RETURNING 1) SELECT * FROM w");
        assert_eq!(cte.assignments[0].reads, ["s"]);
        assert!(written("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE").opaque);
        assert_eq!(written("SELECT a FROM t"), WrittenValues::default());
    }
}
