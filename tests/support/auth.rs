//! Client credentials for berth's `[auth]`, as operators make them: a `tokens_dir` and an
//! htpasswd file of bcrypt entries written by the real `htpasswd -B`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A `tokens_dir` under `dir`: one file per principal, its token followed by a newline
/// (as `kubectl create secret` and editors write them).
pub fn tokens_dir(dir: &Path, principals: &[(&str, &str)]) -> PathBuf {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).expect("create the tokens dir");
    for (name, token) in principals {
        std::fs::write(tokens.join(name), format!("{token}\n")).expect("write a token file");
    }
    tokens
}

/// An htpasswd file under `dir` with a bcrypt entry of `cost` per user, written by the
/// real `htpasswd -Bb -C <cost>` (the tool's own default cost is 5; operators are told 10+).
pub fn htpasswd_file(dir: &Path, users: &[(&str, &str)], cost: u32) -> PathBuf {
    let file = dir.join("htpasswd");
    for (i, (user, password)) in users.iter().enumerate() {
        let mut cmd = Command::new(super::require_tool("htpasswd"));
        cmd.arg(if i == 0 { "-Bbc" } else { "-Bb" })
            .args(["-C", &cost.to_string()])
            .arg(&file)
            .args([user, password]);
        super::run_with_timeout(cmd, Duration::from_secs(60)).expect_success("htpasswd -Bb");
    }
    let entries = std::fs::read_to_string(&file).expect("read the htpasswd file");
    for (user, _) in users {
        assert!(
            entries.contains(&format!("{user}:$2y${cost:02}$")),
            "htpasswd wrote no bcrypt entry of cost {cost} for {user}: {entries:?}"
        );
    }
    file
}
