"""U-Net builder: shapes, skip layers, freezing, weight loading and its errors, save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_WEIGHTS

from batchmask.config import ModelConfig
from batchmask.model import BACKBONES, WeightsError, build_unet, encoder_block, set_trainable

SMALL = dict(alpha=0.25, decoder_filters=(16, 16, 8, 8, 8))


def test_output_shape_and_skips():
    for size in (64, 96):
        net = build_unet(ModelConfig(image_size=size, **SMALL), backbone_weights=None)
        assert net.output_shape == (None, size, size, 1)
        spec = BACKBONES["mobilenet"]
        strides = [size // net.get_layer(n).output.shape[1] for n in spec.skips]
        assert strides == [16, 8, 4, 2]


def test_bad_config():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_unet(ModelConfig(image_size=100, **SMALL), backbone_weights=None)


def test_freezing():
    cfg = ModelConfig(image_size=64, trainable_blocks=2, **SMALL)
    net = build_unet(cfg, backbone_weights=None)
    assert encoder_block("conv_pw_12") == 12 and encoder_block("conv1_bn") == 0 and encoder_block("decoder0a_conv") is None
    trainable = {layer.name for layer in net.layers if layer.trainable and layer.weights}
    assert {"conv_dw_12", "conv_pw_12", "conv_dw_13", "conv_pw_13", "mask", "decoder0a_conv"} <= trainable
    assert "conv_pw_11" not in trainable and "conv1" not in trainable
    assert "conv_pw_13_bn" not in trainable  # encoder batch norm stays in inference mode
    set_trainable(net, cfg, finetune=False)
    assert not any(encoder_block(layer.name) is not None and layer.trainable for layer in net.layers)
    assert net.get_layer("decoder4b_conv").trainable


def test_imagenet_download_failure_explains_the_way_out(monkeypatch, tmp_path):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid: None -- [Errno -2] Name or service not known")

    # No network in tests: make Keras's download fail the way it does offline.
    monkeypatch.setattr(keras.src.applications.mobilenet.file_utils, "get_file", offline)
    with pytest.raises(WeightsError) as info:
        build_unet(ModelConfig(image_size=64, **SMALL), backbone_weights="imagenet")
    msg = str(info.value)
    assert "mobilenet_2_5_224_tf_no_top.h5" in msg and "--backbone-weights" in msg and "KERAS_HOME" in msg


def test_weights_file_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_unet(ModelConfig(image_size=64, **SMALL), backbone_weights=str(tmp_path / "nope.h5"))
    with pytest.raises(WeightsError, match="ImageNet weights exist only for alpha"):
        build_unet(ModelConfig(image_size=64, alpha=0.3, decoder_filters=SMALL["decoder_filters"]), "imagenet")


IMAGENET_025 = SHARED_WEIGHTS / "mobilenet_2_5_224_tf_no_top.h5" if SHARED_WEIGHTS else None


# Data, not a tool: a fresh machine (CI) has no ../shared and tests never download, so this one
# skips with its reason even under BATCHMASK_REQUIRE_ALL=1. conftest.find_shared looks in
# $BATCHMASK_SHARED, then in shared/ beside the checkout or any folder above it.
@pytest.mark.skipif(IMAGENET_025 is None or not IMAGENET_025.is_file(),
                    reason="ImageNet MobileNet alpha 0.25 weights (shared/weights/mobilenet_2_5_224_tf_no_top.h5) "
                           "not found beside the checkout or in $BATCHMASK_SHARED: data, not a missing tool")
def test_224_weights_load_into_other_input_sizes():
    import keras

    path = IMAGENET_025
    ref = keras.applications.MobileNet(include_top=False, alpha=0.25, input_shape=(224, 224, 3), weights=str(path))
    net = build_unet(ModelConfig(image_size=96, **SMALL), backbone_weights=str(path))
    np.testing.assert_array_equal(net.get_layer("conv_pw_13").get_weights()[0], ref.get_layer("conv_pw_13").get_weights()[0])
    with pytest.raises(WeightsError, match="not MobileNet weights for alpha=1.0"):
        build_unet(ModelConfig(image_size=64, alpha=1.0, decoder_filters=SMALL["decoder_filters"]), str(path))


def test_save_load_round_trip(tiny_model_dir, demo_wider):
    from batchmask.data import load_wider
    from batchmask.inference import load_model

    m1 = load_model(tiny_model_dir)
    m2 = load_model(tiny_model_dir)
    images = [s.load_image() for s in load_wider(demo_wider)[:3]]
    p1, p2 = m1.predict_proba(images, batch_size=2), m2.predict_proba(images, batch_size=3)
    for a, b, im in zip(p1, p2, images, strict=True):
        assert a.shape == im.shape[:2]
        np.testing.assert_allclose(a, b, atol=1e-5)
    masks = m1.predict(images)
    assert masks[0].dtype == bool and np.array_equal(masks[0], p1[0] >= m1.threshold)


def test_variant_runs_the_same_weights_at_another_size(tiny_model, demo_wider):
    from batchmask.data import load_wider

    m = tiny_model  # shared: the asserts below check that variant() leaves it untouched
    size = m.image_size
    big = m.variant(image_size=2 * size, tta_flip=True, threshold=0.3)
    assert big.keras_model.input_shape[1:3] == (2 * size, 2 * size)
    assert (big.image_size, big.config.tta_flip, big.threshold) == (2 * size, True, 0.3)
    assert m.image_size == size and not m.config.tta_flip  # the original is untouched
    for a, b in zip(m.keras_model.get_weights(), big.keras_model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    im = load_wider(demo_wider)[0].load_image()
    (p,) = big.predict_proba([im])
    assert p.shape == im.shape[:2] and 0.0 <= p.min() <= p.max() <= 1.0
    # A model's own size gives exactly its own predictions.
    np.testing.assert_allclose(m.variant(image_size=size).predict_proba([im])[0], m.predict_proba([im])[0], atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 32"):
        m.variant(image_size=100)


def test_count_macs_matches_a_hand_count():
    """Conv, depthwise, pointwise and dense layers, counted by hand for one image."""
    import keras

    from batchmask.model import count_macs

    x = inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(x)          # 8*8 positions * 4 out * 3*3*3 = 6912
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)    # 8*8 * 4 channels * 3*3       = 2304
    x = keras.layers.Conv2D(2, 1, strides=2)(x)               # 4*4 * 2 out * 1*1*4          = 128
    x = keras.layers.BatchNormalization()(x)                  # not counted
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5)(x)                              # 5 * 32                       = 160
    assert count_macs(keras.Model(inp, x)) == 6912 + 2304 + 128 + 160


def test_unet_mac_count_matches_the_issue_figures():
    """The 512² U-Net decoder's first conv by hand (32²x1536 -> 32²x192, 3x3), and the totals."""
    from batchmask.model import count_macs, layer_macs

    net = build_unet(ModelConfig.with_decoder("unet", image_size=512), backbone_weights=None)
    assert layer_macs(net.get_layer("decoder0a_conv")) == 32 * 32 * 192 * 3 * 3 * 1536
    total, decoder = count_macs(net), count_macs(net, "decoder")
    assert round(total / 1e9, 1) == 16.6 and round(decoder / 1e9, 1) == 13.6
    lean = build_unet(ModelConfig.with_decoder("lean", image_size=512), backbone_weights=None)
    assert count_macs(lean) < total / 4  # the issue's "a quarter would be better still"
    assert count_macs(lean, "conv") == total - decoder - layer_macs(net.get_layer("mask"))  # same encoder


@pytest.mark.parametrize("decoder,stages", [("lean", 4), ("lean4", 3), ("lean1", 5), ("unet", 5)])
def test_named_decoders_output_the_input_size(decoder, stages):
    cfg = ModelConfig.with_decoder(decoder, alpha=0.25, image_size=64)
    net = build_unet(cfg, backbone_weights=None)
    assert net.output_shape == (None, 64, 64, 1)
    assert len(cfg.decoder_filters) == stages
    assert any(layer.name == f"decoder{stages - 1}b_conv" for layer in net.layers)
    assert not any(layer.name == f"decoder{stages}a_conv" for layer in net.layers)
    assert any(layer.name.endswith("_dw") for layer in net.layers if layer.name.startswith("decoder")) == (decoder != "unet")
    # Fully convolutional: the same weights run on other sizes (training crops).
    open_net = build_unet(cfg, backbone_weights=None, any_size=True)
    assert open_net(np.zeros((1, 96, 96, 3), np.float32)).shape == (1, 96, 96, 1)


def test_model_json_without_decoder_fields_means_the_unet_decoder():
    """model.json files written before the decoder was configurable keep loading as they were built."""
    old = {"backbone": "mobilenet", "alpha": 1.0, "image_size": 512, "decoder_filters": [192, 128, 64, 32, 16],
           "trainable_blocks": 4, "threshold": 0.65, "tta_flip": False}
    cfg = ModelConfig.from_dict(old)
    assert (cfg.decoder_block, cfg.decoder_projection, cfg.decoder_filters) == ("conv", 0, (192, 128, 64, 32, 16))
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()  # new files round-trip
    with pytest.raises(ValueError, match="unknown decoder"):
        ModelConfig.with_decoder("huge")
    with pytest.raises(ValueError, match="decoder_block"):
        ModelConfig(decoder_block="dense").validate()
