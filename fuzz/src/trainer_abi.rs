//! The body of the fuzz target over the C ABI's caller-fed batch entry points
//! (`recycle_trainer_step_images`, `..._step_tokens`, `..._evaluate_*`,
//! `..._teacher_logits_*`): random shapes (zeros, overflowing products), lengths that lie,
//! index types, NULL pointers, NaN and infinite pixels, labels and token ids out of range.
//! Every buffer is allocated with exactly the length passed with it, so AddressSanitizer sees
//! a read past a stated length; a buffer shorter than its stated length is the caller's
//! contract and is not tried. No call may panic (`RECYCLE_ERROR_PANIC` is a finding). One
//! small ResNet trainer (on a generated Fashion-MNIST) is built once per process and fed every
//! input. The C binding's property test (`bindings/c/tests/fuzz_trainer.rs`) includes this
//! file.

use std::ffi::{c_void, CString};
use std::sync::Mutex;

use crate::cursor::Cursor;
use recycle::data::test_support::write_fashion_mnist;
use recycle_c::{
    recycle_last_error, recycle_trainer_evaluate_images, recycle_trainer_evaluate_tokens,
    recycle_trainer_new, recycle_trainer_step_images, recycle_trainer_step_tokens,
    recycle_trainer_teacher_logits_images, recycle_trainer_teacher_logits_tokens, RecycleEval,
    RecycleLogitsShape, RecycleStep, RecycleTrainer, RECYCLE_ERROR_PANIC, RECYCLE_OK,
    RECYCLE_OVERWRITE,
};

impl Cursor<'_> {
    /// A dimension: small mostly, sometimes 0, huge, or the image side the model expects.
    /// Two bytes (a tag and a value), or the tag and eight bytes for a huge one.
    fn dim(&mut self) -> u64 {
        match self.u8() % 8 {
            1 => u64::from_le_bytes(self.bytes()),
            tag => {
                let v = self.u8();
                match tag {
                    0 => 0,
                    2 => 28,
                    _ => (v % 12) as u64,
                }
            }
        }
    }
}

/// The trainer every input is fed to, built once (its address: the handle is not `Send`).
fn trainer() -> *mut RecycleTrainer {
    static TRAINER: Mutex<usize> = Mutex::new(0);
    let mut t = TRAINER.lock().unwrap_or_else(|e| e.into_inner());
    if *t == 0 {
        let dir = std::env::temp_dir().join(format!("recycle-fuzz-trainer-{}", std::process::id()));
        let data = dir.join("fashion-mnist");
        write_fashion_mnist(&data, 96, 32).expect("writing the generated data set");
        let recipe = CString::new(format!(
            "name = \"fuzz\"\nout_dir = \"{}\"\n\
             [model]\nkind = \"resnet\"\nwidth = 0.0625\n\
             [data]\ndataset = \"fashion-mnist\"\ndir = \"{}\"\ntrain_limit = 64\neval_limit = 16\n\
             [train]\nbatch_size = 4\nsamples = 100000000\nevals = 1\n\
             [optimizer]\nkind = \"sgdw\"\nlr = 0.01\n",
            dir.display(),
            data.display()
        ))
        .expect("no NUL in the recipe");
        let mut p: *mut RecycleTrainer = std::ptr::null_mut();
        let status = unsafe { recycle_trainer_new(recipe.as_ptr(), RECYCLE_OVERWRITE, &mut p) };
        assert_eq!(status, RECYCLE_OK, "{:?}", unsafe {
            std::ffi::CStr::from_ptr(recycle_last_error())
        });
        *t = p as usize;
    }
    *t as *mut RecycleTrainer
}

/// `n` integers (as int32 and as int64): small mostly, sometimes far out of any range.
fn ints(c: &mut Cursor, n: usize) -> (Vec<i32>, Vec<i64>) {
    let v: Vec<i64> = (0..n)
        .map(|_| match c.u8() % 4 {
            0 => c.i32() as i64,
            1 => (c.i32() as i64) << 20,
            _ => (c.u8() % 12) as i64 - 1,
        })
        .collect();
    (v.iter().map(|&x| x as i32).collect(), v)
}

/// A pointer to `v`'s elements, or NULL when the input says so.
fn ptr<T>(v: &[T], null: bool) -> *const c_void {
    if null {
        std::ptr::null()
    } else {
        v.as_ptr() as *const c_void
    }
}

/// One call of one of the six entry points on fields decoded from `data`.
pub fn trainer_abi(data: &[u8]) {
    status(data);
}

/// [`trainer_abi`]'s call, returning its status (the property test checks that the seeds
/// of well-formed batches train).
pub fn status(data: &[u8]) -> i32 {
    let t = trainer();
    let mut c = Cursor(data);
    let (call, nulls, lie) = (c.u8() % 6, c.u8(), c.u8());
    let index_type = (c.u8() % 3) as i32;
    let dims = [c.dim(), c.dim(), c.dim(), c.dim()];
    let images = call % 2 == 0;
    let shape: &[u64] = if images { &dims } else { &dims[..2] };
    // Buffers as long as the shape says (with a lie now and then), or short when the shape
    // is too large to allocate (then the stated length must not match it either).
    let want = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    let len = match want {
        Some(w) if w <= 1 << 14 => match lie % 8 {
            0 => w + 1,
            1 => w.saturating_sub(1),
            _ => w,
        },
        _ => (lie % 64) as u64,
    } as usize;
    let rows = if images {
        dims[0].min(1 << 14) as usize
    } else {
        len
    };
    let rows = if lie % 8 == 2 { rows + 1 } else { rows };
    let (labels32, labels64) = ints(&mut c, if images { rows } else { 0 });
    let labels = if index_type == 1 {
        ptr(&labels64, nulls & 2 != 0)
    } else {
        ptr(&labels32, nulls & 2 != 0)
    };
    let mut step = RecycleStep {
        step: 0,
        lr: 0.0,
        ce: 0.0,
        kd: 0.0,
        loss: 0.0,
        teacher_forwards: 0,
        skipped: 0,
    };
    let mut eval = RecycleEval {
        loss: 0.0,
        accuracy: 0.0,
        correct: 0,
        rows: 0,
    };
    let mut logits_shape = RecycleLogitsShape {
        teachers: 0,
        rows: 0,
        classes: 0,
    };
    let mut logits = vec![0f32; (lie as usize) % 32];
    let status = unsafe {
        if images {
            let pixels: Vec<f32> = (0..len).map(|_| c.f32()).collect();
            let x = if nulls & 1 != 0 {
                std::ptr::null()
            } else {
                pixels.as_ptr()
            };
            let [n, ch, h, w] = dims;
            match call {
                0 => recycle_trainer_step_images(
                    t,
                    x,
                    len as u64,
                    labels,
                    rows as u64,
                    index_type,
                    n,
                    ch,
                    h,
                    w,
                    &mut step,
                ),
                2 => recycle_trainer_evaluate_images(
                    t,
                    x,
                    len as u64,
                    labels,
                    rows as u64,
                    index_type,
                    n,
                    ch,
                    h,
                    w,
                    &mut eval,
                ),
                _ => recycle_trainer_teacher_logits_images(
                    t,
                    x,
                    len as u64,
                    labels,
                    rows as u64,
                    index_type,
                    n,
                    ch,
                    h,
                    w,
                    logits.as_mut_ptr(),
                    logits.len() as u64,
                    &mut logits_shape,
                ),
            }
        } else {
            let (ids32, ids64) = ints(&mut c, len);
            let (mask32, mask64) = ints(&mut c, len);
            let (ids, mask) = if index_type == 1 {
                (ptr(&ids64, nulls & 4 != 0), ptr(&mask64, nulls & 8 != 0))
            } else {
                (ptr(&ids32, nulls & 4 != 0), ptr(&mask32, nulls & 8 != 0))
            };
            // The labels buffer is as long as the others (one longer when the input lies).
            let (y32, y64) = ints(&mut c, rows);
            let y = if index_type == 1 {
                ptr(&y64, nulls & 2 != 0)
            } else {
                ptr(&y32, nulls & 2 != 0)
            };
            let [b, s, _, _] = dims;
            match call {
                1 => recycle_trainer_step_tokens(
                    t, ids, mask, y, len as u64, index_type, b, s, &mut step,
                ),
                3 => recycle_trainer_evaluate_tokens(
                    t, ids, mask, y, len as u64, index_type, b, s, &mut eval,
                ),
                _ => recycle_trainer_teacher_logits_tokens(
                    t,
                    ids,
                    mask,
                    y,
                    len as u64,
                    index_type,
                    b,
                    s,
                    logits.as_mut_ptr(),
                    logits.len() as u64,
                    &mut logits_shape,
                ),
            }
        }
    };
    assert_ne!(status, RECYCLE_ERROR_PANIC, "{:?}", unsafe {
        std::ffi::CStr::from_ptr(recycle_last_error())
    });
    if status == RECYCLE_OK && call == 2 {
        assert!(eval.rows > 0 && eval.correct <= eval.rows, "{eval:?}");
    }
    status
}
