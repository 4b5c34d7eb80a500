//! What a statement is and does, as the classifier reports it.

use std::fmt;

/// What kind of statement this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Read,
    Write,
    Ddl,
    Dcl,
    Admin,
    /// SET, RESET, SHOW, DISCARD: the session's own settings.
    Session,
    Transaction,
    CopyIn,
    CopyOut,
    /// DO blocks, CALL, CREATE FUNCTION / PROCEDURE: code the gateway cannot see into.
    Procedural,
    /// Maintenance and housekeeping: VACUUM, ANALYZE, LISTEN, EXPLAIN...
    Utility,
    /// Not understood: never silently allowed.
    Unknown,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::Read,
        Kind::Write,
        Kind::Ddl,
        Kind::Dcl,
        Kind::Admin,
        Kind::Session,
        Kind::Transaction,
        Kind::CopyIn,
        Kind::CopyOut,
        Kind::Procedural,
        Kind::Utility,
        Kind::Unknown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Ddl => "ddl",
            Kind::Dcl => "dcl",
            Kind::Admin => "admin",
            Kind::Session => "session",
            Kind::Transaction => "transaction",
            Kind::CopyIn => "copy_in",
            Kind::CopyOut => "copy_out",
            Kind::Procedural => "procedural",
            Kind::Utility => "utility",
            Kind::Unknown => "unknown",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a statement touches a relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    Read,
    Write,
    /// Created, altered, dropped, granted on, or maintained.
    Ddl,
}

impl Access {
    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Ddl => "ddl",
        }
    }

    pub fn from_name(name: &str) -> Option<Access> {
        [Access::Read, Access::Write, Access::Ddl]
            .into_iter()
            .find(|a| a.name() == name)
    }
}

/// A relation a statement touches. Unquoted identifiers are folded to lower
/// case, as PostgreSQL does; quoted ones keep their case. An unqualified name
/// has no schema: the session's search_path decides where it lives, and the
/// gateway cannot see it, so policy matches it against rules for any schema.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Relation {
    pub schema: Option<String>,
    pub name: String,
    pub access: Access,
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{} ({})", self.name, self.access.name()),
            None => write!(f, "{} ({})", self.name, self.access.name()),
        }
    }
}

macro_rules! features {
    ($($variant:ident = $bit:expr, $name:literal, $what:literal;)*) => {
        /// A risk feature: something about a statement that policy may single out.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Feature {
            $(#[doc = $what] $variant = $bit,)*
        }

        impl Feature {
            pub const ALL: &'static [Feature] = &[$(Feature::$variant,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $(Feature::$variant => $name,)*
                }
            }

            /// What the feature means, for error messages and `policy check`.
            pub fn description(self) -> &'static str {
                match self {
                    $(Feature::$variant => $what,)*
                }
            }
        }
    };
}

features! {
    NoWhere = 0, "no_where", "UPDATE or DELETE without a WHERE clause (or with one that is always true)";
    Drop = 1, "drop", "DROP of a database object";
    Truncate = 2, "truncate", "TRUNCATE";
    Alter = 3, "alter", "ALTER of a database object";
    Grant = 4, "grant", "GRANT or REVOKE of privileges";
    CopyProgram = 5, "copy_program", "COPY to or from a program run on the database server";
    CopyFile = 6, "copy_file", "COPY to or from a file on the database server";
    SetRole = 7, "set_role", "SET ROLE: acting as another database role";
    SessionAuthorization = 8, "session_authorization", "SET SESSION AUTHORIZATION: becoming another user";
    NonstandardStrings = 9, "nonstandard_strings", "turning standard_conforming_strings off, which changes where strings end";
    FileAccess = 10, "file_access", "functions that read or list files on the database server";
    LargeObject = 11, "large_object", "large-object functions (lo_import, lo_export...) that move data in and out of files";
    ForeignData = 12, "foreign_data", "dblink or foreign data wrappers: reaching other databases from this one";
    DynamicSql = 13, "dynamic_sql", "SQL built at run time (EXECUTE in procedural code, query_to_xml...), invisible to the gateway";
    DataModifyingCte = 14, "data_modifying_cte", "INSERT, UPDATE or DELETE inside a WITH clause";
    ExplainAnalyzeWrite = 15, "explain_analyze_write", "EXPLAIN ANALYZE of a write, which executes it";
    CopiesData = 16, "copies_data", "SELECT INTO or CREATE TABLE AS: copies data into a new table, out of reach of masking";
    PreparedSql = 17, "prepared_sql", "PREPARE or EXECUTE of an SQL-level prepared statement";
    SetConfig = 18, "set_config", "set_config(): changes settings (even the role) from inside a query";
    SystemConfig = 19, "system_config", "ALTER SYSTEM: changes the server's configuration file";
    Extension = 20, "extension", "CREATE or ALTER EXTENSION: installs code into the database";
    SearchPath = 21, "search_path", "changes search_path, which decides what unqualified names refer to";
    ServerAdmin = 22, "server_admin", "functions that administer the server or other sessions (pg_terminate_backend, pg_reload_conf...)";
    CopyCustomFormat = 23, "copy_custom_format", "COPY with its own delimiter, quote or escape character";
    CopyBinary = 24, "copy_binary", "COPY in binary format, whose values carry no type the gateway could read them by";
}

impl Feature {
    pub fn from_name(name: &str) -> Option<Feature> {
        Feature::ALL.iter().copied().find(|f| f.name() == name)
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of features, as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Features(u32);

impl Features {
    pub fn insert(&mut self, feature: Feature) {
        self.0 |= 1 << feature as u32;
    }

    pub fn contains(self, feature: Feature) -> bool {
        self.0 & (1 << feature as u32) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }

    /// Whether any feature of `other` is in this set.
    pub fn intersects(self, other: Features) -> bool {
        self.0 & other.0 != 0
    }

    pub fn iter(self) -> impl Iterator<Item = Feature> {
        Feature::ALL.iter().copied().filter(move |f| self.contains(*f))
    }
}

impl FromIterator<Feature> for Features {
    fn from_iter<I: IntoIterator<Item = Feature>>(iter: I) -> Features {
        let mut set = Features::default();
        for feature in iter {
            set.insert(feature);
        }
        set
    }
}

/// One statement's classification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementClass {
    pub kind: Kind,
    /// Relations touched, each with its access, without duplicates, sorted.
    pub relations: Vec<Relation>,
    pub features: Features,
    /// The statement may touch relations the classifier cannot see (code in
    /// a DO block or function, SQL built at run time, EXECUTE of a prepared
    /// statement). Deny and approval rules about relations apply to it.
    pub opaque: bool,
    /// Why the statement is `unknown`, or a note on how it was classified.
    pub note: Option<String>,
    /// The command keyword(s), for messages: "DELETE", "CREATE TABLE"...
    pub command: String,
    /// For PREPARE, EXECUTE and DEALLOCATE: the SQL-level prepared statement
    /// named (`None` with DEALLOCATE ALL).
    pub prepared: Option<PreparedRef>,
    /// The functions the statement calls, by base name in lower case,
    /// without duplicates, sorted. Masking needs them: a user-defined
    /// function can read a masked table that the statement never names.
    pub functions: Vec<String>,
    /// Where the values its writes store come from (INSERT, UPDATE, MERGE
    /// at any depth). Masking needs it: a session masked by rule must not
    /// copy a masked column's value into a column it can read in clear.
    pub written: WrittenValues,
}

/// The sources of the values a statement's writes store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WrittenValues {
    pub assignments: Vec<Assigned>,
    /// A write whose values are not followed (MERGE, a statement the
    /// parser does not read).
    pub opaque: bool,
}

/// One written column and what its value reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assigned {
    /// The column written (an UPDATE's SET target); empty when the write
    /// does not say which column a value goes to (INSERT).
    pub column: String,
    /// Column names the value reads (the last part of a qualified name),
    /// in lower case unless quoted.
    pub reads: Vec<String>,
    /// Functions the value calls, by base name.
    pub functions: Vec<String>,
    /// Tables (last name part) the value can read: those it names, and for
    /// an UPDATE its own table and FROM list.
    pub tables: Vec<String>,
    /// The value copies whole rows or every column (a `*`, `t.*`, a table
    /// or alias used as a value, `TABLE t`).
    pub whole_rows: bool,
}

/// How a statement refers to an SQL-level prepared statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreparedRef {
    Prepare(String),
    Execute(String),
    Deallocate(Option<String>),
}

impl StatementClass {
    pub fn unknown(reason: impl Into<String>) -> StatementClass {
        StatementClass {
            kind: Kind::Unknown,
            relations: Vec::new(),
            features: Features::default(),
            opaque: true,
            note: Some(reason.into()),
            command: String::new(),
            prepared: None,
            functions: Vec::new(),
            // What it may write cannot be followed.
            written: WrittenValues {
                assignments: Vec::new(),
                opaque: true,
            },
        }
    }
}

/// The classification of a whole statement text (one Query or Parse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// Each statement, in order. Empty for an empty query string.
    pub statements: Vec<StatementClass>,
}

impl Classification {
    /// Whether nothing in the text was understood as a statement.
    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }

    /// The prepared statements its plain `EXECUTE name` statements run.
    pub fn executed(&self) -> impl Iterator<Item = &str> {
        self.statements.iter().filter_map(|s| match &s.prepared {
            Some(PreparedRef::Execute(name)) => Some(name.as_str()),
            _ => None,
        })
    }

    /// Whether every statement is a plain `EXECUTE name`: what it runs is
    /// named ([`Classification::executed`]).
    pub fn only_executes(&self) -> bool {
        self.statements
            .iter()
            .all(|s| matches!(s.prepared, Some(PreparedRef::Execute(_))))
    }
}
