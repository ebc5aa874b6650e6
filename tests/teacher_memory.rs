//! What a teacher costs in memory on the CPU (the claim: "a teacher costs its weights plus a
//! bounded workspace"), measured with the counting allocator this test binary installs.
//!
//! For a small ResNet and a small BERT: the peak heap bytes of a plain training step (no
//! teacher built yet), then of a KD step with 1 teacher, ensembles of 2 and 4, and RandomOne of
//! 4 (each case building its own teachers), each after a warm-up step. The claim checked:
//!
//! `KD peak - plain peak <= teachers' resident bytes + workspace`, with
//! `workspace = (LIVE_ACTIVATIONS + THREADS) x largest + forwards x logits`,
//!
//! where `largest` is the largest single allocation of one teacher forward (an activation, or
//! one thread's temporary of one op, such as im2col columns) and `forwards` the teacher
//! forwards of the step, whose logits live until the loss. A teacher forward on its own must
//! also stay within the workspace, and a deeper teacher (same width, more layers) must peak no
//! higher: the bound does not grow with depth, the sum of a teacher's activations does. To
//! show the test can fail, the bytes a forward allocates in all (what it would hold if it
//! freed nothing) must be well above the bound, and a "leaky" teacher that runs its forward on
//! a recording tape (the bug of a teacher forward that is not no-grad: the tape keeps every
//! activation until it is dropped) must break it.
//!
//! The counters are process-wide: every measurement holds `LOCK`, so no other test of this
//! binary allocates inside a measurement window, and runs on its own pool of `THREADS`
//! threads, so the figures do not depend on the machine's cores.

use std::sync::Mutex;

use recycle::bench::{run_bench, BenchSpec, Variant};
use recycle::distill::{kd_loss, KdLoss, TeacherEntry, TeacherPool, TeacherStrategy};
use recycle::trainer::{train_step, Architecture, Batch, Model};
use recycle_engine::memory::{
    heap_stats, reset_heap_peak, start_heap_counting, CountingAllocator, HeapStats,
};
use recycle_engine::optim::{AdamW, Optimizer, Sgdw};
use recycle_engine::rng::Rng;
use recycle_engine::{DType, Device, Tape, Tensor};
use recycle_models::{BertConfig, MlmBatch, ResNetConfig};

#[global_allocator]
static HEAP: CountingAllocator = CountingAllocator;

static LOCK: Mutex<()> = Mutex::new(());

/// Activations a forward that frees as it goes holds at once: an op's input and output and a
/// skip connection (ResNet's identity, BERT's residual).
const LIVE_ACTIVATIONS: u64 = 3;

/// The measurements run on a pool of this many threads, whatever the machine: each thread
/// holds its own temporaries (im2col columns), so the bound counts one set per thread.
const THREADS: usize = 2;

/// Steps whose peak is taken (the most of them): rayon's per-thread buffers can overlap
/// differently from one step to the next.
const STEPS: usize = 3;

fn heap() -> HeapStats {
    heap_stats().expect("this test binary installs the counting allocator")
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// The most heap bytes in use while `f` runs, over `STEPS` runs.
fn peak_of(mut f: impl FnMut()) -> u64 {
    (0..STEPS)
        .map(|_| {
            reset_heap_peak();
            f();
            heap().peak_bytes_in_use
        })
        .max()
        .unwrap()
}

/// A student, its optimizer and one batch.
struct Setup {
    arch: Architecture,
    student: Model,
    optimizer: Box<dyn Optimizer>,
    batch: Batch,
    step: u64,
}

impl Setup {
    fn new(arch: Architecture, batch: Batch) -> Setup {
        let student = Model::new(&arch, 0).unwrap();
        let n = student.params().unwrap().len();
        let optimizer: Box<dyn Optimizer> = match arch {
            Architecture::ResNet(_) => Box::new(Sgdw::paper(n, 0.01).unwrap()),
            Architecture::Bert(_) => Box::new(AdamW::new(n, 0.9, 0.999, 1e-8, 1e-5).unwrap()),
        };
        Setup {
            arch,
            student,
            optimizer,
            batch,
            step: 0,
        }
    }

    fn step(&mut self, pool: Option<&TeacherPool<Model>>) {
        let out = train_step(
            &self.student,
            pool,
            &KdLoss::kl(4.0, 1.0),
            &self.batch,
            self.optimizer.as_mut(),
            1e-3,
            self.step,
            0,
        )
        .unwrap();
        assert_eq!(out.teacher_forwards > 0, pool.is_some());
        self.step += 1;
    }

    /// `n` frozen bf16 teachers, as `recycle bench` and the trainer build them.
    fn teachers(&self, n: usize) -> Vec<TeacherEntry<Model>> {
        (0..n)
            .map(|i| TeacherEntry {
                name: format!("t{i}"),
                accuracy: 0.9 - 0.01 * i as f32,
                model: Model::new(&self.arch, 100 + i as u64)
                    .unwrap()
                    .teacher(DType::BF16)
                    .unwrap(),
            })
            .collect()
    }
}

/// What one teacher forward (inference tape, as `train_step` runs it) allocates.
struct ForwardFigures {
    /// Peak heap above what was in use before, the logits it returns included.
    peak: u64,
    /// Bytes allocated in all, freed or not: what it would hold if it released nothing.
    allocated: u64,
    largest: u64,
    logits: u64,
}

fn teacher_forward(teacher: &Model, batch: &Batch) -> ForwardFigures {
    let before = heap().bytes_in_use;
    reset_heap_peak();
    let logits = teacher
        .logits(&Tape::inference(), batch, false, 0)
        .unwrap()
        .into_tensor();
    let s = heap();
    let bytes = (logits.elem_count() * logits.dtype().size_in_bytes()) as u64;
    ForwardFigures {
        peak: s.peak_bytes_in_use - before,
        allocated: s.allocated_bytes,
        largest: s.largest_alloc_bytes,
        logits: bytes,
    }
}

/// The forward of `STEPS` with the lowest peak: on a busy machine work stealing can hand a
/// thread an op it has not run before, whose first per-thread buffer then lands inside one
/// measured forward; the depth comparison is about what a forward needs, not that accident.
fn settled_forward(teacher: &Model, batch: &Batch) -> ForwardFigures {
    (0..STEPS)
        .map(|_| teacher_forward(teacher, batch))
        .min_by_key(|f| f.peak)
        .unwrap()
}

/// Measures plain and KD steps of `setup` and teacher forwards (of `deeper` too: the same
/// model with more layers), checks the bounds, and shows that a leaky teacher breaks them.
/// Prints the figures (`--nocapture`).
fn check_teacher_memory(setup: impl FnOnce() -> Setup + Send, deeper: Architecture, label: &str) {
    // Before anything measured is allocated: a block allocated before counting starts and
    // freed after would lower the count.
    start_heap_counting();
    rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build()
        .unwrap()
        .install(|| measure_and_check(setup(), deeper, label));
}

fn measure_and_check(mut setup: Setup, deeper: Architecture, label: &str) {
    // Warm-up: the optimizer's state, rayon's threads and their buffers come to stay.
    setup.step(None);
    let plain = peak_of(|| setup.step(None));
    let weight_bytes_f32 = setup.student.params().unwrap().len() as u64 * 4;
    println!("{label}: plain step peak {:.3} MiB", mib(plain));

    let one = setup.teachers(1);
    // The first forward sets up what stays (rayon's threads, gemm's per-thread buffers).
    teacher_forward(&one[0].model, &setup.batch);
    let fwd = settled_forward(&one[0].model, &setup.batch);
    drop(one);
    let workspace =
        |forwards: u64| (LIVE_ACTIVATIONS + THREADS as u64) * fwd.largest + forwards * fwd.logits;
    println!(
        "{label}: one teacher forward: peak {:.3} MiB, allocated {:.3} MiB, largest block \
         {:.3} MiB, logits {:.3} MiB",
        mib(fwd.peak),
        mib(fwd.allocated),
        mib(fwd.largest),
        mib(fwd.logits)
    );

    // A forward on its own stays within the workspace, and a deeper teacher of the same width
    // needs no more: its activations are freed as they are consumed.
    assert!(
        fwd.peak <= workspace(1),
        "{label}: a teacher forward peaks {} bytes above what was in use, over the workspace \
         bound {}",
        fwd.peak,
        workspace(1)
    );
    let deep_teacher = Model::new(&deeper, 100)
        .unwrap()
        .teacher(DType::BF16)
        .unwrap();
    teacher_forward(&deep_teacher, &setup.batch);
    let deep = settled_forward(&deep_teacher, &setup.batch);
    drop(deep_teacher);
    println!(
        "{label}: a deeper teacher's forward: peak {:.3} MiB, allocated {:.3} MiB",
        mib(deep.peak),
        mib(deep.allocated)
    );
    // Allowance: one largest block per thread. Work stealing can leave a thread's buffer (an
    // im2col workspace) live across ops of every forward of one teacher and not of another;
    // an activation kept per layer would add megabytes (ResNet-34: 16 more convolutions).
    let stolen = THREADS as u64 * fwd.largest;
    assert!(
        deep.allocated > fwd.allocated * 3 / 2 && deep.peak <= fwd.peak + stolen,
        "{label}: the deeper teacher allocates {} bytes (the shallow one {}) and peaks {} \
         above what was in use (the shallow one {}, allowance {stolen}): its workspace grows \
         with depth",
        deep.allocated,
        fwd.allocated,
        deep.peak,
        fwd.peak
    );

    let cases = [
        ("kd-kl", 1, TeacherStrategy::Single, 1),
        ("ensemble-2", 2, TeacherStrategy::Ensemble { k: 2 }, 2),
        ("ensemble-4", 4, TeacherStrategy::Ensemble { k: 4 }, 4),
        ("random-one-4", 4, TeacherStrategy::RandomOne, 1),
    ];
    for (name, n, strategy, forwards) in cases {
        let before = heap().bytes_in_use;
        let pool = TeacherPool::new(setup.teachers(n), strategy, 7).unwrap();
        let resident = heap().bytes_in_use - before;
        // Teachers are resident in bf16 on the CPU: half the student's f32 weights each
        // (plus BatchNorm folded away, names and shapes), not an f32 copy.
        assert!(
            resident * 10 < n as u64 * weight_bytes_f32 * 6,
            "{label} {name}: {n} teachers hold {resident} bytes; f32 weights are \
             {weight_bytes_f32} each"
        );
        setup.step(Some(&pool));
        let kd = peak_of(|| setup.step(Some(&pool)));
        let extra = kd.saturating_sub(plain);
        let bound = resident + workspace(forwards);
        println!(
            "{label} {name}: peak {:.3} MiB, over plain {:.3} MiB = teachers resident {:.3} MiB \
             + {:.3} MiB (bound on the workspace {:.3} MiB)",
            mib(kd),
            mib(extra),
            mib(resident),
            mib(extra.saturating_sub(resident)),
            mib(workspace(forwards))
        );
        assert!(
            extra <= bound,
            "{label} {name}: a KD step peaks {extra} bytes above a plain one; the teachers hold \
             {resident} and the workspace bound is {}",
            workspace(forwards)
        );
    }

    // The bound must be able to fail. What a forward would hold if it released nothing (its
    // every allocation) is well above it...
    assert!(
        fwd.allocated > 2 * workspace(4),
        "{label}: a teacher forward allocates {} bytes in all, not well above the bound {}: \
         the test could not tell kept activations from released ones",
        fwd.allocated,
        workspace(4)
    );
    // ...and a teacher whose forward is recorded (a trainable copy on a recording tape, kept
    // until after the student's backward) breaks it.
    let before = heap().bytes_in_use;
    let leaky = Model::new(&setup.arch, 100).unwrap();
    let resident = heap().bytes_in_use - before;
    let batch = &setup.batch;
    let student = &setup.student;
    let kd_step = || {
        let teacher_tape = Tape::recording();
        let t = leaky.logits(&teacher_tape, batch, false, 0).unwrap();
        let tape = Tape::recording();
        let s = student.logits(&tape, batch, true, 0).unwrap();
        let out = kd_loss(
            &tape,
            &KdLoss::kl(4.0, 1.0),
            &s,
            &[t.tensor().clone()],
            batch.labels(),
            None,
        )
        .unwrap();
        tape.backward(&out.total).unwrap();
        student.params().unwrap().zero_grad().unwrap();
        drop(teacher_tape);
    };
    kd_step();
    let leaked = peak_of(kd_step).saturating_sub(plain);
    println!(
        "{label} leaky teacher: over plain {:.3} MiB = its f32 weights {:.3} MiB + {:.3} MiB",
        mib(leaked),
        mib(resident),
        mib(leaked.saturating_sub(resident))
    );
    assert!(
        leaked > resident + workspace(1),
        "{label}: a teacher that keeps its activations stays within the bound ({leaked} over \
         plain, {resident} resident, workspace bound {})",
        workspace(1)
    );
}

/// `resnet18-fmnist-small` of `recycle bench`: the CPU-sized model of `recycle demo`.
fn small_resnet_config() -> ResNetConfig {
    ResNetConfig {
        depth: 18,
        num_classes: 10,
        in_channels: 1,
        small_stem: true,
        width: 0.125,
    }
}

fn small_resnet() -> Architecture {
    Architecture::ResNet(small_resnet_config())
}

fn image_batch(n: usize) -> Batch {
    let x = Tensor::randn(&[n, 1, 28, 28], 0.0, 1.0, 1, DType::F32, Device::Cpu).unwrap();
    let labels: Vec<i32> = (0..n as i32).map(|i| i % 10).collect();
    Batch::Image {
        x,
        labels: Tensor::from_vec(labels, &[n], Device::Cpu).unwrap(),
    }
}

/// Random ids, every position attended, a quarter of the positions masked.
fn mlm_batch(b: usize, s: usize, vocab: usize) -> Batch {
    let mut rng = Rng::new(3);
    let ids: Vec<i32> = (0..b * s).map(|_| rng.below(vocab as u64) as i32).collect();
    let labels: Vec<i32> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| if i % 4 == 0 { id } else { -100 })
        .collect();
    let t = |v: Vec<i32>| Tensor::from_vec(v, &[b, s], Device::Cpu).unwrap();
    Batch::Mlm(MlmBatch::from_position_labels(t(ids), None, t(vec![1; b * s]), &t(labels)).unwrap())
}

#[test]
fn a_resnet_teacher_costs_its_weights_plus_a_bounded_workspace() {
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let resnet34 = Architecture::ResNet(ResNetConfig {
        depth: 34,
        ..small_resnet_config()
    });
    check_teacher_memory(
        || Setup::new(small_resnet(), image_batch(8)),
        resnet34,
        "resnet18/8",
    );
}

#[test]
fn a_bert_teacher_costs_its_weights_plus_a_bounded_workspace() {
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // BERT-tiny's width with 4 layers: depth is what the sum of activations grows with.
    let bert = |layers| {
        let mut cfg = BertConfig::tiny(512);
        cfg.num_layers = layers;
        Architecture::Bert(cfg)
    };
    check_teacher_memory(
        || Setup::new(bert(4), mlm_batch(4, 32, 512)),
        bert(8),
        "bert-tiny-4l/4x32",
    );
}

/// With the counter installed, `recycle bench` on the CPU has a peak column, and a KD step's
/// peak is at least a plain one's.
#[test]
fn the_cpu_bench_reports_peak_heap_per_variant() {
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut spec = BenchSpec::new("resnet18-fmnist-small");
    spec.batch = Some(4);
    spec.iters = 1;
    spec.warmup = 1;
    spec.variants = vec![Variant::Plain, Variant::KdKl, Variant::Ensemble4];
    let report = run_bench(&spec).unwrap();
    let peak = |v| {
        report
            .rows
            .iter()
            .find(|r| r.variant == v)
            .and_then(|r| r.peak_bytes)
            .unwrap_or_else(|| panic!("no peak for {v:?}"))
    };
    // Every peak counts the student and the four teachers, resident throughout.
    for v in spec.variants.clone() {
        assert!(peak(v) > report.teacher_resident_bytes, "{v:?}");
    }
    let md = report.to_markdown();
    assert!(md.contains("| peak MiB |"), "{md}");
    let json = report.to_json();
    assert!(json["kd-kl_peak_mib"].as_f64().unwrap() > 0.0, "{json}");
    println!("{md}");
}
