//! A small deterministic mutator for the property tests that run the fuzz targets' bodies
//! under `cargo test` (libFuzzer needs nightly flags; these need nothing): seeded bit flips,
//! interesting values, insertions, deletions, duplications, truncations and splices of the
//! seed files, so every `cargo test` tries the same few thousand malformed inputs.

/// SplitMix64: fast, and the same sequence on every machine.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that parsers treat specially: JSON and TOML punctuation, digits, signs, newlines.
const BYTES: &[u8] = b"\x00\xff\x7f\x80\"'[]{},:=.-+%#\n\r 019eE\\";

/// Little-endian integers at the edges: lengths, offsets and counts that lie.
const WORDS: &[u64] = &[
    0,
    1,
    0x7f,
    0xff,
    0x7fff_ffff,
    0xffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 7,
    1 << 40,
];

/// Applies one to four random mutations to `data`; `other` is spliced from.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = BYTES[rng.below(BYTES.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                data.insert(i, BYTES[rng.below(BYTES.len())]);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                data.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let chunk = data[i..i + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            5 => data.truncate(rng.below(len + 1)),
            6 if len >= 8 => {
                let i = rng.below(len - 7);
                let w = WORDS[rng.below(WORDS.len())];
                let width = [1, 2, 4, 8][rng.below(4)];
                data[i..i + width].copy_from_slice(&w.to_le_bytes()[..width]);
            }
            7 if !other.is_empty() => {
                let i = rng.below(other.len());
                let n = 1 + rng.below((other.len() - i).min(64));
                let at = rng.below(len + 1);
                data.splice(at..at, other[i..i + n].iter().copied());
            }
            _ => data.push(BYTES[rng.below(BYTES.len())]),
        }
    }
}

/// The seed files of one target (`fuzz/seeds/<target>/`), sorted by name.
pub fn seeds(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Runs `target` on every seed and on `runs` mutations of them (each mutation starting from a
/// seed chosen at random, splicing from another), plus the empty input.
pub fn run(target: fn(&[u8]), seeds: &[Vec<u8>], runs: usize, seed: u64) {
    assert!(!seeds.is_empty(), "no seed files");
    target(&[]);
    for s in seeds {
        target(s);
    }
    let mut rng = Rng(seed);
    for _ in 0..runs {
        let mut data = seeds[rng.below(seeds.len())].clone();
        let other = &seeds[rng.below(seeds.len())];
        mutate(&mut rng, &mut data, other);
        target(&data);
    }
}
