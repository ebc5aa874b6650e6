//! The C ABI of Recycle, for training services that do not write Rust: a trainer built from a
//! TOML recipe and advanced N steps at a time, its metrics, checkpoints, and the fused
//! distillation loss on caller-owned buffers. `include/recycle.h` is generated from this file by
//! cbindgen and committed.
//!
//! Conventions: every function returns a status, `RECYCLE_OK` (0) on success; on failure
//! `recycle_last_error()` gives a message for the calling thread naming the argument and what
//! to do. Nothing unwinds into C: each body runs under `catch_unwind`, and a panic (a bug)
//! becomes `RECYCLE_ERROR_PANIC`. The functions are thin: the work is the `recycle` crate's.
//!
//! Threads: a trainer is driven by one thread at a time (calls on the same trainer must not
//! overlap; it may move between threads between calls); different trainers may train in
//! different threads at once. `recycle_kd_loss` may be called from any number of threads.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use recycle::distill::{kd_loss_cpu, KdLoss};
use recycle::recipe::Recipe;
use recycle::trainer::{RunOptions, Trainer, TrainerMetrics};

mod batches;
pub use batches::*;

/// Success.
pub const RECYCLE_OK: i32 = 0;
/// A pointer argument that must not be null was null.
pub const RECYCLE_ERROR_NULL_POINTER: i32 = 1;
/// An argument with a wrong value: sizes that do not fit together, an unknown flag or kind,
/// a label out of range, a string that is not UTF-8, a finished trainer.
pub const RECYCLE_ERROR_INVALID_ARGUMENT: i32 = 2;
/// The recipe is not valid TOML or not a valid recipe.
pub const RECYCLE_ERROR_RECIPE: i32 = 3;
/// The engine failed: data, checkpoint or file errors, a diverging run.
pub const RECYCLE_ERROR_ENGINE: i32 = 4;
/// An internal error (a bug in Recycle): please report the message.
pub const RECYCLE_ERROR_PANIC: i32 = 5;

/// `recycle_trainer_new` flag: continue the run from its directory's checkpoint.
pub const RECYCLE_RESUME: u32 = 1;
/// `recycle_trainer_new` flag: replace an existing run directory's results.
pub const RECYCLE_OVERWRITE: u32 = 2;

/// `RecycleLossConfig.kind`: KL(p_teacher || p_student) at the temperature, times T^2.
pub const RECYCLE_KD_KL: i32 = 0;
/// `RecycleLossConfig.kind`: mean squared error between the logits.
pub const RECYCLE_KD_MSE: i32 = 1;

/// `recycle_kd_loss` label type: `int32_t` labels.
pub const RECYCLE_LABELS_I32: i32 = 0;
/// `recycle_kd_loss` label type: `int64_t` labels.
pub const RECYCLE_LABELS_I64: i32 = 1;

/// A trainer (opaque): create with `recycle_trainer_new`, release with `recycle_trainer_free`.
pub struct RecycleTrainer {
    state: State,
}

/// Where a handle stands. `recycle_trainer_finish` consumes the trainer whether it succeeds or
/// not, so both outcomes keep the metrics of the last step for `recycle_trainer_metrics`.
enum State {
    Running(Box<Trainer>),
    Finished(TrainerMetrics),
    /// The finish failed (a full disk, an unwritable run directory): the message says why.
    FinishFailed(TrainerMetrics, String),
}

/// Where a run stands. Values that do not exist yet are NaN: the losses and learning rate
/// before the first step of this trainer, `kd` on a step that did not distill, `last_eval`
/// before this trainer's first evaluation.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RecycleMetrics {
    /// Steps done (including those before a resume).
    pub step: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// Training examples seen.
    pub samples: u64,
    /// Teacher forwards run.
    pub teacher_forwards: u64,
    /// Steps skipped because a value was NaN or infinite (`train.on_nonfinite = "skip"`;
    /// always 0 under the default `"stop"`), including those before a resume. A skipped step
    /// counts in `step` but changed no weight.
    pub skipped_steps: u64,
    /// Seconds spent in training steps.
    pub train_seconds: f64,
    /// Seconds since the run started, across resumes.
    pub wall_seconds: f64,
    /// Learning rate of the last step.
    pub lr: f32,
    /// Cross-entropy of the last step.
    pub ce: f32,
    /// Distillation term of the last step (before the weight).
    pub kd: f32,
    /// Total loss of the last step.
    pub loss: f32,
    /// Last evaluation metric (accuracy, or masked-token accuracy).
    pub last_eval: f32,
    /// 1 once every step is done, else 0.
    pub done: i32,
}

/// The fused loss: `total = ce + weight * kd`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RecycleLossConfig {
    /// `RECYCLE_KD_KL` or `RECYCLE_KD_MSE`.
    pub kind: i32,
    /// Softmax temperature T of KL (ignored by MSE); positive.
    pub temperature: f32,
    /// λ, the weight of the distillation term; zero or positive.
    pub weight: f32,
    /// Label of rows without a CE target (PyTorch's default: -100).
    pub ignore_index: i32,
}

/// What `recycle_kd_loss` computed.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RecycleLoss {
    /// Mean cross-entropy over the rows with a label.
    pub ce: f32,
    /// The distillation term before the weight (0 without teachers).
    pub kd: f32,
    /// `ce + weight * kd`.
    pub total: f32,
    /// Rows that counted for CE and for the distillation term.
    pub ce_rows: usize,
    pub kd_rows: usize,
}

struct Failure {
    code: i32,
    msg: String,
}

fn fail<T>(code: i32, msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        code,
        msg: msg.into(),
    })
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "?")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `body`, turning its failure or panic into a status and the thread's last error.
fn guard(body: impl FnOnce() -> Result<(), Failure>) -> i32 {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => RECYCLE_OK,
        Ok(Err(f)) => {
            set_last_error(&f.msg);
            f.code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            set_last_error(&format!(
                "internal error in Recycle (a bug, please report it): {what}"
            ));
            RECYCLE_ERROR_PANIC
        }
    }
}

fn non_null<T>(p: *const T, func: &str, name: &str) -> Result<(), Failure> {
    if p.is_null() {
        return fail(
            RECYCLE_ERROR_NULL_POINTER,
            format!("{func}: `{name}` is NULL; pass a valid pointer"),
        );
    }
    if !p.is_aligned() {
        return fail(
            RECYCLE_ERROR_INVALID_ARGUMENT,
            format!("{func}: `{name}` is not aligned for its element type"),
        );
    }
    Ok(())
}

/// # Safety
/// `p` is null or a NUL-terminated string that outlives `'a`.
unsafe fn c_str<'a>(p: *const c_char, func: &str, name: &str) -> Result<&'a str, Failure> {
    non_null(p, func, name)?;
    CStr::from_ptr(p).to_str().map_err(|e| Failure {
        code: RECYCLE_ERROR_INVALID_ARGUMENT,
        msg: format!("{func}: `{name}` is not UTF-8 ({e})"),
    })
}

fn engine(func: &str, e: recycle::engine::Error) -> Failure {
    Failure {
        code: RECYCLE_ERROR_ENGINE,
        msg: format!("{func}: {e}"),
    }
}

/// # Safety
/// `t` is null or a pointer from `recycle_trainer_new` not yet freed, not used by another
/// thread during the call.
unsafe fn trainer_mut<'a>(t: *mut RecycleTrainer, func: &str) -> Result<&'a mut Trainer, Failure> {
    non_null(t, func, "trainer")?;
    match &mut (*t).state {
        State::Running(tr) => Ok(tr),
        State::Finished(_) => fail(
            RECYCLE_ERROR_INVALID_ARGUMENT,
            format!("{func}: the trainer is finished; create a new one to train again"),
        ),
        State::FinishFailed(_, why) => fail(
            RECYCLE_ERROR_INVALID_ARGUMENT,
            format!(
                "{func}: this trainer's recycle_trainer_finish failed ({why}), so it can no \
                 longer train, save or finish; free it, fix the cause, and create a trainer \
                 with RECYCLE_RESUME to continue from the run's last checkpoint"
            ),
        ),
    }
}

/// # Safety
/// As [`trainer_mut`]; the call only reads the trainer.
unsafe fn trainer_ref<'a>(t: *mut RecycleTrainer, func: &str) -> Result<&'a Trainer, Failure> {
    trainer_mut(t, func).map(|t| &*t)
}

fn metrics_to_c(m: &TrainerMetrics) -> RecycleMetrics {
    let nan = |v: Option<f32>| v.unwrap_or(f32::NAN);
    RecycleMetrics {
        step: m.step,
        total_steps: m.total_steps,
        samples: m.samples,
        teacher_forwards: m.teacher_forwards,
        skipped_steps: m.skipped_steps,
        train_seconds: m.train_seconds,
        wall_seconds: m.wall_seconds,
        lr: nan(m.lr),
        ce: nan(m.ce),
        kd: nan(m.kd),
        loss: nan(m.loss),
        last_eval: nan(m.last_eval),
        done: (m.step >= m.total_steps) as i32,
    }
}

/// The message of the calling thread's last failed call (empty when none failed yet). The
/// pointer stays valid until the next failing call on this thread; copy it to keep it. A
/// successful call leaves the message as it was. Never NULL.
#[no_mangle]
pub extern "C" fn recycle_last_error() -> *const c_char {
    catch_unwind(|| LAST_ERROR.with(|e| e.borrow().as_ptr())).unwrap_or(c"".as_ptr())
}

/// Creates a trainer from a recipe (TOML text, as for `recycle train`) and writes it to
/// `*out`. `flags`: 0, or `RECYCLE_RESUME` / `RECYCLE_OVERWRITE` or'ed. Loads the data, the
/// student and the teachers; the run directory is `<out_dir>/<name>`.
///
/// # Safety
/// `recipe_toml` is a NUL-terminated string; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn recycle_trainer_new(
    recipe_toml: *const c_char,
    flags: u32,
    out: *mut *mut RecycleTrainer,
) -> i32 {
    const F: &str = "recycle_trainer_new";
    guard(|| {
        non_null(out, F, "out")?;
        *out = std::ptr::null_mut();
        let text = c_str(recipe_toml, F, "recipe_toml")?;
        if flags & !(RECYCLE_RESUME | RECYCLE_OVERWRITE) != 0 {
            return fail(
                RECYCLE_ERROR_INVALID_ARGUMENT,
                format!("{F}: unknown bits in flags {flags:#x}; use RECYCLE_RESUME and/or RECYCLE_OVERWRITE"),
            );
        }
        let recipe = Recipe::from_toml(text).map_err(|e| Failure {
            code: RECYCLE_ERROR_RECIPE,
            msg: format!("{F}: {e}"),
        })?;
        let opts = RunOptions {
            resume: flags & RECYCLE_RESUME != 0,
            overwrite: flags & RECYCLE_OVERWRITE != 0,
            ..RunOptions::default()
        };
        let trainer = Trainer::new(&recipe, &opts).map_err(|e| engine(F, e))?;
        *out = Box::into_raw(Box::new(RecycleTrainer {
            state: State::Running(Box::new(trainer)),
        }));
        Ok(())
    })
}

/// Runs up to `n` training steps (fewer when the run ends first); writes how many ran to
/// `*steps_run` unless it is NULL. Each step is logged; evaluations and checkpoints run when
/// the recipe has them due.
///
/// # Safety
/// `trainer` comes from `recycle_trainer_new` and is not used by another thread during the
/// call; `steps_run` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn recycle_trainer_run_steps(
    trainer: *mut RecycleTrainer,
    n: u64,
    steps_run: *mut u64,
) -> i32 {
    const F: &str = "recycle_trainer_run_steps";
    guard(|| {
        let t = trainer_mut(trainer, F)?;
        if !steps_run.is_null() {
            non_null(steps_run, F, "steps_run")?;
            *steps_run = 0;
        }
        let before = t.current_step();
        let result = t.run_steps(n);
        if !steps_run.is_null() {
            *steps_run = t.current_step() - before;
        }
        result.map(|_| ()).map_err(|e| engine(F, e))
    })
}

/// Writes the trainer's metrics to `*out`.
///
/// # Safety
/// `trainer` comes from `recycle_trainer_new`; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn recycle_trainer_metrics(
    trainer: *const RecycleTrainer,
    out: *mut RecycleMetrics,
) -> i32 {
    const F: &str = "recycle_trainer_metrics";
    guard(|| {
        non_null(trainer, F, "trainer")?;
        non_null(out, F, "out")?;
        *out = match &(*trainer).state {
            State::Running(tr) => metrics_to_c(&tr.metrics()),
            State::Finished(m) | State::FinishFailed(m, _) => metrics_to_c(m),
        };
        Ok(())
    })
}

/// Writes a resumable checkpoint (weights, optimizer state, step) to `path`, atomically.
/// (The run's own `checkpoint.safetensors`, which `RECYCLE_RESUME` reads, is written as the
/// recipe says.)
///
/// # Safety
/// `trainer` comes from `recycle_trainer_new`; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn recycle_trainer_save_checkpoint(
    trainer: *mut RecycleTrainer,
    path: *const c_char,
) -> i32 {
    const F: &str = "recycle_trainer_save_checkpoint";
    guard(|| {
        let t = trainer_mut(trainer, F)?;
        let path = c_str(path, F, "path")?;
        if path.is_empty() {
            return fail(
                RECYCLE_ERROR_INVALID_ARGUMENT,
                format!("{F}: `path` is empty; pass a file path"),
            );
        }
        t.save_checkpoint(Path::new(path)).map_err(|e| engine(F, e))
    })
}

/// Finishes a run whose steps are all done: the final evaluation, `final.safetensors` and
/// `summary.json` in the run directory; writes the final evaluation metric to `*final_eval`
/// unless it is NULL. Afterwards, whether it succeeded or not, only `recycle_trainer_metrics`
/// (the metrics of the last step) and `recycle_trainer_free` accept the trainer; the other
/// calls return `RECYCLE_ERROR_INVALID_ARGUMENT` with a message saying why (after a failed
/// finish: its reason, and to resume the run from its last checkpoint).
///
/// # Safety
/// `trainer` comes from `recycle_trainer_new`; `final_eval` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn recycle_trainer_finish(
    trainer: *mut RecycleTrainer,
    final_eval: *mut f32,
) -> i32 {
    const F: &str = "recycle_trainer_finish";
    guard(|| {
        let t = trainer_mut(trainer, F)?;
        if !final_eval.is_null() {
            non_null(final_eval, F, "final_eval")?;
        }
        if !t.is_done() {
            return fail(
                RECYCLE_ERROR_INVALID_ARGUMENT,
                format!(
                    "{F}: the run has done {} of its {} steps; run the rest first \
                     (recycle_trainer_run_steps)",
                    t.current_step(),
                    t.total_steps()
                ),
            );
        }
        let metrics = t.metrics();
        // The trainer is consumed either way; the handle keeps the outcome (with the metrics
        // and, on failure, the reason) so that every later call answers with a status.
        let placeholder = State::Finished(metrics);
        let State::Running(inner) = std::mem::replace(&mut (*trainer).state, placeholder) else {
            return fail(
                RECYCLE_ERROR_INVALID_ARGUMENT,
                format!("{F}: the trainer is not running"),
            );
        };
        match inner.finish() {
            Ok(summary) => {
                if !final_eval.is_null() {
                    *final_eval = summary.final_eval;
                }
                Ok(())
            }
            Err(e) => {
                (*trainer).state = State::FinishFailed(metrics, e.to_string());
                Err(engine(F, e))
            }
        }
    })
}

/// Releases a trainer (finished or not; an unfinished run can be resumed from its last
/// checkpoint). NULL is accepted and does nothing.
///
/// # Safety
/// `trainer` is NULL or comes from `recycle_trainer_new` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn recycle_trainer_free(trainer: *mut RecycleTrainer) -> i32 {
    guard(|| {
        if !trainer.is_null() {
            drop(Box::from_raw(trainer));
        }
        Ok(())
    })
}

/// The fused distillation loss on caller-owned buffers, `total = ce + weight * kd`, and its
/// gradient with respect to the student logits.
///
/// - `student`: `[rows, classes]` f32 logits, `student_len = rows * classes` values;
/// - `teachers`: `num_teachers` arrays `[rows, classes]` one after the other
///   (`teachers_len = num_teachers * student_len`); their mean is the target. NULL with
///   `num_teachers = 0` gives the cross-entropy alone;
/// - `labels`: `labels_len = rows` labels, `int32_t` or `int64_t` as `label_type` says;
///   `config->ignore_index` marks rows without a CE target;
/// - `mask`: NULL, or `mask_len = rows` bytes, nonzero where the row counts (in both terms);
/// - `grad`: NULL, or `grad_len = student_len` floats that receive d total / d student;
/// - `out`: receives the losses.
///
/// # Safety
/// Each non-NULL pointer points to at least as many readable (for `grad`, writable) elements
/// as its length says; `grad` does not overlap the inputs.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recycle_kd_loss(
    config: *const RecycleLossConfig,
    student: *const f32,
    student_len: usize,
    classes: usize,
    teachers: *const f32,
    teachers_len: usize,
    num_teachers: usize,
    labels: *const c_void,
    labels_len: usize,
    label_type: i32,
    mask: *const u8,
    mask_len: usize,
    grad: *mut f32,
    grad_len: usize,
    out: *mut RecycleLoss,
) -> i32 {
    const F: &str = "recycle_kd_loss";
    let invalid = |msg: String| fail::<()>(RECYCLE_ERROR_INVALID_ARGUMENT, format!("{F}: {msg}"));
    guard(|| {
        non_null(config, F, "config")?;
        non_null(out, F, "out")?;
        non_null(student, F, "student")?;
        let c = *config;
        let cfg = match c.kind {
            RECYCLE_KD_KL => KdLoss::kl(c.temperature, c.weight),
            RECYCLE_KD_MSE => KdLoss::mse(c.weight),
            k => {
                return invalid(format!(
                    "config->kind {k} is unknown; use RECYCLE_KD_KL ({RECYCLE_KD_KL}) or \
                     RECYCLE_KD_MSE ({RECYCLE_KD_MSE})"
                ))
            }
        };
        let cfg = KdLoss {
            ignore_index: c.ignore_index,
            ..cfg
        };
        let student = std::slice::from_raw_parts(student, student_len);
        let teachers: Vec<&[f32]> = if num_teachers == 0 {
            if teachers_len != 0 {
                return invalid(format!(
                    "teachers_len is {teachers_len} with num_teachers 0; pass 0 for both"
                ));
            }
            Vec::new()
        } else {
            non_null(teachers, F, "teachers")?;
            if Some(teachers_len) != num_teachers.checked_mul(student_len) {
                return invalid(format!(
                    "teachers_len {teachers_len} is not num_teachers {num_teachers} x \
                     student_len {student_len}: pass the teachers' logits one [rows, classes] \
                     array after the other"
                ));
            }
            let all = std::slice::from_raw_parts(teachers, teachers_len);
            all.chunks(student_len.max(1)).collect()
        };
        let labels: Vec<i32> = match label_type {
            RECYCLE_LABELS_I32 => {
                non_null(labels as *const i32, F, "labels")?;
                std::slice::from_raw_parts(labels as *const i32, labels_len).to_vec()
            }
            RECYCLE_LABELS_I64 => {
                non_null(labels as *const i64, F, "labels")?;
                let wide = std::slice::from_raw_parts(labels as *const i64, labels_len);
                let mut narrow = Vec::with_capacity(labels_len);
                for (r, &y) in wide.iter().enumerate() {
                    match i32::try_from(y) {
                        Ok(v) => narrow.push(v),
                        Err(_) => {
                            return fail(
                                RECYCLE_ERROR_INVALID_ARGUMENT,
                                format!("{F}: label {y} in row {r} is outside [0, {classes})"),
                            )
                        }
                    }
                }
                narrow
            }
            t => {
                return invalid(format!(
                    "label_type {t} is unknown; use RECYCLE_LABELS_I32 ({RECYCLE_LABELS_I32}) \
                     or RECYCLE_LABELS_I64 ({RECYCLE_LABELS_I64})"
                ))
            }
        };
        let mask: Option<Vec<bool>> = if mask.is_null() {
            None
        } else {
            non_null(mask, F, "mask")?;
            Some(
                std::slice::from_raw_parts(mask, mask_len)
                    .iter()
                    .map(|&m| m != 0)
                    .collect(),
            )
        };
        if !grad.is_null() {
            non_null(grad, F, "grad")?;
            if grad_len != student_len {
                return invalid(format!(
                    "grad_len {grad_len} is not student_len {student_len}: the gradient has \
                     one value per student logit"
                ));
            }
        }
        let r = kd_loss_cpu(&cfg, student, &teachers, &labels, mask.as_deref(), classes).map_err(
            |e| Failure {
                code: RECYCLE_ERROR_INVALID_ARGUMENT,
                msg: format!("{F}: {e}"),
            },
        )?;
        if !grad.is_null() {
            std::slice::from_raw_parts_mut(grad, grad_len).copy_from_slice(&r.grad);
        }
        *out = RecycleLoss {
            ce: r.ce,
            kd: r.kd,
            total: r.total,
            ce_rows: r.ce_rows,
            kd_rows: r.kd_rows,
        };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        unsafe { CStr::from_ptr(recycle_last_error()) }
            .to_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let status = guard(|| panic!("boom in the engine"));
        assert_eq!(status, RECYCLE_ERROR_PANIC);
        let msg = last_error();
        assert!(
            msg.contains("boom in the engine") && msg.contains("a bug"),
            "{msg}"
        );
    }

    /// The recipe's `device` flows through `recycle_trainer_new`: a misspelt one is a recipe
    /// error naming the value; `cuda:0` where no GPU can be used is an engine error with the
    /// engine's account of what is missing, and no run directory is left behind.
    #[test]
    fn a_recipe_device_flows_through_trainer_new() {
        let dir = std::env::temp_dir().join(format!("recycle-c-device-{}", std::process::id()));
        let recipe = |device: &str| {
            CString::new(format!(
                "name = \"gpu\"\nout_dir = \"{}\"\ndevice = \"{device}\"\n\
                 [model]\nkind = \"resnet\"\nwidth = 0.0625\n\
                 [data]\ndataset = \"fashion-mnist\"\ntrain_limit = 64\neval_limit = 32\n\
                 [train]\nbatch_size = 32\nepochs = 1.0\n\
                 [optimizer]\nkind = \"sgdw\"\nlr = 0.1\n",
                dir.display()
            ))
            .unwrap()
        };
        let mut t: *mut RecycleTrainer = std::ptr::null_mut();
        let status = unsafe { recycle_trainer_new(recipe("gpu0").as_ptr(), 0, &mut t) };
        assert_eq!(status, RECYCLE_ERROR_RECIPE);
        let msg = last_error();
        assert!(msg.contains("`gpu0`") && msg.contains("cuda:N"), "{msg}");
        assert!(t.is_null());

        let probe = recycle::engine::cuda::device_info(0);
        if probe.is_ok() {
            return; // A usable GPU: nothing here fails.
        }
        let status = unsafe { recycle_trainer_new(recipe("cuda:0").as_ptr(), 0, &mut t) };
        assert_eq!(status, RECYCLE_ERROR_ENGINE);
        let msg = last_error();
        assert!(
            msg.starts_with("recycle_trainer_new: ") && msg.contains("device = \"cuda:0\""),
            "{msg}"
        );
        assert!(
            ["no CUDA backend", "no NVIDIA driver found", "sees no GPU"]
                .iter()
                .any(|m| msg.contains(m)),
            "{msg}"
        );
        assert!(t.is_null());
        assert!(!dir.join("gpu").exists(), "{}", dir.display());
    }

    #[test]
    fn the_last_error_is_per_thread_and_kept_across_successes() {
        assert_eq!(
            guard(|| fail(RECYCLE_ERROR_ENGINE, "first")),
            RECYCLE_ERROR_ENGINE
        );
        assert_eq!(guard(|| Ok(())), RECYCLE_OK);
        assert_eq!(last_error(), "first");
        std::thread::spawn(|| assert_eq!(last_error(), ""))
            .join()
            .unwrap();
    }
}
