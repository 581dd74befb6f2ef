//! A real S3-compatible object store: Garage (DESIGN.md §5) as a child process, behind
//! berth's shared storage tier.
//!
//! This module owns one single-node Garage: its generated `garage.toml`, its metadata and
//! data directories (in a tempdir that lives as long as the [`Garage`], so
//! [`Garage::start_again`] keeps the bucket, the key and the objects), its process (killed
//! by PID on drop) and the one-time setup its CLI does (layout, bucket, key).
//!
//! Tests look inside the bucket through S3 itself: the CLI only counts objects and
//! unfinished uploads, it cannot name them. Requests are signed here with SigV4 over
//! `sha2`, so the check goes through the same protocol berth speaks, with no S3 client
//! crate that would need its own trust.

use std::fmt::Write as _;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::CommandOutput;

/// How long Garage gets to come up (process, RPC, then an S3 answer for the bucket).
/// Its first start also creates the sqlite databases and the node key, which takes a moment.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One CLI call; each is a short RPC to the local node.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a graceful stop may take before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Retries of setup steps and readiness probes: long enough apart not to spin on a node
/// that is still opening its databases.
const RETRY: Duration = Duration::from_millis(100);

const REGION: &str = "garage";
const BUCKET: &str = "berth";
const KEY_NAME: &str = "berth-key";

/// A running single-node `garage server` with one bucket and one key allowed on it.
pub struct Garage {
    /// `http://127.0.0.1:PORT`, the S3 API (path-style).
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub s3_port: u16,
    pub rpc_port: u16,
    pub admin_port: u16,
    binary: PathBuf,
    /// Config, metadata, data, log and credential files; removed only after `Drop` has
    /// killed the process.
    dir: TempDir,
    child: Option<Child>,
}

impl Garage {
    /// Writes the config, spawns Garage, gives it a layout, then makes the `berth` bucket
    /// and a key with read, write and owner rights on it. Returns once S3 answers for it.
    pub async fn start() -> Garage {
        // Looked up first so a missing peer fails before any other work.
        let binary = binary();
        let dir = tempfile::Builder::new()
            .prefix("berth-garage-")
            .tempdir()
            .expect("garage tempdir");
        let [s3_port, rpc_port, admin_port] = distinct_free_ports();
        let config = render_config(dir.path(), s3_port, rpc_port, admin_port);
        std::fs::write(config_path(dir.path()), config).expect("write garage.toml");
        let mut garage = Garage {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            region: REGION.to_owned(),
            bucket: BUCKET.to_owned(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            s3_port,
            rpc_port,
            admin_port,
            binary,
            dir,
            child: None,
        };
        garage.spawn();
        garage.set_up().await;
        garage.wait_s3_ready().await;
        garage
    }

    /// The `[storage.shared]` block of berth's config for this bucket under `prefix`, with
    /// the credentials in two files beside the config (berth reads secrets from files).
    pub fn shared_toml(&self, prefix: &str) -> String {
        let key_id_file = self.dir.path().join("access_key_id");
        let secret_file = self.dir.path().join("secret_access_key");
        std::fs::write(&key_id_file, &self.access_key_id).expect("write access_key_id file");
        std::fs::write(&secret_file, &self.secret_access_key)
            .expect("write secret_access_key file");
        format!(
            "[storage.shared]
kind = \"s3\"
bucket = {bucket}
prefix = {prefix}
endpoint = {endpoint}
region = {region}
path_style = true
access_key_id_file = {key_id_file}
secret_access_key_file = {secret_file}
",
            bucket = quoted(&self.bucket),
            prefix = quoted(prefix),
            endpoint = quoted(&self.endpoint),
            region = quoted(&self.region),
            key_id_file = quoted(&key_id_file.to_string_lossy()),
            secret_file = quoted(&secret_file.to_string_lossy()),
        )
    }

    /// The tempdir holding config, metadata, data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What Garage logged so far (stdout and stderr together, all starts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_path(self.dir.path())).unwrap_or_default()
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, up to [`STOP_TIMEOUT`] to exit, then SIGKILL; a no-op when stopped.
    /// For outage tests: the shared tier is gone until [`Garage::start_again`].
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            super::terminate(child, STOP_TIMEOUT);
        }
    }

    /// Starts the stopped node again on the same config, ports and data: the layout, the
    /// bucket, the key and the objects are all still there. Returns once S3 answers.
    pub async fn start_again(&mut self) {
        self.stop();
        self.spawn();
        self.wait_s3_ready().await;
    }

    /// Runs `garage -c <config> ARGS` against this node, whatever its exit status.
    pub async fn cli(&self, args: &[&str]) -> CommandOutput {
        let mut command = Command::new(&self.binary);
        command
            .arg("-c")
            .arg(config_path(self.dir.path()))
            .args(args);
        super::run_with_timeout_async(command, CLI_TIMEOUT).await
    }

    /// Every object key under `prefix` in the bucket (ListObjectsV2, all pages), sorted.
    pub async fn object_keys(&self, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("list-type", "2".to_owned()), ("prefix", prefix.to_owned())];
            if let Some(token) = &token {
                query.push(("continuation-token", token.clone()));
            }
            let body = self
                .expect_ok(Method::GET, "", &query, Vec::new(), "ListObjectsV2")
                .await;
            keys.extend(xml_values(&body, "Key"));
            match xml_values(&body, "NextContinuationToken").pop() {
                Some(next) if xml_values(&body, "IsTruncated") == ["true"] => token = Some(next),
                _ => break,
            }
        }
        keys.sort();
        keys
    }

    /// The object keys of the bucket's incomplete multipart uploads (ListMultipartUploads,
    /// all pages), sorted; a key appears once per upload.
    pub async fn multipart_uploads(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut query = vec![("uploads", String::new())];
            if let Some((key, upload_id)) = &markers {
                query.push(("key-marker", key.clone()));
                query.push(("upload-id-marker", upload_id.clone()));
            }
            let body = self
                .expect_ok(Method::GET, "", &query, Vec::new(), "ListMultipartUploads")
                .await;
            keys.extend(xml_values(&body, "Key"));
            let truncated = xml_values(&body, "IsTruncated") == ["true"];
            let next_key = xml_values(&body, "NextKeyMarker").pop();
            let next_id = xml_values(&body, "NextUploadIdMarker").pop();
            match (truncated, next_key, next_id) {
                (true, Some(key), Some(id)) => markers = Some((key, id)),
                _ => break,
            }
        }
        keys.sort();
        keys
    }

    /// PutObject, asserting success.
    pub async fn put_object(&self, key: &str, bytes: &[u8]) {
        self.expect_ok(Method::PUT, key, &[], bytes.to_vec(), "PutObject")
            .await;
    }

    /// GetObject: `None` on 404, the bytes on 200, a panic otherwise.
    pub async fn get_object(&self, key: &str) -> Option<Vec<u8>> {
        let response = self.s3(Method::GET, key, &[], Vec::new()).await;
        match response.status().as_u16() {
            404 => None,
            200 => Some(response.bytes().await.expect("GetObject body").to_vec()),
            status => panic!(
                "GetObject {key} answered {status}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }

    /// CreateMultipartUpload and nothing more, leaving an upload for tests of what cleans
    /// abandoned uploads up. Returns its upload id.
    pub async fn start_multipart(&self, key: &str) -> String {
        let query = [("uploads", String::new())];
        let body = self
            .expect_ok(
                Method::POST,
                key,
                &query,
                Vec::new(),
                "CreateMultipartUpload",
            )
            .await;
        xml_values(&body, "UploadId")
            .pop()
            .unwrap_or_else(|| panic!("CreateMultipartUpload {key}: no UploadId in {body}"))
    }

    /// Sends one SigV4-signed path-style request for `key` in the bucket (`""`: the
    /// bucket itself).
    pub async fn s3(
        &self,
        method: Method,
        key: &str,
        query: &[(&str, String)],
        body: Vec<u8>,
    ) -> reqwest::Response {
        let (url, headers) = self.sign(&method, key, query, &body, SystemTime::now());
        let mut request = super::http().request(method, url).body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send().await.expect("send S3 request to garage")
    }

    async fn expect_ok(
        &self,
        method: Method,
        key: &str,
        query: &[(&str, String)],
        body: Vec<u8>,
        what: &str,
    ) -> String {
        let response = self.s3(method, key, query, body).await;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "{what} {key:?} answered {status}: {text}"
        );
        text
    }

    /// The URL and the headers of a signed request (AWS Signature Version 4, header form).
    ///
    /// Garage rejects requests without `x-amz-content-sha256`, so the payload hash is
    /// always sent and signed; `host` is signed as reqwest will send it (`127.0.0.1:PORT`).
    fn sign(
        &self,
        method: &Method,
        key: &str,
        query: &[(&str, String)],
        body: &[u8],
        now: SystemTime,
    ) -> (String, Vec<(&'static str, String)>) {
        let amz_date = amz_date(now);
        let mut path = format!("/{}", self.bucket);
        if !key.is_empty() {
            path.push('/');
            path.push_str(&uri_encode(key, false));
        }
        let mut pairs: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (uri_encode(k, true), uri_encode(v, true)))
            .collect();
        pairs.sort();
        let canonical_query = pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let payload_hash = hex(&Sha256::digest(body));
        let authorization = SigV4 {
            access_key_id: &self.access_key_id,
            secret_access_key: &self.secret_access_key,
            region: &self.region,
            method: method.as_str(),
            host: &format!("127.0.0.1:{}", self.s3_port),
            path: &path,
            canonical_query: &canonical_query,
            payload_hash: &payload_hash,
            amz_date: &amz_date,
        }
        .authorization();
        let mut url = format!("{}{path}", self.endpoint);
        if !canonical_query.is_empty() {
            url.push('?');
            url.push_str(&canonical_query);
        }
        let headers = vec![
            ("x-amz-content-sha256", payload_hash),
            ("x-amz-date", amz_date),
            ("authorization", authorization),
        ];
        (url, headers)
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "garage already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path(self.dir.path()))
            .expect("open garage log");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(config_path(self.dir.path()))
            .arg("server")
            .current_dir(self.dir.path())
            // Startup, layout and errors at info; per-request lines would drown them.
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {}: {err}", self.binary.display()));
        self.child = Some(child);
    }

    /// The one-time setup, each step retried until it succeeds or [`START_TIMEOUT`] ends.
    /// In practice only the first step waits (the node key appears ~0.1 s after spawn, and
    /// RPC is up by then); the later ones are retried because the CLI reaches the node over
    /// RPC and a slow machine may still be opening its databases.
    async fn set_up(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        // `node id -q` prints `<64 hex>@127.0.0.1:<rpc port>`, read from the node key the
        // server writes at its first start; `layout assign` wants the hex part (or a prefix).
        let node = self.cli_until_ok(&["node", "id", "-q"], deadline).await;
        let node_id = node
            .stdout
            .trim()
            .split('@')
            .next()
            .unwrap_or_default()
            .to_owned();
        assert!(
            node_id.len() == 64 && node_id.bytes().all(|b| b.is_ascii_hexdigit()),
            "unexpected `garage node id -q` output: {:?}",
            node.stdout
        );
        self.cli_until_ok(
            &["layout", "assign", "-z", "dc1", "-c", "1G", &node_id],
            deadline,
        )
        .await;
        self.cli_until_ok(&["layout", "apply", "--version", "1"], deadline)
            .await;
        self.cli_until_ok(&["bucket", "create", BUCKET], deadline)
            .await;
        let key = self
            .cli_until_ok(&["key", "create", KEY_NAME], deadline)
            .await;
        self.access_key_id = table_value(&key.stdout, "Key ID:");
        self.secret_access_key = table_value(&key.stdout, "Secret key:");
        // By id, not by name: a name is not unique in Garage.
        let key_id = self.access_key_id.clone();
        self.cli_until_ok(
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", &key_id,
            ],
            deadline,
        )
        .await;
    }

    async fn cli_until_ok(&mut self, args: &[&str], deadline: Instant) -> CommandOutput {
        loop {
            self.assert_running();
            let output = self.cli(args).await;
            if output.status.success() {
                return output;
            }
            if Instant::now() >= deadline {
                let log = self.log();
                self.stop();
                panic!(
                    "`garage {}` still failing after {START_TIMEOUT:?} ({}):\nstdout:\n{}\nstderr:\n{}\ngarage log:\n{log}",
                    args.join(" "),
                    output.status,
                    output.stdout,
                    output.stderr,
                );
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Waits until a signed ListObjectsV2 on the bucket answers 200: the API is bound, the
    /// layout is loaded and the key is recognised, which is what a test needs next.
    async fn wait_s3_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let query = [("list-type", "2".to_owned()), ("max-keys", "1".to_owned())];
        loop {
            self.assert_running();
            let (url, headers) = self.sign(&Method::GET, "", &query, b"", SystemTime::now());
            let mut request = super::http().get(url).timeout(Duration::from_secs(2));
            for (name, value) in headers {
                request = request.header(name, value);
            }
            let last = match request.send().await {
                Ok(response) if response.status().is_success() => return,
                Ok(response) => format!(
                    "{}: {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                ),
                Err(err) => err.to_string(),
            };
            if Instant::now() >= deadline {
                let log = self.log();
                self.stop();
                panic!("garage S3 not ready within {START_TIMEOUT:?} (last: {last}):\n{log}");
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("garage process");
        if let Some(status) = child.try_wait().expect("try_wait garage") {
            self.child = None;
            panic!("garage exited early ({status}):\n{}", self.log());
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One request's SigV4 inputs (header form, `host;x-amz-content-sha256;x-amz-date`
/// signed).
struct SigV4<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    region: &'a str,
    method: &'a str,
    host: &'a str,
    /// Already URI-encoded.
    path: &'a str,
    /// Already encoded and sorted.
    canonical_query: &'a str,
    payload_hash: &'a str,
    /// `YYYYMMDDTHHMMSSZ`
    amz_date: &'a str,
}

impl SigV4<'_> {
    /// The `Authorization` header value.
    fn authorization(&self) -> String {
        let signed_headers = "host;x-amz-content-sha256;x-amz-date";
        let canonical_request = format!(
            "{}\n{}\n{}\nhost:{}\nx-amz-content-sha256:{}\nx-amz-date:{}\n\n{signed_headers}\n{}",
            self.method,
            self.path,
            self.canonical_query,
            self.host,
            self.payload_hash,
            self.amz_date,
            self.payload_hash,
        );
        let date = &self.amz_date[..8];
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
            self.amz_date,
            hex(&Sha256::digest(canonical_request.as_bytes()))
        );
        let mut signing_key = format!("AWS4{}", self.secret_access_key).into_bytes();
        for part in [date, self.region, "s3", "aws4_request"] {
            signing_key = hmac_sha256(&signing_key, part.as_bytes()).to_vec();
        }
        let signature = hex(&hmac_sha256(&signing_key, string_to_sign.as_bytes()));
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            self.access_key_id
        )
    }
}

/// The garage binary: `PATH`, then `$BERTH_PEERS_DIR/bin`, then `~/.cache/berth/peers/bin`,
/// where scripts/install-test-peers.sh builds it (it is not a Debian package).
///
/// Panics when it is missing: a test that needs a peer must fail loudly, not skip.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let peers_dirs = [
        std::env::var_os("BERTH_PEERS_DIR").map(PathBuf::from),
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/berth/peers")),
    ];
    std::env::split_paths(&path)
        .chain(peers_dirs.into_iter().flatten().map(|dir| dir.join("bin")))
        .map(|dir| dir.join("garage"))
        .find(|candidate| super::is_executable(candidate))
        .unwrap_or_else(|| {
            panic!(
                "garage not found in PATH, $BERTH_PEERS_DIR/bin or ~/.cache/berth/peers/bin: \
                 run scripts/install-test-peers.sh (its first build takes ~16+ min on 2 cores)"
            )
        })
}

/// Three free ports, distinct: all listeners are held until each has been picked, since
/// Garage must be told all of them up front.
fn distinct_free_ports() -> [u16; 3] {
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    let port = |n: usize| listeners[n].local_addr().expect("local_addr").port();
    [port(0), port(1), port(2)]
}

fn config_path(dir: &Path) -> PathBuf {
    dir.join("garage.toml")
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("garage.log")
}

/// A TOML basic string; JSON string syntax is valid TOML.
fn quoted(value: &str) -> String {
    serde_json::to_string(value).expect("string to JSON")
}

fn render_config(dir: &Path, s3_port: u16, rpc_port: u16, admin_port: u16) -> String {
    // Secrets only need to differ between nodes, so no two tests' nodes ever talk: the
    // tempdir path and the clock are unique enough, and no `rand` dependency is needed.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    let seed = format!("{}:{nanos}", dir.display());
    let rpc_secret = hex(&Sha256::digest(format!("rpc:{seed}")));
    let admin_token = hex(&Sha256::digest(format!("admin:{seed}")));
    format!(
        "metadata_dir = {meta}
data_dir = {data}
db_engine = \"sqlite\"
replication_factor = 1

rpc_bind_addr = \"127.0.0.1:{rpc_port}\"
rpc_public_addr = \"127.0.0.1:{rpc_port}\"
rpc_secret = \"{rpc_secret}\"

[s3_api]
s3_region = \"{REGION}\"
api_bind_addr = \"127.0.0.1:{s3_port}\"
root_domain = \".s3.garage.localhost\"

[admin]
api_bind_addr = \"127.0.0.1:{admin_port}\"
admin_token = \"{admin_token}\"
",
        meta = quoted(&dir.join("meta").to_string_lossy()),
        data = quoted(&dir.join("data").to_string_lossy()),
    )
}

/// The value after `label` in the CLI's tab-aligned tables (`Key ID:\tGK...`).
fn table_value(stdout: &str, label: &str) -> String {
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| panic!("no {label:?} in garage output:\n{stdout}"))
}

/// The text of every `<tag>…</tag>` element, unescaped. S3 list answers are flat enough
/// that this is all the XML these tests need, and it avoids an XML crate.
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut values = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        rest = &rest[start + open.len()..];
        let end = rest
            .find(&close)
            .unwrap_or_else(|| panic!("unclosed <{tag}> in {xml}"));
        values.push(xml_unescape(&rest[..end]));
        rest = &rest[end + close.len()..];
    }
    values
}

fn xml_unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// SigV4's URI encoding: everything but unreserved characters as `%XX`; `/` too, except in
/// an object key's path.
fn uri_encode(value: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            b'/' if !encode_slash => out.push('/'),
            _ => write!(out, "%{byte:02X}").expect("write to String"),
        }
    }
    out
}

/// `YYYYMMDDTHHMMSSZ` in UTC, the date form SigV4 signs (its first 8 are the scope's date).
fn amz_date(now: SystemTime) -> String {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// HMAC-SHA256, with the RustCrypto `hmac` crate berth itself signs with.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            write!(out, "{b:02x}").expect("write to String");
            out
        })
}

#[cfg(test)]
mod tests {
    // The benches include this harness without a test harness: their #[test]s vanish.
    #[allow(unused_imports)]
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn amz_dates_are_utc_civil_dates() {
        // 2013-05-24T00:00:00Z, the date of AWS's SigV4 examples; and a leap day.
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(amz_date(at(1_369_353_600)), "20130524T000000Z");
        assert_eq!(amz_date(at(951_782_400 + 3_661)), "20000229T010101Z");
    }

    #[test]
    fn sigv4_matches_aws_list_objects_example() {
        // "GET Bucket (List Objects)" from AWS's SigV4 header-signing examples.
        let empty = hex(&Sha256::digest(b""));
        let auth = SigV4 {
            access_key_id: "AKIAIOSFODNN7EXAMPLE",
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            method: "GET",
            host: "examplebucket.s3.amazonaws.com",
            path: "/",
            canonical_query: "max-keys=2&prefix=J",
            payload_hash: &empty,
            amz_date: "20130524T000000Z",
        }
        .authorization();
        assert!(
            auth.ends_with(
                "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
            ),
            "{auth}"
        );
    }
}
