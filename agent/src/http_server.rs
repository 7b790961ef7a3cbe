//! The HTTP/1 accept loop shared by the local API and `edgewise collect`: hyper 1 (already in
//! the tree through reqwest) without a framework.
//!
//! ```text
//! listener.accept ─▶ permit (≤ limits.max_connections) ─▶ task: serve_connection(service)
//!        ▲                                                      │ header_read_timeout
//!        └── EMFILE etc.: warn, 100 ms pause ◀──────────────────┘
//! shutdown ─▶ stop accepting ─▶ graceful_shutdown of every connection ─▶ wait ≤ grace
//! ```
//!
//! Returns whether every connection finished within the grace period.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Bounds of one server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time a client has to send its request headers.
    pub header_timeout: Duration,
    /// Time requests in flight get after shutdown.
    pub shutdown_grace: Duration,
}

/// Serves `listener` with `service` until `shutdown`, then drains connections for up to
/// `limits.shutdown_grace`. `name` labels log lines. Returns `false` when requests were still
/// in flight at the end of the grace period.
pub async fn serve<S, F>(
    name: &'static str,
    listener: TcpListener,
    limits: Limits,
    service: S,
    shutdown: impl Future<Output = ()>,
) -> bool
where
    S: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off a little rather than spin.
                    warn!(server = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = service.clone();
        let cancel = cancel.clone();
        let connection = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |request| {
                let response = service(request, peer);
                async move { Ok::<_, Infallible>(response.await) }
            }),
        );
        tracker.spawn(async move {
            let _permit = permit;
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                debug!(server = name, %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    cancel.cancel();
    tracker.close();
    tokio::time::timeout(limits.shutdown_grace, tracker.wait()).await.is_ok()
}
