//! `wsedge -c FILE`: thin on purpose; all the work is in the library.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// The WebSocket edge of a CDN, on Pingora.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The configuration file.
    #[arg(short = 'c', long = "conf", default_value = "/etc/wsedge/wsedge.yaml")]
    conf: PathBuf,
    /// Check the configuration file and exit: 0 if valid, 1 if not.
    #[arg(short = 't', long)]
    test: bool,
    /// Run in the background.
    #[arg(short = 'd', long)]
    daemon: bool,
    /// Take over the listening sockets of a running wsedge (send it SIGQUIT).
    #[arg(short = 'u', long)]
    upgrade: bool,
    /// Also start the built-in demo origin at the first resource's first server address.
    #[arg(long)]
    demo: bool,
}

fn main() -> ExitCode {
    // The log goes to stderr through a bounded queue: a stalled reader never stops the
    // proxy (lines are dropped and counted instead).
    let errors = std::sync::Arc::new(wsedge::access_log::LineWriter::stderr(
        wsedge::access_log::error_log_dropped().clone(),
    ));
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Pipe(Box::new(
            wsedge::access_log::ErrorLog(errors.clone()),
        )))
        .init();
    let args = Args::parse();
    let opts = wsedge::Options {
        config: args.conf,
        test: args.test,
        daemon: args.daemon,
        upgrade: args.upgrade,
        demo: args.demo,
    };
    let result = wsedge::run(opts);
    errors.flush(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsedge: {e}");
            ExitCode::FAILURE
        }
    }
}
