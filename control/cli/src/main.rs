//! `trellis`: the command-line client of the Trellis control plane.
//!
//! `apply`, `get`, `delete` talk to the config API (`--server`, with the admin token);
//! `validate` and `analyze -f` work offline on files with the same model the server uses.
//! Results go to stdout, errors and warnings to stderr; any error makes the exit code non-zero.

#![allow(clippy::print_stdout)]

mod output;
mod scaffold;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use sha2::Digest;
use trellis_client::{Client, Error as ClientError, describe_item_field};
use trellis_model::analyze::{Analyzed, Severity, analyze};
use trellis_model::{Kind, ParsedDocument, parse_documents, validate_resource};

#[derive(Debug, Parser)]
#[command(name = "trellis", version, about = "Trellis service mesh CLI")]
struct Cli {
    /// Config API address.
    #[arg(long, global = true, env = "TRELLIS_SERVER", default_value = "http://127.0.0.1:15080")]
    server: String,
    /// Bearer token for the API.
    #[arg(long, global = true, env = "TRELLIS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the token (default: <data-dir>/admin.token of a local control plane).
    #[arg(long, global = true, env = "TRELLIS_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate(s) to trust for an https:// server (default: <data-dir>/api-ca.pem of a
    /// local control plane).
    #[arg(long, global = true, env = "TRELLIS_CA_FILE")]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update resources from files, directories or stdin (-f -). Each file is
    /// validated as a whole on the server: if any document is invalid, nothing of that file is
    /// stored.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Namespace for resources that name none.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Validate and report what would happen, store nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List or show resources.
    Get {
        /// Kind: plural, singular or short name (virtualservices, vs, dr, pa, ...).
        kind: String,
        /// Names (all when none).
        names: Vec<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Output format: table (default), wide, yaml, json, name.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Delete resources by kind and name, or those defined in files.
    Delete {
        kind: Option<String>,
        names: Vec<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
        /// Treat "not found" as success.
        #[arg(long)]
        ignore_not_found: bool,
    },
    /// Validate files offline: per-resource validation and cross-resource analysis.
    Validate {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// Cross-resource analysis of the stored configuration, or of files with -f (offline).
    Analyze {
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
    },
    /// Client and server versions.
    Version,
    /// xDS sync status of every connected proxy (like `istioctl proxy-status`).
    ProxyStatus,
    /// Manage API tokens (needs an Admin token).
    Token {
        #[command(subcommand)]
        action: TokenCommand,
    },
    /// Manage workload tokens: the credentials proxies use to get their certificates (SPIFFE
    /// identity of one service account) from the mesh CA.
    WorkloadToken {
        #[command(subcommand)]
        action: WorkloadTokenCommand,
    },
    /// Write proxy-wasm filters.
    Filter {
        #[command(subcommand)]
        action: FilterCommand,
    },
    /// Upload and list wasm modules (content-addressed by sha256).
    Wasm {
        #[command(subcommand)]
        action: WasmCommand,
    },
}

#[derive(Debug, Subcommand)]
enum WasmCommand {
    /// Upload a module; prints the trellis://SHA256 URL a WasmPlugin names it by.
    Push { file: std::path::PathBuf },
    /// Modules stored in the control plane.
    List,
}

#[derive(Debug, Subcommand)]
enum FilterCommand {
    /// Scaffold a filter crate (filter + host-side tests) that builds, tests and loads.
    New {
        name: String,
        /// Where to write it (default: ./NAME).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// A Trellis checkout (the SDK and testkit are path dependencies).
        #[arg(long)]
        repo: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print its secret. The secret is shown only this once; the server
    /// keeps its SHA-256.
    Create {
        name: String,
        /// viewer (read only), editor (read and write configuration) or admin (everything).
        #[arg(long, value_parser = ["viewer", "editor", "admin"])]
        role: String,
        /// Limit the token to these namespaces (repeatable); not with admin.
        #[arg(long = "namespace", short = 'n')]
        namespaces: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Revoke tokens: they stop working at once.
    Revoke { names: Vec<String> },
    /// List tokens (names, roles, namespaces; never secrets).
    List,
}

#[derive(Debug, Subcommand)]
enum WorkloadTokenCommand {
    /// Create a token for a service account and print its secret (shown only this once).
    Create {
        name: String,
        /// The namespace of the service account (and of the token).
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// The service account whose identity the token's holder gets.
        #[arg(long)]
        service_account: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Revoke tokens: no certificate is issued for them from then on.
    Revoke {
        names: Vec<String>,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
    /// List tokens (names, service accounts; never secrets).
    List {
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
}

/// A new secret and its SHA-256 (hex), as tokens store it.
fn new_secret() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let secret = format!("trl_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let sha: String = sha2::Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    (secret, sha)
}

/// Creates a token resource and prints its secret, or the server's reasons.
async fn create_token(client: &Client, res: serde_json::Value, secret: &str, what: &str) -> anyhow::Result<ExitCode> {
    let res: trellis_model::Resource = serde_json::from_value(res)?;
    match client.create(&res).await {
        Ok(_) => {
            eprintln!("{what} created; its secret, shown only now:");
            println!("{secret}");
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Api { message, causes, .. }) => {
            for c in &causes {
                eprintln!("error: {}: {}", c.field, c.message);
            }
            if causes.is_empty() {
                eprintln!("error: {message}");
            }
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}

async fn workload_token(client: &Client, action: &WorkloadTokenCommand) -> anyhow::Result<ExitCode> {
    match action {
        WorkloadTokenCommand::Create { name, namespace, service_account, description } => {
            let (secret, sha) = new_secret();
            let res = serde_json::json!({
                "apiVersion": "trellis.dev/v1alpha1", "kind": "WorkloadToken", "metadata": {"name": name, "namespace": namespace},
                "spec": {"serviceAccount": service_account, "sha256": sha, "description": description},
            });
            create_token(
                client,
                res,
                &secret,
                &format!("workload token {namespace}/{name} (service account {service_account})"),
            )
            .await
        }
        WorkloadTokenCommand::Revoke { names, namespace } => {
            delete(client, Some("workloadtokens"), names, namespace, &[], false).await
        }
        WorkloadTokenCommand::List { namespace } => {
            let ns: Vec<String> = namespace.iter().cloned().collect();
            output::get(client, Kind::WorkloadToken, &[], ns.first().map(String::as_str), "table").await
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A file in the data directory of a local control plane, if it exists.
fn local_file(name: &str) -> Option<PathBuf> {
    let data = std::env::var_os("TRELLIS_DATA_DIR").map(PathBuf::from).or_else(|| {
        std::env::var_os("XDG_DATA_HOME")
            .map(|x| PathBuf::from(x).join("trellis"))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/trellis")))
    })?;
    Some(data.join(name)).filter(|p| p.exists())
}

fn client(cli: &Cli) -> anyhow::Result<Client> {
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => match local_file("admin.token") {
            Some(f) => Some(
                std::fs::read_to_string(&f)
                    .with_context(|| format!("reading token file {}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        },
    };
    let ca = cli
        .ca_file
        .clone()
        .or_else(|| if cli.server.starts_with("https://") { local_file("api-ca.pem") } else { None });
    match ca {
        Some(path) => {
            let pem = std::fs::read(&path).with_context(|| format!("reading CA file {}", path.display()))?;
            Ok(Client::with_ca(&cli.server, token, &pem)?)
        }
        None => Ok(Client::new(&cli.server, token)),
    }
}

fn kind_arg(name: &str) -> anyhow::Result<Kind> {
    Kind::from_resource_name(name).with_context(|| {
        format!(
            "unknown kind {name:?}; known: {}",
            Kind::ALL
                .iter()
                .map(|k| format!("{} ({})", k.plural(), k.short_names().join(",")))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Reads the named files (directories recursively, `-` for stdin) as (file name, text).
fn read_inputs(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for a in args {
        if a == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("reading stdin")?;
            out.push(("<stdin>".to_string(), text));
            continue;
        }
        for f in trellis_client::files::collect(Path::new(a))? {
            let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            out.push((f.display().to_string(), text));
        }
    }
    Ok(out)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Apply { files, namespace, dry_run } => {
            apply(&client(&cli)?, files, namespace.as_deref(), *dry_run).await
        }
        Command::Get { kind, names, namespace, all_namespaces, output } => {
            let kind = kind_arg(kind)?;
            let ns = (!all_namespaces).then_some(namespace.as_str());
            output::get(&client(&cli)?, kind, names, ns, output).await
        }
        Command::Delete { kind, names, namespace, files, ignore_not_found } => {
            delete(&client(&cli)?, kind.as_deref(), names, namespace, files, *ignore_not_found).await
        }
        Command::Validate { files } => validate(files),
        Command::Analyze { files } if !files.is_empty() => validate(files),
        Command::Analyze { .. } => analyze_server(&client(&cli)?).await,
        Command::Token { action } => token(&client(&cli)?, action).await,
        Command::WorkloadToken { action } => workload_token(&client(&cli)?, action).await,
        Command::ProxyStatus => proxy_status(&client(&cli)?).await,
        Command::Filter { action: FilterCommand::New { name, dir, repo } } => {
            let dir = scaffold::new_filter(name, dir.as_deref(), repo.as_deref())?;
            println!("wrote {}", dir.display());
            println!("  cd {} && cargo build -p {name} --target wasm32-wasip1 --profile wasm", dir.display());
            println!("  cargo test -p {name}-tests");
            Ok(ExitCode::SUCCESS)
        }
        Command::Wasm { action: WasmCommand::Push { file } } => {
            let bytes = std::fs::read(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let out = client(&cli)?.push_module(bytes).await?;
            let created = if out["created"].as_bool() == Some(true) { "uploaded" } else { "already stored" };
            println!("{} ({} bytes, {created})", out["url"].as_str().unwrap_or(""), out["size"]);
            println!("use it in a WasmPlugin: spec.url: {}", out["url"].as_str().unwrap_or(""));
            Ok(ExitCode::SUCCESS)
        }
        Command::Wasm { action: WasmCommand::List } => {
            let out = client(&cli)?.list_modules().await?;
            println!("{:<74} {:>10}", "URL", "BYTES");
            for m in out["items"].as_array().into_iter().flatten() {
                println!("{:<74} {:>10}", m["url"].as_str().unwrap_or(""), m["size"]);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("trellis {}", env!("CARGO_PKG_VERSION"));
            match client(&cli)?.version().await {
                Ok(v) => println!("server {} at {}", v["trellis"].as_str().unwrap_or("?"), cli.server),
                Err(e) => eprintln!("server: {e}"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn apply(client: &Client, files: &[String], namespace: Option<&str>, dry_run: bool) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for (name, text) in read_inputs(files)? {
        let (docs, errors) = parse_documents(&text, &name);
        if !errors.is_empty() {
            for e in errors {
                eprintln!("error: {e}");
            }
            eprintln!("error: {name}: nothing applied from this file");
            failed = true;
            continue;
        }
        if docs.is_empty() {
            eprintln!("warning: {name}: no resources");
            continue;
        }
        let items = docs.iter().map(|d| serde_json::to_value(&d.resource)).collect::<Result<Vec<_>, _>>()?;
        match client.apply(items, namespace, dry_run).await {
            Ok(resp) => {
                let suffix = if dry_run { " (dry run)" } else { "" };
                for r in &resp.results {
                    println!("{}.{}/{} {}{suffix}", r.kind.to_ascii_lowercase(), r.group, r.name, r.action);
                }
                for d in &resp.diagnostics {
                    eprintln!("{} [{}] ({}) {}: {}", d.severity, d.code, d.resource, d.path, d.message);
                }
            }
            Err(ClientError::Api { causes, message, .. }) if !causes.is_empty() => {
                let origins = docs.iter().map(ParsedDocument::short_origin).collect::<Vec<_>>();
                for c in causes {
                    eprintln!("error: {name}: {}: {}", describe_item_field(&origins, &c.field), c.message);
                }
                let _ = message;
                eprintln!("error: {name}: nothing applied from this file");
                failed = true;
            }
            Err(e @ ClientError::Transport { .. }) => return Err(e.into()),
            Err(e) => {
                eprintln!("error: {name}: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

async fn delete(
    client: &Client,
    kind: Option<&str>,
    names: &[String],
    namespace: &str,
    files: &[String],
    ignore_not_found: bool,
) -> anyhow::Result<ExitCode> {
    let mut targets: Vec<(Kind, Option<String>, String)> = Vec::new();
    match (kind, files.is_empty()) {
        (Some(k), true) => {
            let kind = kind_arg(k)?;
            if names.is_empty() {
                bail!("name the resources to delete: trellis delete {k} NAME...");
            }
            for n in names {
                targets.push((kind, kind.namespaced().then(|| namespace.to_string()), n.clone()));
            }
        }
        (None, false) => {
            for (name, text) in read_inputs(files)? {
                let (docs, errors) = parse_documents(&text, &name);
                if let Some(e) = errors.first() {
                    bail!("{e}");
                }
                for d in docs {
                    let kind = d.resource.kind().map_err(|e| anyhow::anyhow!("{}: {e}", d.origin()))?;
                    let ns = kind
                        .namespaced()
                        .then(|| d.resource.metadata.namespace.clone().unwrap_or_else(|| namespace.to_string()));
                    targets.push((kind, ns, d.resource.metadata.name.clone()));
                }
            }
        }
        _ => bail!("use either KIND NAME... or -f FILE, not both"),
    }
    let mut failed = false;
    for (kind, ns, name) in targets {
        match client.delete(kind, ns.as_deref(), &name).await {
            Ok(_) => println!("{}.{}/{name} deleted", kind.name().to_ascii_lowercase(), kind.group()),
            Err(ClientError::Api { code: 404, .. }) if ignore_not_found => {}
            Err(e @ ClientError::Transport { .. }) => return Err(e.into()),
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Offline validation of files, then analysis across all of them.
fn validate(files: &[String]) -> anyhow::Result<ExitCode> {
    let mut errors = 0usize;
    let mut analyzed = Vec::new();
    for (name, text) in read_inputs(files)? {
        let (docs, parse_errors) = parse_documents(&text, &name);
        for e in parse_errors {
            eprintln!("error: {e}");
            errors += 1;
        }
        for d in docs {
            match validate_resource(&d.resource, "default") {
                Ok((key, spec)) => analyzed.push(Analyzed { key, spec, origin: Some(d.origin()) }),
                Err(e) => {
                    for fe in e.errors {
                        eprintln!("error: {}: {fe}", d.origin());
                        errors += 1;
                    }
                }
            }
        }
    }
    let diags = analyze(&analyzed);
    for d in &diags {
        eprintln!("{d}");
    }
    errors += diags.iter().filter(|d| d.severity == Severity::Error).count();
    let warnings = diags.iter().filter(|d| d.severity == Severity::Warning).count();
    if errors == 0 {
        println!("{} resources valid ({warnings} warnings)", analyzed.len());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{errors} errors, {warnings} warnings");
        Ok(ExitCode::FAILURE)
    }
}

async fn analyze_server(client: &Client) -> anyhow::Result<ExitCode> {
    let findings = client.analyze().await?;
    if findings.is_empty() {
        println!("No validation issues found in the stored configuration.");
        return Ok(ExitCode::SUCCESS);
    }
    for f in &findings {
        eprintln!("{} [{}] ({}) {}: {}", f.severity, f.code, f.resource, f.path, f.message);
    }
    let errors = findings.iter().filter(|f| f.severity == "Error").count();
    eprintln!("{errors} errors, {} warnings", findings.len() - errors);
    Ok(if errors > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

async fn token(client: &Client, action: &TokenCommand) -> anyhow::Result<ExitCode> {
    match action {
        TokenCommand::Create { name, role, namespaces, description } => {
            let (secret, sha) = new_secret();
            let role = match role.as_str() {
                "viewer" => "Viewer",
                "editor" => "Editor",
                _ => "Admin",
            };
            let res = serde_json::json!({
                "apiVersion": "trellis.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name},
                "spec": {"role": role, "namespaces": namespaces, "sha256": sha, "description": description},
            });
            create_token(client, res, &secret, &format!("token {name} ({role})")).await
        }
        TokenCommand::Revoke { names } => delete(client, Some("apitokens"), names, "default", &[], false).await,
        TokenCommand::List => output::get(client, Kind::ApiToken, &[], None, "table").await,
    }
}

async fn proxy_status(client: &Client) -> anyhow::Result<ExitCode> {
    let v = client.call(trellis_client::Method::GET, "/apis/trellis.dev/v1alpha1/proxystatus", None).await?;
    let proxies = v["proxies"].as_array().cloned().unwrap_or_default();
    if proxies.is_empty() {
        eprintln!("No proxies are connected.");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![["NAME", "NAMESPACE", "PROTOCOL", "CDS", "LDS", "EDS", "RDS"].map(String::from).to_vec()];
    let mut errors = Vec::new();
    for p in &proxies {
        let id = p["id"].as_str().unwrap_or_default().to_string();
        let mut row = vec![
            id.clone(),
            p["namespace"].as_str().unwrap_or_default().to_string(),
            p["protocol"].as_str().unwrap_or_default().to_string(),
        ];
        for t in ["CDS", "LDS", "EDS", "RDS"] {
            let st = &p["types"][t];
            row.push(st["state"].as_str().unwrap_or("NOT SENT").to_string());
            if let Some(e) = st["error"].as_str() {
                errors.push(format!("{id} {t}: {e}"));
            }
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        println!("{}", line.join("   ").trim_end());
    }
    for e in &errors {
        println!("NACK {e}");
    }
    Ok(ExitCode::SUCCESS)
}
