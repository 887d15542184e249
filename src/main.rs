//! `wsedge -c FILE`: thin on purpose; all the work is in the library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// The WebSocket edge of a CDN, on Pingora.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The configuration file.
    #[arg(
        short = 'c',
        long = "conf",
        default_value = "/etc/wsedge/wsedge.yaml",
        global = true
    )]
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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ask the admin listener of the configuration file (-c) for /healthz: exit 0 if it
    /// answers 200 (a container's HEALTHCHECK).
    Healthcheck,
    /// Change the resources in etcd (`source.etcd`), checked like `-t` before any edge sees
    /// them; the store is the one of the configuration file (-c), or --etcd.
    Resource {
        /// An etcd endpoint instead of the file's (repeat for more members).
        #[arg(long = "etcd", value_name = "URL")]
        etcd: Vec<String>,
        /// The key prefix instead of the file's (default /wsedge/).
        #[arg(long)]
        prefix: Option<String>,
        #[command(subcommand)]
        action: ResourceAction,
    },
}

#[derive(Subcommand, Debug)]
enum ResourceAction {
    /// Create or replace the resource in FILE (one entry of `resources:`, with its name).
    Put {
        file: PathBuf,
        /// Write only if nothing under the prefix changed after this revision (the one
        /// `diff` or `list` showed); else nothing is written.
        #[arg(long, value_name = "REVISION")]
        if_revision: Option<i64>,
    },
    /// Print a resource as stored.
    Get { name: String },
    /// Remove a resource.
    Delete {
        name: String,
        /// Delete only if nothing under the prefix changed after this revision.
        #[arg(long, value_name = "REVISION")]
        if_revision: Option<i64>,
    },
    /// List the resources.
    List,
    /// Show what `put FILE` would change, and whether it would be accepted.
    Diff { file: PathBuf },
}

fn main() -> ExitCode {
    let log = wsedge::init_logging();
    let args = Args::parse();
    if let Some(Command::Healthcheck) = args.command {
        return match wsedge::healthcheck(&args.conf) {
            Ok(body) => {
                println!("{body}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wsedge healthcheck: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Resource {
        etcd,
        prefix,
        action,
    }) = args.command
    {
        use wsedge::fleet::cli::{self, Action, Target};
        let target = Target {
            config: Some(args.conf),
            endpoints: etcd,
            prefix,
        };
        let action = match action {
            ResourceAction::Put { file, if_revision } => Action::Put(file, if_revision),
            ResourceAction::Get { name } => Action::Get(name),
            ResourceAction::Delete { name, if_revision } => Action::Delete(name, if_revision),
            ResourceAction::List => Action::List,
            ResourceAction::Diff { file } => Action::Diff(file),
        };
        log.flush(std::time::Duration::from_secs(1));
        return match cli::run(&target, action) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wsedge resource: {e}");
                ExitCode::FAILURE
            }
        };
    }
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
