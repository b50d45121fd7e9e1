//! Load generator for the benchmark: drives `Aggregate` through the gateway, or
//! `GetProfile` on the demo upstream directly, closed-loop (N calls in flight)
//! or open-loop (a fixed rate, latency measured from each call's scheduled
//! start so queueing is not hidden). Prints one JSON object, with the count
//! of each gRPC status, so a run that "succeeds" with errors is visible.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use aggregator::pb::{
    aggregator::v1::{AggregateRequest, aggregator_client::AggregatorClient},
    demo::v1::{GetProfileRequest, profiles_client::ProfilesClient},
};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// gRPC endpoint, e.g. http://127.0.0.1:50051
    #[arg(long)]
    target: String,
    #[arg(long, value_enum, default_value = "aggregate")]
    call: Call,
    /// Aggregation name (for --call aggregate).
    #[arg(long, default_value = "user_dashboard")]
    aggregation: String,
    /// Calls in flight (closed loop), or the cap on them (open loop).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Fixed request rate per second (open loop); 0 means closed loop.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// HTTP/2 connections to spread calls over.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    duration: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Distinct user ids to cycle through (1: every call asks for user 42,
    /// which request coalescing would share).
    #[arg(long, default_value_t = 1)]
    users: u64,
    /// Per-call deadline sent as grpc-timeout.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    timeout: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum Call {
    Aggregate,
    Profile,
}

#[derive(Default)]
struct Totals {
    latency: Option<Histogram<u64>>,
    codes: BTreeMap<String, u64>,
    /// The first message seen for each non-OK code, to tell why a run failed.
    samples: BTreeMap<String, String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Arc::new(Args::parse());
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(Channel::from_shared(args.target.clone())?.connect().await?);
    }
    let totals = Arc::new(Mutex::new(Totals::default()));
    // Warm up connections, caches and the upstream's schema lookup.
    run_phase(&args, &channels, args.warmup, None).await;
    let started = Instant::now();
    run_phase(&args, &channels, args.duration, Some(totals.clone())).await;
    let elapsed = started.elapsed().as_secs_f64();
    let totals = totals.lock().unwrap();
    let hist = totals.latency.clone().unwrap_or_else(new_hist);
    let requests: u64 = totals.codes.values().sum();
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    let report = serde_json::json!({
        "requests": requests,
        "ok": totals.codes.get("Ok").copied().unwrap_or(0),
        "codes": totals.codes,
        "samples": totals.samples,
        "rps": requests as f64 / elapsed,
        "p50_us": us(0.50),
        "p90_us": us(0.90),
        "p99_us": us(0.99),
        "max_us": hist.max() as f64 / 1e3,
    });
    println!("{report}");
    Ok(())
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid bounds")
}

async fn run_phase(
    args: &Arc<Args>,
    channels: &[Channel],
    length: Duration,
    totals: Option<Arc<Mutex<Totals>>>,
) {
    let end = Instant::now() + length;
    let mut workers = tokio::task::JoinSet::new();
    if args.rate == 0 {
        for i in 0..args.concurrency {
            let (args, channel, totals) = (
                args.clone(),
                channels[i % channels.len()].clone(),
                totals.clone(),
            );
            workers.spawn(async move {
                let mut local = Local::default();
                while Instant::now() < end {
                    let t0 = Instant::now();
                    let result = one_call(&args, channel.clone()).await;
                    local.record(t0, result);
                }
                local.merge(totals.as_deref());
            });
        }
    } else {
        // Open loop: one ticker schedules calls; each call's latency counts from
        // its scheduled time, so a stalled server shows up as latency.
        let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
        let limit = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
        let mut next = Instant::now();
        let mut i = 0usize;
        while next < end {
            // tokio's timer has millisecond granularity, which would release
            // calls in bursts; async-io's is precise to tens of microseconds.
            async_io::Timer::at(next.into_std()).await;
            let permit = limit.clone().acquire_owned().await.expect("open semaphore");
            let (args, channel, totals) = (
                args.clone(),
                channels[i % channels.len()].clone(),
                totals.clone(),
            );
            let scheduled = next;
            workers.spawn(async move {
                let result = one_call(&args, channel).await;
                let mut local = Local::default();
                local.record(scheduled, result);
                local.merge(totals.as_deref());
                drop(permit);
            });
            next += interval;
            i += 1;
            // Reap finished calls so the set stays small.
            while workers.try_join_next().is_some() {}
        }
    }
    while workers.join_next().await.is_some() {}
}

#[derive(Default)]
struct Local {
    latency: Option<Histogram<u64>>,
    codes: BTreeMap<String, u64>,
    samples: BTreeMap<String, String>,
}

impl Local {
    fn record(&mut self, since: Instant, result: Result<(), tonic::Status>) {
        let ns = since.elapsed().as_nanos() as u64;
        self.latency
            .get_or_insert_with(new_hist)
            .saturating_record(ns.max(1_000));
        let code = match result {
            Ok(()) => tonic::Code::Ok,
            Err(status) => {
                let code = status.code();
                self.samples
                    .entry(format!("{code:?}"))
                    .or_insert_with(|| status.message().to_owned());
                code
            }
        };
        *self.codes.entry(format!("{code:?}")).or_default() += 1;
    }

    fn merge(self, totals: Option<&Mutex<Totals>>) {
        let Some(totals) = totals else { return };
        let mut t = totals.lock().unwrap();
        if let Some(h) = self.latency {
            t.latency
                .get_or_insert_with(new_hist)
                .add(h)
                .expect("same bounds");
        }
        for (code, n) in self.codes {
            *t.codes.entry(code).or_default() += n;
        }
        for (code, message) in self.samples {
            t.samples.entry(code).or_insert(message);
        }
    }
}

async fn one_call(args: &Args, channel: Channel) -> Result<(), tonic::Status> {
    match args.call {
        Call::Aggregate => {
            let mut request = tonic::Request::new(AggregateRequest {
                payload: None,
                aggregation: args.aggregation.clone(),
                params: [("user_id".to_owned(), user_id(args))].into(),
            });
            request.set_timeout(args.timeout);
            AggregatorClient::new(channel)
                .aggregate(request)
                .await
                .map(|_| ())
        }
        Call::Profile => {
            let mut request = tonic::Request::new(GetProfileRequest {
                user_id: user_id(args),
            });
            request.set_timeout(args.timeout);
            ProfilesClient::new(channel)
                .get_profile(request)
                .await
                .map(|_| ())
        }
    }
}

fn user_id(args: &Args) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if args.users <= 1 {
        return "42".to_owned();
    }
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % args.users;
    // From 100 up: clear of the demo's failing users (0 and 7).
    (100 + n).to_string()
}
