//! Where the upstream links run (`GATEWAY_LINK_THREADS`): on the connections' runtime (0, the
//! default), or on a runtime of that many threads of their own.
//!
//! A message crosses several tasks on its way through a gateway (the gRPC streams to and
//! from its owner, the fan-out). On a busy gateway thousands of connection tasks wait to
//! write, and on a runtime shared with them each of those hops queues behind them; on
//! threads of their own the links get a core as soon as a message arrives. Measured on two
//! shared cores (README, Performance): beside the default connection threads it helps many
//! small topics and slows a message that wakes thousands of subscribers; beside one
//! connection thread it speeds up the one-topic fan-out.

use tokio::runtime::{Handle, Runtime};

/// The runtime link tasks are spawned on; one of their own stops when dropped.
#[derive(Debug)]
pub struct LinkRuntime {
    handle: Handle,
    own: Option<Runtime>,
}

impl LinkRuntime {
    /// `threads` 0: the current runtime; otherwise a new one of that many threads named
    /// `gateway-links`. Must be called inside a runtime.
    pub fn start(threads: usize) -> std::io::Result<LinkRuntime> {
        if threads == 0 {
            return Ok(LinkRuntime {
                handle: Handle::current(),
                own: None,
            });
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("gateway-links")
            .enable_all()
            .build()?;
        Ok(LinkRuntime {
            handle: runtime.handle().clone(),
            own: Some(runtime),
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for LinkRuntime {
    /// Drops the remaining tasks on the runtime's own threads: a runtime must not be dropped
    /// (waited for) inside another one.
    fn drop(&mut self) {
        if let Some(runtime) = self.own.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn thread_name() -> Option<String> {
        std::thread::current().name().map(str::to_owned)
    }

    #[tokio::test]
    async fn zero_threads_keeps_the_links_on_the_current_runtime() {
        let links = LinkRuntime::start(0).unwrap();
        let name = links.handle().spawn(async { thread_name() }).await.unwrap();
        assert_eq!(
            name,
            thread_name(),
            "a current-thread test runtime runs it here"
        );
    }

    #[tokio::test]
    async fn threads_of_their_own_run_the_tasks_and_drop_them_when_dropped() {
        let links = LinkRuntime::start(1).unwrap();
        let name = links.handle().spawn(async { thread_name() }).await.unwrap();
        assert_eq!(name.as_deref(), Some("gateway-links"));

        let (tx, rx) = mpsc::channel::<()>();
        links.handle().spawn(async move {
            let _held = tx;
            std::future::pending::<()>().await
        });
        drop(links);
        let ended = rx.recv_timeout(Duration::from_secs(5));
        assert_eq!(ended, Err(mpsc::RecvTimeoutError::Disconnected));
    }
}
