//! The `bubbled` daemon, built inside the test package so that its
//! integration tests can find it (`CARGO_BIN_EXE_bubbled-e2e`).

fn main() -> std::process::ExitCode {
    bubbled::vmm_entry_if_requested();
    bubbled::daemon::main()
}
