//! Thin entry point: arguments, config, tracing, bind, `server::run`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use aggregator::{config::Config, demo, server, telemetry};
use clap::{CommandFactory, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A gRPC aggregation gateway. With no --config, serves a built-in demo.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Config file (TOML). Without it, demo upstreams start on loopback.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to serve gRPC on, overriding `[server] listen`
    /// (default 127.0.0.1:50051); port 0 picks a free one.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Log output: human-readable text or one JSON object per line.
    #[arg(long, value_enum, default_value_t, global = true)]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run only the demo upstreams (for benchmarks and for trying configs).
    DemoUpstreams {
        /// Address of the gRPC demo.v1.Profiles upstream.
        #[arg(long)]
        grpc: SocketAddr,
        /// Address of the HTTP /users/{user_id}/orders upstream.
        #[arg(long)]
        http: SocketAddr,
        /// Delay before each answer, e.g. 5ms.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0ms")]
        delay: Duration,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.is_some() && (cli.config.is_some() || cli.listen.is_some()) {
        // Silently ignoring them would leave the user debugging the wrong thing.
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--config and --listen are for the gateway; demo-upstreams takes --grpc, --http and --delay",
            )
            .exit();
    }
    telemetry::init(cli.log_format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let stop = CancellationToken::new();
    tokio::spawn(signal(stop.clone()));
    if let Some(Command::DemoUpstreams { grpc, http, delay }) = cli.command {
        let (grpc, http) = (
            TcpListener::bind(grpc).await?,
            TcpListener::bind(http).await?,
        );
        tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, ?delay, "demo upstreams ready");
        demo::serve(grpc, http, delay, stop.cancelled_owned()).await?;
        return Ok(());
    }
    let mut config = match &cli.config {
        Some(path) => {
            let config = Config::load(path)?;
            let (sources, aggregations) = (config.sources.len(), config.aggregations.len());
            tracing::info!(config = %path.display(), sources, aggregations, "config loaded");
            if aggregations == 0 {
                tracing::warn!(config = %path.display(), "the config has no aggregations: every call will be NOT_FOUND");
            }
            config
        }
        None => {
            let grpc = TcpListener::bind("127.0.0.1:0").await?;
            let http = TcpListener::bind("127.0.0.1:0").await?;
            let config = demo::config(grpc.local_addr()?, http.local_addr()?)?;
            tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, "built-in demo upstreams started");
            tokio::spawn(demo::serve(
                grpc,
                http,
                Duration::ZERO,
                stop.clone().cancelled_owned(),
            ));
            config
        }
    };
    if let Some(listen) = cli.listen {
        config.server.listen = listen;
    }
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let metrics = match config.server.metrics_listen {
        Some(addr) => {
            let metrics = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
            tracing::info!(addr = %metrics.local_addr()?, "metrics at /metrics");
            Some(metrics)
        }
        None => None,
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "aggregator ready");
    if cli.config.is_none() {
        tracing::info!(
            "try: grpcurl -plaintext -d '{{\"aggregation\":\"user_dashboard\",\"params\":{{\"user_id\":\"42\"}}}}' {addr} aggregator.v1.Aggregator/Aggregate"
        );
    }
    server::run_with_metrics(listener, metrics, config, stop.cancelled_owned()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes `stop` on SIGTERM or SIGINT.
async fn signal(stop: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    stop.cancel();
}
