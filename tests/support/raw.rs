//! A raw HTTP/2 client (the `h2` crate) for what a gRPC library would never
//! send: bodies that stall, windows that never open, resets by the
//! thousand, wrong content types.

use std::{net::SocketAddr, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use h2::client::{self, SendRequest};
use http::{HeaderMap, Request};
use tokio::{net::TcpStream, task::JoinHandle};

/// An HTTP/2 connection: the handle to send requests on, and the task that
/// drives it (it ends when the connection does).
pub struct Conn {
    pub send: SendRequest<Bytes>,
    pub driver: JoinHandle<Result<(), h2::Error>>,
}

pub async fn connect(addr: SocketAddr) -> Conn {
    connect_with(addr, client::Builder::new()).await
}

pub async fn connect_with(addr: SocketAddr, builder: client::Builder) -> Conn {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = builder.handshake(tcp).await.unwrap();
    let driver = tokio::spawn(connection);
    let send = send.ready().await.unwrap();
    Conn { send, driver }
}

/// A gRPC request's head for `path`, with `grpc-timeout` when given.
pub fn grpc_head(addr: SocketAddr, path: &str, timeout: Option<&str>) -> Request<()> {
    let mut request = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(timeout) = timeout {
        request = request.header("grpc-timeout", timeout);
    }
    request.body(()).unwrap()
}

/// `message` with gRPC's 5-byte length prefix.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut framed = BytesMut::with_capacity(body.len() + 5);
    framed.put_u8(0);
    framed.put_u32(body.len() as u32);
    framed.put_slice(&body);
    framed.freeze()
}

/// What came back: the HTTP status, the gRPC status (from the headers of a
/// trailers-only answer, or from the trailers) and the body's size.
#[derive(Debug)]
pub struct Answer {
    pub http: http::StatusCode,
    pub grpc: Option<tonic::Code>,
    pub message: String,
    pub body_bytes: usize,
    /// Set when the stream was reset instead of finishing.
    pub reset: Option<h2::Reason>,
}

fn grpc_status(headers: &HeaderMap) -> Option<(tonic::Code, String)> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .map(|m| {
            percent_encoding::percent_decode(m.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Some((tonic::Code::from_i32(code), message))
}

/// Reads a whole answer, giving its window back as it arrives.
pub async fn read_answer(response: client::ResponseFuture) -> Answer {
    let response = match response.await {
        Ok(response) => response,
        Err(e) => {
            return Answer {
                http: http::StatusCode::from_u16(599).unwrap(),
                grpc: None,
                message: e.to_string(),
                body_bytes: 0,
                reset: e.reason(),
            };
        }
    };
    let (head, mut body) = response.into_parts();
    let mut answer = Answer {
        http: head.status,
        grpc: None,
        message: String::new(),
        body_bytes: 0,
        reset: None,
    };
    if let Some((code, message)) = grpc_status(&head.headers) {
        answer.grpc = Some(code);
        answer.message = message;
    }
    while let Some(data) = body.data().await {
        match data {
            Ok(data) => {
                answer.body_bytes += data.len();
                let _ = body.flow_control().release_capacity(data.len());
            }
            Err(e) => {
                answer.reset = e.reason();
                return answer;
            }
        }
    }
    match body.trailers().await {
        Ok(Some(trailers)) => {
            if let Some((code, message)) = grpc_status(&trailers) {
                answer.grpc = Some(code);
                answer.message = message;
            }
        }
        Ok(None) => {}
        Err(e) => answer.reset = e.reason(),
    }
    answer
}

/// One whole unary call: `body` sent at once, the answer read.
pub async fn call(conn: &mut Conn, head: Request<()>, body: Bytes) -> Answer {
    let (response, mut stream) = conn.send.send_request(head, false).unwrap();
    stream.send_data(body, true).unwrap();
    read_answer(response).await
}

/// Waits for the server to end the connection (the client keeps it open);
/// false if it is still open after `within`.
pub async fn closed_within(conn: &mut Conn, within: Duration) -> bool {
    tokio::time::timeout(within, &mut conn.driver).await.is_ok()
}
