//! Micro-benchmark of the statement gate's per-statement work: classify +
//! decide, cold (parsed every time, as for simple-protocol statements whose
//! literals change) and cached (the classification cache hit that prepared
//! statements and repeated texts pay).
//!
//! `cargo bench --bench classify` (release build). Each cell is the median of
//! `RUNS` runs of at least `MIN_RUN` each; the spread (min..max of the runs)
//! is printed beside it so noise is visible. See bench/README.md.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use sluice_core::Config;
use sluice_core::policy::{ClassifyOptions, PolicyGate, Subject, classify};

const RUNS: usize = 7;
const MIN_RUN: Duration = Duration::from_millis(200);

/// psql 15's `\d` (describe relations) query, as it sends it.
const PSQL_DESCRIBE: &str = r#"SELECT n.nspname as "Schema",
  c.relname as "Name",
  CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'i' THEN 'index' WHEN 'S' THEN 'sequence' WHEN 't' THEN 'TOAST table' WHEN 'f' THEN 'foreign table' WHEN 'p' THEN 'partitioned table' WHEN 'I' THEN 'partitioned index' END as "Type",
  pg_catalog.pg_get_userbyid(c.relowner) as "Owner"
FROM pg_catalog.pg_class c
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam
WHERE c.relkind IN ('r','p','v','m','S','f','')
      AND n.nspname <> 'pg_catalog'
      AND n.nspname !~ '^pg_toast'
      AND n.nspname <> 'information_schema'
  AND pg_catalog.pg_table_is_visible(c.oid)
ORDER BY 1,2;"#;

/// A reporting query of about 5 KB: CTEs, joins, window functions,
/// aggregates with FILTER, CASE, subqueries, comments.
fn analytics_query() -> String {
    let mut sql = String::from(
        "-- weekly revenue and retention by region and channel\n\
         WITH params AS (SELECT date '2026-01-01' AS start_day, date '2026-06-30' AS end_day),\n\
         orders_in_range AS (\n\
           SELECT o.id, o.customer_id, o.placed_at, o.total_cents, o.channel, o.status\n\
           FROM public.orders o, params p\n\
           WHERE o.placed_at >= p.start_day AND o.placed_at < p.end_day + 1 AND o.status <> 'cancelled'\n\
         ),\n\
         first_orders AS (\n\
           SELECT customer_id, min(placed_at) AS first_at FROM public.orders GROUP BY customer_id\n\
         ),\n",
    );
    for metric in ["gross", "net", "refunded", "discounted", "shipped", "returned"] {
        sql.push_str(&format!(
            "{metric}_by_week AS (\n\
               SELECT date_trunc('week', r.placed_at) AS week, c.region, r.channel,\n\
                      sum(r.total_cents) FILTER (WHERE r.status = '{metric}') AS {metric}_cents,\n\
                      count(DISTINCT r.customer_id) AS {metric}_customers,\n\
                      avg(r.total_cents)::numeric(12, 2) AS {metric}_avg,\n\
                      percentile_cont(0.9) WITHIN GROUP (ORDER BY r.total_cents) AS {metric}_p90\n\
               FROM orders_in_range r\n\
               JOIN public.customers c ON c.id = r.customer_id\n\
               LEFT JOIN first_orders f ON f.customer_id = r.customer_id\n\
               WHERE c.region IS NOT NULL AND (f.first_at IS NULL OR f.first_at < r.placed_at)\n\
               GROUP BY 1, 2, 3\n\
             ),\n"
        ));
    }
    sql.push_str(
        "ranked AS (\n\
           SELECT g.week, g.region, g.channel, g.gross_cents, n.net_cents, rf.refunded_cents,\n\
                  rank() OVER (PARTITION BY g.week ORDER BY g.gross_cents DESC) AS gross_rank,\n\
                  lag(g.gross_cents) OVER (PARTITION BY g.region, g.channel ORDER BY g.week) AS prev_gross,\n\
                  sum(n.net_cents) OVER (PARTITION BY g.region ORDER BY g.week ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) AS net_4w\n\
           FROM gross_by_week g\n\
           LEFT JOIN net_by_week n USING (week, region, channel)\n\
           LEFT JOIN refunded_by_week rf USING (week, region, channel)\n\
           LEFT JOIN discounted_by_week d USING (week, region, channel)\n\
           LEFT JOIN shipped_by_week s USING (week, region, channel)\n\
           LEFT JOIN returned_by_week rt USING (week, region, channel)\n\
         )\n\
         SELECT week, region, channel, gross_cents, net_cents, refunded_cents, gross_rank, net_4w,\n\
                CASE WHEN prev_gross IS NULL OR prev_gross = 0 THEN NULL\n\
                     ELSE round(100.0 * (gross_cents - prev_gross) / prev_gross, 1) END AS growth_pct,\n\
                (SELECT count(*) FROM public.customers k WHERE k.region = ranked.region) AS region_customers\n\
         FROM ranked\n\
         WHERE gross_rank <= 10 /* top ten per week */\n\
         ORDER BY week DESC, gross_rank\n\
         LIMIT 500",
    );
    sql
}

struct Case {
    name: &'static str,
    /// Statement texts; cold runs cycle through them (different literals,
    /// as pgbench's simple protocol sends).
    texts: Vec<String>,
}

fn cases() -> Vec<Case> {
    let accounts = |i: usize| {
        format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
            1 + i * 7919 % 1_000_000
        )
    };
    vec![
        Case {
            name: "pgbench -S SELECT (simple)",
            texts: (0..1024).map(accounts).collect(),
        },
        Case {
            name: "pgbench -S SELECT (prepared)",
            texts: vec!["SELECT abalance FROM pgbench_accounts WHERE aid = $1;".into()],
        },
        Case {
            name: "pgbench TPC-B UPDATE accounts",
            texts: (0..1024)
                .map(|i| format!("UPDATE pgbench_accounts SET abalance = abalance + {} WHERE aid = {};", i % 5000 - 2500, 1 + i * 31))
                .collect(),
        },
        Case {
            name: "pgbench TPC-B INSERT history",
            texts: (0..1024)
                .map(|i| {
                    format!(
                        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({}, {}, {}, {}, CURRENT_TIMESTAMP);",
                        i % 100,
                        i % 10,
                        i * 13,
                        i % 5000
                    )
                })
                .collect(),
        },
        Case {
            name: "psql \\d",
            texts: vec![PSQL_DESCRIBE.into()],
        },
        Case {
            name: "analytics query (5 KB)",
            texts: vec![analytics_query()],
        },
    ]
}

/// Median, min and max nanoseconds per call of `f` over `RUNS` runs.
fn measure(mut f: impl FnMut(usize)) -> (f64, f64, f64) {
    // Calibrate: iterations per run so that a run lasts at least MIN_RUN.
    let mut iterations = 1usize;
    loop {
        let start = Instant::now();
        for i in 0..iterations {
            f(i);
        }
        if start.elapsed() >= MIN_RUN / 4 {
            break;
        }
        iterations *= 2;
    }
    iterations *= 4;
    let mut per_call: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            for i in 0..iterations {
                f(i);
            }
            start.elapsed().as_nanos() as f64 / iterations as f64
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    (per_call[RUNS / 2], per_call[0], per_call[RUNS - 1])
}

fn show(ns: f64) -> String {
    if ns >= 1000.0 {
        format!("{:.1} µs", ns / 1000.0)
    } else {
        format!("{ns:.0} ns")
    }
}

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = Config::load(&root.join("config/demo.toml")).expect("config/demo.toml");
    let gate = PolicyGate::new(&config);
    let policy = gate.policy();
    let options = ClassifyOptions {
        max_statement_length: policy.config().max_statement_length,
        ..ClassifyOptions::default()
    };
    let groups = vec!["oncall".to_string()];
    let labels = BTreeMap::new();
    let subject = Subject {
        name: "bob",
        subject: "bob",
        email: None,
        groups: &groups,
        labels: &labels,
        target: "shop",
        search_path_changed: false,
        granted: &[],
    };

    println!("classify + decide under config/demo.toml's policy, as bob [oncall] on shop");
    println!("median of {RUNS} runs (min..max), per statement; rows whose texts vary in their numbers");
    println!("(pgbench's simple protocol) hit the cache by shape, the others by exact text\n");
    println!(
        "{:<32} {:>8}  {:>30}  {:>30}",
        "statement", "bytes", "cold: parse + classify + decide", "cached: cache hit + decide"
    );
    // `cargo bench --bench classify -- pgbench` runs the cases whose name
    // contains "pgbench".
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    for case in cases().into_iter().filter(|c| c.name.contains(filter.as_str())) {
        let texts = &case.texts;
        let cold = measure(|i| {
            let sql = &texts[i % texts.len()];
            let classification = std::sync::Arc::new(classify(sql, &options));
            black_box(policy.decide(&subject, classification));
        });
        for sql in texts {
            gate.classify(sql, true);
        }
        let cached = measure(|i| {
            let sql = &texts[i % texts.len()];
            let classification = gate.classify(black_box(sql), true);
            black_box(policy.decide(&subject, classification));
        });
        // Every case must be allowed, or the benchmark measures a refusal.
        let decision = policy.decide(&subject, gate.classify(&texts[0], true));
        assert_eq!(
            decision.decision(),
            sluice_core::config::DecisionKind::Allow,
            "{}: {:?}",
            case.name,
            decision
        );
        let cell = |(median, min, max): (f64, f64, f64)| format!("{} ({}..{})", show(median), show(min), show(max));
        println!(
            "{:<32} {:>8}  {:>30}  {:>30}",
            case.name,
            texts[0].len(),
            cell(cold),
            cell(cached)
        );
    }
}
