//! `nvmed-pkg` writes every page and completion where distributions look for them, with the
//! programs' real options in them.

use std::path::Path;
use std::process::Command;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn writes_pages_and_completions_of_every_program() {
    let root = std::env::temp_dir().join(format!("nvmed-pkg-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let out = Command::new(env!("CARGO_BIN_EXE_nvmed-pkg"))
        .args(["--root", root.to_str().unwrap(), "--prefix", "/usr/local"])
        .output()
        .unwrap();
    assert!(out.status.success(), "nvmed-pkg failed: {}", String::from_utf8_lossy(&out.stderr));
    let share = root.join("usr/local/share");
    let listed = String::from_utf8(out.stdout).unwrap();

    // Each program: its page's header, options only it has, and the sections added to clap's.
    for (name, section, options) in [
        ("nvmed", "8", &["--emulate", "--socket-group", "--grant", "--io-tries"][..]),
        ("nvmectl", "8", &["--admin-socket", "--json"][..]),
        ("ringbench", "1", &["--iodepth", "--verify", "--embedded"][..]),
        ("nvmed-vhost", "1", &["--num-queues", "--nvmed"][..]),
    ] {
        let page_path = share.join(format!("man/man{section}/{name}.{section}"));
        assert!(listed.contains(page_path.to_str().unwrap()), "{} not listed", page_path.display());
        let page = read(&page_path);
        assert!(page.contains(&format!(".TH {name} {section} ")), "{name}: no .TH header");
        let text = page.replace("\\-", "-");
        for o in options {
            assert!(text.contains(o), "{name}.{section} lacks {o}");
        }
        assert!(page.contains(".SH \"SEE ALSO\""), "{name}: no SEE ALSO");
        for (other, sec) in [("nvmed", "8"), ("nvmectl", "8"), ("ringbench", "1"), ("nvmed-vhost", "1")] {
            let reference = format!("\\fB{}\\fR({sec})", other.replace('-', "\\-"));
            assert_eq!(page.contains(&reference), other != name, "{name}: SEE ALSO and {other}({sec})");
        }

        let bash = read(&share.join(format!("bash-completion/completions/{name}")));
        let zsh = read(&share.join(format!("zsh/vendor-completions/_{name}")));
        let fish = read(&share.join(format!("fish/vendor_completions.d/{name}.fish")));
        assert!(zsh.starts_with(&format!("#compdef {name}\n")), "{name}: zsh completion header");
        for o in options {
            assert!(bash.contains(o), "bash completion of {name} lacks {o}");
            assert!(zsh.contains(o), "zsh completion of {name} lacks {o}");
            assert!(fish.contains(&format!("-l {}", &o[2..])), "fish completion of {name} lacks {o}");
        }
    }

    // nvmectl: a page per subcommand, and the subcommands in the completions.
    let nvmectl_bash = read(&share.join("bash-completion/completions/nvmectl"));
    for sub in ["status", "sessions", "top", "kill", "health", "reload", "limits"] {
        let page = read(&share.join(format!("man/man8/nvmectl-{sub}.8")));
        assert!(page.contains(&format!(".TH nvmectl-{sub} 8 ")), "nvmectl-{sub}.8: no .TH header");
        assert!(nvmectl_bash.contains(sub), "bash completion of nvmectl lacks {sub}");
    }
    // nvmed's page says where its files are.
    let nvmed = read(&share.join("man/man8/nvmed.8")).replace("\\-", "-");
    for f in [".SH FILES", "/etc/nvmed/nvmed.toml", "/run/nvmed.sock", ".SH ENVIRONMENT", "NVMED_LOG"] {
        assert!(nvmed.contains(f), "nvmed.8 lacks {f}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}
