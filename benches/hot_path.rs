//! Micro-benchmarks of the per-call work the gateway does besides waiting:
//! rendering requests from compiled templates, protobuf JSON in both
//! directions, merging source results into the Aggregate response, and
//! recording a call's metrics.
//! `cargo bench --bench hot_path`.

use std::{hint::black_box, sync::Arc, time::Duration};

use aggregator::{
    api,
    fanout::Outcome,
    gateway::Shape,
    pb::DEMO_DESCRIPTOR,
    telemetry::metrics::{Metrics, Rpc},
    template::{JsonTemplate, Params, UrlTemplate},
    upstream::grpc::json_options,
};
use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::json;

fn params() -> Params {
    [("user_id", "42"), ("region", "eu-west/1")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn templates(c: &mut Criterion) {
    let params = params();
    let json = JsonTemplate::compile(&json!({
        "user_id": "{user_id}",
        "filter": { "region": "{region}", "limit": 20, "tags": ["vip", "{user_id}"] }
    }))
    .unwrap();
    let url =
        UrlTemplate::parse("http://orders:8081/users/{user_id}/orders?region={region}&limit=20")
            .unwrap();
    c.bench_function("render/json_template", |b| {
        b.iter(|| json.render(black_box(&params)).unwrap())
    });
    c.bench_function("render/url_template", |b| {
        b.iter(|| url.render(black_box(&params)).unwrap())
    });
}

fn protobuf_json(c: &mut Criterion) {
    let pool = DescriptorPool::decode(DEMO_DESCRIPTOR).unwrap();
    let input = pool
        .get_message_by_name("demo.v1.GetProfileRequest")
        .unwrap();
    let output = pool.get_message_by_name("demo.v1.Profile").unwrap();
    let request = json!({ "user_id": "42" });
    let response = aggregator::pb::demo::v1::Profile {
        user_id: "42".into(),
        name: "Grace #42".into(),
        email: "grace@example.com".into(),
    }
    .encode_to_vec();
    let options = json_options();

    c.bench_function("protobuf/json_to_request_bytes", |b| {
        b.iter(|| {
            let message =
                DynamicMessage::deserialize(input.clone(), black_box(request.clone())).unwrap();
            message.encode_to_vec()
        })
    });
    c.bench_function("protobuf/response_bytes_to_json", |b| {
        b.iter(|| {
            let message =
                DynamicMessage::decode(output.clone(), black_box(response.as_slice())).unwrap();
            message
                .serialize_with_options(serde_json::value::Serializer, &options)
                .unwrap()
        })
    });
}

fn merge(c: &mut Criterion) {
    let profile = json!({ "user_id": "42", "name": "Grace #42", "email": "grace@example.com" });
    let orders = json!({
        "user_id": "42",
        "orders": [{ "id": "o-1", "total_cents": 1250 }, { "id": "o-2", "total_cents": 2500 }],
        "count": 2
    });
    let outcome = |name: &str, data: &serde_json::Value| Outcome {
        source: Arc::from(name),
        optional: false,
        result: Ok(data.clone()),
        elapsed: Duration::from_micros(5_100),
        attempts: 1,
        coalesced: false,
        skipped: false,
        fallback: None,
        cached: None,
    };
    c.bench_function("merge/aggregate_response_2_sources", |b| {
        b.iter(|| {
            let mut outcomes = vec![outcome("profile", &profile), outcome("orders", &orders)];
            let names = [Arc::from("profile"), Arc::from("orders")];
            let shape = Shape {
                landing: names.iter().collect(),
                transform: None,
                max_bytes: 4 << 20,
            };
            api::merge(black_box(&mut outcomes), &shape)
                .unwrap()
                .encode_to_vec()
        })
    });
}

/// Everything a 2-source `Aggregate` records: the call's in-flight gauge,
/// duration and code, and each source request's duration and code.
fn metrics(c: &mut Criterion) {
    let metrics = Metrics::default();
    let call = metrics.calls(Rpc::Aggregate, &Arc::from("user_dashboard"));
    let sources = [
        metrics.source(&Arc::from("profile")),
        metrics.source(&Arc::from("orders")),
    ];
    c.bench_function("metrics/record_2_source_call", |b| {
        b.iter(|| {
            let mut in_flight = call.start();
            for source in &sources {
                let started = tokio::time::Instant::now();
                source.request(tonic::Code::Ok, started.elapsed().as_secs_f64());
            }
            in_flight.answered(black_box(tonic::Code::Ok), true);
        })
    });
}

criterion_group!(benches, templates, protobuf_json, merge, metrics);
criterion_main!(benches);
