//! The gateway binary as a child process, and temporary directories.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use aggregator::pb::aggregator::v1::aggregator_client::AggregatorClient;
use tonic::transport::Channel;

/// The gateway binary run as a child process with a config file, its
/// address read from its own "aggregator ready" log line. Killed on drop.
pub struct Process {
    pub addr: SocketAddr,
    child: tokio::process::Child,
    /// Every line it wrote to stderr, as it comes.
    lines: Arc<Mutex<Vec<String>>>,
    line_added: Arc<tokio::sync::Notify>,
    _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("aggregator-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Process {
    /// Writes `toml` to a file and runs `aggregator --config FILE` plus
    /// `args`, listening on a free port unless `toml` says otherwise.
    pub async fn start(toml: &str, args: &[&str]) -> Self {
        let dir = TempDir::new();
        let path = dir.0.join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_aggregator"));
        command
            .arg("--config")
            .arg(&path)
            .args(["--listen", "127.0.0.1:0"])
            .args(args);
        Self::spawn(command, dir).await
    }

    /// Starts the binary with exactly `args` (no config written), waiting
    /// for it to be ready.
    pub async fn start_with_args(args: &[&str]) -> Self {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_aggregator"));
        command.args(args);
        Self::spawn(command, TempDir::new()).await
    }

    /// Writes `toml` to a file; its path, and the directory that holds it.
    pub fn config_file(toml: &str) -> (std::path::PathBuf, TempDir) {
        let dir = TempDir::new();
        let path = dir.0.join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        (path, dir)
    }

    /// Runs the binary with exactly `args` (no config written) to its end.
    pub async fn run(args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_aggregator"))
            .args(args)
            .env("RUST_LOG", "info")
            .output()
            .await
            .unwrap()
    }

    async fn spawn(mut command: tokio::process::Command, dir: TempDir) -> Self {
        use tokio::io::AsyncBufReadExt;
        command
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let line_added = Arc::new(tokio::sync::Notify::new());
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let (sink, added) = (lines.clone(), line_added.clone());
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                sink.lock().unwrap().push(line);
                added.notify_waiters();
            }
        });
        let mut process = Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            child,
            lines,
            line_added,
            _dir: dir,
        };
        let ready = process
            .wait_for_line(Duration::from_secs(60), |l| l.contains("aggregator ready"))
            .await
            .unwrap_or_else(|| panic!("the gateway never got ready:\n{}", process.stderr()));
        // `addr=...` in text, `"addr":"..."` in JSON.
        let addr = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .or_else(|| ready.split("\"addr\":\"").nth(1)?.split('"').next())
            .unwrap_or_else(|| panic!("no addr in {ready:?}"));
        process.addr = addr.parse().unwrap();
        process
    }

    /// Waits until a line of its stderr satisfies `cond`; returns it.
    pub async fn wait_for_line(
        &self,
        within: Duration,
        mut cond: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        self.wait_until(within, |lines| lines.iter().find(|l| cond(l)).cloned())
            .await
    }

    /// Waits until `n` lines of its stderr satisfy `cond`.
    pub async fn wait_for_lines(
        &self,
        within: Duration,
        n: usize,
        mut cond: impl FnMut(&str) -> bool,
    ) -> bool {
        let enough =
            |lines: &[String]| (lines.iter().filter(|l| cond(l)).count() >= n).then_some(());
        self.wait_until(within, enough).await.is_some()
    }

    async fn wait_until<T>(
        &self,
        within: Duration,
        mut found: impl FnMut(&[String]) -> Option<T>,
    ) -> Option<T> {
        let search = async {
            loop {
                // Created before looking: a line added meanwhile still wakes it.
                let added = self.line_added.notified();
                if let Some(found) = found(&self.lines.lock().unwrap()) {
                    return found;
                }
                added.await;
            }
        };
        tokio::time::timeout(within, search).await.ok()
    }

    /// All it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> AggregatorClient<Channel> {
        let channel = Channel::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap();
        AggregatorClient::new(channel)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal named `name` (`TERM`, `HUP`...).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The config file it was started with (by [`Process::start`]).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.0.join("gateway.toml")
    }

    /// Waits for it to exit; returns its exit code.
    pub async fn wait(&mut self, within: Duration) -> Option<i32> {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the gateway did not exit in time")
            .unwrap();
        status.code()
    }
}
