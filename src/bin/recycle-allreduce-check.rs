//! `recycle-allreduce-check`: checks a torchrun-style launch of GPU ranks before training on
//! it. Every process reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`;
//! the ranks meet at `MASTER_ADDR:MASTER_PORT` (`recycle::distributed::rendezvous`), rank 0's
//! NCCL unique id goes to every rank, each rank makes its communicator on `cuda:LOCAL_RANK`,
//! and all of them average a gradient-sized buffer in buckets, `--iters` times. Each rank checks
//! that it holds the mean of every rank's buffer and prints a checksum of its bytes, which must
//! be the same on every rank (the ranks' weights stay equal only if the reduced gradients are).
//!
//! ```sh
//! torchrun --no-python --nproc-per-node 8 recycle-allreduce-check --elements 25000000
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use half::bf16;
use recycle::distributed::rendezvous;
use recycle_engine::cuda::{NcclId, RankComm};
use recycle_engine::{Device, Error, Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
}

/// Average a gradient-sized buffer across the ranks of a torchrun-style launch, through the
/// NCCL communicator made from rank 0's id, and check every rank got the same mean.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Elements in the buffer (a model's parameter count).
    #[arg(long, default_value_t = 1 << 20)]
    elements: usize,
    /// Elements per bucket: each bucket is one all-reduce.
    #[arg(long, default_value_t = 1 << 18)]
    bucket: usize,
    /// The gradient type.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// How many times the whole buffer is averaged (each time from the ranks' own values).
    #[arg(long, default_value_t = 1)]
    iters: usize,
    /// Seconds the rendezvous waits for every rank, the communicator for every rank to join,
    /// and a reduction for every peer.
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
}

/// A launch variable, parsed.
fn env_var<T: std::str::FromStr>(name: &str) -> Result<T> {
    let raw = std::env::var(name).map_err(|_| {
        Error::invalid(
            "launch",
            format!(
                "{name} is not set; start the ranks with torchrun (--no-python) or set RANK, \
                 WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process"
            ),
        )
    })?;
    raw.trim().parse().map_err(|_| {
        Error::invalid(
            "launch",
            format!("{name}={raw:?} is not a valid value for it"),
        )
    })
}

/// Rank `rank`'s value at `i`: multiples of 1/8 in [-4, 4), so every sum over ranks is exact
/// in f32 and bf16 and the mean is the correctly rounded quotient, whatever the order.
fn value(rank: usize, iter: usize, i: usize) -> f32 {
    ((i * 7 + rank * 13 + iter * 5) % 64) as f32 / 8.0 - 4.0
}

/// FNV-1a over the bytes: equal checksums, equal bits.
fn checksum(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn run(args: &Args) -> Result<()> {
    let rank: usize = env_var("RANK")?;
    let world: usize = env_var("WORLD_SIZE")?;
    let local_rank: usize = env_var("LOCAL_RANK")?;
    let host: String = env_var("MASTER_ADDR")?;
    let port: u16 = env_var("MASTER_PORT")?;
    if args.elements == 0 || args.bucket == 0 || args.iters == 0 || args.timeout_s <= 0.0 {
        return Err(Error::invalid(
            "recycle-allreduce-check",
            "--elements, --bucket, --iters and --timeout-s must be positive".to_string(),
        ));
    }
    let timeout = Duration::from_secs_f64(args.timeout_s);
    let device = Device::Cuda(local_rank);
    let port = rendezvous::port_from_env(port, |k| std::env::var(k).ok())?;
    let addr = rendezvous::join_host_port(&host, port);
    let id = rendezvous::exchange(&addr, rank, world, timeout, || {
        NcclId::new(device)
            .map(|id| id.0.to_vec())
            .map_err(|e| e.to_string())
    })?;
    let id = NcclId::from_bytes(&id)?;
    let mut comm = RankComm::for_local_rank(local_rank, rank, world, &id, timeout)?;
    let info = recycle_engine::cuda::device_info(local_rank)?;
    println!(
        "rank {rank} of {world}: communicator ready on {device} ({}{})",
        info.name,
        if info.is_mock() {
            ", MOCK: CPU timings"
        } else {
            ""
        }
    );
    let n = args.elements;
    let buckets = n.div_ceil(args.bucket);
    let mut sum_checks = 0u64;
    let mut reduce_time = Duration::ZERO;
    for iter in 0..args.iters {
        let mine: Vec<f32> = (0..n).map(|i| value(rank, iter, i)).collect();
        let grads = match args.dtype {
            Dtype::F32 => Tensor::from_vec(mine, &[n], device)?,
            Dtype::Bf16 => Tensor::from_vec(
                mine.into_iter().map(bf16::from_f32).collect::<Vec<_>>(),
                &[n],
                device,
            )?,
        };
        recycle_engine::cuda::synchronize(device)?;
        let start = Instant::now();
        for b in 0..buckets {
            let lo = b * args.bucket;
            comm.reduce_bucket(&grads, lo..(lo + args.bucket).min(n))?;
        }
        comm.join_student()?;
        comm.wait(timeout)?;
        reduce_time += start.elapsed();
        let (got, bytes): (Vec<f32>, Vec<u8>) = match args.dtype {
            Dtype::F32 => {
                let v = grads.to_vec::<f32>()?;
                let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                (v, b)
            }
            Dtype::Bf16 => {
                let v = grads.to_vec::<bf16>()?;
                let b = v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
                (v.into_iter().map(f32::from).collect(), b)
            }
        };
        for (i, g) in got.iter().enumerate() {
            let mean = (0..world).map(|r| value(r, iter, i)).sum::<f32>() / world as f32;
            let want = match args.dtype {
                Dtype::F32 => mean,
                Dtype::Bf16 => f32::from(bf16::from_f32(mean)),
            };
            // The sums are exact, so the mean is off by at most the final rounding (and a
            // library that multiplies by 1/N before summing by a few ulps more).
            let tol = match args.dtype {
                Dtype::F32 => 4.0 * f32::EPSILON * want.abs(),
                Dtype::Bf16 => 2.0 * 2f32.powi(-8) * want.abs(),
            };
            if (g - want).abs() > tol {
                return Err(Error::invalid(
                    "recycle-allreduce-check",
                    format!(
                        "rank {rank} of {world}, iteration {iter}: element {i} is {g} after the \
                         all-reduce, but the mean of the ranks' values is {want}"
                    ),
                ));
            }
        }
        sum_checks = sum_checks.wrapping_mul(31).wrapping_add(checksum(bytes));
        if iter == 0 {
            println!("rank {rank} of {world}: iteration 1 ok");
        }
    }
    println!(
        "rank {rank} of {world}: mean ok, {n} {:?} elements in {buckets} buckets x {} iterations, \
         {:.3} ms per iteration, checksum {sum_checks:016x}",
        args.dtype,
        args.iters,
        reduce_time.as_secs_f64() * 1e3 / args.iters as f64
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
