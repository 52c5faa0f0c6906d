//! Compiling and running C code against libnvmed in tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `<target>/<profile>`: the test binary runs from its `deps` directory.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Where this build's libnvmed.so and libnvmed.a are: `<profile>` when cargo copied them there,
/// else `<profile>/deps` (the newer one wins).
pub fn lib_dir() -> PathBuf {
    let p = profile_dir();
    let candidates = [p.clone(), p.join("deps")];
    let mtime = |d: &Path| std::fs::metadata(d.join("libnvmed.a")).and_then(|m| m.modified()).ok();
    candidates
        .iter()
        .filter(|d| mtime(d).is_some() && d.join("libnvmed.so").exists())
        .max_by_key(|d| mtime(d))
        .cloned()
        .unwrap_or_else(|| panic!("libnvmed is not built under {}", p.display()))
}

/// Compiles C sources into an executable linked with libnvmed.so.
pub fn compile_c(sources: &[PathBuf], out: &Path) {
    let lib = lib_dir();
    let status = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .arg(format!("-I{}", repo().join("capi/include").display()))
        .args(sources)
        .arg("-o")
        .arg(out)
        .arg(format!("-L{}", lib.display()))
        .arg("-lnvmed")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status()
        .expect("run the system C compiler (cc)");
    assert!(status.success(), "cc failed for {sources:?}");
}

/// What a program printed (stdout then stderr) and how it ended.
pub struct Output {
    pub status: ExitStatus,
    pub text: String,
}

/// Runs a program built by [`compile_c`]. Without cargo's LD_LIBRARY_PATH: it would win over the
/// program's runpath and could load another build's libnvmed.so.
pub fn run(exe: &Path, args: &[&str]) -> Output {
    let out = Command::new(exe)
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()));
    Output {
        status: out.status,
        text: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    }
}
