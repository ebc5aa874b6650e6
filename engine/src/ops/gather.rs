//! Row gathers: `gather_rows` selects rows of a tensor by index, e.g. the masked positions of a
//! flattened `[B*S, H]` activation before BERT's MLM vocabulary projection, so the most
//! expensive matmul of the model runs on ~15% of the tokens.
//!
//! Backward is a scatter-add into the gradient of the source, and it must be deterministic
//! (bit-identical from run to run, whatever the number of threads) even when an index repeats:
//! the positions are first bucketed by the row they read (a counting sort, which keeps them in
//! increasing order), then each row of the gradient, independently and in parallel, adds its
//! positions in that order. No two threads ever write the same row. `embedding` uses the same
//! two kernels, since a lookup is a gather of the weight's rows.

use rayon::prelude::*;

use crate::ops::elementwise::PARALLEL_MIN;
use crate::{DType, Device, Error, Result, Tape, Tensor, Var};

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

/// Rows of `x` (`[N, ...]`) selected by `indices` (i32 `[M]`): shape `[M, ...]`. An index
/// outside `[0, N)` is an error naming its position and value.
pub fn gather_rows(tape: &Tape, x: &Var, indices: &Tensor) -> Result<Var> {
    x.tensor().expect_float("gather_rows")?;
    indices.expect_dtype("gather_rows (indices)", DType::I32)?;
    let shape = x.shape().to_vec();
    if shape.is_empty() {
        return Err(Error::shape(
            "gather_rows",
            "the source must have at least one dimension, got a scalar".to_string(),
        ));
    }
    indices.expect_rank("gather_rows", "indices", 1)?;
    let n = shape[0];
    let row_len: usize = shape[1..].iter().product();
    let idx = indices.to_vec::<i32>()?;
    if let Some((p, v)) = first_out_of_range(&idx, n) {
        return Err(Error::invalid(
            "gather_rows",
            format!("index {v} at position {p} is outside [0, {n}) (source {shape:?})"),
        ));
    }
    let mut out_shape = shape.clone();
    out_shape[0] = idx.len();
    if let d @ Device::Cuda(_) = x.tensor().device() {
        return crate::on_cuda!(
            d,
            crate::cuda::gather::gather(tape, "gather_rows", x, indices, &idx, out_shape)
        );
    }
    crate::cuda::cpu_only("gather_rows", [indices])?;
    let out = gather_rows_forward_cpu(&x.tensor().read_f32()?, row_len, &idx);
    let out = Tensor::f32(out, &out_shape)?;
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| {
                    Tensor::f32(
                        scatter_add_rows_cpu(&g.read_f32()?, row_len, &idx, n),
                        &shape,
                    )
                })
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;

    fn ids(v: &[i32]) -> Tensor {
        Tensor::from_vec(v.to_vec(), &[v.len()], Device::Cpu).unwrap()
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    }

    #[test]
    fn forward_selects_rows() {
        let tape = Tape::inference();
        let x = tape.constant(Tensor::f32((0..12).map(|v| v as f32).collect(), &[4, 3]).unwrap());
        let y = gather_rows(&tape, &x, &ids(&[2, 0, 2])).unwrap();
        assert_eq!(y.shape(), &[3, 3]);
        assert_eq!(
            y.tensor().to_vec_f32().unwrap(),
            vec![6., 7., 8., 0., 1., 2., 6., 7., 8.]
        );
        let y = gather_rows(&tape, &x, &ids(&[])).unwrap();
        assert_eq!(y.shape(), &[0, 3]);
        // Higher-rank rows: [N, 2, 2].
        let x = tape.constant(Tensor::f32((0..8).map(|v| v as f32).collect(), &[2, 2, 2]).unwrap());
        let y = gather_rows(&tape, &x, &ids(&[1])).unwrap();
        assert_eq!(y.shape(), &[1, 2, 2]);
        assert_eq!(y.tensor().to_vec_f32().unwrap(), vec![4., 5., 6., 7.]);
    }

    #[test]
    fn backward_accumulates_repeated_indices() {
        let tape = Tape::recording();
        let x = tape.watch(Tensor::zeros(&[3, 2], DType::F32, Device::Cpu).unwrap());
        let y = gather_rows(&tape, &x, &ids(&[1, 1, 0, 1])).unwrap();
        let g = Tensor::f32(vec![1., 2., 3., 4., 5., 6., 7., 8.], &[4, 2]).unwrap();
        let grads = tape.backward_with(&y, g).unwrap();
        assert_eq!(
            grads.get(&x).unwrap().to_vec_f32().unwrap(),
            vec![5., 6., 1. + 3. + 7., 2. + 4. + 8., 0., 0.]
        );
    }

    #[test]
    fn gradient_check() {
        let idx = ids(&[3, 0, 3, 5, 1]);
        GradCheck::default()
            .run(&[randn(&[6, 2, 3], 1)], &[0], |tape, v| {
                gather_rows(tape, &v[0], &idx)
            })
            .unwrap();
    }

    #[test]
    fn large_scatter_is_deterministic_and_matches_sequential() {
        // Many repeats of few rows, large enough for the parallel path.
        let (n, d, m) = (50, 64, 4000);
        let idx: Vec<i32> = (0..m).map(|p| ((p * 7919) % n) as i32).collect();
        let g = randn(&[m, d], 2).to_vec_f32().unwrap();
        let a = scatter_add_rows_cpu(&g, d, &idx, n);
        let b = scatter_add_rows_cpu(&g, d, &idx, n);
        assert_eq!(a, b);
        let mut naive = vec![0f32; n * d];
        for (p, &r) in idx.iter().enumerate() {
            for j in 0..d {
                naive[r as usize * d + j] += g[p * d + j];
            }
        }
        assert_eq!(a, naive, "same order of additions, so bit-identical");
    }

    #[test]
    fn errors() {
        let tape = Tape::recording();
        let x = tape.watch(randn(&[4, 3], 0));
        let msg = gather_rows(&tape, &x, &ids(&[0, 4]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("index 4") && msg.contains("position 1"),
            "{msg}"
        );
        let msg = gather_rows(&tape, &x, &ids(&[-1])).unwrap_err().to_string();
        assert!(
            msg.contains("index -1") && msg.contains("position 0"),
            "{msg}"
        );
        let two_d = Tensor::from_vec(vec![0i32, 1], &[1, 2], Device::Cpu).unwrap();
        assert!(matches!(
            gather_rows(&tape, &x, &two_d),
            Err(Error::Shape { .. })
        ));
        let float_idx = Tensor::f32(vec![0.0], &[1]).unwrap();
        assert!(matches!(
            gather_rows(&tape, &x, &float_idx),
            Err(Error::DType { .. })
        ));
        let scalar = tape.watch(Tensor::f32(vec![1.0], &[]).unwrap());
        assert!(matches!(
            gather_rows(&tape, &scalar, &ids(&[0])),
            Err(Error::Shape { .. })
        ));
    }
}
