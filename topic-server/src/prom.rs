//! Prometheus exposition shared by both binaries (`GET /metrics` on the admin listeners),
//! through `prometheus-client`: histograms are registered as they are; the counters and
//! gauges that `/status` shows are read at each scrape from the same values, by a
//! [`Collector`] over a list of [`Value`]s, so the two never disagree.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// One number read at scrape time.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    /// Only goes up; exposed as `<name>_total`.
    Counter(&'static str, &'static str, u64),
    Gauge(&'static str, &'static str, i64),
}

/// Reads the values at each scrape.
pub struct Values<F>(pub F);

impl<F> std::fmt::Debug for Values<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Values")
    }
}

impl<F> Collector for Values<F>
where
    F: Fn() -> Vec<Value> + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for value in (self.0)() {
            match value {
                Value::Counter(name, help, v) => {
                    let counter = ConstCounter::new(v);
                    let metric =
                        encoder.encode_descriptor(name, help, None, counter.metric_type())?;
                    counter.encode(metric)?;
                }
                Value::Gauge(name, help, v) => {
                    let gauge = ConstGauge::new(v);
                    let metric =
                        encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                    gauge.encode(metric)?;
                }
            }
        }
        Ok(())
    }
}

/// Latencies from 100 µs to about 26 s (seconds, doubling).
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// Counts from 1 to about 262,000 (quadrupling): replay sizes.
pub fn count_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 10))
}

/// A registry with metrics named `ringcast_<prefix>_...`.
pub fn registry(prefix: &str) -> Registry {
    Registry::with_prefix(format!("ringcast_{prefix}"))
}

/// Registers `histogram` (seconds or a count, named with its unit).
pub fn register_histogram(registry: &mut Registry, name: &str, help: &str, histogram: &Histogram) {
    registry.register(name, help, histogram.clone());
}

/// `GET /metrics`: the registry in the OpenMetrics text format (which Prometheus reads).
pub fn render(registry: &Arc<Registry>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

/// `GET /health/ready`: 200 `{"ready": true}`, or 503 with the reason.
pub fn readiness(not_ready: Option<String>) -> Response {
    match not_ready {
        None => axum::Json(serde_json::json!({"ready": true})).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"ready": false, "reason": reason})),
        )
            .into_response(),
    }
}

/// 1 while the ring file in place is refused (`ring_refused` in `/status` says why).
pub fn ring_refused(refused: bool) -> Value {
    Value::Gauge(
        "ring_refused",
        "1 while the ring file in place is refused (the ring in force stays).",
        i64::from(refused),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_histograms_are_encoded_with_their_names() {
        let mut registry = registry("test");
        let latency = seconds_histogram();
        latency.observe(0.003);
        register_histogram(&mut registry, "join_latency_seconds", "joins", &latency);
        registry.register_collector(Box::new(Values(|| {
            vec![
                Value::Counter("joins", "joins made", 7),
                Value::Gauge("connections", "open now", 3),
            ]
        })));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("ringcast_test_joins_total 7"), "{text}");
        assert!(text.contains("ringcast_test_connections 3"), "{text}");
        assert!(
            text.contains("ringcast_test_join_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("ringcast_test_join_latency_seconds_bucket{le=\"0.0032\"} 1"),
            "{text}"
        );
    }
}
