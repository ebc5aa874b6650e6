//! The torchrun-style rendezvous: the ranks of a launch without MPI meet at
//! `MASTER_ADDR:MASTER_PORT` and rank 0 hands every other rank a small payload (the NCCL
//! unique id; kept generic here: bytes).
//!
//! Rank 0 listens; every other rank connects, retrying until its deadline (rank 0 may start
//! later), and sends a hello: magic, protocol version, its rank and the world size it was
//! given. Rank 0 accepts until every rank has arrived once or the deadline passes, checks that
//! all agree on the world size, then sends each the payload and closes. Whatever goes wrong is
//! sent to every rank that did arrive, so all of them stop with the same error instead of
//! waiting for a collective that will never start.
//!
//! Wire format (little-endian): hello = magic `RCYRDZV1`, version u32, rank u32, world u32;
//! answer = magic, version u32, status u8 (0: the payload follows, 1: an error message
//! follows), length u32, then that many bytes.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The first bytes of every message.
pub const MAGIC: [u8; 8] = *b"RCYRDZV1";
/// The protocol's version; a rank speaking another one is refused.
pub const VERSION: u32 = 1;
/// The largest payload or message accepted (a NCCL id is 128 bytes).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// How often a rank retries a refused connection while rank 0 is not listening yet.
const RETRY: Duration = Duration::from_millis(50);

const HELLO_LEN: usize = 8 + 4 + 4 + 4;
const STATUS_OK: u8 = 0;
const STATUS_FAILED: u8 = 1;

/// What went wrong, naming the ranks, the address and what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Arguments that cannot describe a launch (rank outside the world, an empty world).
    #[error("rendezvous: {0}")]
    Invalid(String),

    /// Rank 0 could not listen.
    #[error(
        "rendezvous: rank 0 could not listen on {addr}: {reason}; set MASTER_ADDR to an \
         address of rank 0's machine and MASTER_PORT (or RECYCLE_RENDEZVOUS_PORT) to a free port"
    )]
    Bind { addr: String, reason: String },

    /// A rank could not reach rank 0 before its deadline.
    #[error(
        "rendezvous: rank {rank} could not reach rank 0 at {addr} within {secs:.1} s \
         ({reason}); check that rank 0 was started, that MASTER_ADDR:MASTER_PORT is its address \
         as seen from this machine, and that no firewall closes the port"
    )]
    Unreachable {
        rank: usize,
        addr: String,
        secs: f64,
        reason: String,
    },

    /// Ranks that did not arrive at rank 0 before the deadline.
    #[error(
        "rendezvous at {addr}: rank(s) {missing:?} of {world} did not arrive within {secs:.1} s; \
         check that every rank was started with the same MASTER_ADDR, MASTER_PORT and \
         WORLD_SIZE, and that each of RANK 0..{world} was given once"
    )]
    Missing {
        addr: String,
        missing: Vec<usize>,
        world: usize,
        secs: f64,
    },

    /// Two processes said they were the same rank.
    #[error(
        "rendezvous at {addr}: rank {rank} arrived twice (from {first} and from {second}); give \
         each process its own RANK"
    )]
    Duplicate {
        addr: String,
        rank: usize,
        first: String,
        second: String,
    },

    /// A rank was started with another world size than rank 0.
    #[error(
        "rendezvous at {addr}: rank {rank} (from {peer}) has WORLD_SIZE={theirs} but rank 0 \
         has WORLD_SIZE={ours}; start every rank with the same WORLD_SIZE"
    )]
    WorldMismatch {
        addr: String,
        rank: usize,
        peer: String,
        theirs: usize,
        ours: usize,
    },

    /// A message that is not this protocol, or another version of it.
    #[error(
        "rendezvous at {addr}: {peer} sent {what}; every rank must run the same recycle \
         build, and nothing else may connect to MASTER_PORT"
    )]
    BadMessage {
        addr: String,
        peer: String,
        what: String,
    },

    /// Rank 0 reported a failure of the whole rendezvous to this rank.
    #[error("rendezvous: rank 0 at {addr} stopped the launch: {message}")]
    Refused { addr: String, message: String },

    /// A connection that broke or stalled after it was made.
    #[error("rendezvous at {addr}: rank {rank}: {what}: {reason}")]
    Io {
        addr: String,
        rank: usize,
        what: String,
        reason: String,
    },
}

impl From<Error> for recycle_engine::Error {
    fn from(e: Error) -> Self {
        recycle_engine::Error::Invalid {
            op: "rendezvous",
            msg: e.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `host:port` as one address string, bracketing an IPv6 literal.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Sets the rendezvous port explicitly.
pub const PORT_ENV: &str = "RECYCLE_RENDEZVOUS_PORT";

/// The port rank 0 listens on, given `MASTER_PORT` and a reader of the environment:
/// `RECYCLE_RENDEZVOUS_PORT` when set; otherwise `MASTER_PORT`, except when torchrun's launcher
/// already serves its own store there (it says so with `TORCHELASTIC_USE_AGENT_STORE=True`),
/// in which case the next port, `MASTER_PORT + 1`.
pub fn port_from_env(master_port: u16, env: impl Fn(&str) -> Option<String>) -> Result<u16> {
    if let Some(v) = env(PORT_ENV) {
        return match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(Error::Invalid(format!(
                "{PORT_ENV}={v:?}: give a TCP port, 1 to 65535"
            ))),
        };
    }
    let shared_store = env("TORCHELASTIC_USE_AGENT_STORE")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true") || v.trim() == "1");
    if !shared_store {
        return Ok(master_port);
    }
    master_port.checked_add(1).ok_or_else(|| {
        Error::Invalid(format!(
            "MASTER_PORT={master_port} is held by torchrun's store and there is no next port; \
             set {PORT_ENV} to a free port"
        ))
    })
}

fn check_rank(rank: usize, world: usize) -> Result<()> {
    if world == 0 {
        return Err(Error::Invalid(
            "WORLD_SIZE is 0: a launch has at least one rank".to_string(),
        ));
    }
    if rank >= world {
        return Err(Error::Invalid(format!(
            "RANK={rank} is not below WORLD_SIZE={world}: ranks are 0..{world}"
        )));
    }
    Ok(())
}

fn resolve(addr: &str) -> std::result::Result<Vec<SocketAddr>, String> {
    let found: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("the address does not resolve: {e}"))?
        .collect();
    if found.is_empty() {
        return Err("the address resolves to nothing".to_string());
    }
    Ok(found)
}

/// Rank 0's side, listening. Made first so a test (or a launcher) can bind port 0 and hand
/// the chosen port to the other ranks.
#[derive(Debug)]
pub struct Host {
    listener: TcpListener,
    addr: String,
}

impl Host {
    /// Listens on `addr` (`MASTER_ADDR:MASTER_PORT`).
    pub fn bind(addr: &str) -> Result<Host> {
        let bind_err = |reason: String| Error::Bind {
            addr: addr.to_string(),
            reason,
        };
        let candidates = resolve(addr).map_err(bind_err)?;
        let listener = TcpListener::bind(&candidates[..]).map_err(|e| bind_err(e.to_string()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| bind_err(e.to_string()))?;
        // Messages name the port actually bound when the system chose it.
        let named = match listener.local_addr() {
            Ok(local) if addr.ends_with(":0") => local.to_string(),
            _ => addr.to_string(),
        };
        Ok(Host {
            listener,
            addr: named,
        })
    }

    /// The address actually bound (its port, when `bind` was given port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Waits until ranks `1..world` have each said hello once (or `timeout` passes), checks
    /// them, and sends each `payload`. On any failure every rank that arrived is told why.
    pub fn serve(self, world: usize, payload: &[u8], timeout: Duration) -> Result<()> {
        check_rank(0, world)?;
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Invalid(format!(
                "a payload of {} bytes; at most {MAX_PAYLOAD}",
                payload.len()
            )));
        }
        let deadline = Instant::now() + timeout;
        // Indexed by rank: the stream and the peer's address.
        let mut arrived: Vec<Option<(TcpStream, SocketAddr)>> = (0..world).map(|_| None).collect();
        let outcome = self.gather(world, deadline, timeout, &mut arrived);
        let mut sent = Ok(());
        for (rank, slot) in arrived.iter_mut().enumerate() {
            let Some((stream, _)) = slot else { continue };
            let r = match &outcome {
                Ok(()) => answer(stream, STATUS_OK, payload),
                Err(e) => answer(stream, STATUS_FAILED, e.to_string().as_bytes()),
            };
            if let (Err(e), Ok(())) = (r, &sent) {
                sent = Err(Error::Io {
                    addr: self.addr.clone(),
                    rank,
                    what: "sending the answer to this rank".to_string(),
                    reason: e.to_string(),
                });
            }
        }
        outcome.and(sent)
    }

    fn gather(
        &self,
        world: usize,
        deadline: Instant,
        timeout: Duration,
        arrived: &mut [Option<(TcpStream, SocketAddr)>],
    ) -> Result<()> {
        while arrived[1..].iter().any(Option::is_none) {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Missing {
                    addr: self.addr.clone(),
                    missing: (1..world).filter(|r| arrived[*r].is_none()).collect(),
                    world,
                    secs: timeout.as_secs_f64(),
                });
            }
            let (mut stream, peer) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5).min(deadline - now));
                    continue;
                }
                Err(e) => {
                    return Err(Error::Io {
                        addr: self.addr.clone(),
                        rank: 0,
                        what: "accepting a connection".to_string(),
                        reason: e.to_string(),
                    })
                }
            };
            let bad = |what: String| Error::BadMessage {
                addr: self.addr.clone(),
                peer: peer.to_string(),
                what,
            };
            // The hello follows the connect at once; a peer silent until the deadline is
            // treated as one that never came.
            let hello = stream
                .set_nonblocking(false)
                .and_then(|_| {
                    stream.set_read_timeout(Some(
                        deadline
                            .saturating_duration_since(Instant::now())
                            .max(Duration::from_millis(1)),
                    ))
                })
                .and_then(|_| read_exact_array::<HELLO_LEN>(&mut stream));
            let hello = match hello {
                Ok(h) => h,
                Err(e) if is_timeout(&e) => continue,
                Err(e) => return Err(bad(format!("no complete hello ({e})"))),
            };
            if hello[..8] != MAGIC {
                return Err(bad(format!(
                    "bytes {:02x?}, not a recycle rendezvous hello",
                    &hello[..8]
                )));
            }
            let version = u32_at(&hello, 8);
            if version != VERSION {
                return Err(bad(format!(
                    "a hello of protocol version {version}, but rank 0 speaks version {VERSION}"
                )));
            }
            let (rank, theirs) = (u32_at(&hello, 12) as usize, u32_at(&hello, 16) as usize);
            if theirs != world {
                // Told before the error is returned, since it is not in `arrived`.
                let e = Error::WorldMismatch {
                    addr: self.addr.clone(),
                    rank,
                    peer: peer.to_string(),
                    theirs,
                    ours: world,
                };
                let _ = answer(&mut stream, STATUS_FAILED, e.to_string().as_bytes());
                return Err(e);
            }
            if rank == 0 || rank >= world {
                let e = Error::BadMessage {
                    addr: self.addr.clone(),
                    peer: peer.to_string(),
                    what: format!(
                        "RANK={rank}, but rank 0 is this process and the others are 1..{world}"
                    ),
                };
                let _ = answer(&mut stream, STATUS_FAILED, e.to_string().as_bytes());
                return Err(e);
            }
            if let Some((_, first)) = &arrived[rank] {
                let e = Error::Duplicate {
                    addr: self.addr.clone(),
                    rank,
                    first: first.to_string(),
                    second: peer.to_string(),
                };
                let _ = answer(&mut stream, STATUS_FAILED, e.to_string().as_bytes());
                return Err(e);
            }
            arrived[rank] = Some((stream, peer));
        }
        Ok(())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

fn read_exact_array<const N: usize>(s: &mut TcpStream) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn answer(stream: &mut TcpStream, status: u8, body: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(8 + 4 + 1 + 4 + body.len());
    msg.extend_from_slice(&MAGIC);
    msg.extend_from_slice(&VERSION.to_le_bytes());
    msg.push(status);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&msg)?;
    stream.flush()
}

/// Rank `rank`'s side (not 0): connects to `addr`, retrying until `timeout` passes, says hello
/// and returns rank 0's payload. Waits for the answer up to `timeout` more, since rank 0 waits
/// that long for the last rank.
pub fn join(addr: &str, rank: usize, world: usize, timeout: Duration) -> Result<Vec<u8>> {
    check_rank(rank, world)?;
    if rank == 0 {
        return Err(Error::Invalid(
            "rank 0 hosts the rendezvous (Host::bind, Host::serve); it does not join it"
                .to_string(),
        ));
    }
    let start = Instant::now();
    let deadline = start + timeout;
    let unreachable = |reason: String| Error::Unreachable {
        rank,
        addr: addr.to_string(),
        secs: timeout.as_secs_f64(),
        reason,
    };
    let candidates = resolve(addr).map_err(unreachable)?;
    let mut stream = 'connect: loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(unreachable("the deadline passed".to_string()));
        }
        // Each resolved address in turn; the last failure is the one reported.
        let mut last = String::new();
        for a in &candidates {
            match TcpStream::connect_timeout(a, left) {
                Ok(s) => break 'connect s,
                Err(e) => last = format!("last attempt to {a}: {e}"),
            }
        }
        if Instant::now() + RETRY >= deadline {
            return Err(unreachable(last));
        }
        std::thread::sleep(RETRY);
    };
    let io_err = |what: &str, e: io::Error| Error::Io {
        addr: addr.to_string(),
        rank,
        what: what.to_string(),
        reason: if is_timeout(&e) {
            format!(
                "no answer from rank 0 within {:.1} s",
                2.0 * timeout.as_secs_f64()
            )
        } else {
            e.to_string()
        },
    };
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    stream
        .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
        .and_then(|_| stream.write_all(&hello))
        .map_err(|e| io_err("sending the hello", e))?;
    let answer_deadline = deadline + timeout;
    stream
        .set_read_timeout(Some(
            answer_deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .map_err(|e| io_err("waiting for the answer", e))?;
    let head = read_exact_array::<{ 8 + 4 + 1 + 4 }>(&mut stream)
        .map_err(|e| io_err("waiting for the answer", e))?;
    let bad = |what: String| Error::BadMessage {
        addr: addr.to_string(),
        peer: "rank 0".to_string(),
        what,
    };
    if head[..8] != MAGIC || u32_at(&head, 8) != VERSION {
        return Err(bad(format!(
            "an answer starting {:02x?} version {}, not this protocol's version {VERSION}",
            &head[..8],
            u32_at(&head, 8)
        )));
    }
    let len = u32_at(&head, 13) as usize;
    if len > MAX_PAYLOAD {
        return Err(bad(format!(
            "an answer of {len} bytes (at most {MAX_PAYLOAD})"
        )));
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .map_err(|e| io_err("reading the answer", e))?;
    match head[12] {
        STATUS_OK => Ok(body),
        STATUS_FAILED => Err(Error::Refused {
            addr: addr.to_string(),
            message: String::from_utf8_lossy(&body).into_owned(),
        }),
        s => Err(bad(format!("an answer with status {s}"))),
    }
}

/// The whole rendezvous for one rank: rank 0 binds `addr`, makes the payload with `make` and
/// serves it (returning it too); every other rank joins and returns what rank 0 sent.
pub fn exchange(
    addr: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
    make: impl FnOnce() -> std::result::Result<Vec<u8>, String>,
) -> Result<Vec<u8>> {
    check_rank(rank, world)?;
    if rank != 0 {
        return join(addr, rank, world, timeout);
    }
    // Bound before the payload is made, so a busy port is reported first.
    let host = Host::bind(addr)?;
    // On failure the others find no rank 0 and report it at their deadline.
    let payload =
        make().map_err(|m| Error::Invalid(format!("rank 0 could not make the payload: {m}")))?;
    host.serve(world, &payload, timeout)?;
    Ok(payload)
}

#[cfg(test)]
mod tests;
