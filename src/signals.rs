//! What the process does on signals and config changes: SIGTERM or SIGINT
//! starts a graceful shutdown and a second one exits at once; SIGHUP, and
//! with `--watch` any change to the config file, loads the file again and
//! hands it to the server as a reload.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, ConfigError},
    server::{Reload, Reloads},
};

/// How often `--watch` reads the file. Reading it whole (rather than its
/// mtime) also sees a Kubernetes ConfigMap update, a swap of symlinks.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Loads the config at `path`, with `--listen` applied over it so that it
/// does not read as a changed listener on every reload.
pub fn load(path: &Path, listen: Option<SocketAddr>) -> Result<Config, ConfigError> {
    let mut config = Config::load(path)?;
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    Ok(config)
}

/// Cancels `stop` on the first SIGTERM or SIGINT; exits the process on the
/// second, for an operator who does not want to wait for the drain.
pub fn on_shutdown(stop: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let code = tokio::select! {
                _ = term.recv() => 128 + libc::SIGTERM,
                _ = int.recv() => 128 + libc::SIGINT,
            };
            if !first {
                tracing::warn!("second signal: exiting without draining");
                std::process::exit(code);
            }
            first = false;
            stop.cancel();
        }
    });
    Ok(())
}

/// Reloads of the config at `path` on SIGHUP and, with `watch`, when its
/// contents change. Each waits for the one before it to be put in force.
/// Without a file (the demo), SIGHUP is only acknowledged: its default
/// action would kill the process.
pub fn reloads(
    path: Option<PathBuf>,
    listen: Option<SocketAddr>,
    watch: bool,
) -> std::io::Result<Reloads> {
    let (tx, rx) = mpsc::channel(1);
    let mut hangup = signal(SignalKind::hangup())?;
    let mut seen = path.as_deref().map(read);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(WATCH_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let trigger = tokio::select! {
                _ = hangup.recv() => "SIGHUP",
                _ = ticks.tick(), if watch => "file changed",
            };
            let Some(path) = path.clone() else {
                tracing::warn!("SIGHUP: the demo has no config file to reload");
                continue;
            };
            if trigger == "file changed" {
                let now = read(&path);
                if seen.as_ref() == Some(&now) {
                    continue;
                }
                seen = Some(now);
            }
            tracing::info!(config = %path.display(), trigger, "reloading the config");
            let config = tokio::task::spawn_blocking(move || load(&path, listen)).await;
            let Ok(config) = config else { continue };
            let (done, applied) = oneshot::channel();
            if tx
                .send(Reload {
                    config,
                    done: Some(done),
                })
                .await
                .is_err()
            {
                return;
            }
            let _ = applied.await;
        }
    });
    Ok(rx)
}

/// The file's contents, or why it cannot be read (compared, not shown).
fn read(path: &Path) -> Result<Vec<u8>, std::io::ErrorKind> {
    std::fs::read(path).map_err(|e| e.kind())
}
