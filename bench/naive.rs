//! The naive peer of the benchmark: the 2-source `Aggregate` written the
//! obvious way on tonic and hyper, as a team would by hand. One tonic
//! channel to the gRPC upstream and a keep-alive hyper pool to the HTTP one,
//! both requests joined with `tokio::try_join!`, JSON turned into a
//! `prost_types::Struct` with serde_json. No config, coalescing, limits or
//! resilience: what the gateway's own work is measured against.

use std::{collections::BTreeMap, net::SocketAddr};

use aggregator::pb::{
    aggregator::v1::{
        AggregateRequest, AggregateResponse, FetchAllRequest, FetchAllResponse,
        aggregator_server::{Aggregator, AggregatorServer},
    },
    demo::v1::{GetProfileRequest, profiles_client::ProfilesClient},
};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use prost_types::{ListValue, Struct, Value, value::Kind};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, transport::Channel};

#[derive(Parser)]
struct Args {
    /// The demo.v1.Profiles upstream.
    #[arg(long)]
    grpc: SocketAddr,
    /// The HTTP upstream serving /users/{user_id}/orders.
    #[arg(long)]
    http: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

struct Naive {
    profiles: ProfilesClient<Channel>,
    http: Client<HttpConnector, Empty<Bytes>>,
    orders: String,
}

#[tonic::async_trait]
impl Aggregator for Naive {
    async fn aggregate(
        &self,
        request: Request<AggregateRequest>,
    ) -> Result<Response<AggregateResponse>, Status> {
        let request = request.into_inner();
        let user_id = request.params.get("user_id").cloned().unwrap_or_default();
        let profile = async {
            let request = GetProfileRequest {
                user_id: user_id.clone(),
            };
            let profile = self.profiles.clone().get_profile(request).await?;
            Ok::<_, Status>(profile.into_inner())
        };
        let orders = async {
            let uri = format!("{}/users/{user_id}/orders", self.orders);
            let uri = uri
                .parse()
                .map_err(|_| Status::invalid_argument("user_id"))?;
            let response = self.http.get(uri).await.map_err(unavailable)?;
            if !response.status().is_success() {
                return Err(Status::unavailable(format!(
                    "orders: {}",
                    response.status()
                )));
            }
            let body = response.into_body().collect().await.map_err(unavailable)?;
            serde_json::from_slice::<serde_json::Value>(&body.to_bytes())
                .map_err(|e| Status::internal(format!("orders: {e}")))
        };
        let (profile, orders) = tokio::try_join!(profile, orders)?;
        let profile = serde_json::json!({
            "user_id": profile.user_id,
            "name": profile.name,
            "email": profile.email,
        });
        let fields = BTreeMap::from([
            ("profile".to_owned(), to_value(profile)),
            ("orders".to_owned(), to_value(orders)),
        ]);
        Ok(Response::new(AggregateResponse {
            data: Some(Struct { fields }),
            complete: true,
            sources: Vec::new(),
        }))
    }

    async fn fetch_all(
        &self,
        _: Request<FetchAllRequest>,
    ) -> Result<Response<FetchAllResponse>, Status> {
        Err(Status::unimplemented(
            "the naive peer serves Aggregate only",
        ))
    }
}

fn unavailable(error: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("orders: {error}"))
}

fn to_value(json: serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match json {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        J::Object(fields) => Kind::StructValue(Struct {
            fields: fields.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let channel = Channel::from_shared(format!("http://{}", args.grpc))?
        .connect()
        .await?;
    // TCP_NODELAY, as tonic's `serve(addr)` and reqwest set by default:
    // without it, Nagle and delayed ACKs stall small writes by ~40 ms.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let naive = Naive {
        profiles: ProfilesClient::new(channel),
        http: Client::builder(TokioExecutor::new()).build(connector),
        orders: format!("http://{}", args.http),
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    // The same shape as the gateway's JSON ready line, for bench.py.
    eprintln!(
        r#"{{"message":"naive ready","addr":"{}"}}"#,
        listener.local_addr()?
    );
    let mut terminate = signal(SignalKind::terminate())?;
    let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |socket| {
        socket.and_then(|s| s.set_nodelay(true).map(|()| s))
    });
    tonic::transport::Server::builder()
        .add_service(AggregatorServer::new(naive))
        .serve_with_incoming_shutdown(incoming, async move {
            terminate.recv().await;
        })
        .await?;
    Ok(())
}
