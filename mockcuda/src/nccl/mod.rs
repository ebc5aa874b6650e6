//! The mock NCCL (`libnccl.so.2`): communicators of one process (`ncclCommInitAll`, one per
//! device) and across processes (`ncclGetUniqueId`, `ncclCommInitRank`, and
//! `ncclCommInitRankConfig`, blocking or not: `net`), groups, and
//! all-reduce (sum, prod, max, min, avg) on fp32 and bf16, queued on the caller's stream with
//! the bytes it reads and writes. A collective that fails (a peer gone or late) fails its
//! stream's work, and `ncclCommGetAsyncError` reports it, as NCCL does; `ncclCommAbort` closes
//! the communicator so its peers fail at once.
//!
//! Groups are per thread, as NCCL's are: the calls between `ncclGroupStart` and the
//! outermost `ncclGroupEnd` are checked when made and queued on their streams at the end.
//! The mock checks devices only for being distinct and non-negative (the driver owns the
//! device count), and assumes each rank's stream has its own worker: the ranks meet inside
//! the queued work.

// The entry points' contracts are NVIDIA's documentation of the C API.
#![allow(clippy::missing_safety_doc)]

pub mod collective;
pub mod net;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex};

use crate::error::{unimplemented, MockError};
use crate::libcommon::{explain, Elem, HostRange, Registry};
use crate::stream::{enqueue, Access, Work};

use collective::{Clique, Part, RedOp};

/// `ncclResult_t`.
pub type NcclResult = u32;
pub const SUCCESS: NcclResult = 0;
pub const UNHANDLED_CUDA_ERROR: NcclResult = 1;
pub const INVALID_ARGUMENT: NcclResult = 4;
pub const INVALID_USAGE: NcclResult = 5;
/// `ncclInProgress`: a non-blocking communicator's call is not done yet.
pub const IN_PROGRESS: NcclResult = 7;

/// The version reported: NCCL 2.30.0 (`major * 10000 + minor * 100 + patch`), the API the
/// bindings are for.
pub const VERSION: c_int = 2_30_00;

/// How a communicator meets its peers.
#[derive(Clone)]
pub enum Link {
    /// The communicators of one `ncclCommInitAll`, in this process.
    Local(Arc<Clique>),
    /// One rank of an `ncclCommInitRank` communicator, whose peers may be other processes.
    Net(Arc<net::NetComm>),
    /// A non-blocking `ncclCommInitRankConfig` still meeting its peers.
    Joining(Arc<net::Joining>),
}

/// One communicator: its link, rank, device, how many collectives it has issued, and the
/// first error of its queued work (what `ncclCommGetAsyncError` reports).
#[derive(Clone)]
pub struct Comm {
    pub link: Link,
    pub rank: usize,
    pub device: i32,
    pub issued: u64,
    pub failed: Arc<Mutex<Option<String>>>,
}

impl Comm {
    pub fn ranks(&self) -> usize {
        match &self.link {
            Link::Local(c) => c.ranks,
            Link::Net(n) => n.ranks,
            Link::Joining(j) => j.ranks,
        }
    }
}

/// `ncclRemoteError`: a peer failed or is gone.
pub const REMOTE_ERROR: NcclResult = 6;

static COMMS: Registry<Comm> = Registry::new();

/// An operation checked inside a group, queued when the group ends.
struct Launch {
    stream: usize,
    name: String,
    accesses: Vec<Access>,
    work: Work,
}

thread_local! {
    /// The group depth of this thread and the calls it holds.
    static GROUP: RefCell<(usize, Vec<Launch>)> = const { RefCell::new((0, Vec::new())) };
}

fn refuse(function: &str, r: NcclResult, msg: &str) -> NcclResult {
    explain("NCCL", function, msg);
    r
}

/// The text of a result, NUL-terminated.
pub fn result_text(r: NcclResult) -> &'static str {
    match r {
        SUCCESS => "no error\0",
        UNHANDLED_CUDA_ERROR => "unhandled cuda error (run with NCCL_DEBUG=INFO for details)\0",
        2 => "unhandled system error (run with NCCL_DEBUG=INFO for details)\0",
        3 => "internal error - please report this issue to the NCCL developers\0",
        INVALID_ARGUMENT => "invalid argument (run with NCCL_DEBUG=WARN for details)\0",
        INVALID_USAGE => "invalid usage (run with NCCL_DEBUG=WARN for details)\0",
        REMOTE_ERROR => "remote process exited or there was a network error\0",
        IN_PROGRESS => "NCCL operation in progress\0",
        _ => "unknown result code\0",
    }
}

#[no_mangle]
pub extern "C" fn ncclGetErrorString(r: NcclResult) -> *const c_char {
    result_text(r).as_ptr() as *const c_char
}

#[no_mangle]
pub unsafe extern "C" fn ncclGetVersion(version: *mut c_int) -> NcclResult {
    if version.is_null() {
        return refuse("ncclGetVersion", INVALID_ARGUMENT, "null version");
    }
    *version = VERSION;
    SUCCESS
}

/// The devices of an `ncclCommInitAll`: `devlist`, or `0..ndev` when it is null; distinct
/// and non-negative.
pub fn devices(ndev: c_int, devlist: Option<&[c_int]>) -> Result<Vec<i32>, String> {
    if ndev < 1 {
        return Err(format!("ndev {ndev}: at least one device"));
    }
    let devs: Vec<i32> = match devlist {
        Some(l) => l.to_vec(),
        None => (0..ndev).collect(),
    };
    for (i, d) in devs.iter().enumerate() {
        if *d < 0 || devs[..i].contains(d) {
            return Err(format!(
                "device list {devs:?}: device {d} is negative or appears twice"
            ));
        }
    }
    Ok(devs)
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommInitAll(
    comms: *mut *mut c_void,
    ndev: c_int,
    devlist: *const c_int,
) -> NcclResult {
    const F: &str = "ncclCommInitAll";
    if comms.is_null() {
        return refuse(F, INVALID_ARGUMENT, "null comms");
    }
    let list = (!devlist.is_null() && ndev > 0)
        .then(|| std::slice::from_raw_parts(devlist, ndev as usize));
    let devs = match devices(ndev, list) {
        Ok(d) => d,
        Err(m) => return refuse(F, INVALID_ARGUMENT, &m),
    };
    let clique = Arc::new(Clique::new(devs.len()));
    for (rank, device) in devs.into_iter().enumerate() {
        *comms.add(rank) = COMMS.insert(Comm {
            link: Link::Local(clique.clone()),
            rank,
            device,
            issued: 0,
            failed: Arc::default(),
        });
    }
    SUCCESS
}

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [u8; net::ID_BYTES],
}

#[no_mangle]
pub unsafe extern "C" fn ncclGetUniqueId(id: *mut UniqueId) -> NcclResult {
    if id.is_null() {
        return refuse("ncclGetUniqueId", INVALID_ARGUMENT, "null id");
    }
    (*id).internal = net::new_id();
    SUCCESS
}

/// The arguments both init functions check: a place for the communicator, `rank` in
/// `0..nranks`.
fn check_init(
    f: &str,
    comm: *mut *mut c_void,
    nranks: c_int,
    rank: c_int,
) -> Result<(), NcclResult> {
    if comm.is_null() {
        return Err(refuse(f, INVALID_ARGUMENT, "null comm"));
    }
    if nranks < 1 || rank < 0 || rank >= nranks {
        let m = format!("rank {rank} of nranks {nranks}: ranks are 0..nranks");
        return Err(refuse(f, INVALID_ARGUMENT, &m));
    }
    Ok(())
}

/// `ncclCommInitRank`: blocks until all `nranks` ranks have called it with the same id (or
/// the peer timeout passes). The device is the calling thread's, the mock's only one.
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRank(
    comm: *mut *mut c_void,
    nranks: c_int,
    id: UniqueId,
    rank: c_int,
) -> NcclResult {
    const F: &str = "ncclCommInitRank";
    if let Err(r) = check_init(F, comm, nranks, rank) {
        return r;
    }
    let timeout = match net::peer_timeout() {
        Ok(t) => t,
        Err(m) => return refuse(F, INVALID_ARGUMENT, &m),
    };
    match net::NetComm::init(&id.internal, nranks as usize, rank as usize, timeout) {
        Ok(n) => {
            *comm = COMMS.insert(Comm {
                link: Link::Net(Arc::new(n)),
                rank: rank as usize,
                device: 0,
                issued: 0,
                failed: Arc::default(),
            });
            SUCCESS
        }
        // A bad id is the caller's; a peer that never came is a remote failure.
        Err(m) if m.contains("magic") => refuse(F, INVALID_ARGUMENT, &m),
        Err(m) => refuse(F, REMOTE_ERROR, &m),
    }
}

/// The head of `ncclConfig_t` (every version starts so): the fields the mock reads.
#[repr(C)]
pub struct ConfigHead {
    pub size: usize,
    pub magic: u32,
    pub version: u32,
    pub blocking: c_int,
}

/// `NCCL_CONFIG_INITIALIZER`'s magic.
pub const CONFIG_MAGIC: u32 = 0xcafe_beef;

/// `ncclCommInitRankConfig`: `ncclCommInitRank`, unless `config.blocking` is 0: then the
/// communicator is returned at once and meets its peers on a thread of its own;
/// `ncclCommGetAsyncError` says `ncclInProgress` until it has, then `ncclSuccess` (or the
/// failure), and `ncclCommAbort` gives the meeting up. Other calls on it meanwhile are
/// refused (`ncclInvalidUsage`), as NCCL asks callers to wait.
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRankConfig(
    comm: *mut *mut c_void,
    nranks: c_int,
    id: UniqueId,
    rank: c_int,
    config: *const ConfigHead,
) -> NcclResult {
    const F: &str = "ncclCommInitRankConfig";
    // NCCL_CONFIG_UNDEF_INT (or no config) leaves NCCL's default: blocking.
    let blocking = match config.as_ref() {
        None => true,
        Some(c) if c.magic != CONFIG_MAGIC || c.size < std::mem::size_of::<ConfigHead>() => {
            return refuse(
                F,
                INVALID_ARGUMENT,
                &format!(
                    "config magic {:#x}, size {}: start from NCCL_CONFIG_INITIALIZER",
                    c.magic, c.size
                ),
            )
        }
        Some(c) => c.blocking != 0,
    };
    if blocking {
        return ncclCommInitRank(comm, nranks, id, rank);
    }
    if let Err(r) = check_init(F, comm, nranks, rank) {
        return r;
    }
    if let Err(m) = net::meeting_dir(&id.internal) {
        return refuse(F, INVALID_ARGUMENT, &m);
    }
    let timeout = match net::peer_timeout() {
        Ok(t) => t,
        Err(m) => return refuse(F, INVALID_ARGUMENT, &m),
    };
    let joining = net::Joining::start(id.internal, nranks as usize, rank as usize, timeout);
    *comm = COMMS.insert(Comm {
        link: Link::Joining(Arc::new(joining)),
        rank: rank as usize,
        device: 0,
        issued: 0,
        failed: Arc::default(),
    });
    IN_PROGRESS
}

/// Closes a communicator's connections (its peers fail at once rather than at the timeout),
/// or gives up the meeting of one still joining.
fn close(c: &Comm) {
    match &c.link {
        Link::Net(n) => n.shut_down(),
        Link::Joining(j) => j.cancel(),
        Link::Local(_) => {}
    }
}

/// The state of a communicator made without blocking: `None` once it has joined (now a
/// `Link::Net`), else its `ncclCommGetAsyncError` result (in progress, or the failure, which
/// went to stderr).
fn joined(comm: *mut c_void, c: &Comm) -> Option<NcclResult> {
    let Link::Joining(j) = &c.link else {
        return None;
    };
    match j.outcome() {
        None => Some(IN_PROGRESS),
        Some(Ok(n)) => {
            COMMS.update(comm, |c| c.link = Link::Net(n));
            None
        }
        Some(Err(m)) => {
            let mut failed = c.failed.lock().unwrap_or_else(|e| e.into_inner());
            if failed.is_none() {
                explain("NCCL", "ncclCommInitRankConfig", &m);
                *failed = Some(m.clone());
            }
            Some(if m.contains("magic") {
                INVALID_ARGUMENT
            } else {
                REMOTE_ERROR
            })
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommDestroy(comm: *mut c_void) -> NcclResult {
    if comm.is_null() {
        return SUCCESS;
    }
    match COMMS.remove(comm) {
        Some(c) => {
            close(&c);
            SUCCESS
        }
        None => refuse(
            "ncclCommDestroy",
            INVALID_ARGUMENT,
            &format!("{comm:?} is not a live communicator"),
        ),
    }
}

/// `ncclCommAbort`: frees the communicator without waiting for its queued work, which then
/// fails (its peers see the connections close).
#[no_mangle]
pub unsafe extern "C" fn ncclCommAbort(comm: *mut c_void) -> NcclResult {
    if comm.is_null() {
        return SUCCESS;
    }
    match COMMS.remove(comm) {
        Some(c) => {
            close(&c);
            SUCCESS
        }
        None => refuse(
            "ncclCommAbort",
            INVALID_ARGUMENT,
            &format!("{comm:?} is not a live communicator"),
        ),
    }
}

/// `ncclCommGetAsyncError`: for a communicator made without blocking, `ncclInProgress` until
/// it has joined its peers (or why it could not); then `ncclRemoteError` once a collective of
/// this communicator failed on its stream (the message went to stderr then), else
/// `ncclSuccess`.
#[no_mangle]
pub unsafe extern "C" fn ncclCommGetAsyncError(
    comm: *mut c_void,
    async_error: *mut NcclResult,
) -> NcclResult {
    match (COMMS.get(comm), async_error.is_null()) {
        (Some(c), false) => {
            if let Some(state) = joined(comm, &c) {
                *async_error = state;
                return SUCCESS;
            }
            let failed = c.failed.lock().unwrap_or_else(|e| e.into_inner()).is_some();
            *async_error = if failed { REMOTE_ERROR } else { SUCCESS };
            SUCCESS
        }
        _ => refuse(
            "ncclCommGetAsyncError",
            INVALID_ARGUMENT,
            "a dead communicator or a null output",
        ),
    }
}

/// Writes one property of a live communicator.
unsafe fn comm_query(
    function: &str,
    comm: *mut c_void,
    out: *mut c_int,
    f: impl Fn(&Comm) -> c_int,
) -> NcclResult {
    match (COMMS.get(comm), out.is_null()) {
        (Some(c), false) => {
            *out = f(&c);
            SUCCESS
        }
        _ => refuse(
            function,
            INVALID_ARGUMENT,
            "a dead communicator or a null output",
        ),
    }
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommCount(comm: *mut c_void, count: *mut c_int) -> NcclResult {
    comm_query("ncclCommCount", comm, count, |c| c.ranks() as c_int)
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommCuDevice(comm: *mut c_void, device: *mut c_int) -> NcclResult {
    comm_query("ncclCommCuDevice", comm, device, |c| c.device)
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommUserRank(comm: *mut c_void, rank: *mut c_int) -> NcclResult {
    comm_query("ncclCommUserRank", comm, rank, |c| c.rank as c_int)
}

#[no_mangle]
pub extern "C" fn ncclGroupStart() -> NcclResult {
    GROUP.with(|g| g.borrow_mut().0 += 1);
    SUCCESS
}

#[no_mangle]
pub extern "C" fn ncclGroupEnd() -> NcclResult {
    let held = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.0 == 0 {
            return None;
        }
        g.0 -= 1;
        Some(if g.0 == 0 {
            std::mem::take(&mut g.1)
        } else {
            Vec::new()
        })
    });
    let Some(held) = held else {
        return refuse(
            "ncclGroupEnd",
            INVALID_USAGE,
            "no group was started on this thread",
        );
    };
    let mut result = SUCCESS;
    for l in held {
        if let Err(e) = enqueue(l.stream as *mut c_void, l.name, l.accesses, l.work) {
            result = refuse("ncclGroupEnd", UNHANDLED_CUDA_ERROR, &e.0);
        }
    }
    result
}

/// `ncclDataType_t` as the mock's element types: fp32 (7) and bf16 (9).
fn elem_of(dtype: u32) -> Elem {
    match dtype {
        7 => Elem::F32,
        9 => Elem::Bf16,
        other => unimplemented(
            "ncclAllReduce",
            &format!("ncclDataType_t {other} (ncclFloat32 = 7 and ncclBfloat16 = 9 are modelled)"),
        ),
    }
}

fn op_of(op: u32) -> Option<RedOp> {
    Some(match op {
        0 => RedOp::Sum,
        1 => RedOp::Prod,
        2 => RedOp::Max,
        3 => RedOp::Min,
        4 => RedOp::Avg,
        _ => return None,
    })
}

#[no_mangle]
pub unsafe extern "C" fn ncclAllReduce(
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype: u32,
    op: u32,
    comm: *mut c_void,
    stream: *mut c_void,
) -> NcclResult {
    const F: &str = "ncclAllReduce";
    let Some(op) = op_of(op) else {
        return refuse(
            F,
            INVALID_ARGUMENT,
            &format!("reduction {op} (user-defined ones are not modelled)"),
        );
    };
    let elem = elem_of(dtype);
    match COMMS.get(comm) {
        None => {
            return refuse(
                F,
                INVALID_ARGUMENT,
                &format!("{comm:?} is not a live communicator"),
            )
        }
        Some(Comm {
            link: Link::Joining(_),
            ..
        }) => {
            return refuse(
                F,
                INVALID_USAGE,
                "the communicator is still joining its peers: poll ncclCommGetAsyncError until \
                 ncclSuccess first",
            )
        }
        Some(_) => {}
    }
    let len = count * elem.size();
    if len > 0 && (send.is_null() || recv.is_null()) {
        return refuse(F, INVALID_ARGUMENT, "a null buffer");
    }
    // The in-process clique waits for its peers as long as the ranks of other processes do.
    let timeout = match net::peer_timeout() {
        Ok(t) => t,
        Err(m) => return refuse(F, INVALID_ARGUMENT, &m),
    };
    let (send, recv) = (send as u64, recv as u64);
    let resolved = HostRange::resolve(send, len, "ncclAllReduce sendbuff")
        .and_then(|s| Ok((s, HostRange::resolve(recv, len, "ncclAllReduce recvbuff")?)));
    let (sr, rr) = match resolved {
        Ok(v) => v,
        Err(e) => return refuse(F, INVALID_ARGUMENT, &e.0),
    };
    let c = COMMS
        .update(comm, |c| {
            c.issued += 1;
            c.clone()
        })
        .expect("checked above");
    let seq = c.issued;
    let part = Part {
        send: sr,
        recv: rr,
        count,
        elem,
        op,
    };
    let launch = Launch {
        stream: stream as usize,
        name: format!(
            "ncclAllReduce #{seq} rank {} of {} ({count} x {elem:?}, {op:?})",
            c.rank,
            c.ranks()
        ),
        accesses: vec![Access::Read(send, len), Access::Write(recv, len)],
        work: Box::new(move || {
            let r = match &c.link {
                Link::Local(clique) => clique.all_reduce(seq, c.rank, part, timeout),
                // SAFETY: the ranges were resolved inside live allocations at the call, and
                // the stream runs nothing else until this returns.
                Link::Net(n) => unsafe { n.all_reduce(seq, part) }.map_err(MockError),
                Link::Joining(_) => Err(MockError(
                    "ncclAllReduce on a communicator still joining".into(),
                )),
            };
            if let Err(e) = &r {
                let mut failed = c.failed.lock().unwrap_or_else(|p| p.into_inner());
                failed.get_or_insert_with(|| e.0.clone());
            }
            r
        }),
    };
    let in_group = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.0 > 0 {
            g.1.push(launch);
            None
        } else {
            Some(launch)
        }
    });
    match in_group {
        None => SUCCESS,
        Some(l) => match enqueue(l.stream as *mut c_void, l.name, l.accesses, l.work) {
            Ok(()) => SUCCESS,
            Err(e) => refuse(F, UNHANDLED_CUDA_ERROR, &e.0),
        },
    }
}
