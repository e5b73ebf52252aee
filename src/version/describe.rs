//! The version a build reports, from what `git describe` says of its commit. Shared by the
//! build script (which runs git) and the library (whose tests pin the rules).

/// The version for a build: the release tag it was built from without its `v` (`v0.2.0` gives
/// `0.2.0`), or git's description of a commit after one (`0.2.0-3-gabc1234`: three commits
/// after v0.2.0); the crate's version when no `v<digit>` tag is reachable (no tag, no git, or a
/// source archive without `.git`).
pub fn version_from_describe(describe: Option<&str>, crate_version: &str) -> String {
    match describe.map(str::trim).and_then(|d| d.strip_prefix('v')) {
        Some(v) if v.starts_with(|c: char| c.is_ascii_digit()) => v.to_string(),
        _ => crate_version.to_string(),
    }
}
