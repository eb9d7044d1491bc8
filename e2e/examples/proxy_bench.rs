//! The proxy benchmark (full run): direct vs Envoy 1.40 vs trellis-proxy, fixed-rate load at
//! 1,000 and 3,200 RPS over 32 keep-alive connections, 5 repetitions, medians. Needs the
//! release binaries (`cargo build --release --bins`), nginx, oha (`cargo install oha`), root
//! for pinning (taskset / chrt). Not part of CI; `tests/proxy_bench_smoke.rs` keeps it working.
//!
//! `cargo run --release -p trellis-e2e --example proxy_bench [-- REPS MEASURE_SECS [FILTERS [RATES]]]`
//!
//! FILTERS (default `0`) is a comma-separated list of wasm filter counts to measure each proxy
//! with: `0,1,4` is the filter benchmark (docs/benchmarks.md, "Wasm filters"; the modules and
//! their configuration: `trellis_e2e::bench::filter_plugins`). RATES (default `1000,3200`):
//! the request rates, comma-separated. MODES (default: all): only these, e.g. `e0,e1,t0,t4`
//! (`d` direct, `eN` Envoy with N filters, `tN` trellis-proxy with N filters), for more
//! repetitions of the comparisons that matter in the same time.

#![allow(clippy::print_stdout)]

use std::time::Duration;

use trellis_e2e::bench::{Config, added_by_filters, oha, run, table};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let reps = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let secs = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(15);
    let filters: Vec<u8> = match args.get(3) {
        Some(list) => list.split(',').map(|f| f.trim().parse()).collect::<Result<_, _>>()?,
        None => vec![0],
    };
    let rates: Vec<u32> = match args.get(4) {
        Some(list) => list.split(',').map(|r| r.trim().parse()).collect::<Result<_, _>>()?,
        None => vec![1000, 3200],
    };
    let modes = match args.get(5) {
        Some(list) => Some(
            list.split(',')
                .map(|m| match (m.get(..1), m.get(1..).and_then(|n| n.parse::<u8>().ok())) {
                    (Some("d"), _) => Ok(trellis_e2e::bench::Mode::Direct),
                    (Some("e"), Some(n)) => Ok(trellis_e2e::bench::Mode::Envoy(n)),
                    (Some("t"), Some(n)) => Ok(trellis_e2e::bench::Mode::Trellis(n)),
                    _ => Err(anyhow::anyhow!("mode {m:?}: expected d, eN or tN")),
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let cfg = Config {
        modes,
        rates,
        repetitions: reps,
        warmup: Duration::from_secs(3),
        measure: Duration::from_secs(secs),
        connections: 32,
        pin: true,
        filters,
    };
    println!(
        "load generator: {}",
        oha().map(|p| p.display().to_string()).unwrap_or_else(|| "built-in (oha not installed)".into())
    );
    let samples = run(&cfg).await?;
    println!("\n{}", table(&samples));
    if cfg.filters.iter().any(|f| *f > 0) {
        println!("Added by the filters (paired within each repetition):\n\n{}", added_by_filters(&samples));
    }
    Ok(())
}
