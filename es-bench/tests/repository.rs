//! Checks on the repository itself: the declared minimum Rust version holds
//! for every locked dependency, and the documents' relative links resolve.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("es-bench lives in the workspace")
        .to_path_buf()
}

fn version(v: &str) -> (u64, u64, u64) {
    let mut parts = v.split('.').map(|p| {
        p.parse::<u64>()
            .unwrap_or_else(|_| panic!("not a Rust version: {v:?}"))
    });
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .unwrap_or_else(|e| panic!("run `{rustc} -vV`: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("`rustc -vV` names the host")
        .to_owned()
}

/// `cargo metadata` of the locked dependency graph, from the local registry
/// cache (only the host's dependencies are needed to build here, and only
/// those are downloaded).
fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host_triple()])
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .output()
        .unwrap_or_else(|e| panic!("run `{cargo} metadata`: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata --locked --offline failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

#[test]
fn no_locked_dependency_needs_a_newer_rust_than_the_workspace_declares() {
    let meta = metadata();
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let packages = meta["packages"].as_array().unwrap();
    let is_member = |p: &Value| members.contains(&p["id"].as_str().unwrap());

    let mut ours = None;
    for p in packages.iter().filter(|p| is_member(p)) {
        let declared = p["rust_version"].as_str().unwrap_or_else(|| {
            panic!(
                "workspace member `{}` declares no rust-version: add `rust-version.workspace = true`",
                p["name"]
            )
        });
        match ours {
            None => ours = Some(declared),
            Some(o) => assert_eq!(
                o, declared,
                "workspace members declare different rust-versions"
            ),
        }
    }
    let ours = ours.expect("the workspace has members");

    let mut too_new: Vec<String> = packages
        .iter()
        .filter(|p| !is_member(p))
        .filter_map(|p| {
            let theirs = p["rust_version"].as_str()?;
            (version(theirs) > version(ours))
                .then(|| format!("{} {} needs Rust {theirs}", p["name"], p["version"]))
        })
        .collect();
    too_new.sort();
    assert!(
        too_new.is_empty(),
        "the workspace declares rust-version = {ours:?}, but locked dependencies need more:\n  {}\n\
         Raise rust-version in Cargo.toml (and the README), or lock older versions.",
        too_new.join("\n  ")
    );

    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("Rust {ours}")),
        "the README should state the minimum Rust version, `Rust {ours}`"
    );
}

/// Relative links `](path)` of a Markdown file, without their `#anchor`.
fn relative_links(text: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = &rest[..end];
        let target = target.split('#').next().unwrap_or("");
        if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
            links.push(target.to_owned());
        }
    }
    links
}

#[test]
fn relative_links_of_the_documents_resolve() {
    let root = workspace_root();
    let mut docs = vec![root.join("README.md"), root.join("es-bench/README.md")];
    let dir = root.join("docs");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            docs.push(path);
        }
    }
    let mut broken = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        for link in relative_links(&text) {
            if !doc.parent().unwrap().join(&link).exists() {
                broken.push(format!(
                    "{}: {link}",
                    doc.strip_prefix(&root).unwrap().display()
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "broken links:\n  {}",
        broken.join("\n  ")
    );
    for name in ["WORKLOAD.md", "expected.py"] {
        assert!(root.join("es-bench").join(name).exists(), "es-bench/{name}");
    }
}
