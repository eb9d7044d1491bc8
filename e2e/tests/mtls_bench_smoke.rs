//! A seconds-long run of the mTLS benchmark so it cannot rot: one repetition at a low rate,
//! every mode measured, nothing failed, CPU and RSS read for both proxies of each pair. No
//! timing assertions (figures come from the full run).

#![allow(clippy::print_stdout)]

use std::time::Duration;

use trellis_e2e::mtls_bench::{Config, PairMode, run, table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mtls_benchmark_runs_every_mode() {
    let cfg = Config {
        rates: vec![200],
        repetitions: 1,
        warmup: Duration::from_millis(500),
        measure: Duration::from_secs(2),
        connections: 8,
        pin: false,
        modes: None,
        // The relay floor needs the example binary (it runs itself as the relays).
        relay_command: None,
    };
    let samples = run(&cfg).await.unwrap();
    println!("{}", table(&samples));
    for mode in [PairMode::Direct, PairMode::Trellis, PairMode::Envoy] {
        let s = samples.iter().find(|s| s.mode == mode).unwrap_or_else(|| panic!("{mode:?} not measured"));
        assert_eq!(s.failed, 0, "{mode:?}: {s:?}");
        assert!(s.sent >= 300 && s.p50_ms.is_finite(), "{mode:?}: {s:?}");
        if mode != PairMode::Direct {
            assert!(s.cpu.is_some() && s.rss_mb.is_some(), "{s:?}");
        }
    }
}
