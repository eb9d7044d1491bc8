//! A seconds-long run of the proxy and filter benchmarks so they cannot rot: one repetition
//! at a low rate, every mode (each proxy without filters and with the four-filter chain), the
//! table printed. No timing assertions (figures come from the full run);
//! it checks that every mode was measured, nothing failed, and each proxy counted exactly the
//! requests it was sent.

#![allow(clippy::print_stdout)]

use std::time::Duration;

use trellis_e2e::bench::{Config, Mode, added_by_filters, run, table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_benchmark_runs_and_counts_every_request() {
    let cfg = Config {
        rates: vec![200],
        repetitions: 1,
        warmup: Duration::from_millis(500),
        measure: Duration::from_secs(2),
        connections: 8,
        pin: false,
        filters: vec![0, 4],
        modes: None,
    };
    let samples = run(&cfg).await.unwrap();
    println!("{}", table(&samples));
    let added = added_by_filters(&samples);
    println!("{added}");
    assert!(
        added.contains("| 200 | envoy +4 wasm (V8) |") && added.contains("| 200 | trellis-proxy +4 wasm |"),
        "{added}"
    );
    for mode in [Mode::Direct, Mode::Envoy(0), Mode::Envoy(4), Mode::Trellis(0), Mode::Trellis(4)] {
        let s = samples.iter().find(|s| s.mode == mode).unwrap_or_else(|| panic!("{mode:?} not measured"));
        assert_eq!(s.failed, 0, "{mode:?}: {s:?}");
        assert!(s.sent >= 300 && s.p50_ms.is_finite(), "{mode:?}: {s:?}");
        if mode != Mode::Direct {
            let (counted, sent) = s.proxy_counted.unwrap_or_else(|| panic!("{mode:?} reported no request count"));
            // Requests oha cut at the end of a run may or may not have reached the proxy.
            assert!(
                (sent..=sent + s.aborted).contains(&counted),
                "{mode:?} counted {counted} of {sent} requests (+{} cut by the load generator)",
                s.aborted
            );
            assert!(s.cpu.is_some() && s.rss_peak_mb.is_some(), "{s:?}");
            assert!(s.cpu_user.zip(s.cpu).is_some_and(|(u, c)| u <= c + 1e-9), "{s:?}");
        }
    }
}
