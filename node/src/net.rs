//! Listening sockets. Every accepted connection gets `TCP_NODELAY`: a gRPC answer goes out as
//! several small writes (headers, message, trailers), and with Nagle's algorithm on, a write
//! waits for the peer to acknowledge the previous one, which a delayed ACK holds back for up to
//! 40 ms. tonic applies its `tcp_nodelay` setting only to listeners it binds itself, not to the
//! listeners we bind (to report the bound address and fail early), so it is set here.
//!
//! The HTTP servers (OTLP/HTTP and the API) give a client [`HEADER_READ_TIMEOUT`] to send a
//! request's headers. `axum::serve` runs hyper without a timer, so its header timeout never
//! fired: a connection that sent part of its headers, or nothing, was kept open forever, and a
//! client opening many (a slowloris) could hold every file descriptor of the node.

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::TcpIncoming;
use tracing::{debug, warn};

/// How long a client of the HTTP servers may take to send a request's headers, from the start
/// of the connection or the end of its previous request: so also how long an idle keep-alive
/// connection stays open (a client exporting every 30 s or more often keeps its connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` over HTTP/1.1 until `shutdown` resolves, then lets the requests
/// in flight finish (idle connections close at once). `header_read_timeout`:
/// [`HEADER_READ_TIMEOUT`] but in tests.
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
    header_read_timeout: Duration,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (mut stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait rather than spin.
                    warn!(%error, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        set_nodelay(&mut stream);
        let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "an HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The connections of a gRPC listener, with Nagle's algorithm off.
pub fn grpc_incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

fn set_nodelay(tcp: &mut TcpStream) {
    if let Err(error) = tcp.set_nodelay(true) {
        warn!(%error, "cannot set TCP_NODELAY on an accepted connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn test_grpc_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut incoming = grpc_incoming(listener);
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[tokio::test]
    async fn test_http_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        set_nodelay(&mut accepted);
        assert!(accepted.nodelay().unwrap());
    }

    /// A client that sends part of a request's headers, or nothing, is disconnected after the
    /// header read timeout (before, never); a whole request is answered; the server stops.
    #[tokio::test]
    async fn test_http_header_reads_time_out_and_requests_are_served() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let timeout = Duration::from_secs(1);
        let server = tokio::spawn(serve_http(
            listener,
            router,
            async {
                let _ = stopped.await;
            },
            timeout,
        ));
        let mut whole = TcpStream::connect(address).await.unwrap();
        whole.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut answer = vec![0; 1024];
        let read = whole.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]);
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");

        let started = std::time::Instant::now();
        let mut partial = TcpStream::connect(address).await.unwrap();
        partial.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let mut silent = TcpStream::connect(address).await.unwrap();
        for client in [&mut partial, &mut silent] {
            let mut rest = Vec::new();
            // Closed by the server (an error answer, or none), not left open.
            let closed = tokio::time::timeout(timeout * 10, client.read_to_end(&mut rest)).await;
            assert!(closed.is_ok(), "the connection is still open after {:?}", started.elapsed());
        }
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server).await.expect("the server stops").unwrap();
    }
}
