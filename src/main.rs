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
    let log = wsedge::init_logging();
    let args = Args::parse();
    let result = wsedge::run(wsedge::Options {
        config: args.conf,
        test: args.test,
        daemon: args.daemon,
        upgrade: args.upgrade,
        demo: args.demo,
    });
    log.flush(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsedge: {e}");
            ExitCode::FAILURE
        }
    }
}
