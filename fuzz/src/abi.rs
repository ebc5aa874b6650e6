//! The body of the fuzz target over the fused loss behind the C ABI (`recycle_kd_loss`) and
//! the Python binding (`kd_loss_raw`, whose array checks end in `kd_loss_cpu`): random sizes,
//! class counts, teacher counts, label types, masks and gradients. Every buffer is allocated
//! with exactly the length passed with it, so AddressSanitizer sees any read or write past a
//! stated length. What the C ABI cannot detect, a buffer shorter than its stated length, is
//! the caller's contract and is not tried. No call may panic (the ABI turns a panic into
//! `RECYCLE_ERROR_PANIC`, which counts as a finding here). The C binding's property test
//! (`bindings/c/tests/fuzz_kd_loss.rs`) includes this file.

use crate::cursor::Cursor;
use recycle::distill::{kd_loss_cpu, KdLoss};
use recycle_c::{
    recycle_kd_loss, RecycleLoss, RecycleLossConfig, RECYCLE_ERROR_PANIC, RECYCLE_LABELS_I32,
};

/// One call of `recycle_kd_loss` and one of `kd_loss_cpu` on fields decoded from `data`.
pub fn kd_loss_abi(data: &[u8]) {
    let mut c = Cursor(data);
    let flags = c.u8();
    let config = RecycleLossConfig {
        kind: (c.u8() % 3) as i32,
        temperature: c.f32(),
        weight: c.f32(),
        ignore_index: c.i32(),
    };
    // Small counts mostly, any value sometimes (overflowing products included).
    let classes = match flags & 3 {
        0 => 0,
        1 => c.u8() as usize,
        2 => u64::from_le_bytes(c.bytes()) as usize,
        _ => usize::MAX,
    };
    let rows = (c.u8() % 17) as usize;
    let num_teachers = (c.u8() % 4) as usize;
    let label_type = (c.u8() % 3) as i32;
    let student_len = (c.u8() as usize).min(rows.saturating_mul(classes.min(64)) + 3);
    let student: Vec<f32> = (0..student_len).map(|_| c.f32()).collect();
    let teachers_len = if flags & 4 != 0 {
        num_teachers * student_len
    } else {
        c.u8() as usize
    };
    let teachers: Vec<f32> = (0..teachers_len).map(|_| c.f32()).collect();
    let labels_i32: Vec<i32> = (0..rows).map(|_| c.i32() % 24).collect();
    let labels_i64: Vec<i64> = labels_i32
        .iter()
        .map(|&y| {
            if flags & 8 != 0 {
                y as i64
            } else {
                (y as i64) << 33
            }
        })
        .collect();
    let mask: Vec<u8> = (0..rows + (flags >> 6) as usize % 2)
        .map(|_| c.u8())
        .collect();
    let mut grad = vec![0f32; if flags & 16 != 0 { student_len } else { rows }];

    let mut out = RecycleLoss {
        ce: 0.0,
        kd: 0.0,
        total: 0.0,
        ce_rows: 0,
        kd_rows: 0,
    };
    let labels_ptr = if label_type == RECYCLE_LABELS_I32 {
        labels_i32.as_ptr().cast()
    } else {
        labels_i64.as_ptr().cast()
    };
    // SAFETY: every pointer is to a live buffer of exactly the length passed with it.
    let rc = unsafe {
        recycle_kd_loss(
            &config,
            student.as_ptr(),
            student.len(),
            classes,
            if teachers.is_empty() {
                std::ptr::null()
            } else {
                teachers.as_ptr()
            },
            teachers.len(),
            num_teachers,
            labels_ptr,
            rows,
            label_type,
            if flags & 32 != 0 {
                mask.as_ptr()
            } else {
                std::ptr::null()
            },
            mask.len(),
            if flags & 128 != 0 {
                grad.as_mut_ptr()
            } else {
                std::ptr::null_mut()
            },
            grad.len(),
            &mut out,
        )
    };
    assert_ne!(rc, RECYCLE_ERROR_PANIC, "recycle_kd_loss panicked");

    // The Python binding's path: the same function on the decoded arrays, teachers cut to the
    // student's length by the caller.
    let cfg = match config.kind {
        0 => KdLoss::kl(config.temperature, config.weight),
        _ => KdLoss::mse(config.weight),
    };
    let cfg = KdLoss {
        ignore_index: config.ignore_index,
        ..cfg
    };
    let refs: Vec<&[f32]> = teachers.chunks(student_len.max(1)).collect();
    let mask_bool: Vec<bool> = mask.iter().map(|&m| m != 0).collect();
    if let Ok(r) = kd_loss_cpu(
        &cfg,
        &student,
        &refs,
        &labels_i32,
        (flags & 32 != 0).then_some(mask_bool.as_slice()),
        classes,
    ) {
        assert_eq!(r.grad.len(), student.len());
    }
}
