//! Masking through the gateway, with zero configuration: content detectors
//! on every path a value can take out of PostgreSQL. A bypass corpus tries to
//! read the fixture's sensitive values every way a client can ask for them,
//! and nothing the client receives may contain one in clear.

use futures_util::TryStreamExt;
use tokio_postgres::SimpleQueryMessage;

use crate::harness::{self, ALICE, BOB, Spec, TestGateway, events};

/// A customers table like the demo's. All values are fake: example.com
/// emails, card networks' published test numbers, never-issued SSNs.
const FIXTURE: &str = "
CREATE TABLE customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    phone text,
    card_number text,
    ssn text,
    \"Notes\" jsonb
);
INSERT INTO customers (name, email, phone, card_number, ssn, \"Notes\") VALUES
    ('Ada Lovelace', 'ada.lovelace@example.com', '+1-415-555-0101', '4111111111111111', '123-45-6789',
     '{\"backup_email\": \"ada.backup@example.org\"}'),
    ('Grace Hopper', 'grace.hopper@example.com', '+1-415-555-0102', '5555555555554444', '219-09-9999',
     '{\"card\": \"378282246310005\"}'),
    ('Alan Turing', 'alan.turing@example.com', '+44 20 7946 0958', '6011111111111117', '078-05-1120', NULL);
CREATE TABLE api_keys (id serial PRIMARY KEY, service text, secret text);
INSERT INTO api_keys (service, secret) VALUES
    ('aws', 'AKIAIOSFODNN7EXAMPLE'),
    ('github', 'ghp_x9Demox9Demox9Demox9Demox9Demox9Demo'),
    ('internal', 'not-a-real-secret-but-treat-it-like-one');
CREATE VIEW contacts AS SELECT name, email AS contact, phone FROM customers;
";

/// Every sensitive value of the fixture, and the parts a masked value must
/// not give away either.
const SECRETS: &[&str] = &[
    "ada.lovelace@",
    "grace.hopper@",
    "alan.turing@",
    "ada.backup@",
    "415-555-0101",
    "415-555-0102",
    "7946 0958",
    "4111111111111111",
    "5555555555554444",
    "6011111111111117",
    "378282246310005",
    "123-45-6789",
    "219-09-9999",
    "078-05-1120",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_x9Demo",
];

/// Any value, as the bytes the server sent.
#[derive(Debug)]
struct Raw(#[allow(dead_code)] Vec<u8>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Raw, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

fn assert_no_secret(what: &str, received: &str) {
    for secret in SECRETS {
        assert!(
            !received.contains(secret),
            "{what}: {secret} reached the client:\n{received}"
        );
    }
}

/// The bypass corpus, through psql (simple protocol, psql's COPY and
/// cursors). Each entry must leave no clear value in stdout or stderr.
const CORPUS: &[&str] = &[
    "SELECT * FROM customers",
    "SELECT email AS e, card_number AS \"Card\" FROM customers",
    "SELECT upper(email), lower(ssn) FROM customers",
    "SELECT email || '' FROM customers",
    "SELECT concat(name, ' <', email, '>') FROM customers",
    "SELECT format('%s / %s', email, phone) FROM customers",
    "SELECT substring(email from 1) FROM customers",
    "SELECT string_agg(email, ',') FROM customers",
    "SELECT string_agg(card_number, ' ') FROM customers",
    "SELECT array_agg(email) FROM customers",
    "SELECT array_agg(ssn ORDER BY id) FROM customers",
    "SELECT json_agg(c) FROM customers c",
    "SELECT row_to_json(c) FROM customers c",
    "SELECT to_jsonb(c) FROM customers c",
    "SELECT jsonb_build_object('e', email, 'c', card_number) FROM customers",
    "SELECT c FROM customers c",
    "SELECT c::text FROM customers c",
    "SELECT (c).* FROM customers c",
    "SELECT \"Notes\" FROM customers",
    "SELECT \"Notes\"->>'backup_email', \"Notes\"->'card' FROM customers",
    "SELECT (SELECT email FROM customers ORDER BY id LIMIT 1)",
    "SELECT * FROM (SELECT email, ssn FROM customers) AS sub",
    "WITH x AS (SELECT email, card_number FROM customers) SELECT * FROM x",
    "WITH RECURSIVE r(e) AS (SELECT email FROM customers) SELECT * FROM r",
    "SELECT email FROM customers UNION ALL SELECT ssn FROM customers",
    "SELECT email FROM customers INTERSECT SELECT email FROM customers",
    "SELECT * FROM contacts",
    "SELECT contact FROM contacts WHERE name LIKE 'A%'",
    "SELECT card_number::bigint FROM customers",
    "SELECT card_number::numeric FROM customers",
    "SELECT replace(email, 'x', 'x') FROM customers",
    "SELECT trim(' ' || email || ' ') FROM customers",
    "SELECT md5(email), email FROM customers",
    "SELECT secret FROM api_keys",
    "SELECT service || ':' || secret FROM api_keys",
    "SELECT ssn::int FROM customers",
    "SELECT email::int FROM customers",
    "SELECT card_number::int FROM customers",
    "SELECT 1 / 0 FROM customers WHERE email = 'ada.lovelace@example.com'",
    "SELECT email::date FROM customers",
    "DO $$ BEGIN RAISE NOTICE 'found %', (SELECT email FROM customers LIMIT 1); END $$",
    "DO $$ BEGIN RAISE EXCEPTION 'leak %', (SELECT ssn FROM customers LIMIT 1); END $$",
    // A value that begins a field, right after its code letter.
    "DO $$ BEGIN RAISE EXCEPTION USING MESSAGE = (SELECT ssn FROM customers LIMIT 1), DETAIL = (SELECT card_number FROM customers LIMIT 1); END $$",
    "DO $$ BEGIN RAISE NOTICE USING MESSAGE = (SELECT phone FROM customers LIMIT 1); END $$",
    "SELECT pg_notify('leaks', email) FROM customers",
    "BEGIN; DECLARE cur CURSOR FOR SELECT * FROM customers; FETCH 2 FROM cur; FETCH ALL FROM cur; COMMIT",
    "BEGIN; DECLARE bcur BINARY CURSOR FOR SELECT email, card_number FROM customers; FETCH ALL FROM bcur; COMMIT",
    "BEGIN; UPDATE customers SET name = name RETURNING *; ROLLBACK",
    "BEGIN; INSERT INTO customers (name, email) VALUES ('x', 'x.leak@example.net') RETURNING email; ROLLBACK",
    "BEGIN; DELETE FROM customers RETURNING email, ssn; ROLLBACK",
    "PREPARE q AS SELECT email FROM customers WHERE id > $1; EXECUTE q(0)",
    "COPY customers TO STDOUT",
    "COPY customers TO STDOUT WITH (FORMAT csv, HEADER)",
    "COPY customers TO STDOUT WITH (FORMAT csv, DELIMITER '|', QUOTE '''')",
    "COPY customers TO STDOUT WITH (DELIMITER 'X')",
    "COPY customers TO STDOUT WITH (FORMAT csv, DELIMITER '7')",
    "COPY customers TO STDOUT WITH (FORMAT csv, DELIMITER ':')",
    "COPY customers TO STDOUT DELIMITER 'X'",
    "COPY customers TO STDOUT WITH CSV QUOTE 'X'",
    "COPY (SELECT E'-----BEGIN RSA PRIVATE KEY-----\\nMIIEowIBAAKCAQEA7xq0\\n-----END RSA PRIVATE KEY-----') TO STDOUT WITH (FORMAT csv)",
    "COPY (SELECT email, card_number FROM customers) TO STDOUT",
    "COPY (SELECT row_to_json(c) FROM customers c) TO STDOUT WITH (FORMAT csv)",
    "COPY api_keys TO STDOUT",
    "COPY customers TO STDOUT WITH (FORMAT binary)",
    "\\copy customers to stdout",
    "\\copy customers to stdout with (format csv, header)",
    "\\copy (SELECT email, card_number, ssn FROM customers) to stdout with (format csv)",
    "\\copy customers to stdout with (format binary)",
    "SELECT email FROM customers /* a comment */ -- and another",
    "select EMAIL from CUSTOMERS",
    "SELECT \"email\" FROM \"public\".\"customers\"",
    "TABLE customers",
    "SELECT email FROM ONLY customers",
    "SELECT E'\\x41' || email FROM customers",
    // Records and arrays print a field the query chose after the value:
    // `(4111111111111111,100)` is no thousands group.
    "SELECT id, (card_number, 100), (ssn, 100), (phone, 100), array[card_number, ssn, '100'] FROM customers",
    "SELECT (ssn, 100)::text::int FROM customers",
    "SELECT pg_notify('leaks', (ssn, 100)::text) FROM customers",
    "COPY (SELECT card_number::int8, array[ssn::char(97)] FROM customers) TO STDOUT WITH (FORMAT binary)",
    "COPY (SELECT 1) TO STDOUT (FORMAT BINARY)",
    "COPY customers TO STDOUT BINARY",
    "SELECT left(card_number, 20) FROM customers",
    "SELECT regexp_replace(email, '$', '') FROM customers",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bypass_corpus_never_shows_a_clear_value_over_psql() {
    let gw = TestGateway::start("mask_corpus", Spec::default()).await;
    harness::setup(&gw.db, FIXTURE).await;
    assert!(CORPUS.len() >= 60, "{}", CORPUS.len());
    let conn = gw.conn_str("bob", BOB, "");
    let mut script = String::from("LISTEN leaks;\n");
    for query in CORPUS {
        script.push_str(query);
        // A psql meta-command takes its whole line; SQL ends at the `;`.
        script.push_str(if query.starts_with('\\') { "\n" } else { ";\n" });
    }
    let out = harness::psql(&conn, &["-v", "ON_ERROR_STOP=0", "-f", "-"], Some(&script)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_no_secret("stdout", &stdout);
    assert_no_secret("stderr", &stderr);
    assert!(!stderr.contains("\\copy:"), "psql rejected a \\copy line: {stderr}");
    // The corpus really reached the data: masked values are there instead.
    for masked in [
        "****@example.com",
        "[masked:ssn]",
        "************1111",
        "[masked:aws_access_key]",
    ] {
        assert!(stdout.contains(masked), "no {masked} in:\n{stdout}");
    }
    assert!(
        stderr.contains("invalid input syntax for type integer: \"[masked:ssn]\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("COPY TO with its own DELIMITER, QUOTE or ESCAPE cannot be masked"),
        "{stderr}"
    );
    assert!(stderr.contains("COPY TO in binary format cannot be masked"), "{stderr}");
    assert!(!stdout.contains("MIIEowIBAAKCAQEA7xq0"), "{stdout}");
    assert!(
        stdout.contains("Asynchronous notification \"leaks\" with payload \"****@example.com\""),
        "{stdout}"
    );
    // And the session kept working after every error: the last query ran.
    assert!(stdout.trim_end().ends_with("****@example.com"), "{stdout}");
}

/// tokio-postgres reads results in binary: text columns are masked in place,
/// numbers holding card numbers become NULL, and the extended protocol's
/// re-executions without Describe are read with the right formats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_results_and_prepared_statements_are_masked() {
    let gw = TestGateway::start("mask_binary", Spec::default()).await;
    harness::setup(&gw.db, FIXTURE).await;
    let client = gw.connect(BOB).await.unwrap();
    let statement = client
        .prepare("SELECT email, card_number::bigint, card_number::numeric::text, ssn, \"Notes\" FROM customers WHERE id >= $1 ORDER BY id")
        .await
        .unwrap();
    for _ in 0..3 {
        let rows = client.query(&statement, &[&1i32]).await.unwrap();
        assert_eq!(rows.len(), 3);
        for row in &rows {
            let email: String = row.get(0);
            assert!(email.starts_with("****@example."), "{email}");
            let card: Option<i64> = row.get(1);
            assert_eq!(card, None, "a card number in an int8 becomes NULL");
            let card_text: String = row.get(2);
            assert!(card_text.starts_with("****"), "{card_text}");
            let ssn: String = row.get(3);
            assert_eq!(ssn, "[masked:ssn]");
            let notes: Option<serde_json::Value> = row.get(4);
            assert_no_secret("jsonb", &format!("{notes:?}"));
        }
    }
    // Arrays, records and numbers in binary are read element by element, as
    // their text would show them: a text element 97 bytes long has a length
    // that reads as an `a` joined to it (`a123-45-6789`).
    let rows = client
        .query(
            "SELECT id, array[ssn::char(97)], array[phone::char(48)], array[card_number::int8], \
             row(card_number::int8, 100), (ssn, 100), card_number::xid8, card_number::float8 \
             FROM customers ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert!(row.get::<_, i32>(0) > 0);
        for column in 1..8 {
            let value: Option<Raw> = row.get(column);
            assert!(value.is_none(), "column {column}: {value:?}");
        }
    }
    // A portal fetched in chunks, inside a transaction.
    let mut tx_client = gw.connect(BOB).await.unwrap();
    let tx = tx_client.transaction().await.unwrap();
    let portal = tx.bind("SELECT email FROM customers ORDER BY id", &[]).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 1).await.unwrap();
        if rows.is_empty() {
            break;
        }
        seen.extend(rows.iter().map(|r| r.get::<_, String>(0)));
    }
    tx.commit().await.unwrap();
    assert_eq!(seen.len(), 3);
    assert_no_secret("portal", &seen.join("\n"));

    // The simple protocol through the same driver.
    let messages = client.simple_query("SELECT email, ssn FROM customers").await.unwrap();
    let text: Vec<String> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(format!("{:?} {:?}", row.get(0), row.get(1))),
            _ => None,
        })
        .collect();
    assert_eq!(text.len(), 3);
    assert_no_secret("simple", &text.join("\n"));
}

/// COPY TO STDOUT through tokio-postgres in text and CSV is masked; binary
/// COPY is refused, since its values carry no type to read them by (a card
/// number cast to int8 is eight bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_out_is_masked_in_text_and_csv_and_binary_is_refused() {
    let gw = TestGateway::start("mask_copy", Spec::default()).await;
    harness::setup(&gw.db, FIXTURE).await;
    let client = gw.connect(BOB).await.unwrap();
    for statement in [
        "COPY customers TO STDOUT",
        "COPY customers TO STDOUT WITH (FORMAT csv, HEADER)",
    ] {
        let stream = client.copy_out(statement).await.unwrap();
        let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
        let text = String::from_utf8(chunks.concat()).unwrap();
        assert_no_secret(statement, &text);
        // Rows keep their shape: as many lines and fields as before.
        assert_eq!(text.lines().filter(|l| l.contains("example")).count(), 3, "{text}");
    }
    for statement in [
        "COPY (SELECT email, ssn FROM customers) TO STDOUT WITH (FORMAT binary)",
        "COPY (SELECT card_number::int8 FROM customers) TO STDOUT WITH (FORMAT binary)",
        "COPY customers TO STDOUT BINARY",
    ] {
        let err = match client.copy_out(statement).await {
            Ok(_) => panic!("{statement}: binary COPY ran"),
            Err(err) => err,
        };
        let db = err.as_db_error().unwrap_or_else(|| panic!("{statement}: {err}"));
        assert_eq!(db.code().code(), "42501", "{statement}");
        assert!(
            db.message().contains("COPY TO in binary format cannot be masked"),
            "{}",
            db.message()
        );
    }
    // The session goes on.
    let rows = client.query("SELECT count(*) FROM customers", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 3);
}

/// psql's aligned output lines up with masked values in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_tables_still_line_up() {
    let gw = TestGateway::start("mask_psql", Spec::default()).await;
    harness::setup(&gw.db, FIXTURE).await;
    let conn = gw.conn_str("bob", BOB, "");
    let out = harness::psql(
        &conn,
        &[
            "-P",
            "format=aligned",
            "-P",
            "tuples_only=off",
            "-c",
            "SELECT id, email, ssn FROM customers ORDER BY id",
        ],
        None,
    )
    .await;
    let text = harness::stdout_ok(&out);
    let lines: Vec<&str> = text.lines().filter(|l| l.contains('|')).collect();
    assert_eq!(lines.len(), 4, "{text}");
    let bars = |l: &str| {
        l.char_indices()
            .filter(|(_, c)| *c == '|')
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    for line in &lines {
        assert_eq!(bars(line), bars(lines[0]), "{text}");
    }
    assert!(
        text.contains("****@example.com") && text.contains("[masked:ssn]"),
        "{text}"
    );
    assert_no_secret("psql", &text);
}

/// The unmask grant is a policy grant: its holders see clear values on the
/// targets it names, and each session that uses it is recorded with the
/// grant's name; everyone else is masked as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unmask_grant_shows_clear_values_and_is_logged() {
    let spec = Spec {
        policy: Some(
            "[policy]\ndefault = \"allow\"\n\n\
             [[policy.grants]]\nname = \"oncall-sees-clear\"\ngrant = \"unmask\"\ngroups = [\"oncall\"]\n\n\
             [[policy.grants]]\nname = \"alice-elsewhere\"\ngrant = \"unmask\"\nusers = [\"alice\"]\ntargets = [\"other-*\"]\n"
                .into(),
        ),
        ..Spec::default()
    };
    let gw = TestGateway::start("mask_grant", spec).await;
    harness::setup(&gw.db, FIXTURE).await;
    let bob = gw.connect(BOB).await.unwrap();
    let email: String = bob
        .query_one("SELECT email FROM customers WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(email, "ada.lovelace@example.com");
    let alice = gw.connect(ALICE).await.unwrap();
    let email: String = alice
        .query_one("SELECT email FROM customers WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(email, "****@example.com");
    let grants: Vec<_> = events::for_target(&gw.db)
        .into_iter()
        .filter(|e| e.message.contains("unmask grant used"))
        .collect();
    assert_eq!(grants.len(), 1, "{grants:#?}");
    assert!(
        grants[0].fields.get("identity").is_some_and(|i| i.contains("bob")),
        "{grants:#?}"
    );
    assert_eq!(
        grants[0].fields.get("grant").map(String::as_str),
        Some("oncall-sees-clear")
    );
}

/// Masking can be turned off, and detectors chosen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detectors_are_configurable() {
    let spec = Spec {
        extra: "[masking]\ndetectors = [\"ssn\"]\n".into(),
        ..Spec::default()
    };
    let gw = TestGateway::start("mask_some", spec).await;
    harness::setup(&gw.db, FIXTURE).await;
    let client = gw.connect(BOB).await.unwrap();
    let row = client
        .query_one("SELECT email, ssn FROM customers WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "ada.lovelace@example.com");
    assert_eq!(row.get::<_, String>(1), "[masked:ssn]");
    // Only the chosen detectors run, on every path.
    let stream = client
        .copy_out("COPY (SELECT email, ssn FROM customers WHERE id = 1) TO STDOUT")
        .await
        .unwrap();
    let data: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    assert_eq!(data.concat(), b"ada.lovelace@example.com\t[masked:ssn]\n");
}

/// The `[masking]` section of the column-rules test.
fn spec_extra(key: &std::path::Path) -> String {
    format!(
        r#"[masking]
hash_key_file = "{}"

[[masking.rules]]
columns = ["public.api_keys.secret"]
strategy = "redact"

[[masking.rules]]
columns = ["customers.email"]
strategy = "hash"

[[masking.rules]]
columns = ["*.name"]
strategy = "partial:3"
groups = ["engineering"]
"#,
        key.display()
    )
}

/// Column rules: the table's column is masked by its rule whatever the query
/// calls it, in every format, for the identities the rule applies to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_rules_follow_the_column_through_aliases_formats_and_whole_rows() {
    let key = harness::cluster().dev.dir().join("mask-rules.key");
    std::fs::write(&key, "a test key of more than sixteen bytes\n").unwrap();
    let spec = Spec {
        extra: spec_extra(&key),
        ..Spec::default()
    };
    let gw = TestGateway::start("mask_rules", spec).await;
    harness::setup(&gw.db, FIXTURE).await;
    let bob = gw.connect(BOB).await.unwrap();

    // Every secret is redacted, also the one no detector would recognise.
    let secrets: Vec<String> = bob
        .query("SELECT secret AS s FROM api_keys", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(secrets, ["[masked]", "[masked]", "[masked]"]);

    // A keyed hash: the same value gives the same token, in text and binary
    // format and under any alias, so joins and GROUP BY still work.
    let token = |messages: Vec<SimpleQueryMessage>| -> Vec<String> {
        messages
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap().to_string()),
                _ => None,
            })
            .collect()
    };
    let text = token(
        bob.simple_query("SELECT email FROM customers ORDER BY id")
            .await
            .unwrap(),
    );
    let binary: Vec<String> = bob
        .query("SELECT email AS contact FROM customers ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(text, binary);
    assert!(text.iter().all(|t| t.starts_with("h:")), "{text:?}");
    assert_eq!(text.iter().collect::<std::collections::HashSet<_>>().len(), 3);
    let grouped = token(
        bob.simple_query("SELECT email FROM customers GROUP BY email ORDER BY min(id)")
            .await
            .unwrap(),
    );
    assert_eq!(grouped, text);

    // Whole rows of a table with a masked column, and arrays of them.
    let rows = token(bob.simple_query("SELECT c FROM customers c LIMIT 1").await.unwrap());
    assert_eq!(rows, ["[masked:row]"]);
    let arrays = token(bob.simple_query("SELECT array_agg(c) FROM customers c").await.unwrap());
    assert_eq!(arrays, ["[masked:row]"]);

    // A rule for some groups only: alice (engineering) gets it, bob does not.
    let alice = gw.connect(ALICE).await.unwrap();
    let name: String = alice
        .query_one("SELECT name AS n FROM customers WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "*********ace");
    let name: String = bob
        .query_one("SELECT name FROM customers WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "Ada Lovelace");
    // Expressions over a table with masked columns cannot show them: text,
    // json and record expressions are redacted, numbers are not.
    let texts = |messages: Vec<SimpleQueryMessage>| -> Vec<String> {
        messages
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).unwrap_or("NULL"))
                        .collect::<Vec<_>>()
                        .join("|"),
                ),
                _ => None,
            })
            .collect()
    };
    let rows = texts(
        bob.simple_query(
            "SELECT upper(secret), service || secret, row_to_json(k), k::text, count(*) OVER () \
             FROM api_keys k WHERE service = 'internal'",
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        rows,
        ["[masked:expression]|[masked:expression]|[masked:expression]|[masked:expression]|NULL"]
    );
    let lowered: String = bob
        .query_one("SELECT lower(secret) FROM api_keys WHERE service = 'internal'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(lowered, "[masked:expression]");
    let fetched = texts(
        bob.simple_query("BEGIN; DECLARE k CURSOR FOR SELECT initcap(secret) FROM api_keys; FETCH 1 FROM k; COMMIT")
            .await
            .unwrap(),
    );
    assert_eq!(fetched, ["[masked:expression]"]);
    // A portal bound over the protocol is a cursor to SQL as well: what
    // FETCH reads from it is as sensitive as the statement it runs.
    {
        use crate::harness::raw;
        let mut raw_bob = raw::RawClient::connect(gw.addr).await;
        raw_bob.login(&gw.db, BOB).await;
        raw_bob.simple("BEGIN").await;
        raw_bob
            .send(
                &[
                    raw::parse("s", "SELECT upper(secret) FROM api_keys ORDER BY id"),
                    raw::bind("p1", "s"),
                    raw::execute("p1", 1),
                    raw::sync(),
                ]
                .concat(),
            )
            .await;
        let first: Vec<_> = raw_bob
            .until_ready()
            .await
            .into_iter()
            .filter(|(tag, _)| *tag == b'D')
            .map(|(_, body)| raw::data_row(&body))
            .collect();
        assert_eq!(first, [vec![Some("[masked:expression]".to_string())]]);
        let rest = raw_bob.simple("FETCH ALL FROM p1").await;
        assert!(rest.len() >= 2, "{rest:?}");
        for row in rest {
            assert_eq!(row, [Some("[masked:expression]".to_string())]);
        }
        raw_bob.simple("COMMIT").await;
    }
    // Numbers can carry a value out too, one character at a time.
    let codes = texts(
        bob.simple_query("SELECT ascii(substr(secret, 1, 1)) FROM api_keys WHERE service = 'internal'")
            .await
            .unwrap(),
    );
    assert_eq!(codes, ["NULL"]);
    // Errors of such statements keep their SQLSTATE, not their text, which
    // would echo the value; notifications from them are refused.
    let err = gw
        .connect(ALICE)
        .await
        .unwrap()
        .simple_query("SELECT name::int FROM customers WHERE id = 1")
        .await
        .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "22P02");
    assert!(
        !db.message().contains("Lovelace") && db.message().contains("withheld"),
        "{db:?}"
    );
    let err = bob
        .simple_query("SELECT pg_notify('leaks', secret) FROM api_keys")
        .await
        .unwrap_err();
    assert!(
        err.as_db_error().unwrap().message().contains("NOTIFY or pg_notify"),
        "{err}"
    );
    let err = bob
        .simple_query("SELECT set_config('x.y', secret, false) FROM api_keys")
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("set_config in a statement"),
        "{err}"
    );
    // Nor may it leave a value in the server for a later statement that
    // reads no masked column: advisory lock keys (pg_locks), a sequence
    // (currval), a large object.
    harness::setup(
        &gw.db,
        "CREATE SEQUENCE leak_seq; GRANT ALL ON SEQUENCE leak_seq TO PUBLIC",
    )
    .await;
    for (statement, named) in [
        (
            "SELECT pg_advisory_lock(i, ascii(substr(secret, i, 1))) FROM api_keys, generate_series(1, 3) AS i",
            "pg_advisory_lock",
        ),
        (
            "SELECT PG_TRY_ADVISORY_XACT_LOCK(length(secret)) FROM api_keys",
            "pg_try_advisory_xact_lock",
        ),
        (
            // (With a literal name, the write to leak_seq is refused
            // already; a computed one names no relation.)
            "SELECT setval(('leak' || '_seq')::regclass, ascii(secret)) FROM api_keys LIMIT 1",
            "setval",
        ),
        (
            "SELECT lo_from_bytea(0, convert_to(secret, 'UTF8')) FROM api_keys LIMIT 1",
            "large object",
        ),
    ] {
        let err = bob.simple_query(statement).await.unwrap_err();
        let message = err.as_db_error().unwrap().message().to_lowercase();
        assert!(
            message.contains(named) && message.contains("masked for you"),
            "{statement}: {err}"
        );
    }
    let locks = texts(
        bob.simple_query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
            .await
            .unwrap(),
    );
    assert_eq!(locks, ["0"]);
    // A statement that reads no masked table is left alone.
    assert_eq!(texts(bob.simple_query("SELECT upper('x')").await.unwrap()), ["X"]);

    // COPY rows carry no column origins: a COPY that reads a table with
    // masked columns is refused, in any form, while other COPYs run.
    let conn = gw.conn_str("bob", BOB, "");
    for copy in [
        "COPY api_keys TO STDOUT",
        "COPY public.api_keys (secret) TO STDOUT WITH (FORMAT csv)",
        "COPY (SELECT secret FROM api_keys) TO STDOUT",
        "COPY (SELECT c.id FROM customers c) TO STDOUT",
    ] {
        let out = harness::psql(&conn, &["-c", copy], None).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("would pass columns that are masked for you"),
            "{copy}: {err}"
        );
        assert_no_secret(copy, &String::from_utf8_lossy(&out.stdout));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("not-a-real"), "{copy}");
    }
    let out = harness::psql(&conn, &["-c", "COPY (SELECT 42) TO STDOUT"], None).await;
    assert_eq!(harness::stdout_ok(&out), "42\n");

    // A view over a masked column masks every column it shows (the catalog
    // does not say which view column carries it), also behind swapped names.
    harness::setup(
        &gw.db,
        "CREATE VIEW swapped AS SELECT service AS secret, secret AS service FROM api_keys; \
         CREATE VIEW nested AS SELECT * FROM swapped; \
         CREATE MATERIALIZED VIEW keys_copy AS SELECT service, secret FROM api_keys",
    )
    .await;
    // A new session reads the catalog again once the snapshot expires; this
    // gateway's TTL is the default, so look from a fresh gateway instead.
    let gw2 = TestGateway::start_for(
        gw.db.clone(),
        Spec {
            extra: spec_extra(&key),
            ..Spec::default()
        },
    )
    .await;
    let bob2 = gw2.connect(BOB).await.unwrap();
    for view in ["swapped", "nested", "keys_copy"] {
        let rows = bob2.simple_query(&format!("SELECT * FROM {view}")).await.unwrap();
        let mut values = Vec::new();
        for message in rows {
            if let SimpleQueryMessage::Row(row) = message {
                values.extend((0..row.len()).map(|i| row.get(i).unwrap_or("NULL").to_string()));
            }
        }
        assert_eq!(values.len(), 6, "{view}");
        assert!(values.iter().all(|v| v == "[masked]"), "{view}: {values:?}");
    }
    // DDL through the gateway makes the catalog snapshot stale: the next
    // session masks a table created a moment ago.
    let alice_ddl = gw.connect(ALICE).await.unwrap();
    alice_ddl
        .batch_execute("CREATE TABLE staff (name text); INSERT INTO staff VALUES ('Grace Hopper')")
        .await
        .unwrap();
    let alice_next = gw.connect(ALICE).await.unwrap();
    let staff: String = alice_next
        .query_one("SELECT name FROM staff", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(staff, "*********per");

    // A client cannot make the catalog lookup fail (and fall back to
    // detectors) with a tiny statement_timeout of its own.
    let gw3 = TestGateway::start_for(
        gw.db.clone(),
        Spec {
            extra: spec_extra(&key),
            ..Spec::default()
        },
    )
    .await;
    let hasty = gw3.connect_with(BOB, "options='-c statement_timeout=1'").await.unwrap();
    // The session got its rules (it was not refused). Its own statements
    // are under the 1 ms timeout too: lift it (a busy machine may need a
    // few tries) before reading, so that only masking is tested here.
    let mut lifted = false;
    for _ in 0..50 {
        if hasty.batch_execute("SET statement_timeout = 0").await.is_ok() {
            lifted = true;
            break;
        }
    }
    assert!(lifted, "SET statement_timeout = 0 kept timing out");
    // A timeout that fired as the SET finished is delivered to the next
    // statement on a loaded machine: retry past such a stale cancel.
    let mut read = None;
    for _ in 0..50 {
        match hasty
            .query_one("SELECT secret FROM api_keys WHERE service = 'internal'", &[])
            .await
        {
            Ok(row) => {
                read = Some(row);
                break;
            }
            Err(err) if err.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => continue,
            Err(err) => panic!("{err}"),
        }
    }
    let secret: String = read.expect("the read kept being cancelled").get(0);
    assert_eq!(secret, "[masked]");

    // The contacts view shows customers.email: its columns get the hash rule.
    let contact: String = bob2
        .query_one("SELECT contact FROM contacts WHERE name IS NOT NULL LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    assert!(contact.starts_with("h:"), "{contact}");
}

/// A Parse or Bind the server rejects or discards cannot make a sensitive
/// statement or portal look harmless: what the client executes afterwards
/// is still the old, sensitive one (found in review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_parses_and_binds_do_not_unmask() {
    use crate::harness::raw::{self, RawClient, tags};
    let key = harness::cluster().dev.dir().join("mask-rules-raw.key");
    std::fs::write(&key, "a test key of more than sixteen bytes\n").unwrap();
    let spec = Spec {
        extra: spec_extra(&key),
        ..Spec::default()
    };
    let gw = TestGateway::start("mask_raw", spec).await;
    harness::setup(&gw.db, FIXTURE).await;
    let mut client = RawClient::connect(gw.addr).await;
    client.login(&gw.db, BOB).await;
    let sensitive = "SELECT upper(secret) FROM api_keys WHERE service = 'internal'";
    let rows = |messages: &[raw::Msg]| -> Vec<Vec<Option<String>>> {
        messages
            .iter()
            .filter(|(tag, _)| *tag == b'D')
            .map(|(_, body)| raw::data_row(body))
            .collect()
    };
    let clear = "NOT-A-REAL-SECRET-BUT-TREAT-IT-LIKE-ONE";
    // The sensitive statement's one row, masked, and the value nowhere.
    let masked = |got: &[raw::Msg]| {
        let text: String = got.iter().map(|(_, body)| String::from_utf8_lossy(body)).collect();
        assert!(!text.contains(clear), "{text}");
        assert_eq!(rows(got), [[Some("[masked:expression]".to_string())]], "{got:?}");
    };

    // A: the name is taken, so the second Parse fails; "s" is still the
    // sensitive statement.
    client.send(&[raw::parse("s", sensitive), raw::sync()].concat()).await;
    client.until_ready().await;
    client.send(&[raw::parse("s", "SELECT 1"), raw::sync()].concat()).await;
    assert!(tags(&client.until_ready().await).starts_with('E'));
    client
        .send(&[raw::bind("", "s"), raw::execute("", 0), raw::sync()].concat())
        .await;
    masked(&client.until_ready().await);

    // B: after an error, the batch's Parse of the unnamed statement is
    // discarded; the unnamed statement is still the sensitive one.
    client.send(&[raw::parse("", sensitive), raw::sync()].concat()).await;
    client.until_ready().await;
    client
        .send(&[raw::execute("nope", 0), raw::parse("", "SELECT 1"), raw::sync()].concat())
        .await;
    client.until_ready().await;
    client
        .send(&[raw::bind("", ""), raw::execute("", 0), raw::sync()].concat())
        .await;
    masked(&client.until_ready().await);

    // D: a name the protocol prepared harmless, freed by SQL's DEALLOCATE
    // and taken by SQL's PREPARE for a sensitive statement.
    client.send(&[raw::parse("d", "SELECT 1"), raw::sync()].concat()).await;
    assert_eq!(tags(&client.until_ready().await), "1Z");
    client.simple("DEALLOCATE d").await;
    client.simple(&format!("PREPARE d AS {sensitive}")).await;
    client
        .send(&[raw::bind("", "d"), raw::execute("", 0), raw::sync()].concat())
        .await;
    masked(&client.until_ready().await);

    // E: after an error the client reads before it sends its Sync (with
    // Flush), what it sends next is skipped too, and changes nothing.
    client.send(&[raw::parse("", sensitive), raw::sync()].concat()).await;
    assert_eq!(tags(&client.until_ready().await), "1Z");
    client.send(&[raw::parse("x", "SELEC 1"), raw::flush()].concat()).await;
    assert_eq!(client.recv().await.map(|(tag, _)| tag), Some(b'E'));
    client.send(&[raw::parse("", "SELECT 1"), raw::sync()].concat()).await;
    assert_eq!(tags(&client.until_ready().await), "Z", "the Parse is skipped");
    client
        .send(&[raw::bind("", ""), raw::execute("", 0), raw::sync()].concat())
        .await;
    masked(&client.until_ready().await);

    // F: a Query sent in that window is skipped as well, and the answers
    // to what follows still line up with their statements.
    client.send(&[raw::parse("x", "SELEC 1"), raw::flush()].concat()).await;
    assert_eq!(client.recv().await.map(|(tag, _)| tag), Some(b'E'));
    client.send(&[raw::query("SELECT 1"), raw::sync()].concat()).await;
    assert_eq!(tags(&client.until_ready().await), "Z", "the Query is skipped");
    client.send(&raw::query("SELECT 1")).await;
    assert_eq!(tags(&client.until_ready().await), "TDCZ");
    client.send(&raw::query(sensitive)).await;
    masked(&client.until_ready().await);

    // G: the same window after a COPY FROM STDIN the client fails (the Sync
    // sent with its Execute is one the server ignores).
    client.simple("CREATE TEMP TABLE scratch (v text)").await;
    client.send(&[raw::parse("", sensitive), raw::sync()].concat()).await;
    assert_eq!(tags(&client.until_ready().await), "1Z");
    client
        .send(
            &[
                raw::parse("c", "COPY scratch FROM STDIN"),
                raw::bind("p", "c"),
                raw::execute("p", 0),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
    for expected in [b'1', b'2', b'G'] {
        assert_eq!(client.recv().await.map(|(tag, _)| tag), Some(expected));
    }
    client
        .send(&[raw::msg(b'f', &raw::cstr("changed my mind")), raw::flush()].concat())
        .await;
    assert_eq!(client.recv().await.map(|(tag, _)| tag), Some(b'E'));
    client.send(&[raw::parse("", "SELECT 1"), raw::sync()].concat()).await;
    assert_eq!(tags(&client.until_ready().await), "Z", "the Parse is skipped");
    client
        .send(&[raw::bind("", ""), raw::execute("", 0), raw::sync()].concat())
        .await;
    masked(&client.until_ready().await);

    // C: a Close after an error in its batch is skipped, so "s" is still
    // the sensitive statement, and a Parse of the name fails as in A.
    client
        .send(&[raw::parse("", "SELEC 1"), raw::close(b'S', "s"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&client.until_ready().await), "EZ");
    client.send(&[raw::parse("s", "SELECT 1"), raw::sync()].concat()).await;
    assert_eq!(tags(&client.until_ready().await), "EZ");
    client
        .send(&[raw::bind("", "s"), raw::execute("", 0), raw::sync()].concat())
        .await;
    masked(&client.until_ready().await);

    // H: SQL's CLOSE and DECLARE give a harmless portal's name to a cursor
    // over the sensitive statement, which the protocol then executes.
    client.simple("BEGIN").await;
    client
        .send(&[raw::parse("h", "SELECT 'harmless'"), raw::bind("c", "h"), raw::sync()].concat())
        .await;
    assert_eq!(tags(&client.until_ready().await), "12Z");
    client.simple("CLOSE c").await;
    client.simple(&format!("DECLARE c CURSOR FOR {sensitive}")).await;
    client.send(&[raw::execute("c", 0), raw::sync()].concat()).await;
    masked(&client.until_ready().await);
    client.simple("COMMIT").await;
    // No cursor takes the unnamed portal: what runs there is not masked
    // for the cursor's sake.
    client.send(&raw::unnamed("SELECT 1 + 1", 0)).await;
    assert_eq!(rows(&client.until_ready().await), [[Some("2".to_string())]]);
}

/// The first value of each row of a simple query, NULL as "NULL".
fn first_values(messages: Vec<SimpleQueryMessage>) -> Vec<String> {
    messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect()
}

/// Values of columns masked by rule cannot be routed around the masker: not
/// through a user-defined function that reads the table (which the
/// statement never names) or a built-in one that runs a query given as
/// text, not through the planner's statistics, not by copying them into
/// another table, and not
/// through a view, function, trigger or renamed column the session creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_columns_cannot_be_routed_around_the_masker() {
    let key = harness::cluster().dev.dir().join("mask-reroute.key");
    std::fs::write(&key, "a test key of more than sixteen bytes\n").unwrap();
    let spec = Spec {
        extra: spec_extra(&key),
        ..Spec::default()
    };
    let gw = TestGateway::start("mask_reroute", spec).await;
    harness::setup(&gw.db, FIXTURE).await;
    harness::setup(
        &gw.db,
        "CREATE FUNCTION get_secret(k int) RETURNS text LANGUAGE sql STABLE \
           AS $$ SELECT secret FROM api_keys WHERE id = k $$; \
         CREATE FUNCTION \"Leak\"() RETURNS SETOF text LANGUAGE plpgsql \
           AS $$ BEGIN RETURN QUERY EXECUTE 'SELECT secret FROM api' || '_keys'; END $$; \
         CREATE TABLE scratch (v text); \
         CREATE VIEW keyview AS SELECT id, service, secret AS token FROM api_keys;",
    )
    .await;
    let clear = "not-a-real-secret";
    let bob = gw.connect(BOB).await.unwrap();

    // Function results are expressions of a statement over masked data.
    for query in [
        "SELECT get_secret(3)",
        "SELECT GET_SECRET(3) AS harmless",
        "SELECT x FROM get_secret(3) AS x",
        "SELECT * FROM \"Leak\"()",
        "SELECT public.get_secret(id) FROM generate_series(1, 3) AS id",
        // Built-in functions that run a query given as text.
        "SELECT word FROM ts_stat('SELECT array_to_tsvector(array[secret]) FROM api_keys')",
        "SELECT * FROM pg_catalog.TS_STAT($$SELECT array_to_tsvector(array[encode(convert_to(secret, 'UTF8'), 'hex')]) FROM api_keys$$)",
        "SELECT ts_rewrite('zz'::tsquery, $$SELECT 'zz'::tsquery, quote_literal(secret)::tsquery FROM api_keys$$)::text",
    ] {
        let values = first_values(bob.simple_query(query).await.unwrap());
        assert!(!values.is_empty(), "{query}");
        assert!(values.iter().all(|v| v == "[masked:expression]"), "{query}: {values:?}");
    }
    // TABLE as an operand of a set operation names no table factor: its
    // rows are still of a masked table.
    let rows = bob
        .simple_query("SELECT 0, 'y', 'z' WHERE false UNION ALL TABLE api_keys")
        .await
        .unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(format!("{:?} {:?}", row.get(1), row.get(2))),
            _ => None,
        })
        .collect();
    assert_eq!(values.len(), 3, "{values:?}");
    assert!(
        values
            .iter()
            .all(|v| !v.contains(clear) && v.contains("[masked:expression]")),
        "{values:?}"
    );
    // The planner's statistics hold sample values of every column, and
    // pg_stats shows them to whoever may read the table.
    harness::setup(&gw.db, "ANALYZE api_keys").await;
    for query in [
        "SELECT histogram_bounds::text FROM pg_stats WHERE tablename = 'api_keys' AND attname = 'secret'",
        "SELECT array_to_string(s.histogram_bounds, ',') FROM pg_catalog.PG_STATS AS s WHERE s.attname = 'secret'",
    ] {
        let values = first_values(bob.simple_query(query).await.unwrap());
        assert!(!values.is_empty(), "{query}");
        assert!(values.iter().all(|v| !v.contains(clear)), "{query}: {values:?}");
    }
    let extended: String = bob.query_one("SELECT get_secret($1)", &[&3i32]).await.unwrap().get(0);
    assert_eq!(extended, "[masked:expression]");
    // A statement calling only the server's own functions is left alone.
    assert_eq!(
        first_values(bob.simple_query("SELECT upper('x')").await.unwrap()),
        ["X"]
    );

    // What would store masked values elsewhere, or create something that
    // computes them, is refused with the reason.
    for (statement, reason) in [
        (
            "INSERT INTO scratch SELECT secret FROM api_keys",
            "would be stored where the masker cannot follow",
        ),
        (
            "INSERT INTO scratch VALUES (get_secret(3))",
            "would be stored where the masker cannot follow",
        ),
        (
            "WITH x AS (INSERT INTO scratch SELECT secret FROM api_keys RETURNING 1) SELECT count(*) FROM x",
            "would be stored where the masker cannot follow",
        ),
        (
            "INSERT INTO scratch SELECT v FROM scratch WHERE false UNION ALL TABLE api_keys",
            "would be stored where the masker cannot follow",
        ),
        (
            "UPDATE scratch SET v = (SELECT secret FROM api_keys LIMIT 1)",
            "would be stored",
        ),
        (
            "CREATE TABLE copied AS SELECT * FROM api_keys",
            "could carry masked values past the masker",
        ),
        (
            "SELECT secret INTO copied FROM api_keys",
            "could carry masked values past the masker",
        ),
        (
            "CREATE TEMP TABLE copied AS SELECT get_secret(3)",
            "could carry masked values past the masker",
        ),
        (
            "CREATE MATERIALIZED VIEW mv AS SELECT secret FROM api_keys",
            "could carry masked values",
        ),
        (
            "CREATE VIEW v AS SELECT service FROM api_keys",
            "could carry masked values",
        ),
        ("CREATE OR REPLACE VIEW v AS SELECT 1", "could carry masked values"),
        (
            "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS 'SELECT secret FROM api_keys LIMIT 1'",
            "could carry masked values",
        ),
        (
            "ALTER TABLE api_keys RENAME COLUMN secret TO plain",
            "could carry masked values",
        ),
        (
            "ALTER TABLE scratch ALTER v SET DEFAULT get_secret(3)",
            "could carry masked values",
        ),
        (
            "COPY (SELECT get_secret(3)) TO STDOUT",
            "a user-defined function's result",
        ),
        // Inside the masked table: a masked value must not move to a column
        // read in clear.
        (
            "UPDATE api_keys SET service = secret WHERE id = 3",
            "copies secret, which is masked for you, into column service",
        ),
        (
            "UPDATE api_keys AS k SET service = upper(k.\"secret\")",
            "copies secret, which is masked for you, into column service",
        ),
        (
            "UPDATE api_keys k SET service = k::text",
            "copies whole rows or every column",
        ),
        (
            "UPDATE api_keys SET service = row_to_json(api_keys.*)::text",
            "copies whole rows or every column",
        ),
        (
            "UPDATE api_keys SET service = (SELECT secret FROM api_keys LIMIT 1)",
            "copies secret",
        ),
        (
            "UPDATE customers SET phone = (SELECT k.secret FROM api_keys k WHERE k.id = customers.id)",
            "copies secret",
        ),
        (
            "UPDATE api_keys SET service = get_secret(3)",
            "stores the result of get_secret()",
        ),
        (
            "INSERT INTO api_keys (service) SELECT secret FROM api_keys",
            "copies secret, which is masked for you, into the rows it writes",
        ),
        (
            "INSERT INTO api_keys SELECT * FROM api_keys",
            "copies whole rows or every column",
        ),
        (
            "INSERT INTO api_keys (id, service) VALUES (3, 'x') ON CONFLICT (id) DO UPDATE SET service = EXCLUDED.secret",
            "copies secret",
        ),
        (
            "WITH x AS (UPDATE api_keys SET service = secret RETURNING 1) SELECT count(*) FROM x",
            "copies secret",
        ),
        (
            "MERGE INTO api_keys k USING api_keys s ON k.id = s.id WHEN MATCHED THEN UPDATE SET service = s.secret",
            "cannot follow column by column",
        ),
        ("INSERT INTO api_keys TABLE api_keys", "cannot read this statement"),
        // Through renamed columns: derived tables, CTEs, table functions,
        // views (found in review).
        (
            "UPDATE api_keys SET service = x.v FROM (SELECT id, secret AS v FROM api_keys) x WHERE x.id = api_keys.id",
            "cannot follow column by column",
        ),
        (
            "WITH s AS (SELECT id, secret AS v FROM api_keys) UPDATE api_keys SET service = s.v FROM s WHERE s.id = api_keys.id",
            "cannot follow column by column",
        ),
        (
            "WITH s AS (SELECT secret FROM api_keys) INSERT INTO api_keys (service) SELECT secret FROM s",
            "cannot follow column by column",
        ),
        (
            "WITH s AS (SELECT secret AS v FROM api_keys) INSERT INTO api_keys (service) SELECT v FROM s",
            "cannot follow column by column",
        ),
        (
            "UPDATE api_keys k SET service = u.v FROM unnest(ARRAY[k.secret]) u(v)",
            "cannot follow column by column",
        ),
        ("UPDATE keyview SET service = token", "copies token"),
        (
            "UPDATE api_keys SET service = kv.token FROM keyview kv WHERE kv.id = api_keys.id",
            "copies token",
        ),
        (
            "UPDATE customers SET phone = c.contact FROM contacts c WHERE c.phone = customers.phone",
            "copies contact",
        ),
        (
            "UPDATE api_keys SET service = k.s FROM api_keys AS k(kid, ksvc, s) WHERE k.kid = api_keys.id",
            "cannot follow column by column",
        ),
        (
            "INSERT INTO api_keys (service) SELECT s FROM api_keys AS k(i, v, s)",
            "cannot follow column by column",
        ),
        // Through user-defined functions in FROM items, VALUES and CTEs
        // (found in review).
        (
            "UPDATE api_keys SET service = v.s FROM (VALUES (get_secret(2))) v(s)",
            "computed by get_secret()",
        ),
        (
            "INSERT INTO api_keys (service) SELECT x FROM get_secret(1) x",
            "computed by get_secret()",
        ),
        (
            "INSERT INTO api_keys (service) SELECT * FROM \"Leak\"()",
            "a function that can read masked columns",
        ),
        (
            "WITH c(v) AS (VALUES (get_secret(3))) INSERT INTO api_keys (service) SELECT v FROM c",
            "computed by get_secret()",
        ),
    ] {
        let err = bob.simple_query(statement).await.unwrap_err();
        let db = err.as_db_error().unwrap_or_else(|| panic!("{statement}: {err}"));
        assert_eq!(db.code().code(), "42501", "{statement}: {db:?}");
        assert!(db.message().contains(reason), "{statement}: {db:?}");
        assert!(!db.message().contains(clear), "{statement}: {db:?}");
    }

    // Writes that keep values in the masked table, or read nothing masked,
    // and schema changes that compute nothing, still run.
    bob.batch_execute(
        "INSERT INTO scratch VALUES ('hello'); CREATE TEMP TABLE notes (n int); DROP TABLE notes; \
         CREATE INDEX ON scratch (v)",
    )
    .await
    .unwrap();
    let returned = first_values(
        bob.simple_query("UPDATE api_keys SET service = service WHERE id = 3 RETURNING secret")
            .await
            .unwrap(),
    );
    assert_eq!(returned, ["[masked]"]);
    // A masked column set from itself, a clear one from itself or from
    // constants, and rows copied from a table with nothing masked, still run.
    bob.batch_execute(
        "UPDATE api_keys SET secret = lower(secret) WHERE id = 1; \
         UPDATE api_keys SET service = upper(service) WHERE secret = 'x'; \
         INSERT INTO api_keys (service, secret) VALUES ('new', 'typed-in'); \
         INSERT INTO scratch SELECT * FROM scratch WHERE false; \
         EXPLAIN UPDATE api_keys SET service = secret; \
         UPDATE api_keys SET service = v.s FROM (VALUES (1, 'aws')) AS v(id, s) WHERE v.id = api_keys.id; \
         INSERT INTO api_keys (service) SELECT * FROM unnest(ARRAY['a', 'b']); \
         DELETE FROM api_keys WHERE id IN (SELECT x FROM unnest(ARRAY[99]) x)",
    )
    .await
    .unwrap();

    // Nothing reached the scratch table, and the table kept its column.
    let admin = harness::superuser(&gw.db).await;
    let stored: Vec<String> = admin
        .query("SELECT v FROM scratch", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, ["hello"]);
    let services: Vec<String> = admin
        .query("SELECT service FROM api_keys ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        services,
        ["aws", "github", "internal", "new", "a", "b"],
        "no secret was copied"
    );
    let column: i64 = admin
        .query_one(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'api_keys' AND column_name = 'secret'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(column, 1);
}

/// A statement that needs approval gets the same masking checks as one
/// allowed outright: holding it for an approver must not let it carry
/// masked values past the masker once approved (found in review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_need_approval_are_checked_for_masking_first() {
    let key = harness::cluster().dev.dir().join("mask-approval.key");
    std::fs::write(&key, "a test key of more than sixteen bytes\n").unwrap();
    let spec = Spec {
        extra: spec_extra(&key),
        policy: Some(
            "[policy]\ndefault = \"allow\"\n\n[[policy.rules]]\nname = \"ddl-needs-approval\"\n\
             decision = \"require_approval\"\ngroups = [\"*\"]\nkinds = [\"ddl\"]\napprovers = [\"engineering\"]\n"
                .into(),
        ),
        ..Spec::default()
    };
    let gw = TestGateway::start("mask_approval", spec).await;
    harness::setup(&gw.db, FIXTURE).await;
    let bob = gw.connect(BOB).await.unwrap();
    // Refused at once for what it would do to masked data, not held.
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        bob.simple_query("CREATE TABLE copied AS SELECT * FROM api_keys"),
    )
    .await
    .expect("refused at once, not held")
    .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert!(
        db.message().contains("could carry masked values past the masker"),
        "{db:?}"
    );
}
