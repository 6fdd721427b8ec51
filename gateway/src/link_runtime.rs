//! The thread the upstream links run on, apart from the connections.
//!
//! A message crosses several tasks on its way through a gateway (the gRPC streams to and
//! from its owner, the fan-out). On a busy gateway thousands of connection tasks wait to
//! write; on a runtime shared with them every one of those hops would queue behind them.
//! On a thread of their own the links take the CPU as soon as a message arrives, like a
//! second process would, and a message waits for the writers once, at the end.

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A current-thread runtime on its own thread; stops when dropped.
#[derive(Debug)]
pub struct LinkRuntime {
    handle: Handle,
    _stop: oneshot::Sender<()>,
}

impl LinkRuntime {
    pub fn start() -> std::io::Result<LinkRuntime> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("gateway-links".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(LinkRuntime {
            handle,
            _stop: stop,
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn runs_tasks_on_its_own_thread_and_drops_them_when_dropped() {
        let links = LinkRuntime::start().unwrap();
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
