//! The gateway process: the websocket endpoint, the status endpoint, upstream links and
//! orderly shutdown.
//!
//! `run` is what the binary and the tests call. axum does not track upgraded websockets in
//! graceful shutdown, so the gateway tracks its own connections and closes them with 1012.

use crate::cluster::directory::EMBEDDED_NODE;
use crate::cluster::driver::Driver;
use crate::cluster::{Cluster, ClusterConfig};
use crate::codec::Vsn;
use crate::config::Config;
use crate::index::LocalIndex;
use crate::metrics::Metrics;
use crate::{Gateway, session, ws};
use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use ringcast_ring::watcher;
use ringcast_topic_server::{Ownership, ServiceLimits, TopicService};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone)]
struct AppState {
    gateway: Arc<Gateway>,
    connections: Arc<Semaphore>,
    tracker: TaskTracker,
}

/// Serves until `shutdown` is cancelled, then closes every connection (1012) within the
/// configured grace period.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Connections; the links and the driver; the embedded core and the small tasks: each
    // group stops in turn at shutdown.
    let tracker = TaskTracker::new();
    let links_stop = CancellationToken::new();
    let link_tasks = TaskTracker::new();
    let core_stop = CancellationToken::new();
    let background = TaskTracker::new();
    let index = Arc::new(LocalIndex::default());
    let metrics = Arc::new(Metrics::default());
    let embedded_core = config
        .ring
        .is_none()
        .then(|| TopicService::new(Ownership::All, ServiceLimits::default(), core_stop.clone()));
    let cluster_config = ClusterConfig {
        gateway_id: config.gateway_id.clone(),
        ring: config.ring.as_ref().map(|(ring, _)| ring.clone()),
        queue: config.upstream_queue,
        keepalive: config.keepalive,
        max_message_bytes: ringcast_proto::batch::MAX_MESSAGE_BYTES,
        link_threads: config.link_threads,
    };
    let (cluster, events) = Cluster::start(
        cluster_config,
        index.clone(),
        metrics.clone(),
        links_stop.clone(),
        link_tasks.clone(),
        embedded_core,
    )?;
    let ring_watch = match &config.ring {
        Some((initial, source)) => Some(watcher::spawn(
            source.clone(),
            initial.clone(),
            shutdown.clone(),
        )),
        None => {
            background.spawn(hangup_notice(shutdown.clone()));
            None
        }
    };
    let driver = Driver::new(
        cluster.clone(),
        events,
        ring_watch.as_ref().map(|w| w.ring.clone()),
    );
    link_tasks.spawn(driver.run(links_stop.clone()));
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let grace = config.shutdown_grace;
    let gateway = Arc::new(Gateway {
        config,
        cluster,
        ring_watch,
        index,
        metrics,
        next_sub: AtomicU64::new(1),
        next_conn: AtomicU64::new(1),
        shutdown: shutdown.clone(),
        conns: Default::default(),
    });
    {
        let gateway = gateway.clone();
        background.spawn(async move {
            gateway.shutdown.cancelled().await;
            gateway.conns.shut_down();
        });
    }
    tracing::info!(
        addr = %listener.local_addr()?,
        gateway = %gateway.config.gateway_id,
        mode = if gateway.config.ring.is_some() { "ring" } else { "embedded" },
        ring_version = gateway.cluster.version(),
        "gateway listening"
    );

    let state = AppState {
        gateway: gateway.clone(),
        connections,
        tracker: tracker.clone(),
    };
    let app = Router::new()
        .route("/socket/websocket", get(websocket))
        .route("/status", get(status))
        .route("/ring", get(ring_view))
        .route(
            "/",
            get(|| async { "ringcast gateway: connect to /socket/websocket?vsn=2.0.0\n" }),
        )
        .with_state(state);
    // Without TCP_NODELAY, Nagle's algorithm and the client's delayed ACKs hold small
    // frames back for up to 40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;

    // Connections see `shutdown` and close with 1012; give them the grace period.
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("connections did not close within the grace period");
    }
    links_stop.cancel();
    link_tasks.close();
    link_tasks.wait().await;
    core_stop.cancel();
    background.close();
    background.wait().await;
    tracing::info!("gateway stopped");
    Ok(())
}

async fn websocket(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    mut request: Request,
) -> Response {
    let vsn = match Vsn::from_query(params.get("vsn").map(String::as_str)) {
        Ok(vsn) => vsn,
        Err(reason) => return (StatusCode::FORBIDDEN, reason).into_response(),
    };
    let handshake = match ws::Handshake::check(request.headers(), &["phoenix"]) {
        Ok(handshake) => handshake,
        Err(rejection) => return rejection.into_response(),
    };
    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded (HTTP/1.1 upgrade only)",
        )
            .into_response();
    };
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    let gateway = state.gateway.clone();
    let max = gateway.config.max_frame_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(16 * 1024 * 1024)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    tokio::spawn(state.tracker.track_future(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(error = %e, "websocket upgrade failed"),
        };
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let metrics = gateway.metrics.clone();
        metrics.connections.fetch_add(1, Relaxed);
        Metrics::inc(&metrics.connections_total);
        session::serve(socket, vsn, gateway).await;
        metrics.connections.fetch_sub(1, Relaxed);
        drop(permit);
    }));
    handshake.response()
}

async fn status(State(state): State<AppState>) -> impl IntoResponse {
    let g = &state.gateway;
    let m = &g.metrics;
    let links: Vec<_> = g
        .cluster
        .links()
        .iter()
        .map(|l| json!({ "node": &**l.node(), "addr": l.addr(), "connected": l.is_connected() }))
        .collect();
    Json(json!({
        "gateway_id": g.config.gateway_id,
        "mode": if g.config.ring.is_some() { "ring" } else { "embedded" },
        "ring_version": g.cluster.version(),
        "ring_refused": g.ring_watch.as_ref().and_then(|w| w.refused()),
        "links": links,
        "connections": m.connections.load(Relaxed),
        "connections_total": m.connections_total.load(Relaxed),
        "subscriptions": g.index.subscription_count(),
        "topics": g.index.topic_count(),
        "joins": m.joins.load(Relaxed),
        "publishes": m.publishes.load(Relaxed),
        "deliveries_in": m.deliveries_in.load(Relaxed),
        "encodes": m.encodes.load(Relaxed),
        "frames_out": m.frames_out.load(Relaxed),
        "malformed_frames": m.malformed_frames.load(Relaxed),
        "slow_consumers": m.slow_consumers.load(Relaxed),
        "interrupted_channels": m.interrupted_channels.load(Relaxed),
        "gaps": m.gaps.load(Relaxed),
        "moves": m.moves.load(Relaxed),
    }))
}

/// `GET /ring`: the ring in force, the links, and which local topics sit on which node.
async fn ring_view(State(state): State<AppState>) -> impl IntoResponse {
    let g = &state.gateway;
    let links = g.cluster.links();
    let (version, nodes) =
        match g.cluster.ring() {
            Some(ring) => {
                let nodes: Vec<_> = ring
                .nodes()
                .iter()
                .map(|n| {
                    let connected = links.iter().any(|l| **l.node() == *n.id && l.is_connected());
                    json!({"id": n.id, "addr": n.addr, "weight": n.weight, "connected": connected})
                })
                .collect();
                (ring.version(), nodes)
            }
            None => (0, vec![json!({"id": EMBEDDED_NODE, "connected": true})]),
        };
    Json(json!({
        "version": version,
        "refused": g.ring_watch.as_ref().and_then(|w| w.refused()),
        "nodes": nodes,
        "topics": g.index.topics_by_node(),
        "moving": g.cluster.moving(),
    }))
}

/// Without a ring there is nothing to reload; SIGHUP (which would otherwise stop the process)
/// is logged and ignored, as in ring mode.
async fn hangup_notice(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(()) = hup.recv() => tracing::info!("SIGHUP: no ring to reload (single-node mode)"),
        }
    }
}
