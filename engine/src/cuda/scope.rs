//! Stream scopes: running a piece of work (a frozen teacher's forward) on another stream of a
//! GPU than the student's, and joining it back.
//!
//! Every engine op, allocation, free and copy goes to the stream of the calling thread's
//! *current role* on that GPU: the student stream outside any scope, the scope's stream
//! inside one. The role is a per-thread stack of `(ordinal, role)` entries, innermost last,
//! because the CUDA arms of the ops issue their work from the thread that calls them (none
//! hands GPU work to rayon), and because a thread-local needs no lock on the path of every launch.
//! A scope names its device: work on another GPU inside it stays on that GPU's student stream.
//!
//! [`on_stream`] orders the work three ways:
//! 1. on entry, the scope's stream waits (on the device) for an event recorded on the stream
//!    that was current before: inputs uploaded or computed there are ready;
//! 2. inside, everything goes to the scope's stream;
//! 3. on exit an event is recorded on the scope's stream, and the outputs come back in a
//!    [`Pending`]: its [`Pending::join`] makes the previous stream wait for that event and
//!    only then hands the outputs over. The join is deferred so that the caller can queue
//!    more work on the previous stream first (the student's forward), which then overlaps
//!    the scope's work; joining at scope exit would leave nothing to overlap with.
//!
//! A `Pending` dropped without `join` joins in its destructor before its outputs are
//! dropped, so an error path cannot free a buffer the scope's stream is still writing (see
//! the free rule in `memory.rs`).
//!
//! On the CPU a scope is a no-op: the closure runs, and `join` returns its result.

use std::cell::RefCell;

use crate::{Device, Result};

use super::StreamRole;

thread_local! {
    /// The scopes entered on this thread, innermost last.
    static SCOPES: RefCell<Vec<(usize, StreamRole)>> = const { RefCell::new(Vec::new()) };
}

/// The role whose stream the calling thread's work on `cuda:ordinal` goes to.
pub(crate) fn role_of(ordinal: usize) -> StreamRole {
    SCOPES.with(|s| {
        s.borrow()
            .iter()
            .rev()
            .find(|(o, _)| *o == ordinal)
            .map_or(StreamRole::Student, |&(_, r)| r)
    })
}

/// The stream role the calling thread's work on `device` goes to now: `Student` outside any
/// scope (and always for the CPU, which has no streams).
pub fn current_role(device: Device) -> StreamRole {
    match device {
        Device::Cpu => StreamRole::Student,
        Device::Cuda(n) => role_of(n),
    }
}

/// One entered scope: pops its entry when dropped, so the role is restored on every exit,
/// an unwinding panic included. (Without the `cuda` feature only the tests enter scopes.)
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct ScopeGuard {
    depth: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl ScopeGuard {
    pub(crate) fn enter(ordinal: usize, role: StreamRole) -> ScopeGuard {
        let depth = SCOPES.with(|s| {
            let mut s = s.borrow_mut();
            s.push((ordinal, role));
            s.len()
        });
        ScopeGuard { depth }
    }
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        // Scopes are strictly nested (a guard lives in one stack frame of `on_stream`), so
        // the entry to pop is the last one; truncating to below our depth also removes any
        // entry an inner guard leaked (`mem::forget`), keeping the stack consistent.
        SCOPES.with(|s| s.borrow_mut().truncate(self.depth - 1));
    }
}

/// The outputs of work queued on another stream, not yet ordered before the stream that
/// entered the scope. See the module doc.
#[must_use = "the outputs are not ready for the previous stream until `join` is called"]
pub struct Pending<T> {
    value: Option<T>,
    #[cfg(feature = "cuda")]
    join: Option<Join>,
}

impl<T> Pending<T> {
    /// Outputs that need no join (the CPU, or a scope on the stream already current).
    pub(crate) fn ready(value: T) -> Pending<T> {
        Pending {
            value: Some(value),
            #[cfg(feature = "cuda")]
            join: None,
        }
    }

    /// Whether `join` will order anything (false on the CPU and for a scope whose role was
    /// already current).
    pub fn needs_join(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.join.is_some()
        }
        #[cfg(not(feature = "cuda"))]
        {
            false
        }
    }

    /// Makes the stream that entered the scope wait (on the device: the host does not block)
    /// for the scope's work, and returns its outputs, which that stream may now use.
    pub fn join(mut self) -> Result<T> {
        #[cfg(feature = "cuda")]
        if let Some(j) = self.join.take() {
            if let Err(e) = j.complete() {
                self.leak();
                return Err(e);
            }
        }
        Ok(self
            .value
            .take()
            .expect("a Pending holds its value until joined"))
    }

    /// When neither the device nor the host could wait for the scope's work (the driver has
    /// failed: the context is unusable), the outputs are leaked rather than dropped: freeing
    /// them on the previous stream could hand memory the scope's stream may still write to a
    /// new buffer.
    #[cfg(feature = "cuda")]
    fn leak(&mut self) {
        if let Some(v) = self.value.take() {
            std::mem::forget(v);
        }
    }
}

impl<T> Drop for Pending<T> {
    fn drop(&mut self) {
        // Join before `value` (dropped after this body) frees anything on the previous
        // stream; an error is kept for the next `synchronize`.
        #[cfg(feature = "cuda")]
        if let Some(j) = self.join.take() {
            if let Err(e) = j.complete() {
                j.ctx.memory.defer(format!("joining a stream scope: {e}"));
                self.leak();
            }
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("value", &self.value)
            .field("needs_join", &self.needs_join())
            .finish()
    }
}

/// The event that ends a scope's work, and the stream to order after it.
#[cfg(feature = "cuda")]
pub(crate) struct Join {
    ctx: std::sync::Arc<super::CudaContext>,
    to: StreamRole,
    from: StreamRole,
    event: cudarc::driver::CudaEvent,
}

#[cfg(feature = "cuda")]
impl Join {
    /// `to` waits for the event on the device; should that fail, the host waits for it, so
    /// that what follows is ordered either way. Errors only when both fail.
    fn complete(&self) -> Result<()> {
        match self.ctx.wait(self.to, &self.event) {
            Ok(()) => Ok(()),
            Err(e) => self.event.synchronize().map_err(|_| e),
        }
    }
}

/// Runs `f` with the calling thread's work on `device` going to `role`'s stream, ordered
/// after the work queued so far on the stream that was current; returns its outputs to be
/// joined back (see the module doc). On the CPU, `f` runs and the result is ready at once.
///
/// Errors, before `f` runs, for a GPU this build or machine cannot open (the message says
/// what is missing); an error of `f` is returned after joining what it queued.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn on_stream<T>(
    device: Device,
    role: StreamRole,
    f: impl FnOnce() -> Result<T>,
) -> Result<Pending<T>> {
    match device {
        Device::Cpu => Ok(Pending::ready(f()?)),
        Device::Cuda(n) => with_backend!(n, on_cuda_stream(n, role, f)),
    }
}

#[cfg(feature = "cuda")]
fn on_cuda_stream<T>(
    ordinal: usize,
    role: StreamRole,
    f: impl FnOnce() -> Result<T>,
) -> Result<Pending<T>> {
    let ctx = super::context::get(ordinal)?;
    let from = role_of(ordinal);
    if from == role {
        // Already on that stream: program order is the stream's order.
        return Ok(Pending::ready(f()?));
    }
    let entry = ctx.record(from)?;
    ctx.wait(role, &entry)?;
    let out = {
        let _scope = ScopeGuard::enter(ordinal, role);
        f()
    };
    let join = match ctx.record(role) {
        Ok(event) => Join {
            ctx: ctx.clone(),
            to: from,
            from: role,
            event,
        },
        Err(e) => {
            // Without an event, wait on the host: nothing of the scope may stay unordered.
            // Should that fail too (a broken context), leak the outputs rather than free what
            // the scope's stream may still write (as `Pending::leak`).
            if let Err(s) = ctx.stream(role).synchronize() {
                std::mem::forget(out);
                return Err(super::context::driver_err(
                    ordinal,
                    &format!("synchronising a stream scope after: {e}"),
                    s,
                ));
            }
            return Err(e);
        }
    };
    match out {
        Ok(value) => Ok(Pending {
            value: Some(value),
            join: Some(join),
        }),
        Err(e) => {
            join.complete()?;
            Err(e)
        }
    }
}

#[cfg(feature = "cuda")]
impl std::fmt::Debug for Join {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Join({:?} after {:?})", self.to, self.from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn scopes_nest_and_restore_the_role() {
        assert_eq!(role_of(0), StreamRole::Student);
        {
            let _t = ScopeGuard::enter(0, StreamRole::Teacher);
            assert_eq!(role_of(0), StreamRole::Teacher);
            // Another GPU is not affected by a scope on cuda:0.
            assert_eq!(role_of(1), StreamRole::Student);
            {
                let _c = ScopeGuard::enter(1, StreamRole::Comm);
                let _s = ScopeGuard::enter(0, StreamRole::Student);
                assert_eq!(role_of(0), StreamRole::Student);
                assert_eq!(role_of(1), StreamRole::Comm);
                assert_eq!(current_role(Device::Cuda(1)), StreamRole::Comm);
            }
            assert_eq!(role_of(0), StreamRole::Teacher);
            assert_eq!(role_of(1), StreamRole::Student);
        }
        assert_eq!(role_of(0), StreamRole::Student);
        assert_eq!(current_role(Device::Cpu), StreamRole::Student);
    }

    #[test]
    fn a_panic_inside_a_scope_restores_the_role() {
        let r = std::panic::catch_unwind(|| {
            let _t = ScopeGuard::enter(2, StreamRole::Teacher);
            assert_eq!(role_of(2), StreamRole::Teacher);
            panic!("inside the scope");
        });
        assert!(r.is_err());
        assert_eq!(role_of(2), StreamRole::Student);
    }

    #[test]
    fn scopes_are_per_thread() {
        let _t = ScopeGuard::enter(0, StreamRole::Teacher);
        let other = std::thread::spawn(|| role_of(0)).join().unwrap();
        assert_eq!(other, StreamRole::Student);
        assert_eq!(role_of(0), StreamRole::Teacher);
    }

    #[test]
    fn on_the_cpu_a_scope_runs_the_closure_at_once() {
        let mut ran = false;
        let p = on_stream(Device::Cpu, StreamRole::Teacher, || {
            ran = true;
            // The CPU has no streams: the role inside stays the student's.
            Ok(current_role(Device::Cpu))
        })
        .unwrap();
        assert!(ran, "the closure runs before join");
        assert!(!p.needs_join());
        assert_eq!(p.join().unwrap(), StreamRole::Student);
        let e = on_stream::<()>(Device::Cpu, StreamRole::Teacher, || {
            Err(Error::invalid("teacher", "failed".to_string()))
        })
        .unwrap_err();
        assert!(e.to_string().contains("failed"), "{e}");
        // Dropping an unjoined Pending drops its value.
        let counted = std::rc::Rc::new(());
        let p = on_stream(Device::Cpu, StreamRole::Teacher, || Ok(counted.clone())).unwrap();
        assert_eq!(std::rc::Rc::strong_count(&counted), 2);
        drop(p);
        assert_eq!(std::rc::Rc::strong_count(&counted), 1);
    }

    #[test]
    fn a_gpu_scope_without_a_gpu_is_an_error_before_the_closure_runs() {
        use crate::device::tests::MISSING_GPU;
        let mut ran = false;
        let e = on_stream(Device::Cuda(MISSING_GPU), StreamRole::Teacher, || {
            ran = true;
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(!ran, "nothing runs when the device cannot be opened");
        assert!(e.contains(&format!("cuda:{MISSING_GPU}")), "{e}");
        #[cfg(not(feature = "cuda"))]
        assert!(e.contains("no CUDA backend"), "{e}");
        #[cfg(feature = "cuda")]
        assert!(
            e.contains("driver") || e.contains("GPU") || e.contains("kernels"),
            "{e}"
        );
        assert_eq!(role_of(0), StreamRole::Student);
    }
}
