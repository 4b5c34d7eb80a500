//! Durations and sizes as people write them in the configuration file.

use std::time::Duration;

use super::raw::{RawDuration, RawSize};

/// Reads `"30s"`, `"500ms"`, `"5m"`, `"2h"` or a whole number of seconds.
pub fn parse_duration(raw: &RawDuration) -> Result<Duration, String> {
    let text = match raw {
        RawDuration::Seconds(secs) => {
            return u64::try_from(*secs)
                .map(Duration::from_secs)
                .map_err(|_| format!("{secs} is negative: write a duration such as \"30s\""));
        }
        RawDuration::Text(text) => text.trim(),
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("\"{text}\" is not a duration: write a whole number and a unit, such as \"30s\""))?;
    let per_unit_ms = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "\"{text}\" has an unknown unit \"{other}\": use ms, s, m, h or d"
            ));
        }
    };
    number
        .checked_mul(per_unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("\"{text}\" is too long"))
}

/// Reads `"64MiB"`, `"512KiB"`, `"1GiB"`, `"100kB"` or a whole number of bytes.
pub fn parse_size(raw: &RawSize) -> Result<usize, String> {
    let text = match raw {
        RawSize::Bytes(bytes) => {
            return usize::try_from(*bytes).map_err(|_| format!("{bytes} is negative: write a size such as \"64MiB\""));
        }
        RawSize::Text(text) => text.trim(),
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("\"{text}\" is not a size: write a whole number and a unit, such as \"64MiB\""))?;
    let multiplier: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "\"{text}\" has an unknown unit \"{other}\": use B, KiB, MiB or GiB"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("\"{text}\" is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Result<Duration, String> {
        parse_duration(&RawDuration::Text(text.into()))
    }

    fn s(text: &str) -> Result<usize, String> {
        parse_size(&RawSize::Text(text.into()))
    }

    #[test]
    fn durations() {
        assert_eq!(d("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(d("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(d("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(d("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration(&RawDuration::Seconds(7)), Ok(Duration::from_secs(7)));
        assert!(d("ten seconds").unwrap_err().contains("not a duration"));
        assert!(d("5y").unwrap_err().contains("unknown unit \"y\""));
        assert!(parse_duration(&RawDuration::Seconds(-1)).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(s("64MiB"), Ok(64 << 20));
        assert_eq!(s("1GiB"), Ok(1 << 30));
        assert_eq!(s("512 KiB"), Ok(512 << 10));
        assert_eq!(s("100"), Ok(100));
        assert!(s("64mb").unwrap_err().contains("unknown unit"));
        assert!(s("99999999999999999999GiB").is_err());
    }
}
