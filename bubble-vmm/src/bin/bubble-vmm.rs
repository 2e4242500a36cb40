//! A bubble's VMM process (normally started by `bubbled`).

fn main() {
    let code = bubble_vmm::process::run_from_args(std::env::args().skip(1));
    std::process::exit(code);
}
