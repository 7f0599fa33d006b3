//! `kloigos-generator`: the systemd generator (see `kloigos::generator`). Installed as
//! `/usr/lib/systemd/system-generators/kloigos-generator`.

fn main() {
    std::process::exit(kloigos::generator::main_with_args(std::env::args_os()));
}
