//! Communicators across processes (`ncclGetUniqueId`, `ncclCommInitRank`): the ranks meet at
//! a Unix socket named by the unique id and exchange their buffers through rank 0.
//!
//! The id holds a magic and a random token; the meeting point is the directory
//! `<system temp dir>/recycle-mock-nccl-<token in hex>`, where rank 0 listens on `rank0.sock`
//! and every other rank connects (retrying until the timeout, since rank 0 may come later).
//! Once all have arrived rank 0 removes the directory; the connections stay.
//!
//! An all-reduce: every other rank sends rank 0 its header (collective number, count, type,
//! operation) and its send buffer; rank 0 checks they agree, reduces all of them in rank order
//! (`collective::reduce`, the same code as the in-process clique) and sends the result's bytes
//! back, so every rank stores the same bits. A rank that is gone (its socket closed) or does
//! not come within the timeout fails the collective on every rank with a message naming it;
//! the communicator is broken from then on, as NCCL's is after an error.
//!
//! The timeout is `RECYCLE_MOCK_NCCL_TIMEOUT_S` seconds (default 120): a rank that never
//! arrives makes the others fail, never hang.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::collective::{reduce, Part, RedOp};
use crate::libcommon::Elem;

/// `NCCL_UNIQUE_ID_BYTES`.
pub const ID_BYTES: usize = 128;
/// The first bytes of an id this mock made.
pub const ID_MAGIC: [u8; 8] = *b"RCYMNCL1";
const TOKEN_BYTES: usize = 16;
/// How long a rank waits for its peers before the collective fails (a peer whose stream never
/// reaches the call, or a call a peer never made), unless the environment says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// The environment variable that sets the peer timeout, in seconds (for every communicator,
/// in-process cliques included).
pub const TIMEOUT_ENV: &str = "RECYCLE_MOCK_NCCL_TIMEOUT_S";

/// The peer timeout: `RECYCLE_MOCK_NCCL_TIMEOUT_S` when set to a positive number.
pub fn peer_timeout() -> Result<Duration, String> {
    match std::env::var(TIMEOUT_ENV) {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
            _ => Err(format!(
                "{TIMEOUT_ENV}={v:?}: give a positive number of seconds"
            )),
        },
    }
}

/// A new unique id: the magic, then a random token (the rest zero).
pub fn new_id() -> [u8; ID_BYTES] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut id = [0u8; ID_BYTES];
    id[..8].copy_from_slice(&ID_MAGIC);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    for half in 0..2 {
        // RandomState is seeded randomly per process; the pid, time and counter make two ids
        // of one process differ as well.
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(now);
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_usize(half);
        id[8 + 8 * half..16 + 8 * half].copy_from_slice(&h.finish().to_le_bytes());
    }
    id
}

/// The meeting directory an id names, or why the id is not one of this mock's.
pub fn meeting_dir(id: &[u8; ID_BYTES]) -> Result<PathBuf, String> {
    if id[..8] != ID_MAGIC {
        return Err(format!(
            "the unique id starts {:02x?}, not with this mock's magic: make it with ncclGetUniqueId \
             on rank 0 and give every rank the same 128 bytes",
            &id[..8]
        ));
    }
    let token: String = id[8..8 + TOKEN_BYTES]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(std::env::temp_dir().join(format!("recycle-mock-nccl-{token}")))
}

/// The sockets of one rank: rank 0 holds one per other rank (index = rank), the others one to
/// rank 0 (index 0). `None` once the communicator is broken or aborted.
pub struct NetComm {
    pub rank: usize,
    pub ranks: usize,
    timeout: Duration,
    peers: Mutex<Option<Vec<Option<UnixStream>>>>,
}

const HELLO: usize = 8 + 4 + 4;

/// Writes all of `buf` without raising SIGPIPE when the peer is gone (a host program that
/// keeps the default SIGPIPE action would otherwise die instead of seeing the error).
fn send_all(s: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while !buf.is_empty() {
        // SAFETY: `buf` is a live slice; the descriptor belongs to `s`.
        let n = unsafe {
            libc::send(
                s.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn read_array<const N: usize>(s: &mut UnixStream) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// What a failed read or write of a peer says about it.
fn peer_gone(what: &str, peer: usize, timeout: Duration, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
            "{what}: rank {peer} did not answer within {:.1} s ({TIMEOUT_ENV} sets the timeout)",
            timeout.as_secs_f64()
        ),
        _ => format!(
            "{what}: rank {peer} is gone (its process exited or closed the connection: {e})"
        ),
    }
}

impl NetComm {
    /// `ncclCommInitRank`: meets the other `ranks - 1` ranks at `id`'s directory within
    /// `timeout`.
    pub fn init(
        id: &[u8; ID_BYTES],
        ranks: usize,
        rank: usize,
        timeout: Duration,
    ) -> Result<NetComm, String> {
        Self::init_unless(id, ranks, rank, timeout, &AtomicBool::new(false))
    }

    /// [`NetComm::init`], given up as soon as `cancel` is set (`ncclCommAbort` of a
    /// communicator still joining).
    pub fn init_unless(
        id: &[u8; ID_BYTES],
        ranks: usize,
        rank: usize,
        timeout: Duration,
        cancel: &AtomicBool,
    ) -> Result<NetComm, String> {
        if ranks == 0 || rank >= ranks {
            return Err(format!(
                "rank {rank} of {ranks}: ranks are 0..nranks, nranks >= 1"
            ));
        }
        let dir = meeting_dir(id)?;
        let sock = dir.join("rank0.sock");
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<UnixStream>> = (0..ranks).map(|_| None).collect();
        if rank == 0 {
            if ranks > 1 {
                Self::host(&dir, &sock, ranks, deadline, timeout, cancel, &mut peers)?;
            }
        } else {
            peers[0] = Some(Self::join(&sock, ranks, rank, deadline, timeout, cancel)?);
        }
        Ok(NetComm {
            rank,
            ranks,
            timeout,
            peers: Mutex::new(Some(peers)),
        })
    }

    fn host(
        dir: &PathBuf,
        sock: &PathBuf,
        ranks: usize,
        deadline: Instant,
        timeout: Duration,
        cancel: &AtomicBool,
        peers: &mut [Option<UnixStream>],
    ) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| {
            format!(
                "rank 0 could not make the meeting directory {}: {e}",
                dir.display()
            )
        })?;
        let _ = std::fs::remove_file(sock);
        let listener = UnixListener::bind(sock)
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .map_err(|e| format!("rank 0 could not listen on {}: {e}", sock.display()));
        let accepted = listener.and_then(|l| {
            while peers[1..].iter().any(Option::is_none) {
                if cancel.load(Ordering::Relaxed) {
                    return Err(ABORTED_WHILE_JOINING.to_string());
                }
                let now = Instant::now();
                if now >= deadline {
                    let missing: Vec<usize> = (1..ranks).filter(|r| peers[*r].is_none()).collect();
                    return Err(format!(
                        "ncclCommInitRank: rank 0 waited {:.1} s for ranks {missing:?} of {ranks}, \
                         which never arrived ({TIMEOUT_ENV} sets the timeout)",
                        timeout.as_secs_f64()
                    ));
                }
                let mut s = match l.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2).min(deadline - now));
                        continue;
                    }
                    Err(e) => return Err(format!("rank 0 could not accept a rank: {e}")),
                };
                let hello = s
                    .set_nonblocking(false)
                    .and_then(|_| s.set_read_timeout(Some(timeout)))
                    .and_then(|_| read_array::<HELLO>(&mut s))
                    .map_err(|e| {
                        format!("ncclCommInitRank: a rank connected but sent no hello: {e}")
                    })?;
                let (r, n) = (u32_at(&hello, 8) as usize, u32_at(&hello, 12) as usize);
                if hello[..8] != ID_MAGIC
                    || n != ranks
                    || r == 0
                    || r >= ranks
                    || peers[r].is_some()
                {
                    return Err(format!(
                        "ncclCommInitRank: a rank said it was rank {r} of {n}, but rank 0 has \
                         nranks {ranks} and ranks {:?} arrived already: every rank needs the same \
                         nranks and its own rank",
                        (1..ranks)
                            .filter(|q| peers[*q].is_some())
                            .collect::<Vec<_>>()
                    ));
                }
                peers[r] = Some(s);
            }
            Ok(())
        });
        // Everyone has connected (or the meeting failed): the name is no longer needed.
        let _ = std::fs::remove_file(sock);
        let _ = std::fs::remove_dir(dir);
        accepted?;
        for (r, p) in peers.iter_mut().enumerate().skip(1) {
            let s = p.as_mut().expect("every rank arrived");
            send_all(s, &[1]).map_err(|e| peer_gone("ncclCommInitRank", r, timeout, &e))?;
        }
        Ok(())
    }

    fn join(
        sock: &PathBuf,
        ranks: usize,
        rank: usize,
        deadline: Instant,
        timeout: Duration,
        cancel: &AtomicBool,
    ) -> Result<UnixStream, String> {
        let mut s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(_) if cancel.load(Ordering::Relaxed) => {
                    return Err(ABORTED_WHILE_JOINING.to_string())
                }
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "ncclCommInitRank: rank {rank} of {ranks} could not reach rank 0 at {} \
                             within {:.1} s ({e}); rank 0 must call ncclCommInitRank with the \
                             same id ({TIMEOUT_ENV} sets the timeout)",
                            sock.display(),
                            timeout.as_secs_f64()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        let mut hello = [0u8; HELLO];
        hello[..8].copy_from_slice(&ID_MAGIC);
        hello[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
        hello[12..16].copy_from_slice(&(ranks as u32).to_le_bytes());
        send_all(&s, &hello)
            .and_then(|_| s.set_read_timeout(Some(timeout * 2)))
            .and_then(|_| read_array::<1>(&mut s))
            .map_err(|e| peer_gone("ncclCommInitRank", 0, timeout * 2, &e))?;
        Ok(s)
    }

    /// Closes every connection (`ncclCommAbort`, or a failed collective): the peers see the
    /// rank gone at once instead of waiting for the timeout.
    pub fn shut_down(&self) {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner()).take();
        for s in peers.into_iter().flatten().flatten() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// This rank's part of collective number `seq`; on failure the communicator is shut down.
    ///
    /// # Safety
    /// `part`'s ranges must be live, and no other work may touch them until this returns.
    pub unsafe fn all_reduce(&self, seq: u64, part: Part) -> Result<(), String> {
        let mut guard = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(peers) = guard.as_mut() else {
            return Err(format!(
                "ncclAllReduce #{seq}: rank {} of {}: the communicator is broken by an earlier \
                 error or was aborted",
                self.rank, self.ranks
            ));
        };
        let r = if self.rank == 0 {
            self.reduce_at_root(seq, part, peers)
        } else {
            self.send_to_root(seq, part, peers[0].as_mut().expect("connected to rank 0"))
        };
        if r.is_err() {
            drop(guard);
            self.shut_down();
        }
        r
    }

    unsafe fn send_to_root(
        &self,
        seq: u64,
        part: Part,
        root: &mut UnixStream,
    ) -> Result<(), String> {
        let what = format!(
            "ncclAllReduce #{seq} on rank {} of {}",
            self.rank, self.ranks
        );
        let mut msg = header(seq, &part).to_vec();
        msg.extend_from_slice(part.send.bytes());
        if let Err(e) = send_all(root, &msg) {
            // Rank 0 may have closed after telling this rank why (see `tell_all`).
            let _ = root.set_read_timeout(Some(Duration::from_millis(200)));
            return Err(read_failure(root).unwrap_or_else(|| peer_gone(&what, 0, self.timeout, &e)));
        }
        // Rank 0 may wait up to the timeout for another rank before it answers.
        root.set_read_timeout(Some(self.timeout * 2))
            .map_err(|e| e.to_string())?;
        let status =
            read_array::<1>(root).map_err(|e| peer_gone(&what, 0, self.timeout * 2, &e))?;
        if status[0] != 0 {
            return Err(
                read_message(root).unwrap_or_else(|e| peer_gone(&what, 0, self.timeout, &e))
            );
        }
        root.read_exact(part.recv.bytes_mut())
            .map_err(|e| peer_gone(&what, 0, self.timeout, &e))
    }

    unsafe fn reduce_at_root(
        &self,
        seq: u64,
        part: Part,
        peers: &mut [Option<UnixStream>],
    ) -> Result<(), String> {
        let what = format!("ncclAllReduce #{seq} on rank 0 of {}", self.ranks);
        let len = part.count * part.elem.size();
        let mut inputs: Vec<Vec<u8>> = vec![part.send.bytes().to_vec()];
        let mut failure = None;
        for (r, p) in peers.iter_mut().enumerate().skip(1) {
            let s = p.as_mut().expect("every rank connected");
            let got = s
                .set_read_timeout(Some(self.timeout))
                .and_then(|_| read_array::<HEADER>(s))
                .map_err(|e| peer_gone(&what, r, self.timeout, &e))
                .and_then(|h| {
                    let want = header(seq, &part);
                    if h != want {
                        return Err(format!(
                            "{what}: rank {r} called collective {} with {} x {} op {}, rank 0 \
                             collective {seq} with {} x {:?} {:?}: every rank must make the same \
                             calls in the same order",
                            u64::from_le_bytes(h[..8].try_into().expect("8 bytes")),
                            u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
                            h[16],
                            h[17],
                            part.count,
                            part.elem,
                            part.op
                        ));
                    }
                    let mut b = vec![0u8; len];
                    s.read_exact(&mut b)
                        .map_err(|e| peer_gone(&what, r, self.timeout, &e))?;
                    Ok(b)
                });
            match got {
                Ok(b) => inputs.push(b),
                Err(m) => {
                    failure = Some(m);
                    break;
                }
            }
        }
        if let Some(m) = failure {
            tell_all(peers, &m);
            return Err(m);
        }
        let views: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
        let values = reduce(part.op, part.elem, &views, part.count);
        let out = part.recv.bytes_mut();
        for (i, v) in values.iter().enumerate() {
            part.elem.store(out, i, *v);
        }
        let mut msg = vec![0u8];
        msg.extend_from_slice(out);
        for r in 1..peers.len() {
            let sent = send_all(peers[r].as_ref().expect("every rank connected"), &msg);
            if let Err(e) = sent {
                // The ranks already answered read this as the answer to their next call.
                let m = peer_gone(&what, r, self.timeout, &e);
                tell_all(peers, &m);
                return Err(m);
            }
        }
        Ok(())
    }
}

/// What a background meeting ends with: the communicator, or why there is none.
type Outcome = Arc<Mutex<Option<Result<Arc<NetComm>, String>>>>;

const ABORTED_WHILE_JOINING: &str =
    "ncclCommInitRankConfig: the communicator was aborted while it was joining";

/// A communicator being made on a thread of its own (`ncclCommInitRankConfig` with
/// `blocking = 0`): `ncclCommGetAsyncError` reports `ncclInProgress` until [`Joining::outcome`]
/// has one, as NCCL's non-blocking initialisation does. The meeting is [`NetComm::init`]'s,
/// with its timeout.
pub struct Joining {
    pub ranks: usize,
    cancel: Arc<AtomicBool>,
    outcome: Outcome,
}

impl Joining {
    pub fn start(id: [u8; ID_BYTES], ranks: usize, rank: usize, timeout: Duration) -> Joining {
        let cancel = Arc::new(AtomicBool::new(false));
        let outcome: Outcome = Arc::default();
        let (c, o) = (cancel.clone(), outcome.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("mock-nccl-join-{rank}"))
            .spawn(move || {
                let r = NetComm::init_unless(&id, ranks, rank, timeout, &c).map(Arc::new);
                let mut slot = o.lock().unwrap_or_else(|e| e.into_inner());
                // Aborted meanwhile: nobody will use the connections.
                if let (true, Ok(n)) = (c.load(Ordering::Relaxed), &r) {
                    n.shut_down();
                }
                *slot = Some(r);
            });
        if let Err(e) = spawned {
            *outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err(format!(
                "ncclCommInitRankConfig: no thread to join on: {e}"
            )));
        }
        Joining {
            ranks,
            cancel,
            outcome,
        }
    }

    /// The communicator, or why it could not be made; `None` while it is still joining.
    pub fn outcome(&self) -> Option<Result<Arc<NetComm>, String>> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Gives the meeting up (or closes the communicator it made).
    pub fn cancel(&self) {
        let slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(Ok(n)) = slot.as_ref() {
            n.shut_down();
        }
    }
}

/// The failure message after a status byte of 1.
fn read_message(root: &mut UnixStream) -> io::Result<String> {
    let len = read_array::<4>(root)?;
    let mut m = vec![0u8; u32::from_le_bytes(len) as usize];
    root.read_exact(&mut m)?;
    Ok(String::from_utf8_lossy(&m).into_owned())
}

/// The failure rank 0 sent before closing, if it did.
fn read_failure(root: &mut UnixStream) -> Option<String> {
    match read_array::<1>(root) {
        Ok([1]) => read_message(root).ok(),
        _ => None,
    }
}

/// Rank 0 tells every other rank why the communicator failed, before the connections close:
/// each reads it as the answer to the collective it is in, or its next one.
fn tell_all(peers: &mut [Option<UnixStream>], m: &str) {
    let mut msg = vec![1u8];
    msg.extend_from_slice(&(m.len() as u32).to_le_bytes());
    msg.extend_from_slice(m.as_bytes());
    for s in peers.iter_mut().flatten() {
        let _ = send_all(s, &msg);
    }
}

const HEADER: usize = 8 + 8 + 1 + 1;

fn header(seq: u64, p: &Part) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&seq.to_le_bytes());
    h[8..16].copy_from_slice(&(p.count as u64).to_le_bytes());
    h[16] = match p.elem {
        Elem::F32 => 7,
        Elem::Bf16 => 9,
    };
    h[17] = match p.op {
        RedOp::Sum => 0,
        RedOp::Prod => 1,
        RedOp::Max => 2,
        RedOp::Min => 3,
        RedOp::Avg => 4,
    };
    h
}
