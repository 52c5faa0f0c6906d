//! `nvmectl`: look at and manage a running nvmed through its admin socket.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::Parser;
use nvmectl::{render, session_rates, AdminClient, CtlError};
use serde::Serialize;

mod cli;
use cli::{Cli, Command};

fn main() {
    // Like other command-line tools, end quietly when the reader of our output goes away
    // (`nvmectl top --json | head`) instead of panicking on the failed write.
    // SAFETY: called before any other thread exists; SIG_DFL installs no Rust handler.
    let _ = unsafe {
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl)
    };
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // --help and --version exit 0; a command line that does not parse exits 64 (EX_USAGE),
        // apart from 1 (refused), 2 (health trouble) and 3 (no answer).
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 64 } else { 0 });
        }
    };
    let json = cli.json;
    if let Err(e) = run(cli) {
        let code = e.exit_code();
        if json {
            eprintln!("{}", serde_json::json!({ "error": e.kind(), "message": e.to_string(), "exit": code }));
        } else {
            eprintln!("nvmectl: {e}");
        }
        std::process::exit(code);
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<(), CtlError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CtlError::Unexpected(e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn run(cli: Cli) -> Result<(), CtlError> {
    let mut client = AdminClient::new(&cli.admin_socket);
    if let Some(t) = cli.timeout {
        client = client.with_timeout(Duration::from_secs_f64(t));
    }
    match cli.command {
        Command::Status => {
            let s = client.status()?;
            if cli.json {
                print_json(&s)?;
            } else {
                print!("{}", render::status(&s));
            }
        }
        Command::Sessions { interval } => {
            let before = client.sessions()?;
            if interval > 0.0 {
                let t = Instant::now();
                std::thread::sleep(Duration::from_secs_f64(interval));
                let after = client.sessions()?;
                let list = session_rates(&before, &after, t.elapsed());
                if cli.json {
                    print_json(&list)?;
                } else {
                    print!("{}", render::sessions(&list, true));
                }
            } else if cli.json {
                // One sample measures no rate: the sessions and their counters only.
                print_json(&before)?;
            } else {
                print!("{}", render::sessions(&session_rates(&[], &before, Duration::ZERO), false));
            }
        }
        Command::Top { interval, iterations } => top(&client, interval, iterations, cli.json)?,
        Command::Kill { session, pid, uid } => {
            client.kill_if(session, uid, pid)?;
            if cli.json {
                print_json(&serde_json::json!({ "killed": session }))?;
            } else {
                println!("session {session} ended");
            }
        }
        Command::Limits { uid: Some(uid), nsid: Some(nsid), limits: Some(limits) } => {
            let (updated, ended) = client.set_limits(uid, nsid, &limits)?;
            if cli.json {
                print_json(&serde_json::json!({ "updated": updated, "ended": ended }))?;
            } else {
                println!("limits of uid {uid} on namespace {nsid} now {limits}: {updated} sessions updated");
            }
        }
        Command::Limits { .. } => {
            let (grants, default_access) = client.limits()?;
            if cli.json {
                print_json(&serde_json::json!({ "grants": grants, "default_access": default_access }))?;
            } else {
                println!("{:>8} {:>5} {:>22} {:>3}  LIMITS", "UID", "NSID", "WINDOW", "RO");
                for g in &grants {
                    let window = g.window.map_or("whole".to_string(), |(a, n)| format!("{a}+{n}"));
                    let ro = if g.read_only { "ro" } else { "" };
                    println!("{:>8} {:>5} {:>22} {:>3}  {}", g.uid, g.nsid, window, ro, g.limits);
                }
                println!("uids without grants: {default_access}");
            }
        }
        Command::Reset { controller } => {
            let (state, resets) = client.reset_controller(controller)?;
            if cli.json {
                print_json(
                    &serde_json::json!({ "controller": controller, "state": state, "resets": resets }),
                )?;
            } else {
                println!("controller {controller} reset: {state} ({resets} resets since nvmed started)");
            }
            // Scripts tell a controller that did not come back by the exit status (as health).
            if state != "running" {
                let _ = std::io::stdout().flush();
                eprintln!("nvmectl: controller {controller} is {state} after the reset");
                std::process::exit(2);
            }
        }
        Command::Reload => {
            let (updated, ended) = client.reload()?;
            if cli.json {
                print_json(&serde_json::json!({ "updated": updated, "ended": ended }))?;
            } else {
                println!("grants reloaded: {updated} sessions updated, {ended} ended");
            }
        }
        Command::Health => {
            let h = client.health()?;
            if cli.json {
                print_json(&h)?;
            } else {
                print!("{}", render::health(&h));
            }
            // Scripts and monitors tell a controller in trouble by the exit status.
            let troubled: Vec<String> = h
                .iter()
                .filter_map(|r| match (&r.error, &r.smart) {
                    (Some(e), _) => Some(format!("controller {}: {e}", r.controller)),
                    (None, Some(s)) if s.critical_warning != 0 => Some(format!(
                        "controller {}: critical warning {:#04x}",
                        r.controller, s.critical_warning
                    )),
                    _ => None,
                })
                .collect();
            if !troubled.is_empty() {
                let _ = std::io::stdout().flush();
                if cli.json {
                    let e = serde_json::json!({
                        "error": "controller_trouble",
                        "message": troubled.join("; "),
                        "exit": 2,
                    });
                    eprintln!("{e}");
                } else {
                    for t in &troubled {
                        eprintln!("nvmectl: {t}");
                    }
                }
                std::process::exit(2);
            }
        }
    }
    Ok(())
}

fn top(client: &AdminClient, interval: f64, iterations: Option<u64>, json: bool) -> Result<(), CtlError> {
    let tty = std::io::stdout().is_terminal();
    // The previous sample the rates start from; none after the broker could not be reached.
    let mut before = Some((client.sessions()?, Instant::now()));
    let mut n = 0;
    while iterations.is_none_or(|max| n < max) {
        std::thread::sleep(Duration::from_secs_f64(interval));
        let sample = client.status().and_then(|status| Ok((status, client.sessions()?)));
        let mut out = std::io::stdout().lock();
        if tty && !json {
            let _ = write!(out, "\x1b[H\x1b[2J");
        } else if n > 0 && !json {
            let _ = writeln!(out);
        }
        n += 1;
        let (status, after) = match sample {
            Ok(s) => s,
            // The broker restarting, busy or gone for a while: say so and keep trying, as top
            // does when a process goes away; a refusal is not going to change, so it ends.
            Err(e) if e.is_transient() => {
                before = None;
                if json {
                    let line = serde_json::json!({ "error": e.kind(), "message": e.to_string() });
                    let _ = writeln!(out, "{line}");
                } else {
                    let _ = writeln!(out, "nvmectl top: {e}\n(trying again every {interval} s)");
                }
                let _ = out.flush();
                continue;
            }
            Err(e) => return Err(e),
        };
        let now = Instant::now();
        let (list, rates) = match &before {
            Some((b, t)) => (session_rates(b, &after, now.duration_since(*t)), true),
            None => (session_rates(&[], &after, Duration::ZERO), false),
        };
        if json {
            // Without a previous sample (after the broker could not be reached) nothing was
            // measured: the sessions' counters only, no rate fields.
            let line = match &before {
                Some((_, t)) => serde_json::json!({
                    "uptime_secs": status.uptime_secs,
                    "interval_secs": now.duration_since(*t).as_secs_f64(),
                    "sessions": list,
                }),
                None => serde_json::json!({
                    "uptime_secs": status.uptime_secs,
                    "interval_secs": null,
                    "sessions": after,
                }),
            };
            let _ = writeln!(out, "{line}");
        } else {
            let _ = write!(out, "{}", render::top(&status, &list, interval, rates));
        }
        let _ = out.flush();
        before = Some((after, now));
    }
    Ok(())
}
