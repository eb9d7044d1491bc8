//! Resident memory of the wasm host, step by step (engine, compile, first VM, more VMs), with
//! trellis-proxy's allocator: `cargo run --release -p trellis-proxy --example wasm_rss -- FILE.wasm [CONFIG_JSON]`.

#![allow(clippy::print_stdout)]

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let bytes = std::fs::read(args.get(1).ok_or_else(|| anyhow::anyhow!("usage: wasm_rss FILE.wasm [CONFIG]"))?)?;
    let config = args.get(2).cloned().unwrap_or_default().into_bytes();
    println!("start                {:>8} KiB", rss_kib());
    let host = trellis_wasm_host::Host::new()?;
    println!("engine               {:>8} KiB", rss_kib());
    let module = host.load(&bytes, None)?;
    println!("compiled             {:>8} KiB", rss_kib());
    let plugin = trellis_wasm_host::PluginConfig { name: "p".into(), configuration: config, ..Default::default() };
    let mut vms = Vec::new();
    for n in [1usize, 2, 4] {
        while vms.len() < n {
            vms.push(trellis_wasm_host::Vm::start(&host, module.clone(), plugin.clone(), Default::default())?);
        }
        let mem: usize = vms.iter_mut().map(|v| v.memory_bytes()).sum();
        println!("{n} VM(s)              {:>8} KiB  (linear memory {} KiB)", rss_kib(), mem / 1024);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    println!("after 500 ms         {:>8} KiB", rss_kib());
    Ok(())
}
