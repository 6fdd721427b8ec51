//! The topic server process: gRPC (gateways, other topic servers) on one listener; on the
//! admin listener (loopback by default) `/status`, `/metrics` (Prometheus), `/health/live`
//! and `/health/ready` (in the ring in force).
//!
//! `run` is what the binary and the tests call; it returns when `shutdown` is cancelled
//! and every gateway stream has been closed.

use crate::config::Config;
use crate::prom;
use crate::service::{Ownership, ServiceLimits, TopicService};
use axum::response::Response as HttpResponse;
use axum::{Json, Router, extract::State, routing::get};
use futures::StreamExt;
use ringcast_proto::{DownBatch, TakeReply, TakeRequest, TopicServer, TopicServerServer, UpBatch};
use ringcast_ring::watcher;
use serde_json::json;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

/// The gRPC face of [`TopicService`].
#[derive(Debug, Clone)]
pub struct GrpcTopicServer(pub TopicService);

#[tonic::async_trait]
impl TopicServer for GrpcTopicServer {
    type AttachStream = futures::stream::BoxStream<'static, Result<DownBatch, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<UpBatch>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        Ok(Response::new(
            self.0.open_link(request.into_inner()).boxed(),
        ))
    }

    async fn take(&self, request: Request<TakeRequest>) -> Result<Response<TakeReply>, Status> {
        Ok(Response::new(self.0.take(request.into_inner())))
    }
}

/// A topic server's listeners, bound by the caller (the binary, or a test on port 0).
#[derive(Debug)]
pub struct Listeners {
    /// gRPC: `TOPIC_SERVER_LISTEN`.
    pub grpc: TcpListener,
    /// `/status`: `TOPIC_SERVER_ADMIN_LISTEN`.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the admin listener on an ephemeral loopback port beside `grpc`.
    pub async fn with_loopback_admin(grpc: TcpListener) -> std::io::Result<Listeners> {
        Ok(Listeners {
            grpc,
            admin: TcpListener::bind("127.0.0.1:0").await?,
        })
    }
}

/// Serves until `shutdown` is cancelled.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Listeners {
        grpc: listener,
        admin,
    } = listeners;
    let service = TopicService::new(
        Ownership::ring(config.node_id.clone(), config.ring.clone()),
        ServiceLimits {
            stream_queue: config.stream_queue,
            log: config.log,
            max_topics: config.max_topics,
            max_held_bytes: config.max_log_total,
            peer_secret: config.cluster_secret.clone(),
            presence: config.presence,
            presence_interval: config.presence_interval,
        },
        shutdown.child_token(),
    );
    tracing::info!(addr = %listener.local_addr()?, node = %config.node_id, ring_version = config.ring.version(), "topic server listening");

    let grpc = TopicServerServer::new(GrpcTopicServer(service.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    // Every call, `Attach` and `Take` alike, must come from a member of the cluster.
    let secret = config.cluster_secret.clone();
    let grpc = InterceptedService::new(grpc, move |request: Request<()>| {
        secret.check(&request)?;
        Ok(request)
    });
    // The ring file is watched (and re-read on SIGHUP); only newer versions apply.
    let ring_watch = watcher::spawn(
        config.ring_source.clone(),
        config.ring.clone(),
        shutdown.clone(),
    );
    let (mut rings, follower) = (ring_watch.ring.clone(), service.clone());
    // Ends when the watcher does (at shutdown).
    let follow = tokio::spawn(async move {
        while rings.changed().await.is_ok() {
            let ring = rings.borrow_and_update().clone();
            follower.set_ring(ring);
        }
    });
    let mut registry = prom::registry("topic_server");
    let (values, watch) = (service.clone(), ring_watch.clone());
    registry.register_collector(Box::new(prom::Values(move || {
        let mut values = values.status().values();
        values.push(prom::ring_refused(watch.refused().is_some()));
        values
    })));
    let admin_routes = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route(
            "/health/live",
            get(|| async { Json(json!({"live": true})) }),
        )
        .route("/health/ready", get(ready))
        .with_state(StatusState {
            service: service.clone(),
            ring_watch,
            registry: Arc::new(registry),
        });
    tracing::info!(admin = %admin.local_addr()?, "admin listening");
    let admin = tokio::spawn(
        axum::serve(admin, admin_routes)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );

    let stopping = shutdown.clone();
    let closer = service.clone();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive))
        .http2_keepalive_timeout(Some(config.keepalive))
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(8 * 1024 * 1024))
        .add_service(grpc)
        // Tonic applies `tcp_nodelay` only to listeners it binds itself: without it, Nagle
        // holds a small write back until the gateway's next packet acknowledges the last
        // (up to one publish interval of added latency on every delivery).
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                stopping.cancelled().await;
                if closer.in_ring() {
                    tracing::warn!(
                        "stopping while in the ring: gateways error this node's channels now; \
                         to move its topics without loss, remove it from the ring first and stop \
                         it once its handoffs are done (README: removing a node)"
                    );
                }
                // Long-lived gateway streams would hold graceful shutdown open: end them.
                closer.close_all().await;
            },
        );
    server.await?;
    follow.abort();
    if let Ok(Err(e)) = admin.await {
        tracing::warn!(error = %e, "admin listener failed");
    }
    tracing::info!("topic server stopped");
    Ok(())
}

#[derive(Clone)]
struct StatusState {
    service: TopicService,
    ring_watch: watcher::RingWatch,
    registry: Arc<prometheus_client::registry::Registry>,
}

async fn metrics(State(state): State<StatusState>) -> HttpResponse {
    prom::render(&state.registry)
}

async fn ready(State(state): State<StatusState>) -> HttpResponse {
    prom::readiness(state.service.not_ready())
}

async fn status(State(state): State<StatusState>) -> Json<crate::service::StatusSnapshot> {
    let mut status = state.service.status();
    status.ring_refused = state.ring_watch.refused();
    Json(status)
}
