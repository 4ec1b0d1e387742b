"""scratchformer's kernels inside Hugging Face transformers models, one line each.

    import scratchformer.hf
    scratchformer.hf.register()       # once: adds the "scratchformer" attention implementation
    model = AutoModelForCausalLM.from_pretrained("gpt2", attn_implementation="scratchformer")
    scratchformer.hf.patch_layer_norm(model)   # optional: every nn.LayerNorm on our kernel too

Every layer's attention then runs `ops.causal_attention` (the fused kernel on a GPU, its
reference elsewhere; `ops.set_backend` chooses as usual). Grouped-query models pass their K/V
heads through without repeating them, and rotary positions are applied by the model before the
call. Padded batches (left or right), packed sequences (position_ids restarting, or the
`cu_seq_lens_q` of DataCollatorWithFlattening, which transformers' own SDPA ignores) and sliding
windows become the op's `document_ids` and `window` (read from transformers' boolean mask and checked
to give exactly its pattern), Gemma 2's logit softcapping its `softcap`, gpt-oss's attention sinks
its `sinks`. A call our op cannot compute exactly (a mask of another pattern, a non-causal layer,
attention dropout while training, keys and values of different head sizes) runs PyTorch's
scaled_dot_product_attention instead, as transformers' "sdpa" implementation would, or the models'
eager code where SDPA cannot take it either (softcapping, sinks, a position bias). Either way the
call is counted by reason in `fallbacks()` and warned about once per reason: never silently wrong.

Registration is explicit rather than an import side effect, so importing scratchformer never
imports transformers. Needs the `hf` extra: `pip install "scratchformer[hf]"`.
"""

from __future__ import annotations

import collections
import os
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .ops.reference import visible_keys
from .config import ModelConfig
from .model import GPT, LayerNorm

NAME = "scratchformer"

_calls: collections.Counter = collections.Counter()  # reason -> calls sent to SDPA; "" -> ours


def _transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError(
            'scratchformer.hf needs Hugging Face transformers: pip install "scratchformer[hf]"'
        ) from None
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    return AttentionInterface, AttentionMaskInterface, sdpa_mask, sdpa_attention_forward


def register(name: str = NAME) -> str:
    """Register our attention with transformers under `name` (default "scratchformer"); returns it.

    The mask side is transformers' SDPA mask builder: it gives no mask at all when attention is
    plainly causal and a boolean mask otherwise (padding, packed sequences, sliding windows, chunked
    prefill), which `attention_forward` turns into the op's document ids and window where they give
    exactly that mask, and sends to the fallback where not.
    """
    attention_interface, mask_interface, sdpa_mask, _ = _transformers()
    attention_interface.register(name, attention_forward)
    mask_interface.register(name, sdpa_mask)
    return name


def fallbacks() -> dict[str, int]:
    """Calls not run on our op (PyTorch's SDPA, or eager code) since the last `reset_stats()`, by reason."""
    return {reason: n for reason, n in _calls.items() if reason}


def stats() -> dict[str, int]:
    """{"scratchformer": calls on our op, "sdpa": calls that fell back (SDPA or eager)} since `reset_stats()`."""
    return {"scratchformer": _calls[""], "sdpa": sum(fallbacks().values())}


def reset_stats() -> None:
    _calls.clear()


def _window(kwargs) -> tuple[int, int] | None:
    # transformers' sliding window of w: a query sees itself and the w - 1 keys before it.
    window = kwargs.get("sliding_window")
    return None if window is None else (window - 1, 0)


# (a weak reference to the mask, window, document ids): every layer of a forward passes the same mask,
# read once; held weakly, so a large mask is not kept past its forward.
_last_mask: tuple = (lambda: None, None, None)


def _documents(mask: torch.Tensor, batch: int, t_q: int, t_k: int, window) -> torch.Tensor | None:
    """Document ids [batch, Tk] that make `causal_attention` see what the boolean `mask` [B, 1, Tq, Tk]
    lets each real query see (padding keys get an id of their own, packed sequences one each), or
    None when no such ids exist (a pattern of another kind). Padding queries attend to themselves
    alone: their outputs are not eager's, and no real position reads them."""
    global _last_mask
    if _last_mask[0]() is mask and _last_mask[1] == window:
        return _last_mask[2]
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (t_q, t_k):
        return None
    visible = mask[:, 0]  # [B or 1, Tq, Tk]
    real = visible.any(dim=1)  # keys some query sees
    positions = torch.arange(t_k, device=mask.device)
    starts = torch.zeros_like(real)
    if t_q == t_k > 1:  # a real key starts a document when its own query does not see the real key before it
        starts[:, 1:] = real[:, 1:] & real[:, :-1] & ~visible[:, positions[1:], positions[:-1]]
    documents = torch.where(real, starts.long().cumsum(dim=1), -1 - positions)
    # Compared: every query's row, but a padding query's (its own key unseen) in a full square mask,
    # where it reads real keys (right padding) and its output is never read. Fewer queries than
    # keys (decoding) must all be real: a query whose slot is empty means another alignment.
    rows = real[:, t_k - t_q :, None] if t_q == t_k else torch.ones_like(real[:, t_k - t_q :, None])
    derived = visible_keys(t_q, t_k, mask.device, documents, window and window[0])[:, 0]
    if not torch.equal(derived & rows, visible & rows):
        return None
    documents = documents.expand(batch, t_k)
    _last_mask = (weakref.ref(mask), window, documents)
    return documents


def _packed_offsets(query, key, kwargs) -> torch.Tensor | None:
    """Packed sequences as DataCollatorWithFlattening marks them for flash-attention: one row, sequence
    s at cu_seq_lens_q[s] .. cu_seq_lens_q[s + 1] (the masks, built without them, do not show them)."""
    offsets = kwargs.get("cu_seq_lens_q")
    if offsets is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    return offsets.to(query.device)


def _fallback_reason(module, query, key, value, attention_mask, dropout, kwargs) -> str | None:
    if attention_mask is not None and _packed_offsets(query, key, kwargs) is None:
        if _documents(attention_mask, query.shape[0], query.shape[2], key.shape[2], _window(kwargs)) is None:
            return "an attention mask other than padding, packed sequences or a sliding window"
    is_causal = kwargs.get("is_causal")
    # One query sees every key either way, so a decoding step marked non-causal is still ours.
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and query.shape[2] > 1:
        return "non-causal attention"
    if dropout and module.training:
        return "attention dropout while training (set the config's attention dropout to 0 to use the kernel)"
    if kwargs.get("position_bias") is not None:
        return "a position bias"
    if not query.shape[-1] == key.shape[-1] == value.shape[-1]:
        return "keys and values of different head sizes"
    if query.shape[2] > key.shape[2]:
        return "more queries than keys"
    return None


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> ([B, Tq, Hq, D], None)."""
    reason = _fallback_reason(module, query, key, value, attention_mask, dropout, kwargs)
    _calls[reason or ""] += 1
    if reason is not None:
        eager = kwargs.get("position_bias") is not None or (
            kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None)
        if _calls[reason] == 1:
            where = "as the model's eager code computes it" if eager else "on PyTorch's SDPA"
            warnings.warn(f"scratchformer attention: {reason} runs {where} (scratchformer.hf.fallbacks() counts these)",
                          stacklevel=2)
        if eager:
            return _eager_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs)
        sdpa_attention_forward = _transformers()[3]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    t_q, t_k = query.shape[2], key.shape[2]
    documents, offsets = None, _packed_offsets(query, key, kwargs)
    if offsets is not None:
        documents = torch.bucketize(torch.arange(t_k, device=query.device), offsets[1:-1], right=True)[None]
    elif attention_mask is not None:
        documents = _documents(attention_mask, query.shape[0], t_q, t_k, _window(kwargs))
    elif 1 < t_q < t_k:
        # No mask with fewer queries than keys happens only when prefilling a preallocated (static)
        # cache, whose slots past the prompt are empty: transformers means SDPA's top-left causal
        # mask, so the keys are cut to the queries, as its SDPA integration does.
        key, value = key[:, :, :t_q], value[:, :, :t_q]
    out = ops.causal_attention(query, key, value, scale=scaling, document_ids=documents, window=_window(kwargs),
                               softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))
    return out.transpose(1, 2).contiguous(), None


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    """Attention with what SDPA cannot take, spelled out as the models' own eager code computes it:
    tanh-capped logits (Gemma 2), a position bias added to the scores (T5-style), and attention
    sinks (gpt-oss: a learned logit per head that joins every softmax and is then dropped)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = query @ key.transpose(-1, -2) * scaling
    if kwargs.get("softcap") is not None:
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    if kwargs.get("position_bias") is not None:
        scores = scores + kwargs["position_bias"]
    t_q, t_k = query.shape[2], key.shape[2]
    if attention_mask is None:
        attention_mask = torch.ones(t_q, t_k, dtype=torch.bool, device=query.device).tril(t_k - t_q)
    # The dtype's lowest finite value, not -inf: a fully masked (padding) row then gets a uniform,
    # finite softmax, as in eager, instead of NaN that later layers would spread into valid rows.
    lowest = torch.finfo(scores.dtype).min
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, lowest)
    else:
        scores = (scores + attention_mask).clamp(min=lowest)
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        scores = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, t_q, 1).to(scores.dtype)], dim=-1)
        scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    if sinks is not None:
        weights = weights[..., :-1]
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), None


def patch_layer_norm(model: nn.Module) -> int:
    """Replace every `nn.LayerNorm` over the last dimension in `model` by scratchformer's, keeping
    its parameters (the same tensors) and eps. Returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
                ours = LayerNorm(child.normalized_shape[0], eps=child.eps)
                ours.weight, ours.bias = child.weight, child.bias
                setattr(parent, child_name, ours)
                replaced += 1
    return replaced


class HFRMSNorm(nn.Module):
    """A transformers model's RMSNorm on `ops.rms_norm`, keeping its weight (the same tensor) and
    eps. Gemma's norms scale by 1 + weight (their weight starts at zero): `offset` 1."""

    def __init__(self, weight: nn.Parameter, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight, self.eps, self.offset = weight, eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight + self.offset if self.offset else self.weight, self.eps)


def patch_rms_norm(model: nn.Module) -> int:
    """Replace every RMSNorm module of a transformers model (a class named ...RMSNorm with a weight
    over the last dimension: Llama's, Mistral's, Qwen2's, Gemma's) by `HFRMSNorm`. Returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            weight = getattr(child, "weight", None)
            if type(child).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1:
                eps = getattr(child, "variance_epsilon", getattr(child, "eps", 1e-6))
                setattr(parent, child_name, HFRMSNorm(weight, eps, 1.0 if type(child).__name__.startswith("Gemma") else 0.0))
                replaced += 1
    return replaced


def patch_loss(model: nn.Module) -> bool:
    """Make `model(..., labels=...)` compute its causal-LM loss with `ops.linear_cross_entropy`,
    from the base model's hidden states and the LM head's weight, never holding the logits (the
    output's logits are then None). transformers' conventions kept: labels shifted by one, -100
    ignored, the mean, or the sum over `num_items_in_batch` when given, `shift_labels` taken as
    they are, Gemma 2's final logit softcapping. Calls without labels run the model's own forward.
    False when the model has no `lm_head` on a base model."""
    head, base = getattr(model, "lm_head", None), getattr(model, "base_model", model)
    if not isinstance(head, nn.Linear) or base is model:
        return False
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(*args, labels=None, shift_labels=None, num_items_in_batch=None, logits_to_keep=0, **kwargs):
        if labels is None and shift_labels is None:
            return original(*args, logits_to_keep=logits_to_keep, **kwargs)
        outputs = base(*args, **kwargs)
        hidden = outputs[0]
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = ops.linear_cross_entropy(hidden.flatten(0, -2).to(head.weight.dtype), head.weight,
                                        shift_labels.flatten().to(hidden.device), bias=head.bias, softcap=softcap,
                                        reduction="sum" if num_items_in_batch is not None else "mean")
        if num_items_in_batch is not None:
            loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
        # The base model's other outputs (the cache, hidden states, attentions) under their own names.
        return CausalLMOutputWithPast(loss=loss, logits=None, **{k: v for k, v in outputs.items() if k != "last_hidden_state"})

    model.forward = forward
    return True


def apply(model: nn.Module) -> dict[str, int]:
    """scratchformer's ops in a transformers causal LM, in one line: attention on our backend
    (`register()` and the model switched to it), every LayerNorm and RMSNorm module on our ops
    (parameters and eps kept), and the loss through `linear_cross_entropy` (`patch_loss`).
    Returns what it patched: attention layers, layer norms, RMS norms, and the loss (0 or 1)."""
    model.set_attn_implementation(register())
    return {"attention": int(getattr(model.config, "num_hidden_layers", 0)), "layer_norm": patch_layer_norm(model),
            "rms_norm": patch_rms_norm(model), "loss": int(patch_loss(model))}


# ---- GPT-2's weights <-> ours ------------------------------------------------------------------
# GPT-2 keeps its linear layers as `Conv1D` with weights [in, out], the transpose of nn.Linear's;
# its attention projection c_attn holds q, k and v side by side, ours q and (k, v) apart.

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
# A state dict does not say how many heads it has: the published GPT-2 sizes (all heads of 64).
_PUBLISHED_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}


class ConversionError(ValueError):
    """Weights or a configuration that do not describe a GPT-2 our model can hold."""


def _check_gpt2_config(hf_config) -> None:
    if getattr(hf_config, "model_type", None) != "gpt2":
        raise ConversionError(f"from_hf converts GPT-2 and Llama models, not {getattr(hf_config, 'model_type', type(hf_config).__name__)!r}")
    unsupported = {
        "scale_attn_by_inverse_layer_idx": True, "scale_attn_weights": False, "add_cross_attention": True,
    }
    for name, bad in unsupported.items():
        if getattr(hf_config, name, not bad) == bad:
            raise ConversionError(f"this GPT-2 sets {name}={bad}, which scratchformer's model does not implement")
    if hf_config.activation_function not in _ACTIVATIONS:
        raise ConversionError(f"activation {hf_config.activation_function!r} is not one of {', '.join(_ACTIVATIONS)}")


def config_from_hf(hf_config):
    """Our ModelConfig for a transformers GPT2Config."""
    _check_gpt2_config(hf_config)
    return ModelConfig(
        vocab_size=hf_config.vocab_size, context=hf_config.n_positions, n_layers=hf_config.n_layer, d_model=hf_config.n_embd,
        n_heads=hf_config.n_head, d_ff=hf_config.n_inner or 4 * hf_config.n_embd, positions="learned",
        tie_embeddings=getattr(hf_config, "tie_word_embeddings", True), activation=_ACTIVATIONS[hf_config.activation_function],
        bias=True, norm_eps=hf_config.layer_norm_epsilon, scale_embeddings=False,
    ).validate()


def _config_from_state_dict(sd: dict):
    vocab, d_model = sd["wte.weight"].shape
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    tied = "lm_head.weight" not in sd or torch.equal(sd["lm_head.weight"], sd["wte.weight"])
    if d_model not in _PUBLISHED_HEADS:
        raise ConversionError(f"a state dict does not say how many heads its {d_model} channels form (only the published "
                              "GPT-2 sizes are known): pass the model itself, or config=its GPT2Config")
    return ModelConfig(vocab_size=vocab, context=sd["wpe.weight"].shape[0], n_layers=n_layers, d_model=d_model,
                       n_heads=_PUBLISHED_HEADS[d_model], d_ff=sd["h.0.mlp.c_fc.weight"].shape[1], positions="learned",
                       tie_embeddings=tied, activation="gelu_tanh", bias=True, scale_embeddings=False).validate()


def load_pretrained(name: str | os.PathLike):
    """A transformers causal LM from a Hub name (downloaded once) or a local folder."""
    _transformers()
    import huggingface_hub
    import transformers

    # Their progress and retry messages would bury the one error line when the Hub cannot be reached.
    transformers.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError) as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"cannot load it ({cause.rstrip('.')}): give a model name on the Hugging Face Hub "
                              "(downloaded once, so the first time needs network) or a folder with config.json and the weights") from None


def from_hf(source, config=None):
    """Our GPT with the weights of a GPT-2 or a Llama: a Hub name or a local folder (as
    `load_pretrained`), a transformers GPT2LMHeadModel / GPT2Model / LlamaForCausalLM, or a state
    dict in their names with `config` (a GPT-2 state dict of a published size needs none: with or
    without the "transformer." prefix, it implies the head count)."""
    if isinstance(source, (str, os.PathLike)):
        source = load_pretrained(source)
    if isinstance(source, nn.Module):
        config, state = source.config, source.state_dict()
    else:
        state = dict(source)
    if getattr(config, "model_type", None) == "llama":
        return _from_llama(state, config)
    if config is not None:
        _check_gpt2_config(config)
    sd = {k.removeprefix("transformer."): v for k, v in state.items()}
    # Old checkpoints carry the causal mask as buffers named attn.bias / attn.masked_bias.
    sd = {k: v for k, v in sd.items() if not (k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"))}
    if "wte.weight" not in sd or "wpe.weight" not in sd:
        raise ConversionError("not a GPT-2 state dict: no wte.weight / wpe.weight (token and position embeddings)")
    ours = config_from_hf(config) if config is not None else _config_from_state_dict(sd)
    try:
        out = _gpt2_to_ours(sd, ours)
    except KeyError as e:
        raise ConversionError(f"not a complete GPT-2 state dict: {e.args[0]} is missing") from None
    model = GPT(ours)
    model.load_state_dict({k: v.contiguous() for k, v in out.items()})
    return model.to(next(iter(out.values())).dtype)


def _gpt2_to_ours(sd: dict, ours: ModelConfig) -> dict:
    """Our state dict from GPT-2's (which it empties)."""
    d = ours.d_model
    out = {"embedding.weight": sd.pop("wte.weight"), "position_embedding.weight": sd.pop("wpe.weight"),
           "final_norm.weight": sd.pop("ln_f.weight"), "final_norm.bias": sd.pop("ln_f.bias")}
    head = sd.pop("lm_head.weight", None)
    if not ours.tie_embeddings:
        if head is None:
            raise ConversionError("this GPT-2 does not tie its output layer to the embeddings, but has no lm_head.weight")
        out["head.weight"] = head
    for i in range(ours.n_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        qkv_w, qkv_b = sd.pop(h + "attn.c_attn.weight").t(), sd.pop(h + "attn.c_attn.bias")
        out |= {
            b + "norm1.weight": sd.pop(h + "ln_1.weight"), b + "norm1.bias": sd.pop(h + "ln_1.bias"),
            b + "attention.query.weight": qkv_w[:d], b + "attention.query.bias": qkv_b[:d],
            b + "attention.key_value.weight": qkv_w[d:], b + "attention.key_value.bias": qkv_b[d:],
            b + "attention.out.weight": sd.pop(h + "attn.c_proj.weight").t(), b + "attention.out.bias": sd.pop(h + "attn.c_proj.bias"),
            b + "norm2.weight": sd.pop(h + "ln_2.weight"), b + "norm2.bias": sd.pop(h + "ln_2.bias"),
            b + "feed_forward.0.weight": sd.pop(h + "mlp.c_fc.weight").t(), b + "feed_forward.0.bias": sd.pop(h + "mlp.c_fc.bias"),
            b + "feed_forward.2.weight": sd.pop(h + "mlp.c_proj.weight").t(), b + "feed_forward.2.bias": sd.pop(h + "mlp.c_proj.bias"),
        }
    if sd:
        raise ConversionError(f"weights left over that our GPT-2 has no place for: {', '.join(sorted(sd)[:5])}")
    return out


def _check_convertible(config) -> None:
    wanted = {"positions": "learned", "bias": True, "scale_embeddings": False, "norm": "layernorm"}
    for name, value in wanted.items():
        if getattr(config, name) != value:
            raise ConversionError(f"to_hf: a GPT-2 needs {name}={value}, this model has {getattr(config, name)}")
    if config.kv_heads != config.n_heads:
        raise ConversionError(f"to_hf: GPT-2 has one key/value head per query head, this model has {config.kv_heads} for {config.n_heads}")


def to_hf(model):
    """A transformers model with the weights of our GPT: a LlamaForCausalLM for Llama's architecture
    (RMSNorm, SwiGLU, rotary, no biases), else a GPT2LMHeadModel (GPT-2's architecture only)."""
    _transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    if c.document_token is not None:
        warnings.warn(f"to_hf: this model was trained with a document mask (no position sees past a {c.document_token} "
                      "token); transformers' model has none: give it one document per sequence, or position_ids that "
                      "restart at each document (packed, as in training)", stacklevel=2)
    if c.activation == "swiglu" or c.norm == "rmsnorm":
        return _to_llama(model)
    _check_convertible(c)
    hf_config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.context, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ff,
        activation_function="gelu_new" if c.activation == "gelu_tanh" else "relu", layer_norm_epsilon=c.norm_eps,
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=c.tie_embeddings,
        bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1,
    )
    sd = model.state_dict()
    out = {"transformer.wte.weight": sd["embedding.weight"], "transformer.wpe.weight": sd["position_embedding.weight"],
           "transformer.ln_f.weight": sd["final_norm.weight"], "transformer.ln_f.bias": sd["final_norm.bias"],
           "lm_head.weight": sd["embedding.weight"] if c.tie_embeddings else sd["head.weight"]}
    for i in range(c.n_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        out |= {
            h + "ln_1.weight": sd[b + "norm1.weight"], h + "ln_1.bias": sd[b + "norm1.bias"],
            h + "attn.c_attn.weight": torch.cat([sd[b + "attention.query.weight"], sd[b + "attention.key_value.weight"]]).t(),
            h + "attn.c_attn.bias": torch.cat([sd[b + "attention.query.bias"], sd[b + "attention.key_value.bias"]]),
            h + "attn.c_proj.weight": sd[b + "attention.out.weight"].t(), h + "attn.c_proj.bias": sd[b + "attention.out.bias"],
            h + "ln_2.weight": sd[b + "norm2.weight"], h + "ln_2.bias": sd[b + "norm2.bias"],
            h + "mlp.c_fc.weight": sd[b + "feed_forward.0.weight"].t(), h + "mlp.c_fc.bias": sd[b + "feed_forward.0.bias"],
            h + "mlp.c_proj.weight": sd[b + "feed_forward.2.weight"].t(), h + "mlp.c_proj.bias": sd[b + "feed_forward.2.bias"],
        }
    hf = GPT2LMHeadModel(hf_config).to(sd["embedding.weight"].dtype)
    hf.load_state_dict({k: v.contiguous() for k, v in out.items()})
    return hf.eval()


# ---- Llama ------------------------------------------------------------------------------------
# Our blocks hold K and V as one projection (key_value: K's rows, then V's) and gate and up as one
# (gate_up: gate's rows, then up's); transformers' Llama keeps them apart. Rotary positions split
# each head into halves, as Llama's rotate_half does, with base 10000.
_LLAMA_LAYER = (("norm1.weight", ("input_layernorm.weight",)), ("attention.query.weight", ("self_attn.q_proj.weight",)),
                ("attention.key_value.weight", ("self_attn.k_proj.weight", "self_attn.v_proj.weight")),
                ("attention.out.weight", ("self_attn.o_proj.weight",)), ("norm2.weight", ("post_attention_layernorm.weight",)),
                ("feed_forward.gate_up.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
                ("feed_forward.down.weight", ("mlp.down_proj.weight",)))


def llama_config_from_hf(hf_config) -> ModelConfig:
    """Our ModelConfig for a transformers LlamaConfig; refuses what our model does not compute."""
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    problems = [f"{name}={value!r}" for name, value, ok in (
        ("hidden_act", hf_config.hidden_act, hf_config.hidden_act == "silu"),
        ("attention_bias", getattr(hf_config, "attention_bias", False), not getattr(hf_config, "attention_bias", False)),
        ("mlp_bias", getattr(hf_config, "mlp_bias", False), not getattr(hf_config, "mlp_bias", False)),
        ("rope_theta", _rope_theta(hf_config), _rope_theta(hf_config) == 10000.0),
        ("rope_scaling", _rope_scaling(hf_config), _rope_scaling(hf_config) in (None, "default")),
        ("head_dim", head_dim, head_dim * heads == hf_config.hidden_size),
    ) if not ok]
    if problems:
        raise ConversionError(f"this Llama sets {', '.join(problems)}, which scratchformer's model does not implement "
                              "(it computes SiLU gating, no biases, rotary base 10000 unscaled, head_dim = hidden_size / heads)")
    return ModelConfig(
        vocab_size=hf_config.vocab_size, context=hf_config.max_position_embeddings, n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size, n_heads=heads, n_kv_heads=hf_config.num_key_value_heads or heads,
        d_ff=hf_config.intermediate_size, positions="rotary", tie_embeddings=bool(hf_config.tie_word_embeddings),
        activation="swiglu", bias=False, norm="rmsnorm", norm_eps=float(hf_config.rms_norm_eps), scale_embeddings=False,
    ).validate()


def _rope_parameters(hf_config) -> dict:
    # transformers 5 keeps rope_theta and the scaling in rope_parameters; older ones as attributes.
    return getattr(hf_config, "rope_parameters", None) or {}


def _rope_theta(hf_config) -> float:
    return float(_rope_parameters(hf_config).get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def _rope_scaling(hf_config):
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    kind = _rope_parameters(hf_config).get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    return kind


def _from_llama(state: dict, hf_config) -> GPT:
    ours = llama_config_from_hf(hf_config)
    sd = {k.removeprefix("model."): v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    try:
        out = {"embedding.weight": sd.pop("embed_tokens.weight"), "final_norm.weight": sd.pop("norm.weight")}
        head = sd.pop("lm_head.weight", None)
        if not ours.tie_embeddings:
            if head is None:
                raise ConversionError("this Llama does not tie its output layer to the embeddings, but has no lm_head.weight")
            out["head.weight"] = head
        for i in range(ours.n_layers):
            for name, theirs in _LLAMA_LAYER:
                out[f"blocks.{i}.{name}"] = torch.cat([sd.pop(f"layers.{i}.{t}") for t in theirs])
    except KeyError as e:
        raise ConversionError(f"not a complete Llama state dict: {e.args[0]} is missing") from None
    if sd:
        raise ConversionError(f"weights left over that our Llama has no place for: {', '.join(sorted(sd)[:5])}")
    model = GPT(ours)
    model.load_state_dict({k: v.contiguous() for k, v in out.items()})
    return model.to(out["embedding.weight"].dtype)


def _to_llama(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    wanted = {"positions": "rotary", "activation": "swiglu", "norm": "rmsnorm", "bias": False, "scale_embeddings": False}
    for name, value in wanted.items():
        if getattr(c, name) != value:
            raise ConversionError(f"to_hf: a Llama needs {name}={value}, this model has {getattr(c, name)}")
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, max_position_embeddings=c.context,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings, rope_theta=10000.0, hidden_act="silu",
        attention_bias=False, mlp_bias=False, bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1,
    )
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["embedding.weight"], "model.norm.weight": sd["final_norm.weight"],
           "lm_head.weight": sd["embedding.weight"] if c.tie_embeddings else sd["head.weight"]}
    sizes = {"self_attn.k_proj.weight": c.kv_heads * c.head_dim, "mlp.gate_proj.weight": c.d_ff}
    for i in range(c.n_layers):
        for name, theirs in _LLAMA_LAYER:
            tensor = sd[f"blocks.{i}.{name}"]
            parts = tensor.split(sizes[theirs[0]]) if len(theirs) == 2 else (tensor,)
            out |= {f"model.layers.{i}.{t}": p for t, p in zip(theirs, parts)}
    hf = LlamaForCausalLM(hf_config).to(sd["embedding.weight"].dtype)
    hf.load_state_dict({k: v.contiguous() for k, v in out.items()})
    return hf.eval()
