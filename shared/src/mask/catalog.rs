//! Column attribution for masking rules: which (table OID, attribute number)
//! pairs the rules' column patterns name on a target.
//!
//! RowDescription names each result column's origin by table OID and
//! attribute number, whatever alias the query gave it. The gateway reads
//! the target's catalog once per `masking.catalog_ttl` (see
//! `session::target_catalog`), asking only for the columns the rules match, and
//! this module builds the query and reads its rows. Inheritance children and
//! partitions are followed (their columns are matched by name, since their
//! attribute numbers may differ), and each matched table's row type and its
//! array type are kept, so that a whole-row reference (`SELECT c FROM
//! customers c`) is masked too.
//!
//! Views (and materialized views) carry their own OID in RowDescription, and
//! PostgreSQL's catalog records which base columns a view depends on but not
//! which view column shows which: every column of a view that depends on a
//! masked column gets that column's rule (views of views too). That masks
//! more than needed when a view only filters on a masked column, and never
//! less: an alias or a swap of column names inside the view cannot unmask.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use super::Strategy;
use crate::config::{ColumnPattern, MaskRule};

/// One target's snapshot: for each matched column, the rules that match it.
#[derive(Debug)]
pub struct Catalog {
    columns: HashMap<(u32, i16), Vec<usize>>,
    /// Schema and name of each relation with a matched column (lower case).
    names: HashMap<u32, (String, String)>,
    /// The name (lower case) of each matched column, views' included.
    column_names: HashMap<(u32, i16), String>,
    /// Row types (and their array types) of tables with a matched column,
    /// with the rules of those columns.
    rowtypes: HashMap<u32, Vec<usize>>,
    /// Names (lower case) of functions written in SQL or a procedural
    /// language outside the system schemas.
    functions: Arc<HashSet<String>>,
    /// Where result columns come from, for the trail (see
    /// [`origins_query`]); shared by every session on the target.
    pub origins: Arc<Origins>,
    pub loaded: Instant,
}

/// The catalog's views and tables of the planner's statistics, which show
/// column values.
const STATISTICS: &[&str] = &[
    "pg_stats",
    "pg_stats_ext",
    "pg_stats_ext_exprs",
    "pg_statistic",
    "pg_statistic_ext_data",
];

/// What one identity's session masks by rule.
#[derive(Debug, Default, Clone)]
pub struct ColumnRules {
    pub columns: HashMap<(u32, i16), Arc<Strategy>>,
    /// Whole-row values of these types hold a masked column.
    pub rowtypes: HashSet<u32>,
    /// Relations with a masked column, as (schema, name) in lower case.
    pub tables: HashSet<(String, String)>,
    /// User-defined functions (see [`FUNCTIONS_QUERY`]): their results may
    /// come from a masked table that the calling statement never names.
    pub functions: Arc<HashSet<String>>,
    /// The column parts of the rules that apply (lower-case globs): a write
    /// that copies a column of one of these names elsewhere is refused.
    pub column_names: Vec<crate::config::Pattern>,
}

impl ColumnRules {
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty() && self.rowtypes.is_empty()
    }

    /// Whether a relation as a statement names it (schema if written) has a
    /// masked column. An unqualified name matches in any schema, since the
    /// session's search_path decides which one it is. The planner's
    /// statistics count too, while anything is masked: they hold sample
    /// values (most common values, histogram bounds) of every column the
    /// reader may read, masked ones included.
    pub fn masks_table(&self, schema: Option<&str>, name: &str) -> bool {
        if self.tables.is_empty() {
            return false;
        }
        let statistics = STATISTICS.iter().any(|s| s.eq_ignore_ascii_case(name))
            && schema.is_none_or(|schema| schema.eq_ignore_ascii_case("pg_catalog"));
        statistics
            || self.tables.iter().any(|(s, t)| {
                t.eq_ignore_ascii_case(name) && schema.is_none_or(|schema| s.eq_ignore_ascii_case(schema))
            })
    }

    /// Whether a column name (as a statement reads it) may be a masked
    /// column's, in any table: a bare name cannot say which table it is.
    pub fn may_be_masked(&self, column: &str) -> bool {
        let column = column.to_ascii_lowercase();
        self.column_names.iter().any(|p| p.matches(&column))
    }

    /// Whether a function a statement calls (by base name) may be a
    /// user-defined one, in any schema and whatever its arguments.
    pub fn user_function(&self, name: &str) -> bool {
        if self.functions.is_empty() {
            return false;
        }
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.functions.contains(&name.to_ascii_lowercase());
        }
        self.functions.contains(name)
    }
}

/// The names of the functions whose results masking cannot attribute:
/// those written in SQL or a procedural language (PL/pgSQL, PL/Python...)
/// outside `pg_catalog` and `information_schema`, which can read any table.
/// Functions in C or `internal` are the server's and its extensions' own and
/// do not read tables by themselves. The names are folded to lower case, so
/// a quoted `"GetSecret"` and an unquoted `getsecret` both count: matching
/// too much only masks more.
pub const FUNCTIONS_QUERY: &str = "SELECT DISTINCT pg_catalog.lower(p.proname) \
     FROM pg_catalog.pg_proc p \
     JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND l.lanname NOT IN ('c', 'internal')";

/// A glob as an `ILIKE` pattern in an `E''` literal: `*` and `?` become `%`
/// and `_`, while `%`, `_` and `\` written in the glob match themselves.
fn like(glob: &str) -> String {
    let mut out = String::from("E'");
    for c in glob.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            // In an E'' literal a backslash is written twice; ILIKE then
            // reads one backslash as its escape character.
            '%' | '_' => {
                out.push_str("\\\\");
                out.push(c);
            }
            '\\' => out.push_str("\\\\\\\\"),
            '\'' => out.push_str("''"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The catalog query for these rules; `None` when there are none.
pub fn query(rules: &[MaskRule]) -> Option<String> {
    let patterns: Vec<(usize, &ColumnPattern)> = rules
        .iter()
        .enumerate()
        .flat_map(|(i, rule)| rule.columns.iter().map(move |p| (i, p)))
        .collect();
    if patterns.is_empty() {
        return None;
    }
    let mut values = String::new();
    for (n, (i, pattern)) in patterns.iter().enumerate() {
        if n > 0 {
            values.push_str(", ");
        }
        let _ = write!(
            values,
            "({i}, {}, {}, {})",
            like(&pattern.schema),
            like(&pattern.table),
            like(&pattern.column)
        );
    }
    Some(matching(
        &values,
        "SELECT m.relid::int8, a.attnum, c.reltype::int8, ty.typarray::int8, m.rule, n.nspname, c.relname, a.attname",
        "JOIN pg_catalog.pg_type ty ON ty.oid = c.reltype ORDER BY m.rule",
    ))
}

/// The columns that `(key, schema, table, column)` ILIKE patterns in
/// `values` match, with `key`, and the columns that show them: the same
/// column of inheritance children and partitions (by name), and every
/// column of a view or materialized view that depends on one (views of
/// views too). `select` picks from `m` (relid, attname, rule = the key),
/// `a` (the attribute), `c` (its relation) and `n` (its schema); `tail`
/// may join more and order.
fn matching(values: &str, select: &str, tail: &str) -> String {
    format!(
        "WITH RECURSIVE matched(relid, attname, rule) AS (\
           SELECT c.oid, a.attname, r.rule \
           FROM pg_catalog.pg_attribute a \
           JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
           JOIN (VALUES {values}) AS r(rule, s, t, col) \
             ON n.nspname ILIKE r.s AND c.relname ILIKE r.t AND a.attname ILIKE r.col \
           WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'p', 'f') \
           UNION \
           SELECT x.relid, x.attname, m.rule \
           FROM matched m \
           CROSS JOIN LATERAL (\
             SELECT i.inhrelid AS relid, m.attname AS attname \
             FROM pg_catalog.pg_inherits i WHERE i.inhparent = m.relid \
             UNION ALL \
             SELECT rw.ev_class, va.attname \
             FROM pg_catalog.pg_attribute ba \
             JOIN pg_catalog.pg_depend d ON d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
               AND d.refobjid = ba.attrelid AND d.refobjsubid = ba.attnum \
               AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
             JOIN pg_catalog.pg_rewrite rw ON rw.oid = d.objid AND rw.ev_class <> ba.attrelid \
             JOIN pg_catalog.pg_attribute va ON va.attrelid = rw.ev_class AND va.attnum > 0 AND NOT va.attisdropped \
             WHERE ba.attrelid = m.relid AND ba.attname = m.attname\
           ) x\
         ) \
         {select} \
         FROM matched m \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = m.relid AND a.attname = m.attname \
         JOIN pg_catalog.pg_class c ON c.oid = m.relid \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         {tail}"
    )
}

/// Columns of the catalog query's rows.
pub const FIELDS: usize = 8;

/// Where a result column comes from, and its tags: for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnOrigin {
    /// `schema.table.column`.
    pub column: Arc<str>,
    pub tags: Arc<[String]>,
}

/// Origins by (table OID, attribute number), as RowDescription names them.
pub type Origins = HashMap<(u32, i16), ColumnOrigin>;

/// Columns of the origins query's rows.
pub const ORIGIN_FIELDS: usize = 6;

/// The query for the origins of the columns the trail describes: every
/// column of a tagged relation, tagged columns, and masked columns (whose
/// origin says what was masked). `None` when nothing is tagged or masked.
/// Rows: relation OID, attribute number, schema, relation, column, and the
/// index of the tag (-1 for a masked column without one).
pub fn origins_query(tags: &[crate::config::TagRule], rules: &[MaskRule]) -> Option<String> {
    let mut values = String::new();
    let mut add = |tag: i64, schema: &str, table: &str, column: &str| {
        if !values.is_empty() {
            values.push_str(", ");
        }
        let _ = write!(values, "({tag}, {}, {}, {})", like(schema), like(table), like(column));
    };
    for (i, rule) in tags.iter().enumerate() {
        for relation in &rule.relations {
            let schema = relation.schema.as_ref().map_or("*", |p| p.as_str());
            add(i as i64, schema, relation.name.as_str(), "*");
        }
        for column in &rule.columns {
            add(i as i64, &column.schema, &column.table, &column.column);
        }
    }
    for pattern in rules.iter().flat_map(|r| &r.columns) {
        add(-1, &pattern.schema, &pattern.table, &pattern.column);
    }
    if values.is_empty() {
        return None;
    }
    // Views and partitions of what is tagged show it too: their columns
    // carry the tags (and their own names as origin: what the client read).
    Some(matching(
        &values,
        "SELECT m.relid::int8, a.attnum, n.nspname, c.relname, a.attname, m.rule",
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')",
    ))
}

/// Reads the origins query's rows (text values, in its column order).
pub fn origins_from_rows<'a>(
    rows: impl IntoIterator<Item = [&'a str; ORIGIN_FIELDS]>,
    tags: &[crate::config::TagRule],
) -> Result<Origins, String> {
    let mut found: HashMap<(u32, i16), (String, Vec<String>)> = HashMap::new();
    for [relid, attnum, schema, table, column, tag] in rows {
        let bad = |what: &str, value: &str| format!("origin row: {what} {value:?} is not a number");
        let relid: u32 = relid.parse().map_err(|_| bad("relation", relid))?;
        let attnum: i16 = attnum.parse().map_err(|_| bad("attribute", attnum))?;
        let tag: i64 = tag.parse().map_err(|_| bad("tag", tag))?;
        let entry = found
            .entry((relid, attnum))
            .or_insert_with(|| (format!("{schema}.{table}.{column}"), Vec::new()));
        if let Some(rule) = usize::try_from(tag).ok().and_then(|i| tags.get(i))
            && !entry.1.contains(&rule.tag)
        {
            entry.1.push(rule.tag.clone());
        }
    }
    Ok(found
        .into_iter()
        .map(|(key, (column, mut tags))| {
            tags.sort();
            (
                key,
                ColumnOrigin {
                    column: Arc::from(column),
                    tags: Arc::from(tags),
                },
            )
        })
        .collect())
}

/// Builds a snapshot from the query's rows (text values, in its column
/// order). A row that does not read is an error: the caller then masks by
/// detectors only and says so.
pub fn from_rows<'a>(
    rows: impl IntoIterator<Item = [&'a str; FIELDS]>,
    functions: impl IntoIterator<Item = &'a str>,
) -> Result<Catalog, String> {
    let mut columns: HashMap<(u32, i16), Vec<usize>> = HashMap::new();
    let mut rowtypes: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut names = HashMap::new();
    let mut column_names = HashMap::new();
    for [relid, attnum, reltype, typarray, rule, schema, table, column] in rows {
        let bad = |what: &str, value: &str| format!("catalog row: {what} {value:?} is not a number");
        let relid: u32 = relid.parse().map_err(|_| bad("relation", relid))?;
        let attnum: i16 = attnum.parse().map_err(|_| bad("attribute", attnum))?;
        let reltype: u32 = reltype.parse().map_err(|_| bad("row type", reltype))?;
        let typarray: u32 = typarray.parse().map_err(|_| bad("array type", typarray))?;
        let rule: usize = rule.parse().map_err(|_| bad("rule", rule))?;
        names.insert(relid, (schema.to_lowercase(), table.to_lowercase()));
        column_names.insert((relid, attnum), column.to_lowercase());
        let entry = columns.entry((relid, attnum)).or_default();
        if !entry.contains(&rule) {
            entry.push(rule);
        }
        for row_type in [reltype, typarray] {
            if row_type != 0 {
                let entry = rowtypes.entry(row_type).or_default();
                if !entry.contains(&rule) {
                    entry.push(rule);
                }
            }
        }
    }
    Ok(Catalog {
        columns,
        column_names,
        names,
        rowtypes,
        functions: Arc::new(functions.into_iter().map(str::to_ascii_lowercase).collect()),
        origins: Arc::default(),
        loaded: Instant::now(),
    })
}

impl Catalog {
    /// The rules that apply to an identity with these groups: for each
    /// column, the first matching rule (in file order) that applies.
    pub fn for_identity(&self, rules: &[MaskRule], groups: &[String]) -> ColumnRules {
        let applies = |i: &usize| rules.get(*i).is_some_and(|r| r.applies_to(groups));
        let columns: HashMap<(u32, i16), Arc<Strategy>> = self
            .columns
            .iter()
            .filter_map(|(key, matching)| {
                let first = matching.iter().copied().filter(applies).min()?;
                Some((*key, rules[first].strategy.clone()))
            })
            .collect();
        let tables = columns
            .keys()
            .filter_map(|(relid, _)| self.names.get(relid).cloned())
            .collect();
        let rowtypes = self
            .rowtypes
            .iter()
            .filter(|(_, matching)| matching.iter().any(applies))
            .map(|(oid, _)| *oid)
            .collect();
        // The rules' column patterns, and the names masked columns really
        // have (a view may show a masked column under another name).
        let mut column_names: Vec<crate::config::Pattern> = rules
            .iter()
            .filter(|r| r.applies_to(groups))
            .flat_map(|r| &r.columns)
            .map(|p| p.column.to_ascii_lowercase())
            .chain(columns.keys().filter_map(|key| self.column_names.get(key).cloned()))
            .collect::<std::collections::BTreeSet<String>>()
            .into_iter()
            .map(crate::config::Pattern::new)
            .collect();
        column_names.dedup();
        ColumnRules {
            columns,
            rowtypes,
            tables,
            functions: self.functions.clone(),
            column_names,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(columns: &[&str], strategy: &str, groups: &[&str]) -> MaskRule {
        MaskRule {
            columns: columns.iter().map(|c| ColumnPattern::parse(c).unwrap()).collect(),
            strategy: Arc::new(Strategy::parse(strategy, None).unwrap()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn globs_become_escaped_like_patterns() {
        assert_eq!(like("*email*"), "E'%email%'");
        assert_eq!(like("card_number"), "E'card\\\\_number'");
        assert_eq!(like("a?c"), "E'a_c'");
        assert_eq!(like("50%"), "E'50\\\\%'");
    }

    #[test]
    fn the_query_names_every_pattern_with_its_rule() {
        let rules = [
            rule(&["public.customers.email"], "email", &[]),
            rule(&["ssn", "*card*"], "redact", &[]),
        ];
        let sql = query(&rules).unwrap();
        assert!(sql.contains("(0, E'public', E'customers', E'email')"), "{sql}");
        assert!(sql.contains("(1, E'%', E'%', E'ssn')"), "{sql}");
        assert!(sql.contains("(1, E'%', E'%', E'%card%')"), "{sql}");
        assert_eq!(query(&[]), None);
    }

    #[test]
    fn the_first_applicable_rule_decides_per_identity() {
        let rules = [
            rule(&["email"], "redact:leads-see-this", &["leads"]),
            rule(&["email", "ssn"], "partial:2", &[]),
        ];
        let catalog = from_rows(
            [
                ["16384", "3", "16386", "16385", "0", "public", "customers", "email"],
                ["16384", "3", "16386", "16385", "1", "public", "customers", "email"],
                ["16384", "5", "16386", "16385", "1", "public", "customers", "SSN"],
            ],
            ["get_secret", "Report"],
        )
        .unwrap();
        let leads = catalog.for_identity(&rules, &["leads".to_string()]);
        assert_eq!(leads.columns[&(16384, 3)].to_string(), "redact:leads-see-this");
        assert_eq!(leads.columns[&(16384, 5)].to_string(), "partial:2");
        let others = catalog.for_identity(&rules, &["engineering".to_string()]);
        assert_eq!(others.columns[&(16384, 3)].to_string(), "partial:2");
        assert!(others.rowtypes.contains(&16386) && others.rowtypes.contains(&16385));
        assert!(others.masks_table(None, "Customers") && others.masks_table(Some("public"), "customers"));
        assert!(!others.masks_table(Some("audit"), "customers") && !others.masks_table(None, "orders"));
        // The statistics show sample values of every column.
        assert!(others.masks_table(None, "pg_stats") && others.masks_table(Some("PG_CATALOG"), "PG_STATS_EXT"));
        assert!(others.masks_table(None, "pg_statistic") && !others.masks_table(Some("public"), "pg_stats"));
        assert!(!ColumnRules::default().masks_table(None, "pg_stats"));
        assert!(others.user_function("get_secret") && others.user_function("GET_SECRET"));
        assert!(others.user_function("report") && !others.user_function("upper"));
        assert!(from_rows([["x", "1", "1", "1", "0", "s", "t", "c"]], []).is_err());
        // Masked columns' names, as rules write them and as columns are
        // called (a view may rename one).
        assert!(others.may_be_masked("SSN") && others.may_be_masked("email"));
        assert!(!others.may_be_masked("service"));
    }
}
