//! Thin entry point: arguments, config, tracing, bind, `server::run_with`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use aggregator::{check, demo, server, signals, telemetry};
use clap::{CommandFactory, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A gRPC aggregation gateway. With no --config, serves a built-in demo.
#[derive(Parser)]
#[command(version, after_help = AFTER_HELP)]
struct Cli {
    /// Config file (TOML). Without it, demo upstreams start on loopback.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to serve gRPC on, overriding `[server] listen`
    /// (default 127.0.0.1:50051); port 0 picks a free one.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Reload the config whenever the file changes (as on SIGHUP).
    #[arg(long, requires = "config")]
    watch: bool,
    /// Log output: human-readable text or one JSON object per line.
    #[arg(long, value_enum, default_value_t, global = true)]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

const AFTER_HELP: &str = "\
Serving:
  gRPC on [server] listen (default 127.0.0.1:50051), or --listen.
  Prometheus metrics at http://ADDR/metrics when [server] metrics_listen is set.
  Health (grpc.health.v1) and reflection on the gRPC port.

Signals:
  SIGTERM, SIGINT  health turns NOT_SERVING, serving goes on for
                   [server] shutdown_delay, then in-flight calls drain
                   (up to [server] drain_timeout); a second signal exits at once
  SIGHUP           reload the config; a config that fails keeps the old one

Logs go to stderr; RUST_LOG filters them (default: info), e.g.
  RUST_LOG=aggregator=debug,h2=warn

Every config key is documented in README.md (\"Configuration\"), with an
annotated example in examples/gateway.toml. Check a config with
  aggregator check --config FILE [--probe] [--strict]";

#[derive(Subcommand)]
enum Command {
    /// Validate a config as startup does, without binding, and warn about
    /// what it probably does not mean. Exit 0 if fine, 1 on errors.
    Check {
        /// Config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Also connect to every upstream, resolve gRPC schemas and run health checks.
        #[arg(long)]
        probe: bool,
        /// Exit 1 on warnings too.
        #[arg(long)]
        strict: bool,
        /// Bound on each probe of each source.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        probe_timeout: Duration,
    },
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
    if let Some(command) = &cli.command
        && (cli.config.is_some() || cli.listen.is_some() || cli.watch)
    {
        // Silently ignoring them would leave the user debugging the wrong thing.
        let name = match command {
            Command::Check { .. } => "check",
            Command::DemoUpstreams { .. } => "demo-upstreams",
        };
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "--config, --listen and --watch are for the gateway, not for `{name}`; \
                     give it its own options (see `aggregator {name} --help`)"
                ),
            )
            .exit();
    }
    telemetry::init(cli.log_format);
    if let Some(Command::Check {
        config,
        probe,
        strict,
        probe_timeout,
    }) = &cli.command
    {
        let options = check::Options {
            probe: *probe,
            strict: *strict,
            timeout: *probe_timeout,
        };
        return match check::run(config, options, &mut std::io::stdout()).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) | Err(_) => ExitCode::FAILURE,
        };
    }
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
    signals::on_shutdown(stop.clone())?;
    if let Some(Command::DemoUpstreams { grpc, http, delay }) = cli.command {
        let (grpc, http) = (
            TcpListener::bind(grpc).await?,
            TcpListener::bind(http).await?,
        );
        tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, ?delay, "demo upstreams ready");
        demo::serve(grpc, http, delay, stop.cancelled_owned()).await?;
        return Ok(());
    }
    // Before the first load, so that a change made while it runs is seen.
    let reloads = signals::reloads(cli.config.clone(), cli.listen, cli.watch)?;
    let config = match &cli.config {
        Some(path) => {
            let config = signals::load(path, cli.listen)?;
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
            let mut config = config;
            if let Some(listen) = cli.listen {
                config.server.listen = listen;
            }
            config
        }
    };
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
    server::run_with(
        listener,
        metrics,
        config,
        stop.cancelled_owned(),
        Some(reloads),
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
}
