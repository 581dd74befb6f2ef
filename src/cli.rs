//! The client side of the admin API: `berth status` and `berth warm`.

use std::fmt::Write as _;
use std::time::Duration;

use crate::proxy::WarmReport;
use crate::server::status::Status;

fn client() -> Result<reqwest::Client, String> {
    crate::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

fn bar(part: u64, whole: u64, width: usize) -> String {
    let filled = if whole == 0 {
        0
    } else {
        ((part.min(whole) as f64 / whole as f64) * width as f64).round() as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).to_string()
}

/// Fetches `/admin/status` and renders it as a table.
pub async fn status(admin: &str) -> Result<String, String> {
    let url = format!("{}/admin/status", admin.trim_end_matches('/'));
    let resp = client()?
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: {}", resp.status()));
    }
    let s: Status = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
    Ok(render(&s))
}

/// The status as `berth status` prints it: a summary, then a row per upstream.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    summary(&mut out, s);
    out.push('\n');
    upstream_table(&mut out, s);
    out
}

/// Uptime, hit ratio, bytes, store, fills, fleet and shared tier: a line each.
fn summary(out: &mut String, s: &Status) {
    let up = humantime::format_duration(Duration::from_secs(s.uptime_seconds));
    let _ = writeln!(out, "berth {}, up {up}", s.version);
    let ratio = s
        .requests
        .hit_ratio
        .map_or("n/a".to_owned(), |r| format!("{:.1}%", r * 100.0));
    let _ = writeln!(
        out,
        "hit ratio  {ratio} ({} of {} lookups; {} stale, {} errors)",
        s.requests.hits, s.requests.lookups, s.requests.stale, s.requests.errors
    );
    let saved = (s.bytes.served_from_cache + s.bytes.served_from_fills)
        .saturating_sub(s.bytes.fetched_upstream);
    let _ = writeln!(
        out,
        "bytes      {} served from cache, {} fetched upstream, {} saved",
        human(s.bytes.served_from_cache),
        human(s.bytes.fetched_upstream),
        human(saved)
    );
    let _ = writeln!(
        out,
        "store      {} {} of {}, {} blobs ({})",
        bar(s.store.bytes, s.store.max_bytes, 20),
        human(s.store.bytes),
        human(s.store.max_bytes),
        s.store.blobs,
        s.store.root
    );
    let _ = writeln!(out, "fills      {} in flight", s.fills_in_flight);
    if let Some(f) = &s.fleet {
        let _ = writeln!(
            out,
            "fleet      {} of {} replicas: {}",
            f.me,
            f.peers.len(),
            f.peers.join(", ")
        );
    }
    if let Some(sh) = &s.shared {
        let state = match &sh.error {
            None => "available".to_owned(),
            Some(e) => format!("UNAVAILABLE: {e}"),
        };
        let _ = writeln!(out, "shared     {} ({state})", sh.store);
    }
}

/// Each upstream's quota, tokens, the upstream's own count, cooldown and last error.
fn upstream_table(out: &mut String, s: &Status) {
    let _ = writeln!(
        out,
        "{:<20} {:<24} {:>9} {:>9} {:>9}  last error",
        "upstream", "quota", "tokens", "upstream", "cooldown"
    );
    for u in &s.upstreams {
        let q = &u.quota;
        let (quota_bar, tokens) = match (q.tokens, q.capacity) {
            (Some(t), Some(c)) => (bar(t, c, 20), format!("{t}/{c}")),
            _ => ("unlimited".to_owned(), "-".to_owned()),
        };
        let header = match (q.header_remaining, q.header_limit) {
            (Some(r), Some(l)) => format!("{r}/{l}"),
            _ => "-".to_owned(),
        };
        let cooldown = if q.cooldown_seconds > 0 {
            format!("{}s", q.cooldown_seconds)
        } else {
            "-".to_owned()
        };
        let error = u
            .last_error
            .as_ref()
            .map_or("none".to_owned(), |e| e.message.clone());
        let _ = writeln!(
            out,
            "{:<20} {:<24} {tokens:>9} {header:>9} {cooldown:>9}  {error}",
            u.host, quota_bar
        );
    }
}

/// Asks berth to warm `images` (with their signatures and referrers if `signatures`);
/// returns the report lines and whether all succeeded.
pub async fn warm(
    admin: &str,
    token: Option<&str>,
    images: &[String],
    signatures: bool,
) -> Result<(String, bool), String> {
    let url = format!("{}/admin/warm", admin.trim_end_matches('/'));
    let mut req = client()?
        .post(&url)
        .json(&serde_json::json!({ "images": images, "signatures": signatures }));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(format!("{url}: {status} {body}"));
    }
    #[derive(serde::Deserialize)]
    struct Results {
        results: Vec<WarmReport>,
    }
    let r: Results = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
    let mut out = String::new();
    let mut all_ok = true;
    for w in &r.results {
        if w.ok {
            let _ = writeln!(
                out,
                "ok      {}  {}  {} platform(s), {} blobs, {}",
                w.image,
                w.digest.as_deref().unwrap_or(""),
                w.platforms,
                w.blobs,
                human(w.bytes)
            );
            if signatures {
                let _ = writeln!(
                    out,
                    "        {} signature(s), attestation(s) and SBOM(s), {} referrer(s)",
                    w.signatures, w.referrers
                );
            }
        } else {
            all_ok = false;
            let _ = writeln!(
                out,
                "FAILED  {}  {}",
                w.image,
                w.error.as_deref().unwrap_or("")
            );
        }
    }
    Ok((out, all_ok))
}

/// containerd's `hosts.toml` for one upstream: `server` is the registry, the one `host`
/// is berth, with `token` as a bearer token in the header table containerd sends with
/// every request to it (berth's `[auth] tokens_dir`). Serialized by `toml` (an endpoint
/// is quoted and escaped as TOML wants).
fn hosts_toml(server: &str, endpoint: &str, token: Option<&str>) -> Result<String, String> {
    let mut host = toml::Table::new();
    host.insert(
        "capabilities".into(),
        toml::Value::Array(vec!["pull".into(), "resolve".into()]),
    );
    host.insert("dial_timeout".into(), "3s".into());
    if let Some(token) = token {
        let mut header = toml::Table::new();
        header.insert("Authorization".into(), format!("Bearer {token}").into());
        host.insert("header".into(), toml::Value::Table(header));
    }
    let mut hosts = toml::Table::new();
    hosts.insert(endpoint.into(), toml::Value::Table(host));
    let mut file = toml::Table::new();
    file.insert("server".into(), server.into());
    file.insert("host".into(), toml::Value::Table(hosts));
    toml::to_string(&file).map_err(|e| format!("hosts.toml: {e}"))
}

/// The token of `--token-file`: its content, trimmed, which must be a usable header value
/// (visible ASCII, no spaces).
fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "--token-file {}: a token is one word of visible ASCII characters",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

/// Writes `<out>/<host>/hosts.toml` for each configured upstream (or those in `only`):
/// berth first for pull and resolve, with a short dial timeout, and the registry itself as
/// `server`, the fallback containerd uses when berth does not answer. With `token_file`,
/// every request to berth carries its token (`Authorization: Bearer`), and the files,
/// which then hold a secret, are readable by their owner only.
pub fn containerd_config(
    config: &crate::config::Config,
    endpoint: &str,
    out: &std::path::Path,
    only: &[String],
    token_file: Option<&std::path::Path>,
) -> Result<Vec<std::path::PathBuf>, String> {
    let token = token_file.map(read_token).transpose()?;
    let url = reqwest::Url::parse(endpoint).map_err(|e| format!("--endpoint {endpoint:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "--endpoint {endpoint:?} must be an http:// or https:// URL"
        ));
    }
    let endpoint = endpoint.trim_end_matches('/');
    for wanted in only {
        if !config.upstreams.iter().any(|u| &u.host == wanted) {
            return Err(format!(
                "--upstreams: {wanted:?} is not a configured upstream"
            ));
        }
    }
    let mut written = Vec::new();
    for u in &config.upstreams {
        if !only.is_empty() && !only.contains(&u.host) {
            continue;
        }
        let dir = out.join(&u.host);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("hosts.toml");
        let text = format!(
            "# Written by `berth containerd-config`: pull {} through berth, falling back to\n\
             # the registry itself when berth does not answer.\n{}",
            u.host,
            hosts_toml(u.url.trim_end_matches('/'), endpoint, token.as_deref())?
        );
        write_file(&path, &text, token.is_some())?;
        written.push(path);
    }
    Ok(written)
}

/// Writes `text` to `path` whole (aside, then renamed), mode 0600 if it holds a secret.
fn write_file(path: &std::path::Path, text: &str, secret: bool) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let aside = path.with_extension("toml.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&aside)
        .map_err(at)?;
    file.write_all(text.as_bytes()).map_err(at)?;
    drop(file);
    std::fs::rename(&aside, path).map_err(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_toml_reads_back_as_containerd_expects() {
        let text =
            hosts_toml("https://registry-1.docker.io", "http://10.0.0.7:5000", None).unwrap();
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(
            parsed["server"].as_str(),
            Some("https://registry-1.docker.io")
        );
        let host = &parsed["host"]["http://10.0.0.7:5000"];
        assert_eq!(host["dial_timeout"].as_str(), Some("3s"));
        let caps: Vec<_> = host["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(caps, ["pull", "resolve"]);
        // A character TOML must escape stays the endpoint's own.
        let odd = hosts_toml("https://r.example", "http://h:1/a\"b", None).unwrap();
        let parsed: toml::Table = odd.parse().unwrap();
        assert!(parsed["host"].get("http://h:1/a\"b").is_some(), "{odd}");
    }

    #[test]
    fn a_token_goes_in_the_header_table() {
        let text = hosts_toml("https://r.example", "http://b:5000", Some("tok-1")).unwrap();
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(
            parsed["host"]["http://b:5000"]["header"]["Authorization"].as_str(),
            Some("Bearer tok-1")
        );
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "two words\n").unwrap();
        assert!(read_token(&bad).unwrap_err().contains("one word"));
        let good = dir.path().join("good");
        std::fs::write(&good, "tok-2\n").unwrap();
        assert_eq!(read_token(&good).unwrap(), "tok-2");
    }
}
