//! A gentle drain: at SIGTERM a gateway closes its connections (1012) a few at a time, evenly
//! over `GATEWAY_DRAIN_SECS`, so that their clients reconnect to the other gateways spread
//! out, not all in the same instant (phoenix.js's reconnect backoff has no jitter).

use crate::conn::{ConnHandle, Cut};
use crate::metrics::Metrics;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Connections leave at every tick of this.
pub const TICK: Duration = Duration::from_millis(50);

/// How many of `n` connections should have left `elapsed` into a drain over `over`: the
/// share of the time passed by the end of the current tick, so a late tick catches up and
/// the last ones go a tick before `over` is up (all at once when `over` is shorter than a
/// tick).
pub fn due(n: usize, elapsed: Duration, over: Duration) -> usize {
    let ahead = elapsed + TICK;
    if ahead >= over {
        return n;
    }
    let share = n as u128 * ahead.as_micros();
    share.div_ceil(over.as_micros()) as usize
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
    tracing::info!(
        connections = n,
        seconds = over.as_secs_f64(),
        per_second = n as f64 / over.as_secs_f64().max(TICK.as_secs_f64()),
        "draining: closing connections (1012) evenly; SIGTERM again to close them all now"
    );
    let start = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval(TICK);
    let mut done = 0;
    while done < n {
        let hurry = tokio::select! {
            _ = ticks.tick() => false,
            _ = now.cancelled() => true,
        };
        let upto = match hurry {
            true => {
                tracing::info!("closing the remaining connections now");
                n
            }
            false => due(n, start.elapsed(), over).clamp(done + 1, n),
        };
        // Counted once: a connection cut already (it left, or its user was disconnected) is
        // not drained.
        let cut = conns[done..upto]
            .iter()
            .filter(|conn| conn.cut(Cut::Shutdown))
            .count();
        Metrics::add(&metrics.drained, cut as u64);
        done = upto;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_leave_evenly_whatever_their_number() {
        let ten = Duration::from_secs(10);
        let at = Duration::from_millis;
        assert_eq!(due(0, at(0), ten), 0);
        assert_eq!(due(7, at(0), ten), 1, "a few: the first at once");
        assert_eq!(due(7, at(5000), ten), 4);
        assert_eq!(due(2000, at(0), ten), 10, "200 ticks of 10");
        assert_eq!(due(2000, at(4950), ten), 1000, "half by half time");
        assert_eq!(due(2000, at(730), ten), 156, "a late tick catches up");
        assert_eq!(due(100_000, at(0), ten), 500);
        assert_eq!(due(2000, at(9950), ten), 2000, "all by the last tick");
        assert_eq!(
            due(2000, at(0), Duration::ZERO),
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
        // One left (its user was disconnected) before its turn: not counted as drained.
        assert!(handles[30].cut(Cut::Disconnected));
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
        assert_eq!(cut, 20 + 1, "and the one that left; {:?}", start.elapsed());
        now.cancel();
        drain.await;
        assert!(
            (handles.iter().enumerate())
                .all(|(i, c)| i == 30 || c.cut_reason() == Some(Cut::Shutdown))
        );
        assert_eq!(
            metrics.drained.load(std::sync::atomic::Ordering::Relaxed),
            39
        );
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "the rest at once"
        );
    }
}
