//! Keeps a process's ring current (feature `watch`): watches the ring file with `notify`,
//! checks it every [`POLL`] as well (editors and config-map mounts replace files in ways a
//! watch can miss), and re-reads it on SIGHUP. What to do with what was read is decided by
//! [`crate::reload::decide`]: a newer version replaces the ring, anything else is refused
//! with a log line naming the problem, and the ring in force stays.

use crate::reload::{Reload, decide};
use crate::{Ring, RingSource};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How often the ring file is re-read even without a file-system event.
pub const POLL: Duration = Duration::from_secs(2);
/// How long a file-system event is left to settle before the file is read.
const SETTLE: Duration = Duration::from_millis(50);

/// The ring in force and the last refusal, updated by the watcher task.
#[derive(Debug, Clone)]
pub struct RingWatch {
    pub ring: watch::Receiver<Arc<Ring>>,
    refused: Arc<Mutex<Option<String>>>,
}

impl RingWatch {
    /// Why the last edit was refused, if the file in place is not the ring in force.
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// Starts watching `source` (a file; a `RING_NODES` list never changes) until `shutdown`.
/// Must be called inside a tokio runtime.
pub fn spawn(source: RingSource, initial: Ring, shutdown: CancellationToken) -> RingWatch {
    let (tx, ring) = watch::channel(Arc::new(initial));
    let refused = Arc::new(Mutex::new(None));
    tokio::spawn(run(source, tx, refused.clone(), shutdown));
    RingWatch { ring, refused }
}

async fn run(
    source: RingSource,
    tx: watch::Sender<Arc<Ring>>,
    refused: Arc<Mutex<Option<String>>>,
    shutdown: CancellationToken,
) {
    // Without a handler, SIGHUP would terminate the process.
    let mut hup = signal(SignalKind::hangup())
        .inspect_err(|e| tracing::warn!(error = %e, "cannot handle SIGHUP"))
        .ok();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let _watcher = match &source {
        RingSource::File(path) => watch_dir(path, events_tx),
        RingSource::List(_) => None,
    };
    // Nothing compared yet: the first check applies an edit made since the process read
    // its ring at start.
    let mut last_read: Result<Vec<u8>, String> = Err(String::new());
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(()) = events.recv() => {
                // Let a burst of events (truncate, write, rename) settle before reading.
                tokio::time::sleep(SETTLE).await;
                while events.try_recv().is_ok() {}
                false
            }
            _ = poll.tick() => false,
            Some(()) = hangup(&mut hup) => true,
        };
        let RingSource::File(path) = &source else {
            if forced {
                tracing::info!("SIGHUP: the ring comes from RING_NODES, fixed at start");
            }
            continue;
        };
        let now = read(&source);
        if now == last_read && !forced {
            continue;
        }
        // Decide on the very bytes compared (a second read could see another write).
        let candidate = match &now {
            Ok(bytes) => String::from_utf8(bytes.clone())
                .map_err(|_| format!("RING_CONFIG {}: not UTF-8 text", path.display()))
                .and_then(|text| {
                    Ring::from_toml(&text)
                        .map_err(|e| format!("RING_CONFIG {}: {e}", path.display()))
                }),
            Err(e) => Err(format!("RING_CONFIG {}: cannot read: {e}", path.display())),
        };
        last_read = now;
        let current = tx.borrow().clone();
        match decide(&current, candidate) {
            Reload::Apply(ring) => {
                tracing::info!(path = %path.display(), from = current.version(), to = ring.version(), nodes = ring.nodes().len(), "ring reloaded");
                set(&refused, None);
                tx.send_replace(Arc::new(ring));
            }
            Reload::Unchanged => set(&refused, None),
            Reload::Refused(reason) => {
                tracing::error!(path = %path.display(), %reason, "ring config refused");
                set(&refused, Some(reason));
            }
        }
    }
}

fn set(slot: &Mutex<Option<String>>, value: Option<String>) {
    if let Ok(mut slot) = slot.lock() {
        *slot = value;
    }
}

/// The file's bytes (or the error reading it), to tell an edit from a spurious event.
fn read(source: &RingSource) -> Result<Vec<u8>, String> {
    match source {
        RingSource::File(path) => std::fs::read(path).map_err(|e| e.to_string()),
        RingSource::List(list) => Ok(list.as_bytes().to_vec()),
    }
}

async fn hangup(hup: &mut Option<Signal>) -> Option<()> {
    match hup {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// Watches the file's directory (files are often replaced, not written in place): any event
/// there triggers a re-read.
fn watch_dir(
    path: &std::path::Path,
    events: mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = events.send(());
        }
    })
    .inspect_err(
        |e| tracing::warn!(error = %e, "cannot watch the ring file; checking it every {POLL:?}"),
    )
    .ok()?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .inspect_err(|e| tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the ring file's directory; checking it every {POLL:?}"))
        .ok()?;
    Some(watcher)
}
