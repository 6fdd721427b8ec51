//! The public listener: accepts TCP connections and serves HTTP/1.1 on them until they become
//! websockets, with bounds on what a client that never gets that far may hold: connections
//! not yet upgraded (`GATEWAY_MAX_PENDING_HTTP`), time to send a request
//! (`GATEWAY_HTTP_TIMEOUT_SECS`), and open connections per address
//! (`GATEWAY_MAX_CONNECTIONS_PER_IP`). Every refusal is counted and logged (rate limited).

use crate::Gateway;
use crate::limits::{IpSlot, PerIp};
use crate::metrics::Metrics;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Who is on the other end of a request's connection (a request extension).
#[derive(Debug, Clone)]
pub struct ClientConn {
    pub peer: SocketAddr,
    /// Counts the connection against its address while a clone lives (the websocket keeps one).
    pub slot: Arc<IpSlot>,
}

/// Accepts connections on `listener` and serves `app` on them until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    gateway: Arc<Gateway>,
    shutdown: CancellationToken,
) {
    let config = &gateway.config;
    let pending = Arc::new(Semaphore::new(config.max_pending_http));
    let per_ip = PerIp::new(config.max_connections_per_ip);
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.http_timeout);
    let http = Arc::new(http.http1_only());
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            // Out of file descriptors, for one: wait for connections to end.
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            refused(&gateway, peer, "too many connections waiting to upgrade");
            continue;
        };
        let Some(slot) = per_ip.try_acquire(peer.ip()) else {
            refused(&gateway, peer, "too many connections from this address");
            continue;
        };
        // Without TCP_NODELAY, Nagle's algorithm and the client's delayed ACKs hold small
        // frames back for up to 40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let client = ClientConn {
            peer,
            slot: Arc::new(slot),
        };
        let (app, http, gateway) = (app.clone(), http.clone(), gateway.clone());
        tasks.spawn(async move {
            serve_connection(tcp, client, app, &http, &gateway).await;
            drop(permit);
        });
    }
    tasks.close();
}

/// Serves one connection until it is upgraded (the websocket goes on in its own task) or
/// closed; a request not complete within the HTTP timeout ends it.
async fn serve_connection(
    tcp: TcpStream,
    client: ClientConn,
    app: Router,
    http: &auto::Builder<TokioExecutor>,
    gateway: &Gateway,
) {
    let peer = client.peer;
    // Whether a whole request came: a connection that ends without one was refused.
    let requested = Arc::new(AtomicBool::new(false));
    let seen = requested.clone();
    let service = tower::ServiceExt::map_request(
        app,
        move |mut request: hyper::Request<hyper::body::Incoming>| {
            seen.store(true, Relaxed);
            request.extensions_mut().insert(client.clone());
            request
        },
    );
    let service = TowerToHyperService::new(service);
    let connection = http.serve_connection_with_upgrades(TokioIo::new(tcp), service);
    let ended = tokio::time::timeout(gateway.config.http_timeout, connection).await;
    if let Ok(Err(e)) = &ended {
        tracing::debug!(%peer, error = %e, "HTTP connection failed");
    }
    if ended.is_err() {
        refused(gateway, peer, "no request in time");
    } else if !requested.load(Relaxed) {
        refused(gateway, peer, "no complete request");
    }
}

/// Counts and logs (at most a few times a second) a connection closed before it upgraded.
fn refused(gateway: &Gateway, peer: SocketAddr, reason: &'static str) {
    Metrics::inc(&gateway.metrics.refused_connections);
    if let Some(suppressed) = gateway.security_log.allow(Instant::now()) {
        tracing::warn!(%peer, reason, suppressed, "refusing a connection");
    }
}
