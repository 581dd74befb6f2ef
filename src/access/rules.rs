//! The `[[access]]` rules, parsed: who each is for, and the repositories it allows.

use std::net::IpAddr;

use super::Principal;
use crate::config::Config;
use crate::net::Cidr;
use crate::oci::Pattern;

/// One `[[access]]` rule, parsed.
pub(super) struct Rule {
    /// `None`: any principal.
    principals: Option<Vec<String>>,
    networks: Vec<Cidr>,
    repositories: Vec<Pattern>,
}

impl Rule {
    fn is_for(&self, principal: &Principal, peer: IpAddr) -> bool {
        let who = self
            .principals
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == principal.name()));
        let from = self.networks.is_empty() || self.networks.iter().any(|c| c.contains(peer));
        who && from
    }
}

/// Reads `[[access]]`: aliases in patterns become their upstream's host.
pub(super) fn parse(config: &Config) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for (i, r) in config.access.iter().enumerate() {
        let at = format!("access[{i}]");
        let principals = (!r.principals.is_empty() && !r.principals.iter().any(|p| p == "*"))
            .then(|| r.principals.clone());
        let networks = r
            .networks
            .iter()
            .map(|n| Cidr::parse(n).map_err(|e| format!("{at}.networks: {e}")))
            .collect::<Result<_, _>>()?;
        let mut repositories = Vec::new();
        for p in &r.repositories {
            let pattern = Pattern::parse(p).map_err(|e| format!("{at}.repositories: {e}"))?;
            let first = pattern
                .first_literal()
                .unwrap_or_default()
                .to_ascii_lowercase();
            let host = config
                .upstreams
                .iter()
                .find(|u| {
                    std::iter::once(&u.host)
                        .chain(&u.aliases)
                        .any(|h| h.eq_ignore_ascii_case(&first))
                })
                .map(|u| u.host.clone())
                .ok_or_else(|| {
                    format!("{at}.repositories: {p:?} does not start with a configured upstream")
                })?;
            let pattern = pattern.with_first(&host)?;
            repositories.push(docker_hub_library(&config.upstreams, &host, pattern)?);
        }
        rules.push(Rule {
            principals,
            networks,
            repositories,
        });
    }
    Ok(rules)
}

/// Whether any rule for `principal` at `peer` allows `host/repository`.
pub(super) fn allow(
    rules: &[Rule],
    principal: &Principal,
    peer: IpAddr,
    host: &str,
    repository: &str,
) -> bool {
    // Split once; every pattern of every rule matches against the same segments.
    let segments: Vec<&str> = std::iter::once(host).chain(repository.split('/')).collect();
    rules
        .iter()
        .filter(|r| r.is_for(principal, peer))
        .any(|r| r.repositories.iter().any(|p| p.matches_segments(&segments)))
}

/// Docker Hub names official images with one segment (`nginx`), and berth resolves them
/// to `library/nginx` before rules see them: a one-segment pattern under a Docker Hub
/// upstream (`docker.io/nginx`, `docker.io/*`) is read the same way.
fn docker_hub_library(
    upstreams: &[crate::config::UpstreamConfig],
    host: &str,
    pattern: Pattern,
) -> Result<Pattern, String> {
    let hub = upstreams
        .iter()
        .filter(|u| u.host == host)
        .flat_map(|u| std::iter::once(&u.host).chain(&u.aliases))
        .any(|h| h == "docker.io" || h.ends_with(".docker.io"));
    match pattern.as_str().split_once('/') {
        Some((first, rest)) if hub && !rest.contains('/') && rest != "**" => {
            Pattern::parse(&format!("{first}/library/{rest}"))
        }
        _ => Ok(pattern),
    }
}
