//! `gateway`: parse the environment, install tracing, serve until Ctrl-C or SIGTERM (then
//! drain; a second signal stops at once).

use ringcast_gateway::{Config, Listeners, run};
use ringcast_topic_server::process;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    process::init_tracing();
    let (listen, config) = match Config::from_env() {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("gateway: {message}");
            return ExitCode::FAILURE;
        }
    };
    check_file_limit(config.max_connections);
    let public = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("gateway: GATEWAY_LISTEN {listen}: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let admin = match tokio::net::TcpListener::bind(config.admin_listen).await {
        Ok(listener) => listener,
        Err(e) => {
            let addr = config.admin_listen;
            eprintln!("gateway: GATEWAY_ADMIN_LISTEN {addr}: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let api = match config.api_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                eprintln!("gateway: GATEWAY_API_LISTEN {addr}: cannot listen: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let listeners = Listeners { public, admin, api };
    match run(listeners, config, process::shutdown_on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the open-file limit to the hard limit, and warns when even that is below what
/// `GATEWAY_MAX_CONNECTIONS` needs (one file per connection, plus some for upstreams).
fn check_file_limit(max_connections: usize) {
    let needed = max_connections as u64 + 256;
    match rlimit::increase_nofile_limit(needed) {
        Ok(limit) if limit < needed => tracing::warn!(
            open_file_limit = limit,
            max_connections,
            "the open-file limit is below what GATEWAY_MAX_CONNECTIONS needs: connections beyond about {} will fail; raise the limit (ulimit -n) or lower GATEWAY_MAX_CONNECTIONS",
            limit.saturating_sub(256)
        ),
        Ok(limit) => tracing::debug!(open_file_limit = limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}
