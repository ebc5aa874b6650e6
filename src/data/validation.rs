//! The validation split: a deterministic slice of the training data held out for choosing
//! (teachers, learning rates, a method's defaults), so that the test split is only reported.
//!
//! Which items are held out depends on the data alone, through a fixed hash of each item's
//! index, never on a run's seed: every run of a comparison (teachers at seed 0, baselines and
//! students at seed 1, ...) trains on the same items and is chosen on the same held-out ones,
//! and a resumed run rebuilds the split it started with.

use recycle_engine::rng::mix64;

use super::fashion_mnist::ImageDataset;

/// Seed of the hash that picks the held-out items (fixed: the split belongs to the data).
const SPLIT_SEED: u64 = 0x005E_ED0F_5A11_DA7E;

/// Item `i`'s position in the fixed order the split draws from, as a value in [0, 1).
fn draw(i: usize) -> f64 {
    (mix64(SPLIT_SEED ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 11) as f64
        / (1u64 << 53) as f64
}

/// The indices of `round(fraction * n)` items out of `n` held out for validation, ascending:
/// those that come first in a fixed pseudo-random order of the indices.
pub fn validation_indices(n: usize, fraction: f64) -> Vec<usize> {
    let k = ((fraction.clamp(0.0, 1.0) * n as f64).round() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| draw(a).total_cmp(&draw(b)).then(a.cmp(&b)));
    let mut held: Vec<usize> = order.into_iter().take(k).collect();
    held.sort_unstable();
    held
}

/// Splits a training set of images into `(train, validation)`: the validation images are
/// [`validation_indices`]`(len, fraction)`, the train set keeps the others in their order.
pub fn split_images(data: ImageDataset, fraction: f64) -> (ImageDataset, ImageDataset) {
    let held = validation_indices(data.len(), fraction);
    let mut is_held = vec![false; data.len()];
    for &i in &held {
        is_held[i] = true;
    }
    let size = data.image_size();
    let (mut train, mut validation) = (data.clone_shape(), data.clone_shape());
    for (i, &label) in data.labels.iter().enumerate() {
        let part = if is_held[i] {
            &mut validation
        } else {
            &mut train
        };
        part.images
            .extend_from_slice(&data.images[i * size..(i + 1) * size]);
        part.labels.push(label);
    }
    (train, validation)
}

/// Whether corpus text `j` goes to validation, given that it is not a test text: a fixed
/// pseudo-random `fraction` of the texts, spread over the whole corpus.
pub fn is_validation_text(j: usize, fraction: f64) -> bool {
    draw(j) < fraction
}

/// Splits corpus texts into `(train, validation, test)`, by text so that no text is in two
/// splits: text `j` is a test text when `test_every > 0` and `j % test_every == test_every - 1`
/// (the rule of [`super::MlmDataset::build`], so the test split is the one it makes); of the
/// others, [`is_validation_text`] picks the validation texts. Each split keeps corpus order.
pub fn split_texts<S: AsRef<str>>(
    texts: &[S],
    test_every: usize,
    fraction: f64,
) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
    let (mut train, mut validation, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for (j, t) in texts.iter().enumerate() {
        let t = t.as_ref();
        if test_every > 0 && j % test_every == test_every - 1 {
            test.push(t);
        } else if is_validation_text(j, fraction) {
            validation.push(t);
        } else {
            train.push(t);
        }
    }
    (train, validation, test)
}

impl ImageDataset {
    /// An empty data set with this one's image shape and classes.
    fn clone_shape(&self) -> ImageDataset {
        ImageDataset {
            images: Vec::new(),
            labels: Vec::new(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            classes: self.classes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(n: usize) -> ImageDataset {
        ImageDataset {
            images: (0..n * 4).map(|v| v as f32).collect(),
            labels: (0..n).map(|i| (i % 10) as i32).collect(),
            channels: 1,
            height: 2,
            width: 2,
            classes: 10,
        }
    }

    #[test]
    fn image_split_is_disjoint_deterministic_and_sized_by_the_fraction() {
        let (train, val) = split_images(images(1000), 0.1);
        assert_eq!((train.len(), val.len()), (900, 100));
        // Each image's first pixel is 4 * its index: the two parts hold distinct images and
        // together all of them.
        let ids = |d: &ImageDataset| -> Vec<usize> {
            (0..d.len())
                .map(|i| d.image(i).unwrap()[0] as usize / 4)
                .collect()
        };
        let (t, v) = (ids(&train), ids(&val));
        let mut all: Vec<usize> = t.iter().chain(&v).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(v, validation_indices(1000, 0.1));
        // Labels travel with their images.
        assert!((0..val.len()).all(|i| val.labels[i] == (v[i] % 10) as i32));
        // Same data, same split; spread over the whole set, not a block at one end.
        assert_eq!(ids(&split_images(images(1000), 0.1).1), v);
        assert!(v.iter().any(|&i| i < 300) && v.iter().any(|&i| i >= 700));
        assert_eq!(split_images(images(10), 0.0).1.len(), 0);
    }

    #[test]
    fn text_split_keeps_the_test_texts_and_holds_out_a_fraction_of_the_rest() {
        let texts: Vec<String> = (0..4000).map(|j| format!("text {j}")).collect();
        let (train, val, test) = split_texts(&texts, 20, 0.1);
        assert_eq!(test.len(), 200);
        assert!(test.iter().all(|t| {
            let j: usize = t[5..].parse().unwrap();
            j % 20 == 19
        }));
        assert_eq!(train.len() + val.len(), 3800);
        assert!((300..460).contains(&val.len()), "{}", val.len());
        let (train2, val2, _) = split_texts(&texts, 20, 0.1);
        assert_eq!((train2, val2), (train.clone(), val.clone()));
        assert!(train.iter().all(|t| !val.contains(t)));
    }
}
