//! `nvmed-pkg`: writes the man pages and the bash, zsh and fish completions of nvmed's programs
//! (nvmed, nvmectl, ringbench, nvmed-vhost), generated from their clap definitions. The
//! definitions are the programs' own `cli.rs` modules, compiled in here as they are, so the pages
//! always match the options the programs accept. `scripts/build-deb.sh` runs it to fill the
//! Debian package; it also installs them for a `cargo install`ed nvmed:
//!
//! ```text
//! cargo run -p nvmed-pkg -- --root / --prefix /usr/local
//! ```
#![allow(rustdoc::broken_intra_doc_links)] // the included doc comments are --help text for clap

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use clap_complete::Shell;

#[allow(dead_code)] // main.rs of nvmed reads the fields
#[path = "../../server/src/cli.rs"]
mod nvmed_cli;

#[allow(dead_code)]
#[path = "../../ctl/src/cli.rs"]
mod nvmectl_cli;

#[allow(dead_code)]
#[path = "../../vhost/src/cli.rs"]
mod vhost_cli;

#[allow(dead_code)]
#[path = "../../tcp/src/cli.rs"]
mod tcp_cli;

/// ringbench's command line refers to its workload module's `Rw` as `super::workload::Rw`.
#[allow(dead_code)]
#[path = "../../ringbench/src"]
mod ringbench {
    pub(crate) mod cli;
    mod workload;
}

/// Write the man pages and shell completions of nvmed, nvmectl, ringbench, nvmed-vhost and
/// nvmed-tcp under
/// ROOT/PREFIX/share, where Debian (and most distributions) look for them:
///
///   share/man/man8/nvmed.8, nvmed-tcp.8, nvmectl.8, nvmectl-SUBCOMMAND.8 (man pages, section
///     8: daemons and administration tools)
///   share/man/man1/ringbench.1, nvmed-vhost.1 (section 1: user commands)
///   share/bash-completion/completions/NAME
///   share/zsh/vendor-completions/_NAME
///   share/fish/vendor_completions.d/NAME.fish
///
/// The pages are written uncompressed (packagers gzip them).
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Directory to write under (a package's staging tree, or / to install directly).
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Installation prefix below ROOT.
    #[arg(long, value_name = "DIR", default_value = "/usr")]
    prefix: PathBuf,
}

/// A program whose documentation is generated: its command, man section, and the sections its
/// page gets beyond what clap knows.
struct Program {
    cmd: clap::Command,
    section: &'static str,
    /// FILES: path and what it is.
    files: &'static [(&'static str, &'static str)],
    /// ENVIRONMENT: variable and what it does.
    env: &'static [(&'static str, &'static str)],
}

const PROGRAMS: [(&str, &str); 5] =
    [("nvmed", "8"), ("nvmectl", "8"), ("ringbench", "1"), ("nvmed-vhost", "1"), ("nvmed-tcp", "8")];

const NVMED_LOG: (&str, &str) =
    ("NVMED_LOG", "What to log (to stderr): a tracing EnvFilter expression, e.g. debug; default info.");

fn programs() -> Vec<Program> {
    // clap's derive names a command after its package (nvmed-server); name each after its binary.
    let named = |cmd: clap::Command, name: &'static str| cmd.name(name).bin_name(name);
    vec![
        Program {
            cmd: named(nvmed_cli::Args::command(), "nvmed"),
            section: "8",
            files: &[
                (
                    "/etc/nvmed/nvmed.toml",
                    "The configuration the packaged nvmed.service gives with --config.",
                ),
                ("/run/nvmed.sock", "The clients' socket (--socket)."),
                ("/run/nvmed-admin.sock", "The operators' socket, for nvmectl (--admin-socket)."),
                (
                    "/usr/lib/systemd/system/nvmed.service, nvmed.socket",
                    "The systemd units; with nvmed.socket enabled, systemd owns the clients' socket \
                     and passes it to nvmed.",
                ),
            ],
            env: &[NVMED_LOG],
        },
        Program {
            cmd: named(nvmectl_cli::Cli::command(), "nvmectl"),
            section: "8",
            files: &[("/run/nvmed-admin.sock", "The broker's admin socket (--admin-socket).")],
            env: &[],
        },
        Program {
            cmd: named(ringbench::cli::Args::command(), "ringbench"),
            section: "1",
            files: &[],
            env: &[],
        },
        Program {
            cmd: named(vhost_cli::Args::command(), "nvmed-vhost"),
            section: "1",
            files: &[],
            env: &[NVMED_LOG],
        },
        Program {
            cmd: named(tcp_cli::Args::command(), "nvmed-tcp"),
            section: "8",
            files: &[("/run/nvmed.sock", "The nvmed socket it connects to by default (--nvmed).")],
            env: &[
                NVMED_LOG,
                ("NVMED_RECONNECT", "0: do not wait for a restarted nvmed (as --reconnect-secs 0)."),
            ],
        },
    ]
}

/// Text for roff: backslashes and hyphens escaped, no line starting with a control character.
fn roff_text(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with(['.', '\'']) {
        format!("\\&{s}")
    } else {
        s
    }
}

/// The FILES, ENVIRONMENT and SEE ALSO sections of `name`'s page.
fn extra_sections(name: &str, files: &[(&str, &str)], env: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (title, items) in [("FILES", files), ("ENVIRONMENT", env)] {
        if items.is_empty() {
            continue;
        }
        out.push_str(&format!(".SH {title}\n"));
        for (item, text) in items {
            out.push_str(&format!(".TP\n\\fB{}\\fR\n{}\n", roff_text(item), roff_text(text)));
        }
    }
    let others: Vec<String> = PROGRAMS
        .iter()
        .filter(|(other, _)| *other != name)
        .map(|(other, sec)| format!("\\fB{}\\fR({sec})", roff_text(other)))
        .collect();
    out.push_str(&format!(".SH \"SEE ALSO\"\n{}\n", others.join(", ")));
    out
}

/// Writes the page of `cmd` (`p`'s command or one of its subcommands) and one per visible
/// subcommand (`nvmectl-status.8`), returning the paths.
fn man_pages(cmd: clap::Command, p: &Program, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.extend(man_pages(sub.clone(), p, dir)?);
    }
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name()).to_string();
    let man = clap_mangen::Man::new(cmd)
        .section(p.section)
        .manual("nvmed")
        .source(concat!("nvmed ", env!("CARGO_PKG_VERSION")));
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)?;
    page.extend_from_slice(extra_sections(&name, p.files, p.env).as_bytes());
    fs::write(&path, page)?;
    written.push(path);
    Ok(written)
}

/// Writes `cmd`'s bash, zsh and fish completions under `share`, returning the paths.
fn completions(cmd: &clap::Command, share: &Path) -> io::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_string();
    let mut written = Vec::new();
    for (shell, dir, file) in [
        (Shell::Bash, "bash-completion/completions", name.clone()),
        (Shell::Zsh, "zsh/vendor-completions", format!("_{name}")),
        (Shell::Fish, "fish/vendor_completions.d", format!("{name}.fish")),
    ] {
        let dir = share.join(dir);
        fs::create_dir_all(&dir)?;
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), &name, &mut text);
        let path = dir.join(file);
        fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

fn run(args: &Args) -> io::Result<()> {
    let share = args.root.join(args.prefix.strip_prefix("/").unwrap_or(&args.prefix)).join("share");
    for p in programs() {
        let dir = share.join(format!("man/man{}", p.section));
        fs::create_dir_all(&dir)?;
        let mut written = man_pages(p.cmd.clone(), &p, &dir)?;
        written.extend(completions(&p.cmd, &share)?);
        for path in written {
            println!("{}", path.display());
        }
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("nvmed-pkg: {e}");
        std::process::exit(1);
    }
}
