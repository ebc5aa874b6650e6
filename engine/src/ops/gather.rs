//! Row gathers on the tape: `gather_rows` selects rows of a tensor by index, e.g. the masked
//! positions of a flattened `[B*S, H]` activation before BERT's MLM vocabulary projection, so
//! the most expensive matmul of the model runs on ~15% of the tokens. One forward and one
//! backward (a deterministic scatter-add) for every device; the work is done by
//! `crate::backend::gather`, which `embedding` uses too, since a lookup is a gather of the
//! weight's rows.

use crate::backend::gather::{first_out_of_range, gather_bwd, gather_fwd};
use crate::{DType, Error, Result, Tape, Tensor, Var};

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
    let idx = indices.to_vec::<i32>()?;
    if let Some((p, v)) = first_out_of_range(&idx, n) {
        return Err(Error::invalid(
            "gather_rows",
            format!("index {v} at position {p} is outside [0, {n}) (source {shape:?})"),
        ));
    }
    let mut out_shape = shape.clone();
    out_shape[0] = idx.len();
    let (out, ids) = gather_fwd("gather_rows", x.tensor(), indices, idx, &out_shape)?;
    let dtype = x.tensor().dtype();
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| gather_bwd("gather_rows", g, &ids, &shape, dtype))
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gather::*;
    use crate::gradcheck::GradCheck;
    use crate::Device;

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
