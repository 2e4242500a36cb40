//! `bubblectl`, built inside the test package for its integration tests.

fn main() -> std::process::ExitCode {
    bubbled::vmm_entry_if_requested();
    bubbled::ctl::main()
}
