//! The rendezvous on localhost: ranks as threads, rank 0 on a port the system chose.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::*;

fn host() -> (Host, String) {
    let h = Host::bind("127.0.0.1:0").unwrap();
    let addr = h.local_addr().to_string();
    (h, addr)
}

fn id() -> Vec<u8> {
    (0..128u32).map(|i| (i * 37 % 251) as u8).collect()
}

/// Ranks `ranks` (each with world size `world`) join `addr` on their own threads.
fn joiners(
    addr: &str,
    ranks: &[(usize, usize)],
    timeout: Duration,
) -> Vec<thread::JoinHandle<Result<Vec<u8>>>> {
    ranks
        .iter()
        .map(|&(rank, world)| {
            let addr = addr.to_string();
            thread::spawn(move || join(&addr, rank, world, timeout))
        })
        .collect()
}

#[test]
fn every_rank_receives_rank_0s_payload() {
    for world in [2, 4] {
        let (h, addr) = host();
        let ranks: Vec<(usize, usize)> = (1..world).map(|r| (r, world)).collect();
        let threads = joiners(&addr, &ranks, Duration::from_secs(5));
        h.serve(world, &id(), Duration::from_secs(5)).unwrap();
        for t in threads {
            assert_eq!(t.join().unwrap().unwrap(), id(), "world {world}");
        }
    }
}

#[test]
fn a_rank_may_start_before_rank_0_listens() {
    // Rank 1 retries refused connections until rank 0 binds the port.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = join_host_port("127.0.0.1", port);
    let early = joiners(&addr, &[(1, 2)], Duration::from_secs(5));
    thread::sleep(Duration::from_millis(300));
    let got = exchange(&addr, 0, 2, Duration::from_secs(5), || Ok(id())).unwrap();
    assert_eq!(got, id());
    for t in early {
        assert_eq!(t.join().unwrap().unwrap(), id());
    }
}

#[test]
fn a_missing_rank_is_named_within_the_timeout() {
    let (h, addr) = host();
    let timeout = Duration::from_millis(600);
    // Ranks 1 and 3 of 4 come; rank 2 does not.
    let threads = joiners(&addr, &[(1, 4), (3, 4)], Duration::from_secs(5));
    let start = Instant::now();
    let e = h.serve(4, &id(), timeout).unwrap_err();
    assert!(start.elapsed() < timeout + Duration::from_secs(2));
    assert!(
        matches!(&e, Error::Missing { missing, world: 4, .. } if missing == &vec![2]),
        "{e:?}"
    );
    let m = e.to_string();
    assert!(
        m.contains("rank(s) [2] of 4 did not arrive") && m.contains(&addr),
        "{m}"
    );
    // The ranks that came are told why, instead of waiting.
    for t in threads {
        let e = t.join().unwrap().unwrap_err();
        assert!(
            matches!(&e, Error::Refused { message, .. } if message.contains("[2]")),
            "{e:?}"
        );
    }
}

#[test]
fn a_rank_given_twice_is_refused() {
    let (h, addr) = host();
    let first = joiners(&addr, &[(1, 3)], Duration::from_secs(5));
    // The second rank 1 comes after the first has said hello.
    thread::sleep(Duration::from_millis(200));
    let second = joiners(&addr, &[(1, 3)], Duration::from_secs(5));
    let e = h.serve(3, &id(), Duration::from_secs(5)).unwrap_err();
    assert!(matches!(&e, Error::Duplicate { rank: 1, .. }), "{e:?}");
    assert!(e.to_string().contains("rank 1 arrived twice"), "{e}");
    for t in first.into_iter().chain(second) {
        let e = t.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("arrived twice"), "{e}");
    }
}

#[test]
fn a_world_size_mismatch_is_refused() {
    let (h, addr) = host();
    let threads = joiners(&addr, &[(1, 3)], Duration::from_secs(5));
    let e = h.serve(2, &id(), Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::WorldMismatch {
                rank: 1,
                theirs: 3,
                ours: 2,
                ..
            }
        ),
        "{e:?}"
    );
    let e = threads
        .into_iter()
        .next()
        .unwrap()
        .join()
        .unwrap()
        .unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("WORLD_SIZE=3 but rank 0 has WORLD_SIZE=2"),
        "{m}"
    );
}

#[test]
fn a_foreign_or_other_version_hello_is_refused() {
    for (bytes, want) in [
        (
            b"GET / HTTP/1.1\r\n\r\n\0\0".to_vec(),
            "not a recycle rendezvous hello",
        ),
        (
            [
                &MAGIC[..],
                &2u32.to_le_bytes(),
                &1u32.to_le_bytes(),
                &2u32.to_le_bytes(),
            ]
            .concat(),
            "protocol version 2",
        ),
    ] {
        let (h, addr) = host();
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&bytes).unwrap();
        let e = h.serve(2, &id(), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(&e, Error::BadMessage { .. }), "{e:?}");
        assert!(e.to_string().contains(want), "{e}");
    }
}

#[test]
fn nobody_listening_times_out_with_a_clear_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = join_host_port("127.0.0.1", port);
    let start = Instant::now();
    let e = join(&addr, 1, 2, Duration::from_millis(400)).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(matches!(&e, Error::Unreachable { rank: 1, .. }), "{e:?}");
    let m = e.to_string();
    assert!(
        m.contains("rank 1 could not reach rank 0 at 127.0.0.1:") && m.contains("MASTER_PORT"),
        "{m}"
    );
}

#[test]
fn an_address_in_use_names_it_and_what_to_do() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let e = Host::bind(&addr).unwrap_err();
    assert!(matches!(&e, Error::Bind { .. }), "{e:?}");
    let m = e.to_string();
    assert!(m.contains(&addr) && m.contains("free port"), "{m}");
}

#[test]
fn launch_arguments_are_checked() {
    let e = join("127.0.0.1:1", 2, 2, Duration::from_millis(10)).unwrap_err();
    assert!(
        e.to_string().contains("RANK=2 is not below WORLD_SIZE=2"),
        "{e}"
    );
    let e = join("127.0.0.1:1", 0, 2, Duration::from_millis(10)).unwrap_err();
    assert!(e.to_string().contains("rank 0 hosts"), "{e}");
    assert_eq!(join_host_port("::1", 29500), "[::1]:29500");
    assert_eq!(join_host_port("node-0", 29500), "node-0:29500");
    // One rank alone needs nobody.
    let got = exchange("127.0.0.1:0", 0, 1, Duration::from_secs(1), || Ok(id())).unwrap();
    assert_eq!(got, id());
}

#[test]
fn the_port_follows_the_launcher() {
    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }
    assert_eq!(port_from_env(29500, env(&[])).unwrap(), 29500);
    // torchrun's launcher serves its own store on MASTER_PORT: the next one.
    let shared_store = [("TORCHELASTIC_USE_AGENT_STORE", "True")];
    assert_eq!(port_from_env(29500, env(&shared_store)).unwrap(), 29501);
    let set = [
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        (PORT_ENV, "40000"),
    ];
    assert_eq!(port_from_env(29500, env(&set)).unwrap(), 40000);
    let e = port_from_env(29500, env(&[(PORT_ENV, "0")])).unwrap_err();
    assert!(
        e.to_string().contains("RECYCLE_RENDEZVOUS_PORT=\"0\""),
        "{e}"
    );
    assert!(port_from_env(65535, env(&shared_store)).is_err());
}
