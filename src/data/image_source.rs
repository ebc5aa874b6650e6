//! The image data sets a ResNet trains on, behind one [`BatchSource`]: Fashion-MNIST held in
//! memory, or an image folder decoded batch by batch.

use super::fashion_mnist::ImageDataset;
use super::image_folder::FolderSplit;
use super::loader::BatchSource;
use super::ImageBatch;
use crate::engine::Result;

pub enum ImageSource {
    Memory(ImageDataset),
    Folder(FolderSplit),
}

impl ImageSource {
    pub fn len(&self) -> usize {
        match self {
            ImageSource::Memory(d) => d.len(),
            ImageSource::Folder(f) => f.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn classes(&self) -> usize {
        match self {
            ImageSource::Memory(d) => d.classes,
            ImageSource::Folder(f) => f.classes,
        }
    }

    /// Channels of the model's input (1 for Fashion-MNIST, 3 for a folder's RGB views).
    pub fn channels(&self) -> usize {
        match self {
            ImageSource::Memory(d) => d.channels,
            ImageSource::Folder(_) => 3,
        }
    }
}

impl BatchSource for ImageSource {
    type Batch = ImageBatch;

    fn len(&self) -> usize {
        ImageSource::len(self)
    }

    fn make_batch(&self, indices: &[usize], step: u64) -> Result<ImageBatch> {
        match self {
            ImageSource::Memory(d) => d.make_batch(indices, step),
            ImageSource::Folder(f) => f.make_batch(indices, step),
        }
    }
}
