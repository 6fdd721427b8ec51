//! The `gateway` binary's configuration errors: each names the variable and exits non-zero.

use std::process::{Command, Output};

fn gateway(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gateway"));
    command.env_clear().args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    ringcast_tests::run_bounded(command)
}

#[test]
fn help_lists_every_variable() {
    let out = gateway(&[], &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "GATEWAY_LISTEN",
        "GATEWAY_ID",
        "RING_CONFIG",
        "RING_NODES",
        "GATEWAY_MAX_CONNECTIONS",
        "GATEWAY_MAX_CHANNELS",
        "GATEWAY_CLIENT_QUEUE",
        "GATEWAY_MAX_FRAME_BYTES",
        "GATEWAY_IDLE_TIMEOUT_SECS",
        "GATEWAY_TOPICS",
        "GATEWAY_KEEPALIVE_SECS",
        "GATEWAY_ADMIN_LISTEN",
        "GATEWAY_AUTH",
        "GATEWAY_JWT_SECRETS",
        "GATEWAY_JWT_PUBLIC_KEYS",
        "GATEWAY_ALLOWED_ORIGINS",
        "GATEWAY_CLIENT_RATE",
        "GATEWAY_JOIN_RATE",
        "GATEWAY_WRITE_TIMEOUT_SECS",
        "GATEWAY_MAX_OUTBOUND_BYTES",
        "GATEWAY_MAX_PENDING_HTTP",
        "CLUSTER_SECRET",
    ] {
        assert!(help.contains(var), "--help does not mention {var}:\n{help}");
    }
}

#[test]
fn bad_values_name_their_variable() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("GATEWAY_LISTEN", "not-an-address")], "GATEWAY_LISTEN"),
        (&[("GATEWAY_MAX_CHANNELS", "0")], "GATEWAY_MAX_CHANNELS"),
        (&[("GATEWAY_CLIENT_QUEUE", "lots")], "GATEWAY_CLIENT_QUEUE"),
        (
            &[("GATEWAY_IDLE_TIMEOUT_SECS", "-1")],
            "GATEWAY_IDLE_TIMEOUT_SECS",
        ),
        (&[("RING_NODES", "ts-a")], "RING_NODES"),
        (&[("RING_NODES", "ts-a=127.0.0.1:0")], "RING_NODES"),
        (&[("RING_CONFIG", "/nonexistent/ring.toml")], "RING_CONFIG"),
        (&[("GATEWAY_TOPICS", " , ")], "GATEWAY_TOPICS"),
        // Protected mode: reachable beyond loopback with no keys, unless told it is open.
        (&[("GATEWAY_LISTEN", "0.0.0.0:4999")], "protected mode"),
        (&[("GATEWAY_LISTEN", "0.0.0.0:4999")], "GATEWAY_AUTH=none"),
        (
            &[("GATEWAY_AUTH", "jwt")],
            "GATEWAY_AUTH=jwt needs GATEWAY_JWT_SECRETS",
        ),
        (&[("GATEWAY_AUTH", "maybe")], "GATEWAY_AUTH"),
        (
            &[("GATEWAY_JWT_SECRETS", "k1:short")],
            "GATEWAY_JWT_SECRETS",
        ),
        (
            &[("GATEWAY_JWT_PUBLIC_KEYS", "k1:/nonexistent/key.pem")],
            "GATEWAY_JWT_PUBLIC_KEYS",
        ),
        (&[("CLUSTER_SECRET", "short")], "CLUSTER_SECRET"),
        (&[("GATEWAY_CLIENT_BURST", "0")], "GATEWAY_CLIENT_BURST"),
        (
            &[("GATEWAY_WRITE_TIMEOUT_SECS", "0")],
            "GATEWAY_WRITE_TIMEOUT_SECS",
        ),
        (
            &[("GATEWAY_MAX_OUTBOUND_BYTES", "10")],
            "GATEWAY_MAX_OUTBOUND_BYTES",
        ),
    ];
    // A port that is already taken: binding fails, and the error names the variable.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let in_use: &[(&str, &str)] = &[("GATEWAY_LISTEN", &taken_addr)];
    let cases: Vec<(&[(&str, &str)], &str)> = cases
        .iter()
        .copied()
        .chain([(in_use, "GATEWAY_LISTEN")])
        .collect();
    for (env, var) in cases {
        let out = gateway(env, &[]);
        assert!(!out.status.success(), "{env:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(var),
            "{env:?}: error should name {var}:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{env:?} panicked:\n{stderr}");
    }
}

#[test]
fn warns_when_the_file_limit_is_below_the_connection_limit() {
    use std::io::{BufRead, BufReader};
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .expect("getrlimit")
        .1;
    if limit >= u32::MAX as u64 - 1_000 {
        eprintln!(
            "open-file hard limit {limit} is above any GATEWAY_MAX_CONNECTIONS: nothing to warn about"
        );
        return;
    }
    let wanted = limit + 1_000;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .env_clear()
        .env("RUST_LOG", "warn")
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("GATEWAY_MAX_CONNECTIONS", wanted.to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run gateway");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let warned = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .map(|line| line.contains("open-file limit") && line.contains("GATEWAY_MAX_CONNECTIONS"));
    child.kill().ok();
    child.wait().ok();
    assert_eq!(
        warned,
        Ok(true),
        "the first log line warns about the file limit"
    );
}
