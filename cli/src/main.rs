//! `iukfarm`: the one binary of the IUK build farm.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod assets;
mod cmd;
mod output;
mod progress;
mod samples;

#[derive(Parser)]
#[command(
    name = "iukfarm",
    version,
    about = "Build Tails Incremental Upgrade Kits, reproducibly"
)]
struct Cli {
    /// More log output (-v: info, -vv: iukfarm's debug, -vvv: its trace and
    /// its libraries' debug; IUKFARM_LOG=<tracing filter> overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build one IUK from two ISOs on this machine (tails-create-iuk's job).
    Build(cmd::build::Args),
    /// Check an IUK by applying it to the old release and comparing with the new.
    VerifyIuk(cmd::verify_iuk::Args),
    /// Run the coordinator of one release (workers connect to it).
    Coordinator(cmd::farm::CoordinatorArgs),
    /// Run a worker daemon: lease jobs from coordinators and build them.
    Worker(cmd::farm::WorkerArgs),
    /// Run a whole release on this machine: a coordinator plus in-process workers.
    Release(cmd::farm::ReleaseCmdArgs),
    /// The release CA: create it, issue and revoke the farm's certificates.
    Ca(cmd::ca::Args),
    /// Show a release's jobs.
    Status(cmd::client::StatusArgs),
    /// Follow a release with progress bars until it ends.
    Watch(cmd::client::WatchArgs),
    /// List the workers connected to a coordinator.
    Workers(cmd::client::WorkersArgs),
    /// Cancel a release.
    Cancel(cmd::client::CancelArgs),
    /// Download a finished release's IUKs, SHA256SUMS and signed manifest.
    Fetch(cmd::client::FetchArgs),
    /// Check a directory of IUKs against a release's SHA256SUMS, manifest and signature.
    Verify(cmd::verify::Args),
    /// Copy a release's IUKs to the rsync server, check them there against the RM's build, promote them.
    Publish(cmd::publish::Args),
    /// Tails' upgrade-description files: generate (and sign) a release's, check them.
    Udf(cmd::udf::Args),
    /// A whole release on generated sample ISOs, farm included (no setup needed).
    Demo(cmd::demo::Args),
    /// Write sample Tails-like ISOs (an ISO archive to try a farm on).
    Samples(cmd::demo::SamplesArgs),
    /// SquashFS tools: pack (a gensquashfs drop-in), ls, cat, info.
    Sqfs(cmd::sqfs::Args),
    /// ISO 9660 tools: ls, extent, cat.
    Iso(cmd::iso::Args),
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    PackageAssets(assets::Args),
}

/// Exit codes shared by every subcommand.
pub mod exit {
    /// The work failed: an I/O error, a network error, a check that did
    /// not pass.
    pub const FAILURE: u8 = 1;
    /// Bad usage or bad input, found before any work: a wrong option or
    /// value (clap also uses 2), a file named that is missing, unreadable
    /// or not what the command needs, an output that exists.
    pub const USAGE: u8 = 2;
    /// Interrupted (SIGINT/SIGTERM); nothing was left behind.
    pub const INTERRUPTED: u8 = 130;
}

fn main() -> ExitCode {
    let argv = match cmd::release_file::expand(
        std::env::args_os().collect(),
        &<Cli as clap::CommandFactory>::command(),
    ) {
        Ok(a) => a,
        Err(why) => {
            eprintln!("iukfarm: error: {why}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let cli = Cli::parse_from(argv);
    // Commands that print listings end quietly when their reader does
    // (`iukfarm sqfs ls ... | head`): killed by SIGPIPE, as cat or ls are,
    // instead of "error: Broken pipe". Only those that touch no socket or
    // child process: tokio writes sockets without MSG_NOSIGNAL, and a
    // closed connection or pipe to gpg or ssh is an error to report.
    if matches!(cli.command, Command::Sqfs(_) | Command::Iso(_)) {
        // SAFETY: restoring a default disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // Daemons report what they do by default; the other commands are quiet.
    let daemon = matches!(
        cli.command,
        Command::Coordinator(_) | Command::Worker(_) | Command::Release(_)
    );
    let level = match cli.verbose {
        0 if daemon => "warn,iukfarm_coordinator=info,iukfarm_worker=info",
        0 => "warn",
        1 => "info",
        // The libraries' debug output (every HTTP/2 frame) would bury ours.
        2 => "info,iukfarm=debug",
        _ => "debug,iukfarm=trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IUKFARM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Build(a) => cmd::build::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Samples(a) => cmd::demo::samples(a),
        Command::Coordinator(a) => cmd::farm::coordinator(a),
        Command::Worker(a) => cmd::farm::worker(a),
        Command::Release(a) => cmd::farm::release(a),
        Command::Ca(a) => cmd::ca::run(a),
        Command::Status(a) => cmd::client::status(a),
        Command::Watch(a) => cmd::client::watch(a),
        Command::Workers(a) => cmd::client::workers(a),
        Command::Cancel(a) => cmd::client::cancel(a),
        Command::Fetch(a) => cmd::client::fetch(a),
        Command::Verify(a) => cmd::verify::run(a),
        Command::Udf(a) => cmd::udf::run(a),
        Command::Publish(a) => cmd::publish::run(a),
        Command::VerifyIuk(a) => cmd::verify_iuk::run(a),
        Command::Sqfs(a) => cmd::sqfs::run(a),
        Command::Iso(a) => cmd::iso::run(a),
        Command::PackageAssets(a) => assets::run(a, <Cli as clap::CommandFactory>::command()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(iukfarm_engine::Error::Cancelled) = e.downcast_ref() {
                eprintln!("iukfarm: interrupted");
                return ExitCode::from(exit::INTERRUPTED);
            }
            eprintln!("iukfarm: error: {e:#}");
            if e.chain().any(|c| c.is::<cmd::Usage>()) {
                return ExitCode::from(exit::USAGE);
            }
            ExitCode::from(exit::FAILURE)
        }
    }
}

#[cfg(test)]
mod readme {
    use clap::CommandFactory;

    /// A shell line's first command's words: double quotes group, `#`
    /// starts a comment, `&`, `;`, `|`, `<` and `>` end the command.
    fn words(line: &str) -> Vec<String> {
        let (mut out, mut cur, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
        for c in line.chars() {
            match c {
                '"' => (quoted, any) = (!quoted, true),
                '#' if !quoted && !any => break,
                '&' | ';' | '|' | '<' | '>' if !quoted => break,
                c if c.is_whitespace() && !quoted => {
                    if any {
                        out.push(std::mem::take(&mut cur));
                    }
                    any = false;
                }
                c => (cur, any) = (cur + &c.to_string(), true),
            }
        }
        if any {
            out.push(cur);
        }
        out
    }

    /// Every `iukfarm` command in the README's code blocks (and `cargo run
    /// -- ...`) is one the binary accepts: its subcommand, options and
    /// values parse. `...` stands for options left out: those commands may
    /// lack required ones.
    #[test]
    fn every_command_in_the_readme_parses() {
        let readme = include_str!("../../README.md");
        let mut in_code = false;
        let mut lines = Vec::new();
        let mut pending = String::new();
        for l in readme.lines() {
            if l.starts_with("```") {
                in_code = !in_code;
                continue;
            }
            if !in_code {
                continue;
            }
            match l.trim_end().strip_suffix('\\') {
                Some(head) => pending.push_str(head),
                None => lines.push(std::mem::take(&mut pending) + l),
            }
        }
        let mut checked = 0;
        let mut wrong = Vec::new();
        for line in &lines {
            let w = words(line);
            // The command word: after variable assignments only.
            let at = w.iter().position(|x| !x.contains('='));
            let args: Vec<String> = if let Some(i) = at.filter(|&i| w[i] == "iukfarm") {
                w[i..].to_vec()
            } else if w.starts_with(&["cargo".into(), "run".into()]) {
                match w.iter().position(|x| x == "--") {
                    Some(i) => ["iukfarm".to_string()]
                        .into_iter()
                        .chain(w[i + 1..].to_vec())
                        .collect(),
                    None => continue,
                }
            } else {
                continue;
            };
            let partial = args.iter().any(|a| a == "...");
            let args: Vec<&String> = args.iter().filter(|a| *a != "...").collect();
            match super::Cli::command().try_get_matches_from(args) {
                Ok(_) => {}
                Err(e)
                    if partial && e.kind() == clap::error::ErrorKind::MissingRequiredArgument => {}
                Err(e) => wrong.push(format!("{line}\n{e}")),
            }
            checked += 1;
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        assert!(checked >= 30, "only {checked} commands found");
    }
}
