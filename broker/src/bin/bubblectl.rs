//! `bubblectl`: manage bubbles, PKI and attestation from the command line.

fn main() -> std::process::ExitCode {
    bubbled::vmm_entry_if_requested();
    bubbled::ctl::main()
}
