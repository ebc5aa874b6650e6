//! Compiles every kernel family (`src/<family>.cu`) with nvcc into one fatbin per family and
//! writes `$OUT_DIR/kernels.rs`, which embeds them (see the crate documentation).
//!
//! Each fatbin holds cubins for sm_80, sm_86, sm_89 and sm_90 and the PTX of compute_90. The
//! cubins are what runs: a cubin built by a newer 13.x toolkit loads on a 13.0 driver, while PTX
//! from a newer toolkit does not JIT on an older driver. The PTX is only there for GPUs newer
//! than sm_90 on drivers at least as new as the toolkit.
//!
//! nvcc is looked for, in order: `$NVCC`; `$CUDA_HOME/bin`, `$CUDA_PATH/bin`; `PATH`; the
//! `site-packages` of `python3` (PyPI's `nvidia-cuda-nvcc`, `nvidia/cu13/bin/nvcc`); and
//! `/usr/local/cuda/bin`. Without nvcc the build still succeeds (with a warning) and the crate
//! embeds nothing, unless `RECYCLE_REQUIRE_NVCC=1`, which turns a missing nvcc into an error
//! (CI sets it). `RECYCLE_NO_NVCC=1` skips the search (an empty build on purpose). When nvcc is
//! found, any compile error fails the build.

use std::collections::BTreeSet;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

#[path = "build/launchers.rs"]
mod launchers;

/// The families, one `src/<family>.cu` each. Listed rather than globbed: adding a family edits
/// this file, which reruns the script (a new `.cu` alone would not), and the script checks that
/// this list and the directory agree.
const FAMILIES: &[&str] = &[
    "elementwise",
    "softmax",
    "layernorm",
    "batchnorm",
    "embedding",
    "dropout",
    "cross_entropy",
    "optimizers",
    "kd_loss",
    "pool",
    "layout",
];

/// Headers every family may include.
const HEADERS: &[&str] = &["common.cuh"];

/// Real architectures a cubin is built for (A100, RTX 30xx/A10, RTX 40xx/L4/L40, H100/H200).
const CUBIN_ARCHS: &[u32] = &[80, 86, 89, 90];

/// Virtual architecture of the embedded PTX.
const PTX_ARCH: u32 = 90;

const INSTALL_HINT: &str = "install it with `python3 -m pip install nvidia-cuda-nvcc \
     nvidia-cuda-runtime nvidia-cuda-cccl` (works on machines without a GPU), or point NVCC at \
     an nvcc binary, or CUDA_HOME at a CUDA toolkit";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let src = manifest.join("src");
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));

    println!("cargo:rerun-if-changed=build.rs");
    for f in FAMILIES {
        println!("cargo:rerun-if-changed=src/{f}.cu");
    }
    for h in HEADERS {
        println!("cargo:rerun-if-changed=src/{h}");
    }
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "RECYCLE_REQUIRE_NVCC",
        "RECYCLE_NO_NVCC",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    check_family_list(&src);
    write_launchers(&src, &out);

    let require = flag("RECYCLE_REQUIRE_NVCC");
    let found = if flag("RECYCLE_NO_NVCC") {
        Err(vec![
            "RECYCLE_NO_NVCC is set: the search was skipped".to_string()
        ])
    } else {
        find_nvcc()
    };
    let module = match found {
        Ok(nvcc) => {
            let info = NvccInfo::probe(&nvcc);
            compile_all(&nvcc, &info, &src, &out);
            generated_module(Some((&nvcc, &info)), &out)
        }
        Err(searched) => {
            let looked = searched.join("; ");
            if require {
                panic!(
                    "recycle-kernels: RECYCLE_REQUIRE_NVCC is set but nvcc was not found \
                     (looked at: {looked}); {INSTALL_HINT}"
                );
            }
            println!(
                "cargo:warning=recycle-kernels: nvcc not found (looked at: {looked}), so the \
                 crate is built without kernels (available() is false); {INSTALL_HINT}"
            );
            generated_module(None, &out)
        }
    };
    fs::write(out.join("kernels.rs"), module).expect("write $OUT_DIR/kernels.rs");
}

/// `$OUT_DIR/launchers.rs`: every kernel's signature and typed launcher, and the families'
/// constants and by-value structs, read from the `.cu` files (with or without nvcc).
fn write_launchers(src: &Path, out: &Path) {
    let families: Vec<_> = FAMILIES
        .iter()
        .map(|f| {
            let path = src.join(format!("{f}.cu"));
            let text = fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("recycle-kernels: reading {}: {e}", path.display()));
            (f.to_string(), launchers::family(f, &text))
        })
        .collect();
    let tmp = out.join("launchers.rs.tmp");
    fs::write(&tmp, launchers::module(&families)).expect("write $OUT_DIR/launchers.rs.tmp");
    fs::rename(&tmp, out.join("launchers.rs")).expect("rename to $OUT_DIR/launchers.rs");
}

fn flag(name: &str) -> bool {
    env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Fails when a `.cu` file in `src/` is not a listed family, or a listed family has no file.
fn check_family_list(src: &Path) {
    let on_disk: BTreeSet<String> = fs::read_dir(src)
        .expect("read kernels/src")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".cu").map(str::to_string)
        })
        .collect();
    let listed: BTreeSet<String> = FAMILIES.iter().map(|s| s.to_string()).collect();
    let unlisted: Vec<_> = on_disk.difference(&listed).collect();
    let missing: Vec<_> = listed.difference(&on_disk).collect();
    if !unlisted.is_empty() || !missing.is_empty() {
        panic!(
            "recycle-kernels: the FAMILIES list in build.rs and kernels/src/*.cu disagree: \
             files not listed {unlisted:?}, listed without a file {missing:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Finding nvcc
// ---------------------------------------------------------------------------------------------

fn is_file(p: &Path) -> bool {
    p.is_file()
}

/// The nvcc to use, or the list of places looked at.
fn find_nvcc() -> Result<PathBuf, Vec<String>> {
    let mut searched = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if is_file(&p) {
            return Ok(p);
        }
        // An explicit NVCC that does not exist is a mistake worth stopping for.
        panic!(
            "recycle-kernels: NVCC is set to {} which is not a file",
            p.display()
        );
    }
    searched.push("$NVCC (unset)".to_string());
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        match env::var_os(var) {
            Some(root) => {
                let p = PathBuf::from(root).join("bin").join("nvcc");
                if is_file(&p) {
                    return Ok(p);
                }
                searched.push(format!("{}", p.display()));
            }
            None => searched.push(format!("${var} (unset)")),
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if is_file(&p) {
                return Ok(p);
            }
        }
    }
    searched.push("PATH".to_string());
    match python_site_dirs() {
        Some(dirs) => {
            for d in &dirs {
                // CUDA 13 wheels put everything under nvidia/cu13; CUDA 12 wheels under
                // nvidia/cuda_nvcc.
                for rel in ["nvidia/cu13/bin/nvcc", "nvidia/cuda_nvcc/bin/nvcc"] {
                    let p = d.join(rel);
                    if is_file(&p) {
                        return Ok(p);
                    }
                }
            }
            searched.push(format!(
                "python3 site-packages ({})",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        None => searched.push("python3 site-packages (no python3 or python)".to_string()),
    }
    let p = PathBuf::from("/usr/local/cuda/bin/nvcc");
    if is_file(&p) {
        return Ok(p);
    }
    searched.push(p.display().to_string());
    Err(searched)
}

/// Every directory Python would import packages from, as reported by `python3` (or `python`).
fn python_site_dirs() -> Option<Vec<PathBuf>> {
    const SCRIPT: &str = "import sys, sysconfig\n\
ps = []\n\
try:\n    import site\n    ps += site.getsitepackages()\n    ps.append(site.getusersitepackages())\n\
except Exception:\n    pass\n\
ps += [sysconfig.get_paths()[k] for k in ('purelib', 'platlib')]\n\
ps += [p for p in sys.path if p]\n\
print('\\n'.join(ps))\n";
    for python in ["python3", "python"] {
        let Ok(out) = Command::new(python).arg("-c").arg(SCRIPT).output() else {
            continue;
        };
        if !out.status.success() {
            continue;
        }
        let mut dirs: Vec<PathBuf> = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let p = PathBuf::from(line.trim());
            if !line.trim().is_empty() && p.is_dir() && !dirs.contains(&p) {
                dirs.push(p);
            }
        }
        return Some(dirs);
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Compiling
// ---------------------------------------------------------------------------------------------

/// What this nvcc is and which of the optional flags it knows.
struct NvccInfo {
    /// `release X.Y, VX.Y.Z`, from `nvcc --version`.
    version: String,
    /// Whether it understands `--compress-mode=none` (CUDA 12.8+) or only `--no-compress`.
    compress_flag: Option<&'static str>,
    /// Extra include directories (CUDA 12 wheels keep headers in sibling packages).
    includes: Vec<PathBuf>,
}

impl NvccInfo {
    fn probe(nvcc: &Path) -> NvccInfo {
        let run = |arg: &str| -> String {
            let out = Command::new(nvcc).arg(arg).output().unwrap_or_else(|e| {
                panic!("recycle-kernels: cannot run {} {arg}: {e}", nvcc.display())
            });
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let version_text = run("--version");
        let version = version_text
            .lines()
            .find_map(|l| l.split_once("release ").map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| {
                panic!(
                    "recycle-kernels: {} --version did not report a release: {version_text}",
                    nvcc.display()
                )
            });
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 12 {
            panic!(
                "recycle-kernels: {} is CUDA {version}; the kernels need CUDA 12 or newer \
                 (sm_90 and bf16 intrinsics); {INSTALL_HINT}",
                nvcc.display()
            );
        }
        let help = run("--help");
        // Fatbins are written uncompressed: the driver loads them without inflating, and the
        // tests (and `fatbin::kernel_names`) can read the symbol tables.
        let compress_flag = if help.contains("--compress-mode") {
            Some("--compress-mode=none")
        } else if help.contains("--no-compress") {
            Some("--no-compress")
        } else {
            None
        };
        let mut includes = Vec::new();
        // .../nvidia/cuda_nvcc/bin/nvcc -> .../nvidia/{cuda_runtime,cuda_cccl}/include
        if let Some(nvidia) = nvcc
            .parent()
            .and_then(Path::parent)
            .filter(|p| p.ends_with("cuda_nvcc"))
            .and_then(Path::parent)
        {
            for pkg in ["cuda_runtime", "cuda_cccl"] {
                let inc = nvidia.join(pkg).join("include");
                if inc.is_dir() {
                    includes.push(inc);
                }
            }
        }
        NvccInfo {
            version,
            compress_flag,
            includes,
        }
    }
}

fn compile_all(nvcc: &Path, info: &NvccInfo, src: &Path, out: &Path) {
    if info.compress_flag.is_none() {
        println!(
            "cargo:warning=recycle-kernels: nvcc {} cannot be told not to compress fatbins; \
             kernel-name checks will skip compressed entries",
            info.version
        );
    }
    // Families in parallel, each nvcc on one core: cargo's job count, or the machine's cores.
    let jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .clamp(1, FAMILIES.len());
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(family) = FAMILIES.get(i) else { break };
                if let Err(e) = compile_family(nvcc, info, src, out, family) {
                    failures.lock().unwrap().push(e);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    if !failures.is_empty() {
        panic!(
            "recycle-kernels: nvcc {} failed:\n{}",
            info.version,
            failures.join("\n\n")
        );
    }
}

/// `nvcc --fatbin` for one family; the `ptxas -v` report is kept in `$OUT_DIR/<family>.ptxas.txt`.
fn compile_family(
    nvcc: &Path,
    info: &NvccInfo,
    src: &Path,
    out: &Path,
    family: &str,
) -> Result<(), String> {
    let input = src.join(format!("{family}.cu"));
    let output = out.join(format!("{family}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin")
        .arg("-std=c++17")
        .arg("-O3")
        .arg("-Xptxas=-v")
        .arg("-I")
        .arg(src);
    for inc in &info.includes {
        cmd.arg("-I").arg(inc);
    }
    if let Some(f) = info.compress_flag {
        cmd.arg(f);
    }
    for sm in CUBIN_ARCHS {
        if *sm == PTX_ARCH {
            cmd.arg(format!(
                "-gencode=arch=compute_{sm},code=[sm_{sm},compute_{sm}]"
            ));
        } else {
            cmd.arg(format!("-gencode=arch=compute_{sm},code=sm_{sm}"));
        }
    }
    cmd.arg("-o").arg(&output).arg(&input);
    let result = cmd
        .output()
        .map_err(|e| format!("{family}: cannot run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    if !result.status.success() {
        return Err(format!("{family}: {cmd:?}\n{stderr}"));
    }
    // Everything that is not ptxas's resource report is a compiler warning: show it.
    for line in stderr.lines() {
        if !line.starts_with("ptxas info") && !line.starts_with("    ") && !line.is_empty() {
            println!("cargo:warning=recycle-kernels ({family}.cu): {line}");
        }
    }
    fs::write(out.join(format!("{family}.ptxas.txt")), stderr)
        .map_err(|e| format!("{family}: writing the ptxas report: {e}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The generated module
// ---------------------------------------------------------------------------------------------

fn generated_module(built: Option<(&Path, &NvccInfo)>, out: &Path) -> String {
    let mut m = String::from("// Generated by kernels/build.rs; do not edit.\n\n");
    let (available, version, nvcc_path) = match built {
        Some((nvcc, info)) => (true, info.version.clone(), nvcc.display().to_string()),
        None => (false, String::new(), String::new()),
    };
    writeln!(
        m,
        "/// Whether nvcc was found and every family was compiled into this crate.\n\
         pub const AVAILABLE: bool = {available};\n\
         /// `release X.Y, VX.Y.Z` of the nvcc that compiled the kernels (empty without one).\n\
         pub const NVCC_VERSION: &str = {version:?};\n\
         /// The nvcc that compiled the kernels (empty without one); the host-side tests reuse it.\n\
         pub const NVCC_PATH: &str = {nvcc_path:?};\n\
         /// Real architectures with a cubin in every fatbin.\n\
         pub const CUBIN_ARCHS: &[u32] = &{CUBIN_ARCHS:?};\n\
         /// Virtual architecture of the PTX in every fatbin.\n\
         pub const PTX_ARCH: u32 = {PTX_ARCH};\n"
    )
    .unwrap();
    for f in FAMILIES {
        let konst = f.to_uppercase();
        if available {
            let path = out.join(format!("{f}.fatbin"));
            writeln!(
                m,
                "/// Fatbin of `src/{f}.cu`.\n\
                 pub static {konst}: &[u8] = &crate::Aligned(*include_bytes!({:?})).0;",
                path.display().to_string()
            )
            .unwrap();
        } else {
            writeln!(
                m,
                "/// Fatbin of `src/{f}.cu` (empty: built without nvcc).\n\
                 pub static {konst}: &[u8] = &[];"
            )
            .unwrap();
        }
    }
    m.push_str("\n/// Every family and its fatbin, in build order.\npub static ALL: &[(&str, &[u8])] = &[\n");
    for f in FAMILIES {
        writeln!(m, "    ({f:?}, {}),", f.to_uppercase()).unwrap();
    }
    m.push_str("];\n\n/// Every family's source, in build order (the kernel simulator's input).\n");
    m.push_str("pub static SOURCES: &[(&str, &str)] = &[\n");
    for f in FAMILIES {
        let src = format!("concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/src/{f}.cu\")");
        writeln!(m, "    ({f:?}, include_str!({src})),").unwrap();
    }
    m.push_str("];\n");
    m
}
