"""The pre-LN transformer encoder and patch embeddings CLIP, SigLIP, ViT and DINOv2 share.

The four differ in checkpoint key names and a few switches, so one layer function reads its keys
and switches from an `EncoderLayout`: `x = x + s1 * o(attention(norm1(x)))`, then
`x = x + s2 * fc2(act(fc1(norm2(x))))`, where `s1`, `s2` are DINOv2's layer scales (1 elsewhere)
and DINOv2's SwiGLU variant replaces the MLP. Follows `modeling_clip`, `modeling_siglip`,
`modeling_vit` and `modeling_dinov2` (transformers 5.25) for the switches, and their saved
checkpoints (not 5.25's in-memory names, which `save_pretrained` maps back) for the keys.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from msfx.layers.attention import scaled_dot_product_attention
from msfx.layers.basic import activation, add, linear, transposed
from msfx.layers.dropout import dropout
from msfx.layers.norms import layer_norm


class EncoderLayout(NamedTuple):
    """Where one family keeps an encoder layer's tensors (dotted paths under `layers_key.{i}.`) and
    which config fields and switches it uses."""

    layers_key: str  # "encoder.layers" (CLIP, SigLIP) or "encoder.layer" (ViT, DINOv2)
    norm1: str
    norm2: str
    q: str
    k: str
    v: str
    o: str
    fc1: str
    fc2: str
    attention_dropout: str  # the config field of the attention-probability dropout rate
    hidden_dropout: str | None = None  # ViT's `hidden_dropout_prob` after each branch, None: none
    layer_scale: bool = False  # DINOv2's `layer_scale{1,2}.lambda1`
    swiglu: str | None = None  # DINOv2's `use_swiglu_ffn` config field: `mlp.weights_in` / `weights_out`
    mlp_ratio: bool = False  # DINOv2's MLP width is `hidden_size * mlp_ratio`, not `intermediate_size`


CLIP_LAYOUT = EncoderLayout("encoder.layers", "layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj",
                            "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2", "attention_dropout")
VIT_LAYOUT = EncoderLayout("encoder.layer", "layernorm_before", "layernorm_after", "attention.attention.query",
                           "attention.attention.key", "attention.attention.value", "attention.output.dense",
                           "intermediate.dense", "output.dense", "attention_probs_dropout_prob",
                           hidden_dropout="hidden_dropout_prob")
DINOV2_LAYOUT = VIT_LAYOUT._replace(norm1="norm1", norm2="norm2", fc1="mlp.fc1", fc2="mlp.fc2", hidden_dropout=None,
                                    layer_scale=True, swiglu="use_swiglu_ffn", mlp_ratio=True)


def subtree(p: dict, path: str) -> dict:
    """`p[a][b]...` for the dotted `path` "a.b..."."""
    for part in path.split("."):
        p = p[part]
    return p


def int_size(config, name: str) -> int:
    """`config.<name>` (`image_size` / `patch_size`), which must be an int.

    Raises:
        ValueError: a pair or another non-int (msfx takes square images and patches only).
    """
    value = getattr(config, name)
    if not isinstance(value, int):  # HF's modeling compares it with ints too: only square sizes work there
        raise ValueError(f"config.{name} must be an int (square images and patches), got {value!r}")
    return value


def mlp_size(config, layout: EncoderLayout) -> int:
    """The MLP's inner width: `intermediate_size`, or DINOv2's `hidden_size * mlp_ratio` (its
    SwiGLU variant: two thirds of that, rounded up to a multiple of 8, as HF)."""
    if not layout.mlp_ratio:
        return config.intermediate_size
    inner = int(config.hidden_size * config.mlp_ratio)
    return (int(inner * 2 / 3) + 7) // 8 * 8 if getattr(config, layout.swiglu) else inner


def layer_shapes(config, layout: EncoderLayout, prefix: str, qkv_bias: bool = True) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the encoder layers under `prefix` (e.g. "vit." or "vision_model.").

    Raises:
        ValueError: `hidden_size` not a multiple of `num_attention_heads`.
    """
    h, inter = config.hidden_size, mlp_size(config, layout)
    if h % config.num_attention_heads:
        raise ValueError(f"hidden_size {h} is not a multiple of num_attention_heads {config.num_attention_heads}")
    swiglu = bool(layout.swiglu and getattr(config, layout.swiglu))
    mlp = ((("mlp.weights_in", (2 * inter, h)), ("mlp.weights_out", (h, inter))) if swiglu else
           ((layout.fc1, (inter, h)), (layout.fc2, (h, inter))))
    shapes = {}
    for i in range(config.num_hidden_layers):
        p = f"{prefix}{layout.layers_key}.{i}."
        for name, shape in ((layout.q, (h, h)), (layout.k, (h, h)), (layout.v, (h, h)), (layout.o, (h, h)), *mlp,
                            (layout.norm1, (h,)), (layout.norm2, (h,))):
            shapes[p + name + ".weight"] = shape
            if name not in (layout.q, layout.k, layout.v) or qkv_bias:
                shapes[p + name + ".bias"] = shape[:1]
        if layout.layer_scale:
            shapes |= {p + "layer_scale1.lambda1": (h,), p + "layer_scale2.lambda1": (h,)}
    return shapes


def norm(x: Tensor, p: dict, eps: float) -> Tensor:
    """`nn.LayerNorm` over the last axis of `x` `[..., hidden]`, in `x`'s dtype (`msfx.layers.norms.layer_norm`:
    in bfloat16 / float16 the scale and shift in float32 too and the result rounded once, as PyTorch's CPU kernel)."""
    return layer_norm(x, p["weight"], p["bias"], eps)


def _dense(x: Tensor, p: dict) -> Tensor:
    return linear(x, p["weight"], p.get("bias"))


def mlp(x: Tensor, p: dict, layout: EncoderLayout, config) -> Tensor:
    """The layer's MLP on `x` `[n, hidden]`: `fc2(act(fc1(x)))`, or DINOv2's SwiGLU
    `weights_out(silu(gate) * up)` with `weights_in` holding the gate rows then the up rows."""
    if layout.swiglu and getattr(config, layout.swiglu):
        gate, up = ops.chunk(_dense(x, p["mlp"]["weights_in"]), 2, -1)
        return _dense(activation("silu")(gate) * up, p["mlp"]["weights_out"])
    return _dense(activation(config.hidden_act)(_dense(x, subtree(p, layout.fc1))), subtree(p, layout.fc2))


def encoder_layer(x: Tensor, p: dict, layout: EncoderLayout, config, bias: Tensor, batch: int) -> Tensor:
    """One pre-LN encoder layer. `x` is `[batch * seq, hidden]` (2-D: one matmul per linear);
    `bias` the additive float32 attention mask, broadcastable to `[batch, heads, 1, seq, seq]`."""
    s, heads = x.shape[0] // batch, config.num_attention_heads
    d = config.hidden_size // heads
    eps = config.layer_norm_eps
    h = norm(x, subtree(p, layout.norm1), eps)

    def project(path):
        return transposed(_dense(h, subtree(p, path)).reshape(batch, s, heads, d), (0, 2, 1, 3))

    ctx = scaled_dot_product_attention(project(layout.q), project(layout.k), project(layout.v), bias, d ** -0.5,
                                       dropout_rate=getattr(config, layout.attention_dropout))
    out = _dense(transposed(ctx, (0, 2, 1, 3)).reshape(batch * s, -1), subtree(p, layout.o))
    rate = getattr(config, layout.hidden_dropout) if layout.hidden_dropout else 0.0
    if layout.layer_scale:
        out = out * p["layer_scale1"]["lambda1"]
    x = add(x, dropout(out, rate))
    out = mlp(norm(x, subtree(p, layout.norm2), eps), p, layout, config)
    if layout.layer_scale:
        out = out * p["layer_scale2"]["lambda1"]
    return add(x, dropout(out, rate))


def encoder(x: Tensor, layers: list, layout: EncoderLayout, config, bias: Tensor,
            output_hidden_states: bool) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """The layers over `x` `[batch, seq, hidden]`: the last layer's output and, with
    `output_hidden_states`, the input followed by every layer's output (HF's `hidden_states`)."""
    b, s = x.shape[0], x.shape[1]
    hidden_states = [x] if output_hidden_states else None
    x = x.reshape(b * s, -1)
    for layer in layers:
        x = encoder_layer(x, layer, layout, config, bias, b)
        if output_hidden_states:
            hidden_states.append(x.reshape(b, s, -1))
    return x.reshape(b, s, -1), tuple(hidden_states) if output_hidden_states else None


def no_mask() -> Tensor:
    """The attention bias of an image encoder: every patch sees every patch."""
    return ops.zeros((1, 1, 1, 1, 1), ms.float32)


def check_pixel_values(pixel_values, config, interpolate_pos_encoding: bool, processor: str) -> None:
    """Raise ValueError unless `pixel_values` is a float `[batch, num_channels, H, W]` Tensor with
    `H = W = image_size` (with `interpolate_pos_encoding`: at least one patch each way); `processor`
    names the image processor that resizes images for this model."""
    if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4:
        kind = list(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values)
        raise ValueError(f"pixel_values must be a float Tensor [batch, channels, height, width], got {kind}")
    if not ops.is_floating_point(pixel_values):
        raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}")
    _, c, h, w = pixel_values.shape
    if c != config.num_channels:
        raise ValueError(f"pixel_values has {c} channels, the model expects num_channels={config.num_channels} "
                         "(images as [batch, channels, height, width], channels first)")
    size, patch = int_size(config, "image_size"), int_size(config, "patch_size")
    if not interpolate_pos_encoding and (h != size or w != size):
        raise ValueError(f"Input image size ({h}*{w}) doesn't match model ({size}*{size}); resize it (e.g. "
                         f"with {processor}) or pass interpolate_pos_encoding=True")
    if h < patch or w < patch:
        raise ValueError(f"Input image size ({h}*{w}) is smaller than one patch ({patch}*{patch})")


def embed_patches(pixel_values: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The stride-`patch` convolution `weight` `[hidden, channels, patch, patch]` (and `bias`) over
    `pixel_values` `[batch, channels, H, W]`, cast to the weight's dtype -> `[batch, (H // patch) *
    (W // patch), hidden]`, row-major over the patch grid; pixels past the last whole patch are
    ignored, as the convolution does. One matmul over the unfolded patches."""
    hidden, c, patch = weight.shape[0], weight.shape[1], weight.shape[2]
    b, _, height, width = pixel_values.shape
    gh, gw = height // patch, width // patch
    x = pixel_values.astype(weight.dtype)[:, :, :gh * patch, :gw * patch]
    x = x.reshape(b, c, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * patch * patch)
    return linear(x, weight.reshape(hidden, -1), bias).reshape(b, gh * gw, hidden)


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """`[size_out, size_in]` weights of PyTorch's 1-D bicubic resize (`align_corners=False`,
    a = -0.75, border indices clamped, source coordinate not clamped), in float64."""
    a, scale = -0.75, size_in / size_out
    m = np.zeros((size_out, size_in))
    for j in range(size_out):
        src = (j + 0.5) * scale - 0.5
        i0 = math.floor(src)
        t = src - i0
        # the cubic convolution kernel at distances 1 + t, t, 1 - t, 2 - t
        w = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
             ((a + 2) * t - (a + 3)) * t * t + 1,
             ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
             ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
        for k in range(4):
            m[j, min(max(i0 - 1 + k, 0), size_in - 1)] += w[k]
    return m


def position_embeddings(weight: Tensor, height: int, width: int, patch: int, class_token: bool = True) -> Tensor:
    """HF's `interpolate_pos_encoding` (CLIP, SigLIP, ViT, DINOv2): the class position (when
    `class_token`) then the patch positions `weight` `[(1 +) n * n, hidden]`, a square grid
    bicubically resized to `[height // patch, width // patch]` (kept as stored when the patch count
    is unchanged and the image square) -> `[(1 +) patches, hidden]`. The resize runs in float32
    (DINOv2's choice; in float32 all four agree) and is rounded once to the weight's dtype."""
    head = 1 if class_token else 0
    n = int((weight.shape[0] - head) ** 0.5)
    gh, gw = height // patch, width // patch
    if gh * gw == n * n and height == width:
        return weight
    dim = weight.shape[1]
    rows = Tensor(_bicubic_matrix(n, gh).astype(np.float32))
    cols = Tensor(_bicubic_matrix(n, gw).astype(np.float32))
    grid = ops.matmul(rows, weight[head:].astype(ms.float32).reshape(n, n * dim)).reshape(gh, n, dim)  # along height
    grid = ops.matmul(cols, grid).reshape(gh * gw, dim).astype(weight.dtype)  # along width, broadcast over rows
    return ops.concat([weight[:1], grid], 0) if class_token else grid
