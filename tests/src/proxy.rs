//! A TCP proxy that can blackhole its traffic: a network partition between two processes
//! made in the test harness.
//!
//! While blackholed, the proxy accepts connections but moves no bytes in either direction,
//! so both ends see a silent peer (their sockets stay open; keepalive must notice). Healing
//! lets bytes flow again; the ends decide what is left of their connections.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards `addr` -> target until dropped. Must be started inside a tokio runtime.
#[derive(Debug)]
pub struct TcpProxy {
    pub addr: SocketAddr,
    blackholed: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub fn start(target: SocketAddr) -> TcpProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy addr");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let (blackholed, state) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, state.clone()),
                        pump(server_read, client_write, state),
                    );
                });
            }
        });
        TcpProxy {
            addr,
            blackholed,
            task,
        }
    }

    /// Stops all traffic through the proxy (connections stay open, silent).
    pub fn blackhole(&self) {
        self.blackholed.send_replace(true);
    }

    /// Lets traffic through again.
    pub fn heal(&self) {
        self.blackholed.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, holding still (reading nothing) while blackholed.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut blackholed: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if blackholed.wait_for(|b| !*b).await.is_err() {
            return;
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            // Blackholed while waiting: go back to holding still.
            _ = blackholed.wait_for(|b| *b) => continue,
        };
        if *blackholed.borrow() {
            // Bytes caught in flight when the partition started: held, not lost.
            if blackholed.wait_for(|b| !*b).await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
