//! Writes a pkg-config file for the uninstalled library next to it. (The soname and the symbol
//! versions of `nvmed.map` cannot be given to cargo's libnvmed.so: rustc passes the linker its
//! own version script first, and linkers take the first one. `scripts/build_capi.sh` relinks
//! the static library with `nvmed.map` into the versioned `libnvmed.so.0.1`.)

use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rerun-if-changed=nvmed.pc.in");
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: the library lands in <target>/<profile>.
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    if let Some(profile_dir) = out.ancestors().nth(3) {
        let pc = pkg_config(&manifest, profile_dir);
        let _ = std::fs::write(profile_dir.join("nvmed.pc"), pc);
    }
}

/// nvmed.pc for the library where cargo built it (the installed one comes from nvmed.pc.in with
/// the install prefix filled in).
fn pkg_config(manifest: &Path, libdir: &Path) -> String {
    let template = std::fs::read_to_string(manifest.join("nvmed.pc.in")).unwrap();
    template
        .replace("@LIBDIR@", &libdir.display().to_string())
        .replace("@INCLUDEDIR@", &manifest.join("include").display().to_string())
        .replace("@VERSION@", &std::env::var("CARGO_PKG_VERSION").unwrap())
}
