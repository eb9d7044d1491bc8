//! Durations as Istio accepts them: protobuf JSON (`"1.5s"`) and Go-style (`"3m"`, `"1h30m"`,
//! `"250ms"`), which Istio's CRD validation also accepts.

use std::time::Duration;

/// Parses an Istio duration string. Returns a message suitable for a field error.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if text.starts_with('-') {
        return Err(format!("duration {s:?} is negative"));
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut total: f64 = 0.0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        if start == i {
            return Err(format!(
                "invalid duration {s:?}: expected a number followed by a unit (h, m, s, ms, us, ns), e.g. \"10s\""
            ));
        }
        let number: f64 = text[start..i]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: {:?} is not a number", &text[start..i]))?;
        let unit_start = i;
        while i < bytes.len() && !(bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        let unit = &text[unit_start..i];
        let seconds_per_unit = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            "" => {
                return Err(format!("invalid duration {s:?}: missing unit (h, m, s, ms, us, ns), e.g. \"{number}s\""));
            }
            other => {
                return Err(format!("invalid duration {s:?}: unknown unit {other:?} (use h, m, s, ms, us or ns)"));
            }
        };
        total += number * seconds_per_unit;
    }
    if !total.is_finite() || total > 315_576_000_000.0 {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_protobuf_and_go_forms() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("3m").unwrap(), Duration::from_secs(180));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn rejects_malformed_durations_with_a_reason() {
        assert!(parse_duration("ten seconds").unwrap_err().contains("expected a number"));
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(parse_duration("10d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("-1s").unwrap_err().contains("negative"));
        assert!(parse_duration("").is_err());
    }
}
