//! `image-cache`: the operator's command-line tool for an image cache
//! directory (Glance's glance-cache-manage, -pruner, -cleaner and
//! -prefetcher in one binary). See `image-cache --help`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
