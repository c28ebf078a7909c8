"""Numerical parity of msfx's ViT, DINOv2 and SigLIP with HF transformers (PyTorch) as the oracle.

Each model is a tiny random HF PyTorch checkpoint (fixed seed, `initializer_range` 0.2 where the
config has one, random LayerNorm weights and biases, random DINOv2 layer scales and SigLIP
`logit_scale` / `logit_bias`, eager attention) saved to disk and loaded into msfx. In float32 msfx
must match torch within 1e-4 (max abs) on images prepared by transformers' numpy image processors
(`ViTImageProcessorPil`, `BitImageProcessorPil`, `SiglipImageProcessorPil`): every output of every
class (`last_hidden_state`, `pooler_output`, `logits`, each hidden state, the losses, SigLIP's
`logits_per_image` / `logits_per_text`), at other image sizes (ViT and SigLIP with
`interpolate_pos_encoding`, DINOv2 always), for configs that flip each switch (ViT `qkv_bias` and
`pooler_output_size`, DINOv2's SwiGLU MLP, SigLIP's `projection_size`). `save_pretrained` output
reloads in HF with no missing or unexpected keys; bad inputs give clear errors.

Run with `-s` to see the table of measured max abs diffs printed at the end of the module.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from mindspore import ops

import msfx
from msfx.errors import CheckpointError
from msfx.params import flatten, unflatten

from oracle import Diffs, assert_close, max_abs_diff, save_tiny
from test_clip import _images

TOL = 1e-4
IMAGE, PATCH = 30, 10
DIFFS = Diffs("ViT / DINOv2 / SigLIP max abs diffs vs HF (float32):")
_print_measured_diffs = DIFFS.report()
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)
VIT_CASES = {"gelu": dict(hidden_act="gelu"),
             "no_qkv_bias_gelu_new_pooler_24": dict(hidden_act="gelu_new", qkv_bias=False, pooler_output_size=24)}
DINOV2_CASES = {"mlp": dict(use_swiglu_ffn=False), "swiglu": dict(use_swiglu_ffn=True, hidden_act="gelu")}


def _pixels(processor, images=None) -> np.ndarray:
    pixels = processor(images=images or _images(), return_tensors="np")["pixel_values"]
    assert pixels.dtype == np.float32 and pixels.shape == (3, 3, IMAGE, IMAGE)
    return pixels


def vit_processor():
    return transformers.ViTImageProcessorPil(size={"height": IMAGE, "width": IMAGE})


def dinov2_processor():
    return transformers.BitImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})


def siglip_processor():
    return transformers.SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})


def _randomize(model: torch.nn.Module, **values) -> None:
    """DINOv2's layer scales from U(0.5, 1.5) (HF sets them to `layerscale_value`) and named scalars."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.uniform_(0.5, 1.5)
            elif name in values:
                p.fill_(values[name])


def _tiny(cls, config, path, **values):
    """`save_tiny` with biases, then `_randomize`d and saved again: `(torch model, path)`."""
    model, path = save_tiny(cls, config, path, biases=True)
    _randomize(model, **values)
    model.save_pretrained(path)
    return model, path


def _run(model, **inputs):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()})


def _compare(name: str, ours, theirs, fields=("last_hidden_state", "pooler_output", "logits", "loss")) -> None:
    for field in fields:
        if getattr(theirs, field, None) is not None:
            assert_close(getattr(ours, field), getattr(theirs, field), TOL, f"{name} {field}", DIFFS)
    if getattr(theirs, "hidden_states", None) is not None:
        assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
        for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
            assert_close(a, b, TOL, f"{name} hidden_states[{i}]", DIFFS)


# ---------------------------------------------------------------- ViT

def _checkpoints(root, classes, configs: dict) -> dict:
    """{case: {class name: (torch model, checkpoint dir)}} for each config and class."""
    return {case: {cls.__name__: _tiny(cls, config, root / case / cls.__name__) for cls in classes}
            for case, config in configs.items()}


@pytest.fixture(scope="module")
def vit_dirs(tmp_path_factory):
    """`ViTModel` and `ViTForImageClassification` checkpoints of each `VIT_CASES` config."""
    return _checkpoints(tmp_path_factory.mktemp("vit"), (transformers.ViTModel, transformers.ViTForImageClassification),
                        {case: transformers.ViTConfig(**VISION, intermediate_size=37, initializer_range=0.2,
                                                      num_labels=3, **switches)
                         for case, switches in VIT_CASES.items()})


@pytest.mark.parametrize("case", list(VIT_CASES))
def test_vit_matches_hf(vit_dirs, case):
    built = vit_dirs[case]
    pixels = _pixels(vit_processor())
    labels = np.array([0, 2, 1])
    for name, (torch_model, path) in built.items():
        model = getattr(msfx, name).from_pretrained(path)
        extra = dict(labels=labels) if "Classification" in name else {}
        _compare(f"{case} {name}", model(pixels, output_hidden_states=True, **extra),
                 _run(torch_model, pixel_values=pixels, output_hidden_states=True, **extra))
        for size in ((40, 40), (40, 30)):  # HF's bicubic `interpolate_pos_encoding`
            other = np.random.default_rng(1).normal(0, 1, (2, 3, *size)).astype(np.float32)
            _compare(f"{case} {name} {size}", model(other, interpolate_pos_encoding=True),
                     _run(torch_model, pixel_values=other, interpolate_pos_encoding=True))
    out = msfx.ViTModel.from_pretrained(built["ViTModel"][1])(pixels)
    assert out.pooler_output.shape == (3, msfx.ViTModel.from_pretrained(built["ViTModel"][1]).config.pooler_output_size)


def test_vit_model_from_a_classifier_checkpoint_gets_a_fresh_pooler(vit_dirs, caplog):
    case = "gelu"
    torch_model, path = vit_dirs[case]["ViTForImageClassification"]
    pixels = _pixels(vit_processor())
    model = msfx.ViTModel.from_pretrained(path)  # HF: the pooler is newly initialized, the rest loads
    assert "vit.pooler.dense.weight" in caplog.text
    expected = _run(torch_model.vit, pixel_values=pixels).last_hidden_state
    assert_close(model(pixels).last_hidden_state, expected, TOL, f"{case} ViTModel from the classifier", DIFFS)


# ---------------------------------------------------------------- DINOv2

@pytest.fixture(scope="module")
def dinov2_dirs(tmp_path_factory):
    """`Dinov2Model` and `Dinov2ForImageClassification` checkpoints of each `DINOV2_CASES` config."""
    return _checkpoints(tmp_path_factory.mktemp("dinov2"),
                        (transformers.Dinov2Model, transformers.Dinov2ForImageClassification),
                        {case: transformers.Dinov2Config(**VISION, mlp_ratio=2, initializer_range=0.2, num_labels=3,
                                                         **switches)
                         for case, switches in DINOV2_CASES.items()})


@pytest.mark.parametrize("case", list(DINOV2_CASES))
def test_dinov2_matches_hf_at_the_default_and_other_image_sizes(dinov2_dirs, case):
    built = dinov2_dirs[case]
    pixels = _pixels(dinov2_processor())
    for name, (torch_model, path) in built.items():
        model = getattr(msfx, name).from_pretrained(path)
        extra = dict(labels=np.array([1, 0, 2])) if "Classification" in name else {}
        _compare(f"{case} {name}", model(pixels, output_hidden_states=True, **extra),
                 _run(torch_model, pixel_values=pixels, output_hidden_states=True, **extra))
        for size in ((40, 50), (35, 44)):  # resized positions; pixels past the last patch ignored
            other = np.random.default_rng(2).normal(0, 1, (2, 3, *size)).astype(np.float32)
            _compare(f"{case} {name} {size}", model(other, output_hidden_states=True),
                     _run(torch_model, pixel_values=other, output_hidden_states=True))


def test_dinov2_layer_scale_matters(dinov2_dirs):
    """Negative control: the same weights with the layer scales at 1 are far from HF's output."""
    torch_model, path = dinov2_dirs["mlp"]["Dinov2Model"]
    model = msfx.Dinov2Model.from_pretrained(path)
    pixels = _pixels(dinov2_processor())
    expected = _run(torch_model, pixel_values=pixels).last_hidden_state
    leaves, keys = flatten(dict(model.params))
    with model.using_params(unflatten([ops.ones_like(t) if k.endswith("lambda1") else t for t, k in zip(leaves, keys)],
                                      keys)):
        assert max_abs_diff(model(pixels).last_hidden_state, expected) > 1e-2


# ---------------------------------------------------------------- SigLIP

# the text tower narrower than the image tower: its head projects to the image width (`projection_size`)
SIGLIP_TEXT = dict(vocab_size=99, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64, projection_size=32, pad_token_id=1, bos_token_id=None,
                   eos_token_id=2)
SEQ = 16


def _token_batch() -> tuple[np.ndarray, np.ndarray]:
    """3 rows of SEQ tokens, right-padded (pad id 1) with the mask marking the padding."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 99, (3, SEQ))
    mask = np.ones_like(ids)
    for row, n in enumerate((SEQ, 9, 4)):
        ids[row, n:] = 1
        mask[row, n:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def siglip_dirs(tmp_path_factory):
    """{class name: (torch model, dir)} for `SiglipModel` and `SiglipForImageClassification`, plus the
    towers saved on their own (`SiglipTextModel`, `SiglipVisionModel`) from the full model."""
    config = transformers.SiglipConfig(text_config=SIGLIP_TEXT, vision_config=dict(VISION, intermediate_size=40),
                                       num_labels=3)
    root = tmp_path_factory.mktemp("siglip")
    built = {"SiglipModel": _tiny(transformers.SiglipModel, config, root / "full", logit_scale=1.2,
                                  logit_bias=-1.5),
             "SiglipForImageClassification": _tiny(transformers.SiglipForImageClassification, config, root / "cls")}
    full = built["SiglipModel"][1]
    for name in ("SiglipTextModel", "SiglipVisionModel"):
        tower = getattr(transformers, name).from_pretrained(full, attn_implementation="eager").eval()
        tower.save_pretrained(root / name)
        built[name] = tower, root / name
    return built


def test_siglip_model_matches_hf(siglip_dirs):
    torch_model, path = siglip_dirs["SiglipModel"]
    ids, mask = _token_batch()
    pixels = _pixels(siglip_processor())
    model = msfx.SiglipModel.from_pretrained(path)
    out = model(ids, pixels, mask, return_loss=True, output_hidden_states=True)
    expected = _run(torch_model, input_ids=ids, pixel_values=pixels, attention_mask=mask, return_loss=True,
                    output_hidden_states=True)
    _compare("SiglipModel", out, expected, ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds",
                                            "loss"))
    _compare("SiglipModel text", out.text_model_output, expected.text_model_output)
    _compare("SiglipModel vision", out.vision_model_output, expected.vision_model_output)
    assert float(np.abs(expected.logits_per_image.numpy()).max()) > 1.0  # the bias and scale are in play
    _compare("SiglipModel.get_text_features", model.get_text_features(ids, mask),
             _run(torch_model.get_text_features, input_ids=ids, attention_mask=mask))
    _compare("SiglipModel.get_image_features", model.get_image_features(pixels),
             _run(torch_model.get_image_features, pixel_values=pixels))
    other = np.random.default_rng(3).normal(0, 1, (2, 3, 40, 50)).astype(np.float32)
    _compare("SiglipModel (40, 50) image features", model.get_image_features(other, interpolate_pos_encoding=True),
             _run(torch_model.get_image_features, pixel_values=other, interpolate_pos_encoding=True))
    assert type(msfx.AutoModelForZeroShotImageClassification.from_pretrained(path)) is msfx.SiglipModel
    assert type(msfx.AutoModel.from_pretrained(path)) is msfx.SiglipModel


def test_siglip_towers_load_from_the_full_checkpoint_and_their_own(siglip_dirs):
    torch_model, full = siglip_dirs["SiglipModel"]
    ids, mask = _token_batch()
    pixels = _pixels(siglip_processor())
    text = _run(torch_model.text_model, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    vision = _run(torch_model.vision_model, pixel_values=pixels, output_hidden_states=True)
    for source in (full, siglip_dirs["SiglipTextModel"][1]):
        model = msfx.SiglipTextModel.from_pretrained(source)
        assert model.config.model_type == "siglip_text_model"
        _compare(f"SiglipTextModel ({source.name})", model(ids, mask, output_hidden_states=True), text)
    for source in (full, siglip_dirs["SiglipVisionModel"][1]):
        model = msfx.SiglipVisionModel.from_pretrained(source)
        _compare(f"SiglipVisionModel ({source.name})", model(pixels, output_hidden_states=True), vision)
    assert type(msfx.AutoModel.from_pretrained(siglip_dirs["SiglipVisionModel"][1])) is msfx.SiglipVisionModel
    with pytest.raises(CheckpointError, match="'siglip_vision_model' checkpoint; SiglipTextModel needs"):
        msfx.SiglipTextModel.from_pretrained(siglip_dirs["SiglipVisionModel"][1])


def test_siglip_vision_tower_without_its_head(tmp_path):
    """`vision_use_head=False`: no head keys, `pooler_output` None, as HF."""
    config = transformers.SiglipVisionConfig(**VISION, intermediate_size=40, vision_use_head=False)
    torch_model, path = _tiny(transformers.SiglipVisionModel, config, tmp_path)
    pixels = _pixels(siglip_processor())
    out = msfx.SiglipVisionModel.from_pretrained(path)(pixels, output_hidden_states=True)
    assert out.pooler_output is None
    _compare("SiglipVisionModel without head", out, _run(torch_model, pixel_values=pixels, output_hidden_states=True))


def test_siglip_image_classification_matches_hf(siglip_dirs):
    torch_model, path = siglip_dirs["SiglipForImageClassification"]
    pixels = _pixels(siglip_processor())
    labels = np.array([2, 0, 1])
    model = msfx.AutoModelForImageClassification.from_pretrained(path)
    assert type(model) is msfx.SiglipForImageClassification
    _compare("SiglipForImageClassification", model(pixels, labels=labels, output_hidden_states=True),
             _run(torch_model, pixel_values=pixels, labels=labels, output_hidden_states=True))


# ---------------------------------------------------------------- every class

def _all_dirs(vit_dirs, dinov2_dirs, siglip_dirs) -> dict:
    """{name: (torch model, dir)} of every class: the first config of ViT and DINOv2, SigLIP's."""
    return {**vit_dirs["no_qkv_bias_gelu_new_pooler_24"], **dinov2_dirs["swiglu"], **siglip_dirs}


def test_save_pretrained_reloads_in_hf_with_no_missing_or_unexpected_keys(vit_dirs, dinov2_dirs, siglip_dirs,
                                                                          tmp_path):
    for name, (torch_model, path) in _all_dirs(vit_dirs, dinov2_dirs, siglip_dirs).items():
        getattr(msfx, name).from_pretrained(path).save_pretrained(tmp_path / name)
        reloaded, info = getattr(transformers, name).from_pretrained(tmp_path / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (name, info)
        expected = torch_model.state_dict()
        for key, tensor in reloaded.state_dict().items():
            torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0, msg=f"{name} {key}")


def test_auto_classes_pick_the_hf_classes(vit_dirs, dinov2_dirs):
    for built in (vit_dirs["gelu"], dinov2_dirs["mlp"]):
        for name, (_, path) in built.items():
            auto = msfx.AutoModelForImageClassification if "Classification" in name else msfx.AutoModel
            assert type(auto.from_pretrained(path)).__name__ == name


def test_bad_pixel_values_raise_clear_errors(vit_dirs, dinov2_dirs, siglip_dirs):
    vit = msfx.ViTForImageClassification.from_pretrained(vit_dirs["gelu"]["ViTForImageClassification"][1])
    with pytest.raises(ValueError, match="4 channels, the model expects num_channels=3"):
        vit(np.zeros((1, 4, IMAGE, IMAGE), np.float32))
    with pytest.raises(ValueError, match="channels first"):
        vit(np.zeros((1, IMAGE, IMAGE, 3), np.float32))
    with pytest.raises(ValueError, match=r"Input image size \(40\*40\) doesn't match model \(30\*30\).*"
                                         r"ViTImageProcessor\) or pass interpolate_pos_encoding=True"):
        vit(np.zeros((1, 3, 40, 40), np.float32))
    with pytest.raises(ValueError, match="floating point"):
        vit(np.zeros((1, 3, IMAGE, IMAGE), np.uint8))
    dinov2 = msfx.Dinov2Model.from_pretrained(dinov2_dirs["mlp"]["Dinov2Model"][1])
    with pytest.raises(ValueError, match="1 channels, the model expects num_channels=3"):
        dinov2(np.zeros((2, 1, 40, 40), np.float32))
    with pytest.raises(ValueError, match="smaller than one patch"):
        dinov2(np.zeros((1, 3, 8, 40), np.float32))
    siglip = msfx.SiglipVisionModel.from_pretrained(siglip_dirs["SiglipVisionModel"][1])
    with pytest.raises(ValueError, match=r"\(20\*20\) doesn't match model \(30\*30\).*SiglipImageProcessor"):
        siglip(np.zeros((1, 3, 20, 20), np.float32))
    with pytest.raises(ValueError, match=r"\[batch, channels, height, width\]"):
        siglip(np.zeros((3, IMAGE, IMAGE), np.float32))
    with pytest.raises(ValueError, match="1 channels, the model expects num_channels=3"):
        siglip(np.zeros((1, 1, IMAGE, IMAGE), np.float32))
