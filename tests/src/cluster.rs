//! Starts real `topic-server` and `gateway` processes on ephemeral loopback ports.

use crate::proxy::TcpProxy;
use crate::{EVENT_TIMEOUT, eventually};
use parking_lot::Mutex;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// Where cargo put the binaries: `RINGCAST_BIN_DIR`, or the profile directory above this
/// test executable (`target/debug/deps/..` -> `target/debug`).
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("RINGCAST_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            let deps = exe.parent().expect("deps dir");
            if deps.ends_with("deps") {
                deps.parent().expect("profile dir").to_path_buf()
            } else {
                deps.to_path_buf()
            }
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (`cargo test --workspace` builds them) or set RINGCAST_BIN_DIR",
        path.display()
    );
    path
}

/// A loopback port no other test of this process has been given. The kernel picks it
/// (bind to port 0); the listener is closed just before the child binds it.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if given.lock().insert(port) {
            return port;
        }
    }
}

/// The backend API key every test gateway accepts (unless its env sets GATEWAY_API_KEYS).
pub const TEST_API_KEY: &str = "test-api-key-0123456789";

/// A child process, killed when dropped. It can be stopped, paused and started again with
/// the same environment (same port).
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub addr: SocketAddr,
    /// The admin listener (`/status`, `/ring`).
    pub admin: SocketAddr,
    /// A gateway's backend API listener (with [`TEST_API_KEY`] unless the env set keys).
    pub api: Option<SocketAddr>,
    binary: String,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Proc {
    /// Starts `binary` with `env`, listening on `addr`; its admin listener goes on another
    /// free loopback port unless `env` names one.
    pub fn spawn(name: &str, binary: &str, addr: SocketAddr, env: &[(&str, String)]) -> Proc {
        let admin_var = match binary {
            "gateway" => "GATEWAY_ADMIN_LISTEN",
            _ => "TOPIC_SERVER_ADMIN_LISTEN",
        };
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let admin = match env.iter().find(|(k, _)| k == admin_var) {
            Some((_, v)) => v.parse().expect("admin address"),
            None => {
                let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
                env.push((admin_var.to_owned(), admin.to_string()));
                admin
            }
        };
        let api = (binary == "gateway").then(|| {
            if !env.iter().any(|(k, _)| k == "GATEWAY_API_KEYS") {
                env.push(("GATEWAY_API_KEYS".into(), TEST_API_KEY.into()));
            }
            match env.iter().find(|(k, _)| k == "GATEWAY_API_LISTEN") {
                Some((_, v)) => v.parse().expect("API address"),
                None => {
                    let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    env.push(("GATEWAY_API_LISTEN".into(), api.to_string()));
                    api
                }
            }
        });
        let mut proc = Proc {
            name: name.to_owned(),
            addr,
            admin,
            api,
            binary: binary.to_owned(),
            env,
            child: None,
        };
        proc.start();
        proc
    }

    /// Starts the process again after [`Proc::kill`] (a crash and restart).
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    fn start(&mut self) {
        let binary = &self.binary;
        let mut command = Command::new(bin_path(binary));
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("RINGCAST_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        self.child = Some(child);
    }

    /// Sends `signal` (a `kill -s` name such as `STOP` or `CONT`) to the running process.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("process is running");
        let status = Command::new("kill")
            .args(["-s", signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} {}", self.name);
    }

    /// Freezes the process (SIGSTOP): its sockets stay open but nothing answers, like a
    /// silent peer.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused process dies on SIGKILL as well; SIGCONT is harmless either way.
            let _ = Command::new("kill")
                .args(["-s", "CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        child.wait().ok()
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process is running").id()
    }

    /// The most resident memory the process has had so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM:")
    }

    fn proc_status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
    }

    /// Open file descriptors of the running process (sockets included).
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/<pid>/fd")
            .count()
    }

    /// A URL on the admin listener.
    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// A URL on the gateway's backend API listener.
    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{}", self.api.expect("a gateway's API"), path)
    }

    /// Calls the backend API with [`TEST_API_KEY`]: `body` is POSTed if given, else GET.
    /// Returns the status and the JSON answer.
    pub async fn api(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        let client = reqwest::Client::new();
        let request = match body {
            Some(body) => client.post(self.api_url(path)).json(&body),
            None => client.get(self.api_url(path)),
        };
        let response = request
            .bearer_auth(TEST_API_KEY)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: API {path}: {e}", self.name));
        let status = response.status().as_u16();
        let text = response.text().await.expect("API answer");
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{}: API {path}: not JSON ({status}): {text}", self.name));
        (status, value)
    }

    /// `GET /status` as JSON, or `None` while the process is not answering.
    pub async fn try_status(&self) -> Option<Value> {
        let response = reqwest::get(self.http("/status")).await.ok()?;
        response.json().await.ok()
    }

    /// `GET path` as JSON, or `None` while the process is not answering.
    pub async fn try_get(&self, path: &str) -> Option<Value> {
        let response = reqwest::get(self.http(path)).await.ok()?;
        response.json().await.ok()
    }

    /// Waits until `check(GET path)` holds.
    pub async fn wait_get(&self, path: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(&format!("{}: {what}", self.name), EVENT_TIMEOUT, || async {
            self.try_get(path).await.filter(|s| check(s))
        })
        .await
    }

    pub async fn status(&self) -> Value {
        self.try_status()
            .await
            .unwrap_or_else(|| panic!("{} does not answer /status", self.name))
    }

    /// Waits until `check(status)` holds.
    pub async fn wait_status(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(&format!("{}: {what}", self.name), EVENT_TIMEOUT, || async {
            self.try_status().await.filter(|s| check(s))
        })
        .await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub topic_servers: usize,
    pub gateways: usize,
    /// Extra environment for every gateway.
    pub gateway_env: Vec<(String, String)>,
    /// Extra environment for every topic server.
    pub topic_server_env: Vec<(String, String)>,
    /// Gateways (by index) that reach every topic server through a [`TcpProxy`] of their
    /// own, so that a test can cut one gateway off from one topic server.
    pub proxied_gateways: Vec<usize>,
    /// Gateways and topic servers read different ring files, so that a test can give an
    /// edit to one side first.
    pub split_rings: bool,
}

/// One `/status` number added up over `procs`.
pub async fn status_sum<'a>(procs: impl IntoIterator<Item = &'a Proc>, key: &str) -> u64 {
    let mut total = 0;
    for p in procs {
        total += p.status().await[key].as_u64().unwrap_or(0);
    }
    total
}

/// Environment pairs as a [`ClusterSpec`] takes them.
pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Which processes a ring edit reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingTarget {
    All,
    Gateways,
    TopicServers,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            topic_servers: 2,
            gateways: 2,
            gateway_env: Vec::new(),
            topic_server_env: Vec::new(),
            proxied_gateways: Vec::new(),
            split_rings: false,
        }
    }
}

/// Topic servers and gateways sharing one ring file.
#[derive(Debug)]
pub struct Cluster {
    pub topic_servers: Vec<Proc>,
    pub gateways: Vec<Proc>,
    pub ring_path: PathBuf,
    /// The gateways' ring file (the same as `ring_path` unless `split_rings`).
    pub gateway_ring_path: PathBuf,
    /// Ring files of topic servers added with [`Cluster::add_topic_server`].
    added_ring_paths: Vec<PathBuf>,
    topic_server_env: Vec<(String, String)>,
    /// `proxies[(gateway, topic server)]`: the proxies of `ClusterSpec::proxied_gateways`.
    pub proxies: HashMap<(usize, usize), TcpProxy>,
    _dir: tempfile::TempDir,
}

/// A ring config with these `(id, addr)` nodes.
pub fn ring_text(version: u64, nodes: &[(String, SocketAddr)]) -> String {
    let mut text = format!("version = {version}\n");
    for (id, addr) in nodes {
        text.push_str(&format!("\n[[nodes]]\nid = \"{id}\"\naddr = \"{addr}\"\n"));
    }
    text
}

fn write_ring_text(cluster: &Cluster, target: RingTarget, text: &str) {
    if target != RingTarget::Gateways {
        write_atomically(&cluster.ring_path, text);
        for path in &cluster.added_ring_paths {
            write_atomically(path, text);
        }
    }
    if target != RingTarget::TopicServers {
        write_atomically(&cluster.gateway_ring_path, text);
    }
}

/// Writes a ring config with these `(id, addr)` nodes (atomically).
pub fn write_ring(path: &Path, version: u64, nodes: &[(String, SocketAddr)]) {
    write_atomically(path, &ring_text(version, nodes));
}

fn write_atomically(path: &Path, text: &str) {
    // Written aside and renamed into place, as editors and config-map mounts do, so that a
    // watcher never reads half a file.
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).expect("write ring config");
    std::fs::rename(&tmp, path).expect("move ring config into place");
}

impl Cluster {
    /// 2 topic servers and 2 gateways, ready: every gateway's links are up.
    pub async fn start() -> Cluster {
        Cluster::start_with(ClusterSpec::default()).await
    }

    pub async fn start_with(spec: ClusterSpec) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ring_path = dir.path().join("ring.toml");
        let nodes: Vec<(String, SocketAddr)> = (0..spec.topic_servers)
            .map(|i| {
                (
                    format!("ts-{}", (b'a' + i as u8) as char),
                    SocketAddr::from(([127, 0, 0, 1], free_port())),
                )
            })
            .collect();
        write_ring(&ring_path, 1, &nodes);
        let ring = ring_path.display().to_string();
        let gateway_ring_path = if spec.split_rings {
            let path = dir.path().join("ring-gateways.toml");
            write_ring(&path, 1, &nodes);
            path
        } else {
            ring_path.clone()
        };
        let topic_servers: Vec<Proc> = nodes
            .iter()
            .map(|(id, addr)| {
                let mut env = vec![
                    ("TOPIC_SERVER_LISTEN", addr.to_string()),
                    ("TOPIC_SERVER_ID", id.clone()),
                    ("RING_CONFIG", ring.clone()),
                ];
                env.extend(
                    spec.topic_server_env
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.clone())),
                );
                Proc::spawn(id, "topic-server", *addr, &env)
            })
            .collect();
        let mut proxies = HashMap::new();
        let gateways: Vec<Proc> = (0..spec.gateways)
            .map(|i| {
                let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
                let mut gateway_ring = gateway_ring_path.display().to_string();
                if spec.proxied_gateways.contains(&i) {
                    // The same ring (ids, version), with this gateway's proxies as addresses.
                    let mut via = Vec::new();
                    for (t, (id, target)) in nodes.iter().enumerate() {
                        let proxy = TcpProxy::start(*target);
                        via.push((id.clone(), proxy.addr));
                        proxies.insert((i, t), proxy);
                    }
                    let path = dir.path().join(format!("ring-gw-{i}.toml"));
                    write_ring(&path, 1, &via);
                    gateway_ring = path.display().to_string();
                }
                let mut env = vec![
                    ("GATEWAY_LISTEN", addr.to_string()),
                    ("GATEWAY_ID", format!("gw-{i}")),
                    ("RING_CONFIG", gateway_ring),
                ];
                env.extend(
                    spec.gateway_env
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.clone())),
                );
                Proc::spawn(&format!("gw-{i}"), "gateway", addr, &env)
            })
            .collect();
        let cluster = Cluster {
            topic_servers,
            gateways,
            ring_path,
            gateway_ring_path,
            added_ring_paths: Vec::new(),
            topic_server_env: spec.topic_server_env.clone(),
            proxies,
            _dir: dir,
        };
        for ts in &cluster.topic_servers {
            ts.wait_status("up", |_| true).await;
        }
        for i in 0..cluster.gateways.len() {
            cluster.wait_links(i).await;
        }
        cluster
    }

    /// The `(id, addr)` of topic servers `which` (by index), for a ring file.
    pub fn nodes(&self, which: &[usize]) -> Vec<(String, SocketAddr)> {
        which
            .iter()
            .map(|&i| {
                (
                    self.topic_servers[i].name.clone(),
                    self.topic_servers[i].addr,
                )
            })
            .collect()
    }

    /// Writes a ring edit to the files `target` reads.
    pub fn write_ring_for(&self, target: RingTarget, version: u64, nodes: &[(String, SocketAddr)]) {
        write_ring_text(self, target, &ring_text(version, nodes));
    }

    /// Writes a ring edit given as TOML text (for weights) to the files `target` reads.
    pub fn write_ring_toml(&self, target: RingTarget, text: &str) {
        write_ring_text(self, target, text);
    }

    /// Starts one more topic server, `id`, with its own ring file: ring `version` made of
    /// every topic server so far plus this one. It gets every later edit sent to the topic
    /// servers. Returns its index.
    pub async fn add_topic_server(&mut self, id: &str, version: u64) -> usize {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let path = self._dir.path().join(format!("ring-{id}.toml"));
        let mut nodes = self.nodes(&(0..self.topic_servers.len()).collect::<Vec<_>>());
        nodes.push((id.to_owned(), addr));
        write_atomically(&path, &ring_text(version, &nodes));
        let mut env = vec![
            ("TOPIC_SERVER_LISTEN", addr.to_string()),
            ("TOPIC_SERVER_ID", id.to_owned()),
            ("RING_CONFIG", path.display().to_string()),
        ];
        env.extend(
            self.topic_server_env
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone())),
        );
        let proc = Proc::spawn(id, "topic-server", addr, &env);
        proc.wait_status("up", |_| true).await;
        self.topic_servers.push(proc);
        self.added_ring_paths.push(path);
        self.topic_servers.len() - 1
    }

    /// Waits until gateway `i` has a live stream to every topic server.
    pub async fn wait_links(&self, i: usize) {
        self.gateways[i]
            .wait_status("all links connected", |s| {
                s["links"]
                    .as_array()
                    .is_some_and(|links| links.iter().all(|l| l["connected"] == true))
            })
            .await;
    }

    /// The ring the cluster was started with.
    pub fn ring(&self) -> ringcast_ring::Ring {
        let text = std::fs::read_to_string(&self.ring_path).expect("read ring");
        ringcast_ring::Ring::from_toml(&text).expect("parse ring")
    }

    /// A topic named `{prefix}{n}` owned by topic server `ts` (by index).
    pub fn topic_on(&self, ts: usize, prefix: &str) -> String {
        let ring = self.ring();
        let id = &self.topic_servers[ts].name;
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .find(|t| ring.owner(t).id == *id)
            .expect("some topic lands on every node")
    }

    /// `ws://.../socket/websocket?vsn=2.0.0` of gateway `i`.
    pub fn ws_url(&self, i: usize) -> String {
        ws_url(self.gateways[i].addr)
    }

    /// `ws://.../socket` of gateway `i`, as phoenix.js takes it.
    pub fn socket_url(&self, i: usize) -> String {
        format!("ws://{}/socket", self.gateways[i].addr)
    }
}

pub fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/socket/websocket?vsn=2.0.0")
}

/// One gateway with no ring: the embedded single-node mode.
pub async fn start_embedded_gateway(env: &[(&str, String)]) -> Proc {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut all = vec![("GATEWAY_LISTEN", addr.to_string())];
    all.extend(env.iter().cloned());
    let gw = Proc::spawn("gw-embedded", "gateway", addr, &all);
    gw.wait_status("all links connected", |s| {
        s["links"][0]["connected"] == true
    })
    .await;
    gw
}
