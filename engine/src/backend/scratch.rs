//! Reusable f32 scratch buffers for the CPU kernels' temporaries (column matrices, product
//! outputs): a few buffers kept per thread and handed out by [`take`], so a hot path neither
//! allocates nor zeroes its temporaries on every call (a fresh `vec![0.0; n]` of a column
//! matrix costs a page-faulting allocation and a fill that the im2col overwrites anyway).

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

use rayon::prelude::*;

/// Buffers a thread keeps between calls: enough for the temporaries one convolution holds at
/// once (columns, their gradient, a gathered output gradient, a product's output).
const POOLED: usize = 4;

/// Largest buffer kept (16 MiB of f32): larger ones are freed on return, so one huge
/// convolution does not pin its columns in every thread for the rest of the process.
const MAX_KEPT: usize = 4 << 20;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` floats from this thread's pool; it goes back on drop.
pub struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

/// A buffer of `len` floats whose contents are **unspecified** (what an earlier user left, or
/// zeros): the caller writes every element it reads. Taken from this thread's pool when one
/// is there (the largest, grown if it is too short), else allocated.
pub fn take(len: usize) -> Scratch {
    let mut buf = POOL
        .try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
        .ok()
        .flatten()
        .unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    Scratch { buf, len }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.buf.is_empty() || self.buf.len() > MAX_KEPT {
            return;
        }
        let buf = std::mem::take(&mut self.buf);
        let _ = POOL.try_with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                if p.len() < POOLED {
                    p.push(buf);
                    // Largest last: `take` pops it, so buffers rarely need to grow.
                    p.sort_by_key(Vec::len);
                }
            }
        });
    }
}

impl Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

/// A fresh vector of `len` zeros, zeroed on all rayon threads when it is large: an op's
/// output called for on the calling thread, where a plain `vec![0.0; len]` of a large output
/// is a serial fill that leaves the other threads waiting.
pub fn zeroed(len: usize) -> Vec<f32> {
    if len < super::elementwise::PARALLEL_MIN {
        return vec![0.0; len];
    }
    let mut v: Vec<f32> = Vec::with_capacity(len);
    // Whole blocks, each a `memset` (element-wise collecting stores one float at a time).
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(1 << 14)
        .for_each(|block| block.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the first `len` elements were all written just above.
    unsafe { v.set_len(len) };
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_is_all_zeros_at_every_size() {
        for len in [0, 5, super::super::elementwise::PARALLEL_MIN + 3] {
            let v = zeroed(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x.to_bits() == 0));
        }
    }

    #[test]
    fn lends_the_asked_length_and_reuses_returned_buffers() {
        let mut a = take(100);
        assert_eq!(a.len(), 100);
        a.fill(7.0);
        let ptr = a.as_ptr();
        drop(a);
        // The same thread gets the same allocation back, stale contents and all.
        let b = take(60);
        assert_eq!(b.len(), 60);
        assert_eq!(b.as_ptr(), ptr);
        assert!(b.iter().all(|&v| v == 7.0));
        // Two at once are distinct buffers; a longer request grows one.
        let c = take(1000);
        assert_eq!(c.len(), 1000);
        assert_ne!(c.as_ptr(), b.as_ptr());
    }

    #[test]
    fn frees_buffers_beyond_the_kept_size() {
        let big = take(MAX_KEPT + 1);
        assert_eq!(big.len(), MAX_KEPT + 1);
        drop(big);
        assert!(take(8).buf.len() <= MAX_KEPT);
    }
}
