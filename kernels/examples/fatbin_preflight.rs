//! Before a first GPU run: what each embedded fatbin offers a driver. Prints, per family, the
//! PTX entry's ISA version (`.version`, which the driver must know to JIT it) and target, and
//! the real architectures with a cubin, and fails when a family lacks the sm_90 cubin (the
//! H100/H200 image) or its PTX. Run with
//! `RECYCLE_REQUIRE_NVCC=1 cargo run -p recycle-kernels --example fatbin_preflight`.

use recycle_kernels::fatbin::{self, EntryKind};

/// The value of a PTX directive (`.version 9.0` -> "9.0").
fn directive(ptx: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(ptx).lines().find_map(|l| {
        l.trim()
            .strip_prefix(name)
            .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
    })
}

fn main() {
    if !recycle_kernels::available() {
        eprintln!("this build embeds no kernels (built without nvcc): nothing to inspect");
        std::process::exit(1);
    }
    let mut missing = Vec::new();
    println!("| family | PTX ISA | PTX target | cubins | sm_90 cubin bytes |");
    println!("|---|---|---|---|---:|");
    for (family, data) in recycle_kernels::all() {
        let entries = fatbin::entries(data).unwrap_or_else(|e| panic!("{family}: {e}"));
        let ptx = entries.iter().find(|e| e.kind == EntryKind::Ptx);
        let (isa, target) = match ptx {
            Some(e) if !e.compressed => (
                directive(e.payload, ".version").unwrap_or_else(|| "?".into()),
                directive(e.payload, ".target").unwrap_or_else(|| "?".into()),
            ),
            Some(_) => ("compressed".into(), "compressed".into()),
            None => {
                missing.push(format!("{family}: no PTX"));
                ("none".into(), "none".into())
            }
        };
        let cubins: Vec<String> = entries
            .iter()
            .filter(|e| e.kind == EntryKind::Cubin)
            .map(|e| format!("sm_{}", e.arch))
            .collect();
        let sm90 = entries
            .iter()
            .find(|e| e.kind == EntryKind::Cubin && e.arch == 90);
        if sm90.is_none() {
            missing.push(format!("{family}: no sm_90 cubin"));
        }
        println!(
            "| {family} | {isa} | {target} | {} | {} |",
            cubins.join(", "),
            sm90.map_or("none".to_string(), |e| e.payload.len().to_string())
        );
    }
    if !missing.is_empty() {
        eprintln!("missing: {}", missing.join("; "));
        std::process::exit(1);
    }
}
