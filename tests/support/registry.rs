//! A throwaway OCI registry for `drivers pull`/`push`: Debian's
//! `docker-registry` (the CNCF distribution registry) as a plain process
//! on a free loopback port, no auth, plain HTTP, its storage in a
//! temporary directory; stopped and removed when dropped.
//!
//! Without `/usr/bin/docker-registry` the tests are skipped, except under
//! CI (the `CI` variable set), where they fail and say how to install it.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Debian's registry binary (package docker-registry).
pub const DOCKER_REGISTRY: &str = "/usr/bin/docker-registry";

/// A running registry.
pub struct Registry {
    port: u16,
    child: Child,
    dir: TempDir,
}

impl Registry {
    /// Start one, or `None` (with the reason on stderr) where the binary
    /// is missing outside CI.
    pub fn start() -> Option<Registry> {
        if !Path::new(DOCKER_REGISTRY).exists() {
            let hint = format!(
                "{DOCKER_REGISTRY} is missing: apt-get install -y docker-registry (.ci/run does)"
            );
            if std::env::var_os("CI").is_some() {
                panic!("{hint}");
            }
            eprintln!("skipped: {hint}");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("image-cache-registry-")
            .tempdir()
            .expect("temp dir");
        // A free port: bound, then released for the registry (a race with
        // another process is possible and would fail the start below).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: image-cache-tests-not-a-secret\n\
                 health:\n  storagedriver:\n    enabled: false\n",
                dir.path().join("data").display()
            ),
        )
        .expect("registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("registry log");
        let child = Command::new(DOCKER_REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {DOCKER_REGISTRY}: {e}"));
        let mut registry = Registry { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = registry.get("/v2/", "application/json") {
                return Some(registry);
            }
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!("docker-registry exited ({status}): {}", registry.log());
            }
            if Instant::now() > deadline {
                panic!("docker-registry did not answer: {}", registry.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the registry logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// A plain HTTP/1.0 GET of `path`: the status and the body.
    pub fn get(&self, path: &str, accept: &str) -> std::io::Result<(u16, Vec<u8>)> {
        use std::io::Write;
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {}\r\nAccept: {accept}\r\n\r\n",
            self.address()
        )?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let end = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no end of headers"))?;
        let head = String::from_utf8_lossy(&response[..end]);
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("no status"))?;
        Ok((status, response[end + 4..].to_vec()))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
