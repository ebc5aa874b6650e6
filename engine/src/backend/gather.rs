//! Row gathers at the backend level: [`gather_fwd`] (rows of a table at integer ids: a tensor's
//! rows by index, or an embedding lookup) and its backward [`gather_bwd`] (a scatter-add into
//! the table's gradient), dispatched by device, with the CPU arm below them and the CUDA arm in
//! `crate::cuda::gather` (kernels `embedding.cu`).
//!
//! The scatter-add must be deterministic (bit-identical from run to run, whatever the number of
//! threads) even when an index repeats: the positions are first bucketed by the row they read
//! (a counting sort, which keeps them in increasing order), then each row of the gradient,
//! independently and in parallel, adds its positions in that order. No two threads ever write
//! the same row.
//!
//! Storage types: the CPU arm reads an f32 or bf16 table (widening only the rows it copies) and
//! writes f32; the CUDA arm writes the rows in the table's dtype; the table's gradient is f32 on
//! both (the kernels sum in f32).

use rayon::prelude::*;

use super::elementwise::PARALLEL_MIN;
use crate::{DType, Device, Result, Tensor};

/// The ids of a gather as its backward needs them: their values on the host, and the ids on
/// the table's device (the caller's tensor, or a copy uploaded from `host`).
#[derive(Debug, Clone)]
pub struct GatherIds {
    pub host: Vec<i32>,
    pub on_device: Tensor,
}

/// The rows of `table` (`[N, ...]`, float) at `ids` (i32, any shape), whose values the caller
/// has read into `ids_host` and checked to lie in `[0, N)` (with its op's error): a tensor of
/// `out_shape` (`ids`' elements times a row) on the table's device, and the ids as the
/// backward needs them.
pub fn gather_fwd(
    op: &'static str,
    table: &Tensor,
    ids: &Tensor,
    ids_host: Vec<i32>,
    out_shape: &[usize],
) -> Result<(Tensor, GatherIds)> {
    table.expect_float(op)?;
    ids.expect_dtype(op, DType::I32)?;
    let row_len: usize = table.shape().iter().skip(1).product();
    match table.device() {
        Device::Cpu => {
            crate::cuda::cpu_only(op, [ids])?;
            let out = if table.dtype() == DType::BF16 {
                // A bf16 teacher's table: widen only the rows looked up, not all of it.
                let t = table.read_bf16()?;
                let mut out = vec![0f32; ids_host.len() * row_len];
                out.par_chunks_mut(row_len.max(1))
                    .zip(&ids_host)
                    .for_each(|(row, &id)| {
                        let src = &t[id as usize * row_len..][..row_len];
                        row.iter_mut().zip(src).for_each(|(o, v)| *o = v.to_f32());
                    });
                out
            } else {
                gather_rows_forward_cpu(&table.read_f32()?, row_len, &ids_host)
            };
            let ids = GatherIds {
                host: ids_host,
                on_device: ids.clone(),
            };
            Ok((Tensor::f32(out, out_shape)?, ids))
        }
        d @ Device::Cuda(_) => crate::on_cuda!(
            d,
            crate::cuda::gather::gather_fwd(op, table, ids, ids_host, out_shape)
        ),
    }
}

/// The gradient of [`gather_fwd`] with respect to the table (`table_shape`, of dtype `dtype`,
/// which the CUDA arm reads `dy` in): `dtable[ids[p]] += dy[p]`, f32.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn gather_bwd(
    op: &'static str,
    dy: &Tensor,
    ids: &GatherIds,
    table_shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    let n_rows = table_shape.first().copied().unwrap_or(0);
    let row_len: usize = table_shape.iter().skip(1).product();
    if dy.elem_count() != ids.host.len() * row_len {
        return Err(crate::Error::shape(
            op,
            format!(
                "the output gradient {:?} is not {} rows of {row_len}",
                dy.shape(),
                ids.host.len()
            ),
        ));
    }
    match crate::cuda::common_device(op, &[dy, &ids.on_device])? {
        Device::Cpu => Tensor::f32(
            scatter_add_rows_cpu(&dy.read_f32()?, row_len, &ids.host, n_rows),
            table_shape,
        ),
        d => crate::on_cuda!(
            d,
            crate::cuda::gather::gather_bwd(op, dy, ids, table_shape, dtype)
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: kernels over slices
// ---------------------------------------------------------------------------------------------

/// The first position whose index is outside `[0, n)`, with its value.
pub fn first_out_of_range(indices: &[i32], n: usize) -> Option<(usize, i32)> {
    indices
        .iter()
        .position(|&i| i < 0 || i as usize >= n)
        .map(|p| (p, indices[p]))
}

/// Rows `indices[m]` of `x` (rows of `row_len` values), one after the other. Every index must
/// be in range (the tape ops check).
pub fn gather_rows_forward_cpu(x: &[f32], row_len: usize, indices: &[i32]) -> Vec<f32> {
    let mut out = vec![0f32; indices.len() * row_len];
    if out.is_empty() {
        return out;
    }
    let copy = |(m, dst): (usize, &mut [f32])| {
        let r = indices[m] as usize;
        dst.copy_from_slice(&x[r * row_len..(r + 1) * row_len]);
    };
    if out.len() >= PARALLEL_MIN {
        out.par_chunks_mut(row_len).enumerate().for_each(copy);
    } else {
        out.chunks_mut(row_len).enumerate().for_each(copy);
    }
    out
}

/// Backward of a row gather: `dx[indices[m]] += g[m]` for a source of `n_rows` rows, repeated
/// indices accumulating. Deterministic: each row adds its positions in increasing order.
pub fn scatter_add_rows_cpu(g: &[f32], row_len: usize, indices: &[i32], n_rows: usize) -> Vec<f32> {
    let mut dx = vec![0f32; n_rows * row_len];
    if dx.is_empty() || indices.is_empty() {
        return dx;
    }
    // Counting sort of positions by row: positions of row r are order[start[r]..start[r + 1]].
    let mut start = vec![0usize; n_rows + 1];
    for &i in indices {
        start[i as usize + 1] += 1;
    }
    for r in 0..n_rows {
        start[r + 1] += start[r];
    }
    let mut next = start.clone();
    let mut order = vec![0usize; indices.len()];
    for (p, &i) in indices.iter().enumerate() {
        order[next[i as usize]] = p;
        next[i as usize] += 1;
    }
    let accumulate = |(r, dst): (usize, &mut [f32])| {
        for &p in &order[start[r]..start[r + 1]] {
            let src = &g[p * row_len..(p + 1) * row_len];
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        }
    };
    if dx.len().max(g.len()) >= PARALLEL_MIN {
        dx.par_chunks_mut(row_len).enumerate().for_each(accumulate);
    } else {
        dx.chunks_mut(row_len).enumerate().for_each(accumulate);
    }
    dx
}

/// Rows `ids[p]` of `weight` (`[V, dim]`), one after the other: `[ids.len(), dim]`. Every id
/// must be in `[0, V)` (the tape op checks).
pub fn embedding_forward_cpu(weight: &[f32], dim: usize, ids: &[i32]) -> Vec<f32> {
    gather_rows_forward_cpu(weight, dim, ids)
}

/// The weight gradient `[vocab, dim]`: `dW[ids[p]] += g[p]`, in increasing `p` for each row.
pub fn embedding_backward_cpu(g: &[f32], dim: usize, ids: &[i32], vocab: usize) -> Vec<f32> {
    scatter_add_rows_cpu(g, dim, ids, vocab)
}
