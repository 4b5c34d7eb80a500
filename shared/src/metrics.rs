//! Gateway-wide counters for `/metrics`: statements by decision and how
//! long statements take. Sessions update them with relaxed atomic adds; the
//! API reads them when scraped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the statement duration histogram, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What the gateway counts.
#[derive(Debug, Default)]
pub struct Metrics {
    allowed: AtomicU64,
    denied: AtomicU64,
    approval: AtomicU64,
    /// Per bucket (not cumulative; summed when written), then +Inf.
    durations: [AtomicU64; BUCKETS.len() + 1],
    duration_sum_us: AtomicU64,
}

/// How a statement is counted: as the console and the trail count them
/// (each simple Query and FunctionCall, each execution of a prepared
/// statement, each message refused in place), not the policy's checks (a
/// prepared statement is checked once, at its Parse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It ran.
    Allow,
    /// Refused, by the policy or by the gateway itself (the trail
    /// unavailable, a grant that ended before its Execute, a name the
    /// gateway cannot follow, an approval denied or expired at a held Bind).
    Deny,
    /// A simple Query held for approval, or refused until one approves
    /// it (`refuse_and_retry`). A held Bind counts when its hold ends.
    RequireApproval,
}

impl Metrics {
    pub fn decided(&self, decision: Decision) {
        let counter = match decision {
            Decision::Allow => &self.allowed,
            Decision::Deny => &self.denied,
            Decision::RequireApproval => &self.approval,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A statement that ran took this long (from when it went upstream to
    /// its last answer).
    pub fn took(&self, duration: Duration) {
        let secs = duration.as_secs_f64();
        let bucket = BUCKETS.iter().position(|&le| secs <= le).unwrap_or(BUCKETS.len());
        self.durations[bucket].fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    }

    /// The Prometheus text of these metrics.
    pub fn write(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP sluice_statements_total Statements run or refused (simple queries, function calls, executions of prepared statements), by decision.\n\
             # TYPE sluice_statements_total counter"
        );
        for (decision, counter) in [
            ("allow", &self.allowed),
            ("deny", &self.denied),
            ("require_approval", &self.approval),
        ] {
            let _ = writeln!(
                out,
                "sluice_statements_total{{decision=\"{decision}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP sluice_statement_duration_seconds How long statements that ran took, upstream included.\n\
             # TYPE sluice_statement_duration_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.durations[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "sluice_statement_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += self.durations[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "sluice_statement_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.duration_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "sluice_statement_duration_seconds_sum {sum}");
        let _ = writeln!(out, "sluice_statement_duration_seconds_count {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_buckets_are_written_cumulatively() {
        let metrics = Metrics::default();
        metrics.decided(Decision::Allow);
        metrics.decided(Decision::Allow);
        metrics.decided(Decision::Deny);
        metrics.took(Duration::from_micros(300));
        metrics.took(Duration::from_millis(20));
        metrics.took(Duration::from_secs(60));
        let mut out = String::new();
        metrics.write(&mut out);
        assert!(out.contains("sluice_statements_total{decision=\"allow\"} 2\n"), "{out}");
        assert!(out.contains("sluice_statements_total{decision=\"deny\"} 1\n"), "{out}");
        assert!(
            out.contains("sluice_statement_duration_seconds_bucket{le=\"0.0005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("sluice_statement_duration_seconds_bucket{le=\"0.025\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("sluice_statement_duration_seconds_bucket{le=\"10\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("sluice_statement_duration_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("sluice_statement_duration_seconds_count 3\n"), "{out}");
    }
}
