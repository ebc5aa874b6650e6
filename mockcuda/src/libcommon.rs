//! What cuBLASLt, cuDNN and NCCL share in the mock: opaque handles, element types, and the
//! host view of a device range.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use half::bf16;

use crate::error::MockError;
use crate::memory::{host_range, DevicePtr};

/// Handles are addresses in a range no allocation uses, counted up once per object of any
/// library, so a handle of one kind never names an object of another (a layout passed where a
/// descriptor is expected is an invalid handle, as it would be to the real library).
static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(0x6d6f_0000_0000);

/// The live objects of one kind, by handle: a destroyed or made-up handle is found missing
/// instead of being dereferenced.
pub struct Registry<T> {
    live: Mutex<BTreeMap<usize, T>>,
}

impl<T: Clone> Registry<T> {
    pub const fn new() -> Self {
        Registry {
            live: Mutex::new(BTreeMap::new()),
        }
    }

    /// Keeps `value` and returns its new handle.
    pub fn insert(&self, value: T) -> *mut c_void {
        let h = NEXT_HANDLE.fetch_add(0x40, Ordering::Relaxed);
        self.lock().insert(h, value);
        h as *mut c_void
    }

    /// A copy of the object `h` names, if it is alive.
    pub fn get(&self, h: *const c_void) -> Option<T> {
        self.lock().get(&(h as usize)).cloned()
    }

    /// Changes the object `h` names; `None` when it is not alive.
    pub fn update<R>(&self, h: *const c_void, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        self.lock().get_mut(&(h as usize)).map(f)
    }

    /// Forgets the object `h` names; `None` when it was not alive.
    pub fn remove(&self, h: *const c_void) -> Option<T> {
        self.lock().remove(&(h as usize))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, T>> {
        // A panic while holding the map leaves it consistent (every change is one call).
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Clone> Default for Registry<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// The element types the mock's libraries compute on: fp32, and bf16 widened to fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Elem {
    F32,
    Bf16,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::Bf16 => 2,
        }
    }

    /// Element `i` of `bytes`, as fp32 (exact for both types).
    pub fn load(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            Elem::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes")),
            Elem::Bf16 => bf16::from_bits(u16::from_le_bytes(
                bytes[2 * i..2 * i + 2].try_into().expect("2 bytes"),
            ))
            .to_f32(),
        }
    }

    /// Stores `v` as element `i` of `bytes`, rounded to nearest even for bf16.
    pub fn store(self, bytes: &mut [u8], i: usize, v: f32) {
        match self {
            Elem::F32 => bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
            Elem::Bf16 => {
                bytes[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes())
            }
        }
    }
}

/// `v` rounded to TF32 (10 explicit mantissa bits, nearest even), what tensor cores read of an
/// fp32 operand when TF32 math is allowed.
pub fn round_tf32(v: f32) -> f32 {
    if !v.is_finite() {
        return v;
    }
    let bits = v.to_bits();
    let lsb = (bits >> 13) & 1;
    let rounded = bits.wrapping_add(0x0fff + lsb) & !0x1fff;
    f32::from_bits(rounded)
}

/// A device range resolved to host memory when an operation is queued, used by its work on
/// the stream's worker. The address is kept as an integer: the work is `Send`, and the race
/// detector, not the type system, orders the accesses.
#[derive(Debug, Clone, Copy)]
pub struct HostRange {
    pub addr: usize,
    pub len: usize,
}

impl HostRange {
    /// Resolves `len` bytes at `ptr` (an empty range needs no allocation).
    pub fn resolve(ptr: DevicePtr, len: usize, what: &str) -> Result<HostRange, MockError> {
        if len == 0 {
            return Ok(HostRange { addr: 0, len: 0 });
        }
        let p = host_range(ptr, len, what)?;
        Ok(HostRange {
            addr: p as usize,
            len,
        })
    }

    /// The bytes, read-only.
    ///
    /// # Safety
    /// The range must still be live and no `bytes_mut` of an overlapping range may be alive.
    pub unsafe fn bytes<'a>(&self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.addr as *const u8, self.len)
    }

    /// The bytes, writable.
    ///
    /// # Safety
    /// The range must still be live and no other view of an overlapping range may be alive.
    pub unsafe fn bytes_mut<'a>(&self) -> &'a mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len)
    }
}

/// Explains a refused call on stderr: the status code alone rarely says which argument was
/// wrong (the real libraries say it in their logs).
pub fn explain(library: &str, function: &str, message: &str) {
    eprintln!("mockcuda {library}: {function}: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_distinct_and_die_with_their_object() {
        let r: Registry<u32> = Registry::new();
        let a = r.insert(1);
        let b = r.insert(2);
        assert_ne!(a, b);
        assert_eq!(r.get(a), Some(1));
        assert_eq!(r.update(b, |v| *v += 5), Some(()));
        assert_eq!(r.get(b), Some(7));
        assert_eq!(r.remove(a), Some(1));
        assert_eq!(r.get(a), None);
        assert_eq!(r.remove(a), None);
        // Another kind's handle is not an object of this kind.
        let other: Registry<u8> = Registry::new();
        let c = other.insert(0);
        assert_eq!(r.get(c), None);
    }

    #[test]
    fn elements_round_trip_and_bf16_rounds_to_nearest_even() {
        let mut bytes = vec![0u8; 8];
        Elem::F32.store(&mut bytes, 1, -2.75);
        assert_eq!(Elem::F32.load(&bytes, 1), -2.75);
        // 1 + 2^-8 is halfway between two bf16 values: ties to the even one (1.0).
        Elem::Bf16.store(&mut bytes, 0, 1.0 + 1.0 / 256.0);
        assert_eq!(Elem::Bf16.load(&bytes, 0), 1.0);
        Elem::Bf16.store(&mut bytes, 3, 3.0 / 256.0 + 1.0);
        assert_eq!(Elem::Bf16.load(&bytes, 3), 1.0 + 1.0 / 64.0);
    }

    #[test]
    fn tf32_keeps_ten_mantissa_bits() {
        assert_eq!(round_tf32(1.0), 1.0);
        // 1 + 2^-11 is halfway: to even (1.0); 1 + 3 * 2^-11 rounds up to 1 + 2^-9.
        assert_eq!(round_tf32(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(round_tf32(1.0 + 3.0 * 2f32.powi(-11)), 1.0 + 2f32.powi(-9));
        assert_eq!(round_tf32(-1.0 - 2f32.powi(-10)), -1.0 - 2f32.powi(-10));
        assert!(round_tf32(f32::NAN).is_nan());
    }
}
