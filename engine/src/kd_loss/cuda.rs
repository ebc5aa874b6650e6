//! The CUDA arm of the fused distillation loss (`crate::kd_loss`): the kernels of
//! `kd_loss.cu`, with the host-side scalars and row counts of `crate::kd_loss::host`, held
//! to the f64 reference on the kernel simulator. Its CPU twin is `crate::kd_loss::kd_loss_cpu`.

use recycle_kernels::kd_loss::TeacherLogits;
use recycle_kernels::launch as kl;
use recycle_kernels::launchers as k;

use crate::cuda::common::{empty, host_i32, on_gpu_i32, p, rows_cfg, run, view};
use crate::cuda::launch::{fit_u32, KernelCall};
use crate::cuda::{common_device, KdLossDevice};
use crate::kd_loss::{self as kdh, KdLoss, KdScalars};
use crate::{DType, Device, Error, Result, Tensor};

pub(super) fn storage_of(op: &'static str, dtype: DType) -> Result<kdh::Storage> {
    match dtype {
        DType::F32 => Ok(kdh::Storage::F32),
        DType::BF16 => Ok(kdh::Storage::Bf16),
        DType::I32 => Err(Error::DType {
            op,
            expected: DType::F32,
            got: DType::I32,
        }),
    }
}

/// The fused loss's device buffers: `teachers` empty (and `row_kd` 0) for the CE-only kernel;
/// `mask` 0 when every row counts; `grad` may be `logits` (in place); `out` the three totals.
#[derive(Default)]
struct Buffers<'a> {
    logits: u64,
    grad: u64,
    teachers: &'a [u64],
    labels: u64,
    mask: u64,
    row_ce: u64,
    row_kd: u64,
    out: u64,
}

/// The row kernel and the reduction of the fused loss over `[rows, classes]` logits.
fn kd_loss_plan(
    kernel: &'static str,
    b: &Buffers,
    (rows, classes): (usize, usize),
    ignore_index: i32,
    s: &KdScalars,
) -> Result<Vec<KernelCall>> {
    let tl = if b.teachers.is_empty() {
        TeacherLogits::default()
    } else {
        TeacherLogits::new(b.teachers).map_err(|e| Error::invalid("kd_loss", e.to_string()))?
    };
    let mut calls = Vec::new();
    if let Some(cfg) = rows_cfg(kernel, rows, classes)? {
        let args = k::KdRowArgs {
            logits: b.logits,
            grad: b.grad,
            teachers: tl,
            k: b.teachers.len() as u32,
            labels: p(b.labels),
            mask: p(b.mask),
            row_ce: p(b.row_ce),
            row_kd: p(b.row_kd),
            classes: fit_u32(kernel, "the number of classes", classes)?,
            ignore_index,
            inv_t: s.inv_t,
            t_sq: s.t_sq,
            ce_weight: s.grad_ce_weight,
            kd_scale: s.grad_kd_scale,
        };
        calls.push(
            k::kd_row_call(kernel, cfg, &args)
                .map_err(|e| Error::invalid("kd_loss", e.to_string()))?,
        );
    }
    calls.push(k::kd_loss_reduce(
        kl::single_block(),
        p(b.row_ce),
        p(b.row_kd),
        fit_u32("kd_loss_reduce", "the number of rows", rows)?,
        s.ce_weight,
        s.kd_weight,
        s.lambda,
        p(b.out),
    ));
    Ok(calls)
}

/// The labels and the row mask (as i32, non-zero = the row counts) on the host, where the row
/// counts are taken.
pub(super) fn host_labels_and_mask(
    op: &'static str,
    labels: &Tensor,
    mask: Option<&Tensor>,
    rows: usize,
) -> Result<(Vec<i32>, Option<Vec<i32>>)> {
    let labels_host = host_i32(labels)?;
    let mask_host = match mask {
        None => None,
        Some(m) => {
            if m.shape() != [rows] {
                return Err(Error::shape(
                    op,
                    format!("mask {:?} does not match {rows} rows", m.shape()),
                ));
            }
            Some(match m.dtype() {
                DType::I32 => host_i32(m)?,
                _ => m.to_vec_f32()?.iter().map(|&v| (v != 0.0) as i32).collect(),
            })
        }
    };
    Ok((labels_host, mask_host))
}

/// See [`crate::cuda::kd_loss`].
pub(crate) fn kd_loss(
    cfg: &KdLoss,
    student: &Tensor,
    teachers: &[Tensor],
    labels: &Tensor,
    mask: Option<&Tensor>,
    upstream: f32,
) -> Result<KdLossDevice> {
    const OP: &str = "kd_loss";
    student.expect_rank(OP, "student logits", 2)?;
    labels.expect_dtype(OP, DType::I32)?;
    let (rows, classes) = (student.shape()[0], student.shape()[1]);
    if labels.shape() != [rows] {
        return Err(Error::shape(
            OP,
            format!(
                "labels {:?} do not match student logits {:?}",
                labels.shape(),
                student.shape()
            ),
        ));
    }
    let mut on_gpu: Vec<&Tensor> = vec![student];
    on_gpu.extend(teachers.iter());
    common_device(OP, &on_gpu)?;
    for (j, t) in teachers.iter().enumerate() {
        if t.shape() != student.shape() {
            return Err(Error::shape(
                OP,
                format!(
                    "teacher {j} logits {:?} differ from student logits {:?}",
                    t.shape(),
                    student.shape()
                ),
            ));
        }
    }
    let (labels_host, mask_host) = host_labels_and_mask(OP, labels, mask, rows)?;
    let (lambda, ignore_index) = (cfg.weight, cfg.ignore_index);
    let ker_term = Some(cfg.kind).filter(|_| !(teachers.is_empty() || lambda == 0.0));
    let (ce_rows, kd_rows) = kdh::row_counts(
        &labels_host,
        mask_host.as_deref(),
        classes,
        ignore_index,
        ker_term.is_some(),
    )?;
    let s = KdScalars::new(ker_term, lambda, ce_rows, kd_rows, classes, upstream)?;
    let student_storage = storage_of(OP, student.dtype())?;
    let teacher_storage = match teachers.first() {
        Some(t) => {
            let st = storage_of(OP, t.dtype())?;
            if teachers.iter().any(|u| u.dtype() != t.dtype()) {
                return Err(Error::invalid(
                    OP,
                    "the teachers' logits differ in dtype".to_string(),
                ));
            }
            st
        }
        None => student_storage,
    };
    let active_term = if s.kd_active() { ker_term } else { None };
    let kernel = kdh::kernel_name(active_term, student_storage, teacher_storage)?;

    let sv = view(student, OP)?;
    let ctx = sv.ctx.clone();
    let labels_dev = on_gpu_i32(&ctx, labels, &labels_host)?;
    let mask_dev = match &mask_host {
        Some(m) => Some(Tensor::from_slice(m, &[rows], Device::Cuda(ctx.ordinal()))?),
        None => None,
    };
    let grad = empty(&ctx, student.dtype(), student.shape())?;
    let row_ce = empty(&ctx, DType::F32, &[rows])?;
    let row_kd = if active_term.is_some() {
        Some(empty(&ctx, DType::F32, &[rows])?)
    } else {
        None
    };
    let out = empty(&ctx, DType::F32, &[3])?;
    let teacher_ptrs: Vec<u64> = if active_term.is_some() {
        teachers
            .iter()
            .map(|t| view(t, OP).map(|v| v.ptr))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let ptr = |t: &Option<Tensor>| -> Result<u64> {
        t.as_ref()
            .map(|t| view(t, OP).map(|v| v.ptr))
            .unwrap_or(Ok(0))
    };
    let bufs = Buffers {
        logits: sv.ptr,
        grad: view(&grad, OP)?.ptr,
        teachers: &teacher_ptrs,
        labels: view(&labels_dev, OP)?.ptr,
        mask: ptr(&mask_dev)?,
        row_ce: view(&row_ce, OP)?.ptr,
        row_kd: ptr(&row_kd)?,
        out: view(&out, OP)?.ptr,
    };
    let plan = kd_loss_plan(kernel, &bufs, (rows, classes), ignore_index, &s)?;
    run(&ctx, &plan)?;
    let totals = out.to_vec::<f32>()?;
    Ok(KdLossDevice {
        ce: totals[0],
        kd: totals[1],
        total: totals[2],
        grad,
        ce_rows,
        kd_rows: if active_term.is_some() { kd_rows } else { 0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::common::check_all;
    use crate::kd_loss::KdKind;

    /// The fused distillation loss (`kd_loss_plan`, with the scalars and row counts the
    /// launcher computes) on the kernel simulator against an f64 reference from the kernel's
    /// definitions: KL and MSE with 1, 2 and 4 teachers (and CE only), f32/f32, f32 student
    /// with bf16 teachers and bf16/bf16, a row mask with rows off (whose labels are out of
    /// range: never read), rows with the ignore label, the gradient in a separate buffer and
    /// in place, and the reduction's [ce, kd, total].
    #[test]
    fn kd_loss_plans_on_the_simulator_match_the_reference() {
        use crate::cuda::sim_check::{as_stored, download, host_sim, run_plan, sample, upload};
        use recycle_kernels::sim::SimBuffer;
        let Some(sim) = host_sim() else { return };
        const IGNORE: i32 = -100;
        let lambda = 0.7f32;
        let dtypes = [
            (DType::F32, DType::F32),
            (DType::F32, DType::BF16),
            (DType::BF16, DType::BF16),
        ];
        for (vi, (rows, classes)) in [(8usize, 10usize), (6, 1000), (3, 30_522)]
            .into_iter()
            .enumerate()
        {
            let temperature = [1.0f32, 2.0, 4.0][vi];
            let upstream = if vi == 1 { 0.5f32 } else { 1.0 };
            let mut cases: Vec<(Option<KdKind>, DType, DType)> = Vec::new();
            for term in [KdKind::Kl { temperature }, KdKind::Mse] {
                for (sdt, tdt) in dtypes {
                    cases.push((Some(term), sdt, tdt));
                }
            }
            cases.push((None, DType::F32, DType::F32));
            cases.push((None, DType::BF16, DType::BF16));
            for (ci, (term, sdt, tdt)) in cases.into_iter().enumerate() {
                // Time (the simulator's 1024-thread blocks are slow, and every case runs the
                // 1024-thread reduction): every case at 10 classes, half of them at 1000, and
                // KL f32/f32, KL bf16/bf16 and MSE f32/bf16 at 30522.
                let run = match vi {
                    0 => true,
                    1 => ci % 2 == 1,
                    _ => matches!(ci, 0 | 2 | 4),
                };
                if !run {
                    continue;
                }
                // Each term sees 1, 2 and 4 teachers at 10 classes, and others in the other sizes.
                let k = if term.is_some() {
                    [1, 2, 4][(ci + vi) % 3]
                } else {
                    0
                };
                let use_mask = vi == 2 || (ci + vi) % 2 == 0;
                // The gradient in place for about half of the cases, in each vocabulary.
                let in_place = (ci / 2 + vi) % 2 == 1;
                let what = format!(
                    "kd_loss {rows}x{classes} {term:?} k = {k}, student {sdt:?}, teachers \
                     {tdt:?}, mask {use_mask}, in place {in_place}"
                );
                let mask: Option<Vec<i32>> =
                    use_mask.then(|| (0..rows).map(|r| (r % 4 != 2) as i32).collect());
                let labels: Vec<i32> = (0..rows)
                    .map(|r| match r {
                        _ if use_mask && r % 4 == 2 => classes as i32 + 5,
                        _ if r % 3 == 1 => IGNORE,
                        _ => ((r * 7919 + 3) % classes) as i32,
                    })
                    .collect();
                let (ce_rows, kd_rows) =
                    kdh::row_counts(&labels, mask.as_deref(), classes, IGNORE, term.is_some())
                        .unwrap();
                let sc = KdScalars::new(term, lambda, ce_rows, kd_rows, classes, upstream).unwrap();
                let active = if sc.kd_active() { term } else { None };
                assert_eq!(active.is_some(), term.is_some());
                let kernel = kdh::kernel_name(active, storage_of("t", sdt).unwrap(), {
                    storage_of("t", tdt).unwrap()
                })
                .unwrap();

                let n = rows * classes;
                let x = sample(n, 40 + vi as u64, 6.0);
                // Teachers near the student, so the KL term is of order one.
                let teachers: Vec<Vec<f32>> = (0..k)
                    .map(|q| {
                        let noise = sample(n, 50 + q as u64, 3.0);
                        x.iter().zip(noise).map(|(a, b)| a + b).collect()
                    })
                    .collect();
                let bteachers: Vec<SimBuffer> = teachers.iter().map(|t| upload(t, tdt)).collect();
                let tptrs: Vec<u64> = bteachers.iter().map(|b| b.ptr()).collect();
                let bl = SimBuffer::from_slice(&labels);
                let bmask = mask.as_ref().map(|m| SimBuffer::from_slice(m));

                let (grad, row_ce, row_kd, out) = {
                    let bx = upload(&x, sdt);
                    let bg = (!in_place).then(|| upload(&vec![f32::NAN; n], sdt));
                    let brow_ce = SimBuffer::from_slice(&vec![f32::NAN; rows]);
                    let brow_kd = active.map(|_| SimBuffer::from_slice(&vec![f32::NAN; rows]));
                    let bout = SimBuffer::from_slice(&[f32::NAN; 3]);
                    let bufs = Buffers {
                        logits: bx.ptr(),
                        grad: bg.as_ref().map_or(bx.ptr(), |b| b.ptr()),
                        teachers: &tptrs,
                        labels: bl.ptr(),
                        mask: bmask.as_ref().map_or(0, |b| b.ptr()),
                        row_ce: brow_ce.ptr(),
                        row_kd: brow_kd.as_ref().map_or(0, |b| b.ptr()),
                        out: bout.ptr(),
                    };
                    let plan = kd_loss_plan(kernel, &bufs, (rows, classes), IGNORE, &sc).unwrap();
                    run_plan(sim, &plan);
                    (
                        download(bg.as_ref().unwrap_or(&bx), sdt),
                        download(&brow_ce, DType::F32),
                        brow_kd.map(|b| download(&b, DType::F32)),
                        download(&bout, DType::F32),
                    )
                };

                // The reference, from the values as stored; the teachers' mean as the kernel
                // and the CPU loss form it (summed in order, divided by k, in f32).
                let xs = as_stored(&x, sdt);
                let ts: Vec<Vec<f32>> = teachers.iter().map(|t| as_stored(t, tdt)).collect();
                let lambda_kd_weight = (lambda * sc.kd_weight * upstream) as f64;
                let (mut sum_ce, mut sum_kd) = (0.0f64, 0.0f64);
                let close = |a: f64, b: f64, rel: f64| (a - b).abs() <= rel * b.abs().max(1.0);
                for r in 0..rows {
                    let span = r * classes..(r + 1) * classes;
                    let g = &grad[span.clone()];
                    if mask.as_ref().is_some_and(|m| m[r] == 0) {
                        assert!(
                            g.iter().all(|&v| v == 0.0),
                            "{what}: masked row {r} gradient"
                        );
                        assert_eq!(row_ce[r], 0.0, "{what}: masked row {r} CE");
                        if let Some(kd) = &row_kd {
                            assert_eq!(kd[r], 0.0, "{what}: masked row {r} KD");
                        }
                        continue;
                    }
                    let t: Vec<f32> = (0..classes)
                        .map(|j| {
                            if k == 0 {
                                0.0
                            } else {
                                ts.iter().map(|tq| tq[r * classes + j]).sum::<f32>() / k as f32
                            }
                        })
                        .collect();
                    let label = (labels[r] != IGNORE).then_some(labels[r] as usize);
                    let (ce, kd, gref) = kdh::reference_row(
                        active,
                        &xs[span],
                        &t,
                        label,
                        sc.grad_ce_weight as f64,
                        lambda_kd_weight,
                    );
                    sum_ce += ce;
                    sum_kd += kd;
                    // Row values: f32 sums over the row and the device's (here the host's)
                    // expf/logf, against exact f64: a few ulp of values of order ln C + max |s|
                    // (CE), and the accumulated rounding of C terms of the KL sum.
                    let got_ce = row_ce[r] as f64;
                    assert!(
                        close(got_ce, ce, 1e-5),
                        "{what}: row {r} CE {got_ce} vs {ce}"
                    );
                    if let Some(kd_rows) = &row_kd {
                        let got_kd = kd_rows[r] as f64;
                        assert!(
                            close(got_kd, kd, 2e-5),
                            "{what}: row {r} KD {got_kd} vs {kd}"
                        );
                    }
                    // Gradient: f32 entries within 2e-5 of the row's largest gradient (the
                    // softmax terms carry the lse's few ulp); bf16 entries are the f32 value
                    // rounded once: within one ulp (2^-7 relative) plus that slack.
                    let gmax = gref.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                    let rel = if sdt == DType::BF16 { 1.0 / 128.0 } else { 0.0 };
                    for (j, (&got, &want)) in g.iter().zip(&gref).enumerate() {
                        let err = (got as f64 - want).abs();
                        assert!(
                            err <= 2e-5 * gmax + rel * want.abs(),
                            "{what}: row {r} class {j}: gradient {got} vs {want} (largest {gmax})"
                        );
                    }
                }
                // The reduction: [ce, kd, total] from the row values, f64 sums.
                let ce = sum_ce * sc.ce_weight as f64;
                let kd = sum_kd * sc.kd_weight as f64;
                let want = [ce, kd, ce + lambda as f64 * kd];
                for (i, name) in ["ce", "kd", "total"].iter().enumerate() {
                    assert!(
                        close(out[i] as f64, want[i], 2e-5),
                        "{what}: {name} {} vs {}",
                        out[i],
                        want[i]
                    );
                }
            }
        }
    }

    #[test]
    fn kd_loss_plans_for_every_kernel() {
        let s = KdScalars::new(Some(KdKind::Kl { temperature: 2.0 }), 0.5, 3, 4, 10, 1.0).unwrap();
        for (term, st, tt) in [
            (
                Some(KdKind::Kl { temperature: 2.0 }),
                kdh::Storage::Bf16,
                kdh::Storage::Bf16,
            ),
            (
                Some(KdKind::Kl { temperature: 2.0 }),
                kdh::Storage::F32,
                kdh::Storage::F32,
            ),
            (Some(KdKind::Mse), kdh::Storage::F32, kdh::Storage::Bf16),
            (None, kdh::Storage::F32, kdh::Storage::F32),
        ] {
            let k = kdh::kernel_name(term, st, tt).unwrap();
            let teachers: &[u64] = if term.is_some() { &[10, 11] } else { &[] };
            let b = Buffers {
                teachers,
                ..Default::default()
            };
            let plan = kd_loss_plan(k, &b, (8, 30_522), -100, &s).unwrap();
            assert_eq!(plan.len(), 2);
            check_all(&plan);
        }
        // Nine teachers: more than the kernel averages.
        let k = "kd_loss_kl_f32_f32";
        let nine = Buffers {
            teachers: &[1; 9],
            ..Default::default()
        };
        assert!(kd_loss_plan(k, &nine, (8, 10), -100, &s).is_err());
        // No rows: only the reduction runs (it writes zeros).
        let one = Buffers {
            teachers: &[1],
            ..Default::default()
        };
        let plan = kd_loss_plan(k, &one, (0, 10), -100, &s).unwrap();
        assert_eq!(plan.len(), 1);
        check_all(&plan);
    }
}
