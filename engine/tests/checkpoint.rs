//! Checkpoints: safetensors round trips, dtype conversion, strict matching with useful errors,
//! corrupt files, atomic writes, a file written by PyTorch, and an optimizer resumed from a
//! checkpoint file.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use half::bf16;
use recycle_engine::checkpoint::{self, load, load_matching, load_params, save, save_params};
use recycle_engine::optim::{Optimizer, Sgdw};
use recycle_engine::{DType, Device, FlatParams, Tensor};
use safetensors::tensor::{Dtype, TensorView};

/// A fresh, empty directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("checkpoint-{test}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn named(name: &str, t: Tensor) -> (String, Tensor) {
    (name.to_string(), t)
}

fn sample_tensors() -> Vec<(String, Tensor)> {
    vec![
        named(
            "layer.weight",
            Tensor::f32(vec![1.0, -2.5, 3.25, 0.0, 1e-30, -7.0], &[2, 3]).unwrap(),
        ),
        named(
            "teacher.bf16",
            Tensor::from_vec(
                [1.5f32, -0.15625, 3.0e38, 0.0]
                    .iter()
                    .map(|&x| bf16::from_f32(x))
                    .collect::<Vec<_>>(),
                &[4],
                Device::Cpu,
            )
            .unwrap(),
        ),
        named(
            "labels",
            Tensor::from_vec(vec![7i32, -1, i32::MAX], &[3], Device::Cpu).unwrap(),
        ),
        named("scalar", Tensor::f32(vec![0.5], &[]).unwrap()),
    ]
}

/// Writes a safetensors file directly with the safetensors crate (for dtypes the engine
/// never writes).
fn write_raw(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

#[test]
fn round_trip_keeps_dtypes_values_and_metadata() {
    let dir = scratch("round_trip");
    let path = dir.join("ckpt.safetensors");
    let tensors = sample_tensors();
    let meta = HashMap::from([
        ("step".to_string(), "1200".to_string()),
        ("recipe".to_string(), "resnet18-kd".to_string()),
    ]);
    save(&path, &tensors, Some(meta.clone())).unwrap();
    let ck = load(&path).unwrap();
    assert_eq!(ck.metadata, meta);
    assert_eq!(ck.path, path);
    let names: Vec<&str> = ck.names().collect();
    assert_eq!(names, ["labels", "layer.weight", "scalar", "teacher.bf16"]);
    for (name, want) in &tensors {
        let got = ck.get(name).unwrap();
        assert_eq!(got.shape(), want.shape(), "{name}");
        assert_eq!(got.dtype(), want.dtype(), "{name}");
        assert_eq!(got.to_bytes().unwrap(), want.to_bytes().unwrap(), "{name}");
    }
    assert!(ck.get("nope").is_none());
    assert_eq!(
        files_in(&dir),
        ["ckpt.safetensors"],
        "no temporary file left"
    );

    // No metadata is an empty map.
    save(&path, &tensors[..1], None).unwrap();
    assert!(load(&path).unwrap().metadata.is_empty());
}

#[test]
fn saving_views_of_a_flat_buffer_writes_only_the_view() {
    let dir = scratch("views");
    let path = dir.join("p.safetensors");
    let flat = Tensor::f32((0..10).map(|x| x as f32).collect(), &[10]).unwrap();
    save(&path, &[named("mid", flat.view(3, &[2, 2]).unwrap())], None).unwrap();
    let ck = load(&path).unwrap();
    assert_eq!(
        ck.get("mid").unwrap().to_vec::<f32>().unwrap(),
        [3.0, 4.0, 5.0, 6.0]
    );
}

#[test]
fn save_rejects_duplicate_and_reserved_names() {
    let dir = scratch("names");
    let path = dir.join("x.safetensors");
    let t = Tensor::f32(vec![1.0], &[1]).unwrap();
    let e = save(&path, &[named("a", t.clone()), named("a", t.clone())], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`a`") && e.contains("x.safetensors"), "{e}");
    assert!(save(&path, &[named("__metadata__", t)], None).is_err());
    assert!(files_in(&dir).is_empty());
}

#[test]
fn load_converts_f16_and_i64_and_rejects_other_dtypes() {
    let dir = scratch("dtypes");
    let path = dir.join("mixed.safetensors");
    let f16s: Vec<u8> = [1.0f32, -0.5, 65504.0]
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let i64s: Vec<u8> = [3i64, -4, 1 << 30]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    write_raw(
        &path,
        &[
            ("h", Dtype::F16, vec![3], f16s),
            ("count", Dtype::I64, vec![3], i64s),
        ],
    );
    let ck = load(&path).unwrap();
    let h = ck.get("h").unwrap();
    assert_eq!(h.dtype(), DType::F32);
    assert_eq!(h.to_vec::<f32>().unwrap(), [1.0, -0.5, 65504.0]);
    let c = ck.get("count").unwrap();
    assert_eq!(c.dtype(), DType::I32);
    assert_eq!(c.to_vec::<i32>().unwrap(), [3, -4, 1 << 30]);

    write_raw(
        &path,
        &[(
            "too_big",
            Dtype::I64,
            vec![1],
            (1i64 << 40).to_le_bytes().to_vec(),
        )],
    );
    let e = load(&path).unwrap_err().to_string();
    assert!(
        e.contains("`too_big`") && e.contains(&(1i64 << 40).to_string()) && e.contains("mixed"),
        "{e}"
    );

    write_raw(
        &path,
        &[(
            "doubles",
            Dtype::F64,
            vec![1],
            1.0f64.to_le_bytes().to_vec(),
        )],
    );
    let e = load(&path).unwrap_err().to_string();
    assert!(e.contains("`doubles`") && e.contains("F64"), "{e}");
}

#[test]
fn load_matching_reports_every_mismatch_in_one_error() {
    let dir = scratch("matching");
    let path = dir.join("model.safetensors");
    save(
        &path,
        &[
            named(
                "fc.weight",
                Tensor::zeros(&[10, 4], DType::F32, Device::Cpu).unwrap(),
            ),
            named(
                "fc.bias",
                Tensor::zeros(&[10], DType::F32, Device::Cpu).unwrap(),
            ),
            named(
                "conv1.weight",
                Tensor::zeros(&[8, 3, 3, 3], DType::F32, Device::Cpu).unwrap(),
            ),
            named(
                "extra.thing",
                Tensor::zeros(&[1], DType::F32, Device::Cpu).unwrap(),
            ),
        ],
        None,
    )
    .unwrap();

    // A match comes back in the order asked for.
    let expected = vec![
        ("fc.bias".to_string(), vec![10]),
        ("fc.weight".to_string(), vec![10, 4]),
        ("conv1.weight".to_string(), vec![8, 3, 3, 3]),
        ("extra.thing".to_string(), vec![1]),
    ];
    let got = load_matching(&path, &expected).unwrap();
    let shapes: Vec<&[usize]> = got.iter().map(|t| t.shape()).collect();
    assert_eq!(shapes, [&[10][..], &[10, 4], &[8, 3, 3, 3], &[1]]);

    let expected = vec![
        ("fc.weight".to_string(), vec![1000, 4]),
        ("fc.bias".to_string(), vec![10]),
        ("conv1.weight".to_string(), vec![8, 3, 3, 3]),
        ("bn1.weight".to_string(), vec![8]),
        ("bn1.bias".to_string(), vec![8]),
    ];
    let e = load_matching(&path, &expected).unwrap_err().to_string();
    for needle in [
        "model.safetensors",
        "2 missing",
        "`bn1.weight`",
        "`bn1.bias`",
        "1 unexpected",
        "`extra.thing`",
        "1 with the wrong shape",
        "`fc.weight` is [10, 4] in the file, expected [1000, 4]",
    ] {
        assert!(e.contains(needle), "missing {needle:?} in: {e}");
    }

    // Many missing names: the first ones by name, then a count.
    let many: Vec<(String, Vec<usize>)> = (0..25)
        .map(|i| (format!("layer{i:02}.w"), vec![1]))
        .chain(expected[..3].iter().cloned().map(|(n, _)| (n, vec![])))
        .collect();
    let e = load_matching(&path, &many).unwrap_err().to_string();
    assert!(
        e.contains("25 missing") && e.contains("`layer00.w`") && e.contains("and 15 more"),
        "{e}"
    );
    assert!(e.contains("3 with the wrong shape"), "{e}");
}

#[test]
fn corrupt_truncated_and_missing_files_are_errors_naming_the_file() {
    let dir = scratch("corrupt");
    let good = dir.join("good.safetensors");
    save(&good, &sample_tensors(), None).unwrap();
    let bytes = fs::read(&good).unwrap();

    // (file, contents, a word the message must use)
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.safetensors", vec![], "truncated"),
        ("short_header.safetensors", bytes[..5].to_vec(), "truncated"),
        ("cut_header.safetensors", bytes[..40].to_vec(), "truncated"),
        (
            "cut_data.safetensors",
            bytes[..bytes.len() - 3].to_vec(),
            "truncated",
        ),
        (
            "extra_data.safetensors",
            [&bytes[..], &[0u8; 4][..]].concat(),
            "trailing",
        ),
        (
            "garbage.safetensors",
            b"this is not a checkpoint at all".to_vec(),
            "not a safetensors file",
        ),
        (
            "bad_json.safetensors",
            [&8u64.to_le_bytes()[..], b"{not json"].concat(),
            "corrupt",
        ),
    ];
    for (name, content, word) in cases {
        let path = dir.join(name);
        fs::write(&path, content).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(word), "{name}: {e}");
    }
    let e = load(&dir.join("absent.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.safetensors"), "{e}");
}

#[test]
fn failed_saves_leave_the_previous_checkpoint_intact() {
    let dir = scratch("atomic");
    let path = dir.join("ckpt.safetensors");
    let old = sample_tensors();
    save(&path, &old, None).unwrap();
    let old_bytes = fs::read(&path).unwrap();

    // A replacement is complete and leaves nothing behind.
    let new = vec![named("only", Tensor::f32(vec![9.0; 3], &[3]).unwrap())];
    save(&path, &new, None).unwrap();
    assert_eq!(load(&path).unwrap().names().collect::<Vec<_>>(), ["only"]);
    assert_eq!(files_in(&dir), ["ckpt.safetensors"]);
    save(&path, &old, None).unwrap();
    assert_eq!(fs::read(&path).unwrap(), old_bytes);

    // A save rejected before writing.
    let t = Tensor::f32(vec![1.0], &[1]).unwrap();
    assert!(save(&path, &[named("d", t.clone()), named("d", t.clone())], None).is_err());
    assert_eq!(fs::read(&path).unwrap(), old_bytes);

    // A save that fails after the data is written: the rename onto a directory fails; the
    // temporary file is removed and the directory untouched.
    let blocker = dir.join("blocked.safetensors");
    fs::create_dir(&blocker).unwrap();
    fs::write(blocker.join("inside"), b"keep me").unwrap();
    let e = save(&blocker, &old, None).unwrap_err().to_string();
    assert!(e.contains("blocked.safetensors"), "{e}");
    assert_eq!(fs::read(blocker.join("inside")).unwrap(), b"keep me");
    assert_eq!(files_in(&dir), ["blocked.safetensors", "ckpt.safetensors"]);

    // A missing directory: an error naming the path, nothing created.
    let missing = dir.join("no_such_dir").join("ckpt.safetensors");
    let e = save(&missing, &old, None).unwrap_err().to_string();
    assert!(
        e.contains("no_such_dir") && e.contains("ckpt.safetensors"),
        "{e}"
    );
    assert!(!dir.join("no_such_dir").exists());

    // A read-only directory (only meaningful when not running as root, which ignores modes).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.join("readonly");
        fs::create_dir(&ro).unwrap();
        let target = ro.join("ckpt.safetensors");
        save(&target, &old, None).unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        let root_ignores_modes = fs::write(ro.join("probe"), b"").is_ok();
        if !root_ignores_modes {
            let e = save(&target, &new, None).unwrap_err().to_string();
            assert!(
                e.contains("readonly") && e.contains("ckpt.safetensors"),
                "{e}"
            );
            assert_eq!(fs::read(&target).unwrap(), old_bytes);
            assert_eq!(files_in(&ro), ["ckpt.safetensors"]);
        }
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn two_params() -> FlatParams {
    FlatParams::new(
        &[
            ("conv.weight".to_string(), vec![2, 3]),
            ("conv.bias".to_string(), vec![2]),
        ],
        Device::Cpu,
    )
    .unwrap()
}

#[test]
fn params_round_trip_and_strict_loading() {
    let dir = scratch("params");
    let path = dir.join("params.safetensors");
    let p = two_params();
    p.values()
        .write_f32()
        .unwrap()
        .copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, -1.0, -2.0]);
    save_params(
        &path,
        &p,
        Some(HashMap::from([("epoch".to_string(), "3".to_string())])),
    )
    .unwrap();
    let ck = load(&path).unwrap();
    assert_eq!(
        ck.get("conv.bias").unwrap().to_vec::<f32>().unwrap(),
        [-1.0, -2.0]
    );
    assert_eq!(ck.metadata["epoch"], "3");

    let q = two_params();
    load_params(&path, &q).unwrap();
    assert_eq!(
        q.values().to_vec_f32().unwrap(),
        p.values().to_vec_f32().unwrap()
    );

    // bf16 in the file is widened into the f32 buffer.
    let bf = |v: &[f32]| {
        Tensor::from_vec(
            v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
            &[v.len()],
            Device::Cpu,
        )
        .unwrap()
    };
    save(
        &path,
        &[
            named("conv.weight", bf(&[0.5; 6]).reshape(&[2, 3]).unwrap()),
            named("conv.bias", bf(&[1.5, -2.5])),
        ],
        None,
    )
    .unwrap();
    load_params(&path, &q).unwrap();
    assert_eq!(
        q.values().to_vec_f32().unwrap(),
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.5, -2.5]
    );

    // Strict: a wrong shape, a missing and an unexpected name, and nothing is written.
    save(
        &path,
        &[
            named(
                "conv.weight",
                Tensor::zeros(&[3, 2], DType::F32, Device::Cpu).unwrap(),
            ),
            named(
                "fc.bias",
                Tensor::zeros(&[2], DType::F32, Device::Cpu).unwrap(),
            ),
        ],
        None,
    )
    .unwrap();
    let before = q.values().to_vec_f32().unwrap();
    let e = load_params(&path, &q).unwrap_err().to_string();
    for needle in ["`conv.bias`", "`fc.bias`", "[3, 2]", "[2, 3]"] {
        assert!(e.contains(needle), "missing {needle:?} in: {e}");
    }
    assert_eq!(q.values().to_vec_f32().unwrap(), before);

    // Integer tensors cannot fill parameters.
    save(
        &path,
        &[
            named(
                "conv.weight",
                Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap(),
            ),
            named(
                "conv.bias",
                Tensor::from_vec(vec![1i32, 2], &[2], Device::Cpu).unwrap(),
            ),
        ],
        None,
    )
    .unwrap();
    let e = load_params(&path, &q).unwrap_err().to_string();
    assert!(e.contains("`conv.bias` (i32)"), "{e}");
    assert_eq!(q.values().to_vec_f32().unwrap(), before);
}

#[test]
fn loads_a_file_written_by_pytorch() {
    // Written by scripts/reference/checkpoint_fixture.py with safetensors.torch.save_file.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_state.safetensors");
    let ck = load(&path).unwrap();
    assert_eq!(ck.metadata.get("format").map(String::as_str), Some("pt"));
    assert_eq!(
        ck.names().collect::<Vec<_>>(),
        [
            "bn.num_batches_tracked",
            "bn.running_var",
            "conv.weight",
            "emb.half"
        ]
    );

    let w = ck.get("conv.weight").unwrap();
    assert_eq!((w.dtype(), w.shape()), (DType::F32, &[2, 3][..]));
    assert_eq!(
        w.to_vec::<f32>().unwrap(),
        [-1.25, -0.75, -0.25, 0.25, 0.75, 1.25]
    );

    let v = ck.get("bn.running_var").unwrap();
    assert_eq!((v.dtype(), v.shape()), (DType::BF16, &[3][..]));
    assert_eq!(v.to_vec_f32().unwrap(), [1.5, -2.0, 0.15625]);

    let h = ck.get("emb.half").unwrap();
    assert_eq!((h.dtype(), h.shape()), (DType::F32, &[2, 2][..]));
    assert_eq!(
        h.to_vec::<f32>().unwrap(),
        [0.5, -65504.0, 2f32.powi(-24), 1024.0]
    );

    // PyTorch's int64 0-dimensional counter arrives as an i32 scalar.
    let n = ck.get("bn.num_batches_tracked").unwrap();
    assert_eq!((n.dtype(), n.shape()), (DType::I32, &[][..]));
    assert_eq!(n.to_vec::<i32>().unwrap(), [123456]);

    // And it can be matched against what a model expects.
    let expected: Vec<(String, Vec<usize>)> = ck
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shape().to_vec()))
        .collect();
    assert_eq!(
        checkpoint::load_matching(&path, &expected).unwrap().len(),
        4
    );
}

#[test]
fn optimizer_resumes_bit_identically_from_a_checkpoint_file() {
    let dir = scratch("resume");
    let path = dir.join("step.safetensors");
    let grads: Vec<Vec<f32>> = (0..6)
        .map(|s| {
            Tensor::randn(&[8], 0.0, 1.0, 100 + s, DType::F32, Device::Cpu)
                .unwrap()
                .to_vec_f32()
                .unwrap()
        })
        .collect();
    let init = Tensor::randn(&[8], 0.0, 1.0, 7, DType::F32, Device::Cpu).unwrap();
    let lr = |s: usize| 0.1 * (1.0 - s as f32 / 10.0);

    let run = |resume_at: Option<usize>| {
        let mut p = two_params();
        p.values().copy_from(&init).unwrap();
        let mut opt = Sgdw::paper(p.len(), 0.1).unwrap();
        for (s, g) in grads.iter().enumerate() {
            if resume_at == Some(s) {
                let mut all = p.named_tensors().unwrap();
                all.extend(opt.state());
                save(
                    &path,
                    &all,
                    Some(HashMap::from([("step".to_string(), s.to_string())])),
                )
                .unwrap();
                // A fresh process: new buffers, new optimizer, everything from the file.
                p = two_params();
                opt = Sgdw::paper(p.len(), 0.1).unwrap();
                let ck = load(&path).unwrap();
                for (name, t) in &ck.tensors {
                    if p.get(name).is_ok() {
                        p.set(name, t).unwrap();
                    }
                }
                opt.load_state(&ck.tensors).unwrap();
                assert_eq!(opt.steps_taken(), s as u64);
            }
            p.grads().write_f32().unwrap().copy_from_slice(g);
            opt.step(&p, lr(s)).unwrap();
        }
        p.values().to_vec_f32().unwrap()
    };
    let straight = run(None);
    let resumed = run(Some(4));
    assert_eq!(
        straight.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        resumed.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}
