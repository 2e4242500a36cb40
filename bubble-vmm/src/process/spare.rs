//! Spare mode: a VMM process started ahead of need.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::VmmArgs;
use crate::control::{kind, Frame};
use crate::images;
use crate::vm;

/// A spare's listening socket (bound first thing, so the broker can
/// connect while the spare gets ready).
pub(super) struct SpareSocket {
    listener: UnixListener,
    path: String,
}

/// Binds the spare socket named by `--socket PATH`.
pub(super) fn bind_spare(args: &[String]) -> Result<SpareSocket, String> {
    let [flag, path] = args else {
        return Err("usage: --spare --socket PATH".into());
    };
    if flag != "--socket" {
        return Err("usage: --spare --socket PATH".into());
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("listen on {path}: {e}"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(SpareSocket {
        listener,
        path: path.clone(),
    })
}

/// Spare mode (`--spare --socket PATH`): a VMM process started ahead of
/// need, so that creating a bubble does not wait for a process to start.
/// It waits for one connection carrying a `CONFIGURE` frame (the normal
/// arguments), then becomes that bubble's VMM: the VM is created only then,
/// cold, as for any bubble. An unused spare exits when its broker goes away.
pub(super) fn wait_as_spare(spare: SpareSocket) -> Result<(VmmArgs, UnixStream), String> {
    let SpareSocket { listener, path } = spare;
    // Exit if the broker that started us dies before using us.
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let configured = Arc::new(AtomicBool::new(false));
    {
        let (configured, path) = (configured.clone(), path.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            if configured.load(Ordering::SeqCst) {
                return;
            }
            // SAFETY: as above.
            if unsafe { libc::getppid() } != parent {
                let _ = std::fs::remove_file(&path);
                std::process::exit(0);
            }
        });
    }
    let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let f = Frame::read_from(&mut conn).map_err(|e| format!("reading CONFIGURE: {e}"))?;
    if f.kind != kind::CONFIGURE {
        return Err(format!("expected CONFIGURE, got frame kind {:#x}", f.kind));
    }
    configured.store(true, Ordering::SeqCst);
    drop(listener);
    let _ = std::fs::remove_file(path);
    let text = String::from_utf8(f.body).map_err(|_| "CONFIGURE is not UTF-8")?;
    let a = VmmArgs::parse(text.split('\0').map(str::to_string))?;
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
