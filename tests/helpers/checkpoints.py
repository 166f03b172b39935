"""Tiny Gemma 4 checkpoints written by transformers itself, plus its reference outputs.

Each family of the docs/text-decoder.md §9.1 is built with random weights —
including norm weights, layer scalars and router scales, whose default of 1.0
would hide bugs — and saved with `save_pretrained` as the multimodal wrapper
(vision/audio off), i.e. with the real hub key names and config layout.
"""

from __future__ import annotations

import gemma4_mlx  # noqa: F401  (loads OpenBLAS before mlx.core)

# isort: split

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

W = 4  # sliding window of every tiny config: 13-20 token sequences cross it often
SIGMA = 0.05  # matrix init std; docs/text-decoder.md §9.1 allows 0.05-0.15

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_attention_heads=4,
    head_dim=16,
    global_head_dim=32,
    sliding_window=W,
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    vocab_size_per_layer_input=256,
)
S, F = "sliding_attention", "full_attention"

FAMILIES = {
    # 31B-like: dense, K = V on full layers, fewer KV heads on full layers
    "dense": dict(
        num_hidden_layers=6,
        layer_types=[S, S, F] * 2,
        intermediate_size=96,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
    ),
    # E2B-like: PLE, KV sharing, double-wide MLP on the shared layers, 1 KV head
    "e2b_like": dict(
        num_hidden_layers=8,
        layer_types=[S, S, S, F] * 2,
        intermediate_size=96,
        num_key_value_heads=1,
        attention_k_eq_v=False,
        hidden_size_per_layer_input=16,
        num_kv_shared_layers=4,
        use_double_wide_mlp=True,
    ),
    # E4B-like: PLE, KV sharing (the shared block ends on a full layer), 2 KV heads
    "e4b_like": dict(
        num_hidden_layers=6,
        layer_types=[S, S, F] * 2,
        intermediate_size=96,
        num_key_value_heads=2,
        attention_k_eq_v=False,
        hidden_size_per_layer_input=16,
        num_kv_shared_layers=3,
    ),
    # 26B-like: MoE in parallel with a dense MLP, K = V
    "moe": dict(
        num_hidden_layers=6,
        layer_types=[S, S, F] * 2,
        intermediate_size=32,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=16,
    ),
    # every feature at once
    "all": dict(
        num_hidden_layers=6,
        layer_types=[S, S, F] * 2,
        intermediate_size=32,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        hidden_size_per_layer_input=16,
        num_kv_shared_layers=3,
        use_double_wide_mlp=True,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=16,
    ),
}


def hf_text_config(name: str, **overrides):
    return transformers.Gemma4TextConfig(**COMMON, **{**FAMILIES[name], **overrides})


def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("router.scale") or name.endswith("per_expert_scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # U(0.5, 1.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * SIGMA)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.3)  # U(0.3, 1.3)


def build_hf(name: str, seed: int = 0, **overrides):
    text = hf_text_config(name, **overrides)
    cfg = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    model.config._experts_implementation = "eager"
    model.config.text_config._experts_implementation = "eager"
    randomize(model, seed)
    return model


class Reference:
    """A tiny checkpoint on disk and the transformers model that wrote it."""

    def __init__(self, name: str, path: Path, hf):
        self.name, self.path, self.hf = name, path, hf

    def logits(self, ids) -> np.ndarray:
        with torch.no_grad():
            t = torch.tensor(np.asarray(ids), dtype=torch.long)
            if t.ndim == 1:
                t = t[None]
            return self.hf(input_ids=t).logits.float().numpy()

    def greedy(self, prompt, n: int) -> list[int]:
        ids = list(prompt)
        out = []
        with torch.no_grad():
            cache = None
            inp = torch.tensor([ids])
            for _ in range(n):
                r = self.hf(input_ids=inp, cache=cache, use_cache=True)
                cache = r.past_key_values
                tok = int(r.logits[0, -1].argmax())
                out.append(tok)
                inp = torch.tensor([[tok]])
        return out


def random_ids(n: int, seed: int = 0, vocab: int = 256) -> list[int]:
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(3, vocab, size=n - 1).tolist()  # BOS first, as real prompts


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def read_json(p: Path) -> dict:
    return json.loads(p.read_text())


def write_char_tokenizer(folder: Path) -> None:
    """A 256-entry character tokenizer carrying Gemma's special-token strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    for i in range(len(vocab), 256):
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)
