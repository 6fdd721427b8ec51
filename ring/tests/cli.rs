//! The `ring` command line: owners and diffs from real config files.

use std::process::Command;

fn ring(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ring"))
        .args(args)
        .output()
        .expect("run ring");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn owner_and_diff() {
    let dir = std::env::temp_dir().join(format!("ringcast-ring-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let node =
        |id: &str, port: u16| format!("[[nodes]]\nid = \"{id}\"\naddr = \"127.0.0.1:{port}\"\n");
    let old = write(
        &dir,
        "old.toml",
        &format!("version = 1\n{}{}", node("ts-a", 7001), node("ts-b", 7002)),
    );
    let new = write(
        &dir,
        "new.toml",
        &format!(
            "version = 2\n{}{}{}",
            node("ts-a", 7001),
            node("ts-b", 7002),
            node("ts-c", 7003)
        ),
    );

    let (ok, out, _) = ring(&["owner", &old, "topics:matrix", "room:1"]);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("topics:matrix\tts-"), "{out}");

    let topics: Vec<String> = (0..200).map(|i| format!("room:{i}")).collect();
    let mut args = vec!["diff", old.as_str(), new.as_str()];
    args.extend(topics.iter().map(String::as_str));
    let (ok, out, _) = ring(&args);
    assert!(ok, "{out}");
    assert!(out.starts_with("ring 1 -> 2: "), "{out}");
    assert!(out.contains("ts-c"), "{out}");
    let moved: Vec<&str> = out.lines().filter(|l| l.starts_with("moves\t")).collect();
    assert!(
        !moved.is_empty() && moved.len() < 120,
        "about a third should move: {}",
        moved.len()
    );
    assert!(
        moved.iter().all(|l| l.ends_with("-> ts-c")),
        "topics only move to the new node: {moved:?}"
    );

    let bad = write(&dir, "bad.toml", "version = 3\n[[nodes]]\nid = \"a\"\n");
    let (ok, _, err) = ring(&["owner", &bad, "t"]);
    assert!(!ok);
    assert!(err.contains("addr"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
