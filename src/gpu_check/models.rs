//! Whole-model checks: one training step of each small model (ResNet-18 small, BERT-tiny) on
//! the GPU against the CPU, in f32 and with bf16 activations, with the bytes each step copies
//! to the host; and the teacher stream, a distillation step with the teacher on its own stream
//! against the same step with the teacher first.

use recycle_engine::optim::{Optimizer, Sgdw};
use recycle_engine::{DType, Device, Error, Result, Tape, Tensor};
use recycle_models::{BertConfig, ResNetConfig};

use super::checker::{l2_norm, max_rel_err, rel_l2_err, scalar_rel_err, Checker};
use super::host_copy::bytes_to_host;
use crate::distill::loss::{kd_loss, KdLoss};
use crate::trainer::{forward_backward, Architecture, Batch, Model};

/// The small models of the step check: a ResNet-18 with the small stem at width 1/8 on a
/// batch of 8 1x28x28 images (10 classes), and BERT-tiny on 4 sequences of 32 tokens from a
/// vocabulary of 512 (15% masked).
pub fn small_step_cases() -> Result<Vec<(String, Architecture, Batch)>> {
    let mut resnet = ResNetConfig::new(18, 10);
    resnet.in_channels = 1;
    resnet.small_stem = true;
    resnet.width = 0.125;
    Ok(vec![
        (
            "ResNet-18 small stem, width 1/8".to_string(),
            Architecture::ResNet(resnet),
            image_batch(8, 1, 28, 10, 0x1a)?,
        ),
        (
            "BERT-tiny, vocabulary 512".to_string(),
            Architecture::Bert(BertConfig::tiny(512)),
            crate::bench::mlm_batch(4, 32, 512)?,
        ),
    ])
}

/// `n` random `c x hw x hw` images (normal, f32, on the CPU) and labels in `[0, classes)`.
pub(super) fn image_batch(
    n: usize,
    c: usize,
    hw: usize,
    classes: usize,
    seed: u64,
) -> Result<Batch> {
    let x = Tensor::randn(&[n, c, hw, hw], 0.0, 1.0, seed, DType::F32, Device::Cpu)?;
    let mut rng = recycle_engine::rng::Rng::new(seed + 1);
    let labels: Vec<i32> = (0..n).map(|_| rng.below(classes as u64) as i32).collect();
    Ok(Batch::Image {
        x,
        labels: Tensor::from_vec(labels, &[n], Device::Cpu)?,
    })
}

/// The shapes column of a model-step row.
pub(super) fn batch_text(batch: &Batch) -> String {
    match batch {
        Batch::Image { x, .. } => format!("{:?}", x.shape()),
        Batch::Mlm(b) => format!(
            "{:?} tokens, {} masked",
            b.input_ids.shape(),
            b.labels.elem_count()
        ),
    }
}

/// Tolerances of the bf16 model-step rows of `arch`: (loss, gradient norm, gradient and
/// parameter update as relative L2 errors).
///
/// Both devices start from the same f32 master weights and the same bf16 working copy, and
/// both hand the loss bf16 logits; they differ in where they round. The GPU rounds every
/// activation and every gradient of the step to bf16 (8 significant bits: up to 2^-9 ≈ 2e-3
/// relative per op); the CPU rounds the input (or the embeddings), the logits and, where it
/// has bf16 products, the inputs of convolutions and linear layers, and computes in f32 in
/// between. How far that moves a step depends on the model, so the tolerances are set from
/// the CPU's own bf16-versus-f32 differences (`bf16_model_steps_run_on_the_cpu` keeps them
/// below half of these), the GPU's extra roundings being of the same kind:
///
/// - BERT-tiny is well conditioned: bf16 against f32 moves the loss and the gradient norm by
///   ~1e-4 and the gradient by 3e-3 (relative L2). Tolerances 1e-2, 2e-2, 5e-2.
/// - The small ResNet is not: a training-mode BatchNorm network at initialisation is chaotic in
///   its gradients (each BatchNorm backward subtracts the gradient's projection on the batch
///   mean and on the normalised input, cancelling most of it), so rounding only its weights to
///   bf16 already turns the gradient by 22% (relative L2; 26% with the input too), while the
///   loss moves by 4e-5 and the gradient norm by 2%. Tolerances 1e-2 on the loss, 1e-1 on the
///   norm and 0.75 on the gradient and the update: that still fails a missing, zero,
///   sign-flipped or unrelated gradient (relative L2 ≥ 1), not a wrong layer among twenty.
///
/// First estimates, to revise once the check has run on a GPU. The pipeline tests on `cuda:0`
/// (`tests/pipeline_cuda.rs`) hold a few steps of training to the same tolerances.
pub fn bf16_step_tolerances(arch: &Architecture) -> (f64, f64, f64) {
    match arch {
        Architecture::ResNet(_) => (1e-2, 1e-1, 0.75),
        Architecture::Bert(_) => (1e-2, 2e-2, 5e-2),
    }
}

/// Bytes a training step (`forward_backward`, no teachers) on the GPU copies back to the host
/// when its batch was uploaded from the CPU. Ids, labels, masked positions, the padding mask
/// and BatchNorm's step counters are read from their host copies (`Tensor::to_device` keeps
/// the values of an i32 upload), so what remains is:
/// - 12: the fused loss's totals (CE, KD, their sum) in one copy: the loss the step returns and
///   its terms for the metrics log, the one read a step needs;
/// - 4: the backward's seed (1.0, uploaded by `Tape::backward`), read back by the fused loss's
///   backward to scale its gradient.
///
/// The second comes right after the first, when the stream holds nothing but a 4-byte upload,
/// so it waits for nothing (`forward_backward` takes the loss's value from the fused loss, not
/// from its tensor). Any id or mask read that downloads is at least 4 bytes per element (76
/// bytes for BERT-tiny's ~19 masked positions, 80 for ResNet's 20 step counters), so it shows.
pub const STEP_BYTES_TO_HOST: u64 = 12 + 4;

/// Tolerances of the f32 model-step rows: (loss, gradient norm, gradient and parameters after
/// the update, element by element). [`model_step_checks`] says why.
pub const F32_STEP_TOLERANCES: (f64, f64, f64) = (1e-4, 1e-4, 1e-3);

/// One training step of each small model on the GPU and on the CPU, from the same weights and
/// batch: loss, gradient norm, flat gradient, and the parameters after an SGDW update; first
/// in f32, then with bf16 activations and the bf16 working copy of the weights
/// (`Model::with_activations`).
///
/// f32: parameters and activations f32; tolerances allow for cuDNN's and cuBLASLt's summation
/// orders compounding through the layers: 1e-4 on the loss and the gradient norm, 1e-3 on each
/// gradient element (relative to the gradient's scale near zero) and on the updated
/// parameters.
///
/// bf16: rows with dtype bf16, compared as relative L2 errors ([`bf16_step_tolerances`] says
/// why and how much), the update (parameters after minus before) instead of the parameters
/// (which the update barely moves), and one exact row: after the GPU's SGDW step, its working
/// copy must be its own master rounded to bf16, bit for bit (the kernel's `working` output).
pub(super) fn model_step_checks(c: &mut Checker) -> Result<()> {
    let loss = KdLoss::kl(4.0, 1.0);
    let (lr, seed) = (0.05f32, 0x57e9);
    for activations in [DType::F32, DType::BF16] {
        for (name, arch, batch_cpu) in small_step_cases()? {
            let cpu = Model::new(&arch, 11)?;
            let cpu = match activations {
                DType::F32 => cpu,
                dt => cpu.with_activations(dt)?,
            };
            // The working copy travels with the model: both devices read the same bf16 weights.
            let gpu = cpu.to_device(c.device)?;
            let batch_gpu = batch_cpu.to_device(c.device)?;
            let before = bytes_to_host(c.device)?;
            let out_gpu = forward_backward(&gpu, None, &loss, &batch_gpu, lr, 0, seed)?;
            let downloaded = bytes_to_host(c.device)? - before;
            let out_cpu = forward_backward(&cpu, None, &loss, &batch_cpu, lr, 0, seed)?;
            let (p_gpu, p_cpu) = (gpu.params()?, cpu.params()?);
            let g_gpu = p_gpu.grads().to_vec_f32()?;
            let g_cpu = p_cpu.grads().to_vec_f32()?;
            let before = p_cpu.values().to_vec_f32()?;
            let shapes = batch_text(&batch_cpu);
            let bf16 = activations == DType::BF16;
            let (t_loss, t_norm, t_vec) = if bf16 {
                bf16_step_tolerances(&arch)
            } else {
                F32_STEP_TOLERANCES
            };
            c.record_err(
                &format!("{name} step: loss"),
                shapes.clone(),
                activations,
                scalar_rel_err(out_gpu.loss as f64, out_cpu.loss as f64),
                t_loss,
            );
            c.record_err(
                &format!("{name} step: bytes copied to the host (batch uploaded from the CPU)"),
                shapes.clone(),
                activations,
                downloaded as f64,
                STEP_BYTES_TO_HOST as f64,
            );
            c.record_err(
                &format!("{name} step: gradient norm"),
                shapes.clone(),
                activations,
                scalar_rel_err(l2_norm(&g_gpu), l2_norm(&g_cpu)),
                t_norm,
            );
            let (measure, g_err) = if bf16 {
                (", relative L2", rel_l2_err(&g_gpu, &g_cpu))
            } else {
                ("", max_rel_err(&g_gpu, &g_cpu))
            };
            c.record_err(
                &format!("{name} step: gradient ({} scalars{measure})", g_cpu.len()),
                shapes.clone(),
                activations,
                g_err,
                t_vec,
            );
            let mut o_gpu = Sgdw::paper(p_gpu.len(), lr as f64)?;
            let mut o_cpu = Sgdw::paper(p_cpu.len(), lr as f64)?;
            o_gpu.step(p_gpu, lr)?;
            o_cpu.step(p_cpu, lr)?;
            if !bf16 {
                c.record(
                    &format!("{name} step: parameters after SGDW"),
                    shapes,
                    DType::F32,
                    p_gpu.values(),
                    p_cpu.values(),
                    t_vec,
                )?;
                continue;
            }
            let update = |after: Vec<f32>| -> Vec<f32> {
                after.iter().zip(&before).map(|(a, b)| a - b).collect()
            };
            c.record_err(
                &format!("{name} step: SGDW update (relative L2)"),
                shapes.clone(),
                activations,
                rel_l2_err(
                    &update(p_gpu.values().to_vec_f32()?),
                    &update(p_cpu.values().to_vec_f32()?),
                ),
                t_vec,
            );
            let working = p_gpu.working().ok_or_else(|| {
                Error::invalid(
                    "gpu-check",
                    "the bf16 model has no working copy".to_string(),
                )
            })?;
            c.record(
                &format!("{name} step: working copy = bf16(master) after SGDW"),
                shapes,
                activations,
                working,
                // The reference rounding is the CPU's (`half`'s round to nearest even).
                &p_gpu.values().to_device(Device::Cpu)?.cast(DType::BF16)?,
                0.0,
            )?;
        }
    }
    Ok(())
}

/// The teacher stream, as `train_step` runs a distillation step: one step of each small model
/// with a one-teacher pool, the teacher's forward queued on the teacher stream
/// (`cuda::on_stream`) and joined right before the fused loss, against the same step on the GPU
/// with the teacher's logits computed first on the student stream (the order the CPU test
/// `teachers_first_changes_no_bit_on_the_cpu` pins down). The teacher is made as the trainer
/// makes it on a GPU (bf16 weights, bf16 activations), the student computes in f32. Every
/// kernel is deterministic, so the loss, the KD term and the gradient must agree bit for bit
/// (tolerance 0): a missing or misplaced join reads poisoned (NaN) or unfinished teacher logits,
/// and the per-stream cuBLASLt workspaces, cuDNN handles and the teacher's per-call padding
/// bias run here for the first time.
pub(super) fn teacher_stream_checks(c: &mut Checker) -> Result<()> {
    use crate::distill::{TeacherEntry, TeacherPool, TeacherStrategy};
    let loss = KdLoss::kl(4.0, 1.0);
    let (lr, step, seed) = (0.05f32, 3u64, 0x7eac);
    for (name, arch, batch_cpu) in small_step_cases()? {
        // Two students with the same weights and their own buffers (on the CPU, where this
        // runs in the unit tests, `to_device` would share one).
        let device = c.device;
        let student = || Model::new(&arch, 21)?.to_device(device);
        let teacher = Model::new(&arch, 22)?
            .teacher(DType::BF16)?
            .with_activations(DType::BF16)?
            .to_device(device)?;
        let pool = TeacherPool::new(
            vec![TeacherEntry {
                name: "teacher".to_string(),
                accuracy: 0.5,
                model: teacher,
            }],
            TeacherStrategy::Single,
            1,
        )?;
        let batch = batch_cpu.to_device(device)?;
        let shapes = batch_text(&batch_cpu);

        // Through the teacher stream.
        let scoped = student()?;
        let out = forward_backward(&scoped, Some(&pool), &loss, &batch, lr, step, seed)?;

        // Everything on the student stream: the teacher first, then the student.
        let plain = student()?;
        let teacher_logits = pool.logits(step, |t| {
            Ok(t.logits(&Tape::inference(), &batch, false, 0)?
                .into_tensor())
        })?;
        let tape = Tape::recording();
        let dropout_seed = recycle_engine::rng::bits_at(seed, step);
        let logits = plain.logits(&tape, &batch, true, dropout_seed)?;
        let o = kd_loss(&tape, &loss, &logits, &teacher_logits, batch.labels(), None)?;
        tape.backward(&o.total)?;

        let row = |what: &str| format!("{name} KD step, teacher stream vs student stream: {what}");
        c.record_err(
            &row("loss"),
            shapes.clone(),
            DType::F32,
            scalar_rel_err(out.loss as f64, o.total_value as f64),
            0.0,
        );
        c.record_err(
            &row("KD term"),
            shapes.clone(),
            DType::F32,
            scalar_rel_err(out.kd.unwrap_or(f32::NAN) as f64, o.kd as f64),
            0.0,
        );
        c.record(
            &row("gradient"),
            shapes,
            DType::F32,
            scoped.params()?.grads(),
            plain.params()?.grads(),
            0.0,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bf16 step rows' path on the CPU: a model with bf16 activations and a working copy
    /// steps with a finite loss and a non-zero gradient, and a copy moved to the CPU (as the
    /// check moves it to the GPU, working copy included) gives the same bits. Against the f32
    /// step, its own roundings stay below half of the bf16 tolerances (which are set from
    /// these differences: the GPU rounds more often, not differently).
    #[test]
    fn bf16_model_steps_run_on_the_cpu() {
        let loss = KdLoss::kl(4.0, 1.0);
        for (name, arch, batch) in small_step_cases().unwrap() {
            let (t_loss, t_norm, t_vec) = bf16_step_tolerances(&arch);
            let f = Model::new(&arch, 11).unwrap();
            let b = Model::new(&arch, 11)
                .unwrap()
                .with_activations(DType::BF16)
                .unwrap();
            let moved = Model::new(&arch, 11)
                .unwrap()
                .with_activations(DType::BF16)
                .unwrap()
                .to_device(Device::Cpu)
                .unwrap();
            assert!(moved.params().unwrap().working().is_some(), "{name}");
            let of = forward_backward(&f, None, &loss, &batch, 0.05, 0, 7).unwrap();
            let ob = forward_backward(&b, None, &loss, &batch, 0.05, 0, 7).unwrap();
            assert!(ob.loss.is_finite(), "{name}");
            let gf = f.params().unwrap().grads().to_vec_f32().unwrap();
            let gb = b.params().unwrap().grads().to_vec_f32().unwrap();
            assert!(l2_norm(&gb) > 0.0, "{name}");
            let e_loss = scalar_rel_err(ob.loss as f64, of.loss as f64);
            let e_norm = scalar_rel_err(l2_norm(&gb), l2_norm(&gf));
            let e_grad = rel_l2_err(&gb, &gf);
            assert!(e_loss > 0.0 && e_grad > 0.0, "{name}: bf16 changed nothing");
            assert!(e_loss < t_loss / 2.0, "{name}: loss {e_loss}");
            assert!(e_norm < t_norm / 2.0, "{name}: gradient norm {e_norm}");
            assert!(e_grad < t_vec / 2.0, "{name}: gradient {e_grad}");

            let batch_moved = batch.to_device(Device::Cpu).unwrap();
            let om = forward_backward(&moved, None, &loss, &batch_moved, 0.05, 0, 7).unwrap();
            assert_eq!(om.loss.to_bits(), ob.loss.to_bits(), "{name}");
            let gm = moved.params().unwrap().grads().to_vec_f32().unwrap();
            assert_eq!(max_rel_err(&gm, &gb), 0.0, "{name}");
        }
    }

    /// The teacher-stream rows on the CPU, where the scope runs the teacher in place: every
    /// row passes at tolerance 0 (the GPU run must match the same way), and the KD term is
    /// there to compare.
    #[test]
    fn teacher_stream_rows_pass_on_the_cpu() {
        let mut c = Checker::new(Device::Cpu);
        teacher_stream_checks(&mut c).unwrap();
        assert_eq!(c.rows.len(), 6);
        for r in &c.rows {
            assert!(
                r.pass && r.max_rel_err == 0.0,
                "{}: {}",
                r.op,
                r.max_rel_err
            );
        }
    }

    /// The step check's path on the CPU alone: both small models take a step whose loss is
    /// finite and whose gradient is not zero, and a model moved to the CPU gives the same loss
    /// and gradient bit for bit (the GPU run compares the same numbers across devices).
    #[test]
    fn small_model_steps_run_on_the_cpu() {
        let loss = KdLoss::kl(4.0, 1.0);
        for (name, arch, batch) in small_step_cases().unwrap() {
            let a = Model::new(&arch, 11).unwrap();
            let b = Model::new(&arch, 11)
                .unwrap()
                .to_device(Device::Cpu)
                .unwrap();
            let moved = batch.to_device(Device::Cpu).unwrap();
            let oa = forward_backward(&a, None, &loss, &batch, 0.05, 0, 7).unwrap();
            let ob = forward_backward(&b, None, &loss, &moved, 0.05, 0, 7).unwrap();
            assert!(oa.loss.is_finite(), "{name}");
            assert_eq!(oa.loss.to_bits(), ob.loss.to_bits(), "{name}");
            let ga = a.params().unwrap().grads().to_vec_f32().unwrap();
            let gb = b.params().unwrap().grads().to_vec_f32().unwrap();
            assert!(l2_norm(&ga) > 0.0, "{name}");
            assert_eq!(max_rel_err(&gb, &ga), 0.0, "{name}");
        }
    }
}
