//! The filter benchmark (full run): each proxy without filters, Envoy with one and four wasm
//! filters in V8, trellis-proxy with the four-filter chain (auth, fault, mirror, retry — the
//! same modules and configs: trellis_e2e::bench::filter_plugins), fixed-rate load at
//! 1,000 and 3,200 RPS over 32 keep-alive connections, 5 repetitions, medians. Needs the
//! release binaries (`cargo build --release --bins`), nginx, oha (`cargo install oha`), root
//! for pinning (taskset / chrt). Not part of CI; `tests/proxy_bench_smoke.rs` keeps it working.
//!
//! `cargo run --release -p trellis-e2e --example filter_bench [-- REPS MEASURE_SECS]`

#![allow(clippy::print_stdout)]

use std::time::Duration;

use trellis_e2e::bench::{Config, oha, run, table};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let reps = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let secs = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(15);
    let cfg = Config {
        rates: vec![1000, 3200],
        repetitions: reps,
        warmup: Duration::from_secs(3),
        measure: Duration::from_secs(secs),
        connections: 32,
        pin: true,
        filters: vec![0, 1, 4],
    };
    println!(
        "load generator: {}",
        oha().map(|p| p.display().to_string()).unwrap_or_else(|| "built-in (oha not installed)".into())
    );
    let samples = run(&cfg).await?;
    println!("\n{}", table(&samples));
    Ok(())
}
