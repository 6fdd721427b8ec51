//! The backend API (`GATEWAY_API_LISTEN`): what a backend calls instead of posing as a
//! websocket client. Every call needs `Authorization: Bearer <key>` with one of
//! `GATEWAY_API_KEYS`; any gateway serves any topic (the call goes to the topic's owner).
//!
//! - `POST /api/publish` `{"topic", "event", "payload", "idempotency_key"?}`: the position
//!   the owner gave the message (a repeated key: the first one's).
//! - `POST /api/broadcast` `{"topics": [...], "event", "payload", "idempotency_key"?}`: one
//!   answer per topic.
//! - `GET /api/history?topic=&epoch=&since_offset=&limit=`: the topic's log after a position
//!   (all of it or nothing, as a recovery), or from its start.
//! - `GET /api/topic?topic=`: the owner, the subscribers, the position.
//! - `POST /api/disconnect` `{"sub"}`: closes that user's sockets on every gateway (1008).
//! - `GET /api/presence?topic=`: the topic's presence, as `presence_state` shows it;
//!   `GET /api/presence_stats?topic=`: its members and distinct keys.
//!
//! Errors are `{"error": {"code", "message"}}` with the matching HTTP status.

use crate::Gateway;
use crate::cluster::request::{Answer, Api, ApiReply, Ask, Publish, Reply};
use crate::codec;
use crate::config::MAX_EVENT_BYTES;
use crate::index::Position;
use crate::metrics::Metrics;
use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// The longest an API call waits for the topic's owner (its requests are retried for up to
/// ten seconds while a ring changes or a node comes back).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(15);
/// Topics one broadcast may name at most.
pub const MAX_BROADCAST_TOPICS: usize = 1000;
/// Messages one history call returns at most (and by default).
pub const MAX_HISTORY: u32 = 1000;
const DEFAULT_HISTORY: u32 = 100;

/// The API endpoints, behind the key check.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/api/publish", post(publish))
        .route("/api/broadcast", post(broadcast))
        .route("/api/history", get(history))
        .route("/api/topic", get(topic_info))
        .route("/api/disconnect", post(disconnect))
        .route("/api/presence", get(presence))
        .route("/api/presence_stats", get(presence_stats))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "wrong method for this endpoint",
            )
        })
        .layer(middleware::from_fn_with_state(gateway.clone(), authorize))
        .with_state(gateway)
}

/// An API error: the status, a stable code, and a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// More fields of the error object (the position, for an unrecoverable history).
    extra: Option<Value>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
        }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A topic server's refusal (or the cluster's): unavailable, busy or full is worth a
    /// retry (503); anything else is the request's fault.
    fn refused(reason: String) -> ApiError {
        match reason.as_str() {
            "unavailable" | "busy" | "too many topics" => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", reason)
            }
            _ => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "refused", reason),
        }
    }

    fn body(&self) -> Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(Value::Object(extra)) = &self.extra {
            for (k, v) in extra {
                error[k] = v.clone();
            }
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
        }
        response
    }
}

type ApiResult = Result<axum::Json<Value>, ApiError>;

/// Lets a call through only with one of the configured keys; counts every answer.
async fn authorize(State(g): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let response = match bearer(request.headers()) {
        Some(key) if key_allowed(key, &g.config.api_keys) => next.run(request).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown API key")
            .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an API key is required: Authorization: Bearer <key>",
        )
        .into_response(),
    };
    let counter = if response.status().is_success() {
        &g.metrics.api_requests
    } else {
        &g.metrics.api_refused
    };
    Metrics::inc(counter);
    response
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Whether `key` is one of `keys`, compared in constant time (each key is looked at).
fn key_allowed(key: &str, keys: &[String]) -> bool {
    keys.iter().fold(false, |found, k| {
        found | ringcast_proto::auth::same_secret(key.as_bytes(), k.as_bytes())
    })
}

/// Reads a JSON body of at most `limit` bytes, unknown fields refused.
async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        // axum's limit error says so; anything else is a body that could not be read.
        if format!("{e:#}").contains("length limit") {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is larger than {limit} bytes"),
            )
        } else {
            ApiError::bad(format!("cannot read the body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

/// Bodies carry one payload of at most `GATEWAY_MAX_FRAME_BYTES`, and a broadcast's topics.
fn body_limit(g: &Gateway) -> usize {
    g.config.max_frame_bytes + MAX_BROADCAST_TOPICS * (g.config.max_topic_bytes + 8) + 4096
}

fn check_topic(g: &Gateway, topic: &str) -> Result<(), ApiError> {
    if topic.is_empty() || topic == "phoenix" {
        return Err(ApiError::bad("topic: a topic name is required"));
    }
    if topic.len() > g.config.max_topic_bytes {
        return Err(ApiError::bad(format!(
            "topic: longer than {} bytes (GATEWAY_MAX_TOPIC_BYTES)",
            g.config.max_topic_bytes
        )));
    }
    if !g.config.topic_allowed(topic) {
        return Err(ApiError::bad("topic: not allowed by GATEWAY_TOPICS"));
    }
    Ok(())
}

/// The event name and the payload (compact JSON text) of a publish.
fn message(g: &Gateway, event: &str, payload: &RawValue) -> Result<bytes::Bytes, ApiError> {
    if event.is_empty() || event.len() > MAX_EVENT_BYTES {
        return Err(ApiError::bad(format!(
            "event: 1 to {MAX_EVENT_BYTES} bytes"
        )));
    }
    if crate::session::reserved_event(event) {
        return Err(ApiError::bad(
            "event: phx_ and chan_reply_ events are reserved",
        ));
    }
    let payload = codec::compact(payload.get());
    if payload.len() > g.config.max_frame_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "payload: larger than {} bytes (GATEWAY_MAX_FRAME_BYTES)",
                g.config.max_frame_bytes
            ),
        ));
    }
    Ok(bytes::Bytes::from(payload.into_owned()))
}

fn check_key(key: &Option<String>) -> Result<(), ApiError> {
    match key {
        Some(key) if key.is_empty() || key.len() > 256 => {
            Err(ApiError::bad("idempotency_key: 1 to 256 bytes"))
        }
        _ => Ok(()),
    }
}

fn epoch_text(epoch: u64) -> String {
    format!("{epoch:016x}")
}

/// Waits for the topic server's answer, until [`ANSWER_WITHIN`] from now.
async fn answer(rx: oneshot::Receiver<Result<Answer, String>>) -> Result<Answer, ApiError> {
    answer_by(rx, tokio::time::Instant::now() + ANSWER_WITHIN).await
}

/// Waits for the topic server's answer until `deadline` (one deadline for every answer a
/// call waits for).
async fn answer_by(
    rx: oneshot::Receiver<Result<Answer, String>>,
    deadline: tokio::time::Instant,
) -> Result<Answer, ApiError> {
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(Ok(answer))) => Ok(answer),
        Ok(Ok(Err(reason))) => Err(ApiError::refused(reason)),
        Ok(Err(_)) => Err(ApiError::refused("unavailable".into())),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the topic's owner did not answer in time",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    topic: String,
    event: String,
    payload: Box<RawValue>,
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    topics: Vec<String>,
    event: String,
    payload: Box<RawValue>,
    idempotency_key: Option<String>,
}

/// Sends one publish to its topic's owner; the answer arrives on the returned receiver.
fn send_publish(
    g: &Gateway,
    topic: String,
    event: String,
    payload: bytes::Bytes,
    idempotency_key: Option<String>,
) -> oneshot::Receiver<Result<Answer, String>> {
    let (tx, rx) = oneshot::channel();
    let publish = Publish {
        reply: Reply::Api(tx),
        topic,
        event,
        payload,
        idempotency_key,
    };
    if let Err(publish) = g.cluster.publish(publish) {
        publish.reply.refuse("unavailable".into());
    }
    rx
}

fn published(answer: Answer) -> Result<Value, ApiError> {
    match answer {
        Answer::Published(at) => Ok(json!({"epoch": epoch_text(at.epoch), "offset": at.offset})),
        _ => Err(ApiError::refused("unexpected answer".into())),
    }
}

async fn publish(State(g): State<Arc<Gateway>>, request: Request) -> ApiResult {
    let body: PublishBody = read_json(request.into_body(), body_limit(&g)).await?;
    check_topic(&g, &body.topic)?;
    check_key(&body.idempotency_key)?;
    let payload = message(&g, &body.event, &body.payload)?;
    let rx = send_publish(&g, body.topic, body.event, payload, body.idempotency_key);
    Ok(axum::Json(published(answer(rx).await?)?))
}

async fn broadcast(State(g): State<Arc<Gateway>>, request: Request) -> ApiResult {
    let body: BroadcastBody = read_json(request.into_body(), body_limit(&g)).await?;
    if body.topics.is_empty() || body.topics.len() > MAX_BROADCAST_TOPICS {
        return Err(ApiError::bad(format!(
            "topics: 1 to {MAX_BROADCAST_TOPICS} topics"
        )));
    }
    for topic in &body.topics {
        check_topic(&g, topic)?;
    }
    check_key(&body.idempotency_key)?;
    let payload = message(&g, &body.event, &body.payload)?;
    // Sent to every owner at once, answered in the order given.
    let waiting: Vec<_> = body
        .topics
        .iter()
        .map(|topic| {
            let rx = send_publish(
                &g,
                topic.clone(),
                body.event.clone(),
                payload.clone(),
                body.idempotency_key.clone(),
            );
            (topic, rx)
        })
        .collect();
    let mut results = Vec::with_capacity(waiting.len());
    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    for (topic, rx) in waiting {
        let mut result = match answer_by(rx, deadline).await.and_then(published) {
            Ok(position) => position,
            Err(e) => e.body(),
        };
        result["topic"] = json!(topic);
        results.push(result);
    }
    Ok(axum::Json(json!({ "results": results })))
}

/// Sends a read of `topic` to its owner.
fn send_read(g: &Gateway, topic: String, ask: Ask) -> oneshot::Receiver<Result<Answer, String>> {
    let (tx, rx): (ApiReply, _) = oneshot::channel();
    if let Err(api) = g.cluster.ask(Api::new(topic, ask, tx)) {
        api.refuse("unavailable".into());
    }
    rx
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    topic: String,
    epoch: Option<String>,
    since_offset: Option<u64>,
    limit: Option<u32>,
}

async fn history(
    State(g): State<Arc<Gateway>>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    check_topic(&g, &q.topic)?;
    let limit = q.limit.unwrap_or(DEFAULT_HISTORY);
    if limit == 0 || limit > MAX_HISTORY {
        return Err(ApiError::bad(format!("limit: 1 to {MAX_HISTORY}")));
    }
    let since = match (&q.epoch, q.since_offset) {
        (Some(epoch), Some(offset)) => {
            let epoch = u64::from_str_radix(epoch, 16)
                .map_err(|_| ApiError::bad("epoch: the hex epoch of a position"))?;
            Some(Position { epoch, offset })
        }
        (None, None) => None,
        _ => return Err(ApiError::bad("epoch and since_offset go together")),
    };
    let rx = send_read(&g, q.topic.clone(), Ask::History { since, limit });
    let Answer::History {
        at,
        complete,
        messages,
    } = answer(rx).await?
    else {
        return Err(ApiError::refused("unexpected answer".into()));
    };
    if at.epoch == 0 {
        return Err(ApiError::not_found(format!("no topic {:?}", q.topic)));
    }
    if !complete {
        let mut error = ApiError::new(
            StatusCode::CONFLICT,
            "unrecoverable_position",
            "the log no longer holds every message after that position (or it is of another epoch): reload from your source of truth; epoch and offset are the topic's position now",
        );
        error.extra = Some(json!({"epoch": epoch_text(at.epoch), "offset": at.offset}));
        return Err(error);
    }
    // Payloads go out as they were published (no re-parse: a payload nested deeper than a
    // JSON value may be is still a payload).
    let messages: Vec<HistoryMessage<'_>> = messages
        .iter()
        .map(|m| HistoryMessage {
            offset: m.offset,
            event: &m.event,
            payload: raw_json(&m.payload),
        })
        .collect();
    let answer = HistoryAnswer {
        topic: &q.topic,
        epoch: epoch_text(at.epoch),
        offset: at.offset,
        messages,
    };
    // Serialized straight to the body: the payloads are written as they are.
    Ok(axum::Json(answer).into_response())
}

#[derive(serde::Serialize)]
struct HistoryMessage<'a> {
    offset: u64,
    event: &'a str,
    payload: Box<RawValue>,
}

#[derive(serde::Serialize)]
struct HistoryAnswer<'a> {
    topic: &'a str,
    epoch: String,
    offset: u64,
    messages: Vec<HistoryMessage<'a>>,
}

/// Stored JSON text as it is (`null` if a topic server sent something that is not JSON).
fn raw_json(bytes: &[u8]) -> Box<RawValue> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| RawValue::from_string(text.to_owned()).ok())
        .unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is JSON"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicQuery {
    topic: String,
}

async fn topic_info(
    State(g): State<Arc<Gateway>>,
    query: Result<Query<TopicQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let (topic, info, owner) = presence_info(&g, query, false).await?;
    Ok(axum::Json(json!({
        "topic": topic,
        "owner": &*owner,
        "epoch": epoch_text(info.epoch),
        "offset": info.offset,
        "subscribers": info.subscribers,
        "gateways": info.gateways,
        "log_messages": info.log_messages,
    })))
}

/// The owner's answer about `topic`'s presence (404 if the topic is not held).
async fn presence_info(
    g: &Gateway,
    query: Result<Query<TopicQuery>, axum::extract::rejection::QueryRejection>,
    state: bool,
) -> Result<(String, ringcast_proto::TopicInfo, Arc<str>), ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    check_topic(g, &q.topic)?;
    let rx = send_read(g, q.topic.clone(), Ask::Inspect { presence: state });
    let Answer::Info { info, node } = answer(rx).await? else {
        return Err(ApiError::refused("unexpected answer".into()));
    };
    if !info.exists {
        return Err(ApiError::not_found(format!("no topic {:?}", q.topic)));
    }
    Ok((q.topic, info, node))
}

async fn presence(
    State(g): State<Arc<Gateway>>,
    query: Result<Query<TopicQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let (topic, info, _) = presence_info(&g, query, true).await?;
    if info.presence.is_empty() && info.presence_members > 0 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_many_members",
            format!(
                "{} members: too many to list (TOPIC_SERVER_PRESENCE_LIST_MAX); ask /api/presence_stats",
                info.presence_members
            ),
        ));
    }
    #[derive(serde::Serialize)]
    struct PresenceAnswer {
        topic: String,
        presence: Box<RawValue>,
    }
    let presence = match info.presence.is_empty() {
        true => RawValue::from_string("{}".into()).expect("{} is JSON"),
        false => raw_json(&info.presence),
    };
    Ok(axum::Json(PresenceAnswer { topic, presence }).into_response())
}

async fn presence_stats(
    State(g): State<Arc<Gateway>>,
    query: Result<Query<TopicQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let (topic, info, _) = presence_info(&g, query, false).await?;
    Ok(axum::Json(json!({
        "topic": topic,
        "members": info.presence_members,
        "keys": info.presence_keys,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    sub: String,
}

async fn disconnect(State(g): State<Arc<Gateway>>, request: Request) -> ApiResult {
    let body: DisconnectBody = read_json(request.into_body(), body_limit(&g)).await?;
    if body.sub.is_empty() || body.sub.len() > 1024 {
        return Err(ApiError::bad("sub: 1 to 1024 bytes"));
    }
    // This gateway's own sockets go at once; every topic server tells every gateway attached
    // to it: one that answers is enough for the gateways linked to it; asking all covers a
    // gateway that lost one link.
    let here = g.conns.disconnect_user(&body.sub);
    Metrics::add(&g.metrics.disconnected, here as u64);
    let waiting: Vec<_> = g
        .cluster
        .links()
        .into_iter()
        .map(|link| {
            let (tx, rx): (ApiReply, _) = oneshot::channel();
            let ask = Ask::Disconnect {
                sub: body.sub.clone(),
            };
            if let Err(api) = g.cluster.ask_at(&link, Api::new(String::new(), ask, tx)) {
                api.refuse("unavailable".into());
            }
            rx
        })
        .collect();
    let asked = waiting.len();
    let mut told = 0;
    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    for rx in waiting {
        if matches!(answer_by(rx, deadline).await, Ok(Answer::Disconnected)) {
            told += 1;
        }
    }
    if told == 0 && asked > 0 {
        return Err(ApiError::refused("unavailable".into()));
    }
    Ok(axum::Json(json!({
        "sub": body.sub,
        "topic_servers": told,
        "topic_servers_asked": asked,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_configured_bearer_key_passes() {
        let keys = vec!["0123456789abcdef".to_owned(), "fedcba9876543210".to_owned()];
        assert!(key_allowed("fedcba9876543210", &keys));
        assert!(!key_allowed("fedcba987654321", &keys));
        assert!(!key_allowed("", &keys));
        assert!(!key_allowed("0123456789abcdef", &[]));
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, "bearer  k1 ".parse().unwrap());
        assert_eq!(bearer(&headers), Some("k1"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn errors_carry_a_code_a_message_and_extra_fields() {
        let mut e = ApiError::new(StatusCode::CONFLICT, "unrecoverable_position", "gone");
        e.extra = Some(json!({"offset": 4}));
        assert_eq!(
            e.body(),
            json!({"error": {"code": "unrecoverable_position", "message": "gone", "offset": 4}})
        );
        assert_eq!(
            ApiError::refused("unavailable".into()).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ApiError::refused("unauthorized".into()).status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}
