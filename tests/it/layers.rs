//! The module families of src/ use each other in one direction only: each may use the ones
//! before it in [`LAYERS`] (the order a request travels, docs/design.md), never one after
//! it, so no cycle can come back. Read from the sources' `crate::` paths.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The families, bottom first. `lib.rs` and `main.rs` sit above them all.
const LAYERS: &[&str] = &[
    "os", "deadline", "syntax", "config", "observe", "policy", "sites", "streams", "tunnel",
    "request", "ops", "fleet", "demo", "app",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The family a file of src/ belongs to: its folder, or its own name at the top.
fn family(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The families a file's code names through `crate::` (comments left out).
fn uses(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // crate::{a::X, b::{Y, Z}}: the first segment of each item at depth one.
            let (mut depth, mut item_start) = (0usize, true);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        found.push(ident(&group[j..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.push(ident(rest));
        }
    }
    found.retain(|f| !f.is_empty());
    found
}

#[test]
fn module_families_use_each_other_in_one_direction_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let rank = |f: &str| LAYERS.iter().position(|l| *l == f);
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for file in &files {
        let from = family(&src, file);
        if from == "lib" || from == "main" {
            continue;
        }
        let Some(from_rank) = rank(&from) else {
            wrong.push(format!(
                "{}: family \"{from}\" is not in LAYERS",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        if text.contains("super::super::") {
            wrong.push(format!(
                "{}: reaches out of its family with super::super (name it through crate::)",
                file.display()
            ));
        }
        for to in uses(&text) {
            if to == from {
                continue;
            }
            // Names the crate re-exports at its root (crate::Config) are config's and the
            // like: resolve them by what lib.rs says; anything else must be a family.
            let to = match to.as_str() {
                "Config" | "ConfigError" | "Resource" => "config".to_string(),
                other => other.to_string(),
            };
            match rank(&to) {
                Some(to_rank) if to_rank < from_rank => {
                    edges
                        .entry((from.clone(), to))
                        .or_default()
                        .push(file.display().to_string());
                }
                Some(_) => wrong.push(format!(
                    "{}: {from} uses {to}, which comes after it",
                    file.display()
                )),
                None => wrong.push(format!(
                    "{}: uses crate::{to}, which is not a module family",
                    file.display()
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers ({LAYERS:?}):\n{}",
        wrong.join("\n")
    );
    // The check itself sees something: the request path uses the layers below it.
    assert!(edges.contains_key(&("request".into(), "policy".into())));
    assert!(edges.contains_key(&("tunnel".into(), "sites".into())));
}

#[test]
fn the_layer_check_reads_grouped_and_plain_paths() {
    let text = "use crate::{config::X, observe::{a::B, c}, policy};\n// crate::app is a comment\nlet x = crate::sites::f();";
    assert_eq!(uses(text), ["config", "observe", "policy", "sites"]);
}
