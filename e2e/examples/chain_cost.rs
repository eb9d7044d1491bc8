//! The host-side cost of the filter benchmark's wasm chain without a proxy around it: the four
//! built-in filters (`bench::filter_configs`, app `bench-f4`) run N streams — context create,
//! request headers, response headers, stream end — in the real host, on one thread, and the
//! time per stream is printed per filter and for the chain. A quick, noise-free view of what
//! `proxy_bench`'s "+4 filters" pays inside the VMs (the proxy's glue around them excluded).
//!
//! `cargo run --release -p trellis-e2e --example chain_cost -- [STREAMS [EVICT_KIB]]` (default
//! 200000 streams; EVICT_KIB > 0 writes that much memory between streams, outside the timed
//! part, to see the chain with cold caches as in a proxy whose requests cross the kernel).

#![allow(clippy::print_stdout)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use trellis_wasm_host::{Host, Limits, PluginConfig, Properties, SharedProperties, Stream, Vm};

#[derive(Debug)]
struct Route;

impl Properties for Route {
    fn get(&self, path: &str) -> Option<Vec<u8>> {
        match path {
            "route_name" | "xds.route_name" => Some(b"bench".to_vec()),
            "cluster_name" | "xds.cluster_name" => Some(b"outbound|8080||bench.default.svc.cluster.local".to_vec()),
            "response.code" => Some(200i64.to_le_bytes().to_vec()),
            "response.flags" => Some(0u64.to_le_bytes().to_vec()),
            _ => None,
        }
    }

    /// As the proxy's request properties answer the names read on every request.
    fn get_into(&self, path: &str, out: &mut Vec<u8>) -> bool {
        match path {
            "route_name" | "xds.route_name" => out.extend_from_slice(b"bench"),
            _ => return self.get(path).map(|v| out.extend_from_slice(&v)).is_some(),
        }
        true
    }
}

fn pairs(list: &[(&str, &str)]) -> Arc<Vec<(String, Vec<u8>)>> {
    Arc::new(list.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect())
}

fn main() -> anyhow::Result<()> {
    let streams: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(200_000);
    let evict_kib: usize = std::env::args().nth(2).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let mut evict = vec![0u8; evict_kib * 1024];
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../filters/Cargo.toml");
    let host = Host::new()?;
    let mut vms = Vec::new();
    let mut configs: Vec<_> = trellis_e2e::bench::filter_configs().into_iter().filter(|c| c.1 == "bench-f4").collect();
    configs.sort_by_key(|c| -c.2);
    for (name, _, _, config) in configs {
        let bytes = std::fs::read(trellis_filter_testkit::build(&manifest, name)?)?;
        let module = host.load(&bytes, None)?;
        let plugin = PluginConfig {
            name: name.into(),
            vm_id: name.into(),
            configuration: serde_json::to_vec(&config)?,
            ..Default::default()
        };
        vms.push((name, Vm::start(&host, module, plugin, Limits::default())?));
    }
    let request = pairs(&[
        (":method", "GET"),
        (":path", "/"),
        (":authority", "bench.default.svc.cluster.local:8080"),
        (":scheme", "http"),
        ("user-agent", "oha/1.4.0"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, compress, deflate, br"),
    ]);
    let response = pairs(&[
        (":status", "200"),
        ("server", "nginx/1.24.0"),
        ("date", "Thu, 26 Nov 2026 10:00:00 GMT"),
        ("content-type", "application/octet-stream"),
        ("content-length", "1024"),
        ("last-modified", "Thu, 26 Nov 2026 09:00:00 GMT"),
        ("etag", "\"6745-400\""),
        ("accept-ranges", "bytes"),
    ]);
    let props = SharedProperties(Arc::new(Route));
    let mut per_filter = vec![std::time::Duration::ZERO; vms.len()];
    let start = Instant::now();
    for round in 0..streams + streams / 10 {
        if round == streams / 10 {
            // The first tenth warms up.
            per_filter.iter_mut().for_each(|d| *d = std::time::Duration::ZERO);
        }
        for (i, b) in evict.iter_mut().enumerate().step_by(64) {
            *b = b.wrapping_add(i as u8);
        }
        std::hint::black_box(&evict);
        let mut ids = Vec::with_capacity(vms.len());
        for (i, (_, vm)) in vms.iter_mut().enumerate() {
            let t = Instant::now();
            let stream =
                Stream { request_headers: request.clone(), request_properties: props.clone(), ..Default::default() };
            let id = vm.create_stream(stream)?;
            vm.on_request_headers(id, true)?;
            per_filter[i] += t.elapsed();
            ids.push(id);
        }
        for (i, (_, vm)) in vms.iter_mut().enumerate().rev() {
            let t = Instant::now();
            if let Some(s) = vm.stream_mut(ids[i]) {
                s.response_headers = response.clone();
                s.response_properties = props.clone();
            }
            vm.on_response_headers(ids[i], false)?;
            vm.finish_stream(ids[i])?;
            per_filter[i] += t.elapsed();
        }
    }
    let total = start.elapsed();
    let mut sum = 0.0;
    for (i, (name, _)) in vms.iter().enumerate() {
        let ns = per_filter[i].as_nanos() as f64 / streams as f64;
        sum += ns;
        println!("{name:>8}: {ns:8.0} ns/stream");
    }
    println!("   chain: {sum:8.0} ns/stream ({streams} streams, {:.2} s wall with warm-up)", total.as_secs_f64());
    Ok(())
}
