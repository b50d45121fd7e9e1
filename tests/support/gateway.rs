//! A gateway served in-process by `server::run_with`, as the binary does.

use std::{net::SocketAddr, path::Path};

use aggregator::{config::Config, pb::aggregator::v1::aggregator_client::AggregatorClient};
use futures_util::FutureExt;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A gateway served by `server::run` on its own port; stops when dropped.
pub struct Gateway {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    reloads: tokio::sync::mpsc::Sender<aggregator::server::Reload>,
}

impl Gateway {
    /// Parses `toml` (relative paths resolve from the crate root) and serves it.
    pub async fn start(toml: &str) -> Self {
        let config = Config::parse(toml, "test config", Path::new(env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("{e}"));
        Self::start_config(config).await
    }

    pub async fn start_config(config: Config) -> Self {
        Self::serve(config, None).await
    }

    /// Also serves Prometheus metrics; returns their address.
    pub async fn start_with_metrics(toml: &str) -> (Self, SocketAddr) {
        let config = Config::parse(toml, "test config", Path::new(env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("{e}"));
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = metrics.local_addr().unwrap();
        (Self::serve(config, Some(metrics)).await, addr)
    }

    async fn serve(config: Config, metrics: Option<TcpListener>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (reloads, received) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(
            aggregator::server::run_with(
                listener,
                metrics,
                config,
                stop.clone().cancelled_owned(),
                Some(received),
            )
            .map(|r| r.expect("server failed")),
        );
        Self {
            addr,
            stop,
            task: Some(task),
            reloads,
        }
    }

    /// Puts `toml` in force as SIGHUP would (or fails to, if it is not a
    /// valid config); returns once the server has applied or refused it.
    pub async fn reload(&self, toml: &str) -> Result<(), String> {
        let config = Config::parse(toml, "test config", Path::new(env!("CARGO_MANIFEST_DIR")));
        let (done, outcome) = tokio::sync::oneshot::channel();
        let reload = aggregator::server::Reload {
            config,
            done: Some(done),
        };
        self.reloads.send(reload).await.expect("the server stopped");
        outcome.await.expect("the server dropped the reload")
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> AggregatorClient<Channel> {
        AggregatorClient::new(self.channel().await)
    }

    /// A client that sends `grpc-timeout` but does not enforce it itself:
    /// tonic's `Channel` answers CANCELLED locally when the deadline passes,
    /// which would hide what the gateway answers.
    pub fn lenient_client(&self) -> AggregatorClient<Client<HttpConnector, tonic::body::Body>> {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        AggregatorClient::with_origin(client, self.endpoint().parse().unwrap())
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        self.stop.cancel();
        self.task.take().unwrap().await.unwrap();
    }

    pub fn signal_stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
