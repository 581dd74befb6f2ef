//! Issue 7, test 4: the Dockerfile (which cannot be built here: no Docker engine) names
//! only paths that exist, runs as non-root, and ships only the binary and the default
//! configuration.

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn dockerfile_paths_exist_and_the_final_stage_is_minimal_and_non_root() {
    let text = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).expect("Dockerfile");
    // Join continuation lines, drop comments.
    let joined = text.replace("\\\n", " ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let stages: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "a multi-stage build");
    let last = *stages.last().unwrap();

    // Every COPY from the build context names a path in the repository.
    for line in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
    {
        let words: Vec<&str> = line
            .split_whitespace()
            .skip(1)
            .filter(|w| !w.starts_with("--"))
            .collect();
        for src in &words[..words.len() - 1] {
            assert!(
                std::path::Path::new(&format!("{ROOT}/{src}")).exists(),
                "Dockerfile copies {src}, which is not in the repository"
            );
        }
    }
    // The build is locked to Cargo.lock.
    assert!(lines
        .iter()
        .any(|l| l.contains("cargo build") && l.contains("--locked")));

    let final_stage = &lines[last..];
    let user = final_stage
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the final stage sets USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "runs as {user}");
    // What the final stage copies: the binary, the default config, and the empty data dir
    // (copied only to give it to the non-root user).
    let copied: Vec<String> = final_stage
        .iter()
        .filter(|l| l.starts_with("COPY "))
        .map(|l| l.split_whitespace().last().unwrap().to_owned())
        .collect();
    assert_eq!(
        copied,
        ["/usr/local/bin/berth", "/etc/berth/berth.toml", "/var/lib/"],
        "the final stage copies only the binary and the default configuration"
    );
    assert!(final_stage
        .iter()
        .any(|l| l.starts_with("EXPOSE") && l.contains("5000") && l.contains("5001")));
    assert!(final_stage.iter().any(|l| l.starts_with("CMD")
        && l.contains("\"serve\"")
        && l.contains("/etc/berth/berth.toml")));
    // The config it ships is the embedded default, and valid.
    berth::config::Config::load(std::path::Path::new(&format!("{ROOT}/config/berth.toml")))
        .expect("config/berth.toml is valid");
}
