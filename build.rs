//! Fixes the version and commit the binary reports (src/version.rs) at build time: from
//! SOVEREIGN_VERSION and SOVEREIGN_COMMIT when set (builds without `.git`, such as the
//! Dockerfile's), else from git (`git describe --tags --match 'v[0-9]*'`, `git rev-parse HEAD`).

use std::path::PathBuf;
use std::process::Command;

#[path = "src/version/describe.rs"]
mod describe;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/version/describe.rs");
    println!("cargo:rerun-if-env-changed=SOVEREIGN_VERSION");
    println!("cargo:rerun-if-env-changed=SOVEREIGN_COMMIT");
    let crate_version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    let given = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());

    // Build again when HEAD moves (a commit, a checkout) or a tag comes or goes; in a worktree
    // HEAD is in its own git dir and the refs in the common one.
    let git_dir = git(&["rev-parse", "--absolute-git-dir"]).map(PathBuf::from);
    let common = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]).map(PathBuf::from);
    if let (Some(dir), Some(common)) = (&git_dir, &common) {
        let mut watched = vec![dir.join("HEAD"), common.join("packed-refs"), common.join("refs/tags")];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(common.join(branch));
        }
        for path in watched.iter().filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }

    let version = match given("SOVEREIGN_VERSION") {
        Some(v) => describe::version_from_describe(Some(&format!("v{}", v.trim_start_matches('v'))), &crate_version),
        None => describe::version_from_describe(
            git(&["describe", "--tags", "--match", "v[0-9]*"]).as_deref(),
            &crate_version,
        ),
    };
    let commit = given("SOVEREIGN_COMMIT")
        .or_else(|| git_dir.as_ref().and_then(|_| git(&["rev-parse", "HEAD"])))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SOVEREIGN_BUILD_VERSION={version}");
    println!("cargo:rustc-env=SOVEREIGN_BUILD_COMMIT={commit}");
}
