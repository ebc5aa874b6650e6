//! Compiles `tests/test_recycle.c` with the system C compiler (`$CC`, else `cc`) against
//! `include/recycle.h` and the shared library cargo built for this crate, and runs it: a tiny
//! training run, the fused loss against a reference computed in C, and bad input.
//! The training run reads a small generated Fashion-MNIST, which this test writes and names in
//! `RECYCLE_FASHION_MNIST_DIR` for the program.

use std::path::{Path, PathBuf};
use std::process::Command;

use recycle::data::sources::FASHION_MNIST;
use recycle::data::test_support::{fixture_data, use_fixture_data};

/// The directory holding `librecycle_c.so` built for this test: `target/<profile>/deps`, where
/// `cargo test` puts it (the copy in `target/<profile>` is only refreshed by `cargo build`, so
/// it may be older than the sources).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
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

/// Compiles the C file `src` against the header and the shared library into `exe`.
fn compile_shared(src: &Path, exe: &Path) {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = library_dir();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
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
        .arg(src)
        .arg("-o")
        .arg(exe)
        .arg(format!("-L{}", lib.display()))
        // DT_RPATH, not DT_RUNPATH: searched before LD_LIBRARY_PATH, which `cargo test` points
        // at `target/<profile>` too, where an older copy of the library may lie.
        .arg("-Wl,--disable-new-dtags")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lrecycle_c", "-lm", "-pthread"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(status.success(), "compiling {} failed", src.display());
}

/// The caller-fed entry points from C: steps, evaluations, teacher logits, bad input, and two
/// trainers in two threads (`tests/test_batches.c`).
#[test]
fn c_program_feeds_its_own_batches_from_two_threads() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join(format!("recycle-c-batches-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let (images, text) = fixture_data(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let exe = work.join("test_batches");
    compile_shared(&crate_dir.join("tests/test_batches.c"), &exe);
    let out = Command::new(&exe)
        .arg(work.join("runs"))
        .env(FASHION_MNIST.dir_env, &images)
        .env(recycle::data::sources::FORTUNES.dir_env, &text)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("== test_batches\n{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "test_batches failed");
    assert!(stdout.contains(", 0 failed"), "{stdout}");
    let _ = std::fs::remove_dir_all(&work);
}

/// `examples/service.c`, a service that makes its own batches and trains a distilled student
/// on them, gives the Rust `Trainer`'s losses and weights on the same batches bit for bit.
#[test]
fn the_example_service_equals_the_rust_trainer() {
    use recycle::recipe::Recipe;
    use recycle::trainer::{Batch, RunOptions, Trainer};

    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join(format!("recycle-c-service-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let (images, _) = use_fixture_data(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    // The service's batches, made as it makes them.
    let batch = |step: u64| {
        let n = 16usize;
        let labels: Vec<i32> = (0..n)
            .map(|i| ((3 * step as usize + i) % 10) as i32)
            .collect();
        let mut x = Vec::with_capacity(n * 784);
        for (i, &y) in labels.iter().enumerate() {
            for j in 0..784usize {
                x.push(
                    ((j * 31 + i * 13 + step as usize * 7 + y as usize * 97) % 251) as f32 / 250.0,
                );
            }
        }
        Batch::images(x, [n, 1, 28, 28], labels).unwrap()
    };
    let recipe = |name: &str, distill: &str| {
        format!(
            "name = \"{name}\"\nout_dir = \"{}\"\nseed = 3\n{distill}\n\
             [model]\nkind = \"resnet\"\nwidth = 0.0625\n\
             [data]\ndataset = \"fashion-mnist\"\ntrain_limit = 192\neval_limit = 64\n\
             [train]\nbatch_size = 16\nsamples = 96\nevals = 1\n\
             [optimizer]\nkind = \"sgdw\"\nlr = 0.1\nwarmup = 0.2\n",
            work.display()
        )
    };
    let opts = RunOptions {
        overwrite: true,
        ..RunOptions::default()
    };
    let mut teacher =
        Trainer::new(&Recipe::from_toml(&recipe("teacher", "")).unwrap(), &opts).unwrap();
    for s in 0..teacher.total_steps() {
        teacher.step_batch(&batch(s + 100)).unwrap();
    }
    teacher.finish().unwrap();
    let distill = format!(
        "[distill]\nteachers = [\"{}\"]\ntemperature = 2.0\nweight = 0.7\n",
        work.join("teacher").display()
    );
    let student_toml = recipe("student", &distill);
    std::fs::write(work.join("student.toml"), &student_toml).unwrap();

    let exe = work.join("service");
    compile_shared(&crate_dir.join("examples/service.c"), &exe);
    let out = Command::new(&exe)
        .arg(work.join("student.toml"))
        .arg(work.join("c.safetensors"))
        .env(FASHION_MNIST.dir_env, &images)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    println!("== service\n{stdout}");
    assert!(
        out.status.success(),
        "service failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut rust = Trainer::new(&Recipe::from_toml(&student_toml).unwrap(), &opts).unwrap();
    let mut want = String::new();
    for s in 0..rust.total_steps() {
        let r = rust.step_batch(&batch(s)).unwrap();
        want.push_str(&format!(
            "step {s} loss {:08x} ce {:08x} kd {:08x} teachers {}\n",
            r.output.loss.to_bits(),
            r.output.ce.to_bits(),
            r.output.kd.unwrap_or(f32::NAN).to_bits(),
            r.output.teacher_forwards
        ));
    }
    rust.save_checkpoint(work.join("rust.safetensors")).unwrap();
    assert_eq!(stdout.matches("teachers 1").count(), 6, "{stdout}");
    assert!(stdout.starts_with(&want), "C:\n{stdout}\nRust:\n{want}");
    let model = |p: &Path| -> Vec<(String, Vec<u8>)> {
        recycle::engine::checkpoint::load(p)
            .unwrap()
            .tensors
            .into_iter()
            .map(|(n, t)| (n, t.to_bytes().unwrap()))
            .collect()
    };
    let c_weights = model(&work.join("c.safetensors"));
    assert!(c_weights.len() > 10);
    assert_eq!(c_weights, model(&work.join("rust.safetensors")));
    let _ = std::fs::remove_dir_all(&work);
}
