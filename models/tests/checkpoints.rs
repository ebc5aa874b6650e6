//! Parameter counts, state-dict round trips through safetensors, and mismatch errors.

use std::path::Path;

use recycle_engine::{DType, Device, Tape, Tensor};
use recycle_models::{Bert, BertConfig, ResNet, ResNetConfig};

#[test]
fn parameter_counts_match_torchvision_and_hugging_face() {
    assert_eq!(ResNetConfig::new(50, 1000).num_params(), 25_557_032);
    assert_eq!(ResNetConfig::new(18, 1000).num_params(), 11_689_512);
    assert_eq!(ResNetConfig::new(34, 1000).num_params(), 21_797_672);
    assert_eq!(BertConfig::base(30_522).num_params(), 109_514_298);
}

fn small_resnet(depth: usize) -> ResNetConfig {
    ResNetConfig {
        depth,
        num_classes: 10,
        in_channels: 1,
        small_stem: true,
        width: 1.0 / 16.0,
    }
}

#[test]
fn resnet_round_trips_through_safetensors_in_f32_and_bf16() {
    let dir = std::env::temp_dir().join(format!("recycle-models-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = ResNet::new(small_resnet(18), 3).unwrap();
    let x = Tensor::randn(&[2, 1, 28, 28], 0.0, 1.0, 9, DType::F32, Device::Cpu).unwrap();
    // One training-mode pass so running statistics and the counter are not at their defaults.
    model.forward(&Tape::inference(), &x, true).unwrap();
    let path = dir.join("resnet18.safetensors");
    model.save(&path).unwrap();
    let loaded = ResNet::load(small_resnet(18), &path).unwrap();
    let a = model.forward(&Tape::inference(), &x, false).unwrap();
    let b = loaded.forward(&Tape::inference(), &x, false).unwrap();
    assert_eq!(
        a.tensor().to_vec_f32().unwrap(),
        b.tensor().to_vec_f32().unwrap()
    );
    let counter = loaded
        .state_dict()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "bn1.num_batches_tracked")
        .unwrap()
        .1;
    assert_eq!(counter.to_vec::<i32>().unwrap(), vec![1]);

    // A bf16 file loads into the f32 model (values rounded).
    let bf16: Vec<(String, Tensor)> = model
        .state_dict()
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = if t.dtype() == DType::F32 {
                t.cast(DType::BF16).unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect();
    let path16 = dir.join("resnet18-bf16.safetensors");
    recycle_engine::checkpoint::save(&path16, &bf16, None).unwrap();
    let loaded16 = ResNet::load(small_resnet(18), &path16).unwrap();
    let c = loaded16.forward(&Tape::inference(), &x, false).unwrap();
    let (av, cv) = (
        a.tensor().to_vec_f32().unwrap(),
        c.tensor().to_vec_f32().unwrap(),
    );
    let scale = av.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = av
        .iter()
        .zip(&cv)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err / scale < 5e-2 && err > 0.0, "bf16 load error {err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_resnet50_state_dict_in_a_resnet18_is_an_error_naming_the_tensor() {
    let r50 = ResNet::new(small_resnet(50), 1).unwrap();
    let err = ResNet::from_state_dict(
        small_resnet(18),
        r50.state_dict().unwrap(),
        Path::new("r50.safetensors"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("r50.safetensors"), "{err}");
    assert!(err.contains("ResNet-18"), "{err}");
    // layer1.0.conv1 is 1x1 (bottleneck) in the file and 3x3 in ResNet-18.
    assert!(
        err.contains("`layer1.0.conv1.weight` has shape [4, 4, 1, 1]"),
        "{err}"
    );
    assert!(err.contains("[4, 4, 3, 3]"), "{err}");
}

#[test]
fn a_missing_tensor_is_named() {
    let model = ResNet::new(small_resnet(18), 1).unwrap();
    let mut state = model.state_dict().unwrap();
    state.retain(|(n, _)| n != "layer2.1.bn2.running_var");
    let err = ResNet::from_state_dict(small_resnet(18), state, Path::new("x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing") && err.contains("layer2.1.bn2.running_var"),
        "{err}"
    );
}

#[test]
fn a_bert_base_state_dict_in_bert_tiny_is_an_error_naming_the_tensor() {
    // BERT-base's tensors, zero-filled (the shapes are what matters).
    let base: Vec<(String, Tensor)> = BertConfig::base(30_522)
        .param_specs()
        .into_iter()
        .map(|(n, s)| (n, Tensor::zeros(&s, DType::BF16, Device::Cpu).unwrap()))
        .collect();
    let err = Bert::from_state_dict(
        BertConfig::tiny(30_522),
        base,
        Path::new("base.safetensors"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`bert.embeddings.word_embeddings.weight` has shape [30522, 768]")
            && err.contains("[30522, 128]"),
        "{err}"
    );
    assert!(
        err.contains("the model does not have, first `bert.encoder.layer."),
        "extra layers are named: {err}"
    );
}

#[test]
fn bert_round_trips_and_accepts_tied_decoder_names() {
    let config = BertConfig {
        max_position_embeddings: 32,
        ..BertConfig::tiny(64)
    };
    let model = Bert::new(config.clone(), 5).unwrap();
    let mut state = model.state_dict().unwrap();
    assert!(state
        .iter()
        .all(|(n, _)| !n.starts_with("cls.predictions.decoder")));
    let emb = state[0].1.clone();
    state.push(("cls.predictions.decoder.weight".into(), emb));
    let loaded = Bert::from_state_dict(config, state, Path::new("hf.safetensors")).unwrap();
    let a = model.params().unwrap().values().to_vec_f32().unwrap();
    let b = loaded.params().unwrap().values().to_vec_f32().unwrap();
    assert_eq!(a, b);
}
