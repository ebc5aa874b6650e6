//! The fused distillation loss (`crate::kd_loss`) as cases of the cross-entropy family: the
//! student's logits are the input; the teachers' logits, the labels (every 5th row ignored)
//! and the mask are fixed by the case and made on the student's device. The output is the
//! total `ce + λ·kd`, so both terms and the student's gradient are compared. Rows of 10
//! (Fashion-MNIST), 1000 (ImageNet) and 30522 classes (BERT's vocabulary, longer than any
//! block: the kernel strides over it); teachers in the student's storage type, or in bf16
//! beside an f32 student (the trainer's default on a GPU: kernels `kd_loss_*_f32_bf16`).

use std::sync::Arc;

use super::{draw, OpCase, BF16_TOL};
use crate::kd_loss::{kd_loss, KdLoss};
use crate::{DType, Device, Result, Tensor};

/// One case: `teachers` sets of logits (bf16 when `bf16_teachers`, else the student's type).
fn kd_case(
    name: &str,
    cfg: KdLoss,
    teachers: usize,
    bf16_teachers: bool,
    masked: bool,
    (rows, classes): (usize, usize),
) -> OpCase {
    let labels: Vec<i32> = (0..rows)
        .map(|r| match r % 5 {
            2 => -100,
            _ => (r * 7919 % classes) as i32,
        })
        .collect();
    let mask: Vec<i32> = (0..rows).map(|r| (r % 3 != 0) as i32).collect();
    OpCase {
        family: "cross-entropy",
        name: name.to_string(),
        shapes: vec![vec![rows, classes]],
        // The loss is summed in f32 (f64 across rows) in both storage types: 1e-4 either way.
        tol: (1e-4, 1e-4),
        bf16_tol: (1e-4, BF16_TOL),
        op: Arc::new(move |tape, v| {
            let s = v[0].tensor();
            let t_dtype = if bf16_teachers {
                DType::BF16
            } else {
                s.dtype()
            };
            let ts = (0..teachers)
                .map(|j| {
                    draw(&[rows, classes], t_dtype, 0x7ea_c0de + j as u64)?.to_device(s.device())
                })
                .collect::<Result<Vec<Tensor>>>()?;
            let labels = Tensor::from_slice(&labels, &[rows], Device::Cpu)?;
            let mask = match masked {
                true => Some(Tensor::from_slice(&mask, &[rows], Device::Cpu)?),
                false => None,
            };
            Ok(kd_loss(tape, &cfg, &v[0], &ts, &labels, mask.as_ref())?.total)
        }),
    }
}

/// The fused distillation loss's cases.
pub(super) fn kd_loss_cases() -> Vec<OpCase> {
    const WIDE: [(usize, usize); 3] = [(128, 10), (64, 1000), (16, 30_522)];
    let mut v = Vec::new();
    for shape in WIDE {
        v.push(kd_case(
            "kd_loss KL T=4, 2 teachers",
            KdLoss::kl(4.0, 0.7),
            2,
            false,
            false,
            shape,
        ));
    }
    for shape in [WIDE[0], WIDE[2]] {
        v.push(kd_case(
            "kd_loss KL T=2, 3 teachers, mask",
            KdLoss::kl(2.0, 1.0),
            3,
            false,
            true,
            shape,
        ));
        v.push(kd_case(
            "kd_loss CE only",
            KdLoss::kl(4.0, 0.5),
            0,
            false,
            false,
            shape,
        ));
    }
    let shape = WIDE[1];
    v.push(kd_case(
        "kd_loss KL T=4, 2 bf16 teachers",
        KdLoss::kl(4.0, 0.7),
        2,
        true,
        false,
        shape,
    ));
    v.push(kd_case(
        "kd_loss MSE, 1 teacher",
        KdLoss::mse(0.5),
        1,
        false,
        false,
        shape,
    ));
    v.push(kd_case(
        "kd_loss MSE, 1 bf16 teacher",
        KdLoss::mse(0.5),
        1,
        true,
        false,
        shape,
    ));
    v
}
