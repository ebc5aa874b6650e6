//! Compiles `tests/test_recycle.c` with the system C compiler (`$CC`, else `cc`) against
//! `include/recycle.h` and the shared library cargo built for this crate, and runs it: a tiny
//! training run, the fused loss against a reference computed in C, and bad input.
//! The training run reads a small generated Fashion-MNIST, which this test writes and names in
//! `RECYCLE_FASHION_MNIST_DIR` for the program.

use std::path::{Path, PathBuf};
use std::process::Command;

use recycle::data::sources::FASHION_MNIST;
use recycle::data::test_support::fixture_data;

/// The directory holding `librecycle_c.so` built for this test (`target/<profile>`).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps.parent().unwrap(), deps] {
        if dir.join(library_name()).exists() {
            return dir.to_path_buf();
        }
    }
    panic!(
        "{} not found next to {}: build it with `cargo build -p recycle-c`",
        library_name(),
        exe.display()
    );
}

fn library_name() -> &'static str {
    if cfg!(target_os = "macos") {
        "librecycle_c.dylib"
    } else {
        "librecycle_c.so"
    }
}

#[test]
fn c_program_trains_computes_the_loss_and_reports_errors() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = library_dir();
    let work = std::env::temp_dir().join(format!("recycle-c-abi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    // Linked against the shared library, then against the static one (with the system
    // libraries a Rust static library needs on Linux).
    let shared = (
        "shared",
        vec![
            format!("-L{}", lib.display()),
            format!("-Wl,-rpath,{}", lib.display()),
            "-lrecycle_c".to_string(),
            "-lm".to_string(),
        ],
    );
    let static_lib = lib.join("librecycle_c.a");
    let mut variants = vec![shared];
    if cfg!(target_os = "linux") && static_lib.exists() {
        let mut args = vec![static_lib.display().to_string()];
        args.extend(["-lpthread", "-ldl", "-lm", "-lrt", "-lgcc_s", "-lutil"].map(String::from));
        variants.push(("static", args));
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let (images, _) = fixture_data(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    for (kind, link) in variants {
        let exe = work.join(format!("test_recycle_{kind}"));
        let status = Command::new(&cc)
            .args([
                "-std=c11",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pedantic",
                "-O1",
            ])
            .arg("-I")
            .arg(crate_dir.join("include"))
            .arg(crate_dir.join("tests/test_recycle.c"))
            .arg("-o")
            .arg(&exe)
            .args(&link)
            .status()
            .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
        assert!(status.success(), "compiling test_recycle.c ({kind}) failed");
        let out = Command::new(&exe)
            .arg(work.join(format!("runs-{kind}")))
            .env(FASHION_MNIST.dir_env, &images)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("== test_recycle ({kind} library)\n{stdout}");
        eprintln!("{stderr}");
        assert!(
            out.status.success(),
            "test_recycle ({kind}) failed:\n{stderr}"
        );
        assert!(stdout.contains(", 0 failed"), "{stdout}");
    }
    let _ = std::fs::remove_dir_all(&work);
}
