//! What this binary is: the version from the git tag it was built from (the crate's version
//! when there is none) and the commit, fixed at build time by `build.rs`. `version` prints
//! them and the operator exports them as `sovereign_build_info`.

mod describe;

pub use describe::version_from_describe;

/// The released version (`0.2.0`), git's description of an untagged commit after a release
/// (`0.2.0-3-gabc1234`), or the crate's version when the build had no tag to go by.
pub const VERSION: &str = env!("SOVEREIGN_BUILD_VERSION");

/// The commit the binary was built from (full hash), or `unknown` (built outside git without
/// `SOVEREIGN_COMMIT`).
pub const COMMIT: &str = env!("SOVEREIGN_BUILD_COMMIT");

/// The line `version` prints; its second word is the version (scripts read it so).
pub fn line() -> String {
    format!("sovereign-operator {VERSION} (commit {COMMIT})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_tag_is_the_version_without_its_v() {
        assert_eq!(version_from_describe(Some("v0.2.0\n"), "0.1.0"), "0.2.0");
        assert_eq!(version_from_describe(Some("v1.0.0-rc.1"), "1.0.0"), "1.0.0-rc.1");
    }

    #[test]
    fn a_commit_after_a_tag_says_how_far_after() {
        assert_eq!(version_from_describe(Some("v0.2.0-3-gabc1234"), "0.2.0"), "0.2.0-3-gabc1234");
    }

    #[test]
    fn without_a_release_tag_the_crate_version_stands() {
        assert_eq!(version_from_describe(None, "0.1.0"), "0.1.0");
        assert_eq!(version_from_describe(Some(""), "0.1.0"), "0.1.0");
        // Not a release tag: a bare commit (describe --always) or a tag that is no version.
        assert_eq!(version_from_describe(Some("abc1234"), "0.1.0"), "0.1.0");
        assert_eq!(version_from_describe(Some("very-old"), "0.1.0"), "0.1.0");
    }

    #[test]
    fn the_build_fixed_a_version_and_a_commit() {
        assert!(!VERSION.is_empty() && !VERSION.starts_with('v'), "{VERSION}");
        assert!(
            COMMIT == "unknown" || (COMMIT.len() == 40 && COMMIT.chars().all(|c| c.is_ascii_hexdigit())),
            "{COMMIT}"
        );
        assert_eq!(line().split_whitespace().nth(1), Some(VERSION));
    }
}
