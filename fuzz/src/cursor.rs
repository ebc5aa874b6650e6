//! The fields a fuzz target reads off the front of its input.

/// Reads fields off the front of the input, zero when it runs out.
pub struct Cursor<'a>(pub &'a [u8]);

impl Cursor<'_> {
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = N.min(self.0.len());
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }
    pub fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    pub fn f32(&mut self) -> f32 {
        f32::from_le_bytes(self.bytes())
    }
    pub fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.bytes())
    }
}
