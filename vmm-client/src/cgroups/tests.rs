//! The cgroup code over a directory laid out as a cgroup hierarchy (v2,
//! which this v1 host cannot mount with controllers, and v1). A plain
//! directory stands for the kernel's: files written are kept as written,
//! and the kernel's `rmdir` of a cgroup (which ignores its interface
//! files) is emulated by removing the files first (`kernel_rmdir_ready`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A directory with a v2 root's `cgroup.controllers`.
fn v2_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(
        root.path().join("cgroup.controllers"),
        "cpuset cpu io memory hugetlb pids rdma misc\n",
    )
    .unwrap();
    root
}

/// A directory with v1 `memory`, `pids` and `cpu` controllers.
fn v1_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for ctl in ["memory", "pids", "cpu"] {
        std::fs::create_dir(root.path().join(ctl)).unwrap();
    }
    std::fs::write(
        root.path().join("memory/memory.limit_in_bytes"),
        "9223372036854771712\n",
    )
    .unwrap();
    root
}

/// Removes the regular files of `dir` and of its ancestors up to (not
/// including) `root`, as the kernel's `rmdir` disregards a cgroup's
/// interface files.
fn kernel_rmdir_ready(dir: &Path, root: &Path) {
    for d in dir.ancestors().take_while(|d| *d != root) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
}

fn bubble_dir(procs: &[PathBuf]) -> PathBuf {
    procs[0].parent().unwrap().to_path_buf()
}

#[test]
fn v2_prepare_enables_controllers_and_writes_the_limits() {
    let root = v2_root();
    let cg = Cgroups::detect_at(root.path(), "bubbled-unit", 1 << 30, false).unwrap();
    assert!(cg.v2());
    let procs = cg.prepare("shop", "b-1", 16 << 20).unwrap();
    assert_eq!(procs.len(), 1, "one unified hierarchy");
    let bdir = bubble_dir(&procs);
    let pdir = bdir.parent().unwrap();
    let base = root.path().join("bubbled-unit");
    assert_eq!(pdir.parent().unwrap(), base);
    assert_eq!(
        pdir.file_name().unwrap().to_str().unwrap(),
        parent_name("shop")
    );
    assert!(bdir
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("b-1.v"));
    // Controllers enabled on the way down, limits where they belong.
    for d in [root.path(), base.as_path(), pdir] {
        assert_eq!(
            read(&d.join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
    }
    assert_eq!(read(&pdir.join("memory.max")), (1u64 << 30).to_string());
    assert_eq!(
        read(&bdir.join("memory.max")),
        ((16u64 << 20) + VMM_OVERHEAD).to_string()
    );
    assert_eq!(read(&bdir.join("pids.max")), PIDS_MAX.to_string());
    assert_eq!(read(&bdir.join("cpu.weight")), "100");
    // No `tasks` files on v2: a spare cannot move itself, the broker
    // places the whole process.
    assert!(open_tasks(&procs).unwrap().is_none());
    place(&procs, 4242).unwrap();
    assert_eq!(read(&procs[0]), "4242");
}

#[test]
fn v2_removal_takes_the_bubble_and_the_sweep_the_unused_parent() {
    let root = v2_root();
    let cg = Cgroups::detect_at(root.path(), "bubbled-unit", 1 << 30, false).unwrap();
    let first = cg.prepare("shop", "b-1", 16 << 20).unwrap();
    let second = cg.prepare("shop", "b-2", 16 << 20).unwrap();
    let (d1, d2) = (bubble_dir(&first), bubble_dir(&second));
    let pdir = d1.parent().unwrap().to_path_buf();
    kernel_rmdir_ready(&d1, root.path());
    kernel_rmdir_ready(&d2, root.path());
    remove(&first);
    assert!(!d1.exists());
    assert!(pdir.exists(), "the parent still has a bubble");
    remove(&second);
    assert!(!d2.exists());
    // A parent's cgroup stays for its next bubble; the sweep removes it
    // once unused since the sweep before.
    assert!(pdir.exists(), "the parent went with its last bubble");
    kernel_rmdir_ready(&pdir, root.path());
    let swept: usize = (0..2).map(|_| cg.sweep_parents()).sum();
    assert_eq!(swept, 1);
    assert!(!pdir.exists(), "the unused parent was not swept");
    assert!(root.path().exists(), "never above the broker's hierarchy");
}

#[test]
fn v2_move_to_a_parent_places_the_process_and_warns_that_charges_stay() {
    let root = v2_root();
    let cg = Cgroups::detect_at(root.path(), "bubbled-unit", 1 << 30, false).unwrap();
    // A pooled bubble: parent "" (the pool), 12 MiB charged while pooled.
    let from = cg.prepare("", "b-pool", 16 << 20).unwrap();
    std::fs::write(bubble_dir(&from).join("memory.current"), "12582912\n").unwrap();
    let moved = cg
        .move_process(&from, "shop", "b-pool", 16 << 20, 4242, &|| false)
        .unwrap();
    let to = bubble_dir(&moved.procs);
    assert_eq!(
        to.parent().unwrap().file_name().unwrap().to_str().unwrap(),
        parent_name("shop")
    );
    assert_ne!(to.parent(), bubble_dir(&from).parent());
    assert_eq!(read(&moved.procs[0]), "4242");
    assert_eq!(
        read(&to.join("memory.max")),
        ((16u64 << 20) + VMM_OVERHEAD).to_string()
    );
    // v2 never moves charges, and is not asked to: said, with how much.
    assert!(!to.join("memory.move_charge_at_immigrate").exists());
    let warning = moved.warning.expect("a warning on v2");
    assert!(warning.contains("12288 KiB"), "{warning}");
    assert!(warning.contains("cgroup v2 never moves"), "{warning}");
}

#[test]
fn a_process_gone_before_its_move_is_not_placed() {
    let root = v2_root();
    let cg = Cgroups::detect_at(root.path(), "bubbled-unit", 1 << 30, false).unwrap();
    let from = cg.prepare("", "b-pool", 16 << 20).unwrap();
    let e = cg
        .move_process(&from, "shop", "b-pool", 16 << 20, 4242, &|| true)
        .unwrap_err();
    assert!(matches!(e, CgroupError::Gone), "{e:?}");
    let shop = root.path().join("bubbled-unit").join(parent_name("shop"));
    let placed = std::fs::read_dir(&shop)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().join("cgroup.procs").exists());
    assert!(!placed, "no pid written under the parent");
}

#[test]
fn v1_move_asks_the_kernel_to_move_charges_in_every_controller() {
    let root = v1_root();
    let cg = Cgroups::detect_at(root.path(), "bubbled-unit", 1 << 30, false).unwrap();
    assert!(!cg.v2());
    let from = cg.prepare("", "b-pool", 16 << 20).unwrap();
    assert_eq!(from.len(), 3, "memory, pids, cpu");
    let moved = cg
        .move_process(&from, "shop", "b-pool", 16 << 20, 4242, &|| false)
        .unwrap();
    assert_eq!(moved.procs.len(), 3);
    for (f, ctl) in moved.procs.iter().zip(["memory", "pids", "cpu"]) {
        assert!(f.starts_with(root.path().join(ctl)), "{f:?}");
        assert_eq!(read(f), "4242");
    }
    // Asked before the pid was written; a kernel that accepted it moved
    // the charges, so nothing to warn of (this host's kernel refuses:
    // `tests/tests/jail_attach.rs` covers that answer).
    assert_eq!(
        read(&bubble_dir(&moved.procs).join("memory.move_charge_at_immigrate")),
        "3"
    );
    assert!(moved.warning.is_none(), "{:?}", moved.warning);
}

/// Processes listed in this broker's bubble cgroups are killed (through
/// pidfds), but the kept ones and anything outside its hierarchy.
#[test]
fn strays_in_bubble_cgroups_are_killed_and_nothing_else() {
    let root = v2_root();
    let cg = Cgroups::detect_at(root.path(), "bubbled-unit", 1 << 30, false).unwrap();
    let spawn = || {
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap()
    };
    let (mut stray, mut kept, mut outside) = (spawn(), spawn(), spawn());
    let stray_cg = cg.prepare("shop", "b-1", 16 << 20).unwrap();
    let kept_cg = cg.prepare("shop", "b-2", 16 << 20).unwrap();
    place(&stray_cg, stray.id()).unwrap();
    place(&kept_cg, kept.id()).unwrap();
    // Another broker's hierarchy, and a parent-level file: not ours.
    let other = root.path().join("bubbled-other/p-1/b.v0");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("cgroup.procs"), outside.id().to_string()).unwrap();
    std::fs::write(
        bubble_dir(&kept_cg).parent().unwrap().join("cgroup.procs"),
        outside.id().to_string(),
    )
    .unwrap();
    let out = cg.kill_strays(&[kept.id()], Duration::from_millis(300));
    assert_eq!(out.killed, vec![stray.id()]);
    assert!(out.surviving.is_empty());
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(stray.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert!(kept.try_wait().unwrap().is_none(), "the kept one runs");
    assert!(outside.try_wait().unwrap().is_none(), "outside: untouched");
    for c in [&mut kept, &mut outside] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

/// A broker that does not hold its hierarchy's claim kills nothing.
#[test]
fn without_the_claim_nothing_is_killed() {
    let root = v2_root();
    let mut cg = Cgroups::detect_at(root.path(), "bubbled-unit", 1 << 30, false).unwrap();
    cg.owned = false;
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let procs = cg.prepare("shop", "b-1", 16 << 20).unwrap();
    place(&procs, child.id()).unwrap();
    let out = cg.kill_strays(&[], Duration::from_millis(100));
    assert!(out.killed.is_empty());
    assert!(child.try_wait().unwrap().is_none());
    child.kill().unwrap();
    child.wait().unwrap();
}
