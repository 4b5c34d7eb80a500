//! The Rust client of `bench/masking.sh`: fetches a whole result with
//! tokio-postgres and reports what it received, so that the script can time
//! the same fetch directly from PostgreSQL and through Sluice.
//!
//! The rows are read one at a time from `query_raw`'s stream (the extended
//! protocol, binary results), so the client holds one row at a time and its
//! memory stays flat whatever the table size. Every value is read as raw bytes
//! (no decoding into Rust types): the client's own work stays small and the
//! same on both paths, so the difference in wall time is the path's.
//!
//! ```text
//! PGPASSWORD=... fetch 'host=127.0.0.1 port=5432 user=bench dbname=bench' 'SELECT * FROM customers'
//! ```
//!
//! prints one line, `rows=N bytes=N masked_emails=N seconds=S`: rows and
//! value bytes received, how many values of the column named `email` arrived
//! masked (starting `****@`), and the time from connecting to the last row.
//! The script checks `masked_emails` on every run: all rows through Sluice,
//! none directly.

use std::error::Error;
use std::str::FromStr;
use std::time::Instant;

use anyhow::{Context, bail};
use futures_util::{TryStreamExt, pin_mut};
use tokio_postgres::NoTls;
use tokio_postgres::types::{FromSql, ToSql, Type};

/// A value as the server sent it, whatever its type.
struct Raw<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Raw<'a>, Box<dyn Error + Sync + Send>> {
        Ok(Raw(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// What one fetch received.
#[derive(Debug, Default)]
struct Received {
    rows: u64,
    /// Bytes of non-NULL values, to compare the paths by eye: masks change
    /// the lengths of values a little, so they differ, but not by much.
    bytes: u64,
    /// Values of the `email` column that arrived masked.
    masked_emails: u64,
}

async fn fetch(conninfo: &str, sql: &str) -> anyhow::Result<Received> {
    let mut config = tokio_postgres::Config::from_str(conninfo)
        .with_context(|| format!("reading the connection string {conninfo:?}"))?;
    if let Ok(password) = std::env::var("PGPASSWORD") {
        config.password(password);
    }
    let (client, connection) = config
        .connect(NoTls)
        .await
        .with_context(|| format!("connecting with {conninfo:?}"))?;
    let connection = tokio::spawn(connection);

    let rows = client
        .query_raw(sql, std::iter::empty::<&(dyn ToSql + Sync)>())
        .await
        .with_context(|| format!("running {sql:?}"))?;
    pin_mut!(rows);
    let mut received = Received::default();
    let mut email = None;
    while let Some(row) = rows.try_next().await.context("reading a row")? {
        if received.rows == 0 {
            email = row.columns().iter().position(|column| column.name() == "email");
        }
        received.rows += 1;
        for index in 0..row.len() {
            let value: Option<Raw<'_>> = row.try_get(index).context("reading a value")?;
            let Some(Raw(value)) = value else { continue };
            received.bytes += value.len() as u64;
            if Some(index) == email && value.starts_with(b"****@") {
                received.masked_emails += 1;
            }
        }
    }

    drop(client);
    connection
        .await
        .context("the connection task panicked")?
        .context("the connection ended with an error")?;
    Ok(received)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(err) = run().await {
        eprintln!("fetch: {err:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench` to harness-less targets; ignore it so
    // that `cargo bench --bench fetch -- CONNINFO SQL` works too.
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|arg| *arg != "--bench")
        .collect();
    let [conninfo, sql] = args[..] else {
        bail!(
            "usage: fetch CONNINFO SQL (password in PGPASSWORD), for example\n  \
             fetch 'host=127.0.0.1 port=5432 user=bench dbname=bench sslmode=disable' 'SELECT * FROM customers'"
        );
    };
    let start = Instant::now();
    let received = fetch(conninfo, sql).await?;
    println!(
        "rows={} bytes={} masked_emails={} seconds={:.3}",
        received.rows,
        received.bytes,
        received.masked_emails,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
