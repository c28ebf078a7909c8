"""bfloat16 runs of the image-generation text encoders (T5 encoder, CLIP text tower) and the image
encoders (ViT, DINOv2, SigLIP) against PyTorch.

A small random HF PyTorch checkpoint (float32 on disk, random norm weights and biases) is loaded three
times: torch float32 (the reference), torch bfloat16 and msfx bfloat16 (`from_pretrained(dir,
dtype="bfloat16")`). bfloat16 keeps 8 significant bits, so on outputs of magnitude ~4 one rounding is
worth 0.016 and a 3-layer stack drifts by several of those; an absolute bound on msfx vs torch-bf16 would
either be loose or encode torch's exact rounding sequence. The tolerance is instead relative to what
torch itself loses: msfx's error against the float32 reference (over non-padding positions) must be at
most 1.5x torch-bf16's for the max and 1.2x for the mean. Measured (this file's seeds): T5 max 0.058 vs
torch 0.062, mean 0.0087 vs 0.0092; CLIP last hidden state max 0.030 vs 0.030, mean 0.0046 vs 0.0046.
Image encoders (3 layers, hidden 64): ViT last hidden state max 0.077 vs 0.077, logits 0.034 vs 0.034;
DINOv2 at 40x50 last hidden state 0.053 vs 0.053, logits 0.028 vs 0.043; SigLIP logits_per_image
0.0033 vs 0.0041 (mean 0.0029 vs 0.0028), image pooler 0.024 vs 0.024.
(Before CLIP's LayerNorm applied its scale and shift in float32 with one rounding, as torch's CPU
kernel does, its mean error was 1.1x torch's and its distance to torch-bf16 2 ulps instead of 1.)
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers

from msfx import CLIPTextModel, T5EncoderModel

from oracle import save_tiny

MAX_FACTOR, MEAN_FACTOR = 1.5, 1.2
_rng = np.random.default_rng(0)
IDS = _rng.integers(2, 198, (2, 16))
MASK = np.ones_like(IDS)
MASK[1, 11:] = 0
CLIP_EOS = 199
CLIP_IDS = IDS.copy()
CLIP_IDS[0, 15] = CLIP_IDS[1, 10] = CLIP_EOS
CLIP_IDS[1, 11:] = 1


def _errors(ours: np.ndarray, bf16: np.ndarray, ref: np.ndarray, keep) -> tuple[float, float, float, float]:
    """(msfx max, torch-bf16 max, msfx mean, torch-bf16 mean) abs errors against `ref` over `keep`."""
    ours_err, torch_err = np.abs(ours - ref)[keep], np.abs(bf16 - ref)[keep]
    return ours_err.max(), torch_err.max(), ours_err.mean(), torch_err.mean()


def _check(name: str, ours: ms.Tensor, bf16: torch.Tensor, ref: torch.Tensor, keep=slice(None)) -> None:
    assert ours.dtype == ms.bfloat16 and bf16.dtype == torch.bfloat16, name
    ours_max, torch_max, ours_mean, torch_mean = _errors(ours.astype(ms.float32).asnumpy(), bf16.float().numpy(),
                                                         ref.numpy(), keep)
    assert torch_max > 0, name
    assert ours_max <= MAX_FACTOR * torch_max, f"{name}: max error {ours_max} vs torch bf16 {torch_max}"
    assert ours_mean <= MEAN_FACTOR * torch_mean, f"{name}: mean error {ours_mean} vs torch bf16 {torch_mean}"


def _torch_runs(cls, path, **inputs):
    """The torch model's output in float32 and in bfloat16 (eager attention)."""
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
        with torch.no_grad():
            outs.append(model(**{k: torch.tensor(v) for k, v in inputs.items()}))
    return outs


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    config = transformers.T5Config(vocab_size=200, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4,
                                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=16,
                                   relative_attention_max_distance=32)
    return save_tiny(transformers.T5EncoderModel, config, tmp_path_factory.mktemp("t5_bf16"))[1]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    config = transformers.CLIPTextConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, max_position_embeddings=32, hidden_act="gelu",
                                         eos_token_id=CLIP_EOS, pad_token_id=1, bos_token_id=0)
    return save_tiny(transformers.CLIPTextModel, config, tmp_path_factory.mktemp("clip_bf16"), biases=True)[1]


def test_t5_encoder_bf16(t5_dir):
    ref, bf16 = _torch_runs(transformers.T5EncoderModel, t5_dir, input_ids=IDS, attention_mask=MASK)
    ours = T5EncoderModel.from_pretrained(t5_dir, dtype="bfloat16")
    assert ours.dtype == ms.bfloat16
    out = ours(input_ids=IDS, attention_mask=MASK).last_hidden_state
    _check("T5 last_hidden_state", out, bf16.last_hidden_state, ref.last_hidden_state, MASK.astype(bool))


def test_clip_text_bf16(clip_dir):
    ref, bf16 = _torch_runs(transformers.CLIPTextModel, clip_dir, input_ids=CLIP_IDS, attention_mask=MASK)
    out = CLIPTextModel.from_pretrained(clip_dir, dtype="bfloat16")(input_ids=CLIP_IDS, attention_mask=MASK)
    _check("CLIP last_hidden_state", out.last_hidden_state, bf16.last_hidden_state, ref.last_hidden_state,
           MASK.astype(bool))
    _check("CLIP pooler_output", out.pooler_output, bf16.pooler_output, ref.pooler_output)


# ---------------------------------------------------------------- image encoders

_PIXELS = _rng.normal(0, 1, (2, 3, 30, 30)).astype(np.float32)
_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=30,
               patch_size=10)


def _vision_dir(cls, config, path):
    """A tiny checkpoint with random norms and biases (and DINOv2's layer scales from U(0.5, 1.5))."""
    model, path = save_tiny(cls, config, path, biases=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["ViTModel", "ViTForImageClassification", "Dinov2Model",
                                  "Dinov2ForImageClassification", "SiglipModel"])
def test_image_encoders_bf16(name, tmp_path):
    """Every output of ViT, DINOv2 (at a resized 40x50 image) and SigLIP in bfloat16."""
    import msfx

    cls = getattr(transformers, name)
    if name == "SiglipModel":
        config = transformers.SiglipConfig(text_config=dict(vocab_size=200, hidden_size=64, intermediate_size=128,
                                                            num_hidden_layers=3, num_attention_heads=4,
                                                            max_position_embeddings=16),
                                           vision_config=_VISION)
        inputs = dict(input_ids=IDS, pixel_values=_PIXELS, attention_mask=MASK)
    else:
        config = (transformers.ViTConfig if name.startswith("ViT") else transformers.Dinov2Config)(
            **_VISION, initializer_range=0.2, num_labels=5)
        pixels = _PIXELS if name.startswith("ViT") else _rng.normal(0, 1, (2, 3, 40, 50)).astype(np.float32)
        inputs = dict(pixel_values=pixels)
    path = _vision_dir(cls, config, tmp_path)
    ref, bf16 = _torch_runs(cls, path, **inputs)
    out = getattr(msfx, name).from_pretrained(path, dtype="bfloat16")(**inputs)
    if name == "SiglipModel":
        _check(f"{name} logits_per_image", out.logits_per_image, bf16.logits_per_image, ref.logits_per_image)
        out, bf16, ref = out.vision_model_output, bf16.vision_model_output, ref.vision_model_output
    for field in ("last_hidden_state", "pooler_output", "logits"):
        if getattr(ref, field, None) is not None:
            _check(f"{name} {field}", getattr(out, field), getattr(bf16, field), getattr(ref, field))


@pytest.mark.parametrize("name", ["quick_gelu", "gelu_new"])
def test_activations_round_where_torch_bfloat16_does(name):
    """HF's op-by-op activations (quick_gelu: CLIP, LLaVA's tower; gelu_new: Phi, GPT-2) give torch's
    bfloat16 bits; rounding once at the end (msfx before) differs on ~40% of them (negative control)."""
    from transformers.activations import ACT2FN

    from msfx.layers.basic import activation

    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    theirs = ACT2FN[name](x).float().numpy()
    ours = activation(name)(ms.Tensor(x.float().numpy()).astype(ms.bfloat16))
    assert ours.dtype == ms.bfloat16
    np.testing.assert_array_equal(ours.astype(ms.float32).asnumpy(), theirs)
    once = ACT2FN[name](x.float()).bfloat16().float().numpy()
    assert (once != theirs).mean() > 0.3
