//! Links the system OpenBLAS when the `openblas` feature is on (sgemm through cblas_sgemm);
//! the default build links nothing extra.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_OPENBLAS").is_some() {
        println!("cargo:rustc-link-lib=openblas");
    }
}
