//! The `bubbled` broker daemon.

fn main() -> std::process::ExitCode {
    bubbled::vmm_entry_if_requested();
    bubbled::daemon::main()
}
