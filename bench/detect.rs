//! Micro-benchmark of the masking hot path: the content detectors on single
//! values, and the row rewriter on DataRow and COPY rows shaped like
//! bench/masking.sh's customers table.
//!
//! `cargo bench --bench detect` (release build); `cargo bench --bench detect
//! -- note` runs the cases whose name contains "note". Each cell is the
//! median of `RUNS` runs of at least `MIN_RUN` each, per value or per row,
//! with the spread (min..max of the runs) beside it so noise is visible.
//! Every case cycles through `ROWS` generated values, so branch predictors
//! see real variety rather than one value repeated.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sluice_core::mask::catalog::ColumnRules;
use sluice_core::mask::{DetectorSet, RowMasker, scrub_into};

const RUNS: usize = 7;
const MIN_RUN: Duration = Duration::from_millis(200);
const ROWS: usize = 4096;

const FIRST: [&str; 10] = [
    "Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana", "Ines", "Jonas",
];
const LAST: [&str; 10] = [
    "Smith", "Okafor", "Nguyen", "Garcia", "Kowalski", "Haddad", "Larsen", "Tanaka", "Silva", "Novak",
];
const CARDS: [&str; 5] = [
    "4111111111111111",
    "5555555555554444",
    "378282246310005",
    "6011111111111117",
    "4012888888881881",
];

/// Row `g` of masking.sh's customers table, as text values: id, name,
/// email, phone, card, note (the same formulas as its INSERT).
fn customer(g: usize) -> [String; 6] {
    let note = match g % 10 {
        0 => format!("Asked to be called back on +1-212-555-{:04} after 5pm", g % 7919),
        5 => format!("Invoices go to billing{g}@example.org, not the account address"),
        _ => {
            let day = g % 700;
            // 2024-01-01 + day, good enough for the shape of a date.
            let (month, mday) = (1 + day / 31 % 12, 1 + day % 28);
            format!(
                "Order #{} of {} items, total {}.{:02} USD, shipped {}-{month:02}-{mday:02}",
                100000 + g,
                g % 97 + 1,
                g % 50000 / 100,
                g % 100,
                2024 + day / 365
            )
        }
    };
    [
        g.to_string(),
        format!("{} {}", FIRST[g % 10], LAST[g / 10 % 10]),
        format!("user{g}@example.com"),
        format!("+1-415-555-{:04}", g % 10000),
        CARDS[g % 5].to_string(),
        note,
    ]
}

/// Values that must pass untouched: the clean path, which has to stay cheap
/// and allocation-free.
fn clean(g: usize) -> Vec<String> {
    vec![
        format!(
            "Order #{} of {} items, total {}.{:02} USD",
            100000 + g,
            g % 97 + 1,
            g % 500,
            g % 100
        ),
        format!(
            "2024-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            1 + g % 12,
            1 + g % 28,
            g % 24,
            g % 60,
            g % 59,
            g * 7919 % 1_000_000
        ),
        format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            g * 2654435761 % (1 << 32),
            g % 65536,
            g % 4096,
            g % 4096,
            g * 11400714819323198485 % (1 << 48)
        ),
        format!("{}", 1_700_000_000_000u64 + g as u64 * 7919),
        format!(
            "{} {} shipped version 1.{}.{} to 10.0.{}.{}",
            FIRST[g % 10],
            LAST[g / 10 % 10],
            g % 20,
            g % 7,
            g % 256,
            g / 256 % 256
        ),
        format!(
            "Paid {}.{:02} on {}/{}/2024, ref {}",
            g % 1000,
            g % 100,
            1 + g % 12,
            1 + g % 28,
            123456789 + g
        ),
    ]
}

/// A DataRow as tokio-postgres receives it: binary int4 id, then five text
/// values (binary format of text is the text).
fn data_row(g: usize, values: &[String; 6]) -> Vec<u8> {
    let mut message = vec![b'D', 0, 0, 0, 0];
    message.extend_from_slice(&6i16.to_be_bytes());
    message.extend_from_slice(&4i32.to_be_bytes());
    message.extend_from_slice(&(g as i32).to_be_bytes());
    for value in &values[1..] {
        message.extend_from_slice(&(value.len() as i32).to_be_bytes());
        message.extend_from_slice(value.as_bytes());
    }
    let len = (message.len() - 1) as i32;
    message[1..5].copy_from_slice(&len.to_be_bytes());
    message
}

/// A CopyData of COPY TO STDOUT in text format: one tab-separated line.
fn copy_row(values: &[String; 6]) -> Vec<u8> {
    let line = values.join("\t") + "\n";
    let mut message = vec![b'd'];
    message.extend_from_slice(&((line.len() + 4) as i32).to_be_bytes());
    message.extend_from_slice(line.as_bytes());
    message
}

fn row_description() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&6i16.to_be_bytes());
    for (name, type_oid) in [
        ("id", 23u32),
        ("name", 25),
        ("email", 25),
        ("phone", 25),
        ("card", 25),
        ("note", 25),
    ] {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(&16384i32.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&type_oid.to_be_bytes());
        body.extend_from_slice(&(-1i16).to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
    }
    body
}

/// Median, min and max nanoseconds per call of `f` over `RUNS` runs. With
/// `DETECT_ITERS=N` in the environment every run makes exactly N calls, so
/// that `perf stat` can count cycles per call on a busy machine.
fn measure(mut f: impl FnMut(usize)) -> (f64, f64, f64) {
    let fixed = std::env::var("DETECT_ITERS").ok().and_then(|n| n.parse::<usize>().ok());
    let mut iterations = fixed.unwrap_or(1);
    while fixed.is_none() {
        let start = Instant::now();
        for i in 0..iterations {
            f(i);
        }
        if start.elapsed() >= MIN_RUN / 4 {
            break;
        }
        iterations *= 2;
    }
    if fixed.is_none() {
        iterations *= 4;
    }
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

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let rows: Vec<[String; 6]> = (1..=ROWS).map(customer).collect();
    let clean_values: Vec<String> = (1..=ROWS).flat_map(clean).collect();
    let detectors = DetectorSet::ALL;

    println!("masking hot path, all detectors; median of {RUNS} runs (min..max), per value or row");
    println!("{:<24} {:>24}", "case", "ns");
    let report = |name: &str, (median, min, max): (f64, f64, f64)| {
        println!("{name:<24} {median:>8.1} ({min:>6.1}..{max:>6.1})");
    };
    let mut scratch = Vec::with_capacity(1024);
    let columns = ["id", "name", "email", "phone", "card", "note"];
    for (column, name) in columns.iter().enumerate() {
        let name = format!("value {name}");
        if !name.contains(filter.as_str()) {
            continue;
        }
        report(
            &name,
            measure(|i| {
                scratch.clear();
                black_box(scrub_into(
                    black_box(rows[i % ROWS][column].as_bytes()),
                    detectors,
                    &mut scratch,
                ));
            }),
        );
    }
    if "value long".contains(filter.as_str()) {
        // About 1.5 KB of JSON with ids, amounts and timestamps, and nothing
        // to mask: a document column.
        let long: Vec<String> = (1..=64)
            .map(|g| {
                let items: Vec<String> = (0..12)
                    .map(|k| {
                        format!(
                            "{{\"sku\": \"sku-{}\", \"qty\": {}, \"price\": {}.{:02}, \"at\": \"2024-03-{:02}T10:{:02}:00Z\"}}",
                            g * 100 + k,
                            k % 5 + 1,
                            g % 90 + 9,
                            k * 7 % 100,
                            k + 1,
                            g % 60
                        )
                    })
                    .collect();
                format!("{{\"order\": {}, \"items\": [{}]}}", 100000 + g, items.join(", "))
            })
            .collect();
        assert!(!scrub_into(long[0].as_bytes(), detectors, &mut scratch), "{}", long[0]);
        report(
            &format!("value long ({} B)", long[0].len()),
            measure(|i| {
                scratch.clear();
                black_box(scrub_into(
                    black_box(long[i % long.len()].as_bytes()),
                    detectors,
                    &mut scratch,
                ));
            }),
        );
    }
    if "value clean".contains(filter.as_str()) {
        for (i, value) in clean_values.iter().enumerate().take(6) {
            assert!(!scrub_into(value.as_bytes(), detectors, &mut scratch), "{i}: {value}");
        }
        report(
            "value clean",
            measure(|i| {
                scratch.clear();
                black_box(scrub_into(
                    black_box(clean_values[i % clean_values.len()].as_bytes()),
                    detectors,
                    &mut scratch,
                ));
            }),
        );
    }

    let mut out = BytesMut::with_capacity(1 << 20);
    if "data_row".contains(filter.as_str()) {
        let messages: Vec<Vec<u8>> = rows.iter().enumerate().map(|(g, row)| data_row(g + 1, row)).collect();
        let mut masker = RowMasker::new(detectors, ColumnRules::default());
        masker.describe(&row_description(), false).expect("RowDescription");
        report(
            "data_row",
            measure(|i| {
                if out.len() > 1 << 19 {
                    out.clear();
                }
                masker
                    .data_row(black_box(&messages[i % ROWS]), &mut out)
                    .expect("DataRow");
            }),
        );
    }
    if "copy_data".contains(filter.as_str()) {
        let messages: Vec<Vec<u8>> = rows.iter().map(copy_row).collect();
        let mut masker = RowMasker::new(detectors, ColumnRules::default());
        masker
            .copy_out(&[0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .expect("CopyOutResponse");
        report(
            "copy_data",
            measure(|i| {
                if out.len() > 1 << 19 {
                    out.clear();
                }
                masker
                    .copy_data(black_box(&messages[i % ROWS]), &mut out)
                    .expect("CopyData");
            }),
        );
    }
}
