//! [`Trainer`]: one run that advances a step at a time, so that a service (the C ABI) can drive
//! it, read its metrics and checkpoint it between steps. [`super::run`] is a loop over it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use recycle_engine::optim::{LrSchedule, Optimizer};
use recycle_engine::{checkpoint, DType, Device, Error, Result, Tensor};
use serde::Serialize;

use super::lock::RunLock;
use super::ranks::{self, Shard};
use super::resume::{
    check_allocatable, check_same_recipe, checkpoint_step, load_checkpoint, remove_temp_files,
};
use super::step::{train_step_synced, RankSync};
use super::teacher_cache::PoolCache;
use super::Teachers;
use super::{
    architecture, eval_steps, evaluate, evaluate_on, image_batch, initial_student, load_teachers,
    majority_floor, make_optimizer, make_schedule, mlm_batch, open_device, progress_bar,
    total_steps, Batch, EvalSplit, Model, RunOptions, StepGuard, StepOutput, TaskData, TextTrain,
    CHECKPOINT_FILE, FINAL_FILE, LOG_FILE, RECIPE_FILE, SUMMARY_FILE,
};
use crate::data::text_stream::TextStreamLoader;
use crate::data::{self, Loader, LoaderConfig};
use crate::distill::cache::CacheStats;
use crate::distill::{KdLoss, KdSchedule, TeacherPool};
use crate::distributed::buckets::DEFAULT_BUCKET_BYTES;
use crate::distributed::world::{env_seconds, env_usize};
use crate::distributed::{GradSync, World};
use crate::experiments::runlog::{write_atomic, RunLogRecord, RunLogWriter, RunSummary};
use crate::experiments::CacheReads;
use crate::recipe::{Activations, Recipe};

use super::caller::{check_batch, BatchEval, StepReport};
use super::count_correct;
use crate::distill::kd_loss_cpu;
use recycle_engine::Tape;

pub(super) type BatchIter = Box<dyn Iterator<Item = Result<Batch>> + Send>;
/// Batches of this rank's shard, each with its weight ([`ranks::shard_images`]).
type ShardIter = Box<dyn Iterator<Item = Result<(Batch, f32)>> + Send>;

/// Steps between checks that every rank holds the same weights (`RECYCLE_CHECK_EVERY`; every
/// step in debug builds). Each costs a hash of the weights and an all-gather of one number.
const CHECK_EVERY: usize = 100;

/// Where a run stands: what a checkpoint records besides the weights and optimizer state
/// (`Progress::default()`: a fresh run, at step 0).
#[derive(Default)]
pub(super) struct Progress {
    pub(super) step: u64,
    pub(super) samples: u64,
    pub(super) train_seconds: f64,
    pub(super) teacher_forwards: u64,
    /// Host seconds in the teachers' forwards ([`super::StepOutput::teacher_seconds`]).
    pub(super) teacher_seconds: f64,
    /// What the teacher cache replayed instead of teacher forwards.
    pub(super) cache_reads: CacheReads,
    /// Steps skipped under `train.on_nonfinite = "skip"`.
    pub(super) skipped_steps: u64,
    /// Steps fed by the caller ([`Trainer::step_batch`]) and the samples they brought.
    pub(super) caller_steps: u64,
    pub(super) caller_samples: u64,
}

/// What a [`Trainer`] reports between steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TrainerMetrics {
    /// Steps done (including those before a resume).
    pub step: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// Training examples seen.
    pub samples: u64,
    /// Seconds spent in training steps (evaluations and checkpoints excluded).
    pub train_seconds: f64,
    /// Seconds since the run started, across resumes (what `log.jsonl` records).
    pub wall_seconds: f64,
    /// Teacher forwards run.
    pub teacher_forwards: u64,
    /// Steps skipped under `train.on_nonfinite = "skip"` (including those before a resume).
    pub skipped_steps: u64,
    /// Learning rate, cross-entropy, distillation term (when the step distilled) and total loss
    /// of the last step this trainer ran; `None` before its first step.
    pub lr: Option<f32>,
    pub ce: Option<f32>,
    pub kd: Option<f32>,
    pub loss: Option<f32>,
    /// The last evaluation this trainer ran; `None` before its first one.
    pub last_eval: Option<f32>,
}

/// One run of a recipe, advanced by [`Trainer::step`]. Each step appends a record to
/// `<out_dir>/<name>/log.jsonl`; evaluations run at the steps the recipe spreads over the run,
/// each followed by an atomic checkpoint (also every `train.checkpoint_every` steps);
/// [`Trainer::finish`] writes `final.safetensors` and `summary.json`.
pub struct Trainer {
    recipe: Recipe,
    dir: PathBuf,
    device: Device,
    device_name: String,
    data: TaskData,
    student: Model,
    optimizer: Box<dyn Optimizer + Send>,
    schedule: LrSchedule,
    loss: KdLoss,
    kd_schedule: KdSchedule,
    pool: Option<TeacherPool<Model>>,
    /// The teachers' cache (`[distill] cache`): read at the steps it holds, recorded at others.
    cache: Option<PoolCache>,
    state: Progress,
    /// The run's log; only rank 0 of a data-parallel run writes one.
    log: Option<RunLogWriter>,
    evals: Vec<u64>,
    total: u64,
    started: Instant,
    wall_offset: f64,
    last_eval: Option<f32>,
    /// The validation metric of the last evaluation (`None` without a validation split).
    last_validation: Option<f32>,
    last_step: Option<(f32, StepOutput)>,
    /// The data set's batches and the step the next one is for: rebuilt (from `(seed, step)`)
    /// when caller-fed steps have moved the run past it, so the two kinds of step interleave.
    batches: Option<(u64, ShardIter)>,
    progress: Option<indicatif::ProgressBar>,
    /// Held for the trainer's life: one process per run directory (rank 0's, in a
    /// data-parallel run: the other ranks never write there).
    _lock: Option<RunLock>,
    /// The ranks of a data-parallel run (one process: none).
    world: World,
    shard: Shard,
    /// The gradient reduction across the ranks.
    sync: Option<GradSync>,
    check_every: u64,
}

impl Trainer {
    /// Prepares a run. Everything that can fail on the recipe's values (the device, the data,
    /// the model and its size, the optimizer, the schedule, the teachers) is checked before the
    /// run directory is touched; then the directory is created and locked ([`RunLock`]: a
    /// second process training into it is refused), temporary files of killed writes are
    /// removed, and the existing run is checked: it needs `opts.resume` (which refuses a recipe
    /// that differs from the recorded one, and a checkpoint whose step lies beyond the run's
    /// end) or `opts.overwrite` (which removes the old run's checkpoint and results). On a GPU
    /// the student's parameters, gradients and buffers, the optimizer state and the teachers
    /// live there; the loader builds each batch on the CPU and the step uploads it.
    /// `opts.stop_after` and `opts.reuse_finished` are for [`super::run`]; this ignores them.
    pub fn new(recipe: &Recipe, opts: &RunOptions) -> Result<Trainer> {
        Trainer::new_in(recipe, opts, World::current())
    }

    /// [`Trainer::new`] as one rank of `world` (`docs/distributed.md`): every rank loads the
    /// data (rank 0 first: it may write the tokenizer the others read), builds the student,
    /// optimizer and teachers; rank 0 alone touches the run directory, and hands its state (a
    /// fresh start or the checkpoint it resumed from) to the others.
    pub fn new_in(recipe: &Recipe, opts: &RunOptions, world: World) -> Result<Trainer> {
        recipe.validate()?;
        let (world, recipe) = meet_gpu_ranks(recipe, world)?;
        let recipe = &recipe;
        let (rank, ranks) = (world.rank(), world.size());
        let root = rank == 0;
        if ranks > 1 {
            check_distributable(recipe, ranks)?;
        }
        let (device, device_name) = open_device(recipe)?;
        let dir = recipe.out_dir.join(&recipe.name);

        let group = world.group.clone();
        let data = match &group {
            Some(g) if !root => {
                g.barrier()?;
                TaskData::load(recipe)?
            }
            Some(g) => {
                let data = TaskData::load(recipe);
                g.barrier()?;
                data?
            }
            None => TaskData::load(recipe)?,
        };
        let arch = architecture(recipe, &data)?;
        let total = total_steps(recipe, data.train_len())?;
        check_allocatable(recipe, &arch)?;
        let student = initial_student(recipe, &arch)?.to_device(device)?;
        let num_params = student.params()?.len();
        let mut optimizer = make_optimizer(recipe, num_params)?;
        let schedule = make_schedule(recipe, total)?;
        let (loss, kd_schedule, pool) = match &recipe.distill {
            Some(d) => {
                // Every rank runs the same draw, unless each draws its own.
                let seed = ranks::draw_seed(recipe.seed, rank, d.draws_per_rank());
                (
                    d.loss()?,
                    d.schedule(),
                    Some(TeacherPool::new(
                        load_teachers(
                            &d.teachers,
                            &arch,
                            device,
                            teacher_activations(device, recipe.activations),
                        )?,
                        d.strategy()?,
                        seed,
                    )?),
                )
            }
            None => (KdLoss::kl(1.0, 0.0), KdSchedule::default(), None),
        };
        let cache = PoolCache::open(recipe, &arch, device, None, None)?;

        let fresh = Progress::default();
        let (lock, mut state, log) = if root {
            let (lock, state, log) =
                prepare_run_dir(recipe, opts, &dir, &student, optimizer.as_mut(), total)?;
            (Some(lock), state, Some(log))
        } else {
            (None, fresh, None)
        };
        let sync = match &group {
            Some(g) => {
                ranks::broadcast_state(g.as_ref(), &student, optimizer.as_mut(), &mut state)?;
                let params = student.params()?;
                let bucket_kib = env_usize("RECYCLE_BUCKET_KIB", DEFAULT_BUCKET_BYTES >> 10)?;
                let overlap = env_usize("RECYCLE_GRAD_OVERLAP", 1)? != 0;
                let timeout = env_seconds("RECYCLE_COLLECTIVE_TIMEOUT", 600.0)?;
                Some(GradSync::new(
                    g.grad_reducer(timeout)?,
                    params.entries(),
                    params.len(),
                    (bucket_kib << 10) / 4,
                    overlap,
                ))
            }
            None => None,
        };
        let check_every = match cfg!(debug_assertions) {
            true => 1,
            false => env_usize("RECYCLE_CHECK_EVERY", CHECK_EVERY)?.max(1) as u64,
        };
        let evals = eval_steps(total, recipe.train.evals);
        let batch = recipe.train.batch_size;
        let wall_offset = log
            .as_ref()
            .and_then(|l| l.last())
            .map(|r| r.wall_seconds)
            .unwrap_or(0.0);
        let progress = progress_bar(opts.progress && root, total, state.step, &recipe.name);
        let shard = Shard { rank, size: ranks };
        let batches = Some((
            state.step,
            shard_batches(&data, batch, recipe.seed, state.step, shard)?,
        ));
        Ok(Trainer {
            recipe: recipe.clone(),
            dir,
            device,
            device_name,
            data,
            student,
            optimizer,
            schedule,
            loss,
            kd_schedule,
            pool,
            cache,
            state,
            log,
            evals,
            total,
            started: Instant::now(),
            wall_offset,
            last_eval: None,
            last_validation: None,
            last_step: None,
            batches,
            progress,
            _lock: lock,
            world,
            shard,
            sync,
            check_every,
        })
    }

    /// The ranks this trainer runs with.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Whether this process writes the run's files (one process, or rank 0).
    fn writes(&self) -> bool {
        self.world.rank() == 0
    }

    /// The run directory, `<out_dir>/<name>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Steps done so far.
    pub fn current_step(&self) -> u64 {
        self.state.step
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> u64 {
        self.total
    }

    /// Whether every step of the run is done ([`Trainer::finish`] is what remains).
    pub fn is_done(&self) -> bool {
        self.state.step >= self.total
    }

    /// The device the run trains on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The device's name as the summary records it: `cpu`, or `cuda:0 NVIDIA H200`.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// What the teacher cache did so far (`None` without `[distill] cache`).
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(PoolCache::stats)
    }

    /// The student being trained.
    pub fn model(&self) -> &Model {
        &self.student
    }

    pub fn metrics(&self) -> TrainerMetrics {
        TrainerMetrics {
            step: self.state.step,
            total_steps: self.total,
            samples: self.state.samples,
            train_seconds: self.state.train_seconds,
            wall_seconds: self.wall_seconds(),
            teacher_forwards: self.state.teacher_forwards,
            skipped_steps: self.state.skipped_steps,
            lr: self.last_step.map(|(lr, _)| lr),
            ce: self.last_step.map(|(_, o)| o.ce),
            kd: self.last_step.and_then(|(_, o)| o.kd),
            loss: self.last_step.map(|(_, o)| o.loss),
            last_eval: self.last_eval,
        }
    }

    fn wall_seconds(&self) -> f64 {
        self.wall_offset + self.started.elapsed().as_secs_f64()
    }

    /// Runs the next step: the student's (and, when the schedule distills at this step, the
    /// selected teachers') forward, the fused loss, backward and the optimizer update; then the
    /// log record, and the evaluation and checkpoint when one is due. A non-finite loss is an
    /// error naming the step and the last good checkpoint.
    pub fn step(&mut self) -> Result<StepOutput> {
        self.check_not_done()?;
        let (b, weight) = self.next_data_batch()?;
        Ok(self.run_step(&b, false, weight)?.output)
    }

    /// Runs the next step on the caller's `batch` (built with [`Batch::images`] or
    /// [`Batch::mlm`], or by hand): the same step as [`Trainer::step`] — the learning rate, the
    /// distillation schedule and teachers, the guards, dropout and teacher sampling are those
    /// of this step's index — then the log record, and the evaluation (on the recipe's
    /// evaluation splits) and checkpoint when one is due. Caller-fed and data-set steps
    /// interleave freely, and a run resumed from a checkpoint and fed the same batches reaches
    /// the same weights bit for bit (on the CPU). The batch is checked against the student
    /// first ([`check_batch`]); a batch of any size counts its own samples.
    pub fn step_batch(&mut self, batch: &Batch) -> Result<StepReport> {
        self.check_not_done()?;
        if self.world.is_distributed() {
            return Err(Error::invalid(
                "Trainer::step_batch",
                "a data-parallel run trains on its data set's shards; a caller's batch would \
                 be one rank's alone: feed batches to a one-process run"
                    .to_string(),
            ));
        }
        check_batch(&self.student, batch).map_err(|e| {
            Error::invalid("Trainer::step_batch", format!("{e}; nothing was trained"))
        })?;
        self.run_step(batch, true, 1.0)
    }

    /// The student's loss (mean cross-entropy) and correct rows on a caller batch, in
    /// evaluation mode (no dropout, BatchNorm's running statistics); nothing changes.
    pub fn evaluate_batch(&self, batch: &Batch) -> Result<BatchEval> {
        check_batch(&self.student, batch)?;
        let logits =
            self.student
                .logits(&Tape::inference(), &batch.to_device(self.device)?, false, 0)?;
        let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
        let logits = logits.tensor().to_vec_f32()?;
        let labels = batch.labels().to_vec::<i32>()?;
        let ce = kd_loss_cpu(&KdLoss::kl(1.0, 0.0), &logits, &[], &labels, None, classes)?;
        Ok(BatchEval {
            loss: ce.ce,
            correct: count_correct(&logits, classes, &labels),
            rows,
        })
    }

    /// The logits of the teachers the next step would run (the pool's selection for this
    /// step index), one `[rows, classes]` f32 tensor each on the CPU: the targets whose mean
    /// the distillation term compares the student with. An error for a run without teachers.
    /// The step counter does not move (the forwards are not counted as training's).
    pub fn teacher_logits(&self, batch: &Batch) -> Result<Vec<Tensor>> {
        let pool = self.pool.as_ref().ok_or_else(|| {
            Error::invalid(
                "Trainer::teacher_logits",
                format!(
                    "run `{}` has no teachers: add a [distill] section with teachers",
                    self.recipe.name
                ),
            )
        })?;
        check_batch(&self.student, batch)?;
        let on_device = batch.to_device(self.device)?;
        pool.logits(self.state.step, |t| {
            let l = t.logits(&Tape::inference(), &on_device, false, 0)?;
            let (rows, classes) = (l.shape()[0], l.shape()[1]);
            Tensor::f32(l.tensor().to_vec_f32()?, &[rows, classes])
        })
    }

    fn check_not_done(&self) -> Result<()> {
        if self.is_done() {
            return Err(Error::invalid(
                "train",
                format!(
                    "run `{}` has done all its {} steps: finish it (or train a new run)",
                    self.recipe.name, self.total
                ),
            ));
        }
        Ok(())
    }

    /// The data set's batch for the current step.
    fn next_data_batch(&mut self) -> Result<(Batch, f32)> {
        let step = self.state.step;
        if self.batches.as_ref().map(|(at, _)| *at) != Some(step) {
            let (batch, seed) = (self.recipe.train.batch_size, self.recipe.seed);
            self.batches = Some((
                step,
                shard_batches(&self.data, batch, seed, step, self.shard)?,
            ));
        }
        let Some((at, it)) = self.batches.as_mut() else {
            return Err(Error::invalid("train", "no data loader".to_string()));
        };
        *at += 1;
        it.next()
            .ok_or_else(|| Error::invalid("train", "the data loader ended early".to_string()))?
    }

    /// One step on `b`, whichever fed it.
    fn run_step(&mut self, b: &Batch, fed_by_caller: bool, weight: f32) -> Result<StepReport> {
        let step = self.state.step;
        let lr = self.schedule.lr_at(step);
        let distill = self
            .pool
            .as_ref()
            .filter(|_| self.kd_schedule.is_active(step, self.total));
        let guard = StepGuard {
            clip_grad_norm: self.recipe.train.clip_grad_norm,
            on_nonfinite: self.recipe.train.on_nonfinite,
        };
        let t0 = Instant::now();
        // With a teacher cache, a data-set step reads the selected teachers' rows when the
        // cache holds them all, else runs the teachers and records their rows. A caller's batch
        // is not the data set's batch of this step: its teachers always run.
        let read = match (distill, self.cache.as_mut()) {
            (Some(pool), Some(c)) if !fed_by_caller => Some(c.read(step, &pool.select(step))),
            _ => None,
        };
        let cached = match read {
            Some(Err(e)) => {
                return Err(Error::invalid(
                    "train",
                    format!(
                        "run `{}` stopped at step {step}: {e}; {}",
                        self.recipe.name,
                        self.how_to_continue()
                    ),
                ))
            }
            Some(Ok(rows)) => rows,
            None => None,
        };
        let replayed = match (&cached, self.cache.as_ref()) {
            (Some(rows), Some(c)) => CacheReads {
                steps: 1,
                forwards: rows.len() as u64,
                rows: rows.iter().map(|t| t.rows as u64).sum(),
                bytes: rows.iter().map(|t| c.bytes_of(t)).sum(),
            },
            _ => CacheReads::default(),
        };
        let mut cache = self
            .cache
            .as_mut()
            .filter(|_| distill.is_some() && !fed_by_caller);
        let mut record = |teacher: usize, logits: &Tensor| -> Result<()> {
            match cache.as_mut() {
                Some(c) => c.record(step, teacher, logits),
                None => Ok(()),
            }
        };
        let teachers = match (&cached, distill) {
            (Some(rows), _) => Some(Teachers::Cached(rows)),
            (None, Some(pool)) => Some(Teachers::Online {
                pool,
                record: Some(&mut record),
            }),
            (None, None) => None,
        };
        // The loader's batch is on the CPU; on a GPU the upload is part of the step's time.
        let out = b
            .to_device(self.device)
            .and_then(|on_device| {
                let sync = self.sync.as_mut().map(|sync| RankSync { sync, weight });
                let mut out = train_step_synced(
                    &self.student,
                    teachers,
                    &self.loss,
                    &on_device,
                    self.optimizer.as_mut(),
                    lr,
                    step,
                    self.recipe.seed,
                    &guard,
                    sync,
                )?;
                if let Some(g) = &self.world.group {
                    // The global batch's losses: the ranks' means, weighted as the gradients.
                    let mut l = [out.ce, out.kd.unwrap_or(0.0), out.loss].map(|v| v * weight);
                    g.all_reduce_sum_f32(&mut l)?;
                    (out.ce, out.loss) = (l[0], l[2]);
                    out.kd = out.kd.map(|_| l[1]);
                    ranks::average_buffers(g.as_ref(), &self.student)?;
                    if (step + 1).is_multiple_of(self.check_every) || step + 1 == self.total {
                        ranks::check_same_weights(g.as_ref(), &self.student, step + 1)?;
                    }
                }
                test_exit(&self.world, step + 1);
                Ok(out)
            })
            .and_then(|out| {
                // A GPU may still be running this step's backward and update (the loss came
                // back after the forward); later steps wait for it anyway. Before an
                // evaluation, wait here, so that the training time logged with it holds all
                // the training before it.
                if self.evals.contains(&(step + 1)) {
                    recycle_engine::cuda::synchronize(self.device)?;
                }
                Ok(out)
            })
            .map_err(|e| {
                Error::invalid(
                    "train",
                    format!(
                        "{}run `{}` stopped at step {step}: {e}; {}",
                        self.world.prefix(),
                        self.recipe.name,
                        self.how_to_continue()
                    ),
                )
            })?;
        let state = &mut self.state;
        state.train_seconds += t0.elapsed().as_secs_f64();
        state.step += 1;
        // The global batch's: every rank's shard holds the same number of samples (the batch
        // divides evenly), and a checkpoint's count must be that of any N.
        state.samples += (b.samples() * self.world.size()) as u64;
        state.teacher_forwards += out.teacher_forwards as u64;
        state.teacher_seconds += out.teacher_seconds;
        state.cache_reads.add(&replayed);
        state.skipped_steps += out.skipped.is_some() as u64;
        if fed_by_caller {
            state.caller_steps += 1;
            state.caller_samples += b.samples() as u64;
        }
        self.last_step = Some((lr, out));
        let batch = self.recipe.train.batch_size;
        let (eval, validation) = if self.evals.contains(&self.state.step) && self.writes() {
            checkpoint::test_pause(&format!("evaluation after step {}", self.state.step));
            let (test, validation) = self.evaluate_both(batch)?;
            self.last_eval = Some(test);
            self.last_validation = validation;
            (Some(test), validation)
        } else {
            (None, None)
        };
        let wall_seconds = self.wall_seconds();
        let Some(log) = self.log.as_mut() else {
            // Another rank: rank 0 logs, evaluates and checkpoints.
            return Ok(StepReport {
                step,
                lr,
                output: out,
            });
        };
        log.append(&RunLogRecord {
            step: self.state.step,
            samples: self.state.samples,
            train_seconds: self.state.train_seconds,
            wall_seconds,
            lr,
            ce: out.ce,
            kd: out.kd,
            loss: out.loss,
            teacher_forwards: self.state.teacher_forwards,
            eval,
            validation,
            skipped: out.skipped.map(|s| s.tag().to_string()),
            skipped_steps: self.state.skipped_steps,
        })?;
        let every = self.recipe.train.checkpoint_every;
        if eval.is_some() || (every > 0 && self.state.step.is_multiple_of(every)) {
            self.save_checkpoint(self.dir.join(CHECKPOINT_FILE))?;
        }
        checkpoint::test_pause(&format!("step {} done", self.state.step));
        if let Some(p) = &self.progress {
            p.set_position(self.state.step);
            p.set_message(format!(
                "loss {:.3}{}",
                out.loss,
                self.last_eval
                    .map_or(String::new(), |v| format!(", eval {v:.3}"))
            ));
        }
        Ok(StepReport {
            step,
            lr,
            output: out,
        })
    }

    /// The student's metric on the test split and, when the run keeps one, on the validation
    /// split.
    fn evaluate_both(&self, batch: usize) -> Result<(f32, Option<f32>)> {
        let batch = batch.max(256);
        let test = evaluate(&self.student, &self.data, batch)?;
        let validation = if self.data.validation_len() > 0 {
            Some(evaluate_on(
                &self.student,
                &self.data,
                EvalSplit::Validation,
                batch,
            )?)
        } else {
            None
        };
        Ok((test, validation))
    }

    /// Runs up to `n` steps (fewer when the run ends first) and returns how many ran.
    pub fn run_steps(&mut self, n: u64) -> Result<u64> {
        let mut done = 0;
        while done < n && !self.is_done() {
            self.step()?;
            done += 1;
        }
        Ok(done)
    }

    /// Ends the run before its last step: writes the checkpoint and returns the error that
    /// says so (`why`, e.g. "stopped" or "interrupted by SIGTERM") and how to continue. When the
    /// checkpoint cannot be written, the error says that and where the previous one is.
    pub fn stop(&self, why: &str) -> Error {
        if let Some(p) = &self.progress {
            p.finish_and_clear();
        }
        let (name, step, total) = (&self.recipe.name, self.state.step, self.total);
        if !self.writes() {
            return Error::invalid(
                "train",
                format!(
                    "{}run `{name}` {why} after step {step} of {total}; rank 0 writes its \
                     checkpoint",
                    self.world.prefix()
                ),
            );
        }
        match self.save_checkpoint(self.dir.join(CHECKPOINT_FILE)) {
            Ok(()) => Error::invalid(
                "train",
                format!(
                    "run `{name}` {why} after step {step} of {total}; its checkpoint {} holds \
                     that step: continue it with --resume",
                    self.dir.join(CHECKPOINT_FILE).display()
                ),
            ),
            Err(e) => Error::invalid(
                "train",
                format!(
                    "run `{name}` {why} after step {step} of {total}, and its checkpoint could \
                     not be written: {e}; {}",
                    self.how_to_continue()
                ),
            ),
        }
    }

    /// What a user can do after a failure: resume from the checkpoint the run directory holds,
    /// or, when none was written yet, start again (which `--resume` then does, from step 0).
    fn how_to_continue(&self) -> String {
        let path = self.dir.join(CHECKPOINT_FILE);
        match checkpoint_step(&path) {
            Some(step) => format!(
                "the last good checkpoint is {} (step {step}): continue with --resume",
                path.display()
            ),
            None => format!(
                "no checkpoint was written yet in {}: --resume starts the run again from step 0",
                self.dir.display()
            ),
        }
    }

    /// Writes a resumable checkpoint (model, optimizer state, step, samples, seconds, teacher
    /// forwards) to `path`, atomically. The run's own is `<run dir>/checkpoint.safetensors`,
    /// which `resume` reads.
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self
            .student
            .state_dict()?
            .into_iter()
            .map(|(n, t)| (format!("model.{n}"), t))
            .collect();
        tensors.extend(self.optimizer.state());
        let r = &self.state;
        let meta = HashMap::from([
            ("step".to_string(), r.step.to_string()),
            ("samples".to_string(), r.samples.to_string()),
            (
                "train_seconds".to_string(),
                format!("{:.17e}", r.train_seconds),
            ),
            (
                "teacher_forwards".to_string(),
                r.teacher_forwards.to_string(),
            ),
            (
                "teacher_seconds".to_string(),
                format!("{:.17e}", r.teacher_seconds),
            ),
            (
                "cache_steps_read".to_string(),
                r.cache_reads.steps.to_string(),
            ),
            (
                "cache_forwards_replayed".to_string(),
                r.cache_reads.forwards.to_string(),
            ),
            (
                "cache_rows_read".to_string(),
                r.cache_reads.rows.to_string(),
            ),
            (
                "cache_bytes_read".to_string(),
                r.cache_reads.bytes.to_string(),
            ),
            ("skipped_steps".to_string(), r.skipped_steps.to_string()),
            ("caller_steps".to_string(), r.caller_steps.to_string()),
            ("caller_samples".to_string(), r.caller_samples.to_string()),
        ]);
        checkpoint::save(path.as_ref(), &tensors, Some(meta))
    }

    /// A rank other than 0 at the end of a run: the summary rank 0 wrote, with its
    /// evaluation numbers (broadcast), nothing written here.
    fn follow_summary(&self) -> Result<RunSummary> {
        let Some(g) = &self.world.group else {
            return Err(Error::invalid(
                "train",
                "a rank without a group has nothing to follow".to_string(),
            ));
        };
        let mut numbers = [0f32; 3];
        g.broadcast_f32(&mut numbers)?;
        let [final_eval, validation, floor] = numbers;
        let recipe = &self.recipe;
        Ok(RunSummary {
            name: recipe.name.clone(),
            method: recipe.method(),
            metric: self.data.metric().to_string(),
            duration_samples: self.total * recipe.train.batch_size as u64,
            steps: self.total,
            final_eval,
            final_validation: (!validation.is_nan()).then_some(validation),
            majority_floor: Some(floor),
            train_seconds: self.state.train_seconds,
            teacher_forwards: self.state.teacher_forwards,
            teacher_seconds: self.pool.is_some().then_some(self.state.teacher_seconds),
            cache_reads: None,
            skipped_steps: self.state.skipped_steps,
            device: Some(self.device_name.clone()),
            teachers: recipe
                .distill
                .as_ref()
                .map(|d| d.teachers.iter().map(|p| p.display().to_string()).collect())
                .unwrap_or_default(),
            config: serde_json::to_value(recipe)
                .map_err(|e| Error::invalid("train", format!("recipe as JSON: {e}")))?,
        })
    }

    /// Ends the run. When every step is done: the final evaluation (unless the last step ran
    /// one), `final.safetensors` and `summary.json`, and the summary. Otherwise the checkpoint
    /// is written and the result is an error saying how to continue (`--resume`).
    pub fn finish(mut self) -> Result<RunSummary> {
        if let Some(p) = &self.progress {
            p.finish_and_clear();
        }
        if let Some(c) = self.cache.as_mut() {
            c.flush()?;
        }
        let (total, batch) = (self.total, self.recipe.train.batch_size);
        if self.state.step < total {
            return Err(self.stop("stopped"));
        }
        if let Some(sync) = &self.sync {
            report_reduce_times(&self.world, sync, &self.state);
        }
        if !self.writes() {
            return self.follow_summary();
        }
        let (final_eval, final_validation) = match self.last_eval {
            Some(v) => (v, self.last_validation),
            None => self.evaluate_both(batch)?,
        };
        checkpoint::save(
            &self.dir.join(FINAL_FILE),
            &self.student.state_dict()?,
            None,
        )?;
        let floor = majority_floor(&self.data)?;
        if let Some(g) = &self.world.group {
            // The other ranks return the same summary.
            let mut numbers = [final_eval, final_validation.unwrap_or(f32::NAN), floor];
            g.broadcast_f32(&mut numbers)?;
        }
        let recipe = &self.recipe;
        let summary = RunSummary {
            name: recipe.name.clone(),
            method: recipe.method(),
            metric: self.data.metric().to_string(),
            duration_samples: total * batch as u64,
            steps: total,
            final_eval,
            final_validation,
            majority_floor: Some(floor),
            train_seconds: self.state.train_seconds,
            teacher_forwards: self.state.teacher_forwards,
            teacher_seconds: self.pool.is_some().then_some(self.state.teacher_seconds),
            cache_reads: self.cache.is_some().then_some(self.state.cache_reads),
            skipped_steps: self.state.skipped_steps,
            device: Some(self.device_name.clone()),
            teachers: recipe
                .distill
                .as_ref()
                .map(|d| d.teachers.iter().map(|p| p.display().to_string()).collect())
                .unwrap_or_default(),
            config: serde_json::to_value(recipe)
                .map_err(|e| Error::invalid("train", format!("recipe as JSON: {e}")))?,
        };
        summary.write(&self.dir)?;
        Ok(summary)
    }
}

/// What a data-parallel run cannot do yet: the teacher cache (its rows are the global
/// batch's), a global batch that does not split evenly.
fn check_distributable(recipe: &Recipe, ranks: usize) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::invalid(
            "train",
            format!("run `{}` on {ranks} ranks: {what}", recipe.name),
        ))
    };
    if recipe.distill.as_ref().is_some_and(|d| d.cache.is_some()) {
        return refuse(
            "a teacher cache holds the rows of whole batches, not of a rank's shard: drop \
             distill.cache or train with one process",
        );
    }
    ranks::check_divides(recipe.train.batch_size, ranks)
}

/// Several processes of a torchrun-style or MPI launch with a GPU recipe: GPU ranks, each on
/// `cuda:LOCAL_RANK` (the recipe names `cuda:0`, the machine's first GPU), meet their peers
/// here and reduce their gradients on one NCCL communicator; CPU ranks of a torchrun-style
/// launch cannot train (they reduce with MPI), those of an MPI launch keep MPI. Returns the
/// world and the recipe on this rank's device; any other launch as it is.
fn meet_gpu_ranks(recipe: &Recipe, world: World) -> Result<(World, Recipe)> {
    if !world.meets_on_gpus() {
        return Ok((world, recipe.clone()));
    }
    let launch = world.launch.clone();
    match recipe.device {
        Device::Cpu if world.awaits_gpu_group() => Err(Error::invalid(
            "launch",
            crate::distributed::world::torchrun_on_cpu(&launch),
        )),
        Device::Cpu => Ok((world, recipe.clone())),
        Device::Cuda(n) if n != 0 => Err(Error::invalid(
            "train",
            format!(
                "run `{}` has device = \"cuda:{n}\" but is rank {} of {} of a {} launch, where \
                 each rank trains on cuda:LOCAL_RANK: set device = \"cuda:0\"",
                recipe.name,
                launch.rank,
                launch.world_size,
                launch.launcher.name()
            ),
        )),
        Device::Cuda(_) => {
            let device = Device::Cuda(local_gpu(launch.local_rank));
            let here = Recipe {
                device,
                ..recipe.clone()
            };
            // A device that does not open fails here, on every rank, before any waits.
            open_device(&here)?;
            #[cfg(feature = "cuda")]
            {
                let timeout = env_seconds("RECYCLE_COLLECTIVE_TIMEOUT", 600.0)?;
                Ok((world.with_gpu_group(device, timeout)?, here))
            }
            #[cfg(not(feature = "cuda"))]
            {
                Err(Error::invalid(
                    "launch",
                    format!(
                        "rank {} of {}: GPU ranks need a build with `--features cuda`",
                        launch.rank, launch.world_size
                    ),
                ))
            }
        }
    }
}

/// The GPU of the process of local rank `local_rank`: `cuda:LOCAL_RANK`, except where the
/// process sees one GPU only (a scheduler gave each rank its own with `CUDA_VISIBLE_DEVICES`,
/// or the mock CUDA): then that one, `cuda:0`. Without a driver, `cuda:LOCAL_RANK`, whose
/// opening says what is missing.
fn local_gpu(local_rank: usize) -> usize {
    if local_rank > 0 && recycle_engine::cuda::device_count() == 1 {
        0
    } else {
        local_rank
    }
}

/// Rank 0's (or the one process's) side of starting a run: creates and locks the run
/// directory, removes the temporary files of killed writes, checks an existing run against
/// `opts` (resume or overwrite), records the recipe, and reads the checkpoint to resume from.
fn prepare_run_dir(
    recipe: &Recipe,
    opts: &RunOptions,
    dir: &Path,
    student: &Model,
    optimizer: &mut dyn Optimizer,
    total: u64,
) -> Result<(RunLock, Progress, RunLogWriter)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let lock = RunLock::acquire(dir)?;
    remove_temp_files(dir)?;
    let recorded = dir.join(RECIPE_FILE);
    let has_checkpoint = dir.join(CHECKPOINT_FILE).exists();
    if opts.resume {
        if !has_checkpoint && !recorded.exists() {
            return Err(Error::invalid(
                "train",
                format!(
                    "--resume: {} holds no run to resume (no {CHECKPOINT_FILE}, no \
                     {RECIPE_FILE}): train it without --resume",
                    dir.display()
                ),
            ));
        }
        if recorded.exists() {
            check_same_recipe(&recorded, recipe)?;
        }
    } else if dir.join(LOG_FILE).exists() && !opts.overwrite {
        return Err(Error::invalid(
            "train",
            format!(
                "{} already holds a run: pass --resume to continue it or --overwrite to start again",
                dir.display()
            ),
        ));
    } else {
        // A fresh start: nothing of a previous run in this directory may be resumed or
        // reported as this one's.
        for stale in [CHECKPOINT_FILE, FINAL_FILE, SUMMARY_FILE] {
            match std::fs::remove_file(dir.join(stale)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(dir.join(stale), e))
                }
                _ => {}
            }
        }
    }
    // On resume the recorded recipe stays (it was checked to be this one).
    if !opts.resume || !recorded.exists() {
        write_atomic(&recorded, recipe.to_toml()?.as_bytes())?;
    }

    // Resuming a run that stopped before its first checkpoint starts it from step 0.
    let state = if opts.resume && has_checkpoint {
        load_checkpoint(dir, student, optimizer, total, recipe)?
    } else {
        Progress::default()
    };
    let log = if opts.resume {
        RunLogWriter::open_for_resume(dir.join(LOG_FILE), state.step)?
    } else {
        RunLogWriter::create(dir.join(LOG_FILE))?
    };
    Ok((lock, state, log))
}

/// What a data-parallel run's reductions cost, said once by rank 0 on standard error: the
/// all-reduce time per step (on the communication thread) and what of it backward did not hide.
fn report_reduce_times(world: &World, sync: &GradSync, state: &Progress) {
    let t = sync.times();
    if world.rank() != 0 || t.steps == 0 {
        return;
    }
    let ms = |s: f64| 1e3 * s / t.steps as f64;
    eprintln!(
        "data-parallel over {} ranks, {} bucket(s): {:.2} ms/step training, backward with \
         reduction {:.2} ms/step, all-reduce {:.2} ms/step, of which {:.2} ms/step waited for \
         after backward",
        world.size(),
        sync.plan().ranges().len(),
        1e3 * state.train_seconds / state.step.max(1) as f64,
        ms(t.backward_seconds),
        ms(t.reduce_seconds),
        ms(t.wait_seconds)
    );
}

/// The compute dtype of the teachers (whose weights are bf16): bf16 on a GPU, where an op
/// computes in its activations' type (f32 activations would cast every weight at every teacher
/// forward), and wherever the recipe asks for bf16; on the CPU with f32 activations, the
/// default (the input's type), since CPU ops compute in f32 whatever the type and bf16 would
/// only round.
pub(super) fn teacher_activations(device: Device, activations: Activations) -> Option<DType> {
    match (device, activations) {
        (Device::Cpu, Activations::F32) => None,
        _ => Some(DType::BF16),
    }
}

/// The training set's batches from `step` on (a function of `(seed, step)`).
pub(super) fn data_batches(
    data: &TaskData,
    batch: usize,
    seed: u64,
    step: u64,
) -> Result<BatchIter> {
    let config = LoaderConfig::train(batch, seed);
    Ok(match data {
        TaskData::Images { train, .. } => {
            Box::new(Loader::new(train.clone(), config, step)?.map(|b| b.map(image_batch)))
        }
        TaskData::Text {
            train: TextTrain::Packed(train),
            ..
        } => Box::new(Loader::new(train.clone(), config, step)?.map(|b| b.and_then(mlm_batch))),
        TaskData::Text {
            train: TextTrain::Stream(shards),
            ..
        } => Box::new(
            TextStreamLoader::new(shards.clone(), batch, step, config.prefetch)?
                .map(|b| b.and_then(mlm_batch)),
        ),
    })
}

/// This rank's shard of the training set's batches from `step` on, each with its weight: the
/// global batch (a function of `(seed, step)`, the same on every rank) cut into `shard.size`
/// slices. Every rank builds the whole batch and keeps its slice: loading costs as much as in
/// one process, and the data order, MLM masks and augmentations are those of a one-process
/// run.
fn shard_batches(
    data: &TaskData,
    batch: usize,
    seed: u64,
    step: u64,
    shard: Shard,
) -> Result<ShardIter> {
    let config = LoaderConfig::train(batch, seed);
    let image = move |b: data::ImageBatch| -> Result<(Batch, f32)> {
        let (b, w) = ranks::shard_images(b, shard)?;
        Ok((image_batch(b), w))
    };
    let mlm = move |b: data::MlmBatch| -> Result<(Batch, f32)> {
        let (b, w) = ranks::shard_mlm(b, shard)?;
        Ok((mlm_batch(b)?, w))
    };
    Ok(match data {
        TaskData::Images { train, .. } => {
            Box::new(Loader::new(train.clone(), config, step)?.map(move |b| b.and_then(image)))
        }
        TaskData::Text {
            train: TextTrain::Packed(train),
            ..
        } => Box::new(Loader::new(train.clone(), config, step)?.map(move |b| b.and_then(mlm))),
        TaskData::Text {
            train: TextTrain::Stream(shards),
            ..
        } => Box::new(
            TextStreamLoader::new(shards.clone(), batch, step, config.prefetch)?
                .map(move |b| b.and_then(mlm)),
        ),
    })
}

/// For the tests of a rank that dies: `RECYCLE_TEST_EXIT_AT=RANK:STEP` ends rank RANK of a
/// data-parallel run abruptly (no MPI shutdown) once it has finished step STEP.
fn test_exit(world: &World, step: u64) {
    if !world.is_distributed() {
        return;
    }
    let Ok(spec) = std::env::var("RECYCLE_TEST_EXIT_AT") else {
        return;
    };
    let at = spec
        .split_once(':')
        .and_then(|(r, s)| Some((r.parse::<usize>().ok()?, s.parse::<u64>().ok()?)));
    if at == Some((world.rank(), step)) {
        eprintln!(
            "{}exiting after step {step} (RECYCLE_TEST_EXIT_AT={spec})",
            world.prefix()
        );
        std::process::exit(3);
    }
}

/// A service may move a trainer to another thread (one thread at a time drives it).
#[allow(dead_code)]
fn trainer_is_send() {
    fn is_send<T: Send>() {}
    is_send::<Trainer>();
}
