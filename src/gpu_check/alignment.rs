//! Before a first GPU run: the byte alignment of every parameter the four checked models (the
//! small ResNet-18 and BERT-tiny of the step rows, ResNet-50 and BERT-base of the throughput
//! rows) pass to cuBLASLt. Parameters are views into one flat buffer (no padding between
//! them) whose base a `cuMemAllocAsync` aligns to 256 bytes, so a view's alignment is that of
//! its byte offset; the engine keys its cuBLASLt plans by the operands' actual alignments
//! (`cuda::blas`), and copies a bias under 16 bytes of alignment to a fresh allocation before
//! the bias epilogue. Activations are whole allocations (256 bytes). cuBLASLt's heuristics may
//! have no bf16 algorithm for an operand under 16 bytes of alignment, so those are listed.

use recycle_engine::cuda::operand_alignment as alignment;

use crate::trainer::Architecture;

/// One parameter that reaches cuBLASLt: its name, shape, role (a matmul operand or the bias
/// of the epilogue) and its alignment in the f32 master buffer and the bf16 working copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperandAlignment {
    pub name: String,
    pub shape: Vec<usize>,
    pub bias: bool,
    pub f32_bytes: u32,
    pub bf16_bytes: u32,
}

/// Every parameter of `arch` that cuBLASLt reads: the linear layers' weights and biases, and
/// for BERT the word embeddings (the tied decoder's weight) and the decoder's bias.
pub fn blas_operands(arch: &Architecture) -> Vec<OperandAlignment> {
    let specs = match arch {
        Architecture::ResNet(c) => c.param_specs(),
        Architecture::Bert(c) => c.param_specs(),
    };
    let mut offset = 0u64;
    let mut out = Vec::new();
    for (name, shape) in specs {
        let len: usize = shape.iter().product();
        let matmul_weight = match arch {
            // The only linear layer; the convolutions go to cuDNN.
            Architecture::ResNet(_) => name == "fc.weight",
            Architecture::Bert(_) => {
                shape.len() == 2
                    && !name.contains("position_embeddings")
                    && !name.contains("token_type_embeddings")
            }
        };
        let bias = match arch {
            Architecture::ResNet(_) => name == "fc.bias",
            Architecture::Bert(_) => {
                name.ends_with("dense.bias")
                    || name.ends_with("query.bias")
                    || name.ends_with("key.bias")
                    || name.ends_with("value.bias")
                    || name == "cls.predictions.bias"
            }
        };
        if matmul_weight || bias {
            out.push(OperandAlignment {
                name,
                shape,
                bias,
                f32_bytes: alignment(4 * offset),
                bf16_bytes: alignment(2 * offset),
            });
        }
        offset += len as u64;
    }
    out
}

#[cfg(test)]
mod tests {
    use recycle_models::{BertConfig, ResNetConfig};

    use super::*;

    fn models() -> Vec<(String, Architecture)> {
        let mut cases: Vec<(String, Architecture)> = super::super::small_step_cases()
            .unwrap()
            .into_iter()
            .map(|(n, a, _)| (n, a))
            .collect();
        cases.push((
            "ResNet-50".into(),
            Architecture::ResNet(ResNetConfig::new(50, 1000)),
        ));
        cases.push((
            "BERT-base".into(),
            Architecture::Bert(BertConfig::base(30_522)),
        ));
        cases
    }

    /// The table of docs/gpu-check.md ("Pre-flights"): per model, the operands and how many
    /// are under 16 bytes of alignment in f32 and in bf16. A change of a model's parameter
    /// layout changes these counts: update the section with the printed table.
    #[test]
    fn matmul_operand_alignments_of_the_four_models() {
        let mut summary = Vec::new();
        for (name, arch) in models() {
            let ops = blas_operands(&arch);
            assert!(!ops.is_empty(), "{name}");
            let low_f32: Vec<&OperandAlignment> = ops.iter().filter(|o| o.f32_bytes < 16).collect();
            let low_bf16: Vec<&OperandAlignment> =
                ops.iter().filter(|o| o.bf16_bytes < 16).collect();
            let min_f32 = ops.iter().map(|o| o.f32_bytes).min().unwrap();
            let min_bf16 = ops.iter().map(|o| o.bf16_bytes).min().unwrap();
            println!(
                "| {name} | {} | {} (min {min_f32} B) | {} (min {min_bf16} B) |",
                ops.len(),
                low_f32.len(),
                low_bf16.len()
            );
            for o in ops.iter().filter(|o| o.f32_bytes < 16 || o.bf16_bytes < 16) {
                println!(
                    "    {} {:?} bias={} f32 {} B, bf16 {} B",
                    o.name, o.shape, o.bias, o.f32_bytes, o.bf16_bytes
                );
            }
            summary.push((ops.len(), low_f32.len(), low_bf16.len()));
        }
        assert_eq!(summary, EXPECTED, "update docs/gpu-check.md, Pre-flights");
    }

    /// (operands, under 16 B in f32, under 16 B in bf16) for the small ResNet-18, BERT-tiny,
    /// ResNet-50 and BERT-base.
    const EXPECTED: [(usize, usize, usize); 4] = [(2, 0, 0), (28, 0, 0), (2, 0, 0), (148, 2, 2)];
}
