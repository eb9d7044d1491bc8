//! End-to-end harness: starts the real binaries (`trellis-control`, `trellis`) and real peers
//! (etcd, via [`trellis_store::testing`]) on loopback, and gives tests handles to them.
//! Scenarios live in `tests/`. Only public interfaces are used: command lines, the HTTP API.
//!
//! The binaries are taken from the workspace target directory; build them first
//! (`cargo build --workspace --bins`, which `scripts/test.sh` does).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod bench;
pub mod echo;
pub mod envoy;
pub mod http;
pub mod mtls_bench;
pub mod proxies;

pub use trellis_store::testing::{EtcdServer, free_port};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap_or_else(|_| PathBuf::from(".."))
}

/// A workspace binary next to the running test executable (`target/<profile>/NAME`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("test executable has no target directory")?;
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!("{} not found: build the binaries first (cargo build --workspace --bins)", path.display());
    }
    Ok(path)
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn await_condition(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits (up to 30 s) until `addr` accepts TCP connections; fails at once if `child` (called
/// `what` in errors) exits first.
pub fn await_listening(child: &mut Child, addr: &str, what: &str) -> anyhow::Result<()> {
    let mut exited = None;
    let ready = await_condition(&format!("{what} to listen on {addr}"), Duration::from_secs(30), || {
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            return true;
        }
        std::net::TcpStream::connect(addr).is_ok()
    });
    if let Some(status) = exited {
        bail!("{what} exited with {status}");
    }
    ready
}

/// A running `trellis-control`.
#[derive(Debug)]
pub struct ControlPlane {
    child: Child,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Whether the API serves TLS (started with `--api-tls on`).
    pub tls: bool,
    /// `127.0.0.1:PORT` of the ADS server.
    pub xds_addr: String,
    /// `127.0.0.1:PORT` of the debug server.
    pub debug_addr: String,
}

impl ControlPlane {
    /// Starts `trellis-control` with `--data-dir data_dir` on a free loopback port plus
    /// `extra` arguments, and waits until its API answers.
    pub fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let addr = format!("127.0.0.1:{}", free_port());
        let xds_addr = format!("127.0.0.1:{}", free_port());
        let debug_addr = format!("127.0.0.1:{}", free_port());
        Self::start_on(data_dir, &addr, &xds_addr, &debug_addr, extra)
    }

    /// Starts again where `previous` ran (same data directory and addresses), e.g. after
    /// [`ControlPlane::kill_9`].
    pub fn restart(data_dir: &Path, addr: &str, xds_addr: &str, debug_addr: &str) -> anyhow::Result<Self> {
        Self::start_on(data_dir, addr, xds_addr, debug_addr, &[])
    }

    /// As [`ControlPlane::restart`], with `extra` arguments.
    pub fn restart_with(
        data_dir: &Path,
        addr: &str,
        xds_addr: &str,
        debug_addr: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_on(data_dir, addr, xds_addr, debug_addr, extra)
    }

    fn start_on(data_dir: &Path, addr: &str, xds_addr: &str, debug_addr: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let (addr, xds_addr, debug_addr) = (addr.to_string(), xds_addr.to_string(), debug_addr.to_string());
        std::fs::create_dir_all(data_dir)?;
        let port = addr.rsplit(':').next().unwrap_or("0").to_string();
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let log = data_dir.join(format!("control-{port}-{started}.log"));
        let child = Command::new(binary("trellis-control")?)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--api-addr")
            .arg(&addr)
            .args(["--xds-addr", &xds_addr, "--debug-addr", &debug_addr])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting trellis-control")?;
        let tls = extra.windows(2).any(|w| w == ["--api-tls", "on"]);
        let mut cp = ControlPlane { child, addr, data_dir: data_dir.to_path_buf(), log, tls, xds_addr, debug_addr };
        let target = cp.addr.clone();
        await_listening(&mut cp.child, &target, "trellis-control").with_context(|| cp.log_text())?;
        Ok(cp)
    }

    /// A WorkloadToken for `service_account` in `namespace`, made with the CLI: its secret.
    pub fn workload_token(&self, name: &str, namespace: &str, service_account: &str) -> anyhow::Result<String> {
        let out =
            self.cli(&["workload-token", "create", name, "-n", namespace, "--service-account", service_account])?;
        if !out.status.success() {
            bail!("workload-token create: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// As [`ControlPlane::workload_token`], the secret written to `dir/NAME.token`: its path.
    pub fn workload_token_file(
        &self,
        dir: &Path,
        name: &str,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<String> {
        let file = dir.join(format!("{name}.token"));
        std::fs::write(&file, self.workload_token(name, namespace, service_account)?)?;
        Ok(file.display().to_string())
    }

    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// The CA clients must trust when the API serves TLS.
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("api-ca.pem")
    }

    pub fn token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.data_dir.join("admin.token"))?.trim().to_string())
    }

    pub fn client(&self) -> anyhow::Result<trellis_client::Client> {
        if self.tls {
            return Ok(trellis_client::Client::with_ca(
                &self.url(),
                Some(self.token()?),
                &std::fs::read(self.ca_file())?,
            )?);
        }
        Ok(trellis_client::Client::new(&self.url(), Some(self.token()?)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the `trellis` CLI against this control plane.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        let ca = self.tls.then(|| self.ca_file());
        cli_with(&self.url(), &self.token()?, ca.as_deref(), args, None)
    }

    /// The process id, e.g. to read its memory use from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process in KiB (VmRSS), on Linux.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
    }

    /// SIGKILL: no shutdown code runs, like a crash.
    pub fn kill_9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `trellis` CLI (with `stdin` fed if given) from the repository root.
pub fn cli(server: &str, token: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
    cli_with(server, token, None, args, stdin)
}

/// Like [`cli`], trusting `ca` for an https:// server.
pub fn cli_with(
    server: &str,
    token: &str,
    ca: Option<&Path>,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<Output> {
    use std::io::Write;
    let mut cmd = Command::new(binary("trellis")?);
    match ca {
        Some(ca) => cmd.env("TRELLIS_CA_FILE", ca),
        None => cmd.env_remove("TRELLIS_CA_FILE"),
    };
    let mut child = cmd
        .args(args)
        .env("TRELLIS_SERVER", server)
        .env("TRELLIS_TOKEN", token)
        .env_remove("TRELLIS_TOKEN_FILE")
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    Ok(child.wait_with_output()?)
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}
