//! Process plumbing shared by the `topic-server` and `gateway` binaries: logging to stderr
//! with `RUST_LOG`, and shutdown tokens cancelled by Ctrl-C or SIGTERM.

use tokio_util::sync::CancellationToken;

/// Installs the tracing subscriber (`RUST_LOG`, default `info`), writing to stderr.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

/// What the signals asked for: `drain` on the first Ctrl-C or SIGTERM (stop gently), `now` on
/// the second (stop at once).
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub now: CancellationToken,
}

impl From<CancellationToken> for Shutdown {
    /// Drains when `drain` is cancelled; never asked to hurry.
    fn from(drain: CancellationToken) -> Self {
        Shutdown {
            drain,
            now: CancellationToken::new(),
        }
    }
}

/// Tokens cancelled by the first and the second Ctrl-C or SIGTERM.
pub fn shutdown_on_signals() -> Shutdown {
    let shutdown = Shutdown::default();
    let tokens = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM");
                    return;
                }
            };
        for token in [&tokens.drain, &tokens.now] {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            token.cancel();
        }
    });
    shutdown
}
