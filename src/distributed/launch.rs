//! How this process was started: by `mpirun` (Open MPI or MPICH/Hydra), by `srun` (Slurm), by
//! a torchrun-style launcher (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`), or by hand (one process, as always). Read from the environment alone, before
//! any communication library starts, so a malformed or inconsistent variable is an error naming
//! it and its value, and an MPI launch of a binary built without the `mpi` feature says how to
//! build one.

use std::collections::HashMap;

use recycle_engine::{Error, Result};

/// The launcher that started this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher: one process.
    Single,
    /// `mpirun` / `mpiexec` of Open MPI (`OMPI_COMM_WORLD_*`).
    OpenMpi,
    /// `mpiexec` of MPICH or Intel MPI (Hydra's `PMI_RANK`, `PMI_SIZE`).
    Hydra,
    /// `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`).
    Slurm,
    /// A torchrun-style launch: ranks meet at `MASTER_ADDR:MASTER_PORT`.
    Torchrun {
        master_addr: String,
        master_port: u16,
    },
}

impl Launcher {
    /// Whether the ranks talk through MPI (the `mpi` feature).
    pub fn is_mpi(&self) -> bool {
        matches!(self, Launcher::OpenMpi | Launcher::Hydra | Launcher::Slurm)
    }

    pub fn is_torchrun(&self) -> bool {
        matches!(self, Launcher::Torchrun { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Launcher::Single => "none",
            Launcher::OpenMpi => "Open MPI (mpirun)",
            Launcher::Hydra => "MPICH/Hydra (mpiexec)",
            Launcher::Slurm => "Slurm (srun)",
            Launcher::Torchrun { .. } => "torchrun-style (RANK, WORLD_SIZE, MASTER_ADDR)",
        }
    }
}

/// This process's place among the ranks of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    /// 0-based rank of this process among all of the run's.
    pub rank: usize,
    /// Number of processes of the run.
    pub world_size: usize,
    /// Rank among the processes on this machine (which GPU a rank takes).
    pub local_rank: usize,
}

impl Launch {
    pub fn is_torchrun(&self) -> bool {
        self.launcher.is_torchrun()
    }

    /// One process, no launcher.
    pub fn single() -> Launch {
        Launch {
            launcher: Launcher::Single,
            rank: 0,
            world_size: 1,
            local_rank: 0,
        }
    }

    /// Reads the launch from this process's environment.
    pub fn from_env() -> Result<Launch> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Launch::detect(&env)
    }

    /// Reads the launch from `env` (the variables a launcher sets). Open MPI's variables win
    /// over Slurm's (an `mpirun` inside an allocation sees both), then Hydra's, Slurm's, and
    /// torchrun's. Slurm's task variables count only inside a job step (`srun` sets
    /// `SLURM_STEP_ID`): a batch script that runs `recycle` directly is one process, even in an
    /// allocation of several tasks.
    pub fn detect(env: &HashMap<String, String>) -> Result<Launch> {
        let has = |k: &str| env.contains_key(k);
        let launch = if has("OMPI_COMM_WORLD_RANK") || has("OMPI_COMM_WORLD_SIZE") {
            read(
                env,
                Launcher::OpenMpi,
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                Some("OMPI_COMM_WORLD_LOCAL_RANK"),
            )?
        } else if has("PMI_RANK") || has("PMI_SIZE") {
            // Hydra sets MPI_LOCALRANKID for the local rank.
            read(
                env,
                Launcher::Hydra,
                "PMI_RANK",
                "PMI_SIZE",
                Some("MPI_LOCALRANKID"),
            )?
        } else if has("SLURM_PROCID")
            && has("SLURM_NTASKS")
            && (has("SLURM_STEP_ID") || has("SLURM_STEPID"))
        {
            read(
                env,
                Launcher::Slurm,
                "SLURM_PROCID",
                "SLURM_NTASKS",
                Some("SLURM_LOCALID"),
            )?
        } else if has("RANK") || has("WORLD_SIZE") {
            let addr = env
                .get("MASTER_ADDR")
                .filter(|a| !a.trim().is_empty())
                .ok_or_else(|| {
                    invalid(
                        "MASTER_ADDR is not set: a torchrun-style launch (RANK, WORLD_SIZE) \
                         needs the address of rank 0 in MASTER_ADDR and a port in MASTER_PORT"
                            .to_string(),
                    )
                })?;
            let port = env.get("MASTER_PORT").ok_or_else(|| {
                invalid(
                    "MASTER_PORT is not set: a torchrun-style launch needs the port rank 0 \
                     listens on"
                        .to_string(),
                )
            })?;
            let master_port = port
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| {
                    invalid(format!(
                        "MASTER_PORT is `{port}`: it must be a TCP port, 1 to 65535"
                    ))
                })?;
            read(
                env,
                Launcher::Torchrun {
                    master_addr: addr.trim().to_string(),
                    master_port,
                },
                "RANK",
                "WORLD_SIZE",
                Some("LOCAL_RANK"),
            )?
        } else {
            Launch::single()
        };
        Ok(launch)
    }

    /// Refuses a launch this build cannot join: an MPI launch of more than one process without
    /// the `mpi` feature (each process would otherwise train alone on the whole data and race
    /// the others for the run directory).
    pub fn check_supported(&self) -> Result<()> {
        if self.launcher.is_mpi() && self.world_size > 1 && !cfg!(feature = "mpi") {
            return Err(invalid(format!(
                "this process is rank {} of {} started by {}, but this recycle was built \
                 without MPI: build it with `cargo build --release --features mpi` (needs an MPI \
                 library with mpicc, e.g. the openmpi-bin and libopenmpi-dev packages, and \
                 libclang), or run one process without the launcher",
                self.rank,
                self.world_size,
                self.launcher.name()
            )));
        }
        Ok(())
    }
}

fn invalid(msg: String) -> Error {
    Error::invalid("launch", msg)
}

/// A launcher's rank, size and local rank, checked: numbers, size at least 1, rank below size,
/// local rank below size.
fn read(
    env: &HashMap<String, String>,
    launcher: Launcher,
    rank_var: &str,
    size_var: &str,
    local_var: Option<&str>,
) -> Result<Launch> {
    let number = |var: &str| -> Result<Option<usize>> {
        match env.get(var) {
            None => Ok(None),
            Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                invalid(format!(
                    "{var} is `{v}`: the {} launch sets it to a non-negative whole number",
                    launcher.name()
                ))
            }),
        }
    };
    let missing = |var: &str, other: &str| {
        invalid(format!(
            "{other} is set but {var} is not: a {} launch sets both",
            launcher.name()
        ))
    };
    let rank = number(rank_var)?.ok_or_else(|| missing(rank_var, size_var))?;
    let world_size = number(size_var)?.ok_or_else(|| missing(size_var, rank_var))?;
    if world_size == 0 {
        return Err(invalid(format!(
            "{size_var} is 0: a run has at least one process"
        )));
    }
    if rank >= world_size {
        return Err(invalid(format!(
            "{rank_var} is {rank} but {size_var} is {world_size}: ranks run from 0 to {}",
            world_size - 1
        )));
    }
    let local_rank = match local_var {
        Some(var) => number(var)?.unwrap_or(0),
        None => 0,
    };
    if local_rank >= world_size {
        return Err(invalid(format!(
            "{} is {local_rank} but {size_var} is {world_size}: a local rank is below the \
             number of processes",
            local_var.unwrap_or("the local rank")
        )));
    }
    Ok(Launch {
        launcher,
        rank,
        world_size,
        local_rank,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        Launch::detect(&env(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn no_launcher_is_one_process() {
        assert_eq!(Launch::detect(&env(&[])).unwrap(), Launch::single());
        // A batch script of a 4-task allocation, outside srun: no job step.
        let l = Launch::detect(&env(&[
            ("SLURM_JOB_ID", "7"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "4"),
        ]))
        .unwrap();
        assert_eq!(l, Launch::single());
        assert!(l.check_supported().is_ok());
    }

    #[test]
    fn each_launcher_is_read() {
        let ompi = Launch::detect(&env(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            // mpirun inside a Slurm allocation: Open MPI's numbering wins.
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ]))
        .unwrap();
        assert_eq!(
            (&ompi.launcher, ompi.rank, ompi.world_size, ompi.local_rank),
            (&Launcher::OpenMpi, 3, 8, 1)
        );
        let hydra = Launch::detect(&env(&[("PMI_RANK", "1"), ("PMI_SIZE", "2")])).unwrap();
        assert_eq!(
            (
                hydra.launcher,
                hydra.rank,
                hydra.world_size,
                hydra.local_rank
            ),
            (Launcher::Hydra, 1, 2, 0)
        );
        let slurm = Launch::detect(&env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_ID", "0"),
        ]))
        .unwrap();
        assert_eq!(
            (
                &slurm.launcher,
                slurm.rank,
                slurm.world_size,
                slurm.local_rank
            ),
            (&Launcher::Slurm, 5, 16, 1)
        );
        let torch = Launch::detect(&env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!(
            torch.launcher,
            Launcher::Torchrun {
                master_addr: "node0".into(),
                master_port: 29500
            }
        );
        assert_eq!((torch.rank, torch.world_size, torch.local_rank), (1, 2, 1));
        assert!(!torch.launcher.is_mpi() && slurm.launcher.is_mpi());
    }

    #[test]
    fn malformed_and_inconsistent_values_name_the_variable_and_value() {
        let e = err(&[
            ("OMPI_COMM_WORLD_RANK", "x1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ]);
        assert!(e.contains("OMPI_COMM_WORLD_RANK is `x1`"), "{e}");
        let e = err(&[("PMI_RANK", "2"), ("PMI_SIZE", "2")]);
        assert!(e.contains("PMI_RANK is 2 but PMI_SIZE is 2"), "{e}");
        let e = err(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "0"),
            ("SLURM_STEP_ID", "0"),
        ]);
        assert!(e.contains("SLURM_NTASKS is 0"), "{e}");
        let e = err(&[("OMPI_COMM_WORLD_SIZE", "2")]);
        assert!(e.contains("OMPI_COMM_WORLD_RANK is not"), "{e}");
        let e = err(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "-1"),
        ]);
        assert!(e.contains("OMPI_COMM_WORLD_LOCAL_RANK is `-1`"), "{e}");
        let e = err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]);
        assert!(e.contains("MASTER_ADDR is not set"), "{e}");
        let e = err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000"),
        ]);
        assert!(e.contains("MASTER_PORT is `70000`"), "{e}");
        let e = err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "4"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
        ]);
        assert!(e.contains("LOCAL_RANK is 4 but WORLD_SIZE is 2"), "{e}");
    }

    #[test]
    fn an_mpi_launch_without_the_feature_says_how_to_build() {
        let l = Launch::detect(&env(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")])).unwrap();
        let r = l.check_supported();
        if cfg!(feature = "mpi") {
            assert!(r.is_ok());
        } else {
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("--features mpi") && e.contains("rank 0 of 2"),
                "{e}"
            );
        }
        // One MPI process is one process, whatever the build.
        let one = Launch::detect(&env(&[("PMI_RANK", "0"), ("PMI_SIZE", "1")])).unwrap();
        assert!(one.check_supported().is_ok());
    }
}
