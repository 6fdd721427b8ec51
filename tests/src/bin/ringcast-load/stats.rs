//! Latency and count recording for the load generator: one recorder per worker thread
//! (uncontended locks), merged per ramp step.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Nanoseconds since the generator started (one clock for publishers and subscribers).
pub fn now_nanos() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Default)]
struct Local {
    steps: Vec<Option<(Histogram<u64>, u64)>>,
}

static REGISTRY: Mutex<Vec<Arc<Mutex<Local>>>> = Mutex::new(Vec::new());
static CLOSED: AtomicU64 = AtomicU64::new(0);
static CLOSE_CODES: Mutex<Vec<Option<u16>>> = Mutex::new(Vec::new());

thread_local! {
    static LOCAL: Arc<Mutex<Local>> = {
        let local = Arc::new(Mutex::new(Local::default()));
        REGISTRY.lock().push(local.clone());
        local
    };
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Records one delivery of ramp step `step`, sent at `sent` (ns).
pub fn record(step: usize, sent: u64) {
    let latency_us = (now_nanos().saturating_sub(sent) / 1000).max(1);
    LOCAL.with(|local| {
        let mut local = local.lock();
        if local.steps.len() <= step {
            local.steps.resize_with(step + 1, || None);
        }
        let (hist, count) = local.steps[step].get_or_insert_with(|| (histogram(), 0));
        hist.saturating_record(latency_us);
        *count += 1;
    });
}

/// A subscriber connection ended (with its close code, if any).
pub fn closed(code: Option<u16>) {
    CLOSED.fetch_add(1, Relaxed);
    CLOSE_CODES.lock().push(code);
}

pub fn closed_count() -> u64 {
    CLOSED.load(Relaxed)
}

pub fn close_codes() -> Vec<Option<u16>> {
    CLOSE_CODES.lock().clone()
}

/// Deliveries recorded so far for `step`, over all threads.
pub fn count(step: usize) -> u64 {
    REGISTRY
        .lock()
        .iter()
        .map(|l| {
            l.lock()
                .steps
                .get(step)
                .and_then(|s| s.as_ref())
                .map_or(0, |(_, c)| *c)
        })
        .sum()
}

/// The merged latency histogram (microseconds) of `step`.
pub fn merged(step: usize) -> Histogram<u64> {
    let mut all = histogram();
    for local in REGISTRY.lock().iter() {
        if let Some(Some((hist, _))) = local.lock().steps.get(step) {
            all.add(hist).expect("same bounds");
        }
    }
    all
}
