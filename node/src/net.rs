//! Listening sockets. Every accepted connection gets `TCP_NODELAY`: a gRPC answer goes out as
//! several small writes (headers, message, trailers), and with Nagle's algorithm on, a write
//! waits for the peer to acknowledge the previous one, which a delayed ACK holds back for up to
//! 40 ms. tonic applies its `tcp_nodelay` setting only to listeners it binds itself, not to the
//! listeners we bind (to report the bound address and fail early), so it is set here.

use axum::serve::{ListenerExt, TapIo};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::TcpIncoming;
use tracing::warn;

/// The connections of a gRPC listener, with Nagle's algorithm off.
pub fn grpc_incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// An HTTP listener for `axum::serve` whose connections have Nagle's algorithm off.
pub fn http_listener(listener: TcpListener) -> TapIo<TcpListener, fn(&mut TcpStream)> {
    listener.tap_io(set_nodelay)
}

fn set_nodelay(tcp: &mut TcpStream) {
    if let Err(error) = tcp.set_nodelay(true) {
        warn!(%error, "cannot set TCP_NODELAY on an accepted connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
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
        let mut listener = http_listener(listener);
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let (accepted, _) = listener.accept().await;
        assert!(accepted.nodelay().unwrap());
    }
}
