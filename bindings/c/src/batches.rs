//! Steps, evaluations and teacher logits on batches the caller owns: images (`float` pixels,
//! `[n, channels, height, width]`) with labels, and token batches (ids, attention mask and
//! per-position labels, `[batch, seq_len]`). Each buffer comes with its length in elements,
//! checked against the shape before anything is read; integer buffers are `int32_t` or
//! `int64_t` as the call's index type says. The buffers are read once, into the engine's
//! batch, and not kept.

use std::ffi::c_void;

use recycle::trainer::{Batch, StepReport, Trainer};

use crate::{
    engine, fail, guard, non_null, trainer_mut, trainer_ref, Failure, RecycleTrainer,
    RECYCLE_ERROR_INVALID_ARGUMENT, RECYCLE_LABELS_I32, RECYCLE_LABELS_I64,
};

/// What one step did. `kd` is NaN on a step that did not distill.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RecycleStep {
    /// The index of the step that ran (0-based).
    pub step: u64,
    /// Its learning rate.
    pub lr: f32,
    /// Cross-entropy.
    pub ce: f32,
    /// The distillation term before its weight (NaN when the step did not distill).
    pub kd: f32,
    /// `ce + weight * kd`.
    pub loss: f32,
    /// Teacher forwards this step ran.
    pub teacher_forwards: u64,
    /// 1 when the step met a NaN or infinity and was skipped (`train.on_nonfinite = "skip"`).
    pub skipped: i32,
}

/// The student on one batch, in evaluation mode.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RecycleEval {
    /// Mean cross-entropy over the rows (images, or labelled positions).
    pub loss: f32,
    /// `correct / rows`: top-1 accuracy, or masked-token accuracy.
    pub accuracy: f32,
    pub correct: u64,
    pub rows: u64,
}

/// The shape of the teacher logits `recycle_trainer_teacher_logits_*` writes:
/// `[teachers, rows, classes]` floats.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RecycleLogitsShape {
    pub teachers: u64,
    pub rows: u64,
    pub classes: u64,
}

fn invalid<T>(func: &str, msg: String) -> Result<T, Failure> {
    fail(RECYCLE_ERROR_INVALID_ARGUMENT, format!("{func}: {msg}"))
}

fn as_usize(func: &str, name: &str, v: u64) -> Result<usize, Failure> {
    usize::try_from(v).or_else(|_| invalid(func, format!("`{name}` {v} does not fit in size_t")))
}

/// `len` integers at `p`, `int32_t` or `int64_t` as `index_type` says, as i32 (an int64 value
/// outside int32 is an error naming the buffer and the element).
///
/// # Safety
/// `p` is NULL or points to `len` readable elements of the type `index_type` names.
unsafe fn indices(
    func: &str,
    name: &str,
    p: *const c_void,
    len: usize,
    index_type: i32,
) -> Result<Vec<i32>, Failure> {
    match index_type {
        RECYCLE_LABELS_I32 => {
            non_null(p as *const i32, func, name)?;
            Ok(std::slice::from_raw_parts(p as *const i32, len).to_vec())
        }
        RECYCLE_LABELS_I64 => {
            non_null(p as *const i64, func, name)?;
            std::slice::from_raw_parts(p as *const i64, len)
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    i32::try_from(v).or_else(|_| {
                        invalid(func, format!("{name}[{i}] is {v}, outside the int32 range"))
                    })
                })
                .collect()
        }
        t => invalid(
            func,
            format!(
                "index type {t} is unknown; use RECYCLE_LABELS_I32 ({RECYCLE_LABELS_I32}) or \
                 RECYCLE_LABELS_I64 ({RECYCLE_LABELS_I64})"
            ),
        ),
    }
}

/// An image batch from the caller's buffers, every length checked against the shape first.
///
/// # Safety
/// As the image entry points say.
#[allow(clippy::too_many_arguments)]
unsafe fn image_batch(
    func: &str,
    images: *const f32,
    images_len: u64,
    labels: *const c_void,
    labels_len: u64,
    label_type: i32,
    shape: [u64; 4],
) -> Result<Batch, Failure> {
    non_null(images, func, "images")?;
    let mut dims = [0usize; 4];
    for (d, (v, name)) in dims
        .iter_mut()
        .zip(shape.iter().zip(["n", "channels", "height", "width"]))
    {
        *d = as_usize(func, name, *v)?;
    }
    let want = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if want != Some(images_len as usize) || usize::try_from(images_len).is_err() {
        return invalid(
            func,
            format!(
                "images_len is {images_len}; n x channels x height x width = {:?} needs {} \
                 floats",
                shape,
                want.map_or("more than size_t holds".to_string(), |w| w.to_string())
            ),
        );
    }
    if labels_len != shape[0] {
        return invalid(
            func,
            format!(
                "labels_len is {labels_len}; n is {}: one label per image",
                shape[0]
            ),
        );
    }
    let labels = indices(func, "labels", labels, dims[0], label_type)?;
    let pixels = std::slice::from_raw_parts(images, dims.iter().product()).to_vec();
    Batch::images(pixels, dims, labels).map_err(|e| engine(func, e))
}

/// A token batch from the caller's buffers (each `len` elements, `[batch, seq_len]`).
///
/// # Safety
/// As the token entry points say.
#[allow(clippy::too_many_arguments)]
unsafe fn token_batch(
    func: &str,
    input_ids: *const c_void,
    attention_mask: *const c_void,
    labels: *const c_void,
    len: u64,
    index_type: i32,
    batch: u64,
    seq_len: u64,
) -> Result<Batch, Failure> {
    let (b, s) = (
        as_usize(func, "batch", batch)?,
        as_usize(func, "seq_len", seq_len)?,
    );
    let want = b.checked_mul(s);
    if want != Some(len as usize) || usize::try_from(len).is_err() {
        return invalid(
            func,
            format!(
                "len is {len}; batch x seq_len = [{batch}, {seq_len}] needs {} elements in each \
                 buffer",
                want.map_or("more than size_t holds".to_string(), |w| w.to_string())
            ),
        );
    }
    let n = b * s;
    let ids = indices(func, "input_ids", input_ids, n, index_type)?;
    let mask = indices(func, "attention_mask", attention_mask, n, index_type)?;
    let labels = indices(func, "labels", labels, n, index_type)?;
    Batch::mlm(ids, mask, labels, b, s).map_err(|e| engine(func, e))
}

fn step_to_c(r: &StepReport) -> RecycleStep {
    RecycleStep {
        step: r.step,
        lr: r.lr,
        ce: r.output.ce,
        kd: r.output.kd.unwrap_or(f32::NAN),
        loss: r.output.loss,
        teacher_forwards: r.output.teacher_forwards as u64,
        skipped: r.output.skipped.is_some() as i32,
    }
}

/// Runs the step, and writes what it did to `*out` (NULL: not written).
unsafe fn step_on(
    func: &str,
    t: &mut Trainer,
    batch: &Batch,
    out: *mut RecycleStep,
) -> Result<(), Failure> {
    let r = t.step_batch(batch).map_err(|e| engine(func, e))?;
    if !out.is_null() {
        *out = step_to_c(&r);
    }
    Ok(())
}

unsafe fn evaluate_on(
    func: &str,
    t: &Trainer,
    batch: &Batch,
    out: *mut RecycleEval,
) -> Result<(), Failure> {
    let e = t.evaluate_batch(batch).map_err(|e| engine(func, e))?;
    *out = RecycleEval {
        loss: e.loss,
        accuracy: e.accuracy(),
        correct: e.correct as u64,
        rows: e.rows as u64,
    };
    Ok(())
}

/// Writes the teachers' logits into `logits` (`[teachers, rows, classes]`, `logits_len`
/// floats at least) and their shape into `*shape`. With `logits` NULL and `logits_len` 0 only
/// the shape is written (to size the buffer).
unsafe fn teacher_logits_on(
    func: &str,
    t: &Trainer,
    batch: &Batch,
    logits: *mut f32,
    logits_len: u64,
    shape: *mut RecycleLogitsShape,
) -> Result<(), Failure> {
    let all = t.teacher_logits(batch).map_err(|e| engine(func, e))?;
    let (rows, classes) = all.first().map_or((0, 0), |l| (l.shape()[0], l.shape()[1]));
    *shape = RecycleLogitsShape {
        teachers: all.len() as u64,
        rows: rows as u64,
        classes: classes as u64,
    };
    let need = all.len() * rows * classes;
    if logits.is_null() && logits_len == 0 {
        return Ok(());
    }
    non_null(logits, func, "logits")?;
    if logits_len < need as u64 {
        return invalid(
            func,
            format!(
                "logits_len is {logits_len}; the {} teachers' [{rows}, {classes}] logits need \
                 {need} floats",
                all.len()
            ),
        );
    }
    let dst = std::slice::from_raw_parts_mut(logits, need);
    for (chunk, l) in dst.chunks_exact_mut((rows * classes).max(1)).zip(&all) {
        chunk.copy_from_slice(&l.to_vec_f32().map_err(|e| engine(func, e))?);
    }
    Ok(())
}

/// Runs the next training step on the caller's images: `images` holds `images_len` floats,
/// `[n, channels, height, width]` row-major (`images_len` must be their product); `labels`
/// holds `labels_len = n` class indices, `int32_t` or `int64_t` as `label_type` says
/// (`RECYCLE_LABELS_I32` / `RECYCLE_LABELS_I64`). The step is the one `recycle_trainer_run_steps`
/// runs (learning rate, distillation, logging, evaluations and checkpoints as the recipe
/// says), on this batch instead of the data set's. Writes what it did to `*out` unless NULL.
/// Wrong sizes, a label outside the model's classes or a channel count it does not take are
/// `RECYCLE_ERROR_INVALID_ARGUMENT` or `RECYCLE_ERROR_ENGINE` with a message, and nothing trains.
///
/// # Safety
/// `trainer` comes from `recycle_trainer_new` and no other thread uses it during the call;
/// `images` points to `images_len` readable floats, `labels` to `labels_len` readable
/// integers of the stated type; `out` is NULL or writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recycle_trainer_step_images(
    trainer: *mut RecycleTrainer,
    images: *const f32,
    images_len: u64,
    labels: *const c_void,
    labels_len: u64,
    label_type: i32,
    n: u64,
    channels: u64,
    height: u64,
    width: u64,
    out: *mut RecycleStep,
) -> i32 {
    const F: &str = "recycle_trainer_step_images";
    guard(|| {
        let t = trainer_mut(trainer, F)?;
        if !out.is_null() {
            non_null(out, F, "out")?;
        }
        let shape = [n, channels, height, width];
        let b = image_batch(F, images, images_len, labels, labels_len, label_type, shape)?;
        step_on(F, t, &b, out)
    })
}

/// Runs the next training step on the caller's token batch (masked language modelling):
/// `input_ids`, `attention_mask` (1 for tokens, 0 for padding) and `labels` (the token to
/// predict at each position, -100 where nothing is predicted) each hold `len = batch *
/// seq_len` integers, row-major, `int32_t` or `int64_t` as `index_type` says. Otherwise as
/// `recycle_trainer_step_images`.
///
/// # Safety
/// `trainer` comes from `recycle_trainer_new` and no other thread uses it during the call;
/// each buffer points to `len` readable integers of the stated type; `out` is NULL or
/// writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recycle_trainer_step_tokens(
    trainer: *mut RecycleTrainer,
    input_ids: *const c_void,
    attention_mask: *const c_void,
    labels: *const c_void,
    len: u64,
    index_type: i32,
    batch: u64,
    seq_len: u64,
    out: *mut RecycleStep,
) -> i32 {
    const F: &str = "recycle_trainer_step_tokens";
    guard(|| {
        let t = trainer_mut(trainer, F)?;
        if !out.is_null() {
            non_null(out, F, "out")?;
        }
        let b = token_batch(
            F,
            input_ids,
            attention_mask,
            labels,
            len,
            index_type,
            batch,
            seq_len,
        )?;
        step_on(F, t, &b, out)
    })
}

/// The student's loss and accuracy on the caller's images (arguments as
/// `recycle_trainer_step_images`), in evaluation mode; nothing trains. Writes `*out`.
///
/// # Safety
/// As `recycle_trainer_step_images`; `out` is writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recycle_trainer_evaluate_images(
    trainer: *mut RecycleTrainer,
    images: *const f32,
    images_len: u64,
    labels: *const c_void,
    labels_len: u64,
    label_type: i32,
    n: u64,
    channels: u64,
    height: u64,
    width: u64,
    out: *mut RecycleEval,
) -> i32 {
    const F: &str = "recycle_trainer_evaluate_images";
    guard(|| {
        let t = trainer_ref(trainer, F)?;
        non_null(out, F, "out")?;
        let shape = [n, channels, height, width];
        let b = image_batch(F, images, images_len, labels, labels_len, label_type, shape)?;
        evaluate_on(F, t, &b, out)
    })
}

/// The student's loss and masked-token accuracy on the caller's token batch (arguments as
/// `recycle_trainer_step_tokens`), in evaluation mode; nothing trains. Writes `*out`.
///
/// # Safety
/// As `recycle_trainer_step_tokens`; `out` is writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recycle_trainer_evaluate_tokens(
    trainer: *mut RecycleTrainer,
    input_ids: *const c_void,
    attention_mask: *const c_void,
    labels: *const c_void,
    len: u64,
    index_type: i32,
    batch: u64,
    seq_len: u64,
    out: *mut RecycleEval,
) -> i32 {
    const F: &str = "recycle_trainer_evaluate_tokens";
    guard(|| {
        let t = trainer_ref(trainer, F)?;
        non_null(out, F, "out")?;
        let b = token_batch(
            F,
            input_ids,
            attention_mask,
            labels,
            len,
            index_type,
            batch,
            seq_len,
        )?;
        evaluate_on(F, t, &b, out)
    })
}

/// The logits of the teachers the next step would run, on the caller's images (arguments as
/// `recycle_trainer_step_images`): written to `logits`, `[teachers, rows = n, classes]` floats
/// (`logits_len` at least their product), their shape to `*shape`. Pass `logits` NULL and
/// `logits_len` 0 to learn the shape alone. A run without teachers is an error.
///
/// # Safety
/// As `recycle_trainer_step_images`; `logits` is NULL or points to `logits_len` writable
/// floats; `shape` is writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recycle_trainer_teacher_logits_images(
    trainer: *mut RecycleTrainer,
    images: *const f32,
    images_len: u64,
    labels: *const c_void,
    labels_len: u64,
    label_type: i32,
    n: u64,
    channels: u64,
    height: u64,
    width: u64,
    logits: *mut f32,
    logits_len: u64,
    shape: *mut RecycleLogitsShape,
) -> i32 {
    const F: &str = "recycle_trainer_teacher_logits_images";
    guard(|| {
        let t = trainer_ref(trainer, F)?;
        non_null(shape, F, "shape")?;
        let dims = [n, channels, height, width];
        let b = image_batch(F, images, images_len, labels, labels_len, label_type, dims)?;
        teacher_logits_on(F, t, &b, logits, logits_len, shape)
    })
}

/// The logits of the teachers the next step would run, on the caller's token batch
/// (arguments as `recycle_trainer_step_tokens`), at the labelled positions: `[teachers, rows,
/// vocab]` floats, `rows` the number of labels other than -100. Otherwise as
/// `recycle_trainer_teacher_logits_images`.
///
/// # Safety
/// As `recycle_trainer_step_tokens`; `logits` is NULL or points to `logits_len` writable
/// floats; `shape` is writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recycle_trainer_teacher_logits_tokens(
    trainer: *mut RecycleTrainer,
    input_ids: *const c_void,
    attention_mask: *const c_void,
    labels: *const c_void,
    len: u64,
    index_type: i32,
    batch: u64,
    seq_len: u64,
    logits: *mut f32,
    logits_len: u64,
    shape: *mut RecycleLogitsShape,
) -> i32 {
    const F: &str = "recycle_trainer_teacher_logits_tokens";
    guard(|| {
        let t = trainer_ref(trainer, F)?;
        non_null(shape, F, "shape")?;
        let b = token_batch(
            F,
            input_ids,
            attention_mask,
            labels,
            len,
            index_type,
            batch,
            seq_len,
        )?;
        teacher_logits_on(F, t, &b, logits, logits_len, shape)
    })
}
