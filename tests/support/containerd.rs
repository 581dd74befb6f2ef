//! A real containerd (1.6, as root) with its own root, state and socket in a temp dir,
//! the CRI plugin disabled, and `ctr` pulling through `hosts.toml` mirrors exactly as a
//! cluster node would (containerd then sends `?ns=<registry>` to the mirror).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{require_tool, run_with_timeout_async, CommandOutput};

pub struct Containerd {
    dir: tempfile::TempDir,
    socket: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    pub async fn start() -> Containerd {
        let bin = require_tool("containerd");
        require_tool("ctr");
        assert!(
            is_root(),
            "containerd tests need root (they mount overlayfs); run scripts/test.sh as root"
        );
        let dir = tempfile::tempdir().expect("containerd tempdir");
        let socket = dir.path().join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
            root = dir.path().join("root").display(),
            state = dir.path().join("state").display(),
            sock = socket.display(),
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).expect("containerd config");
        let log = std::fs::File::create(dir.path().join("containerd.log")).expect("log");
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let mut c = Containerd {
            dir,
            socket,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if c.socket.exists() {
                let out = c.ctr(&["version"]).await;
                if out.status.success() {
                    break;
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(c.dir.path().join("containerd.log"))
                    .unwrap_or_default();
                c.stop();
                panic!("containerd did not come up; log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c
    }

    /// Writes `<hosts>/<registry>/hosts.toml` making `mirror` (http://127.0.0.1:port) the
    /// first host for pull and resolve; `server` is a dead loopback port so a failing
    /// mirror can never fall back to the real registry on the internet.
    pub fn write_hosts(&self, registry: &str, mirror: &str) -> PathBuf {
        let hosts = self.dir.path().join("certs.d");
        let dir = hosts.join(registry);
        std::fs::create_dir_all(&dir).expect("hosts dir");
        let dead = format!("http://127.0.0.1:{}", super::free_port());
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"{dead}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .expect("hosts.toml");
        hosts
    }

    /// Like [`Self::write_hosts`] with several mirrors, tried in order (as on a node whose
    /// hosts.toml lists several berth replicas: a dead one is skipped). A 2 s dial timeout
    /// keeps a dead mirror cheap.
    pub fn write_hosts_many(&self, registry: &str, mirrors: &[String]) -> PathBuf {
        let hosts = self.dir.path().join("certs.d");
        let dir = hosts.join(registry);
        std::fs::create_dir_all(&dir).expect("hosts dir");
        let dead = format!("http://127.0.0.1:{}", super::free_port());
        let mut text = format!("server = \"{dead}\"\n");
        for m in mirrors {
            text.push_str(&format!(
                "\n[host.\"{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = \"2s\"\n"
            ));
        }
        std::fs::write(dir.join("hosts.toml"), text).expect("hosts.toml");
        hosts
    }

    /// A directory for hosts files that something else (e.g. `berth containerd-config`) writes.
    pub fn hosts_dir(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    pub async fn ctr(&self, args: &[&str]) -> CommandOutput {
        let mut cmd = Command::new(require_tool("ctr"));
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "berth-test"])
            .args(args);
        run_with_timeout_async(cmd, Duration::from_secs(180)).await
    }

    /// `ctr images pull` (with unpack) through the mirrors in `hosts`.
    pub async fn pull(&self, hosts: &Path, image: &str) -> CommandOutput {
        let hosts = hosts.display().to_string();
        self.ctr(&["images", "pull", "--hosts-dir", &hosts, image])
            .await
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Unpacked snapshots may leave overlay mounts below root; unmount before removal.
        let root = self.dir.path().join("root");
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            for line in mounts.lines() {
                if let Some(point) = line.split_whitespace().nth(1) {
                    if Path::new(point).starts_with(&root) {
                        let _ = Command::new("umount").arg("-l").arg(point).status();
                    }
                }
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
