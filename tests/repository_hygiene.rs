//! The repository speaks of the project alone. Every tracked file (every file under the
//! checkout but `target/` and `.git/` when git is not there to ask) is searched for words
//! that describe how the project was developed rather than what it is, and for paths outside
//! the repository that only one machine has. A reader has only this repository: a figure's
//! command must run from a clone, and a script must take an outside program from an argument
//! or an environment variable.
//!
//! The rules below spell the words they forbid, so this file is the one file left out.

use std::path::{Path, PathBuf};
use std::process::Command;

/// This file, relative to the repository root: it holds every forbidden word by necessity.
const SELF: &str = "tests/repository_hygiene.rs";

/// One thing a file must not say.
struct Rule {
    /// What the rule forbids, for the failure message.
    what: &'static str,
    /// The matched text, if the line breaks the rule: given the line as written and
    /// lowercased (words match in any case; the runner's output variable only in capitals: the
    /// lowercase name is an ordinary shell local).
    find: fn(&str, &str) -> Option<String>,
}

const RULES: &[Rule] = &[
    Rule {
        what: "a development session (a measurement is a dated run, not a session)",
        find: |_, l| whole_word(l, &["session", "sessions"]),
    },
    Rule {
        what: "a borrowed machine (`lent`)",
        find: |_, l| whole_word(l, &["lent"]),
    },
    Rule {
        what: "the people or programs that develop the project",
        find: |_, l| {
            // `ureq::Agent` is an HTTP client's type, not a person at work.
            let l = l.replace("::agent", "::");
            whole_word(&l, &["agent", "agents", "lead engineer", "the lead"])
                .or_else(|| helpers_at_work(&l))
        },
    },
    Rule {
        what: concat!(
            "the development machine's GPU runner (device",
            " tool, carried folders, $",
            "OUT)"
        ),
        find: |raw, l| {
            substring(
                l,
                &[
                    concat!("device", " tool"),
                    "carry [",
                    "carry: [",
                    "carry [\".device",
                    ".device carried",
                    "carried folder",
                ],
            )
            .or_else(|| out_variable(raw))
        },
    },
    Rule {
        what: "a numbered issue of the project's tracker (say what the text is about instead)",
        find: |_, l| numbered_issue(l),
    },
    Rule {
        what: "a path outside the repository (take it from an argument or environment variable)",
        find: |_, l| {
            substring(
                l,
                &[
                    concat!("/wo", "rk/"),
                    "/root/",
                    "/home/",
                    concat!("../sha", "red"),
                    "/opt/torch",
                    "/.venv/",
                ],
            )
            .or_else(|| fixed_tmp_path(l))
        },
    },
];

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The first of `words` that occurs in `line` with no letter, digit or `_` on either side.
fn whole_word(line: &str, words: &[&str]) -> Option<String> {
    let bytes = line.as_bytes();
    for w in words {
        for (i, _) in line.match_indices(w) {
            let before = i == 0 || !is_word_byte(bytes[i - 1]);
            let end = i + w.len();
            let after = end == bytes.len() || !is_word_byte(bytes[end]);
            if before && after {
                return Some(w.to_string());
            }
        }
    }
    None
}

fn substring(line: &str, needles: &[&str]) -> Option<String> {
    needles
        .iter()
        .find(|n| line.contains(*n))
        .map(|n| n.to_string())
}

/// "helpers compiling", "three helpers": people at work, not functions (`launch helpers`).
fn helpers_at_work(line: &str) -> Option<String> {
    const COUNTS: &[&str] = &[
        "one", "two", "three", "four", "five", "six", "seven", "eight", "other", "several",
    ];
    for word in ["helper", "helpers"] {
        for follow in ["compiling", "running", "working", "were", "was"] {
            let phrase = format!("{word} {follow}");
            if let Some(m) = whole_word(line, &[phrase.as_str()]) {
                return Some(m);
            }
        }
        for count in COUNTS {
            let phrase = format!("{count} {word}");
            if let Some(m) = whole_word(line, &[phrase.as_str()]) {
                return Some(m);
            }
        }
    }
    None
}

/// The runner's output variable, bare or in braces, not cargo's `OUT_DIR`.
fn out_variable(line: &str) -> Option<String> {
    let bytes = line.as_bytes();
    for (i, _) in line.match_indices(concat!("$", "OUT")) {
        let end = i + 4;
        if end == bytes.len() || !is_word_byte(bytes[end]) {
            return Some(concat!("$", "OUT").into());
        }
    }
    for (i, _) in line.match_indices("${OUT") {
        if matches!(bytes.get(i + 5), Some(b'}' | b':' | b'-')) {
            return Some("${OUT}".into());
        }
    }
    None
}

/// "issue 6", "issue #6", "issues 3 and 4", "issue item 7".
fn numbered_issue(line: &str) -> Option<String> {
    let bytes = line.as_bytes();
    for word in ["issue", "issues"] {
        for (i, _) in line.match_indices(word) {
            if i > 0 && is_word_byte(bytes[i - 1]) {
                continue;
            }
            let rest = &line[i + word.len()..];
            let Some(rest) = rest.strip_prefix(' ') else {
                continue;
            };
            let rest = rest.trim_start_matches('#');
            if rest.starts_with(|c: char| c.is_ascii_digit()) || rest.starts_with("item ") {
                let shown: String = line[i..].chars().take(word.len() + 8).collect();
                return Some(shown);
            }
        }
    }
    None
}

/// A fixed name under `/tmp/` (two programs, or two runs, would share it): use `mktemp`, or
/// `$TMPDIR`, or a path the caller gives.
fn fixed_tmp_path(line: &str) -> Option<String> {
    let bytes = line.as_bytes();
    for (i, _) in line.match_indices("/tmp/") {
        if i > 0 && (is_word_byte(bytes[i - 1]) || bytes[i - 1] == b'.') {
            continue; // `target/tmp/`, `./tmp/`: a folder of the repository
        }
        if bytes
            .get(i + 5)
            .is_some_and(|&b| is_word_byte(b) || b == b'.' || b == b'-')
        {
            let shown: String = line[i..]
                .chars()
                .take_while(|c| !c.is_whitespace() && !"\"'`)".contains(*c))
                .collect();
            return Some(shown);
        }
    }
    None
}

/// Every finding in `text`, as `line number: the rule: the match`.
fn findings(text: &str) -> Vec<(usize, &'static str, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let lower = line.to_lowercase();
        for rule in RULES {
            if let Some(m) = (rule.find)(line, &lower) {
                out.push((n + 1, rule.what, m));
            }
        }
    }
    out
}

/// The repository's files: `git ls-files` when git can answer, else a walk of the tree
/// without `target/` and `.git/` (a source archive has no `.git`).
fn repository_files(root: &Path) -> Vec<PathBuf> {
    let listed = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["ls-files", "-z"])
        .output();
    if let Ok(out) = listed {
        if out.status.success() {
            return out
                .stdout
                .split(|&b| b == 0)
                .filter(|p| !p.is_empty())
                .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
                .collect();
        }
    }
    let mut files = Vec::new();
    walk(root, Path::new(""), &mut files);
    files
}

fn walk(root: &Path, rel: &Path, files: &mut Vec<PathBuf>) {
    let dir = root.join(rel);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        let name = entry.file_name();
        let rel = rel.join(&name);
        let kind = entry.file_type().expect("file type");
        // `.git` is a folder in a clone and a file pointing elsewhere in a worktree.
        if name == ".git" {
            continue;
        }
        if kind.is_dir() {
            if rel != Path::new("target") {
                walk(root, &rel, files);
            }
        } else if kind.is_file() {
            files.push(rel);
        }
    }
}

#[test]
fn no_file_describes_how_the_project_is_developed_or_names_an_outside_path() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = repository_files(root);
    assert!(
        files.iter().any(|f| f == Path::new("README.md")),
        "the file list of {} lacks README.md: is this the repository root?",
        root.display()
    );
    let mut problems = Vec::new();
    let mut searched = 0;
    for rel in &files {
        if rel == Path::new(SELF) {
            continue;
        }
        // A tracked file deleted in the work tree, or a binary fixture: nothing to read.
        let Ok(bytes) = std::fs::read(root.join(rel)) else {
            continue;
        };
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        searched += 1;
        for (line, what, m) in findings(&text) {
            problems.push(format!("{}:{line}: `{m}`: {what}", rel.display()));
        }
    }
    assert!(searched > 50, "only {searched} text files searched");
    assert!(
        problems.is_empty(),
        "{} line(s) speak of how the project is developed or name a path outside it; \
         rewrite them to describe the project itself:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_rules_catch_what_they_forbid() {
    for line in [
        concat!("Sess", "ion 2 round, on main"),
        "in the same session",
        concat!("on a le", "nt GPU"),
        concat!("the device", " tool's call"),
        "with carry [\".device\"]",
        concat!("writes everything to $", "OUT."),
        "local out=\"${OUT:-x}\"",
        "issue 6",
        "(Issue #12)",
        "issue item 8",
        concat!("python3 ../sha", "red/reference/peer.py"),
        concat!("PEER=/wo", "rk/shared/reference/x.py"),
        concat!("py=/opt/torch/.ve", "nv/bin/python"),
        "out=/tmp/bench-out",
        "with three helpers compiling Rust",
        "ask the lead",
    ] {
        assert!(!findings(line).is_empty(), "nothing found in {line:?}");
    }
}

#[test]
fn the_rules_leave_ordinary_words_and_standard_paths_alone() {
    for line in [
        "the launch helpers choose the grid",
        "the shared helpers of every family",
        "`$OUT_DIR/kernels.rs` embeds the fatbins",
        "single elements near zero carry no information",
        "tee -a \"$out/bench.md\"",
        "so System's guarantees carry over",
        "this node does not lead to the output",
        "const DEFAULT_DIR: &str = \"/usr/share/datasets/fashion-mnist\";",
        "(cd /tmp && python3 -m pytest)",
        "link_dir=\"${TMPDIR:-/tmp}/recycle-nccl\"",
        "target/tmp/x",
        "the issues of numerical stability",
        "excellent results",
    ] {
        assert!(
            findings(line).is_empty(),
            "{line:?} flagged: {:?}",
            findings(line)
        );
    }
}
