//! The gateway process: the public listener (websockets, a health check), the admin
//! listener, the backend API listener, the cluster side, and the drain at shutdown.
//!
//! `run` is what the binary and the tests call. Upgraded websockets are tracked here, and
//! closed with 1012 at shutdown, evenly over the drain time (`drain`).

use crate::cluster::driver::Driver;
use crate::cluster::{Cluster, ClusterConfig};
use crate::codec::Vsn;
use crate::config::Config;
use crate::http::ClientConn;
use crate::index::LocalIndex;
use crate::metrics::Metrics;
use crate::{Gateway, admin, api, auth, drain, http, session, ws};
use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use ringcast_ring::watcher;
use ringcast_topic_server::process::Shutdown;
use ringcast_topic_server::{Ownership, ServiceLimits, TopicService};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
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

/// The gateway's listeners: bound by the caller (the binary, or a test on port 0).
#[derive(Debug)]
pub struct Listeners {
    /// Websockets (`/socket/websocket`) and `/health`: `GATEWAY_LISTEN`.
    pub public: TcpListener,
    /// `/status`, `/metrics`, `/health/*`, `/ring`: `GATEWAY_ADMIN_LISTEN`.
    pub admin: TcpListener,
    /// The backend API (`/api/...`): `GATEWAY_API_LISTEN`, if set.
    pub api: Option<TcpListener>,
}

impl Listeners {
    /// Binds all three on ephemeral loopback ports (tests, embedding).
    pub async fn loopback() -> std::io::Result<Listeners> {
        Ok(Listeners {
            public: TcpListener::bind("127.0.0.1:0").await?,
            admin: TcpListener::bind("127.0.0.1:0").await?,
            api: Some(TcpListener::bind("127.0.0.1:0").await?),
        })
    }
}

/// After a second SIGTERM, how long the connections cut at once have to write their close
/// frames.
const CLOSE_FRAMES_WITHIN: Duration = Duration::from_secs(1);
/// How long the admin and API listeners' open calls have to finish at shutdown (an API call
/// waits for its answer at most [`api::ANSWER_WITHIN`]).
const LISTENERS_WITHIN: Duration = api::ANSWER_WITHIN.saturating_add(Duration::from_secs(1));

/// Serves until `shutdown.drain` is cancelled, then drains: readiness fails, the public
/// listener closes, connections are closed (1012) evenly over the drain time (all at once
/// if `shutdown.now` is cancelled), and the process stops once they are gone or the grace
/// period after the drain has passed.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Into<Shutdown>,
) -> anyhow::Result<()> {
    let Shutdown {
        drain: shutdown,
        now,
    } = shutdown.into();
    let Listeners {
        public: listener,
        admin: admin_listener,
        api: api_listener,
    } = listeners;
    // The admin and API listeners outlive the drain (readiness says "draining").
    let stopped = CancellationToken::new();
    let conns = Arc::new(crate::conn::Registry::default());
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
        secret: config.cluster_secret.clone(),
    };
    let (cluster, events) = Cluster::start(
        cluster_config,
        index.clone(),
        metrics.clone(),
        conns.clone(),
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
    let (grace, drain_time) = (config.shutdown_grace, config.drain);
    let gateway = Arc::new(Gateway {
        config,
        cluster,
        ring_watch,
        index,
        metrics,
        next_sub: AtomicU64::new(1),
        next_conn: AtomicU64::new(1),
        shutdown: shutdown.clone(),
        conns,
        security_log: crate::limits::LogLimit::new(10, 50),
    });
    tracing::info!(
        addr = %listener.local_addr()?,
        admin = %admin_listener.local_addr()?,
        api = ?api_listener.as_ref().and_then(|l| l.local_addr().ok()),
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
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/",
            get(|| async { "ringcast gateway: connect to /socket/websocket?vsn=2.0.0\n" }),
        )
        .with_state(state);
    let admin = axum::serve(admin_listener, admin::router(gateway.clone()))
        .with_graceful_shutdown(stopped.clone().cancelled_owned());
    let admin = tokio::spawn(async move { admin.await });
    let api = api_listener.map(|api_listener| {
        let api = axum::serve(api_listener, api::router(gateway.clone()))
            .with_graceful_shutdown(stopped.clone().cancelled_owned());
        tokio::spawn(async move { api.await })
    });
    http::serve(listener, app, gateway.clone(), shutdown.clone()).await;

    // The drain: not ready, no new websockets (the listener is closed), then every
    // connection closed with 1012, evenly over the drain time.
    let open = gateway.conns.close();
    tokio::select! {
        () = drain::drain(open, drain_time, now.clone(), &gateway.metrics) => {}
        // Every connection left by itself before its turn.
        () = async { tracker.close(); tracker.wait().await } => {}
    }
    tracker.close();
    tokio::select! {
        result = tokio::time::timeout(grace, tracker.wait()) => if result.is_err() {
            tracing::warn!("connections did not close within the grace period");
        },
        () = now.cancelled() => {
            // Cut all at once: a moment for their close frames to go out.
            let _ = tokio::time::timeout(CLOSE_FRAMES_WITHIN, tracker.wait()).await;
        }
    }
    stopped.cancel();
    for (name, listener) in [("admin", Some(admin)), ("api", api)] {
        let Some(mut task) = listener else { continue };
        // In-flight calls finish, within a bound.
        match tokio::time::timeout(LISTENERS_WITHIN, &mut task).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "{name} listener failed"),
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("{name} listener: calls still open at shutdown, cut");
                task.abort();
            }
        }
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
    let Some(client) = request.extensions().get::<ClientConn>().cloned() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let vsn = match Vsn::from_query(params.get("vsn").map(String::as_str)) {
        Ok(vsn) => vsn,
        Err(reason) => return (StatusCode::FORBIDDEN, reason).into_response(),
    };
    let handshake = match ws::Handshake::check(request.headers(), &["phoenix"]) {
        Ok(handshake) => handshake,
        Err(rejection) => return rejection.into_response(),
    };
    let gateway = &state.gateway;
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
    };
    if !auth::origin_allowed(
        header(axum::http::header::ORIGIN),
        &gateway.config.allowed_origins,
    ) {
        Metrics::inc(&gateway.metrics.refused_connections);
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let protocols = header(axum::http::header::SEC_WEBSOCKET_PROTOCOL).unwrap_or_default();
    let token = auth::token_of(params.get("token").map(String::as_str), protocols);
    let identity = match gateway.config.auth.connect(token.as_deref()) {
        Ok(identity) => identity,
        Err(e) => {
            Metrics::inc(&gateway.metrics.refused_connections);
            if let Some(suppressed) = gateway.security_log.allow(tokio::time::Instant::now()) {
                tracing::warn!(peer = %client.peer, reason = %e, suppressed, "refusing a connection token");
            }
            return (StatusCode::FORBIDDEN, e.to_string()).into_response();
        }
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
        session::serve(socket, vsn, gateway, client.peer, identity).await;
        metrics.connections.fetch_sub(1, Relaxed);
        drop(permit);
        drop(client);
    }));
    handshake.response()
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
