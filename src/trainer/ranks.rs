//! What the trainer does with the other ranks of a data-parallel run (`docs/distributed.md`):
//! its shard of each global batch and that shard's weight, the start-up broadcast of rank 0's
//! state, the BatchNorm statistics averaged after each step, and the check that every rank
//! holds the same weights.

use rayon::prelude::*;
use recycle_engine::optim::Optimizer;
use recycle_engine::{DType, Error, Result, Tensor};

use super::runner::Progress;
use super::Model;
use crate::data::{self, text::IGNORE_LABEL};
use crate::distributed::Group;
use crate::experiments::CacheReads;

/// Which rows of every global batch this rank trains on: the `rank`-th of `size` equal,
/// contiguous slices (deterministic, disjoint, and together the whole batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub size: usize,
}

impl Shard {
    /// The rows `start..start + len` of a batch of `rows`.
    fn rows(&self, rows: usize) -> (usize, usize) {
        let len = rows / self.size;
        (self.rank * len, len)
    }
}

/// The seed of a rank's teacher draws: the recipe's on every rank (the same draw everywhere),
/// or, with `per_rank` (`random-one-per-rank`), one of its own.
pub fn draw_seed(seed: u64, rank: usize, per_rank: bool) -> u64 {
    match per_rank {
        true => recycle_engine::rng::bits_at(seed, rank as u64 + 1),
        false => seed,
    }
}

/// The global batch size must split into equal shards: each rank's mean loss then counts its
/// rows with the same weight the one-process mean would.
pub fn check_divides(batch: usize, size: usize) -> Result<()> {
    if size > 1 && !batch.is_multiple_of(size) {
        return Err(Error::invalid(
            "recipe",
            format!(
                "train.batch_size {batch} (the global batch) does not split over {size} ranks: \
                 use a multiple of {size} or launch a number of ranks that divides it"
            ),
        ));
    }
    Ok(())
}

/// This rank's share of the global batch's loss terms: labelled rows (images) or masked
/// tokens (MLM) in its shard over those in the whole batch. The loss is a mean over them, so
/// the weighted sum of the ranks' gradients is the gradient of the global batch's mean.
fn weight(labels: &Tensor, shard: Shard) -> Result<f32> {
    if shard.size == 1 {
        return Ok(1.0);
    }
    let labels = labels.to_vec::<i32>()?;
    let (start, len) = shard.rows(labels.len());
    Ok(share(&labels, start..start + len, shard.size))
}

/// Labels other than [`IGNORE_LABEL`] in `mine` over those in `all` (an even split when the
/// batch has none).
fn share(all: &[i32], mine: std::ops::Range<usize>, ranks: usize) -> f32 {
    let counted = |s: &[i32]| s.iter().filter(|&&l| l != IGNORE_LABEL).count();
    match counted(all) {
        0 => 1.0 / ranks as f32,
        total => counted(&all[mine]) as f32 / total as f32,
    }
}

/// This rank's slice of a loader's image batch, and its weight.
pub fn shard_images(b: data::ImageBatch, shard: Shard) -> Result<(data::ImageBatch, f32)> {
    if shard.size == 1 {
        return Ok((b, 1.0));
    }
    let (start, len) = shard.rows(b.labels.shape()[0]);
    let w = weight(&b.labels, shard)?;
    Ok((
        data::ImageBatch {
            x: b.x.narrow_rows(start, len)?,
            labels: b.labels.narrow_rows(start, len)?,
        },
        w,
    ))
}

/// This rank's slice of a loader's MLM batch (whole sequences), and its weight.
pub fn shard_mlm(b: data::MlmBatch, shard: Shard) -> Result<(data::MlmBatch, f32)> {
    if shard.size == 1 {
        return Ok((b, 1.0));
    }
    let rows = b.input_ids.shape()[0];
    let (start, len) = shard.rows(rows);
    let labels = b.position_labels.to_vec::<i32>()?;
    let per_row = labels.len() / rows.max(1);
    let w = share(
        &labels,
        start * per_row..(start + len) * per_row,
        shard.size,
    );
    Ok((
        data::MlmBatch {
            input_ids: b.input_ids.narrow_rows(start, len)?,
            token_type_ids: b.token_type_ids.narrow_rows(start, len)?,
            attention_mask: b.attention_mask.narrow_rows(start, len)?,
            position_labels: b.position_labels.narrow_rows(start, len)?,
        },
        w,
    ))
}

/// Overwrites `t` on every rank with rank 0's values (f32 or i32 tensors).
fn broadcast_tensor(group: &dyn Group, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::I32 => {
            let mut v: Vec<u64> = t
                .to_vec::<i32>()?
                .iter()
                .map(|&x| x as u32 as u64)
                .collect();
            group.broadcast_u64(&mut v)?;
            let v: Vec<i32> = v.iter().map(|&x| x as u32 as i32).collect();
            t.copy_from_i32(&v)
        }
        _ => {
            let mut v = t.to_vec_f32()?;
            group.broadcast_f32(&mut v)?;
            t.copy_from(&Tensor::from_vec(v, t.shape(), t.device())?)
        }
    }
}

/// Hands rank 0's weights, BatchNorm statistics, optimizer state and progress (a fresh start
/// or a checkpoint it read) to every rank.
pub fn broadcast_state(
    group: &dyn Group,
    student: &Model,
    optimizer: &mut dyn Optimizer,
    progress: &mut Progress,
) -> Result<()> {
    let params = student.params()?;
    broadcast_tensor(group, params.values())?;
    params.refresh_working_copy()?;
    for (_, t) in student.buffers() {
        broadcast_tensor(group, t)?;
    }
    let state = optimizer.state();
    for (_, t) in &state {
        broadcast_tensor(group, t)?;
    }
    optimizer.load_state(&state)?;
    let p = progress;
    let mut counters = [
        p.step,
        p.samples,
        p.train_seconds.to_bits(),
        p.teacher_forwards,
        p.teacher_seconds.to_bits(),
        p.cache_reads.steps,
        p.cache_reads.forwards,
        p.cache_reads.rows,
        p.cache_reads.bytes,
        p.skipped_steps,
        p.caller_steps,
        p.caller_samples,
    ];
    group.broadcast_u64(&mut counters)?;
    let [step, samples, train_seconds, teacher_forwards, teacher_seconds, cs, cf, cr, cb, skipped, caller_steps, caller_samples] =
        counters;
    *p = Progress {
        step,
        samples,
        train_seconds: f64::from_bits(train_seconds),
        teacher_forwards,
        teacher_seconds: f64::from_bits(teacher_seconds),
        cache_reads: CacheReads {
            steps: cs,
            forwards: cf,
            rows: cr,
            bytes: cb,
        },
        skipped_steps: skipped,
        caller_steps,
        caller_samples,
    };
    Ok(())
}

/// Averages the float buffers (BatchNorm running statistics) over the ranks. Each rank
/// normalises with its own shard's batch statistics (as PyTorch's DDP does without
/// SyncBatchNorm); the running statistics, a linear blend of those, are kept equal on every
/// rank as the running statistics of the ranks' average.
pub fn average_buffers(group: &dyn Group, student: &Model) -> Result<()> {
    let floats: Vec<&Tensor> = student
        .buffers()
        .iter()
        .map(|(_, t)| t)
        .filter(|t| t.dtype() == DType::F32)
        .collect();
    if floats.is_empty() {
        return Ok(());
    }
    let mut all = Vec::new();
    for t in &floats {
        all.extend_from_slice(&t.to_vec_f32()?);
    }
    group.all_reduce_sum_f32(&mut all)?;
    let scale = 1.0 / group.size() as f32;
    let mut at = 0;
    for t in floats {
        let n = t.elem_count();
        let v: Vec<f32> = all[at..at + n].iter().map(|x| x * scale).collect();
        t.copy_from(&Tensor::from_vec(v, t.shape(), t.device())?)?;
        at += n;
    }
    Ok(())
}

/// A hash of the bits of the weights and buffers: equal on every rank while they agree.
fn checksum(student: &Model) -> Result<u64> {
    let values = student.params()?.values().to_vec_f32()?;
    let mix = |h: u64, v: u32| (h ^ v as u64).wrapping_mul(0x100_0000_01b3);
    let parts: Vec<u64> = values
        .par_chunks(1 << 16)
        .map(|c| {
            c.iter()
                .fold(0xcbf2_9ce4_8422_2325, |h, v| mix(h, v.to_bits()))
        })
        .collect();
    let mut h = parts.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, p| {
        mix(mix(h, p as u32), (p >> 32) as u32)
    });
    for (_, t) in student.buffers() {
        let bits: Vec<u32> = match t.dtype() {
            DType::I32 => t.to_vec::<i32>()?.iter().map(|&x| x as u32).collect(),
            _ => t.to_vec_f32()?.iter().map(|x| x.to_bits()).collect(),
        };
        h = bits.into_iter().fold(h, mix);
    }
    Ok(h)
}

/// Errs, naming the ranks, when some rank's weights differ from rank 0's after `step`.
pub fn check_same_weights(group: &dyn Group, student: &Model, step: u64) -> Result<()> {
    let all = group.all_gather_u64(checksum(student)?)?;
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, &h)| h != all[0])
        .map(|(r, _)| r.to_string())
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(
        "train",
        format!(
            "after step {step} the weights of rank(s) {} differ from rank 0's: the ranks have \
             diverged (an all-reduce that is not the same on every rank, or ranks built from \
             different recipes or binaries)",
            differ.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::{TeacherEntry, TeacherPool, TeacherStrategy};
    use crate::distributed::{GradReducer, Group};

    #[test]
    fn ranks_share_the_draw_unless_each_draws_its_own() {
        let pool = |seed| {
            let teachers = (0..4)
                .map(|i| TeacherEntry {
                    name: format!("t{i}"),
                    accuracy: 0.5,
                    model: i,
                })
                .collect();
            TeacherPool::new(teachers, TeacherStrategy::RandomOne, seed).unwrap()
        };
        let shared: Vec<_> = (0..2).map(|r| pool(draw_seed(7, r, false))).collect();
        let own: Vec<_> = (0..2).map(|r| pool(draw_seed(7, r, true))).collect();
        let steps = 0..64u64;
        assert!(steps
            .clone()
            .all(|s| shared[0].select(s) == shared[1].select(s)));
        let differ = steps
            .filter(|&s| own[0].select(s) != own[1].select(s))
            .count();
        // Independent draws of 1 in 4 agree a quarter of the time.
        assert!((24..=64).contains(&differ), "{differ} of 64 draws differ");
    }

    /// Two ranks in one process, the other rank's hash off by one bit.
    struct Diverged;

    impl Group for Diverged {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn broadcast_f32(&self, _: &mut [f32]) -> Result<()> {
            Ok(())
        }
        fn broadcast_u64(&self, _: &mut [u64]) -> Result<()> {
            Ok(())
        }
        fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
            data.iter_mut().for_each(|v| *v *= 2.0);
            Ok(())
        }
        fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
            Ok(vec![value, value ^ 1])
        }
        fn grad_reducer(&self, _: std::time::Duration) -> Result<Box<dyn GradReducer>> {
            Ok(Box::new(
                crate::distributed::reducer::SingleProcess::default(),
            ))
        }
        fn abort(&self, code: i32) -> ! {
            std::process::exit(code)
        }
    }

    #[test]
    fn diverged_weights_are_an_error_naming_the_rank() {
        let arch = super::super::Architecture::ResNet(recycle_models::ResNetConfig {
            depth: 18,
            num_classes: 10,
            in_channels: 1,
            small_stem: true,
            width: 0.0625,
        });
        let student = Model::new(&arch, 1).unwrap();
        let e = check_same_weights(&Diverged, &student, 12)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("after step 12") && e.contains("rank(s) 1 differ"),
            "{e}"
        );
        // Buffers: the running statistics become the ranks' mean (here: each rank's own).
        let before: Vec<Vec<f32>> = student
            .buffers()
            .iter()
            .filter(|(_, t)| t.dtype() == DType::F32)
            .map(|(_, t)| t.to_vec_f32().unwrap())
            .collect();
        assert!(!before.is_empty());
        average_buffers(&Diverged, &student).unwrap();
        let after: Vec<Vec<f32>> = student
            .buffers()
            .iter()
            .filter(|(_, t)| t.dtype() == DType::F32)
            .map(|(_, t)| t.to_vec_f32().unwrap())
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn shards_are_disjoint_equal_and_cover_the_batch_with_weights_summing_to_one() {
        let x = Tensor::f32((0..12).map(|v| v as f32).collect(), &[6, 2]).unwrap();
        let labels =
            Tensor::from_vec(vec![0i32, 1, 2, 3, 4, 5], &[6], recycle_engine::Device::Cpu).unwrap();
        let mut rows = Vec::new();
        let mut total = 0.0;
        for rank in 0..3 {
            let b = data::ImageBatch {
                x: x.clone(),
                labels: labels.clone(),
            };
            let (s, w) = shard_images(b, Shard { rank, size: 3 }).unwrap();
            assert_eq!(s.x.shape(), &[2, 2]);
            rows.extend(s.labels.to_vec::<i32>().unwrap());
            total += w;
        }
        assert_eq!(rows, vec![0, 1, 2, 3, 4, 5]);
        assert!((total - 1.0f32).abs() < 1e-6);
        assert!(check_divides(32, 2).is_ok());
        let e = check_divides(30, 4).unwrap_err().to_string();
        assert!(e.contains("batch_size 30") && e.contains("4 ranks"), "{e}");
    }

    #[test]
    fn an_mlm_shard_weighs_its_masked_tokens() {
        let dev = recycle_engine::Device::Cpu;
        let ids = Tensor::from_vec(vec![1i32; 8], &[2, 4], dev).unwrap();
        let i = IGNORE_LABEL;
        // Row 0 has one masked token, row 1 three.
        let labels = Tensor::from_vec(vec![5, i, i, i, 6, 7, 8, i], &[2, 4], dev).unwrap();
        let b = || data::MlmBatch {
            input_ids: ids.clone(),
            token_type_ids: ids.clone(),
            attention_mask: ids.clone(),
            position_labels: labels.clone(),
        };
        let (s0, w0) = shard_mlm(b(), Shard { rank: 0, size: 2 }).unwrap();
        let (s1, w1) = shard_mlm(b(), Shard { rank: 1, size: 2 }).unwrap();
        assert_eq!((w0, w1), (0.25, 0.75));
        assert_eq!(
            s0.position_labels.to_vec::<i32>().unwrap(),
            vec![5, i, i, i]
        );
        assert_eq!(s1.input_ids.shape(), &[1, 4]);
    }
}
