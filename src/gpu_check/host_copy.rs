//! Host copies: i32 tensors uploaded from the CPU are read from their host copy, without a
//! download, and agree with the device; the bytes copied to the host are counted from the
//! context's counters.

use recycle_engine::ops;
use recycle_engine::{cuda, DType, Device, Result, Tape, Tensor};

use super::checker::{dims, Checker};
use super::ordinal_of;

/// Bytes copied device → host on `device` so far (the context's counter).
pub(super) fn bytes_to_host(device: Device) -> Result<u64> {
    Ok(cuda::alloc_stats(ordinal_of(device)?)?.bytes_to_host)
}

/// The i32 values as the device holds them (a download that bypasses the host copy).
fn device_i32(t: &Tensor) -> Result<Vec<i32>> {
    Ok(t.device_bytes()?
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The host copy of i32 tensors uploaded from the CPU: reads of ids, labels and masks come
/// from it without a download, views read their own slice, every write into the device
/// storage keeps it true, and the attention's additive mask is made once per mask. Each row's
/// error is the number of bytes a read downloaded (it must download none: tolerance 0), or
/// infinite when the values read differ from the expected ones or from what the device holds
/// (read back on purpose, outside the measured read).
pub(super) fn host_copy_checks(c: &mut Checker) -> Result<()> {
    let device = c.device;
    let shape = [6usize, 50];
    let text = dims(&shape);
    let mut want: Vec<i32> = (0..300).map(|i| i * 7 - 1000).collect();
    let t = Tensor::from_slice(&want, &shape, device)?;
    // Reads `v` on the host; the error: the bytes that read downloaded, or infinite when it
    // differs from `expect` or from the device's bytes.
    let check = |c: &mut Checker, name: &str, v: &Tensor, expect: &[i32]| -> Result<()> {
        let before = bytes_to_host(device)?;
        let got = v.to_vec::<i32>()?;
        let downloaded = bytes_to_host(device)? - before;
        let right = got == expect && device_i32(v)? == expect;
        let err = if right {
            downloaded as f64
        } else {
            f64::INFINITY
        };
        c.record_err(name, text.clone(), DType::I32, err, 0.0);
        Ok(())
    };
    check(c, "host copy: i32 upload read back", &t, &want)?;
    check(
        c,
        "host copy: view (rows 2..5) read back",
        &t.narrow_rows(2, 3)?,
        &want[100..250],
    )?;
    let new_row: Vec<i32> = (0..50).map(|i| 5000 + i).collect();
    t.narrow_rows(1, 1)?.copy_from_i32(&new_row)?;
    want[50..100].copy_from_slice(&new_row);
    check(c, "host copy: after copy_from_i32 into row 1", &t, &want)?;
    t.narrow_rows(4, 2)?.zero_()?;
    want[200..].fill(0);
    check(c, "host copy: after zero_ of rows 4..6", &t, &want)?;
    check(c, "host copy: deep_copy read back", &t.deep_copy()?, &want)?;
    let zeros = Tensor::zeros(&shape, DType::I32, device)?;
    check(
        c,
        "host copy: Tensor::zeros (i32) read back",
        &zeros,
        &[0; 300],
    )?;

    // The attention's padding mask: made into an additive mask once, kept with the mask, and
    // made again after a write into the mask.
    use ops::{scaled_dot_product_attention, AttentionOptions};
    let (b, h, s, d) = (2usize, 4usize, 40usize, 16usize);
    let mut mask = vec![1i32; b * s];
    mask[s + 33..].fill(0);
    let mask_gpu = Tensor::from_slice(&mask, &[b, s], device)?;
    let (q_cpu, q_gpu) = c.fresh(&[b, h, s, d], DType::F32)?;
    let (k_cpu, k_gpu) = c.fresh(&[b, h, s, d], DType::F32)?;
    let (v_cpu, v_gpu) = c.fresh(&[b, h, s, d], DType::F32)?;
    let opts = AttentionOptions {
        dropout: 0.0,
        seed: 0,
        training: false,
    };
    let attend = |q: &Tensor, k: &Tensor, v: &Tensor, m: &Tensor| -> Result<Tensor> {
        let tape = Tape::inference();
        let (q, k, v) = (
            tape.constant(q.clone()),
            tape.constant(k.clone()),
            tape.constant(v.clone()),
        );
        Ok(scaled_dot_product_attention(&tape, &q, &k, &v, Some(m), opts)?.into_tensor())
    };
    let stats = || cuda::alloc_stats(ordinal_of(device)?);
    let text = format!("[{b}, {h}, {s}, {d}], mask [{b}, {s}]");
    let s0 = stats()?;
    attend(&q_gpu, &k_gpu, &v_gpu, &mask_gpu)?;
    let s1 = stats()?;
    let y_gpu = attend(&q_gpu, &k_gpu, &v_gpu, &mask_gpu)?;
    let s2 = stats()?;
    c.record_err(
        "host copy: attention mask, two calls download nothing",
        text.clone(),
        DType::F32,
        (s2.bytes_to_host - s0.bytes_to_host) as f64,
        0.0,
    );
    // Both calls upload the same shape words of their layout and broadcast kernels; the first
    // also uploads the additive mask (f32, then cast on the device), the second reuses it: the
    // difference must be exactly the mask's bytes.
    let first = s1.bytes_to_device - s0.bytes_to_device;
    let second = s2.bytes_to_device - s1.bytes_to_device;
    let mask_bytes = (b * s * 4) as u64;
    c.record_err(
        "host copy: attention mask, second call uploads no additive mask (bytes off)",
        text.clone(),
        DType::F32,
        (first as f64 - second as f64 - mask_bytes as f64).abs(),
        0.0,
    );
    let mask_cpu = Tensor::from_slice(&mask, &[b, s], Device::Cpu)?;
    c.record(
        "host copy: attention with the kept additive mask",
        text.clone(),
        DType::F32,
        &y_gpu,
        &attend(&q_cpu, &k_cpu, &v_cpu, &mask_cpu)?,
        // Composed against the fused CPU op: 1 ulp of the scale under the floor is 1.2e-4.
        5e-4,
    )?;
    // A write into the mask drops the kept additive mask: the next call sees the new padding.
    mask[20..s].fill(0);
    mask_gpu.copy_from_i32(&mask)?;
    let mask_cpu = Tensor::from_slice(&mask, &[b, s], Device::Cpu)?;
    c.record(
        "host copy: attention after a write into the mask",
        text,
        DType::F32,
        &attend(&q_gpu, &k_gpu, &v_gpu, &mask_gpu)?,
        &attend(&q_cpu, &k_cpu, &v_cpu, &mask_cpu)?,
        5e-4,
    )?;
    Ok(())
}
