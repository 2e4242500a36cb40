//! Spare mode: a VMM process started ahead of need.

use std::os::unix::net::{UnixListener, UnixStream};

use super::VmmArgs;
use crate::control::{Head, Kind, Request};
use crate::images;
use crate::vm;

/// A spare's command line: `--spare --socket PATH --parent-pid PID
/// [--image-fd FD]`.
pub struct SpareArgs {
    /// Where to listen for the broker.
    pub(super) socket: String,
    /// The broker, which a spare always dies with.
    pub(super) parent_pid: u32,
    /// The shared shim image, inherited on purpose.
    pub(super) image_fd: Option<i32>,
}

impl SpareArgs {
    pub(super) fn parse(args: &[String]) -> Result<Self, String> {
        const USAGE: &str = "usage: --spare --socket PATH --parent-pid PID [--image-fd FD]";
        let mut a = SpareArgs {
            socket: String::new(),
            parent_pid: 0,
            image_fd: None,
        };
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let v = it.next().ok_or(USAGE)?;
            match k.as_str() {
                "--socket" => a.socket = v.clone(),
                "--parent-pid" => a.parent_pid = v.parse().map_err(|_| USAGE)?,
                "--image-fd" => {
                    let fd: i32 = v.parse().map_err(|_| USAGE)?;
                    a.image_fd = (fd >= 0).then_some(fd);
                }
                _ => return Err(USAGE.into()),
            }
        }
        if a.socket.is_empty() || a.parent_pid == 0 {
            return Err(USAGE.into());
        }
        Ok(a)
    }

    /// The arguments [`SpareArgs::parse`] reads back, `--spare` first.
    pub fn to_args(socket: &str, parent_pid: u32, image_fd: Option<i32>) -> Vec<String> {
        vec![
            "--spare".into(),
            "--socket".into(),
            socket.into(),
            "--parent-pid".into(),
            parent_pid.to_string(),
            "--image-fd".into(),
            image_fd.unwrap_or(-1).to_string(),
        ]
    }
}

/// Spare mode: a VMM process started ahead of need, so that creating a
/// bubble does not wait for a process to start. It waits for one
/// connection carrying a `CONFIGURE` frame (the normal arguments), then
/// becomes that bubble's VMM: the VM is created only then, cold, as for
/// any bubble. An unused spare dies with its broker (`PR_SET_PDEATHSIG`,
/// set by the main thread before this runs).
pub(super) fn wait_as_spare(listener: UnixListener) -> Result<(VmmArgs, UnixStream), String> {
    let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let read = |conn: &mut UnixStream| {
        let head = Head::read(conn)?;
        Ok::<_, std::io::Error>((head.kind, head.read_body(conn)?))
    };
    let (kind, body) = read(&mut conn).map_err(|e| format!("reading CONFIGURE: {e}"))?;
    if kind != Kind::Configure as u8 {
        return Err(format!("expected CONFIGURE, got frame kind {kind:#x}"));
    }
    drop(listener);
    let args = match Request::decode(kind, &body) {
        Ok(Request::Configure { args }) => args,
        Ok(_) => return Err("expected CONFIGURE".into()),
        Err(e) => return Err(format!("CONFIGURE: {e}")),
    };
    let a = VmmArgs::parse(args.into_iter().map(str::to_string))?;
    Ok((a, conn))
}

/// Work a spare does before it is needed: open /dev/kvm and query the
/// supported CPUID, fault in the embedded guest image and the code paths
/// that check it, so that the bubble's VM (still created only after
/// CONFIGURE) is built without those process-level and first-touch costs.
pub(super) fn prewarm() {
    // Failure is not fatal here: VM creation opens /dev/kvm again and
    // reports the error.
    let _ = vm::prepare_kvm();
    let _ = crate::layout::Image::parse_bounds(images::SHIM_ELF);
    let sum = images::SHIM_ELF
        .iter()
        .step_by(4096)
        .fold(0u8, |a, b| a.wrapping_add(*b));
    std::hint::black_box(sum);
    let _ = crate::layout::Layout::new(64 << 20, crate::layout::IMAGE_BASE + 4096, 1 << 20)
        .map(|l| crate::layout::boot_pages(&l));
}
