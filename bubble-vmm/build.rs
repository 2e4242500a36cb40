//! Builds the bare-metal guest shim with the stable toolchain for the host
//! triple and hands its path to the crate (`BUBBLE_SHIM_ELF`).
//!
//! The shim is its own cargo workspace with its own target directory under
//! `OUT_DIR`; the outer build's environment (RUSTFLAGS, target dir, jobserver
//! settings of this build script) must not leak into it.

// A build script reports a failure by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let shim = manifest
        .join("../guest-shim")
        .canonicalize()
        .expect("guest-shim dir");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out.join("shim-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let triple = "x86_64-unknown-linux-gnu";
    let link = shim.join("link.ld");
    let flags = [
        "-C",
        "relocation-model=static",
        "-C",
        "link-arg=-nostartfiles",
        "-C",
        "link-arg=-nostdlib",
        "-C",
        "link-arg=-static",
        "-C",
        &format!("link-arg=-T{}", link.display()),
    ]
    .join("\x1f");

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&shim)
        .args(["build", "--release", "--locked", "--target", triple])
        .arg("--target-dir")
        .arg(&target_dir);
    const LEAKY: &[&str] = &[
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOCFLAGS",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
    ];
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let leaky = (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k.starts_with("DEP_")
            || LEAKY.contains(&k.as_str());
        if leaky {
            cmd.env_remove(&k);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags);
    let status = cmd.status().expect("running cargo for the guest shim");
    assert!(status.success(), "building the guest shim failed");
    let elf = target_dir
        .join(triple)
        .join("release")
        .join("bubble-guest-shim");
    println!("cargo:rustc-env=BUBBLE_SHIM_ELF={}", elf.display());
    for f in ["src", "Cargo.toml", "Cargo.lock", "link.ld"] {
        println!("cargo:rerun-if-changed={}", shim.join(f).display());
    }
    // The shim's path dependencies: a change to either must rebuild it.
    for dep in ["../bubble-abi", "../keys"] {
        for f in ["src", "Cargo.toml"] {
            println!(
                "cargo:rerun-if-changed={}",
                manifest.join(dep).join(f).display()
            );
        }
    }
}
