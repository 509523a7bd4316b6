//! The accept loop every listener shares (MQTT transports and the status endpoint).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Connections the kernel may hold for a listener before it accepts them (capped by the
/// system's `somaxconn`): a fleet reconnecting at once after a restart must not see its SYNs
/// dropped and retried a second later (tokio's default is 1,024).
const BACKLOG: u32 = 65_535;

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const LAST_BACKOFF: Duration = Duration::from_secs(1);

/// A listener on `addr` with a deep accept queue (see [`BACKLOG`]).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std and tokio do: a restarted server binds while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

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
