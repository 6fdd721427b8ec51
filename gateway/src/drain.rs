//! A gentle drain: at SIGTERM a gateway closes its connections (1012) a few at a time, evenly
//! over `GATEWAY_DRAIN_SECS`, so that their clients reconnect to the other gateways spread
//! out, not all in the same instant (phoenix.js's reconnect backoff has no jitter).

use crate::conn::{ConnHandle, Cut};
use crate::metrics::Metrics;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Connections leave at every tick of this.
pub const TICK: Duration = Duration::from_millis(50);

/// How many connections leave at each tick to close `n` evenly over `over` (all at once when
/// `over` is shorter than a tick).
pub fn per_tick(n: usize, over: Duration) -> usize {
    let ticks = (over.as_millis() / TICK.as_millis()).max(1) as usize;
    n.div_ceil(ticks).max(1)
}

/// Cuts `conns` evenly over `over`; the rest at once when `now` is cancelled. Returns when
/// every one has been cut (their tasks then write the close frames).
pub async fn drain(
    conns: Vec<ConnHandle>,
    over: Duration,
    now: CancellationToken,
    metrics: &Metrics,
) {
    let n = conns.len();
    let per_tick = per_tick(n, over);
    tracing::info!(
        connections = n,
        seconds = over.as_secs_f64(),
        per_second = (per_tick as f64 / TICK.as_secs_f64()).min(n as f64),
        "draining: closing connections (1012) evenly; SIGTERM again to close them all now"
    );
    let mut ticks = tokio::time::interval(TICK);
    let mut batches = conns.chunks(per_tick);
    while let Some(batch) = batches.next() {
        let hurry = tokio::select! {
            _ = ticks.tick() => false,
            _ = now.cancelled() => true,
        };
        let rest: Vec<&ConnHandle> = if hurry {
            tracing::info!("closing the remaining connections now");
            batch.iter().chain(batches.by_ref().flatten()).collect()
        } else {
            batch.iter().collect()
        };
        for conn in &rest {
            conn.cut(Cut::Shutdown);
        }
        Metrics::add(&metrics.drained, rest.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_leave_evenly_whatever_their_number() {
        let ten = Duration::from_secs(10);
        assert_eq!(per_tick(0, ten), 1);
        assert_eq!(per_tick(7, ten), 1, "a few: one per tick");
        assert_eq!(per_tick(2000, ten), 10, "200 ticks of 10");
        assert_eq!(per_tick(100_000, ten), 500);
        assert_eq!(
            per_tick(2000, Duration::ZERO),
            2000,
            "no drain time: all at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_spreads_the_cuts_and_a_second_signal_cuts_the_rest() {
        let conns: Vec<_> = (0..40).map(|id| ConnHandle::new(id, 4)).collect();
        let handles: Vec<ConnHandle> = conns.iter().map(|(c, _)| c.clone()).collect();
        let now = CancellationToken::new();
        let metrics = Metrics::default();
        let start = tokio::time::Instant::now();
        let drain = drain(
            handles.clone(),
            Duration::from_secs(1),
            now.clone(),
            &metrics,
        );
        tokio::pin!(drain);
        // 20 ticks of 2: after half the time, about half are cut.
        tokio::select! {
            _ = &mut drain => panic!("finished early"),
            _ = tokio::time::sleep(Duration::from_millis(475)) => {}
        }
        let cut = handles.iter().filter(|c| c.cut_reason().is_some()).count();
        assert_eq!(cut, 20, "{:?}", start.elapsed());
        now.cancel();
        drain.await;
        assert!(
            handles
                .iter()
                .all(|c| c.cut_reason() == Some(Cut::Shutdown))
        );
        assert_eq!(
            metrics.drained.load(std::sync::atomic::Ordering::Relaxed),
            40
        );
    }
}
