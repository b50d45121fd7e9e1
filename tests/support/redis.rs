//! A real `redis-server` (Debian package `redis-server`) on a free port of
//! 127.0.0.1, ready when it says so; killed by its PID when dropped.

use std::{process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// Where the gateway under test keeps caches and rate limits.
pub enum Backing {
    Memory,
    Redis(Redis),
}

impl Backing {
    pub async fn memory() -> Self {
        Self::Memory
    }

    pub async fn redis() -> Self {
        Self::Redis(Redis::start().await)
    }

    /// The `[server]` table that selects it.
    pub fn server(&self) -> String {
        match self {
            Self::Memory => String::new(),
            // A generous budget: a loaded test machine is slower than Redis.
            Self::Redis(r) => format!(
                "[server]\nstore = \"{}\"\nstore_timeout = \"2s\"\n",
                r.url()
            ),
        }
    }
}

/// Runs each scenario (an `async fn(Backing)` of the test file) once per
/// store, as `in_memory::NAME` and `in_redis::NAME`.
#[macro_export]
macro_rules! with_each_store {
    ($($name:ident),* $(,)?) => {
        mod in_memory {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backing::memory().await).await
            })*
        }
        mod in_redis {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backing::redis().await).await
            })*
        }
    };
}

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    /// Starts a server with nothing saved to disk.
    pub async fn start() -> Self {
        for _ in 0..10 {
            // A port the kernel just handed out, free again once dropped;
            // another process may take it first, so try again if so.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            if let Some(child) = spawn(port).await {
                return Self {
                    port,
                    child: Some(child),
                };
            }
        }
        panic!("redis-server did not start on any of 10 free ports");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn pid(&self) -> i32 {
        let child = self.child.as_ref().expect("running");
        child.id().expect("not yet reaped") as i32
    }

    /// SIGSTOP: the server holds its connections and answers nothing.
    pub fn pause(&self) {
        signal(self.pid(), libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        signal(self.pid(), libc::SIGCONT);
    }

    /// Kills it and waits until it is gone.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.stop().await;
        for _ in 0..50 {
            if let Some(child) = spawn(self.port).await {
                self.child = Some(child);
                return;
            }
            // The old socket may linger a moment in the kernel.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("redis-server did not start again on port {}", self.port);
    }

    /// Runs one command on a connection of its own: the server's reply.
    pub async fn command(&self, args: &[&str]) -> ::redis::Value {
        let client = ::redis::Client::open(self.url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let mut cmd = ::redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut connection).await.unwrap()
    }

    /// The keys under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let client = ::redis::Client::open(self.url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        ::redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut connection)
            .await
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // A paused server must not outlive the test either.
            if let Some(pid) = child.id() {
                signal(pid as i32, libc::SIGCONT);
            }
            let _ = child.start_kill();
        }
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The server on `port`, once it logs that it accepts connections; `None`
/// if it exits first (the port was taken).
async fn spawn(port: u16) -> Option<Child> {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--loglevel", "notice"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server (Debian package redis-server) must be installed");
    let stdout = child.stdout.take()?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("Ready to accept connections") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    if !ready {
        let _ = child.kill().await;
        return None;
    }
    // Keep reading so that its log never fills the pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Some(child)
}
