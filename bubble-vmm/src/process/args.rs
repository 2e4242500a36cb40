//! The VMM process's command line.

use std::path::PathBuf;
use std::time::Duration;

use super::DEFAULT_POLL;
use crate::images::GuestImage;

/// Options of a VMM process.
#[derive(Clone, Debug)]
pub struct VmmArgs {
    /// Bubble id.
    pub bubble_id: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Guest image.
    pub image: GuestImage,
    /// Control socket path.
    pub socket: PathBuf,
    /// Maximum call payload, bytes.
    pub max_payload: usize,
    /// Time allowed from VM creation to READY.
    pub boot_timeout: Duration,
    /// Restore a snapshot (sent as the first RESTORE request) instead of
    /// booting the image.
    pub restore: bool,
    /// Inherited descriptor of the shim laid out in a sealed memfd
    /// ([`crate::shared_image`]), mapped instead of loading a copy.
    pub image_fd: Option<i32>,
    /// How long to poll for the next request after answering one.
    pub poll: Duration,
    /// Die with the broker of this pid (`PR_SET_PDEATHSIG`); `None`: the
    /// VMM outlives its broker, to be re-adopted by the next one.
    pub parent_pid: Option<u32>,
    /// In restore mode, how long to wait for the snapshot before exiting
    /// (a broker that died before sending it never will).
    pub restore_deadline: Duration,
}

/// Default [`VmmArgs::restore_deadline`].
pub const DEFAULT_RESTORE_DEADLINE: Duration = Duration::from_secs(120);

impl VmmArgs {
    /// Parses `--bubble-id ID --memory-mib N --image IMG --socket PATH
    /// [--max-payload N] [--boot-timeout-ms N]`.
    pub fn parse(args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut a = VmmArgs {
            bubble_id: String::new(),
            memory_mib: 0,
            image: GuestImage::Shim,
            socket: PathBuf::new(),
            max_payload: 1 << 20,
            boot_timeout: Duration::from_secs(20),
            restore: false,
            image_fd: None,
            poll: DEFAULT_POLL,
            parent_pid: None,
            restore_deadline: DEFAULT_RESTORE_DEADLINE,
        };
        let mut it = args;
        while let Some(k) = it.next() {
            let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
            match k.as_str() {
                "--bubble-id" => a.bubble_id = v,
                "--memory-mib" => a.memory_mib = v.parse().map_err(|_| "bad --memory-mib")?,
                "--image" => a.image = GuestImage::from_arg(&v).ok_or("bad --image")?,
                "--socket" => a.socket = v.into(),
                "--max-payload" => a.max_payload = v.parse().map_err(|_| "bad --max-payload")?,
                "--restore" => a.restore = v == "1",
                "--poll-us" => {
                    let us: u64 = v.parse().map_err(|_| "bad --poll-us")?;
                    a.poll = Duration::from_micros(us.min(10_000));
                }
                "--image-fd" => {
                    let fd: i32 = v.parse().map_err(|_| "bad --image-fd")?;
                    a.image_fd = (fd >= 0).then_some(fd);
                }
                "--parent-pid" => {
                    let pid: u32 = v.parse().map_err(|_| "bad --parent-pid")?;
                    a.parent_pid = (pid > 0).then_some(pid);
                }
                "--restore-deadline-ms" => {
                    a.restore_deadline =
                        Duration::from_millis(v.parse().map_err(|_| "bad --restore-deadline-ms")?)
                }
                "--boot-timeout-ms" => {
                    a.boot_timeout =
                        Duration::from_millis(v.parse().map_err(|_| "bad --boot-timeout-ms")?)
                }
                other => return Err(format!("unknown option {other}")),
            }
        }
        if a.bubble_id.is_empty() || a.socket.as_os_str().is_empty() || a.memory_mib == 0 {
            return Err("--bubble-id, --memory-mib and --socket are required".into());
        }
        Ok(a)
    }

    /// The arguments that [`VmmArgs::parse`] reads back.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--bubble-id".into(),
            self.bubble_id.clone(),
            "--memory-mib".into(),
            self.memory_mib.to_string(),
            "--image".into(),
            self.image.to_arg(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--max-payload".into(),
            self.max_payload.to_string(),
            "--boot-timeout-ms".into(),
            self.boot_timeout.as_millis().to_string(),
            "--restore".into(),
            if self.restore { "1" } else { "0" }.into(),
            "--image-fd".into(),
            self.image_fd.unwrap_or(-1).to_string(),
            "--poll-us".into(),
            self.poll.as_micros().to_string(),
            "--parent-pid".into(),
            self.parent_pid.unwrap_or(0).to_string(),
            "--restore-deadline-ms".into(),
            self.restore_deadline.as_millis().to_string(),
        ]
    }
}
