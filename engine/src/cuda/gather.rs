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

use recycle_kernels::launch as kl;
use recycle_kernels::launchers as k;

use super::common::{dptr, empty, on_gpu_i32, view, with_float};
use super::launch::{fit_u32, launch, shape_err, Ptr};
use super::DeviceBuffer;
use crate::backend::gather::GatherIds;
use crate::{DType, Result, Tensor};

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
    let name = "embedding_fwd";
    let dtype = table.dtype();
    let vocab = table.shape()[0];
    let dim: usize = table.shape()[1..].iter().product();
    let ctx = view(table, op)?.ctx;
    // Ids on the host (or another GPU) are uploaded from their host copy.
    let ids_dev = on_gpu_i32(&ctx, ids, &ids_host)?;
    let n_ids = ids_host.len();
    let out = empty(&ctx, dtype, out_shape)?;
    if let Some(cfg) = kl::embedding_forward(n_ids as u64, dim as u64).map_err(shape_err)? {
        let (dim, vocab) = (
            fit_u32(name, "the row length", dim)?,
            fit_u32(name, "the number of rows", vocab)?,
        );
        with_float!(op, dtype, |T| launch(
            &ctx,
            &k::embedding_fwd::<T>(
                cfg,
                dptr(table, op)?,
                dptr(&ids_dev, op)?,
                dptr(&out, op)?,
                dim,
                vocab
            )
        ))?;
    }
    let ids = GatherIds {
        host: ids_host,
        on_device: ids_dev,
    };
    Ok((out, ids))
}

/// The CUDA arm of [`crate::backend::gather::gather_bwd`]: `dy` read in `dtype` (the table's),
/// the gradient f32 of `table_shape`: the counting sort's launches, then the accumulate, which
/// overwrites every row.
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
    let n = fit_u32("embedding_bwd_count", "the number of ids", n_ids)?;
    let v = fit_u32("embedding_bwd_count", "the vocabulary size", vocab)?;
    let dim = fit_u32("embedding_bwd_accumulate", "the row length", dim)?;
    let segs = cfg.segments;
    // The counting sort's u32 scratch, `counts` zeroed.
    let u32s = |len: u64| DeviceBuffer::alloc(&ctx, len as usize * 4);
    let counts = DeviceBuffer::zeroed(&ctx, cfg.counts_len as usize * 4)?;
    let (totals, starts, order) = (
        u32s(cfg.totals_len)?,
        u32s(cfg.starts_len)?,
        u32s(cfg.order_len)?,
    );
    let (counts, totals) = (Ptr::new(counts.ptr()), Ptr::new(totals.ptr()));
    let (starts, order) = (Ptr::new(starts.ptr()), Ptr::new(order.ptr()));
    let ids = dptr(&ids.on_device, op)?;
    let dw = empty(&ctx, DType::F32, table_shape)?;
    if n_ids > 0 {
        launch(
            &ctx,
            &k::embedding_bwd_count(cfg.count, ids, n, v, segs, counts),
        )?;
    }
    launch(
        &ctx,
        &k::embedding_bwd_offsets(cfg.offsets, counts, totals, v, segs),
    )?;
    launch(&ctx, &k::embedding_bwd_scan(cfg.scan, totals, starts, v))?;
    if n_ids > 0 {
        launch(
            &ctx,
            &k::embedding_bwd_place(cfg.place, ids, counts, starts, order, n, v, segs),
        )?;
    }
    let dwp = dptr(&dw, op)?;
    with_float!(op, dtype, |T| launch(
        &ctx,
        &k::embedding_bwd_accumulate::<T>(cfg.accumulate, dptr(&g, op)?, order, starts, dwp, dim)
    ))?;
    Ok(dw)
}
