//! Launch configurations: the grid, block and scratch sizes of every kernel, from the shape
//! alone.
//!
//! Block sizes never depend on the device. Kernels that reduce (softmax, the losses, the
//! normalisations, the channel sums) add in an order fixed by their block size, so choosing it
//! from the shape makes every result reproducible from run to run and from GPU to GPU.
//!
//! Every function returns `Ok(None)` when there is nothing to launch (a zero-sized grid is an
//! invalid launch in CUDA) and an error when a shape exceeds what the kernels index (32-bit
//! sizes, CUDA's grid limits).

use std::fmt;

/// Threads of the grid-stride kernels (elementwise, dropout, optimizers, casts).
pub const ELEMENTWISE_BLOCK: u32 = 256;
/// Most blocks a grid-stride kernel is given; its threads then loop.
pub const ELEMENTWISE_MAX_BLOCKS: u32 = 1 << 16;
/// Largest block CUDA allows.
pub const MAX_BLOCK: u32 = 1024;
/// Largest grid.x (2^31 - 1).
pub const MAX_GRID_X: u64 = (1 << 31) - 1;
/// Largest grid.y and grid.z.
pub const MAX_GRID_YZ: u64 = 65_535;
/// Values of a row per thread that the row kernels aim at (`row_block`).
pub const VALUES_PER_THREAD: u32 = 8;
/// Positions per segment of the embedding backward's counting sort; also the block size of
/// its count and place kernels (`RK_EMBEDDING_SEGMENT` of embedding.cu).
pub const EMBEDDING_SEGMENT: u32 = crate::launchers::EMBEDDING_SEGMENT as u32;
/// Most blocks of `layernorm_bwd_*`, i.e. of partial dweight / dbias rows.
pub const LAYERNORM_BWD_MAX_BLOCKS: u32 = 256;
/// Values of a channel per block of the batch-norm reductions.
pub const BATCHNORM_VALUES_PER_SPLIT: u64 = 1 << 15;
/// Most blocks per channel of the batch-norm reductions.
pub const BATCHNORM_MAX_SPLITS: u32 = 64;

/// Grid, block and dynamic shared memory of one launch (`cuLaunchKernel`'s arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
}

impl LaunchConfig {
    fn linear(grid: u32, block: u32) -> Self {
        LaunchConfig {
            grid: [grid, 1, 1],
            block: [block, 1, 1],
            shared_mem_bytes: 0,
        }
    }

    /// Threads in one block.
    pub fn block_threads(&self) -> u32 {
        self.block.iter().product()
    }

    /// Blocks in the grid.
    pub fn grid_blocks(&self) -> u64 {
        self.grid.iter().map(|&g| g as u64).product()
    }

    /// The one check of a launch shape, made before `cuLaunchKernel` (the engine, the mock
    /// CUDA) and before a simulated launch: a block of 1 to [`MAX_BLOCK`] threads, a grid of
    /// at least one block, no dynamic shared memory (no kernel uses it).
    pub fn check(&self, kernel: &str) -> Result<(), ShapeError> {
        let threads = self.block_threads();
        let fault = if threads == 0 || threads > MAX_BLOCK {
            format!("a block of {threads} threads (1 to {MAX_BLOCK})")
        } else if self.grid_blocks() == 0 {
            "an empty grid".to_string()
        } else if self.shared_mem_bytes != 0 {
            format!(
                "{} bytes of dynamic shared memory (no kernel uses any)",
                self.shared_mem_bytes
            )
        } else {
            return Ok(());
        };
        Err(ShapeError(format!(
            "{kernel}: {fault} (grid {:?}, block {:?})",
            self.grid, self.block
        )))
    }
}

/// A launch shape no kernel runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

/// A shape the kernels cannot index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchError {
    pub kernel: &'static str,
    pub what: &'static str,
    pub value: u64,
    pub limit: u64,
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} is {}, the kernel supports at most {}",
            self.kernel, self.what, self.value, self.limit
        )
    }
}

impl std::error::Error for LaunchError {}

pub type LaunchResult<T> = Result<Option<T>, LaunchError>;

fn check(
    kernel: &'static str,
    what: &'static str,
    value: u64,
    limit: u64,
) -> Result<(), LaunchError> {
    if value > limit {
        return Err(LaunchError {
            kernel,
            what,
            value,
            limit,
        });
    }
    Ok(())
}

const U32: u64 = u32::MAX as u64;

/// A grid-stride launch over `n` elements: 256 threads a block, up to 2^16 blocks.
pub fn elementwise(n: u64) -> Option<LaunchConfig> {
    if n == 0 {
        return None;
    }
    let blocks = n
        .div_ceil(ELEMENTWISE_BLOCK as u64)
        .min(ELEMENTWISE_MAX_BLOCKS as u64);
    Some(LaunchConfig::linear(blocks as u32, ELEMENTWISE_BLOCK))
}

/// Threads for a block that strides over a row of `cols` values: about
/// [`VALUES_PER_THREAD`] values each, a power of two, at least one warp, at most 1024.
pub fn row_block(cols: u64) -> u32 {
    let want = cols.div_ceil(VALUES_PER_THREAD as u64).max(1);
    want.next_power_of_two().clamp(32, MAX_BLOCK as u64) as u32
}

/// One block per row of `cols` values (softmax, layernorm forward, cross-entropy, kd_loss).
pub fn rows(kernel: &'static str, rows: u64, cols: u64) -> LaunchResult<LaunchConfig> {
    check(kernel, "the number of rows", rows, MAX_GRID_X)?;
    check(kernel, "the row length", cols, U32)?;
    if rows == 0 || cols == 0 {
        return Ok(None);
    }
    Ok(Some(LaunchConfig::linear(rows as u32, row_block(cols))))
}

/// One block per plane of `plane_len` values (batchnorm forward and dx): at most 256 threads,
/// since planes are short (7x7 to 112x112).
pub fn planes(kernel: &'static str, planes: u64, plane_len: u64) -> LaunchResult<LaunchConfig> {
    check(kernel, "the number of planes (N * C)", planes, MAX_GRID_X)?;
    check(kernel, "the plane size (H * W)", plane_len, U32)?;
    if planes == 0 || plane_len == 0 {
        return Ok(None);
    }
    Ok(Some(LaunchConfig::linear(
        planes as u32,
        row_block(plane_len).min(256),
    )))
}

/// `channel_add_*` over `[outer, c, inner]`: one block per plane when
/// `inner > 1`, per row of `c` values when `inner == 1`.
pub fn channel_rows(
    kernel: &'static str,
    outer: u64,
    c: u64,
    inner: u64,
) -> LaunchResult<LaunchConfig> {
    check(kernel, "the number of channels", c, U32)?;
    check(kernel, "the size of the inner dimensions", inner, U32)?;
    if inner == 1 {
        planes(kernel, outer, c)
    } else {
        planes(kernel, outer.saturating_mul(c), inner)
    }
}

/// `channel_sum_*` (inner > 1): one block of 256 threads per channel.
pub fn channel_sum(
    kernel: &'static str,
    outer: u64,
    c: u64,
    inner: u64,
) -> LaunchResult<LaunchConfig> {
    check(kernel, "the number of channels", c, MAX_GRID_X)?;
    check(kernel, "the number of planes per channel", outer, U32)?;
    check(kernel, "the plane size", inner, U32)?;
    if c == 0 {
        return Ok(None);
    }
    Ok(Some(LaunchConfig::linear(c as u32, 256)))
}

/// `channel_sum_last_*` (inner == 1): blocks of 32 x 8 threads, each owning 32 columns.
pub fn channel_sum_last(kernel: &'static str, outer: u64, c: u64) -> LaunchResult<LaunchConfig> {
    check(kernel, "the number of rows", outer, U32)?;
    check(kernel, "the number of columns", c, U32)?;
    if c == 0 {
        return Ok(None);
    }
    Ok(Some(LaunchConfig {
        grid: [c.div_ceil(32) as u32, 1, 1],
        block: [32, 8, 1],
        shared_mem_bytes: 0,
    }))
}

/// One thread per column (the `*_finish`, `*_reduce` per-column kernels and
/// `embedding_bwd_offsets`): grid-stride over `n`.
pub fn columns(n: u64) -> Option<LaunchConfig> {
    elementwise(n)
}

/// One block of 1024 threads (`kd_loss_reduce`, `cross_entropy_reduce`, `embedding_bwd_scan`).
pub fn single_block() -> LaunchConfig {
    LaunchConfig::linear(1, MAX_BLOCK)
}

/// The two launches of a layer-norm backward and the scratch between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayernormBackward {
    /// `layernorm_bwd_*`: `blocks` blocks of `row_block(d)` threads.
    pub main: LaunchConfig,
    /// `layernorm_bwd_reduce`: one thread per column.
    pub reduce: LaunchConfig,
    /// Blocks of `main`, the `blocks` argument of the reduce.
    pub blocks: u32,
    /// f32 elements of the partial-sum scratch: `blocks * 2 * d`.
    pub partial_len: u64,
}

pub fn layernorm_backward(rows: u64, d: u64) -> LaunchResult<LayernormBackward> {
    const K: &str = "layernorm_bwd";
    check(K, "the number of rows", rows, U32)?;
    check(K, "the row length", d, U32)?;
    if rows == 0 || d == 0 {
        return Ok(None);
    }
    let blocks = rows.min(LAYERNORM_BWD_MAX_BLOCKS as u64) as u32;
    Ok(Some(LayernormBackward {
        main: LaunchConfig::linear(blocks, row_block(d)),
        reduce: columns(d).expect("d > 0"),
        blocks,
        partial_len: blocks as u64 * 2 * d,
    }))
}

/// The launches of a batch-norm statistics or gradient reduction over `[n, c, hw]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchnormReduce {
    /// `batchnorm_stats_partial_*` / `batchnorm_bwd_partial_*`: grid (splits, c), 256 threads.
    pub partial: LaunchConfig,
    /// `batchnorm_stats_finish` / `batchnorm_bwd_finish`: one thread per channel.
    pub finish: LaunchConfig,
    /// Blocks per channel, the `splits` argument of the finishing kernels.
    pub splits: u32,
    /// f64 elements of the scratch: `c * (1 + 2 * splits)`.
    pub scratch_f64: u64,
}

pub fn batchnorm_reduce(n: u64, c: u64, hw: u64) -> LaunchResult<BatchnormReduce> {
    const K: &str = "batchnorm";
    check(K, "the number of channels", c, MAX_GRID_YZ)?;
    let count = n.saturating_mul(hw);
    check(
        K,
        "the number of values per channel (N * H * W)",
        count,
        U32,
    )?;
    if c == 0 || count == 0 {
        return Ok(None);
    }
    let splits = count
        .div_ceil(BATCHNORM_VALUES_PER_SPLIT)
        .clamp(1, BATCHNORM_MAX_SPLITS as u64) as u32;
    Ok(Some(BatchnormReduce {
        partial: LaunchConfig {
            grid: [splits, c as u32, 1],
            block: [256, 1, 1],
            shared_mem_bytes: 0,
        },
        finish: columns(c).expect("c > 0"),
        splits,
        scratch_f64: c * (1 + 2 * splits as u64),
    }))
}

/// The five launches of an embedding (row-gather) backward and its scratch buffers (all u32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingBackward {
    /// Segments of [`EMBEDDING_SEGMENT`] positions.
    pub segments: u32,
    /// `counts`: `vocab * segments`, zeroed before `count`.
    pub counts_len: u64,
    /// `totals`: `vocab`.
    pub totals_len: u64,
    /// `starts`: `vocab + 1`.
    pub starts_len: u64,
    /// `order`: `n_ids`.
    pub order_len: u64,
    /// `embedding_bwd_count` and `embedding_bwd_place`: one block of 1024 per segment.
    pub count: LaunchConfig,
    pub place: LaunchConfig,
    /// `embedding_bwd_offsets`: one thread per id.
    pub offsets: LaunchConfig,
    /// `embedding_bwd_scan`: one block.
    pub scan: LaunchConfig,
    /// `embedding_bwd_accumulate_*`: one block per vocabulary row.
    pub accumulate: LaunchConfig,
}

pub fn embedding_backward(n_ids: u64, vocab: u64, dim: u64) -> LaunchResult<EmbeddingBackward> {
    const K: &str = "embedding_bwd";
    check(K, "the number of ids", n_ids, U32)?;
    check(K, "the vocabulary size", vocab, MAX_GRID_X - 1)?;
    check(K, "the row length", dim, U32)?;
    if vocab == 0 || dim == 0 {
        return Ok(None);
    }
    let segments = n_ids.div_ceil(EMBEDDING_SEGMENT as u64).max(1);
    let per_segment = LaunchConfig::linear(segments as u32, EMBEDDING_SEGMENT);
    Ok(Some(EmbeddingBackward {
        segments: segments as u32,
        counts_len: vocab * segments,
        totals_len: vocab,
        starts_len: vocab + 1,
        order_len: n_ids,
        count: per_segment,
        place: per_segment,
        offsets: columns(vocab).expect("vocab > 0"),
        scan: single_block(),
        accumulate: LaunchConfig::linear(vocab as u32, row_block(dim).min(256)),
    }))
}

/// `embedding_fwd_*`: one block per id.
pub fn embedding_forward(n_ids: u64, dim: u64) -> LaunchResult<LaunchConfig> {
    const K: &str = "embedding_fwd";
    check(K, "the row length", dim, U32)?;
    if n_ids == 0 || dim == 0 {
        return Ok(None);
    }
    planes(K, n_ids, dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_covers_every_element() {
        assert_eq!(elementwise(0), None);
        for n in [1u64, 255, 256, 257, 1 << 20, 1 << 40] {
            let c = elementwise(n).unwrap();
            assert_eq!(c.block, [256, 1, 1]);
            assert!(c.grid[0] >= 1 && c.grid[0] <= ELEMENTWISE_MAX_BLOCKS);
            // Grid-stride: the grid either covers n at once or is at its cap.
            let threads = c.grid_blocks() * c.block_threads() as u64;
            assert!(threads >= n || c.grid[0] == ELEMENTWISE_MAX_BLOCKS, "n {n}");
            // No block is wholly idle.
            assert!((c.grid[0] as u64 - 1) * 256 < n);
        }
    }

    #[test]
    fn launch_shapes_are_checked_once() {
        let ok = elementwise(10).unwrap();
        ok.check("k").unwrap();
        for (block, grid, shared, says) in [
            ([2048, 1, 1], [1, 1, 1], 0, "a block of 2048 threads"),
            ([0, 1, 1], [1, 1, 1], 0, "a block of 0 threads"),
            ([32, 1, 1], [4, 0, 1], 0, "an empty grid"),
            (
                [32, 1, 1],
                [1, 1, 1],
                64,
                "64 bytes of dynamic shared memory",
            ),
        ] {
            let c = LaunchConfig {
                grid,
                block,
                shared_mem_bytes: shared,
            };
            let e = c.check("k").unwrap_err().to_string();
            assert!(e.starts_with("k: ") && e.contains(says), "{e}");
        }
    }

    #[test]
    fn row_blocks_are_warp_multiples_within_limits() {
        assert_eq!(row_block(0), 32);
        assert_eq!(row_block(10), 32);
        assert_eq!(row_block(768), 128); // BERT hidden size: 6 values per thread
        assert_eq!(row_block(1000), 128); // ImageNet classes
        assert_eq!(row_block(30_522), 1024); // BERT vocabulary: 30 values per thread
        assert_eq!(row_block(1 << 30), 1024);
        for cols in (0..5000).step_by(37) {
            let b = row_block(cols);
            assert!(b & 31 == 0 && (32..=1024).contains(&b));
            assert!(
                b == 32 || b == 1024 || cols.div_ceil(b as u64) <= 2 * VALUES_PER_THREAD as u64
            );
        }
    }

    #[test]
    fn rows_limits_and_empty_shapes() {
        let c = rows("kd_loss", 4096, 30_522).unwrap().unwrap();
        assert_eq!(c.grid, [4096, 1, 1]);
        assert_eq!(c.block, [1024, 1, 1]);
        assert_eq!(rows("softmax", 0, 10).unwrap(), None);
        assert_eq!(rows("softmax", 10, 0).unwrap(), None);
        let e = rows("softmax", 1 << 31, 10).unwrap_err();
        assert!(
            e.to_string().contains("softmax") && e.to_string().contains("rows"),
            "{e}"
        );
        assert!(rows("softmax", 1, 1 << 32).is_err());
    }

    #[test]
    fn channel_launches() {
        // Linear layer bias over [4096, 768]: one block per row of 768.
        let c = channel_rows("channel_add", 4096, 768, 1).unwrap().unwrap();
        assert_eq!((c.grid[0], c.block[0]), (4096, 128));
        // Conv bias over [256, 64, 56 * 56]: one block per plane.
        let c = channel_rows("channel_add", 256, 64, 3136).unwrap().unwrap();
        assert_eq!((c.grid[0], c.block[0]), (256 * 64, 256));
        // Short planes get a short block.
        let c = channel_rows("channel_add", 8, 2048, 49).unwrap().unwrap();
        assert_eq!(c.block[0], 32);
        let s = channel_sum_last("channel_sum_last", 4096, 769)
            .unwrap()
            .unwrap();
        assert_eq!((s.grid[0], s.block), (25, [32, 8, 1]));
        assert_eq!(channel_sum("channel_sum", 4, 0, 9).unwrap(), None);
        assert_eq!(
            channel_sum("channel_sum", 4, 3, 9).unwrap().unwrap().grid,
            [3, 1, 1]
        );
    }

    #[test]
    fn layernorm_backward_partials() {
        let l = layernorm_backward(4096, 768).unwrap().unwrap();
        assert_eq!(l.blocks, 256);
        assert_eq!(l.main.grid[0], 256);
        assert_eq!(l.partial_len, 256 * 2 * 768);
        assert_eq!(l.reduce.grid_blocks() * 256, 768);
        // Fewer rows than the cap: one block per row.
        let l = layernorm_backward(3, 5).unwrap().unwrap();
        assert_eq!((l.blocks, l.partial_len), (3, 30));
        assert_eq!(layernorm_backward(0, 5).unwrap(), None);
    }

    #[test]
    fn batchnorm_splits() {
        // ResNet-50's first BN at batch 256: 3.2M values per channel -> the split cap.
        let b = batchnorm_reduce(256, 64, 112 * 112).unwrap().unwrap();
        assert_eq!(b.splits, BATCHNORM_MAX_SPLITS);
        assert_eq!(b.partial.grid, [64, 64, 1]);
        assert_eq!(b.scratch_f64, 64 * (1 + 2 * 64));
        // A small batch: one split.
        let b = batchnorm_reduce(2, 8, 16).unwrap().unwrap();
        assert_eq!((b.splits, b.partial.grid), (1, [1, 8, 1]));
        // The number of splits grows with the values per channel.
        let b = batchnorm_reduce(3, 1, (1 << 15) + 1).unwrap().unwrap();
        assert_eq!(b.splits, 4);
        assert!(batchnorm_reduce(1, 70_000, 4).is_err());
        assert!(batchnorm_reduce(1 << 20, 1, 1 << 20).is_err());
        assert_eq!(batchnorm_reduce(0, 4, 4).unwrap(), None);
    }

    #[test]
    fn embedding_backward_scratch() {
        let e = embedding_backward(32 * 128, 30_522, 768).unwrap().unwrap();
        assert_eq!(e.segments, 4);
        assert_eq!(e.counts_len, 30_522 * 4);
        assert_eq!(
            (e.totals_len, e.starts_len, e.order_len),
            (30_522, 30_523, 4096)
        );
        assert_eq!(e.count.grid, [4, 1, 1]);
        assert_eq!(e.count.block, [EMBEDDING_SEGMENT, 1, 1]);
        assert_eq!(e.accumulate.grid, [30_522, 1, 1]);
        // No ids: one (empty) segment, and the accumulate still zeroes every row.
        let e = embedding_backward(0, 10, 4).unwrap().unwrap();
        assert_eq!((e.segments, e.order_len), (1, 0));
        assert_eq!(embedding_backward(5, 0, 4).unwrap(), None);
        let f = embedding_forward(4096, 768).unwrap().unwrap();
        assert_eq!(f.grid, [4096, 1, 1]);
    }
}
