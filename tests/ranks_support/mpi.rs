//! Launching `recycle` under `mpirun` for the data-parallel tests on MPI
//! (`tests/distributed.rs` on the CPU, `tests/train_ranks_mpi_cuda.rs` on GPU ranks).

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `mpirun -np NP recycle ARGS`, killed after `limit`: its output, and whether it ended in time.
pub fn mpirun(np: usize, args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Output, bool) {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--oversubscribe",
        "-np",
        &np.to_string(),
        env!("CARGO_BIN_EXE_recycle"),
    ])
    .args(args)
    // Open MPI refuses to start as root without these (CI containers run as root).
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    // One thread per rank: two ranks share the machine's cores.
    .env("RAYON_NUM_THREADS", "1")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .expect("mpirun (Open MPI or MPICH) must be on PATH");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            return (child.wait_with_output().unwrap(), false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), true)
}
