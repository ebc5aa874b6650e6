//! Embedding lookup on the tape: rows of a `[V, D]` weight selected by integer ids of any shape
//! (BERT's word, position and token-type embeddings), one forward and one backward for every
//! device.
//!
//! A lookup is a row gather, so the work is `crate::backend::gather`'s: the forward copies rows,
//! and the backward scatter-adds the output gradient into a `[V, D]` gradient deterministically
//! (the positions are bucketed by id, then each vocabulary row adds its positions in order,
//! rows in parallel: no two threads write one row). With BERT's tied decoder, the weight's
//! gradient from the lookup and from the output projection are summed by the tape.

use crate::backend::gather::{first_out_of_range, gather_bwd, gather_fwd};
use crate::{DType, Error, Result, Tape, Tensor, Var};

/// Coordinates of flat position `p` in a tensor of `shape`.
fn unravel(mut p: usize, shape: &[usize]) -> Vec<usize> {
    let mut coords = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        coords[d] = p % shape[d];
        p /= shape[d];
    }
    coords
}

/// `weight[ids]`: `weight` is `[V, D]`, `ids` i32 of any shape; the result is
/// `[..ids.shape, D]`. An id outside `[0, V)` is an error naming its position and value.
pub fn embedding(tape: &Tape, weight: &Var, ids: &Tensor) -> Result<Var> {
    weight.tensor().expect_float("embedding")?;
    weight.tensor().expect_rank("embedding", "weight", 2)?;
    ids.expect_dtype("embedding (ids)", DType::I32)?;
    let (vocab, dim) = (weight.shape()[0], weight.shape()[1]);
    let idv = ids.to_vec::<i32>()?;
    if let Some((p, v)) = first_out_of_range(&idv, vocab) {
        return Err(Error::invalid(
            "embedding",
            format!(
                "id {v} at position {:?} of ids {:?} is outside the vocabulary [0, {vocab})",
                unravel(p, ids.shape()),
                ids.shape()
            ),
        ));
    }
    let mut out_shape = ids.shape().to_vec();
    out_shape.push(dim);
    let (out, ids) = gather_fwd("embedding", weight.tensor(), ids, idv, &out_shape)?;
    let dtype = weight.tensor().dtype();
    Ok(tape.record(
        out,
        &[weight],
        Box::new(move |g, needs| {
            let gw = needs[0]
                .then(|| gather_bwd("embedding", g, &ids, &[vocab, dim], dtype))
                .transpose()?;
            Ok(vec![gw])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gather::embedding_forward_cpu;
    use crate::gradcheck::GradCheck;
    use crate::Device;

    fn ids(v: &[i32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, Device::Cpu).unwrap()
    }

    #[test]
    fn forward_looks_up_rows() {
        let tape = Tape::inference();
        let w = tape.constant(Tensor::f32((0..8).map(|v| v as f32).collect(), &[4, 2]).unwrap());
        let y = embedding(&tape, &w, &ids(&[3, 0, 1, 3], &[2, 2])).unwrap();
        assert_eq!(y.shape(), &[2, 2, 2]);
        assert_eq!(
            y.tensor().to_vec_f32().unwrap(),
            vec![6., 7., 0., 1., 2., 3., 6., 7.]
        );
        // bf16 weights (a teacher) are widened; the output is f32.
        let wb = tape.constant(w.tensor().cast(DType::BF16).unwrap());
        let y = embedding(&tape, &wb, &ids(&[2], &[1])).unwrap();
        assert_eq!(y.tensor().dtype(), DType::F32);
        assert_eq!(y.tensor().to_vec_f32().unwrap(), vec![4., 5.]);
    }

    #[test]
    fn backward_scatter_adds_repeated_ids() {
        let tape = Tape::recording();
        let w = tape.watch(Tensor::zeros(&[3, 2], DType::F32, Device::Cpu).unwrap());
        let y = embedding(&tape, &w, &ids(&[2, 0, 2], &[3])).unwrap();
        let g = Tensor::f32(vec![1., 2., 3., 4., 5., 6.], &[3, 2]).unwrap();
        let grads = tape.backward_with(&y, g).unwrap();
        assert_eq!(
            grads.get(&w).unwrap().to_vec_f32().unwrap(),
            vec![3., 4., 0., 0., 6., 8.]
        );
    }

    #[test]
    fn gradient_check() {
        let w = Tensor::randn(&[7, 3], 0.0, 1.0, 5, DType::F32, Device::Cpu).unwrap();
        let idx = ids(&[1, 6, 1, 0, 4, 1], &[2, 3]);
        GradCheck::default()
            .run(&[w], &[0], |tape, v| embedding(tape, &v[0], &idx))
            .unwrap();
    }

    #[test]
    fn errors() {
        let tape = Tape::recording();
        let w = tape.watch(Tensor::zeros(&[5, 2], DType::F32, Device::Cpu).unwrap());
        let msg = embedding(&tape, &w, &ids(&[0, 1, 2, 5], &[2, 2]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("id 5") && msg.contains("[1, 1]") && msg.contains("[0, 5)"),
            "{msg}"
        );
        let msg = embedding(&tape, &w, &ids(&[-3], &[1]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("id -3") && msg.contains("[0]"), "{msg}");
        let float_ids = Tensor::f32(vec![0.0], &[1]).unwrap();
        assert!(matches!(
            embedding(&tape, &w, &float_ids),
            Err(Error::DType { .. })
        ));
        let w3 = tape.watch(Tensor::zeros(&[5, 2, 1], DType::F32, Device::Cpu).unwrap());
        assert!(matches!(
            embedding(&tape, &w3, &ids(&[0], &[1])),
            Err(Error::Shape { .. })
        ));
    }

    #[test]
    fn bf16_table_gathers_the_widened_rows() {
        let w = Tensor::randn(&[50, 6], 0.0, 1.0, 3, DType::F32, Device::Cpu)
            .unwrap()
            .cast(DType::BF16)
            .unwrap();
        let idv = ids(&[4, 49, 0, 4, 17], &[5]);
        let tape = Tape::inference();
        let got = embedding(&tape, &tape.constant(w.clone()), &idv)
            .unwrap()
            .into_tensor()
            .to_vec_f32()
            .unwrap();
        let want = embedding_forward_cpu(&w.to_vec_f32().unwrap(), 6, &[4, 49, 0, 4, 17]);
        assert_eq!(got, want);
    }
}
