//! The mTLS benchmark (docs/benchmarks.md, "mTLS"): client → sidecar → mTLS → sidecar → nginx,
//! a trellis-proxy pair and an Envoy pair (with trellis-agent) configured by the same control
//! plane, against direct, at fixed rates. Needs the release binaries (`cargo build --release
//! --bins`), nginx, oha, root for pinning. Not part of CI; `tests/mtls_bench_smoke.rs` keeps it
//! working.
//!
//! `cargo run --release -p trellis-e2e --example mtls_bench [-- REPS MEASURE_SECS [RATES [MODES]]]`
//! (MODES: comma-separated `d`, `t`, `e`, `r` — direct, the trellis-proxy pair, the Envoy pair,
//! a pair of plain TCP relays: the floor of any pair on this machine; default `d,t,e`).

#![allow(clippy::print_stdout)]

use std::time::Duration;

use trellis_e2e::mtls_bench::{Config, PairMode, relay, run, table};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--relay") {
        // One of the relay pair's processes: `--relay LISTEN TARGET`, one thread.
        let (listen, target) = (args.get(2).cloned().unwrap_or_default(), args.get(3).cloned().unwrap_or_default());
        return tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(relay(&listen, &target));
    }
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(bench(args))
}

async fn bench(args: Vec<String>) -> anyhow::Result<()> {
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
                    "r" => Ok(PairMode::Relay),
                    other => Err(anyhow::anyhow!("mode {other:?}: expected d, t, e or r")),
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
        relay_command: Some(vec![std::env::current_exe()?.display().to_string(), "--relay".into()]),
    };
    let samples = run(&cfg).await?;
    println!("\n{}", table(&samples));
    Ok(())
}
