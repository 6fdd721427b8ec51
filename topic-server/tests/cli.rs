//! The `topic-server` binary's configuration errors: each names the variable and exits
//! non-zero.

use std::process::{Command, Output};

fn topic_server(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_topic-server"));
    command.env_clear().args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    ringcast_tests::run_bounded(command)
}

#[test]
fn help_lists_every_variable() {
    let out = topic_server(&[], &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "TOPIC_SERVER_LISTEN",
        "TOPIC_SERVER_ID",
        "RING_CONFIG",
        "RING_NODES",
        "TOPIC_SERVER_STREAM_QUEUE",
        "TOPIC_SERVER_KEEPALIVE_SECS",
    ] {
        assert!(help.contains(var), "--help does not mention {var}:\n{help}");
    }
}

#[test]
fn bad_values_name_their_variable() {
    let dir = std::env::temp_dir().join(format!("ringcast-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_ring = dir.join("bad.toml");
    std::fs::write(
        &bad_ring,
        "version = 1\n[[nodes]]\nid = \"ts-a\"\naddr = \"nowhere\"\n",
    )
    .unwrap();
    let bad_ring = bad_ring.display().to_string();
    let nodes = "ts-a=127.0.0.1:7001";
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("RING_NODES", nodes)], "TOPIC_SERVER_ID"),
        (&[("TOPIC_SERVER_ID", "ts-a")], "RING_CONFIG"),
        (
            &[("TOPIC_SERVER_ID", "ts-z"), ("RING_NODES", nodes)],
            "TOPIC_SERVER_ID `ts-z` is not a node of the ring",
        ),
        (
            &[("TOPIC_SERVER_ID", "ts-a"), ("RING_CONFIG", &bad_ring)],
            "nodes[0].addr",
        ),
        (
            &[
                ("TOPIC_SERVER_ID", "ts-a"),
                ("RING_NODES", nodes),
                ("TOPIC_SERVER_LISTEN", "x"),
            ],
            "TOPIC_SERVER_LISTEN",
        ),
        (
            &[
                ("TOPIC_SERVER_ID", "ts-a"),
                ("RING_NODES", nodes),
                ("TOPIC_SERVER_STREAM_QUEUE", "1"),
            ],
            "TOPIC_SERVER_STREAM_QUEUE",
        ),
        (
            &[
                ("TOPIC_SERVER_ID", "ts-a"),
                ("RING_NODES", nodes),
                ("TOPIC_SERVER_KEEPALIVE_SECS", "0"),
            ],
            "TOPIC_SERVER_KEEPALIVE_SECS",
        ),
        // A replay of the whole log must fit a gateway stream's queue.
        (
            &[
                ("TOPIC_SERVER_ID", "ts-a"),
                ("RING_NODES", nodes),
                ("TOPIC_SERVER_STREAM_QUEUE", "16"),
            ],
            "TOPIC_SERVER_STREAM_QUEUE (16) must be larger than TOPIC_SERVER_LOG_MESSAGES (100)",
        ),
        // A topic's log must fit one gRPC message when it is handed over.
        (
            &[
                ("TOPIC_SERVER_ID", "ts-a"),
                ("RING_NODES", nodes),
                ("TOPIC_SERVER_LOG_BYTES", "16777216"),
            ],
            "TOPIC_SERVER_LOG_BYTES",
        ),
        // Protected mode: gRPC reachable beyond loopback with no cluster secret.
        (
            &[
                ("TOPIC_SERVER_ID", "ts-a"),
                ("RING_NODES", nodes),
                ("TOPIC_SERVER_LISTEN", "0.0.0.0:7999"),
            ],
            "protected mode",
        ),
        (
            &[
                ("TOPIC_SERVER_ID", "ts-a"),
                ("RING_NODES", nodes),
                ("CLUSTER_SECRET", "short"),
            ],
            "CLUSTER_SECRET",
        ),
        (
            &[
                ("TOPIC_SERVER_ID", "ts-a"),
                ("RING_NODES", nodes),
                ("CLUSTER_AUTH", "secret"),
            ],
            "CLUSTER_AUTH=secret needs CLUSTER_SECRET",
        ),
        (
            &[
                ("TOPIC_SERVER_ID", "ts-a"),
                ("RING_NODES", nodes),
                ("TOPIC_SERVER_MAX_TOPICS", "0"),
            ],
            "TOPIC_SERVER_MAX_TOPICS",
        ),
    ];
    for (env, needle) in cases {
        let out = topic_server(env, &[]);
        assert!(!out.status.success(), "{env:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(needle),
            "{env:?}: error should mention {needle}:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{env:?} panicked:\n{stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
