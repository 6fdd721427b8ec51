//! `topic-server`: parse the environment, install tracing, serve until Ctrl-C or SIGTERM (a
//! second one stops at once).

use ringcast_topic_server::{Config, Listeners, process, run};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    process::init_tracing();
    let (listen, config) = match Config::from_env() {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("topic-server: {message}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("topic-server: TOPIC_SERVER_LISTEN {listen}: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let admin = match tokio::net::TcpListener::bind(config.admin_listen).await {
        Ok(listener) => listener,
        Err(e) => {
            let addr = config.admin_listen;
            eprintln!("topic-server: TOPIC_SERVER_ADMIN_LISTEN {addr}: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listeners = Listeners {
        grpc: listener,
        admin,
    };
    let signals = process::shutdown_on_signals();
    // A second Ctrl-C or SIGTERM stops at once, whatever is still being handed over.
    let now = signals.now.clone();
    tokio::spawn(async move {
        now.cancelled().await;
        eprintln!("topic-server: stopped at once (second signal)");
        std::process::exit(1);
    });
    match run(listeners, config, signals.drain).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("topic-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}
