//! `connections = N` on a gRPC source: its calls spread over N HTTP/2
//! connections, so that a burst of thousands reaches a default-configured
//! tonic upstream (which limits what one connection may carry) and every
//! call succeeds.

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering::SeqCst},
    },
    time::Duration,
};

use aggregator::pb::demo::v1::{
    GetProfileRequest, Profile,
    profiles_server::{Profiles, ProfilesServer},
};
use support::*;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// A Profiles service that holds each call until `release` calls are in
/// flight at once (a minute at most, so a broken test ends), so the burst
/// is really concurrent;
/// it records the peer port of each call, which tells the connections.
#[derive(Clone)]
struct Held {
    in_flight: Arc<AtomicU32>,
    release: u32,
    released: Arc<tokio::sync::Notify>,
    peers: Arc<Mutex<std::collections::HashSet<u16>>>,
    /// The most calls it held at once.
    peak: Arc<AtomicU32>,
}

#[tonic::async_trait]
impl Profiles for Held {
    async fn get_profile(
        &self,
        request: tonic::Request<GetProfileRequest>,
    ) -> Result<tonic::Response<Profile>, tonic::Status> {
        if let Some(peer) = request.remote_addr() {
            self.peers.lock().unwrap().insert(peer.port());
        }
        // Registered before counting, so the release cannot slip between.
        let released = self.released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(now, SeqCst);
        if now >= self.release {
            self.released.notify_waiters();
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(60), released).await;
        }
        self.in_flight.fetch_sub(1, SeqCst);
        let user_id = request.into_inner().user_id;
        Ok(tonic::Response::new(Profile {
            name: format!("user {user_id}"),
            email: String::new(),
            user_id,
        }))
    }
}

/// A tonic server as its builder makes it by default, but for the streams
/// it lets one connection carry, if given.
async fn tonic_upstream(service: Held, streams: Option<u32>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .max_concurrent_streams(streams)
            .add_service(ProfilesServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// What a burst of `calls` came to: the calls that failed, the connections
/// they arrived on, and the most the upstream held at once.
async fn burst(
    connections: Option<usize>,
    calls: u32,
    streams: Option<u32>,
    release: u32,
) -> (usize, usize, u32) {
    let held = Held {
        in_flight: Arc::default(),
        release,
        released: Arc::default(),
        peers: Arc::default(),
        peak: Arc::default(),
    };
    let addr = tonic_upstream(held.clone(), streams).await;
    let connections = connections.map_or(String::new(), |n| format!("connections = {n}\n"));
    let gateway = Gateway::start(&format!(
        "[server]\nmax_concurrent_streams = 10000\n\
         [sources.profile]\nkind = \"grpc\"\nendpoint = \"http://{addr}\"\n\
         method = \"demo.v1.Profiles/GetProfile\"\nrequest = {{ user_id = \"{{user_id}}\" }}\n\
         protos = [\"proto/demo/v1/demo.proto\"]\nimport_paths = [\"proto\"]\ncoalesce = false\n{connections}\
         [aggregations.a]\nsources = [\"profile\"]\ntimeout = \"60s\"\n"
    ))
    .await;
    // Several client connections, as many callers would have.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(gateway.client().await);
    }
    let calls = (0..calls).map(|i| {
        let mut client = clients[i as usize % clients.len()].clone();
        async move {
            let user = i.to_string();
            client
                .aggregate(aggregate_request("a", &[("user_id", &user)]))
                .await
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(first) = failed.first() {
        eprintln!("{} failed; the first: {first:?}", failed.len());
    }
    let peers = held.peers.lock().unwrap().len();
    (failed.len(), peers, held.peak.load(SeqCst))
}

#[tokio::test]
async fn five_thousand_concurrent_calls_to_a_default_tonic_upstream_all_succeed() {
    let (failed, connections, _) = burst(None, 5_000, None, 5_000).await;
    assert_eq!(failed, 0, "every call succeeds");
    assert_eq!(
        connections, 2,
        "the default spreads them over two connections"
    );
}

#[tokio::test]
async fn connections_multiply_what_an_upstream_lets_one_connection_carry() {
    // 50 streams per connection: one connection holds 50 calls at once,
    // the rest wait their turn in the gateway; four hold all 200. The
    // upstream lets calls go only once that many are in flight.
    let (failed, connections, peak) = burst(Some(4), 200, Some(50), 200).await;
    assert_eq!((failed, connections, peak), (0, 4, 200));
    let (failed, connections, peak) = burst(Some(1), 100, Some(50), 50).await;
    assert_eq!((failed, connections, peak), (0, 1, 50));
}

#[tokio::test]
async fn connections_out_of_range_is_a_startup_error() {
    for n in ["0", "65"] {
        let text = format!(
            "[sources.s]\nkind = \"grpc\"\nendpoint = \"http://127.0.0.1:1\"\nmethod = \"a.B/C\"\nconnections = {n}\n"
        );
        let error = startup_error(&text);
        assert!(error.contains("sources.s.connections"), "{error}");
    }
    let http = "[sources.s]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\nconnections = 2\n";
    let error = startup_error(http);
    assert!(error.contains("not a key of http sources"), "{error}");
}
