//! Hostile clients get deliberate answers and cost bounded memory and time:
//! connections that never handshake or sit idle are closed, request bodies
//! that trickle in are cut at the deadline, answers that are never taken
//! are reset, oversized or non-gRPC requests are refused, floods of resets
//! are cut off while ordinary cancellations are not, and names a caller
//! sends come back bounded.

mod support;

use std::time::{Duration, Instant};

use aggregator::pb::aggregator::v1::AggregateRequest;
use bytes::Bytes;
use support::{raw, *};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic_types::StatusExt;

const AGGREGATE: &str = "/aggregator.v1.Aggregator/Aggregate";

/// Long enough for any loaded machine to do what a test asks within it.
const GENEROUS: Duration = Duration::from_secs(20);

fn request(aggregation: &str, user: &str) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(&[("user_id", user)]),
    }
}

async fn gateway(server: &str, upstream: &Running) -> Gateway {
    Gateway::start(&format!(
        "[server]\n{server}\n{}{}",
        http_source("p", upstream, "/u/{user_id}"),
        aggregation("p", &["p"], "")
    ))
    .await
}

/// Reads until the server closes; true if it did within `within`.
async fn server_closes(stream: &mut TcpStream, within: Duration) -> bool {
    let mut sink = [0u8; 4096];
    let read_to_end = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_to_end).await.is_ok()
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

#[tokio::test]
async fn a_connection_that_never_handshakes_is_closed() {
    let upstream = Upstream::http().start().await;
    let gw = gateway("handshake_timeout = \"300ms\"", &upstream).await;
    let opened = Instant::now();
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    // Half a preface is not a handshake either, nor a preface and a
    // SETTINGS frame header whose payload never comes.
    let mut partial = TcpStream::connect(gw.addr).await.unwrap();
    partial.write_all(&PREFACE[..10]).await.unwrap();
    let mut headless = TcpStream::connect(gw.addr).await.unwrap();
    headless.write_all(PREFACE).await.unwrap();
    headless
        .write_all(&[0, 0, 6, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    assert!(server_closes(&mut silent, GENEROUS).await, "never closed");
    assert!(server_closes(&mut partial, GENEROUS).await, "never closed");
    assert!(server_closes(&mut headless, GENEROUS).await, "never closed");
    assert!(
        opened.elapsed() >= Duration::from_millis(300),
        "closed before its time"
    );
    // A client that does handshake is served.
    let mut client = gw.client().await;
    client.aggregate(request("p", "1")).await.unwrap();
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let upstream = Upstream::http()
        .delay(Duration::from_millis(900))
        .start()
        .await;
    let gw = gateway("idle_timeout = \"300ms\"", &upstream).await;
    let mut idle = raw::connect(gw.addr).await;
    let mut busy = raw::connect(gw.addr).await;
    let head = raw::grpc_head(gw.addr, AGGREGATE, None);
    // A call three times longer than the idle timeout keeps its connection.
    let answer = raw::call(&mut busy, head, raw::frame(&request("p", "1"))).await;
    assert_eq!(answer.grpc, Some(Code::Ok), "{answer:?}");
    assert!(
        raw::closed_within(&mut idle, GENEROUS).await,
        "the idle connection stayed open"
    );
    assert!(
        raw::closed_within(&mut busy, GENEROUS).await,
        "idle after its call, it stayed open"
    );
}

#[tokio::test]
async fn an_idle_client_that_ignores_goaway_is_closed_all_the_same() {
    let upstream = Upstream::http().start().await;
    let gw = gateway(
        "idle_timeout = \"300ms\"\nkeepalive_interval = \"1h\"",
        &upstream,
    )
    .await;
    // A whole handshake, then nothing read or answered: not the GOAWAY, not
    // its ping.
    let mut deaf = TcpStream::connect(gw.addr).await.unwrap();
    deaf.write_all(PREFACE).await.unwrap();
    deaf.write_all(SETTINGS).await.unwrap();
    let opened = Instant::now();
    let mut sink = [0u8; 4096];
    let closed = async {
        loop {
            match deaf.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    assert!(
        tokio::time::timeout(GENEROUS, closed).await.is_ok(),
        "left open for the keepalive (1 h)"
    );
    assert!(opened.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed() {
    let upstream = Upstream::http().start().await;
    let gw = gateway(
        "keepalive_interval = \"200ms\"\nkeepalive_timeout = \"200ms\"\nidle_timeout = \"1h\"",
        &upstream,
    )
    .await;
    // A complete handshake, then silence: the pings go unanswered.
    let mut mute = TcpStream::connect(gw.addr).await.unwrap();
    mute.write_all(PREFACE).await.unwrap();
    mute.write_all(SETTINGS).await.unwrap();
    assert!(server_closes(&mut mute, GENEROUS).await, "never closed");
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_at_once() {
    let upstream = Upstream::http().start().await;
    let gw = gateway("max_connections = 2", &upstream).await;
    let mut first = raw::connect(gw.addr).await;
    let mut second = raw::connect(gw.addr).await;
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    third.write_all(PREFACE).await.unwrap();
    assert!(
        server_closes(&mut third, GENEROUS).await,
        "a third connection was kept"
    );
    for conn in [&mut first, &mut second] {
        let head = raw::grpc_head(gw.addr, AGGREGATE, None);
        let answer = raw::call(conn, head, raw::frame(&request("p", "1"))).await;
        assert_eq!(answer.grpc, Some(Code::Ok), "{answer:?}");
    }
    // A slot freed is a slot given.
    drop(first);
    let mut client = None;
    for _ in 0..100 {
        let Ok(channel) = tonic::transport::Channel::from_shared(gw.endpoint())
            .unwrap()
            .connect()
            .await
        else {
            continue;
        };
        let mut c =
            aggregator::pb::aggregator::v1::aggregator_client::AggregatorClient::new(channel);
        if c.aggregate(request("p", "2")).await.is_ok() {
            client = Some(c);
            break;
        }
    }
    assert!(
        client.is_some(),
        "no connection was served after one closed"
    );
}

#[tokio::test]
async fn the_metrics_listener_closes_a_slow_request_head() {
    let upstream = Upstream::http().start().await;
    let (gw, metrics) = Gateway::start_with_metrics(&format!(
        "[server]\nheader_read_timeout = \"300ms\"\nhandshake_timeout = \"300ms\"\n{}{}",
        http_source("p", &upstream, "/u/{user_id}"),
        aggregation("p", &["p"], "")
    ))
    .await;
    let mut slow = TcpStream::connect(metrics).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(metrics).await.unwrap();
    assert!(
        server_closes(&mut slow, GENEROUS).await,
        "a slow head was waited for"
    );
    assert!(
        server_closes(&mut silent, GENEROUS).await,
        "a silent connection was kept"
    );
    drop(gw);
}

#[tokio::test]
async fn a_request_body_that_trickles_in_is_cut_at_the_deadline() {
    let upstream = Upstream::http().start().await;
    let gw = gateway("", &upstream).await;
    let mut conn = raw::connect(gw.addr).await;
    // Declares 4 MiB, sends all but 1 KiB, and waits.
    let declared = 4 << 20;
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(declared as u32).to_be_bytes());
    let started = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..5 {
        let head = raw::grpc_head(gw.addr, AGGREGATE, Some("1S"));
        let (response, mut body) = conn.send.send_request(head, false).unwrap();
        body.send_data(Bytes::from(prefix.clone()), false).unwrap();
        body.send_data(Bytes::from(vec![b'x'; declared - 1024]), false)
            .unwrap();
        streams.push((response, body));
    }
    for (response, _body) in streams {
        let answer = tokio::time::timeout(GENEROUS, raw::read_answer(response))
            .await
            .expect("no answer: the gateway waited for the rest of the body");
        assert_eq!(answer.grpc, Some(Code::DeadlineExceeded), "{answer:?}");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "answered before the deadline"
    );
}

/// Resident memory of this process (gateway and client), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_declared_length_is_not_reserved_before_it_arrives() {
    let upstream = Upstream::http().start().await;
    let gw = gateway("request_read_timeout = \"30s\"", &upstream).await;
    let mut conn = raw::connect(gw.addr).await;
    let before = rss_kib();
    let mut streams = Vec::new();
    for _ in 0..50 {
        let head = raw::grpc_head(gw.addr, AGGREGATE, None);
        let (response, mut body) = conn.send.send_request(head, false).unwrap();
        // 4 MiB announced, 1 KiB sent.
        let mut start = vec![0u8];
        start.extend_from_slice(&(4u32 << 20).to_be_bytes());
        start.extend_from_slice(&[b'x'; 1024]);
        body.send_data(Bytes::from(start), false).unwrap();
        streams.push((response, body));
    }
    // Every stream has reached the gateway once a later call is answered.
    let head = raw::grpc_head(gw.addr, AGGREGATE, None);
    let answer = raw::call(&mut conn, head, raw::frame(&request("p", "1"))).await;
    assert_eq!(answer.grpc, Some(Code::Ok), "{answer:?}");
    let grown = rss_kib().saturating_sub(before);
    // Reserving the declared lengths would take 200 MiB.
    assert!(
        grown < 48 * 1024,
        "RSS grew {grown} KiB for 50 KiB received"
    );
    drop(streams);
}

#[tokio::test]
async fn an_answer_the_client_never_takes_is_reset_after_the_send_timeout() {
    let big = serde_json::json!({ "blob": "x".repeat(1 << 20) });
    let upstream = Upstream::http().json(big).start().await;
    let gw = gateway("send_timeout = \"500ms\"", &upstream).await;
    // A receive window of zero: not one byte of an answer can be sent.
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(0);
    let mut conn = raw::connect_with(gw.addr, builder).await;
    let head = raw::grpc_head(gw.addr, AGGREGATE, None);
    let (response, mut body) = conn.send.send_request(head, false).unwrap();
    body.send_data(raw::frame(&request("p", "1")), true)
        .unwrap();
    let response = tokio::time::timeout(GENEROUS, response)
        .await
        .expect("no answer headers")
        .unwrap();
    let answered = Instant::now();
    let mut data = response.into_body();
    // Never releasing capacity: the gateway must give up and reset.
    let outcome = tokio::time::timeout(GENEROUS, data.data()).await;
    let error = match outcome {
        Err(_) => panic!("the answer was held for good"),
        Ok(Some(Err(e))) => e,
        Ok(other) => panic!("expected a reset, got {other:?}"),
    };
    assert_eq!(error.reason(), Some(h2::Reason::CANCEL), "{error}");
    assert!(answered.elapsed() >= Duration::from_millis(450));
    // The connection itself still serves.
    let head = raw::grpc_head(gw.addr, "/grpc.health.v1.Health/Check", None);
    let (response, mut body) = conn.send.send_request(head, false).unwrap();
    body.send_data(
        raw::frame(&tonic_health::pb::HealthCheckRequest::default()),
        true,
    )
    .unwrap();
    let head = tokio::time::timeout(GENEROUS, response)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head.status(), 200);
}

#[tokio::test]
async fn an_oversized_request_is_resource_exhausted() {
    let upstream = Upstream::http().start().await;
    let gw = gateway("", &upstream).await;
    // Declared 64 MiB: refused from the length alone.
    let mut conn = raw::connect(gw.addr).await;
    let head = raw::grpc_head(gw.addr, AGGREGATE, None);
    let (response, mut body) = conn.send.send_request(head, false).unwrap();
    let mut start = vec![0u8];
    start.extend_from_slice(&(64u32 << 20).to_be_bytes());
    body.send_data(Bytes::from(start), false).unwrap();
    let answer = tokio::time::timeout(GENEROUS, raw::read_answer(response))
        .await
        .unwrap();
    assert_eq!(answer.grpc, Some(Code::ResourceExhausted), "{answer:?}");
    assert!(answer.message.contains("max_request_bytes"), "{answer:?}");
    // And a real client sending 5 MiB.
    let mut client = gw.client().await;
    let huge = AggregateRequest {
        payload: None,
        aggregation: "p".into(),
        params: params(&[("user_id", &"x".repeat(5 << 20))]),
    };
    let status = client.aggregate(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test]
async fn requests_that_are_not_grpc_get_http_errors() {
    let upstream = Upstream::http().start().await;
    let gw = gateway("", &upstream).await;
    let mut conn = raw::connect(gw.addr).await;
    for content_type in ["application/json", "text/plain", "application/grpc+json"] {
        let head = http::Request::post(format!("http://{}{AGGREGATE}", gw.addr))
            .header("content-type", content_type)
            .body(())
            .unwrap();
        let answer = raw::call(&mut conn, head, raw::frame(&request("p", "1"))).await;
        assert_eq!(answer.http, 415, "{content_type}: {answer:?}");
    }
    let head = http::Request::post(format!("http://{}{AGGREGATE}", gw.addr))
        .body(())
        .unwrap();
    assert_eq!(raw::call(&mut conn, head, Bytes::new()).await.http, 415);
    let head = http::Request::get(format!("http://{}{AGGREGATE}", gw.addr))
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (response, _) = conn.send.send_request(head, true).unwrap();
    assert_eq!(raw::read_answer(response).await.http, 405);
    // gRPC with protobuf, spelled either way, is served.
    for content_type in ["application/grpc", "application/grpc+proto"] {
        let mut head = raw::grpc_head(gw.addr, AGGREGATE, None);
        head.headers_mut()
            .insert("content-type", content_type.parse().unwrap());
        let answer = raw::call(&mut conn, head, raw::frame(&request("p", "1"))).await;
        assert_eq!(answer.grpc, Some(Code::Ok), "{content_type}: {answer:?}");
    }
}

#[tokio::test]
async fn bytes_being_received_are_bounded_gateway_wide() {
    let upstream = Upstream::http().start().await;
    let gw = gateway("max_buffered_request_bytes = 1048576", &upstream).await;
    let mut conn = raw::connect(gw.addr).await;
    let start = |conn: &mut raw::Conn| {
        let head = raw::grpc_head(gw.addr, AGGREGATE, Some("2S"));
        let (response, mut body) = conn.send.send_request(head, false).unwrap();
        // 400 KiB of a declared 1 MiB, and then nothing.
        let mut start = vec![0u8];
        start.extend_from_slice(&(1u32 << 20).to_be_bytes());
        start.extend_from_slice(&vec![b'x'; 400 << 10]);
        body.send_data(Bytes::from(start), false).unwrap();
        (tokio::spawn(raw::read_answer(response)), body)
    };
    // 1.2 MiB arriving for 1 MiB: whichever stream's bytes come last is refused.
    let streams = [start(&mut conn), start(&mut conn), start(&mut conn)];
    let mut refused = 0;
    for (answer, _body) in streams {
        let answer = tokio::time::timeout(GENEROUS, answer)
            .await
            .expect("no answer")
            .unwrap();
        match answer.grpc {
            Some(Code::ResourceExhausted) => {
                assert!(
                    answer.message.contains("max_buffered_request_bytes"),
                    "{answer:?}"
                );
                refused += 1;
            }
            Some(Code::DeadlineExceeded) => {}
            _ => panic!("{answer:?}"),
        }
    }
    assert!(refused >= 1, "1.2 MiB was held against a bound of 1 MiB");
    // Small calls still get through.
    let head = raw::grpc_head(gw.addr, AGGREGATE, None);
    let answer = raw::call(&mut conn, head, raw::frame(&request("p", "1"))).await;
    assert_eq!(answer.grpc, Some(Code::Ok), "{answer:?}");
}

#[tokio::test]
async fn a_unary_call_carries_one_message() {
    let upstream = Upstream::http().start().await;
    let gw = gateway("", &upstream).await;
    let mut conn = raw::connect(gw.addr).await;
    let one = raw::frame(&request("p", "1"));
    let two = Bytes::from([one.clone(), one].concat());
    let answer = raw::call(&mut conn, raw::grpc_head(gw.addr, AGGREGATE, None), two).await;
    assert_eq!(answer.grpc, Some(Code::InvalidArgument), "{answer:?}");
    assert_eq!(upstream.log.stats().started, 0);
}

#[tokio::test]
async fn an_answer_larger_than_a_client_reads_is_refused() {
    let big = serde_json::json!({ "blob": "x".repeat(8 << 10) });
    let upstream = Upstream::http().json(big).start().await;
    let (gw, metrics) = Gateway::start_with_metrics(&format!(
        "[server]\nmax_answer_bytes = 4096\n{}{}",
        http_source("p", &upstream, "/u/{user_id}"),
        aggregation("p", &["p"], "")
    ))
    .await;
    let status = gw
        .client()
        .await
        .aggregate(request("p", "1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_answer_bytes"),
        "{}",
        status.message()
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "ANSWER_TOO_LARGE");
    // Counted as what the caller got, not as the OK the sources gave.
    let (_, text) = scrape(metrics, None).await;
    let calls = |code: &str| {
        sample(
            &text,
            &format!(
                "aggregator_calls_total{{rpc=\"Aggregate\",aggregation=\"p\",code=\"{code}\"}}"
            ),
        )
    };
    assert_eq!(calls("RESOURCE_EXHAUSTED"), Some(1.0), "{text}");
    assert_eq!(calls("OK"), None, "{text}");
}

/// Sends a call and resets it at once, before any answer.
fn call_and_cancel(conn: &mut raw::Conn, addr: std::net::SocketAddr, user: &str) -> bool {
    let head = raw::grpc_head(addr, AGGREGATE, None);
    let Ok((response, mut body)) = conn.send.send_request(head, false) else {
        return false;
    };
    let sent = body
        .send_data(raw::frame(&request("p", user)), true)
        .is_ok();
    drop(response);
    body.send_reset(h2::Reason::CANCEL);
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_cancellation_bursts_leave_the_connection_serving() {
    let upstream = Upstream::http()
        .delay(Duration::from_millis(100))
        .start()
        .await;
    // The default reset budget.
    let gw = gateway("", &upstream).await;
    let mut conn = raw::connect(gw.addr).await;
    // Calls that must all be answered, in flight on the same connection.
    let mut survivors = Vec::new();
    for i in 0..50 {
        let head = raw::grpc_head(gw.addr, AGGREGATE, None);
        let (response, mut body) = conn.send.send_request(head, false).unwrap();
        body.send_data(raw::frame(&request("p", &format!("s{i}"))), true)
            .unwrap();
        survivors.push(tokio::spawn(raw::read_answer(response)));
    }
    // 10,000 calls cancelled as soon as sent, over 10 s at least, in bursts
    // of 100: the pace of a busy client whose callers give up.
    for burst in 0..100 {
        let tick = tokio::time::sleep(Duration::from_millis(100));
        for i in 0..100 {
            assert!(
                call_and_cancel(&mut conn, gw.addr, &format!("{burst}-{i}")),
                "the connection refused call {i} of burst {burst}"
            );
        }
        conn.send = conn
            .send
            .clone()
            .ready()
            .await
            .expect("the connection was closed");
        tick.await;
    }
    for survivor in survivors {
        let answer = survivor.await.unwrap();
        assert_eq!(answer.grpc, Some(Code::Ok), "{answer:?}");
    }
    let head = raw::grpc_head(gw.addr, AGGREGATE, None);
    let answer = raw::call(&mut conn, head, raw::frame(&request("p", "after"))).await;
    assert_eq!(answer.grpc, Some(Code::Ok), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_resets_is_cut_off_and_other_clients_are_served() {
    let upstream = Upstream::http()
        .delay(Duration::from_millis(100))
        .start()
        .await;
    // A small budget, so that any machine floods faster than it refills; the
    // default's numbers are checked against the same bucket in server::resets.
    // The flood is 20,000 calls reset as soon as sent.
    let gw = gateway(
        "max_resets_per_second = 10\nmax_reset_burst = 100",
        &upstream,
    )
    .await;
    let mut attacker = raw::connect(gw.addr).await;
    // As fast as the client can: whichever guard sees it first cuts it off,
    // h2's (more than 1,024 resets piled up before hyper took them in) or
    // the reset budget (the next test shows that one alone).
    let mut sent = 0;
    'flood: for burst in 0..200 {
        for i in 0..100 {
            if !call_and_cancel(&mut attacker, gw.addr, &format!("{burst}-{i}")) {
                break 'flood;
            }
            sent += 1;
        }
        match attacker.send.clone().ready().await {
            Ok(send) => attacker.send = send,
            Err(_) => break,
        }
    }
    assert!(sent < 20_000, "all {sent} resets were taken");
    assert!(
        raw::closed_within(&mut attacker, GENEROUS).await,
        "the flooding connection stayed open"
    );
    let mut client = gw.client().await;
    client.aggregate(request("p", "1")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_of_calls_without_a_body_count_too() {
    let upstream = Upstream::http().start().await;
    let gw = gateway(
        "max_resets_per_second = 10\nmax_reset_burst = 100",
        &upstream,
    )
    .await;
    let mut client = raw::connect(gw.addr).await;
    let mut sent = 0;
    'resets: for _ in 0..1_000 {
        for _ in 0..10 {
            // HEADERS without END_STREAM, no body, then RST_STREAM.
            let head = raw::grpc_head(gw.addr, AGGREGATE, None);
            let Ok((response, mut body)) = client.send.send_request(head, false) else {
                break 'resets;
            };
            drop(response);
            body.send_reset(h2::Reason::CANCEL);
            sent += 1;
        }
        match client.send.clone().ready().await {
            Ok(send) => client.send = send,
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(sent < 10_000, "never cut off");
    let ended = tokio::time::timeout(GENEROUS, &mut client.driver)
        .await
        .expect("the connection stayed open")
        .unwrap();
    if let Err(error) = ended {
        assert!(!error.to_string().contains("too_many_resets"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_beyond_the_budget_close_the_connection() {
    let upstream = Upstream::http()
        .delay(Duration::from_millis(100))
        .start()
        .await;
    let gw = gateway(
        "max_resets_per_second = 10\nmax_reset_burst = 100",
        &upstream,
    )
    .await;
    let mut client = raw::connect(gw.addr).await;
    // 10 every 10 ms: never more than a few unaccepted at once, so h2's own
    // guard (1,024) cannot be what ends it.
    let mut sent = 0;
    'resets: for burst in 0..1_000 {
        for i in 0..10 {
            if !call_and_cancel(&mut client, gw.addr, &format!("{burst}-{i}")) {
                break 'resets;
            }
            sent += 1;
        }
        match client.send.clone().ready().await {
            Ok(send) => client.send = send,
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(sent >= 100, "cut off within the burst allowed: {sent}");
    assert!(sent < 10_000, "never cut off");
    let ended = tokio::time::timeout(GENEROUS, &mut client.driver)
        .await
        .expect("the connection stayed open")
        .unwrap();
    if let Err(error) = ended {
        assert!(
            !error.to_string().contains("too_many_resets"),
            "cut off by h2's guard, not the reset budget: {error}"
        );
    }
}

#[tokio::test]
async fn a_huge_name_comes_back_bounded() {
    let upstream = Upstream::http().start().await;
    let gw = gateway("", &upstream).await;
    let mut client = gw.client().await;
    let status = client
        .aggregate(request(&"n".repeat(1 << 20), "1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().len() + status.details().len() <= 4096,
        "{} + {} bytes",
        status.message().len(),
        status.details().len()
    );
    assert!(
        status.message().starts_with("unknown aggregation 'nnnn"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("(1048576 bytes)"),
        "{}",
        status.message()
    );
    let fetch = aggregator::pb::aggregator::v1::FetchAllRequest {
        payload: None,
        aggregation: "p".into(),
        params: params(&[("user_id", "1")]),
        sources: vec!["s".repeat(1 << 20)],
        mode: 0,
    };
    let status = client.fetch_all(fetch).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().len() + status.details().len() <= 4096);
}
