//! Streams and events, and the race detector.
//!
//! INTERFACE (used by the libraries and the driver; keep these signatures):
//! - [`Access`]: a byte range an operation reads or writes.
//! - [`enqueue`]: queues an operation on a stream, after everything queued on it before; the
//!   race detector checks its accesses against other streams' unordered ones.
//!
//! Each stream is a worker thread that runs its queue in order. Order between streams comes
//! only from what CUDA defines: an event recorded on one stream and waited for by another, the
//! host waiting for a stream, an event or the context, and the legacy default stream's implicit
//! synchronisation with blocking streams. The detector mirrors that with vector clocks, updated
//! when the host queues work (the order of the calls is the order CUDA sees): every access is
//! checked against the last conflicting accesses of other streams to the same allocation, and
//! one that is not ordered after them is a race, reported with both operations, their streams
//! and the buffer. Errors of queued work are sticky, as CUDA's: every later call returns one.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use crate::error::MockError;
use crate::memory::{self, DevicePtr};

/// A byte range an operation touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read(DevicePtr, usize),
    Write(DevicePtr, usize),
}

/// The work of one queued operation; its error becomes the stream's (sticky) error.
pub type Work = Box<dyn FnOnce() -> Result<(), MockError> + Send>;

/// `CU_STREAM_LEGACY` and `CU_STREAM_PER_THREAD`, the special stream handles.
const STREAM_LEGACY: usize = 0x1;
const STREAM_PER_THREAD: usize = 0x2;

/// A fault (a race, a write outside an allocation) aborts the process unless a test asks for
/// a sticky error instead.
static ABORT_ON_FAULT: AtomicBool = AtomicBool::new(true);

/// Whether a fault (a race, or a guard byte overwritten) aborts the process (the default: a run
/// must not go on after one) or becomes the sticky error every later call returns (what the
/// mock's own tests use).
pub fn set_abort_on_fault(abort: bool) {
    ABORT_ON_FAULT.store(abort, Ordering::SeqCst);
}

/// A vector clock: per stream id, the last of its operations known to be ordered before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Clock(Vec<u64>);

impl Clock {
    fn get(&self, s: usize) -> u64 {
        self.0.get(s).copied().unwrap_or(0)
    }
    fn tick(&mut self, s: usize) -> u64 {
        if self.0.len() <= s {
            self.0.resize(s + 1, 0);
        }
        self.0[s] += 1;
        self.0[s]
    }
    fn join(&mut self, o: &Clock) {
        if self.0.len() < o.0.len() {
            self.0.resize(o.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a = (*a).max(*b);
        }
    }
}

/// Completion counters of one stream's queue.
struct Progress {
    queued: u64,
    done: u64,
}

/// One stream: its worker's queue and progress.
pub struct Stream {
    pub id: usize,
    /// Created with `CU_STREAM_NON_BLOCKING` (no implicit order with the legacy stream).
    pub non_blocking: bool,
    tx: Mutex<Sender<Job>>,
    progress: Arc<(Mutex<Progress>, Condvar)>,
}

type Job = Box<dyn FnOnce() + Send>;

impl Stream {
    fn new(id: usize, non_blocking: bool) -> Arc<Stream> {
        let (tx, rx) = channel::<Job>();
        let progress = Arc::new((Mutex::new(Progress { queued: 0, done: 0 }), Condvar::new()));
        let p = progress.clone();
        std::thread::Builder::new()
            .name(format!("mockcuda-stream-{id}"))
            .spawn(move || {
                for job in rx {
                    job();
                    let (m, cv) = &*p;
                    lock(m).done += 1;
                    cv.notify_all();
                }
            })
            .expect("spawning a stream worker thread");
        Arc::new(Stream {
            id,
            non_blocking,
            tx: Mutex::new(tx),
            progress,
        })
    }

    /// Queues a job; returns its position in the queue.
    fn push(&self, job: Job) -> u64 {
        let n = {
            let mut p = lock(&self.progress.0);
            p.queued += 1;
            p.queued
        };
        // The worker lives as long as the process (streams are never joined).
        let _ = lock(&self.tx).send(job);
        n
    }

    fn queued(&self) -> u64 {
        lock(&self.progress.0).queued
    }

    /// Blocks until the first `n` jobs have run.
    fn wait_done(&self, n: u64) {
        let (m, cv) = &*self.progress;
        let mut p = lock(m);
        while p.done < n {
            p = cv.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn is_idle(&self) -> bool {
        let p = lock(&self.progress.0);
        p.done == p.queued
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An event: the generation last recorded, the generation completed, and the clock of the
/// stream at the last record.
pub struct Event {
    pub timing: bool,
    state: Arc<(Mutex<EventState>, Condvar)>,
}

#[derive(Default)]
struct EventState {
    recorded: u64,
    completed: u64,
    /// The stream and its queue position of the last record, and its clock then.
    clock: Clock,
    at: Option<Instant>,
}

/// One recorded access, for the detector.
#[derive(Debug, Clone)]
struct Rec {
    stream: usize,
    epoch: u64,
    op: Arc<str>,
    lo: u64,
    hi: u64,
    write: bool,
}

struct Detector {
    streams: HashMap<usize, Arc<Stream>>,
    clocks: HashMap<usize, Clock>,
    /// What the host has waited for.
    host: Clock,
    next_stream: usize,
    /// Per allocation id: the accesses not yet known to be ordered before everything.
    recs: HashMap<u64, Vec<Rec>>,
    sticky: Option<MockError>,
}

fn detector() -> MutexGuard<'static, Detector> {
    static D: OnceLock<Mutex<Detector>> = OnceLock::new();
    lock(D.get_or_init(|| {
        let mut streams = HashMap::new();
        // Stream 0: the legacy default stream.
        streams.insert(0, Stream::new(0, false));
        Mutex::new(Detector {
            streams,
            clocks: HashMap::new(),
            host: Clock::default(),
            next_stream: 1,
            recs: HashMap::new(),
            sticky: None,
        })
    }))
}

/// The sticky error, for the driver's calls to return (first error of queued work or race).
pub fn sticky() -> Option<MockError> {
    detector().sticky.clone()
}

fn set_sticky(e: MockError) {
    eprintln!("mockcuda: {e}");
    let mut d = detector();
    if d.sticky.is_none() {
        d.sticky = Some(e);
    }
}

/// Creates a stream; returns its handle (`CUstream`).
pub fn create(non_blocking: bool) -> *mut c_void {
    let mut d = detector();
    let id = d.next_stream;
    d.next_stream += 1;
    d.streams.insert(id, Stream::new(id, non_blocking));
    // Work queued on a new stream follows what the host has already waited for.
    let host = d.host.clone();
    d.clocks.entry(id).or_default().join(&host);
    handle_of(id)
}

/// Handles are the stream id plus a constant, so they never collide with the special ones.
fn handle_of(id: usize) -> *mut c_void {
    (0x1000 + id * 16) as *mut c_void
}

fn id_of(handle: *mut c_void) -> Result<usize, MockError> {
    let h = handle as usize;
    match h {
        0 | STREAM_LEGACY => Ok(0),
        STREAM_PER_THREAD => Err(MockError(
            "CU_STREAM_PER_THREAD: the per-thread default stream is not modelled".into(),
        )),
        _ if h >= 0x1000 && (h - 0x1000).is_multiple_of(16) => Ok((h - 0x1000) / 16),
        _ => Err(MockError(format!("{handle:?} is not a stream handle"))),
    }
}

/// Destroys a stream: its queued work still runs (as CUDA's `cuStreamDestroy`).
pub fn destroy(handle: *mut c_void) -> Result<(), MockError> {
    let id = id_of(handle)?;
    if id == 0 {
        return Err(MockError(
            "the legacy default stream cannot be destroyed".into(),
        ));
    }
    let s = detector()
        .streams
        .remove(&id)
        .ok_or_else(|| MockError(format!("stream {handle:?} was destroyed before")))?;
    // Its worker ends when the queue (and the sender, dropped with the stream) is done.
    drop(s);
    Ok(())
}

fn stream(d: &Detector, id: usize) -> Result<Arc<Stream>, MockError> {
    d.streams
        .get(&id)
        .cloned()
        .ok_or_else(|| MockError(format!("stream {:?} was destroyed", handle_of(id))))
}

/// A readable name for a stream in reports.
fn stream_name(id: usize) -> String {
    if id == 0 {
        "the legacy default stream".into()
    } else {
        format!("stream {:?}", handle_of(id))
    }
}

/// Queues `work` on `stream` (a `CUstream`; null is the legacy default stream). `name` names
/// the operation in race reports and errors.
pub fn enqueue(
    stream: *mut c_void,
    name: String,
    accesses: Vec<Access>,
    work: Work,
) -> Result<(), MockError> {
    enqueue_op(stream, name, accesses, work, None)
}

/// Queues the free of the allocation at `ptr` on `stream` (`cuMemFreeAsync`): a write of the
/// whole allocation for the detector (a free before a pending use on another stream is a race),
/// after which any use is a use after free. The guards are checked when it runs.
pub fn enqueue_free(stream: *mut c_void, ptr: DevicePtr, what: &str) -> Result<(), MockError> {
    let a = memory::allocation_of(ptr)
        .filter(|a| a.ptr == ptr)
        .ok_or_else(|| {
            MockError(format!(
                "{what}: {ptr:#x} is not the start of a live device allocation"
            ))
        })?;
    let name = what.to_string();
    let id = a.id;
    enqueue_op(
        stream,
        format!("{what} of allocation #{id} ({ptr:#x}, {} bytes)", a.len),
        vec![Access::Write(ptr, a.len)],
        Box::new(move || {
            forget(id);
            memory::free(ptr, &name).map_err(fault)
        }),
        Some(ptr),
    )
}

fn enqueue_op(
    stream: *mut c_void,
    name: String,
    accesses: Vec<Access>,
    work: Work,
    freeing: Option<DevicePtr>,
) -> Result<(), MockError> {
    let id = id_of(stream).map_err(|e| MockError(format!("{name}: {e}")))?;
    let mut d = detector();
    if let Some(e) = &d.sticky {
        return Err(MockError(format!(
            "{name}: an earlier error is sticky: {e}"
        )));
    }
    let s = stream_ref(&d, id, &name)?;
    legacy_order(&mut d, &s);
    let host = d.host.clone();
    let clock = d.clocks.entry(id).or_default();
    clock.join(&host);
    let epoch = clock.tick(id);
    let clock = clock.clone();
    let op: Arc<str> = Arc::from(format!("{name} on {}", stream_name(id)).as_str());
    // Check every access first, then record them all.
    let mut resolved = Vec::with_capacity(accesses.len());
    for a in &accesses {
        let (ptr, len, write) = match *a {
            Access::Read(p, l) => (p, l, false),
            Access::Write(p, l) => (p, l, true),
        };
        if len == 0 {
            continue;
        }
        memory::host_range(ptr, len, &name)?;
        let alloc = memory::allocation_of(ptr)
            .ok_or_else(|| MockError(format!("{name}: {ptr:#x} lies in no live allocation")))?;
        if alloc.freeing {
            return Err(MockError(format!(
                "{name}: {len} bytes at {ptr:#x} in allocation #{} ({} bytes), whose \
                 cuMemFreeAsync is already queued (a use after free)",
                alloc.id, alloc.len
            )));
        }
        let (lo, hi) = (ptr, ptr + len as u64);
        if let Some(recs) = d.recs.get(&alloc.id) {
            for r in recs {
                if r.stream != id
                    && (r.write || write)
                    && r.lo < hi
                    && lo < r.hi
                    && clock.get(r.stream) < r.epoch
                {
                    let e = MockError(format!(
                        "stream race on device allocation #{} ({:#x}, {} bytes, from {}): \
                         {} {} {} bytes [{:#x}, {:#x}) while {} {} [{:#x}, {:#x}) and nothing \
                         orders the two (no event recorded after the first and waited for \
                         before the second, no host synchronisation between them)",
                        alloc.id,
                        alloc.ptr,
                        alloc.len,
                        alloc.made_by,
                        op,
                        if write { "writes" } else { "reads" },
                        hi - lo,
                        lo,
                        hi,
                        r.op,
                        if r.write { "wrote" } else { "read" },
                        r.lo,
                        r.hi,
                    ));
                    drop(d);
                    return Err(fault(e));
                }
            }
        }
        resolved.push((alloc.id, alloc.ptr, lo, hi, write));
    }
    for (aid, aptr, lo, hi, write) in resolved {
        let recs = d.recs.entry(aid).or_default();
        // A new access covers older ones of the same stream it includes.
        recs.retain(|r| !(r.stream == id && lo <= r.lo && r.hi <= hi && (write || !r.write)));
        recs.push(Rec {
            stream: id,
            epoch,
            op: op.clone(),
            lo,
            hi,
            write,
        });
        if write {
            memory::note_writer(aptr, &op);
        }
    }
    if let Some(p) = freeing {
        memory::mark_freeing(p, &name)?;
    }
    let progress_name = name;
    s.push(Box::new(move || {
        if sticky_set() {
            return;
        }
        if let Err(e) = work() {
            set_sticky(MockError(format!("{progress_name}: {e}")));
        }
    }));
    Ok(())
}

fn sticky_set() -> bool {
    detector().sticky.is_some()
}

fn stream_ref(d: &Detector, id: usize, name: &str) -> Result<Arc<Stream>, MockError> {
    stream(d, id).map_err(|e| MockError(format!("{name}: {e}")))
}

/// A fault: printed, then the process stops (or, for tests, the error becomes sticky).
pub fn fault(e: MockError) -> MockError {
    eprintln!("mockcuda: {e}");
    if ABORT_ON_FAULT.load(Ordering::SeqCst) {
        std::process::abort();
    }
    let mut d = detector();
    if d.sticky.is_none() {
        d.sticky = Some(e.clone());
    }
    e
}

/// The legacy default stream's implicit order: work on it waits for the work queued on every
/// blocking stream, and work on a blocking stream waits for the legacy stream's.
fn legacy_order(d: &mut Detector, s: &Arc<Stream>) {
    if s.non_blocking {
        return;
    }
    let others: Vec<Arc<Stream>> = if s.id == 0 {
        d.streams
            .values()
            .filter(|o| o.id != 0 && !o.non_blocking)
            .cloned()
            .collect()
    } else {
        d.streams.get(&0).cloned().into_iter().collect()
    };
    for o in others {
        if o.is_idle() && !d.clocks.contains_key(&o.id) {
            continue;
        }
        let n = o.queued();
        let oc = d.clocks.get(&o.id).cloned().unwrap_or_default();
        d.clocks.entry(s.id).or_default().join(&oc);
        let o2 = o.clone();
        s.push(Box::new(move || o2.wait_done(n)));
    }
}

/// Creates an event.
pub fn event_create(timing: bool) -> Box<Event> {
    Box::new(Event {
        timing,
        state: Arc::new((Mutex::new(EventState::default()), Condvar::new())),
    })
}

/// `cuEventRecord`: the event completes when the work queued on `stream` so far has run.
pub fn event_record(ev: &Event, stream: *mut c_void) -> Result<(), MockError> {
    let id = id_of(stream)?;
    let mut d = detector();
    let s = stream_ref(&d, id, "cuEventRecord")?;
    legacy_order(&mut d, &s);
    let host = d.host.clone();
    let clock = d.clocks.entry(id).or_default();
    clock.join(&host);
    let clock = clock.clone();
    let g = {
        let mut st = lock(&ev.state.0);
        st.recorded += 1;
        st.clock = clock;
        st.recorded
    };
    let state = ev.state.clone();
    s.push(Box::new(move || {
        let (m, cv) = &*state;
        let mut st = lock(m);
        st.completed = st.completed.max(g);
        st.at = Some(Instant::now());
        cv.notify_all();
    }));
    Ok(())
}

/// `cuStreamWaitEvent`: work queued on `stream` after this waits for the event's last record.
pub fn stream_wait_event(stream: *mut c_void, ev: &Event) -> Result<(), MockError> {
    let id = id_of(stream)?;
    let mut d = detector();
    let s = stream_ref(&d, id, "cuStreamWaitEvent")?;
    let (g, clock) = {
        let st = lock(&ev.state.0);
        (st.recorded, st.clock.clone())
    };
    if g == 0 {
        // Never recorded: CUDA treats it as complete.
        return Ok(());
    }
    legacy_order(&mut d, &s);
    d.clocks.entry(id).or_default().join(&clock);
    let state = ev.state.clone();
    s.push(Box::new(move || {
        let (m, cv) = &*state;
        let mut st = lock(m);
        while st.completed < g {
            st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }));
    Ok(())
}

/// `cuEventSynchronize`: the host waits for the event's last record.
pub fn event_synchronize(ev: &Event) -> Result<(), MockError> {
    let (g, clock) = {
        let st = lock(&ev.state.0);
        (st.recorded, st.clock.clone())
    };
    {
        let (m, cv) = &*ev.state;
        let mut st = lock(m);
        while st.completed < g {
            st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
    let mut d = detector();
    d.host.join(&clock);
    prune(&mut d);
    sticky_result(&d)
}

/// `cuEventQuery`: whether the event's last record has run (the host then knows it has).
pub fn event_query(ev: &Event) -> Result<bool, MockError> {
    let (done, clock) = {
        let st = lock(&ev.state.0);
        (st.completed >= st.recorded, st.clock.clone())
    };
    let mut d = detector();
    if done {
        d.host.join(&clock);
    }
    sticky_result(&d).map(|()| done)
}

/// `cuEventElapsedTime`: milliseconds between two completed records.
pub fn event_elapsed_ms(start: &Event, end: &Event) -> Result<f32, MockError> {
    if !start.timing || !end.timing {
        return Err(MockError(
            "an event created with CU_EVENT_DISABLE_TIMING has no time".into(),
        ));
    }
    let a = lock(&start.state.0).at;
    let b = lock(&end.state.0).at;
    match (a, b) {
        (Some(a), Some(b)) => Ok(if b >= a {
            (b - a).as_secs_f32() * 1e3
        } else {
            -((a - b).as_secs_f32() * 1e3)
        }),
        _ => Err(MockError("an event has not completed a record".into())),
    }
}

/// `cuStreamSynchronize`: the host waits for everything queued on `stream`.
pub fn synchronize(stream: *mut c_void) -> Result<(), MockError> {
    let id = id_of(stream)?;
    let (s, n, clock) = {
        let d = detector();
        let s = stream_ref(&d, id, "cuStreamSynchronize")?;
        let n = s.queued();
        let c = d.clocks.get(&id).cloned().unwrap_or_default();
        (s, n, c)
    };
    s.wait_done(n);
    let mut d = detector();
    d.host.join(&clock);
    prune(&mut d);
    sticky_result(&d)
}

/// `cuStreamQuery`: whether everything queued on `stream` has run.
pub fn query(stream: *mut c_void) -> Result<bool, MockError> {
    let id = id_of(stream)?;
    let mut d = detector();
    let s = stream_ref(&d, id, "cuStreamQuery")?;
    let idle = s.is_idle();
    if idle {
        let c = d.clocks.get(&id).cloned().unwrap_or_default();
        d.host.join(&c);
    }
    sticky_result(&d).map(|()| idle)
}

/// `cuCtxSynchronize`: the host waits for every stream.
pub fn synchronize_all() -> Result<(), MockError> {
    let all: Vec<(Arc<Stream>, u64, Clock)> = {
        let d = detector();
        d.streams
            .values()
            .map(|s| {
                (
                    s.clone(),
                    s.queued(),
                    d.clocks.get(&s.id).cloned().unwrap_or_default(),
                )
            })
            .collect()
    };
    let mut joined = Clock::default();
    for (s, n, c) in all {
        s.wait_done(n);
        joined.join(&c);
    }
    let mut d = detector();
    d.host.join(&joined);
    prune(&mut d);
    sticky_result(&d)
}

fn sticky_result(d: &Detector) -> Result<(), MockError> {
    match &d.sticky {
        Some(e) => Err(e.clone()),
        None => Ok(()),
    }
}

/// Drops the records the host has waited for: nothing queued later can race with them.
fn prune(d: &mut Detector) {
    let host = d.host.clone();
    d.recs.retain(|_, recs| {
        recs.retain(|r| host.get(r.stream) < r.epoch);
        !recs.is_empty()
    });
}

/// Forgets the records of a freed allocation (its id is never reused).
pub fn forget(allocation: u64) {
    detector().recs.remove(&allocation);
}
