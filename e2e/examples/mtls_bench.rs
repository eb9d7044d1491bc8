//! The mTLS benchmark (docs/benchmarks.md, "mTLS"): client → sidecar → mTLS → sidecar → nginx,
//! a trellis-proxy pair and an Envoy pair (with trellis-agent) configured by the same control
//! plane, against direct, at fixed rates. Needs the release binaries (`cargo build --release
//! --bins`), nginx, oha, root for pinning. Not part of CI; `tests/mtls_bench_smoke.rs` keeps it
//! working.
//!
//! `cargo run --release -p trellis-e2e --example mtls_bench [-- REPS MEASURE_SECS [RATES [MODES]]]`
//! (MODES: comma-separated `d`, `t`, `e` — direct, the trellis-proxy pair, the Envoy pair).

#![allow(clippy::print_stdout)]

use std::time::Duration;

use trellis_e2e::mtls_bench::{Config, PairMode, run, table};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let repetitions = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let secs = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10);
    let rates: Vec<u32> = match args.get(3) {
        Some(list) => list.split(',').map(|r| r.trim().parse()).collect::<Result<_, _>>()?,
        None => vec![1000, 3200],
    };
    let modes = match args.get(4) {
        Some(list) => Some(
            list.split(',')
                .map(|m| match m.trim() {
                    "d" => Ok(PairMode::Direct),
                    "t" => Ok(PairMode::Trellis),
                    "e" => Ok(PairMode::Envoy),
                    other => Err(anyhow::anyhow!("mode {other:?}: expected d, t or e")),
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let cfg = Config {
        modes,
        rates,
        repetitions,
        warmup: Duration::from_secs(3),
        measure: Duration::from_secs(secs),
        connections: 32,
        pin: true,
    };
    let samples = run(&cfg).await?;
    println!("\n{}", table(&samples));
    Ok(())
}
