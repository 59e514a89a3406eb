//! `overlayd --node NAME`: runs one node. See `overlayd --help`.

use clap::Parser;
use router::config::Config;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    router::sys::malloc::map_large_blocks();
    let cfg = Config::parse();
    let filter = match EnvFilter::try_new(&cfg.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("overlayd: invalid --log-level {:?}: {e}", cfg.log_level);
            return std::process::ExitCode::from(2);
        }
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("overlayd: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(router::daemon::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("overlayd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
