//! `trellis-control --apply PATH`: apply configuration files at start, through the same
//! validation and apply logic as the API.

use std::path::Path;

use anyhow::{Context, bail};
use trellis_model::{ParsedDocument, parse_documents};
use trellis_store::ResourceStore;

use crate::api::apply_batch;

/// Counts of what an apply did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub created: usize,
    pub configured: usize,
    pub unchanged: usize,
}

/// Applies every YAML/JSON file under `path`, one file at a time (all-or-nothing per file).
pub async fn apply_path(store: &ResourceStore, path: &Path) -> anyhow::Result<Summary> {
    let files = trellis_client::files::collect(path)?;
    let mut summary = Summary::default();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let name = file.display().to_string();
        let (docs, errors) = parse_documents(&text, &name);
        if let Some(e) = errors.first() {
            bail!("{e}");
        }
        let items = docs.iter().map(|d| serde_json::to_value(&d.resource)).collect::<Result<Vec<_>, _>>()?;
        let origins: Vec<String> = docs.iter().map(ParsedDocument::short_origin).collect();
        let outcome =
            apply_batch(store, &crate::auth::Principal::admin("--apply"), items, None, false).await.map_err(|e| {
                let causes: Vec<String> = e
                    .causes
                    .iter()
                    .map(|(f, m)| format!("{name}: {}: {m}", trellis_client::describe_item_field(&origins, f)))
                    .collect();
                anyhow::anyhow!(
                    "{}",
                    if causes.is_empty() { format!("{name}: {}", e.message) } else { causes.join("\n") }
                )
            })?;
        for r in outcome["results"].as_array().into_iter().flatten() {
            match r["action"].as_str() {
                Some("created") => summary.created += 1,
                Some("configured") => summary.configured += 1,
                _ => summary.unchanged += 1,
            }
        }
    }
    Ok(summary)
}
