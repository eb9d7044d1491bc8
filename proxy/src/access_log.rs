//! Access log: one line per request, in Envoy's default text format or as JSON with the key
//! names of Istio's JSON access log; off by default. Response flags are Envoy's (UH, UO, UF,
//! UT, NR, ...). Lines go to stdout or a file.
//!
//! Text (Envoy's default format):
//! `[START_TIME] "METHOD PATH PROTOCOL" CODE FLAGS BYTES_RECEIVED BYTES_SENT DURATION
//! UPSTREAM_SERVICE_TIME "X-FORWARDED-FOR" "USER-AGENT" "X-REQUEST-ID" "AUTHORITY" "UPSTREAM_HOST"`

use std::io::Write;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where and how lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Off,
    Text,
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "" => Ok(Format::Off),
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            other => Err(format!("access log format {other:?}: expected off, text or json")),
        }
    }
}

/// Everything one line says.
#[derive(Debug, Clone, Default)]
pub struct Entry<'a> {
    pub start: Option<SystemTime>,
    pub method: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub flags: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration_ms: u64,
    pub upstream_service_time_ms: Option<u64>,
    pub x_forwarded_for: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub authority: &'a str,
    pub upstream_host: Option<&'a str>,
    pub upstream_cluster: Option<&'a str>,
    pub route_name: Option<&'a str>,
    pub downstream_remote: Option<SocketAddr>,
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), as Envoy's %START_TIME%.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn dash(v: Option<&str>) -> &str {
    v.filter(|s| !s.is_empty()).unwrap_or("-")
}

impl Entry<'_> {
    pub fn text(&self) -> String {
        format!(
            "[{}] \"{} {} {}\" {} {} {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\"\n",
            self.start.map(rfc3339_millis).unwrap_or_else(|| "-".into()),
            self.method,
            self.path,
            self.protocol,
            self.status,
            dash(Some(self.flags)),
            self.bytes_received,
            self.bytes_sent,
            self.duration_ms,
            self.upstream_service_time_ms.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
            dash(self.x_forwarded_for),
            dash(self.user_agent),
            dash(self.request_id),
            dash(Some(self.authority)),
            dash(self.upstream_host),
        )
    }

    pub fn json(&self) -> String {
        let mut line = serde_json::json!({
            "start_time": self.start.map(rfc3339_millis),
            "method": self.method,
            "path": self.path,
            "protocol": self.protocol,
            "response_code": self.status,
            "response_flags": dash(Some(self.flags)),
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "duration": self.duration_ms,
            "upstream_service_time": self.upstream_service_time_ms,
            "x_forwarded_for": self.x_forwarded_for,
            "user_agent": self.user_agent,
            "request_id": self.request_id,
            "authority": self.authority,
            "upstream_host": self.upstream_host,
            "upstream_cluster": self.upstream_cluster,
            "route_name": self.route_name,
            "downstream_remote_address": self.downstream_remote.map(|a| a.to_string()),
        })
        .to_string();
        line.push('\n');
        line
    }
}

/// The configured log.
#[derive(Debug)]
pub struct AccessLog {
    pub format: Format,
    /// `None`: stdout.
    file: Option<std::sync::Mutex<std::fs::File>>,
}

impl AccessLog {
    pub fn new(format: Format, path: Option<&std::path::Path>) -> std::io::Result<AccessLog> {
        let file = match path {
            Some(p) if format != Format::Off => {
                Some(std::sync::Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?))
            }
            _ => None,
        };
        Ok(AccessLog { format, file })
    }

    pub fn off() -> AccessLog {
        AccessLog { format: Format::Off, file: None }
    }

    pub fn enabled(&self) -> bool {
        self.format != Format::Off
    }

    pub fn write(&self, e: &Entry<'_>) {
        let line = match self.format {
            Format::Off => return,
            Format::Text => e.text(),
            Format::Json => e.json(),
        };
        let _ = match &self.file {
            Some(f) => f.lock().unwrap_or_else(|p| p.into_inner()).write_all(line.as_bytes()),
            None => std::io::stdout().lock().write_all(line.as_bytes()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry() -> Entry<'static> {
        Entry {
            start: Some(UNIX_EPOCH + Duration::from_millis(1_460_751_420_310)),
            method: "POST",
            path: "/api/v1/locations",
            protocol: "HTTP/2",
            status: 204,
            flags: "-",
            bytes_received: 154,
            bytes_sent: 0,
            duration_ms: 226,
            upstream_service_time_ms: Some(100),
            x_forwarded_for: Some("10.0.35.28"),
            user_agent: Some("nsq2http"),
            request_id: Some("cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2"),
            authority: "locations",
            upstream_host: Some("10.0.2.1:80"),
            ..Default::default()
        }
    }

    #[test]
    fn the_text_line_is_envoys_default_format() {
        assert_eq!(
            entry().text(),
            "[2016-04-15T20:17:00.310Z] \"POST /api/v1/locations HTTP/2\" 204 - 154 0 226 100 \"10.0.35.28\" \"nsq2http\" \"cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2\" \"locations\" \"10.0.2.1:80\"\n"
        );
        let mut e = entry();
        e.upstream_host = None;
        e.flags = "UH";
        e.upstream_service_time_ms = None;
        assert!(e.text().contains("204 UH 154 0 226 - ") && e.text().ends_with("\"-\"\n"), "{}", e.text());
    }

    #[test]
    fn the_json_line_uses_istios_keys() {
        let v: serde_json::Value = serde_json::from_str(&entry().json()).unwrap();
        assert_eq!(v["response_code"], 204);
        assert_eq!(v["start_time"], "2016-04-15T20:17:00.310Z");
        assert_eq!(v["upstream_host"], "10.0.2.1:80");
        assert_eq!(v["response_flags"], "-");
    }
}
