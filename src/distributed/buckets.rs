//! Buckets of the flat gradient buffer: contiguous runs of whole parameters of about a given
//! size, each reduced as soon as every parameter in it has its final gradient.
//!
//! The buffer holds the parameters in the forward's order and backward finishes them roughly
//! in reverse, so buckets are cut from the end of the buffer: the first bucket to fill is the
//! last layers', and its all-reduce runs while backward works on the layers before.

use std::ops::Range;

use recycle_engine::params::ParamEntry;

/// The default bucket size in bytes of f32 gradients. PyTorch DDP's 25 MB suits models of
/// 25M to 300M+ parameters; Recycle's CPU students (ResNet-18 at width 1/16 to 1/4: 11k to
/// 700k parameters, BERT-tiny: 4.4M) would fit in one such bucket, and one bucket cannot
/// overlap with anything. 1 MiB (262,144 gradients) gives those models 1 to 17 buckets, large
/// enough that the per-call latency of an all-reduce (tens of microseconds on one machine)
/// stays small beside its transfer.
pub const DEFAULT_BUCKET_BYTES: usize = 1 << 20;

/// The buckets of one model's gradient buffer and, during a step, what each still waits for.
///
/// Buckets are handed out in one order on every rank, from the end of the buffer to its
/// start, whatever order they fill in: collectives on a communicator must be called in the same
/// order by every rank, and a rank whose step failed before backward hands out all its buckets
/// at once. A bucket that fills before the ones after it waits for them (backward fills them
/// roughly in that order anyway).
#[derive(Debug, Clone)]
pub struct BucketPlan {
    /// Bucket ranges in the buffer, in buffer order.
    ranges: Vec<Range<usize>>,
    /// Gradients of each bucket not yet final in this step.
    left: Vec<usize>,
    /// Buckets handed out this step, counted from the last.
    started: usize,
}

impl BucketPlan {
    /// Buckets of at least `bucket_elems` gradients (the first one may be smaller), never
    /// splitting a parameter, over a buffer of `len` gradients laid out as `entries`.
    pub fn new(entries: &[ParamEntry], len: usize, bucket_elems: usize) -> BucketPlan {
        let bucket_elems = bucket_elems.max(1);
        let mut ranges = Vec::new();
        let mut end = len;
        let mut size = 0;
        for e in entries.iter().rev() {
            size += e.len();
            if size >= bucket_elems {
                ranges.push(e.offset..end);
                end = e.offset;
                size = 0;
            }
        }
        if end > 0 || ranges.is_empty() {
            ranges.push(0..end);
        }
        ranges.reverse();
        let left = ranges.iter().map(|r| r.len()).collect();
        BucketPlan {
            ranges,
            left,
            started: 0,
        }
    }

    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// Forgets the last step: every bucket waits for all its gradients again.
    pub fn reset(&mut self) {
        for (l, r) in self.left.iter_mut().zip(&self.ranges) {
            *l = r.len();
        }
        self.started = 0;
    }

    /// Records that gradients `offset..offset + len` (one parameter) are final; returns the
    /// buckets that may start now, in hand-out order.
    pub fn ready(&mut self, offset: usize, len: usize) -> Vec<Range<usize>> {
        let i = self.ranges.partition_point(|r| r.end <= offset);
        if let Some(r) = self.ranges.get(i) {
            if offset >= r.start && offset + len <= r.end {
                self.left[i] = self.left[i].saturating_sub(len);
            }
        }
        self.startable(false)
    }

    /// The buckets not handed out yet this step (parameters without a gradient, or a step
    /// that ended before backward), in hand-out order.
    pub fn take_rest(&mut self) -> Vec<Range<usize>> {
        self.startable(true)
    }

    fn startable(&mut self, all: bool) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        while self.started < self.ranges.len() {
            let i = self.ranges.len() - 1 - self.started;
            if !all && self.left[i] > 0 {
                break;
            }
            out.push(self.ranges[i].clone());
            self.started += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One range, as `ready` and `take_rest` return it.
    fn once(r: Range<usize>) -> Vec<Range<usize>> {
        std::iter::once(r).collect()
    }

    fn entries(sizes: &[usize]) -> (Vec<ParamEntry>, usize) {
        let mut offset = 0;
        let e = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let e = ParamEntry {
                    name: format!("p{i}"),
                    shape: vec![n],
                    offset,
                };
                offset += n;
                e
            })
            .collect();
        (e, offset)
    }

    #[test]
    fn buckets_cover_the_buffer_from_its_end_without_splitting_a_parameter() {
        let (e, len) = entries(&[3, 5, 2, 4, 6]);
        let plan = BucketPlan::new(&e, len, 6);
        // From the end: [6] then [2, 4] then [3, 5].
        assert_eq!(plan.ranges(), &[0..8, 8..14, 14..20]);
        let one = BucketPlan::new(&e, len, 1 << 20);
        assert_eq!((one.ranges().len(), &one.ranges()[0]), (1, &(0..20)));
        let each = BucketPlan::new(&e, len, 1);
        assert_eq!(each.ranges().len(), 5);
    }

    #[test]
    fn a_bucket_is_ready_once_all_its_parameters_are() {
        let (e, len) = entries(&[3, 5, 2, 4, 6]);
        let mut plan = BucketPlan::new(&e, len, 6);
        assert_eq!(plan.ready(14, 6), once(14..20));
        assert_eq!(plan.ready(10, 4).len(), 0);
        assert_eq!(plan.ready(8, 2), once(8..14));
        assert_eq!(plan.ready(8, 2).len(), 0, "a bucket is handed out once");
        // p0 and p1 never got a gradient: finish hands out their bucket.
        assert_eq!(plan.take_rest(), once(0..8));
        assert!(plan.take_rest().is_empty());
        // The first bucket fills first: it waits for the ones after it.
        plan.reset();
        assert_eq!(plan.ready(0, 3).len(), 0);
        assert_eq!(plan.ready(3, 5).len(), 0);
        assert_eq!(plan.ready(14, 6), once(14..20));
        assert_eq!(plan.take_rest(), vec![8..14, 0..8]);
    }
}
