//! The `nbd` command.

fn main() {
    eprintln!("nbd: no subcommands yet");
    std::process::exit(2);
}
