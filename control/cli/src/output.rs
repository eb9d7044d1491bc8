//! `trellis get`: tables like kubectl's, and yaml / json / name output.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::bail;
use serde_json::{Value, json};
use trellis_client::Client;
use trellis_model::{Kind, Resource};

pub async fn get(
    client: &Client,
    kind: Kind,
    names: &[String],
    namespace: Option<&str>,
    output: &str,
) -> anyhow::Result<ExitCode> {
    if !["table", "wide", "yaml", "json", "name"].contains(&output) {
        bail!("unknown output format {output:?}; use table, wide, yaml, json or name");
    }
    let mut items = Vec::new();
    let mut failed = false;
    if names.is_empty() {
        items = client.list(kind, namespace).await?.0;
    } else {
        for n in names {
            match client.get(kind, namespace.or(Some("default")), n).await? {
                Some(r) => items.push(r),
                None => {
                    eprintln!(
                        "error: {} {:?} not found{}",
                        kind,
                        n,
                        namespace.map(|ns| format!(" in namespace {ns}")).unwrap_or_default()
                    );
                    failed = true;
                }
            }
        }
    }
    match output {
        "json" | "yaml" => {
            let value = if names.len() == 1 && items.len() == 1 {
                serde_json::to_value(&items[0])?
            } else {
                json!({"apiVersion": "v1", "kind": "List", "items": items})
            };
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", serde_saphyr::to_string(&value)?);
            }
        }
        "name" => {
            for r in &items {
                println!("{}.{}/{}", kind.name().to_ascii_lowercase(), kind.group(), r.metadata.name);
            }
        }
        _ => {
            if items.is_empty() && !failed {
                match namespace {
                    Some(ns) if kind.namespaced() => {
                        eprintln!("No {} found in namespace {ns}.", kind.plural())
                    }
                    _ => eprintln!("No {} found.", kind.plural()),
                }
            } else if !items.is_empty() {
                print!("{}", table(kind, &items, namespace.is_none() && kind.namespaced(), output == "wide"));
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn strings(v: &Value) -> String {
    match v {
        Value::Array(a) => format!(
            "[{}]",
            a.iter()
                .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Kind-specific columns: (header, value).
fn columns(kind: Kind, spec: &Value) -> Vec<(&'static str, String)> {
    match kind {
        Kind::VirtualService => vec![("GATEWAYS", strings(&spec["gateways"])), ("HOSTS", strings(&spec["hosts"]))],
        Kind::DestinationRule => vec![("HOST", strings(&spec["host"]))],
        Kind::Gateway => vec![("SERVERS", spec["servers"].as_array().map(|s| s.len()).unwrap_or(0).to_string())],
        Kind::ServiceEntry => vec![
            ("HOSTS", strings(&spec["hosts"])),
            ("LOCATION", strings(&spec["location"])),
            ("RESOLUTION", strings(&spec["resolution"])),
        ],
        Kind::WorkloadEntry => vec![("ADDRESS", strings(&spec["address"]))],
        Kind::PeerAuthentication => vec![("MODE", strings(&spec["mtls"]["mode"]))],
        Kind::AuthorizationPolicy => vec![("ACTION", spec["action"].as_str().unwrap_or("ALLOW").to_string())],
        Kind::WasmPlugin => vec![("URL", strings(&spec["url"])), ("PHASE", strings(&spec["phase"]))],
        Kind::MeshCluster => {
            vec![("NETWORK", strings(&spec["network"])), ("GATEWAY", strings(&spec["eastWestGateway"]["address"]))]
        }
        Kind::ApiToken => vec![("ROLE", strings(&spec["role"])), ("NAMESPACES", strings(&spec["namespaces"]))],
        Kind::WorkloadToken => vec![("SERVICE-ACCOUNT", strings(&spec["serviceAccount"]))],
        Kind::Sidecar | Kind::RequestAuthentication | Kind::Telemetry => Vec::new(),
    }
}

fn table(kind: Kind, items: &[Resource], with_namespace: bool, wide: bool) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header: Vec<String> = Vec::new();
    if with_namespace {
        header.push("NAMESPACE".into());
    }
    header.push("NAME".into());
    header.extend(columns(kind, &Value::Null).into_iter().map(|(h, _)| h.to_string()));
    header.push("AGE".into());
    if wide {
        header.push("RESOURCE-VERSION".into());
        header.push("GENERATION".into());
    }
    rows.push(header);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for r in items {
        let mut row = Vec::new();
        if with_namespace {
            row.push(r.namespace().to_string());
        }
        row.push(r.metadata.name.clone());
        row.extend(columns(kind, &r.spec).into_iter().map(|(_, v)| v));
        row.push(
            r.metadata
                .creation_timestamp
                .as_deref()
                .and_then(parse_rfc3339)
                .map(|t| age(now.saturating_sub(t)))
                .unwrap_or_else(|| "<unknown>".into()),
        );
        if wide {
            row.push(r.metadata.resource_version.clone().unwrap_or_default());
            row.push(r.metadata.generation.map(|g| g.to_string()).unwrap_or_default());
        }
        rows.push(row);
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// Seconds since the epoch of a `YYYY-MM-DDTHH:MM:SSZ` timestamp.
fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_ages() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-25T22:33:20Z"), Some(1_795_646_000));
        assert_eq!(parse_rfc3339("garbage"), None);
        assert_eq!(age(59), "59s");
        assert_eq!(age(3600), "60m");
        assert_eq!(age(90_000), "25h");
    }

    #[test]
    fn tables_align_columns() {
        let r: Resource =
            serde_json::from_value(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "bookinfo", "creationTimestamp": "1970-01-01T00:00:00Z"},
            "spec": {"hosts": ["reviews"]}}))
            .unwrap();
        let t = table(Kind::VirtualService, &[r], true, false);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE   NAME      GATEWAYS   HOSTS"), "{t}");
        assert!(lines[1].starts_with("bookinfo    reviews              [reviews]"), "{t}");
    }
}
