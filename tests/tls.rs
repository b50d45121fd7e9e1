//! TLS on both sides, with rustls and a throwaway PKI made per test: clients
//! over TLS and mTLS to the gateway, the gateway over TLS (and with a client
//! certificate) to gRPC and HTTP upstreams, and a wrong CA named as the
//! reason a source is unavailable.

mod support;

use aggregator::pb::aggregator::v1::{AggregateRequest, aggregator_client::AggregatorClient};
use support::*;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

fn request(aggregation: &str) -> AggregateRequest {
    AggregateRequest {
        payload: None,
        aggregation: aggregation.into(),
        params: params(&[("user_id", "7")]),
    }
}

/// A client of the gateway over TLS, trusting the test CA, with the client
/// certificate when `identity`.
async fn tls_client(
    gw: &Gateway,
    pki: &Pki,
    identity: bool,
) -> Result<AggregatorClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.read("ca.crt")))
        .domain_name("localhost");
    if identity {
        tls = tls.identity(Identity::from_pem(
            pki.read("client.crt"),
            pki.read("client.key"),
        ));
    }
    let channel = Channel::from_shared(format!("https://{}", gw.addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(AggregatorClient::new(channel))
}

#[tokio::test]
async fn a_tls_client_calls_the_gateway_and_a_plaintext_one_cannot() {
    let pki = Pki::new();
    let upstream = Upstream::http().start().await;
    let gw = Gateway::start(&format!(
        "[server]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n{}{}",
        pki.path("server.crt"),
        pki.path("server.key"),
        http_source("p", &upstream, "/p"),
        aggregation("p", &["p"], "")
    ))
    .await;
    let mut client = tls_client(&gw, &pki, false).await.unwrap();
    client.aggregate(request("p")).await.unwrap();
    // Plaintext HTTP/2 to a TLS listener is not served.
    let plain = Channel::from_shared(gw.endpoint()).unwrap().connect().await;
    if let Ok(channel) = plain {
        let result = AggregatorClient::new(channel).aggregate(request("p")).await;
        assert!(result.is_err(), "a plaintext call was served");
    }
    assert_eq!(upstream.log.stats().started, 1);
}

#[tokio::test]
async fn under_mtls_a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let upstream = Upstream::http().start().await;
    let gw = Gateway::start(&format!(
        "[server]\ntls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\" }}\n{}{}",
        pki.path("server.crt"),
        pki.path("server.key"),
        pki.path("ca.crt"),
        http_source("p", &upstream, "/p"),
        aggregation("p", &["p"], "")
    ))
    .await;
    let mut with_cert = tls_client(&gw, &pki, true).await.unwrap();
    with_cert.aggregate(request("p")).await.unwrap();
    let refused = match tls_client(&gw, &pki, false).await {
        Err(_) => true,
        Ok(mut client) => client.aggregate(request("p")).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    assert_eq!(upstream.log.stats().started, 1);
}

/// A TLS gRPC upstream (ALPN h2) and a TLS HTTP/1.1 one, both with the
/// PKI's server certificate.
async fn tls_upstreams(pki: &Pki) -> (Running, Running) {
    let profile = Upstream::grpc().tls(pki.server_config(&["h2"], false));
    let orders = Upstream::http().tls(pki.server_config(&["http/1.1"], false));
    (profile.start().await, orders.start().await)
}

/// `profile` and `orders` sources over https, verified against the PKI's file `ca`.
fn tls_sources(pki: &Pki, ca: &str, profile: &Running, orders: &Running) -> String {
    format!(
        "[defaults]\ntls = {{ ca = \"{}\" }}\n\
         [sources.profile]\nkind = \"grpc\"\nendpoint = \"https://localhost:{}\"\n\
         method = \"demo.v1.Profiles/GetProfile\"\nrequest = {{ user_id = \"{{user_id}}\" }}\n\
         [sources.orders]\nkind = \"http\"\nurl = \"https://127.0.0.1:{}/users/{{user_id}}/orders\"\n",
        pki.path(ca),
        profile.addr.port(),
        orders.addr.port(),
    )
}

#[tokio::test]
async fn tls_grpc_and_http_upstreams_are_verified_against_the_configured_ca() {
    let pki = Pki::new();
    let (profile, orders) = tls_upstreams(&pki).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        tls_sources(&pki, "ca.crt", &profile, &orders),
        aggregation("dash", &["profile", "orders"], "")
    ))
    .await;
    let response = gw
        .client()
        .await
        .aggregate(request("dash"))
        .await
        .unwrap()
        .into_inner();
    assert!(response.complete, "{response:?}");
    assert_eq!(profile.log.stats().started, 1);
    assert_eq!(orders.log.stats().started, 1);
}

#[tokio::test]
async fn a_client_certificate_and_a_server_name_reach_a_strict_upstream() {
    let pki = Pki::new();
    // Requires a client certificate; its certificate names upstream.test,
    // not the address the gateway dials.
    let orders = Upstream::http()
        .tls(pki.server_config(&["http/1.1"], true))
        .start()
        .await;
    let gw = Gateway::start(&format!(
        "[sources.orders]\nkind = \"http\"\nurl = \"https://127.0.0.1:{}/o\"\n\
         tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\", server_name = \"upstream.test\" }}\n{}",
        orders.addr.port(),
        pki.path("ca.crt"),
        pki.path("client.crt"),
        pki.path("client.key"),
        aggregation("o", &["orders"], "")
    ))
    .await;
    gw.client().await.aggregate(request("o")).await.unwrap();
    // Without the client certificate the upstream refuses the handshake.
    let anonymous = Gateway::start(&format!(
        "[sources.orders]\nkind = \"http\"\nurl = \"https://localhost:{}/o\"\ntls = {{ ca = \"{}\" }}\n{}",
        orders.addr.port(),
        pki.path("ca.crt"),
        aggregation("o", &["orders"], "")
    ))
    .await;
    let status = anonymous
        .client()
        .await
        .aggregate(request("o"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_wrong_ca_is_unavailable_naming_the_source_and_the_reason() {
    let pki = Pki::new();
    let (profile, orders) = tls_upstreams(&pki).await;
    let gw = Gateway::start(&format!(
        "{}{}{}",
        tls_sources(&pki, "other-ca.crt", &profile, &orders),
        aggregation("profile", &["profile"], ""),
        aggregation("orders", &["orders"], "")
    ))
    .await;
    let mut client = gw.client().await;
    for source in ["profile", "orders"] {
        let status = client.aggregate(request(source)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let message = status.message();
        assert!(
            message.starts_with(&format!("source '{source}': ")),
            "{message}"
        );
        assert!(
            message.contains("certificate") || message.contains("UnknownIssuer"),
            "{source}: {message}"
        );
    }
    assert_eq!(profile.log.stats().started, 0);
    assert_eq!(orders.log.stats().started, 0);
}
