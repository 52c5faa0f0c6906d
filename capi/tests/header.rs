//! The checked-in C header is what cbindgen makes of the code (CI fails when they differ).
//! `NVMED_UPDATE_HEADER=1 cargo test -p nvmed-capi --test header` rewrites it.

use std::path::PathBuf;

fn generate() -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    // The layouts C code relies on, checked by the C compiler too.
    config.trailer = Some(format!(
        "/* (major << 16) | (minor << 8) | patch: compare with nvmed_version() at run time. */\n\
         #define NVMED_VERSION ((NVMED_VERSION_MAJOR << 16) | (NVMED_VERSION_MINOR << 8) | NVMED_VERSION_PATCH)\n\
         #define NVMED_VERSION_STRING \"{}\"\n\n\
         #if !defined(__cplusplus) && defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L\n\
         _Static_assert(sizeof(struct nvmed_namespace) == 40, \"nvmed_namespace layout\");\n\
         _Static_assert(sizeof(struct nvmed_segment) == 16, \"nvmed_segment layout\");\n\
         _Static_assert(sizeof(struct nvmed_completion) == 16, \"nvmed_completion layout\");\n\
         _Static_assert(sizeof(struct nvmed_stats) == 88, \"nvmed_stats layout\");\n\
         _Static_assert(sizeof(struct nvmed_buffer) == 16 + sizeof(void *), \"nvmed_buffer layout\");\n\
         _Static_assert(sizeof(struct nvmed_ring_opts) == 16 + sizeof(void *), \"nvmed_ring_opts layout\");\n\
         #endif",
        env!("CARGO_PKG_VERSION")
    ));
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_crate(&dir)
        .generate()
        .expect("cbindgen")
        .write(&mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn checked_in_header_matches_the_code() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include/nvmed.h");
    let fresh = generate();
    assert!(fresh.contains("int nvmed_open("), "cbindgen output lacks the API:\n{fresh}");
    if std::env::var_os("NVMED_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "{} is stale: regenerate it with NVMED_UPDATE_HEADER=1 cargo test -p nvmed-capi --test header",
        path.display()
    );
}
