//! The CUDA side of `scaled_dot_product_attention` (`crate::backend::attention`, whose
//! composition of backend primitives runs on a GPU): the padding mask made into its additive
//! form on the device once per mask. No tape here.

use crate::backend::attention::{additive_mask, check_key_mask_shape, read_key_mask};
use crate::{DType, Device, Result, Tensor};

/// What the additive mask is called among the tensors derived from a mask's storage.
const PADDING_BIAS: &str = "attention padding bias";

/// The additive mask `[B, 1, 1, Sk]` (0 where `mask` is 1, `MASKED_SCORE` where it is 0) in
/// `dtype` on `device`, for a `[B, Sk]` padding mask (shape and values checked).
///
/// Made once per mask and kept with it (`Tensor::keep_derived`), so a forward through many
/// layers with one mask reads, checks, builds and uploads it once, not per layer (before, a
/// mask on the GPU whose values the host did not know was downloaded in every layer, a wait
/// for the GPU each time).
///
/// Kept only on the student stream (and keyed by the stream): inside a teacher scope
/// (`cuda::on_stream`) the bias is a temporary of the scope, made per call and freed inside
/// it, as the scopes' free rule requires; one kept in the mask would be a buffer of the
/// teacher stream that outlives the scope by a way the scope does not join (it would be freed
/// whenever the mask is written or dropped). Per call costs a host loop over `[B, Sk]` and a
/// small upload through the ring of pinned slots, which does not wait. A mask on the host (or
/// on another GPU) has nowhere to keep it and is converted per call too; BERT moves its mask
/// to the activations' device once per forward.
pub(crate) fn padding_bias(
    mask: &Tensor,
    b: usize,
    sk: usize,
    dtype: DType,
    device: Device,
) -> Result<Tensor> {
    check_key_mask_shape(mask, b, sk)?;
    let Device::Cuda(ordinal) = device else {
        return Err(crate::Error::Device(format!(
            "scaled_dot_product_attention: the additive mask is made for a GPU, not {device}"
        )));
    };
    let ctx = super::context_of(ordinal)?;
    let kept = mask.device() == device && ctx.current_role() == super::StreamRole::Student;
    let key = (PADDING_BIAS, dtype, ctx.compute_stream() as usize);
    if kept {
        if let Some(bias) = mask.derived(key) {
            return bias.reshape(&[b, 1, 1, sk]);
        }
    }
    // Without a download when the mask was uploaded from the host (`host_copy`).
    let keep = read_key_mask(&mask.to_device(Device::Cpu)?, b, sk)?;
    let bias = additive_mask(&keep);
    let bias = Tensor::from_slice(&bias, &[b, 1, 1, sk], device)?.cast(dtype)?;
    if kept {
        mask.keep_derived(key, bias.clone());
    }
    Ok(bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::attention::MASKED_SCORE;

    fn mask(v: &[i32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, Device::Cpu).unwrap()
    }

    /// The shape is checked before anything else, values are checked before any device is
    /// touched, and without a GPU the device is an error, not a panic.
    #[test]
    fn padding_bias_checks_before_touching_a_device() {
        let e = padding_bias(&mask(&[1, 0], &[1, 2]), 2, 1, DType::F32, Device::Cuda(0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_padding_mask has shape [1, 2]"), "{e}");
        let e = padding_bias(&mask(&[1, 0], &[1, 2]), 1, 2, DType::F32, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("made for a GPU"), "{e}");
        // Without a GPU the context cannot be made; with one, the mask (on the host, so
        // nothing is kept) becomes its additive form.
        match padding_bias(&mask(&[1, 0], &[1, 2]), 1, 2, DType::F32, Device::Cuda(0)) {
            Err(e) => assert!(e.to_string().contains("cuda:0"), "{e}"),
            Ok(bias) => {
                assert_eq!(bias.shape(), [1, 1, 1, 2]);
                assert_eq!(bias.to_vec_f32().unwrap(), vec![0.0, MASKED_SCORE]);
            }
        }
    }

    /// A CPU tensor keeps nothing derived and has no host copy: its guards write without
    /// telling the storage, so anything kept could go stale.
    #[test]
    fn cpu_tensors_keep_nothing() {
        let m = mask(&[1, 1, 0], &[1, 3]);
        let key = (PADDING_BIAS, DType::F32, 1usize);
        m.keep_derived(key, mask(&[0, 0, 0], &[1, 3]));
        assert!(m.derived(key).is_none());
        assert!(m.known_i32().is_none());
    }
}
