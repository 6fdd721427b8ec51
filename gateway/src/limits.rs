//! What one client may cost: token buckets for its frame and join rates, the count of open
//! connections per IP address, and a limit on how often security events are logged.
//!
//! Plain data; the time is passed in, so tests drive it.

use crate::config::Rate;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::time::Instant;

/// A token bucket: `rate.per_sec` tokens a second, at most `rate.burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate.burst as f64,
            last: now,
        }
    }

    /// Takes a token if there is one (always, when the rate is unlimited).
    pub fn take(&mut self, now: Instant) -> bool {
        if self.rate.per_sec == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens =
            (self.tokens + elapsed * self.rate.per_sec as f64).min(self.rate.burst as f64);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Says how often a kind of log line may be written: at most `burst` at once and `per_sec`
/// after that, so that a flood of bad clients cannot fill the disk. Lines held back are
/// counted and reported with the next one written.
#[derive(Debug)]
pub struct LogLimit {
    bucket: Mutex<TokenBucket>,
    suppressed: AtomicU64,
}

impl LogLimit {
    pub fn new(per_sec: u32, burst: u32) -> Self {
        LogLimit {
            bucket: Mutex::new(TokenBucket::new(Rate { per_sec, burst }, Instant::now())),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one written)` if a line may be written now.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        if self.bucket.lock().take(now) {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

/// Open connections per client IP address.
#[derive(Debug, Default)]
pub struct PerIp {
    /// 0: no limit.
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted for its IP address, until dropped.
#[derive(Debug)]
pub struct IpSlot {
    ip: IpAddr,
    per_ip: Arc<PerIp>,
}

impl PerIp {
    pub fn new(max: usize) -> Arc<PerIp> {
        Arc::new(PerIp {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, unless it has `max` already.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        if self.max == 0 {
            return Some(IpSlot {
                ip,
                per_ip: self.clone(),
            });
        }
        let mut open = self.open.lock();
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            ip,
            per_ip: self.clone(),
        })
    }

    /// Connections open from `ip` now (counted only when there is a limit).
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open.lock().get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if self.per_ip.max == 0 {
            return;
        }
        let mut open = self.per_ip.open.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(
            Rate {
                per_sec: 10,
                burst: 5,
            },
            start,
        );
        let taken = (0..20).filter(|_| bucket.take(start)).count();
        assert_eq!(taken, 5, "the burst");
        let later = start + Duration::from_millis(300);
        let taken = (0..20).filter(|_| bucket.take(later)).count();
        assert_eq!(taken, 3, "10 a second for 0.3 s");
        let much_later = start + Duration::from_secs(60);
        let taken = (0..20).filter(|_| bucket.take(much_later)).count();
        assert_eq!(taken, 5, "never more than the burst saved up");
        let mut free = TokenBucket::new(
            Rate {
                per_sec: 0,
                burst: 1,
            },
            start,
        );
        assert!((0..10_000).all(|_| free.take(start)), "0: no limit");
    }

    #[test]
    fn log_lines_held_back_are_counted() {
        let limit = LogLimit::new(1, 2);
        let now = Instant::now();
        assert_eq!(limit.allow(now), Some(0));
        assert_eq!(limit.allow(now), Some(0));
        assert_eq!(limit.allow(now), None);
        assert_eq!(limit.allow(now), None);
        assert_eq!(limit.allow(now + Duration::from_secs(1)), Some(2));
    }

    #[test]
    fn connections_per_ip_are_counted_until_dropped() {
        let per_ip = PerIp::new(2);
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let other: IpAddr = "127.0.0.8".parse().unwrap();
        let a = per_ip.try_acquire(ip).unwrap();
        let _b = per_ip.try_acquire(ip).unwrap();
        assert!(per_ip.try_acquire(ip).is_none());
        assert!(per_ip.try_acquire(other).is_some());
        drop(a);
        assert_eq!(per_ip.open(ip), 1);
        assert!(per_ip.try_acquire(ip).is_some());
        let unlimited = PerIp::new(0);
        let slots: Vec<_> = (0..100)
            .map(|_| unlimited.try_acquire(ip).unwrap())
            .collect();
        assert_eq!(slots.len(), 100);
    }
}
