//! The committed header `include/recycle.h` is what cbindgen generates from `src/lib.rs` today.
//! After changing the ABI, regenerate it: `RECYCLE_BLESS=1 cargo test -p recycle-c --test header`.

use std::path::Path;

#[test]
fn committed_header_matches_the_sources() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let committed_path = dir.join("include/recycle.h");
    if std::env::var("RECYCLE_BLESS").as_deref() == Ok("1") {
        std::fs::write(&committed_path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is out of date: regenerate it with \
         `RECYCLE_BLESS=1 cargo test -p recycle-c --test header` and commit it",
        committed_path.display()
    );
}
