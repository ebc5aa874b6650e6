//! What the data-parallel tests share (`tests/distributed.rs` on MPI, `tests/train_ranks_cuda.rs`
//! and `tests/train_ranks_mpi_cuda.rs` on GPU ranks): a scratch directory beside the fixture
//! data, a free port on loopback, a finished process's output, the comparison of two runs' final weights, an `mpirun`
//! launch ([`mpi`]) and a GPU recipe ([`gpu`]).

#![allow(dead_code)]

#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "mpi")]
pub mod mpi;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;

use recycle::data::test_support::use_fixture_data;
use recycle_engine::checkpoint;

/// A port on loopback that nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh directory `recycle-<prefix>-<tag>-<pid>`, with the fixture data written first.
pub fn temp_dir(prefix: &str, tag: &str) -> PathBuf {
    use_fixture_data(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let d = std::env::temp_dir().join(format!("recycle-{prefix}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A process's stdout and stderr, in that order.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The final weights of a run, by name.
pub fn weights(run_dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> = checkpoint::load(&run_dir.join("final.safetensors"))
        .unwrap()
        .tensors
        .into_iter()
        .map(|(n, t)| (n, t.to_vec_f32().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// The largest difference between two runs' final weights, relative to the largest weight.
pub fn max_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    let (mut worst, mut scale) = (0f32, 0f32);
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
            scale = scale.max(x.abs());
        }
    }
    worst / scale
}
