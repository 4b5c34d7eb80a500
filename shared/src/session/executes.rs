//! What a session's prepared statements may run besides themselves: other
//! prepared statements, through SQL EXECUTE ([`SqlExecutes`]), and portals,
//! through FETCH, MOVE or dynamic SQL ([`Names`], in the proxy).
//!
//! A Parse can prepare `EXECUTE p1`, or `EXPLAIN ANALYZE EXECUTE p1`, and
//! the client can run it at each Bind, long after its Parse was decided.
//! What the gateway knows of `p1` (its row limit, that each run needs
//! approval, the grants it was allowed under) is applied to such a
//! statement when its Parse is decided. A `p1` prepared later would run
//! through it unchecked. So the session remembers the names such
//! statements run, and a later PREPARE or Parse that would give one of
//! them a restriction is refused (`Proxy::executed_elsewhere`).
//!
//! Names are only ever added, for the session (a Close or DEALLOCATE may
//! be skipped after an error: fail closed), and a statement that runs
//! EXECUTE inside another (EXPLAIN, CREATE TABLE AS), or of a name in
//! dynamic SQL, or that names too many, is taken to run any name.

use std::collections::HashSet;

use crate::policy::{Classification, Feature, Kind};

/// Names kept before the session is taken to run any name: a client
/// preparing `EXECUTE <new name>` over and over would grow the set without
/// end.
const MAX_NAMES: usize = 64;

/// Whether a statement's command defines a function or procedure, whose
/// body runs only when called.
fn defines_routine(command: &str) -> bool {
    let rest = command.strip_prefix("CREATE ").unwrap_or("");
    let rest = rest.strip_prefix("OR REPLACE ").unwrap_or(rest);
    rest.starts_with("FUNCTION") || rest.starts_with("PROCEDURE")
}

#[derive(Debug, Default)]
pub(crate) struct SqlExecutes {
    /// Run as a plain `EXECUTE name`; all of them once some statement runs
    /// a name the gateway does not follow.
    names: Names,
}

impl SqlExecutes {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether a statement the session prepared runs EXECUTE of a name
    /// not known.
    pub fn runs_any(&self) -> bool {
        self.names.is_all()
    }

    /// Whether a statement the session prepared may run `name`.
    pub fn runs(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Notes a statement a Parse prepares (`sql`, as the gate classified
    /// it; `standard_conforming_strings` as the server reads it).
    pub fn note(&mut self, sql: &str, classification: &Classification, standard_conforming_strings: bool) {
        if self.names.is_all() || !crate::policy::mentions_execute(sql) {
            return;
        }
        if classification.only_executes() {
            for name in classification.executed() {
                self.names.add(name);
            }
            return;
        }
        // Only EXPLAIN and CREATE TABLE AS (which the parser does not
        // read: unknown) hold an EXECUTE, besides dynamic SQL run now (a DO
        // body, query_to_xml); and text the gate could not read may be
        // anything. Which name those run is not known. The word elsewhere
        // (a string, a comment, `GRANT EXECUTE ON`, `EXECUTE FUNCTION` in a
        // trigger) runs no prepared statement, nor does a function's body
        // until it is called, where the gateway does not see (a documented
        // limit of statement policy).
        let runs_any = classification.statements.iter().any(|s| {
            s.kind == Kind::Unknown
                || (s.features.contains(Feature::DynamicSql) && !defines_routine(&s.command))
                || (s.command.starts_with("EXPLAIN")
                    && crate::policy::executes_keyword(sql, standard_conforming_strings))
        });
        if runs_any {
            self.names.add_all();
        }
    }
}

/// Names of prepared statements or portals, kept for the session; past
/// [`MAX_NAMES`], or once told so, every name counts. The proxy keeps
/// those that may run another portal (SQL FETCH or MOVE, dynamic SQL) in
/// two of these.
#[derive(Debug, Default)]
pub(crate) struct Names {
    names: HashSet<Box<str>>,
    all: bool,
}

impl Names {
    pub fn is_empty(&self) -> bool {
        !self.all && self.names.is_empty()
    }

    pub fn add(&mut self, name: &str) {
        if self.all || self.names.contains(name) {
            return;
        }
        if self.names.len() == MAX_NAMES {
            self.add_all();
        } else {
            self.names.insert(name.into());
        }
    }

    /// Every name counts from now on.
    pub fn add_all(&mut self) {
        self.all = true;
        self.names = HashSet::new();
    }

    pub fn is_all(&self) -> bool {
        self.all
    }

    pub fn contains(&self, name: &str) -> bool {
        self.all || self.names.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noted(sqls: &[&str]) -> SqlExecutes {
        let mut executes = SqlExecutes::default();
        for sql in sqls {
            let classification = crate::policy::classify(sql, &crate::policy::ClassifyOptions::default());
            executes.note(sql, &classification, true);
        }
        executes
    }

    #[test]
    fn plain_executes_name_their_statement_others_any() {
        let executes = noted(&["SELECT 1 AS executed_at", "execute p1", "EXECUTE \"P 2\""]);
        assert!(executes.runs("p1") && executes.runs("P 2"));
        assert!(!executes.runs("p3") && !executes.runs("P1"));
        for other in [
            "EXPLAIN ANALYZE EXECUTE p1",
            "CREATE TABLE c AS EXECUTE p1",
            "DO $$ BEGIN EXECUTE 'EXECUTE p1'; END $$",
            "SELECT query_to_xml('EXECUTE p1', true, false, '')",
        ] {
            let executes = noted(&["EXECUTE p1", other]);
            assert!(executes.runs("p3") && executes.runs_any(), "{other}");
        }
        let harmless = [
            "SELECT 1",
            "SELECT executed FROM t",
            "SELECT 'execute' -- execute p1",
            "GRANT EXECUTE ON FUNCTION f() TO bob",
            "GRANT EXECUTE, USAGE ON SCHEMA s TO bob",
            "CREATE TRIGGER t BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
            "EXPLAIN SELECT 'EXECUTE p1'",
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE 'EXECUTE p1'; END $$",
            "CREATE OR REPLACE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN EXECUTE 'x'; END $$",
        ];
        assert!(noted(&harmless).is_empty());
    }

    #[test]
    fn names_past_the_cap_are_every_name() {
        let mut fetchers = Names::default();
        assert!(fetchers.is_empty());
        for n in 0..MAX_NAMES {
            fetchers.add(&format!("f{n}"));
        }
        assert!(fetchers.contains("f0") && !fetchers.contains("other"));
        fetchers.add("one more");
        assert!(fetchers.contains("other"));
    }

    #[test]
    fn too_many_names_run_any() {
        let sqls: Vec<String> = (0..=MAX_NAMES).map(|n| format!("EXECUTE p{n}")).collect();
        let sqls: Vec<&str> = sqls.iter().map(String::as_str).collect();
        let executes = noted(&sqls[..MAX_NAMES]);
        assert!(executes.runs("p0") && !executes.runs("other"));
        assert!(noted(&sqls).runs("other"));
    }
}
