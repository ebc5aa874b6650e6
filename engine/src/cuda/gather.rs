//! The CUDA arm of the row gathers' backend-level functions (`crate::backend::gather`, behind
//! `embedding` and `gather_rows`): kernels `embedding.cu`. No tape here.
//!
//! Both are row gathers: `out[p] = table[ids[p]]`, one block per position. The ids are checked
//! on the host first (by the ops, with their errors for an id out of range), so they are copied
//! back when they live on the GPU, and uploaded when they live on the host.
//!
//! The backward is deterministic without a sort library and without floating-point atomics:
//! a stable counting sort of positions by id in four integer launches (count per segment of
//! 1024 positions, prefix per id over segments, prefix over ids, place), after which one block
//! per table row adds the gradient rows of its positions in increasing position order — the
//! order the CPU's `scatter_add_rows_cpu` adds them in, so the sums are the CPU's bits for f32.
//! Only the counts use integer atomics, whose result does not depend on their order.

use recycle_kernels::launch::{self as kl, EmbeddingBackward};
use recycle_kernels::launchers as k;

use super::common::{empty, on_gpu_i32, p, run, view, with_float};
use super::launch::{fit_u32, shape_err, KernelCall};
use super::DeviceBuffer;
use crate::backend::gather::GatherIds;
use crate::{DType, Result, Tensor};

pub(crate) fn gather_fwd_plan(
    table: u64,
    ids: u64,
    out: u64,
    n_ids: usize,
    dim: usize,
    vocab: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let name = "embedding_fwd";
    let cfg = kl::embedding_forward(n_ids as u64, dim as u64).map_err(shape_err)?;
    let (dim, vocab) = (
        fit_u32(name, "the row length", dim)?,
        fit_u32(name, "the number of rows", vocab)?,
    );
    with_float!("embedding", dtype, |T| Ok(cfg
        .map(|cfg| k::embedding_fwd::<T>(cfg, p(table), p(ids), p(out), dim, vocab))
        .into_iter()
        .collect()))
}

/// The backward's device buffers: the ids (i32), the upstream gradient `g`, `dweight` (f32
/// `[vocab, dim]`, overwritten) and the counting sort's u32 scratch (`counts` zeroed).
pub(crate) struct BwdBuffers {
    pub ids: u64,
    pub g: u64,
    pub dweight: u64,
    pub counts: u64,
    pub totals: u64,
    pub starts: u64,
    pub order: u64,
}

/// The five launches.
pub(crate) fn gather_bwd_plan(
    cfg: &EmbeddingBackward,
    s: &BwdBuffers,
    n_ids: usize,
    dim: usize,
    vocab: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let n = fit_u32("embedding_bwd_count", "the number of ids", n_ids)?;
    let v = fit_u32("embedding_bwd_count", "the vocabulary size", vocab)?;
    let dim = fit_u32("embedding_bwd_accumulate", "the row length", dim)?;
    let segs = cfg.segments;
    let (counts, totals, starts, order) = (p(s.counts), p(s.totals), p(s.starts), p(s.order));
    let mut calls = Vec::new();
    if n_ids > 0 {
        calls.push(k::embedding_bwd_count(
            cfg.count,
            p(s.ids),
            n,
            v,
            segs,
            counts,
        ));
    }
    calls.push(k::embedding_bwd_offsets(
        cfg.offsets,
        counts,
        totals,
        v,
        segs,
    ));
    calls.push(k::embedding_bwd_scan(cfg.scan, totals, starts, v));
    if n_ids > 0 {
        calls.push(k::embedding_bwd_place(
            cfg.place,
            p(s.ids),
            counts,
            starts,
            order,
            n,
            v,
            segs,
        ));
    }
    calls.push(with_float!("embedding", dtype, |T| Ok(
        k::embedding_bwd_accumulate::<T>(cfg.accumulate, p(s.g), order, starts, p(s.dweight), dim)
    ))?);
    Ok(calls)
}

/// The CUDA arm of [`crate::backend::gather::gather_fwd`]: `table [vocab, ...]` gathered at
/// `ids` (whose values the caller has read into `ids_host` and validated), into `out_shape`,
/// in the table's dtype.
pub(crate) fn gather_fwd(
    op: &'static str,
    table: &Tensor,
    ids: &Tensor,
    ids_host: Vec<i32>,
    out_shape: &[usize],
) -> Result<(Tensor, GatherIds)> {
    let dtype = table.dtype();
    let vocab = table.shape()[0];
    let dim: usize = table.shape()[1..].iter().product();
    let ctx = view(table, op)?.ctx;
    // Ids on the host (or another GPU) are uploaded from their host copy.
    let ids_dev = on_gpu_i32(&ctx, ids, &ids_host)?;
    let n_ids = ids_host.len();
    let out = empty(&ctx, dtype, out_shape)?;
    let v = |t: &Tensor| view(t, op).map(|v| v.ptr);
    run(
        &ctx,
        &gather_fwd_plan(v(table)?, v(&ids_dev)?, v(&out)?, n_ids, dim, vocab, dtype)?,
    )?;
    let ids = GatherIds {
        host: ids_host,
        on_device: ids_dev,
    };
    Ok((out, ids))
}

/// The CUDA arm of [`crate::backend::gather::gather_bwd`]: `dy` read in `dtype` (the table's),
/// the gradient f32 of `table_shape`.
pub(crate) fn gather_bwd(
    op: &'static str,
    dy: &Tensor,
    ids: &GatherIds,
    table_shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    let vocab = table_shape[0];
    let dim: usize = table_shape[1..].iter().product();
    let n_ids = ids.host.len();
    let g = super::common::as_dtype(dy, dtype)?;
    let Some(cfg) =
        kl::embedding_backward(n_ids as u64, vocab as u64, dim as u64).map_err(shape_err)?
    else {
        return Tensor::zeros(table_shape, DType::F32, g.device());
    };
    let ctx = view(&g, op)?.ctx;
    let v = |t: &Tensor| view(t, op).map(|v| v.ptr);
    let u32s = |len: u64| DeviceBuffer::alloc(&ctx, len as usize * 4);
    let counts = DeviceBuffer::zeroed(&ctx, cfg.counts_len as usize * 4)?;
    let (totals, starts, order) = (
        u32s(cfg.totals_len)?,
        u32s(cfg.starts_len)?,
        u32s(cfg.order_len)?,
    );
    let dw = empty(&ctx, DType::F32, table_shape)?;
    let s = BwdBuffers {
        ids: v(&ids.on_device)?,
        g: v(&g)?,
        dweight: v(&dw)?,
        counts: counts.ptr(),
        totals: totals.ptr(),
        starts: starts.ptr(),
        order: order.ptr(),
    };
    run(&ctx, &gather_bwd_plan(&cfg, &s, n_ids, dim, vocab, dtype)?)?;
    Ok(dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No ids: the table's gradient is zero; only the integer prefix and the accumulation
    /// (which writes the zero rows) run. No ids forward: nothing.
    #[test]
    fn no_ids_launch_only_what_zeroes_the_gradient() {
        let s = BwdBuffers {
            ids: 1,
            g: 2,
            dweight: 3,
            counts: 10,
            totals: 11,
            starts: 12,
            order: 13,
        };
        for dt in [DType::F32, DType::BF16] {
            let cfg = kl::embedding_backward(0, 10, 4).unwrap().unwrap();
            let plan = gather_bwd_plan(&cfg, &s, 0, 4, 10, dt).unwrap();
            assert_eq!(plan.len(), 3);
        }
        assert!(gather_fwd_plan(1, 2, 3, 0, 8, 10, DType::F32)
            .unwrap()
            .is_empty());
    }

    /// The embedding plans on the kernel simulator against the CPU twins
    /// (`embedding_forward_cpu`, `embedding_backward_cpu`): the forward is a copy, and the
    /// backward's counting sort adds each row's gradients in the CPU's order, so both are the
    /// CPU's bits (embedding.cu). 2500 ids over a vocabulary of 53 (three segments of 1024
    /// positions, every used row hit about 50 times from every segment, two rows never hit),
    /// f32 and bf16 gradients; the accumulate overwriting every row.
    #[test]
    fn plans_on_the_simulator_match_the_cpu_twins() {
        use crate::backend::gather as cpu;
        use crate::cuda::sim_check::{
            as_stored, assert_bits, download, host_sim, run_plan, sample, upload,
        };
        use recycle_kernels::sim::SimBuffer;
        let Some(sim) = host_sim() else { return };
        let (n_ids, vocab, dim) = (2500usize, 53usize, 20usize);
        // Deterministic ids in [0, vocab), skipping rows 7 and 52.
        let ids: Vec<i32> = (0..n_ids)
            .map(|p| {
                let v = ((p * 7919 + p / 3) % (vocab - 2)) as i32;
                if v >= 7 {
                    v + 1
                } else {
                    v
                }
            })
            .collect();
        assert!(!ids.contains(&7) && !ids.contains(&52));
        let cfg = kl::embedding_backward(n_ids as u64, vocab as u64, dim as u64)
            .unwrap()
            .unwrap();
        assert_eq!(cfg.segments, 3);
        let bids = SimBuffer::from_slice(&ids);
        for dt in [DType::F32, DType::BF16] {
            let what = format!("embedding {n_ids} ids, {vocab}x{dim} {dt:?}");
            let table = as_stored(&sample(vocab * dim, 51, 1.0), dt);
            let (bt, bout) = (upload(&table, dt), upload(&vec![0.0; n_ids * dim], dt));
            run_plan(
                sim,
                &gather_fwd_plan(bt.ptr(), bids.ptr(), bout.ptr(), n_ids, dim, vocab, dt).unwrap(),
            );
            let want = cpu::embedding_forward_cpu(&table, dim, &ids);
            assert_bits(&format!("{what} forward"), &download(&bout, dt), &want);

            let g = as_stored(&sample(n_ids * dim, 52, 1.0), dt);
            let bg = upload(&g, dt);
            let s = (
                SimBuffer::zeros::<u32>(cfg.counts_len as usize),
                SimBuffer::zeros::<u32>(cfg.totals_len as usize),
                SimBuffer::zeros::<u32>(cfg.starts_len as usize),
                SimBuffer::zeros::<u32>(cfg.order_len as usize),
            );
            // NaN where the kernel must write: every row, the untouched ones included.
            let bdw = SimBuffer::from_slice(&vec![f32::NAN; vocab * dim]);
            let bufs = BwdBuffers {
                ids: bids.ptr(),
                g: bg.ptr(),
                dweight: bdw.ptr(),
                counts: s.0.ptr(),
                totals: s.1.ptr(),
                starts: s.2.ptr(),
                order: s.3.ptr(),
            };
            let plan = gather_bwd_plan(&cfg, &bufs, n_ids, dim, vocab, dt).unwrap();
            assert_eq!(plan.len(), 5);
            run_plan(sim, &plan);
            let want_dw = cpu::embedding_backward_cpu(&g, dim, &ids, vocab);
            let dw = download(&bdw, DType::F32);
            assert_bits(&format!("{what} backward"), &dw, &want_dw);
            // The counting sort itself: starts are the prefix of the counts, order is the
            // positions sorted stably by id.
            let starts = s.2.read::<u32>().unwrap();
            let order = s.3.read::<u32>().unwrap();
            let mut want_order: Vec<u32> = (0..n_ids as u32).collect();
            want_order.sort_by_key(|&p| ids[p as usize]);
            assert_eq!(order, want_order, "{what}: order");
            assert_eq!(starts[vocab] as usize, n_ids, "{what}: starts");
        }
    }
}
