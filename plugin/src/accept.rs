//! The accept loop every listener shares (MQTT transports and the status endpoint).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const LAST_BACKOFF: Duration = Duration::from_secs(1);

/// Hands each accepted socket to `on_accept` until `shutdown`. Accept failures (out of file
/// descriptors and the like) back off, doubling up to a second, instead of spinning.
pub(crate) async fn accept_until(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    mut on_accept: impl FnMut(TcpStream, SocketAddr),
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = FIRST_BACKOFF;
                on_accept(stream, peer);
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(LAST_BACKOFF);
            }
        }
    }
}
