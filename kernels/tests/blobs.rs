//! The embedded fatbins: present when nvcc was available, well formed, one cubin per target
//! architecture plus PTX, and defining every kernel `names` lists (so every name the engine
//! looks up resolves on every GPU the crate targets).

use recycle_kernels::call::Signature;
use recycle_kernels::fatbin::{self, EntryKind};
use recycle_kernels::launchers::FAMILIES;
use recycle_kernels::{all, available, CUBIN_ARCHS, PTX_ARCH};

/// Without nvcc the crate embeds nothing; these tests then check only that.
fn built() -> bool {
    if !available() {
        eprintln!("recycle-kernels was built without nvcc: the fatbins are empty");
    }
    available()
}

#[test]
fn blobs_exist_and_start_with_the_fatbin_magic() {
    if !built() {
        for (name, blob) in all() {
            assert!(
                blob.is_empty(),
                "{name} is not empty in a build without nvcc"
            );
        }
        return;
    }
    assert!(!recycle_kernels::NVCC_VERSION.is_empty());
    for (name, blob) in all() {
        assert!(blob.len() > 1024, "{name}: {} bytes", blob.len());
        assert!(fatbin::is_fatbin(blob), "{name}: no fatbin magic");
        assert_eq!(
            u32::from_le_bytes(blob[..4].try_into().unwrap()),
            fatbin::FATBIN_MAGIC
        );
        // The driver reads the 8-byte fields of the header in place.
        assert_eq!(
            blob.as_ptr() as usize % 8,
            0,
            "{name} is not 8-byte aligned"
        );
    }
}

#[test]
fn every_fatbin_holds_each_cubin_and_the_ptx() {
    if !built() {
        return;
    }
    for (name, blob) in all() {
        let entries = fatbin::entries(blob).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut cubins: Vec<u32> = entries
            .iter()
            .filter(|e| e.kind == EntryKind::Cubin)
            .map(|e| e.arch)
            .collect();
        cubins.sort();
        assert_eq!(cubins, CUBIN_ARCHS, "{name}: cubin architectures");
        let ptx: Vec<u32> = entries
            .iter()
            .filter(|e| e.kind == EntryKind::Ptx)
            .map(|e| e.arch)
            .collect();
        assert_eq!(ptx, [PTX_ARCH], "{name}: PTX architectures");
        for e in &entries {
            assert!(
                !e.compressed,
                "{name}: the {:?} for {} is compressed",
                e.kind, e.arch
            );
            match e.kind {
                EntryKind::Cubin => assert_eq!(&e.payload[..4], b"\x7fELF", "{name}"),
                EntryKind::Ptx => {
                    let text = String::from_utf8_lossy(e.payload);
                    assert!(
                        text.contains(".version") && text.contains(".target sm_90"),
                        "{name}"
                    );
                }
                EntryKind::Other(k) => panic!("{name}: unexpected entry kind {k}"),
            }
        }
        // Every GPU the crate targets runs a cubin, never the PTX.
        for sm in [80, 86, 87, 89, 90] {
            let chosen = fatbin::select(&entries, sm).unwrap();
            assert_eq!(chosen.kind, EntryKind::Cubin, "{name} on sm_{sm}");
        }
    }
}

#[test]
fn every_named_kernel_is_in_every_image() {
    if !built() {
        return;
    }
    for (family, kernels) in FAMILIES {
        let blob = recycle_kernels::family(family).unwrap();
        for entry in fatbin::entries(blob).unwrap() {
            let mut defined = fatbin::kernel_names(&entry).unwrap();
            defined.sort();
            let mut wanted: Vec<String> = kernels.iter().map(|s| s.to_string()).collect();
            wanted.sort();
            // Exactly the listed kernels: a kernel added to a .cu file must be named too.
            assert_eq!(
                defined, wanted,
                "{family}: kernels of the {:?} image for {}",
                entry.kind, entry.arch
            );
        }
    }
}

/// The parameter types of kernel `name` in PTX text, in order: `u64`, `u32`, `f32`, ..., and
/// `b8[N]` for a structure of N bytes passed by value. `None` when the PTX has no such entry.
fn ptx_kernel_params(ptx: &[u8], name: &str) -> Option<Vec<String>> {
    let text = String::from_utf8_lossy(ptx);
    let header = format!(".entry {name}(");
    let start = text.find(&header)? + header.len();
    let body = &text[start..start + text[start..].find(')')?];
    Some(
        body.split(',')
            .filter(|p| p.contains(".param"))
            .map(|p| {
                let words: Vec<&str> = p.split_whitespace().collect();
                // `.param .u64 name` or `.param .align 8 .b8 name[64]`
                let ty = words
                    .iter()
                    .rev()
                    .nth(1)
                    .map(|w| w.trim_start_matches('.'))
                    .unwrap_or("");
                match words.last().and_then(|n| n.split_once('[')) {
                    Some((_, len)) => format!("{ty}[{}", len),
                    None => ty.to_string(),
                }
            })
            .collect(),
    )
}

/// The PTX declaration (`u64`, `u32`, `f32`, `b8[64]`) each parameter of `sig` compiles to.
fn ptx_types(sig: &Signature) -> Vec<&'static str> {
    sig.params
        .iter()
        .map(|(_, ty)| match *ty {
            t if t.ends_with('*') => "u64",
            "uint64_t" => "u64",
            "uint32_t" | "int32_t" | "int" => "u32",
            "float" => "f32",
            "TeacherLogits" => "b8[64]",
            other => unreachable!("the generator accepts no parameter type {other}"),
        })
        .collect()
}

#[test]
fn parameter_lists_match_the_compiled_kernels() {
    if !built() {
        return;
    }
    for (family, kernels) in FAMILIES {
        let blob = recycle_kernels::family(family).unwrap();
        let entries = fatbin::entries(blob).unwrap();
        let ptx = entries.iter().find(|e| e.kind == EntryKind::Ptx).unwrap();
        for k in *kernels {
            let compiled = ptx_kernel_params(ptx.payload, k)
                .unwrap_or_else(|| panic!("{family}: no .entry {k} in the PTX"));
            let sig = Signature::of(k).unwrap();
            assert_eq!(
                compiled,
                ptx_types(sig),
                "{k}: the PTX parameters differ from the signature read from {family}.cu ({:?})",
                sig.params
            );
        }
    }
}

#[test]
fn generated_constants_are_the_compiled_ones() {
    if !built() {
        return;
    }
    // embedding_bwd_place stages one segment of ids in shared memory: RK_EMBEDDING_SEGMENT
    // int32s, read by the generator, and the block size the launch helper gives it.
    let blob = recycle_kernels::family("embedding").unwrap();
    let entries = fatbin::entries(blob).unwrap();
    let ptx = entries.iter().find(|e| e.kind == EntryKind::Ptx).unwrap();
    let text = String::from_utf8_lossy(ptx.payload);
    let seg_bytes = 4 * recycle_kernels::launchers::EMBEDDING_SEGMENT;
    assert!(
        text.contains(&format!("seg_ids[{seg_bytes}]")),
        "{seg_bytes}"
    );
    let plan = recycle_kernels::launch::embedding_backward(5000, 100, 8)
        .unwrap()
        .unwrap();
    assert_eq!(plan.place.block[0], 1024);
}
