//! `overlayd --node NAME`: runs one node. See `overlayd --help`. (`overlayd task-shim` is
//! what it runs a task's process under: `router::task_shim`.)

use clap::Parser;
use router::config::Config;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    // `overlayd task-shim ...`: a task's shim (`router::task_shim`), started by overlayd.
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(std::ffi::OsStr::new(router::task_shim::SUBCOMMAND)) {
        return router::task_shim::main(args.collect());
    }
    router::sys::malloc::map_large_blocks();
    router::upgrade::remember_binary();
    // Started by an overlayd being upgraded (`router::upgrade`). Removed while this process
    // has one thread, so that no task inherits it.
    let upgrade_from = std::env::var_os(router::upgrade::ENV).map(std::path::PathBuf::from);
    std::env::remove_var(router::upgrade::ENV);
    let mut cfg = Config::parse();
    cfg.upgrade_from = upgrade_from;
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
