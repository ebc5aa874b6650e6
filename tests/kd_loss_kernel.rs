//! The fused loss kernel (`kernels/src/kd_loss.cu`) against its CPU twin `kd_loss_cpu`, run on
//! the kernel simulator (`recycle_kernels::sim`: the kernel's CUDA source on CPU threads, with
//! its real block reductions and warp shuffles) at the vocabulary sizes the models use — 10, 1000
//! and BERT's 30522 — for KL and MSE, one to four teachers averaged in the kernel, f32 and bf16
//! logits, a row mask, ignored labels, and the gradient written in place or beside the logits.
//!
//! The loss on cached top-k targets (`kd_loss_cached_*`) is held to its CPU twin
//! `kd_loss_buckets_cpu` the same way, at several k below C.
//!
//! The kernel's scalars come from `recycle_kernels::kd_loss` (row counts, normalisers), as in the
//! engine's launcher. What the simulator cannot show is the GPU's own `expf`/`logf`; gpu-check
//! compares the same loss on a real GPU.

use half::bf16;
use recycle::distill::{kd_loss_cpu, KdLoss};
use recycle_engine::kd_loss::{self as kd, KdKind, KdScalars, Storage};
use recycle_engine::kd_loss::{kd_loss_buckets_cpu, CachedTargets};
use recycle_kernels::call::{KernelCall, Ptr};
use recycle_kernels::kd_loss::{cached_kernel_name, TeacherLogits};
use recycle_kernels::launch;
use recycle_kernels::launchers;
use recycle_kernels::sim::{HostSim, SimBuffer};

fn launch_on_sim(sim: &HostSim, call: &KernelCall) {
    // SAFETY: the calls come from the kernels' typed launchers, and every pointer is a live
    // SimBuffer sized for rows x classes.
    unsafe { sim.run(call) }.unwrap_or_else(|e| panic!("{e}"));
}

fn stored(values: &[f32], s: Storage) -> (SimBuffer, Vec<f32>) {
    match s {
        Storage::F32 => (SimBuffer::from_slice(values), values.to_vec()),
        Storage::Bf16 => {
            let b: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
            let bits: Vec<u16> = b.iter().map(|v| v.to_bits()).collect();
            (
                SimBuffer::from_slice(&bits),
                b.iter().map(|v| v.to_f32()).collect(),
            )
        }
    }
}

fn read(buf: &SimBuffer, s: Storage) -> Vec<f32> {
    match s {
        Storage::F32 => buf.read::<f32>().unwrap(),
        Storage::Bf16 => buf
            .read::<u16>()
            .unwrap()
            .into_iter()
            .map(|b| bf16::from_bits(b).to_f32())
            .collect(),
    }
}

/// Deterministic logits: a shared signal (so teachers and student agree somewhat) plus noise.
fn logits(rows: usize, classes: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = recycle::engine::rng::Rng::new(seed);
    (0..rows * classes)
        .map(|i| {
            let signal = ((i % classes) as f32 * 0.37).sin() * 2.0;
            signal + (rng.uniform() * 2.0 - 1.0) * scale
        })
        .collect()
}

struct Case {
    term: Option<KdKind>,
    teachers: usize,
    student: Storage,
    teacher: Storage,
    rows: usize,
    classes: usize,
    in_place: bool,
}

fn check(sim: &HostSim, c: &Case) {
    let what = format!(
        "{:?} k={} {:?}/{:?} {}x{}{}",
        c.term,
        c.teachers,
        c.student,
        c.teacher,
        c.rows,
        c.classes,
        if c.in_place { " in place" } else { "" }
    );
    let (rows, classes) = (c.rows, c.classes);
    let lambda = 0.7f32;
    let cfg = match c.term {
        Some(KdKind::Kl { temperature }) => KdLoss::kl(temperature, lambda),
        Some(KdKind::Mse) => KdLoss::mse(lambda),
        None => KdLoss::kl(2.0, lambda),
    };
    // Row 1 has no label (CE ignores it, KD counts it); the last row is masked off.
    let labels: Vec<i32> = (0..rows)
        .map(|r| {
            if r == 1 {
                cfg.ignore_index
            } else {
                ((r * 7919) % classes) as i32
            }
        })
        .collect();
    let mask: Vec<i32> = (0..rows).map(|r| i32::from(r + 1 != rows)).collect();
    let mask_bool: Vec<bool> = mask.iter().map(|&m| m != 0).collect();

    let (student_buf, student) = stored(&logits(rows, classes, 1, 3.0), c.student);
    let teacher_bufs: Vec<(SimBuffer, Vec<f32>)> = (0..c.teachers)
        .map(|j| stored(&logits(rows, classes, 10 + j as u64, 2.0), c.teacher))
        .collect();

    // The CPU twin, on the values the kernel reads (bf16 inputs rounded).
    let teacher_slices: Vec<&[f32]> = teacher_bufs.iter().map(|(_, v)| v.as_slice()).collect();
    let want = kd_loss_cpu(
        &cfg,
        &student,
        if c.term.is_some() {
            &teacher_slices
        } else {
            &[]
        },
        &labels,
        Some(&mask_bool),
        classes,
    )
    .unwrap();

    // The kernel, with the launcher's host-side arguments.
    let (ce_rows, kd_rows) = kd::row_counts(
        &labels,
        Some(&mask),
        classes,
        cfg.ignore_index,
        c.term.is_some(),
    )
    .unwrap();
    let sc = KdScalars::new(c.term, lambda, ce_rows, kd_rows, classes, 1.0).unwrap();
    assert_eq!((ce_rows, sc.kd_active()), (want.ce_rows, want.kd_rows > 0));
    let kernel = kd::kernel_name(c.term, c.student, c.teacher).unwrap();
    let separate_grad = SimBuffer::zeroed(student_buf.len());
    let grad_buf = if c.in_place {
        &student_buf
    } else {
        &separate_grad
    };
    let (labels_buf, mask_buf) = (SimBuffer::from_slice(&labels), SimBuffer::from_slice(&mask));
    let (row_ce, row_kd, out) = (
        SimBuffer::zeros::<f32>(rows),
        SimBuffer::zeros::<f32>(rows),
        SimBuffer::zeros::<f32>(3),
    );
    let (teachers, k) = if c.term.is_some() {
        let ptrs: Vec<u64> = teacher_bufs.iter().map(|(b, _)| b.ptr()).collect();
        (TeacherLogits::new(&ptrs).unwrap(), c.teachers as u32)
    } else {
        (TeacherLogits::default(), 0)
    };
    let row_kd_ptr = if c.term.is_some() { row_kd.ptr() } else { 0 };
    let row_cfg = launch::rows(kernel, rows as u64, classes as u64)
        .unwrap()
        .unwrap();
    let args = launchers::KdRowArgs {
        logits: student_buf.ptr(),
        grad: grad_buf.ptr(),
        teachers,
        k,
        labels: Ptr::new(labels_buf.ptr()),
        mask: Ptr::new(mask_buf.ptr()),
        row_ce: Ptr::new(row_ce.ptr()),
        row_kd: Ptr::new(row_kd_ptr),
        classes: classes as u32,
        ignore_index: cfg.ignore_index,
        inv_t: sc.inv_t,
        t_sq: sc.t_sq,
        ce_weight: sc.grad_ce_weight,
        kd_scale: sc.grad_kd_scale,
    };
    launch_on_sim(
        sim,
        &launchers::kd_row_call(kernel, row_cfg, &args).unwrap(),
    );
    launch_on_sim(
        sim,
        &launchers::kd_loss_reduce(
            launch::single_block(),
            Ptr::new(row_ce.ptr()),
            Ptr::new(row_kd_ptr),
            rows as u32,
            sc.ce_weight,
            sc.kd_weight,
            sc.lambda,
            Ptr::new(out.ptr()),
        ),
    );

    // Losses: per-row values agree to a few ulp (libm's expf against the kernel's order of
    // sums over the row), summed over rows in f64 on both sides.
    let got = out.read::<f32>().unwrap();
    for (name, g, w) in [
        ("ce", got[0], want.ce),
        ("kd", got[1], want.kd),
        ("total", got[2], want.total),
    ] {
        let tol = 1e-5 * w.abs().max(1e-3);
        assert!(
            (g - w).abs() <= tol,
            "{what}: {name} {g}, the CPU gives {w}"
        );
    }
    // Gradient: f32 to 1e-5 of the row's largest magnitude (exp(x - lse) differs in the last
    // bits); bf16 students get their gradient rounded to bf16 (8 bits): half an ulp more.
    let grad = read(grad_buf, c.student);
    let scale = want.grad.iter().fold(0f32, |m, &v| m.max(v.abs()));
    for (i, (&g, &w)) in grad.iter().zip(&want.grad).enumerate() {
        let tol = match c.student {
            Storage::F32 => 1e-5 * scale,
            Storage::Bf16 => w.abs() / 256.0 + 1e-5 * scale,
        };
        assert!(
            (g - w).abs() <= tol,
            "{what}: gradient element {i} (row {}, class {}) is {g}, the CPU gives {w}",
            i / classes,
            i % classes
        );
    }
    for b in [&row_ce, &row_kd, &labels_buf, &mask_buf] {
        b.check_guards().unwrap();
    }
    for (b, _) in &teacher_bufs {
        b.check_guards().unwrap();
    }
}

fn sim() -> Option<&'static HostSim> {
    HostSim::for_tests()
}

/// KL and MSE, one to eight teachers (3 takes the kernel's division path, powers of two its
/// multiplication by 1/k), the three type pairs, in place and not, at vocabulary 10 and 1000
/// (one block of 32 and of 128 threads per row).
#[test]
fn the_kernel_matches_kd_loss_cpu_at_small_and_medium_vocabularies() {
    let Some(sim) = sim() else { return };
    let kl = KdKind::Kl { temperature: 2.0 };
    for (rows, classes, ensembles) in [(13, 10, &[1, 2, 3, 4, 8][..]), (5, 1000, &[1, 2, 4][..])] {
        for term in [Some(kl), Some(KdKind::Mse), None] {
            for &teachers in ensembles {
                if term.is_none() && teachers > 1 {
                    continue;
                }
                for (student, teacher) in [
                    (Storage::F32, Storage::F32),
                    (Storage::F32, Storage::Bf16),
                    (Storage::Bf16, Storage::Bf16),
                ] {
                    check(
                        sim,
                        &Case {
                            term,
                            teachers,
                            student,
                            teacher,
                            rows,
                            classes,
                            in_place: teachers == 2,
                        },
                    );
                }
            }
        }
    }
}

/// BERT's vocabulary: 1024 threads stride over 30522 classes per row.
#[test]
fn the_kernel_matches_kd_loss_cpu_at_bert_vocabulary() {
    let Some(sim) = sim() else { return };
    for (term, teachers, student, teacher, in_place) in [
        (
            Some(KdKind::Kl { temperature: 4.0 }),
            1,
            Storage::Bf16,
            Storage::Bf16,
            true,
        ),
        (
            Some(KdKind::Kl { temperature: 1.0 }),
            4,
            Storage::F32,
            Storage::Bf16,
            false,
        ),
        (Some(KdKind::Mse), 2, Storage::F32, Storage::F32, true),
        (None, 0, Storage::Bf16, Storage::Bf16, false),
    ] {
        check(
            sim,
            &Case {
                term,
                teachers,
                student,
                teacher,
                rows: 3,
                classes: 30_522,
                in_place,
            },
        );
    }
}

struct CachedCase {
    mse: bool,
    temperature: f32,
    student: Storage,
    rows: usize,
    classes: usize,
    k: usize,
    in_place: bool,
}

/// The cached-target kernel and `kd_loss_reduce` against `kd_loss_buckets_cpu` on the same
/// student values (bf16 rounded where the student is bf16) and cached rows.
fn check_cached(sim: &HostSim, c: &CachedCase) {
    let (rows, classes, k) = (c.rows, c.classes, c.k);
    let what = format!(
        "cached {} T={} k={k} {:?} {rows}x{classes}{}",
        if c.mse { "MSE" } else { "KL" },
        c.temperature,
        c.student,
        if c.in_place { " in place" } else { "" }
    );
    let lambda = 0.7f32;
    let cfg = if c.mse {
        KdLoss::mse(lambda)
    } else {
        KdLoss::kl(c.temperature, lambda)
    };
    // Row 1 has no label; the last row is masked off; the others' labels fall inside and
    // outside the teacher's top k (row 0's label is its top class).
    let mut teacher = logits(rows, classes, 20, 2.0);
    for r in 0..rows {
        teacher[r * classes + (r * 13) % classes] += 6.0;
    }
    let targets = CachedTargets::from_logits(&teacher, classes, k, c.temperature).unwrap();
    let labels: Vec<i32> = (0..rows)
        .map(|r| match r {
            0 => targets.indices[0] as i32,
            1 => cfg.ignore_index,
            _ => ((r * 7919) % classes) as i32,
        })
        .collect();
    let mask: Vec<i32> = (0..rows).map(|r| i32::from(r + 1 != rows)).collect();
    let mask_bool: Vec<bool> = mask.iter().map(|&m| m != 0).collect();
    let (student_buf, student) = stored(&logits(rows, classes, 2, 3.0), c.student);
    let want =
        kd_loss_buckets_cpu(&cfg, &student, &targets, &labels, Some(&mask_bool), classes).unwrap();

    let (ce_rows, kd_rows) =
        kd::row_counts(&labels, Some(&mask), classes, cfg.ignore_index, true).unwrap();
    // MSE averages over the k cached classes (the CUDA arm's scalars).
    let per_row = if c.mse { k } else { classes };
    let sc = KdScalars::new(Some(cfg.kind), lambda, ce_rows, kd_rows, per_row, 1.0).unwrap();
    assert_eq!((ce_rows, kd_rows), (want.ce_rows, want.kd_rows), "{what}");
    let kernel = cached_kernel_name(c.mse, c.student == Storage::Bf16);
    let separate_grad = SimBuffer::zeroed(student_buf.len());
    let grad_buf = if c.in_place {
        &student_buf
    } else {
        &separate_grad
    };
    let (labels_buf, mask_buf) = (SimBuffer::from_slice(&labels), SimBuffer::from_slice(&mask));
    let (indices_buf, values_buf, tail_buf) = (
        SimBuffer::from_slice(&targets.indices),
        SimBuffer::from_slice(&targets.values),
        SimBuffer::from_slice(&targets.tail_lse),
    );
    let (row_ce, row_kd, out) = (
        SimBuffer::zeros::<f32>(rows),
        SimBuffer::zeros::<f32>(rows),
        SimBuffer::zeros::<f32>(3),
    );
    let row_cfg = launch::rows(kernel, rows as u64, classes as u64)
        .unwrap()
        .unwrap();
    let args = launchers::KdCachedRowArgs {
        logits: student_buf.ptr(),
        grad: grad_buf.ptr(),
        indices: Ptr::new(indices_buf.ptr()),
        values: Ptr::new(values_buf.ptr()),
        tail_lse: Ptr::new(tail_buf.ptr()),
        k: k as u32,
        labels: Ptr::new(labels_buf.ptr()),
        mask: Ptr::new(mask_buf.ptr()),
        row_ce: Ptr::new(row_ce.ptr()),
        row_kd: Ptr::new(row_kd.ptr()),
        classes: classes as u32,
        ignore_index: cfg.ignore_index,
        inv_t: sc.inv_t,
        t_sq: sc.t_sq,
        ce_weight: sc.grad_ce_weight,
        kd_scale: sc.grad_kd_scale,
    };
    launch_on_sim(
        sim,
        &launchers::kd_cached_row_call(kernel, row_cfg, &args).unwrap(),
    );
    launch_on_sim(
        sim,
        &launchers::kd_loss_reduce(
            launch::single_block(),
            Ptr::new(row_ce.ptr()),
            Ptr::new(row_kd.ptr()),
            rows as u32,
            sc.ce_weight,
            sc.kd_weight,
            sc.lambda,
            Ptr::new(out.ptr()),
        ),
    );
    // The kernel works in f32 where the CPU twin sums the k + 1 buckets in f64: each row's KL
    // carries the f32 rounding of the student's log-normaliser (a few ulp of ln C + max s/T,
    // about 1e-6 at 30522 classes) times T², which dominates a small KL; the gradient is held
    // as the online kernel's.
    let got = out.read::<f32>().unwrap();
    let t_sq = if c.mse { 0.0 } else { sc.t_sq };
    for (name, g, w, floor) in [
        ("ce", got[0], want.ce, 0.0),
        ("kd", got[1], want.kd, t_sq * 2e-6),
        ("total", got[2], want.total, lambda * t_sq * 2e-6),
    ] {
        let tol = 2e-5 * w.abs().max(1e-3) + floor;
        assert!(
            (g - w).abs() <= tol,
            "{what}: {name} {g}, the CPU gives {w}"
        );
    }
    let grad = read(grad_buf, c.student);
    let scale = want.grad.iter().fold(0f32, |m, &v| m.max(v.abs()));
    for (i, (&g, &w)) in grad.iter().zip(&want.grad).enumerate() {
        let tol = match c.student {
            Storage::F32 => 1e-5 * scale,
            Storage::Bf16 => w.abs() / 256.0 + 1e-5 * scale,
        };
        assert!(
            (g - w).abs() <= tol,
            "{what}: gradient element {i} (row {}, class {}) is {g}, the CPU gives {w}",
            i / classes,
            i % classes
        );
    }
    for b in [
        &row_ce,
        &row_kd,
        &labels_buf,
        &mask_buf,
        &indices_buf,
        &values_buf,
        &tail_buf,
        &separate_grad,
    ] {
        b.check_guards().unwrap();
    }
}

/// The cached-target kernels: KL at T = 1 and 4 and MSE, f32 and bf16 students, in place and
/// not, k from 1 to C - 1 at vocabulary 10, and k = 5 and 32 at vocabulary 1000.
#[test]
fn the_cached_kernel_matches_kd_loss_buckets_cpu() {
    let Some(sim) = sim() else { return };
    for (rows, classes, ks) in [(9, 10, &[1, 3, 9][..]), (5, 1000, &[5, 32][..])] {
        for &k in ks {
            for (mse, temperature) in [(false, 1.0), (false, 4.0), (true, 1.0)] {
                for student in [Storage::F32, Storage::Bf16] {
                    check_cached(
                        sim,
                        &CachedCase {
                            mse,
                            temperature,
                            student,
                            rows,
                            classes,
                            k,
                            in_place: (k + usize::from(mse)) % 2 == 1,
                        },
                    );
                }
            }
        }
    }
}

/// BERT's vocabulary: the bitmap of 954 words, 1024 threads over 30522 classes per row.
#[test]
fn the_cached_kernel_matches_kd_loss_buckets_cpu_at_bert_vocabulary() {
    let Some(sim) = sim() else { return };
    for (mse, student, k, in_place) in [
        (false, Storage::Bf16, 10, true),
        (false, Storage::F32, 128, false),
        (true, Storage::F32, 10, false),
    ] {
        check_cached(
            sim,
            &CachedCase {
                mse,
                temperature: 2.0,
                student,
                rows: 3,
                classes: 30_522,
                k,
                in_place,
            },
        );
    }
}
