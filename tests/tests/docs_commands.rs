//! What `docs/*.md` show of the interfaces exists in the code, so the
//! documents cannot drift from it (issue 14). The README's commands are
//! run end to end by `readme.rs`; the documents' command lines are
//! synopses (`[--batch-size 16]`, `T`, `FILE`), so here each one is
//! checked against the CLI itself: every subcommand named is one
//! `bubblectl` has, and every flag given is one that subcommand (or the
//! top level) accepts. Configuration blocks are parsed by the code that
//! reads them: the broker's file configuration and the attestation
//! policy, with `<N hex digits>` placeholders filled in.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bubble_e2e_tests::*;

fn docs() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = Vec::new();
    for e in std::fs::read_dir(root.join("docs")).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "md") {
            out.push((p.clone(), std::fs::read_to_string(&p).unwrap()));
        }
    }
    out.sort();
    assert!(out.len() >= 5, "docs/ not found");
    out
}

/// Logical `bubblectl …` lines of the indented or fenced code of `text`,
/// with their line numbers.
fn ctl_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    let mut fenced = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let code = if fenced {
            Some(line.trim())
        } else {
            line.strip_prefix("    ").map(str::trim)
        };
        let Some(code) = code else { continue };
        let code = code.strip_prefix("$ ").unwrap_or(code);
        // A comment after the command.
        let code = code.find("  #").map_or(code, |k| code[..k].trim_end());
        let (head, more) = match code.strip_suffix('\\') {
            Some(h) => (h.trim(), true),
            None => (code, false),
        };
        match &mut cur {
            Some((_, s)) => {
                s.push(' ');
                s.push_str(head);
            }
            None if head.starts_with("bubblectl ") => cur = Some((i + 1, head.to_string())),
            None => continue,
        }
        if !more {
            out.extend(cur.take());
        }
    }
    // Inline code spans in prose: `bubblectl attach PROFILE`.
    for (i, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(k) = rest.find("`bubblectl ") {
            let span = &rest[k + 1..];
            let Some(end) = span.find('`') else { break };
            out.push((i + 1, span[..end].to_string()));
            rest = &span[end..];
        }
    }
    out
}

/// What `bubblectl PATH --help` says: its subcommands and its flags,
/// each with whether it takes a value.
#[derive(Debug, Default)]
struct Help {
    commands: Vec<String>,
    flags: HashMap<String, bool>,
}

fn help<'a>(cache: &'a mut HashMap<Vec<String>, Help>, path: &[String]) -> &'a Help {
    cache.entry(path.to_vec()).or_insert_with(|| {
        let out = Command::new(ctl_bin())
            .args(path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bubblectl {} --help failed: {}",
            path.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        parse_help(&String::from_utf8_lossy(&out.stdout))
    })
}

fn parse_help(text: &str) -> Help {
    let mut h = Help::default();
    let mut in_commands = false;
    for line in text.lines() {
        if !line.starts_with(' ') {
            in_commands = line.trim_end() == "Commands:";
            continue;
        }
        let t = line.trim_start();
        if in_commands && line.starts_with("  ") && !line.starts_with("   ") {
            if let Some(name) = t.split_whitespace().next() {
                h.commands.push(name.trim_end_matches(',').to_string());
            }
        }
        // "-q, --quiet", "--endpoint <URL>", "--output <OUTPUT>".
        let mut words = t.split_whitespace().peekable();
        while let Some(w) = words.next() {
            let w = w.trim_end_matches(',');
            if !w.starts_with('-') {
                break;
            }
            let (name, inline) = match w.split_once('=') {
                Some((n, _)) => (n, true),
                None => (w, false),
            };
            let value = inline || words.peek().is_some_and(|n| n.starts_with('<'));
            h.flags.insert(name.to_string(), value);
        }
    }
    h
}

/// Whether a word is a placeholder or an argument rather than a
/// subcommand: upper case, bracketed, a path, a number, quoted.
fn is_argument(w: &str) -> bool {
    !w.chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        || w.chars().all(|c| c.is_ascii_digit())
}

/// Checks one documented command line; returns what is wrong.
fn check_line(cache: &mut HashMap<Vec<String>, Help>, line: &str) -> Vec<String> {
    let words: Vec<String> = line
        .split_whitespace()
        .skip(1)
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
        .filter(|w| !w.is_empty() && w != "|" && w != "...")
        .collect();
    let mut path: Vec<String> = Vec::new();
    let mut errors = Vec::new();
    let mut descending = true;
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        i += 1;
        if let Some(flag) = w.strip_prefix('-').map(|_| w.as_str()) {
            let (name, inline) = match flag.split_once('=') {
                Some((n, _)) => (n.to_string(), true),
                None => (flag.to_string(), false),
            };
            // Alternatives written `--a|--b`.
            let names: Vec<&str> = name.split('|').collect();
            let here = help(cache, &path).flags.clone();
            let top = help(cache, &[]).flags.clone();
            let mut found = None;
            for n in &names {
                if let Some(v) = here.get(*n).or_else(|| top.get(*n)) {
                    found = Some(*v);
                }
            }
            match found {
                None => errors.push(format!("`bubblectl {}` has no flag {name}", path.join(" "))),
                Some(takes) if takes && !inline => i += 1,
                Some(_) => {}
            }
            continue;
        }
        if descending && !is_argument(w) {
            let cmds = help(cache, &path).commands.clone();
            if cmds.iter().any(|c| c == w) {
                path.push(w.clone());
                continue;
            }
            if !cmds.is_empty() && path.is_empty() {
                errors.push(format!("bubblectl has no command {w:?}"));
            } else if !cmds.is_empty() {
                errors.push(format!(
                    "`bubblectl {}` has no command {w:?}",
                    path.join(" ")
                ));
            }
        }
        descending = false;
    }
    errors
}

#[test]
fn every_documented_bubblectl_command_and_flag_exists() {
    let mut cache = HashMap::new();
    let mut checked = 0;
    let mut errors = Vec::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = (
        root.join("README.md"),
        std::fs::read_to_string(root.join("README.md")).unwrap(),
    );
    for (path, text) in docs().into_iter().chain([readme]) {
        for (n, line) in ctl_lines(&text) {
            checked += 1;
            for e in check_line(&mut cache, &line) {
                errors.push(format!("{}:{n}: {line}\n    {e}", path.display()));
            }
        }
    }
    assert!(checked >= 20, "only {checked} documented commands found");
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// The checker itself finds what it is for: a made-up command or flag.
#[test]
fn the_checker_refuses_a_command_or_flag_that_does_not_exist() {
    let mut cache = HashMap::new();
    assert!(check_line(&mut cache, "bubblectl list --json").is_empty());
    assert!(!check_line(&mut cache, "bubblectl lisst").is_empty());
    assert!(!check_line(&mut cache, "bubblectl list --no-such-flag").is_empty());
    assert!(!check_line(&mut cache, "bubblectl trigger launch X").is_empty());
}

/// The fenced TOML blocks of `doc` after `marker`.
fn toml_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(k) = rest.find("```toml\n") {
        let body = &rest[k + 8..];
        let end = body.find("```").expect("closed block");
        out.push(body[..end].to_string());
        rest = &body[end..];
        rest = &rest[3..];
    }
    out
}

/// `<N hex digits>` placeholders filled with N hex digits.
fn fill_placeholders(block: &str) -> String {
    let mut s = block.to_string();
    while let Some(a) = s.find('<') {
        let b = a + s[a..].find('>').expect("closed placeholder");
        let n: usize = s[a + 1..b]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a `<N hex digits>` placeholder");
        s.replace_range(a..=b, &"a".repeat(n));
    }
    s
}

#[test]
fn the_documented_configuration_parses_as_the_broker_reads_it() {
    let (_, ops) = docs()
        .into_iter()
        .find(|(p, _)| p.ends_with("operations.md"))
        .unwrap();
    let blocks = toml_blocks(&ops);
    assert!(!blocks.is_empty(), "no TOML block in docs/operations.md");
    let dir = tempfile::tempdir().unwrap();
    for b in blocks {
        let p = dir.path().join("bubbled.toml");
        std::fs::write(&p, &b).unwrap();
        if let Err(e) = bubbled::config::FileConfig::load(&p) {
            panic!("docs/operations.md's configuration does not parse: {e}\n{b}");
        }
    }
}

#[test]
fn the_documented_attestation_policy_parses() {
    let (_, att) = docs()
        .into_iter()
        .find(|(p, _)| p.ends_with("attestation.md"))
        .unwrap();
    let blocks = toml_blocks(&att);
    assert!(!blocks.is_empty(), "no TOML block in docs/attestation.md");
    for b in blocks {
        let filled = fill_placeholders(&b);
        if let Err(e) = bubble_attestation::policy::Policy::from_toml(&filled) {
            panic!("docs/attestation.md's policy does not parse: {e}\n{filled}");
        }
    }
}
