//! The built-in demo upstreams on free ports, and a gateway serving a
//! config written for them (the example config by default).

use std::{path::Path, time::Duration};

use aggregator::{config::Config, pb::aggregator::v1::aggregator_client::AggregatorClient};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::Gateway;

/// The demo upstreams and a gateway in front of them.
pub struct Demo {
    pub gateway: Gateway,
    stop: CancellationToken,
    upstreams: tokio::task::JoinHandle<Result<(), tonic_reflection::server::Error>>,
}

impl Demo {
    /// The demo: the example config against the demo upstreams.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A config file of `examples/` (written for the demo upstreams'
    /// example addresses) against the demo upstreams.
    pub async fn example(file: &str) -> Self {
        Self::start_with(Some(file)).await
    }

    async fn start_with(file: Option<&str>) -> Self {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let config = match file {
            None => aggregator::demo::config(grpc_addr, http_addr),
            Some(file) => {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
                let text = std::fs::read_to_string(dir.join(file))
                    .unwrap()
                    .replace("127.0.0.1:50061", &grpc_addr.to_string())
                    .replace("127.0.0.1:8081", &http_addr.to_string());
                Config::parse(&text, file, &dir)
            }
        }
        .unwrap_or_else(|e| panic!("{e}"));
        let stop = CancellationToken::new();
        let upstreams = tokio::spawn(aggregator::demo::serve(
            grpc,
            http,
            Duration::ZERO,
            stop.clone().cancelled_owned(),
        ));
        let gateway = Gateway::start_config(config).await;
        Self {
            gateway,
            stop,
            upstreams,
        }
    }

    pub async fn client(&self) -> AggregatorClient<Channel> {
        self.gateway.client().await
    }

    pub async fn stop(self) {
        self.gateway.stop().await;
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.upstreams)
            .await
            .expect("demo upstreams stop")
            .unwrap()
            .expect("demo upstreams ran");
    }
}
