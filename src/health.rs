//! The gateway's `grpc.health.v1` statuses: `""` and
//! `aggregator.v1.Aggregator` for the server, and one service per
//! aggregation, `aggregator.v1.Aggregator/<name>`, NOT_SERVING while the
//! circuit of one of its required sources is open (so `Watch` streams each
//! change), and everything NOT_SERVING once shutdown begins. A reload
//! follows the new config's aggregations: new ones are reported, removed
//! ones are no longer known.

use futures_util::future::select_all;
use tokio::{sync::watch, task::JoinSet};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::gateway::Gateway;

/// The gRPC service name whose health the gateway reports.
pub const SERVICE_NAME: &str = "aggregator.v1.Aggregator";

pub struct Health {
    reporter: HealthReporter,
    aggregations: Vec<String>,
    watchers: JoinSet<()>,
    /// Once shutdown has begun, a reload must not report SERVING again.
    stopping: bool,
}

impl Health {
    /// Reports everything SERVING, then follows the breakers.
    pub async fn start(reporter: HealthReporter, gateway: &Gateway) -> Self {
        reporter
            .set_service_status(SERVICE_NAME, ServingStatus::Serving)
            .await;
        let mut health = Self {
            reporter,
            aggregations: Vec::new(),
            watchers: JoinSet::new(),
            stopping: false,
        };
        health.follow(gateway).await;
        health
    }

    /// Follows `gateway` (a reloaded config) from now on.
    pub async fn follow(&mut self, gateway: &Gateway) {
        if self.stopping {
            return;
        }
        self.watchers.shutdown().await;
        let mut aggregations = Vec::new();
        for (name, breakers) in gateway.required_breakers() {
            let service = format!("{SERVICE_NAME}/{name}");
            report(&self.reporter, &service, &breakers).await;
            if !breakers.is_empty() {
                self.watchers
                    .spawn(follow(self.reporter.clone(), service.clone(), breakers));
            }
            aggregations.push(service);
        }
        for gone in self
            .aggregations
            .iter()
            .filter(|s| !aggregations.contains(s))
        {
            self.reporter.clear_service_status(gone).await;
        }
        self.aggregations = aggregations;
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// Shutdown has begun: stop following breakers, report NOT_SERVING.
    pub async fn shut_down(&mut self) {
        self.stopping = true;
        self.watchers.shutdown().await;
        let all = ["", SERVICE_NAME]
            .into_iter()
            .chain(self.aggregations.iter().map(String::as_str));
        for service in all {
            self.reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    }
}

async fn report(reporter: &HealthReporter, service: &str, breakers: &[watch::Receiver<bool>]) {
    let status = if breakers.iter().any(|open| *open.borrow()) {
        ServingStatus::NotServing
    } else {
        ServingStatus::Serving
    };
    reporter.set_service_status(service, status).await;
}

async fn follow(
    reporter: HealthReporter,
    service: String,
    mut breakers: Vec<watch::Receiver<bool>>,
) {
    loop {
        let changes = breakers.iter_mut().map(|b| Box::pin(b.changed()));
        let (changed, ..) = select_all(changes).await;
        if changed.is_err() {
            return; // The gateway is gone.
        }
        for open in &mut breakers {
            open.mark_unchanged();
        }
        report(&reporter, &service, &breakers).await;
    }
}
