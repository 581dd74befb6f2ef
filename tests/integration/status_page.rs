//! The status page at the admin listener's `/`, rendered by a real browser (headless
//! Chromium): after a pull, the numbers it shows are the numbers `GET /admin/status` gives.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use crate::support::JsonAnswer as _;
use crate::support::{http, require_tool, run_with_timeout_async, CommandOutput};

/// Runs headless Chromium on `url` with `args` appended, in a fresh profile.
///
/// `--virtual-time-budget` lets the page's first poll of `admin/status` finish (and the
/// page settle) before Chromium dumps the DOM or takes the screenshot.
async fn chromium(profile: &Path, args: &[String], url: &str) -> CommandOutput {
    let mut cmd = Command::new(require_tool("chromium"));
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--virtual-time-budget=8000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url);
    run_with_timeout_async(cmd, Duration::from_secs(60))
        .await
        .expect_success("chromium")
}

/// The text of the first `<td class="{class}" ...>` inside `row` (serialized DOM).
fn cell(row: &str, class: &str) -> Option<String> {
    let open = format!("<td class=\"{class}\"");
    let start = row.find(&open)?;
    let rest = &row[start..];
    let text = &rest[rest.find('>')? + 1..];
    Some(text[..text.find("</td>")?].to_owned())
}

/// The serialized `<tr data-upstream="{host}">` row.
fn upstream_row<'a>(dom: &'a str, host: &str) -> Option<&'a str> {
    let start = dom.find(&format!("<tr data-upstream=\"{host}\""))?;
    let row = &dom[start..];
    Some(&row[..row.find("</tr>")?])
}

/// The opening tag of the element with `id`, attributes included.
fn opening_tag<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    Some(&dom[start..at + dom[at..].find('>')? + 1])
}

/// Whether the error banner is showing.
fn banner_shown(dom: &str) -> bool {
    opening_tag(dom, "error").is_some_and(|tag| tag.contains("shown"))
}

/// The text of the element with `id` (no nested elements).
fn by_id(dom: &str, id: &str) -> Option<String> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[start..];
    let text = &rest[rest.find('>')? + 1..];
    Some(text[..text.find('<')?].to_owned())
}

/// A JSON number (or null) as the page prints it: the number, or "–" for null.
fn shown(v: &serde_json::Value) -> String {
    v.as_u64().map_or("–".to_owned(), |n| n.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn status_page_shows_what_admin_status_says() {
    let w = World::start("10m").await;
    let img = w
        .push_image("library/status", "v1", &[256 * KIB, 64 * KIB], 180)
        .await;
    let base = w.berth.url();
    // Pull the image twice: the first pass misses (and spends a token), the second hits.
    for _ in 0..2 {
        let r = get(&format!("{base}/v2/library/status/manifests/v1"), false).await;
        assert_eq!(r.status(), 200, "berth log:\n{}", w.berth.log());
        for (digest, _) in &img.layers {
            let r = get(&format!("{base}/v2/library/status/blobs/{digest}"), false).await;
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
    }

    let admin = w.berth.admin_url();
    let page = http().get(format!("{admin}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        header(&page, "content-type").starts_with("text/html"),
        "{:?}",
        page.headers()
    );

    let profile = tempfile::tempdir().unwrap();
    let out = chromium(
        profile.path(),
        &["--dump-dom".to_owned()],
        &format!("{admin}/"),
    )
    .await;
    let dom = out.stdout;
    // Read the JSON after the page did: nothing pulls in between, so the numbers agree
    // (tokens only refill, and docker.io's bucket is full again only after minutes).
    let status: serde_json::Value = http()
        .get(format!("{admin}/admin/status"))
        .json_answer()
        .await;

    let row = upstream_row(&dom, "docker.io")
        .unwrap_or_else(|| panic!("no docker.io row in the rendered page:\n{dom}"));
    let docker = status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["host"] == "docker.io")
        .unwrap_or_else(|| panic!("{status}"));
    let quota = &docker["quota"];
    assert!(
        quota["capacity"].is_u64(),
        "docker.io has a quota: {status}"
    );
    for (class, field) in [("tokens", "tokens"), ("capacity", "capacity")] {
        assert_eq!(
            cell(row, class).as_deref(),
            Some(shown(&quota[field]).as_str()),
            "{class} in row {row}\nstatus: {status}"
        );
    }
    assert!(
        quota["tokens"].as_u64() < quota["capacity"].as_u64(),
        "the miss spent a token: {status}"
    );

    // The hit ratio, as a percentage with one decimal.
    let ratio = status["requests"]["hit_ratio"]
        .as_f64()
        .unwrap_or_else(|| panic!("lookups happened: {status}"));
    assert!(
        ratio > 0.0 && ratio < 1.0,
        "one miss pass, one hit pass: {status}"
    );
    assert_eq!(
        by_id(&dom, "hit-ratio").as_deref(),
        Some(format!("{:.1}%", ratio * 100.0).as_str()),
        "{dom}"
    );
    assert_eq!(
        by_id(&dom, "version").as_deref(),
        status["version"].as_str()
    );
    assert!(!banner_shown(&dom), "the error banner is up:\n{dom}");

    // A screenshot renders too (a blank or failed page still gives a PNG, so check size).
    let shots = tempfile::tempdir().unwrap();
    let png = shots.path().join("status.png");
    chromium(
        profile.path(),
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1200,900".to_owned(),
        ],
        &format!("{admin}/"),
    )
    .await;
    let bytes = std::fs::read(&png).expect("chromium wrote no screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(bytes.len() > 10_000, "a {} byte screenshot", bytes.len());
}

/// The error banner shows when `admin/status` cannot be read: the page berth serves,
/// opened from a file, where its fetch of `admin/status` fails.
#[tokio::test(flavor = "multi_thread")]
async fn status_page_shows_an_error_banner_when_status_fails() {
    let w = World::start("10m").await;
    let html = http()
        .get(format!("{}/", w.berth.admin_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let file = w.dir.path().join("index.html");
    std::fs::write(&file, html).unwrap();
    let out = chromium(
        &w.dir.path().join("profile"),
        &["--dump-dom".to_owned()],
        &format!("file://{}", file.display()),
    )
    .await;
    assert!(banner_shown(&out.stdout), "{}", out.stdout);
    assert!(
        out.stdout.contains("Cannot load admin/status"),
        "{}",
        out.stdout
    );
}
