//! The threads the upstream links run on (`GATEWAY_LINK_THREADS`, one by default), apart from
//! the connections.
//!
//! A message crosses several tasks on its way through a gateway (the gRPC streams to and
//! from its owner, the fan-out). On a busy gateway thousands of connection tasks wait to
//! write; on a runtime shared with them every one of those hops would queue behind them.
//! On threads of their own the links take the CPU as soon as a message arrives, like a
//! second process would, and a message waits for the writers once, at the end.

use tokio::runtime::{Handle, Runtime};

/// A runtime of `GATEWAY_LINK_THREADS` threads named `gateway-links`; stops when dropped.
#[derive(Debug)]
pub struct LinkRuntime {
    runtime: Option<Runtime>,
}

impl LinkRuntime {
    pub fn start(threads: usize) -> std::io::Result<LinkRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("gateway-links")
            .enable_all()
            .build()?;
        Ok(LinkRuntime {
            runtime: Some(runtime),
        })
    }

    pub fn handle(&self) -> &Handle {
        self.runtime
            .as_ref()
            .expect("running until dropped")
            .handle()
    }
}

impl Drop for LinkRuntime {
    /// Drops the remaining tasks on the runtime's own threads: a runtime must not be dropped
    /// (waited for) inside another one.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn runs_tasks_on_its_own_thread_and_drops_them_when_dropped() {
        let links = LinkRuntime::start(1).unwrap();
        let (tx, rx) = mpsc::channel();
        links.handle().spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        let name = rx.recv_timeout(Duration::from_secs(5)).unwrap();
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
