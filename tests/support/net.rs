//! Bare TCP helpers: servers that speak garbage, addresses that refuse,
//! and a proxy that reads slowly.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Log, Running, listen};

/// A TCP server that accepts and writes `reply` (e.g. garbage, or nothing)
/// then closes: for upstreams that reset or speak the wrong protocol.
pub async fn raw_tcp(reply: &'static [u8]) -> Running {
    use tokio::io::AsyncWriteExt;
    let (listener, addr) = listen().await;
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Ok((mut stream, _)) = listener.accept() => {
                    let _ = stream.write_all(reply).await;
                    drop(stream);
                }
                () = token.cancelled() => break,
            }
        }
    });
    Running {
        addr,
        log: Log::default(),
        stop,
    }
}

/// An address nothing listens on (bound, then released).
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A TCP proxy in front of `target` that forwards what clients send at once
/// but reads the target's answers slowly through a small receive buffer, so
/// that the target's socket send queue stays full: what a slow or distant
/// client looks like from the server.
pub async fn slow_reader_proxy(target: SocketAddr) -> Running {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (listener, addr) = listen().await;
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        loop {
            let (client, _) = tokio::select! {
                accepted = listener.accept() => accepted.unwrap(),
                () = token.cancelled() => return,
            };
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let Ok(server) = socket.connect(target).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                let _ = server_write.shutdown().await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                // Pass a reset on as a reset, so the client sees what the
                // server did.
                let _ = client_write.shutdown().await;
            });
        }
    });
    Running {
        addr,
        log: Log::default(),
        stop,
    }
}

/// An address that refuses connections for as long as the returned socket
/// lives: bound but not listening, so that no server of a test running at
/// the same time can be given the port (as may happen once `refused_addr`
/// has released it).
pub fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}
