"""Train the embedded demo model: python -m gemma4_mlx.demo.train [--steps N] [--out DIR].

1. Generate conversations (`corpus.py`) and render them in the real Gemma 4 chat
   format (`gemma4_mlx.prompt.template.render`).
2. Train a byte-level BPE tokenizer whose first ids are every Gemma 4 control
   string (re-numbered: the real ids run to 258884, far too large for a
   few-MB demo; code looks special tokens up by string, never by number).
3. Train a tiny Gemma 4 text model (sliding + full layers, per-layer
   embeddings, KV sharing) on the model-side tokens of each turn.
4. Save an HF-layout checkpoint (config.json, model.safetensors, tokenizer)
   into `gemma4_mlx/demo/gemma-4-demo/`, loadable by `gemma4_mlx.load`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import gemma4_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from gemma4_mlx.config import TextConfig
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.demo.corpus import corpus
from gemma4_mlx.models.text import Model
from gemma4_mlx.prompt.template import CHAT_TEMPLATE, render

MODEL_DIR = DEMO_MODEL

SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|turn>",
    "<turn|>",
    "<|image>",
    "<image|>",
    "<|audio>",
    "<audio|>",
    "<|image|>",
    "<|audio|>",
    "<|video|>",
]

CONFIG = dict(
    model_type="gemma4_text",
    vocab_size=768,
    vocab_size_per_layer_input=768,
    hidden_size=128,
    num_hidden_layers=6,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    global_head_dim=64,
    sliding_window=64,
    intermediate_size=256,
    use_double_wide_mlp=True,
    hidden_size_per_layer_input=16,
    num_kv_shared_layers=2,
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    pad_token_id=0,
    eos_token_id=[1, 16],
    bos_token_id=2,
)


def turn_examples(conv: dict) -> list[tuple[str, str]]:
    """(prompt, raw model output) pairs, one per model step of the conversation.

    The raw output is what the template renders for that step beyond the
    generation prompt, ending where generation stops: at `<turn|>`, or at
    `<|tool_response>` after a tool call (the client appends the result).
    """
    msgs, tools, thinking = conv["messages"], conv["tools"], conv["thinking"]
    out = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = render(msgs[:i], tools=tools, thinking=thinking, add_generation_prompt=True)
        full = render(msgs[: i + 1], tools=tools, thinking=thinking, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError(f"template history does not extend the prompt:\n{prompt!r}\n{full!r}")
        output = full[len(prompt) :]
        if m.get("tool_calls"):
            output = output[: output.index("<tool_call|>", output.rindex("<|tool_call>"))]
            output += "<tool_call|><|tool_response>"
        else:
            output = output[: output.rindex("<turn|>")] + "<turn|>"
        out.append((prompt, output))
    return out


def train_tokenizer(texts: list[str], folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=False,
    )
    fast.save_pretrained(folder)
    return fast


def batches(examples, batch_size, rng):
    """Yield (ids, targets, loss_mask) padded batches."""
    while True:
        rng.shuffle(examples)
        for i in range(0, len(examples) - batch_size + 1, batch_size):
            chunk = examples[i : i + batch_size]
            T = max(len(ids) for ids, _ in chunk) - 1
            ids = [x[:-1] + [0] * (T - len(x) + 1) for x, _ in chunk]
            tgt = [x[1:] + [0] * (T - len(x) + 1) for x, _ in chunk]
            msk = [m[1:] + [0] * (T - len(m) + 1) for _, m in chunk]
            yield mx.array(ids), mx.array(tgt), mx.array(msk, dtype=mx.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--conversations", type=int, default=6000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    args = ap.parse_args()

    t0 = time.time()
    pairs = [p for conv in corpus(args.conversations) for p in turn_examples(conv)]
    work = Path(tempfile.mkdtemp(prefix="gemma4-demo-"))
    tokenizer = train_tokenizer([p + o for p, o in pairs], work)
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    examples = []
    for prompt, output in pairs:
        a = tokenizer.encode(prompt, add_special_tokens=False)
        b = tokenizer.encode(output, add_special_tokens=False)
        examples.append((a + b, [0] * len(a) + [1] * len(b)))
    print(
        f"{len(examples)} examples, longest {max(len(e) for e, _ in examples)} tokens, "
        f"tokenizer {tokenizer.vocab_size} entries ({time.time() - t0:.0f}s)"
    )

    cfg = TextConfig.from_dict(dict(CONFIG))
    mx.random.seed(0)
    model = Model(cfg)
    # Small q/k norm weights keep the scale-1.0 attention from saturating at init.
    for layer in model.layers:
        layer.self_attn.q_norm.weight = mx.full(layer.self_attn.q_norm.weight.shape, 0.3)
        if hasattr(layer.self_attn, "k_norm"):
            layer.self_attn.k_norm.weight = mx.full(layer.self_attn.k_norm.weight.shape, 0.3)
    n_params = model.num_parameters()
    print(f"model: {n_params / 1e6:.2f}M parameters")

    def loss_fn(model, ids, tgt, msk):
        logits = model(ids)
        ce = nn.losses.cross_entropy(logits, tgt, reduction="none")
        return (ce * msk).sum() / msk.sum()

    schedule = optim.cosine_decay(args.lr, args.steps, end=args.lr * 0.05)
    opt = optim.AdamW(
        learning_rate=optim.join_schedules([optim.linear_schedule(1e-5, args.lr, 50), schedule], [50]),
        weight_decay=0.01,
    )
    step_fn = nn.value_and_grad(model, loss_fn)
    rng = random.Random(0)
    it = batches(examples, args.batch, rng)
    for step in range(1, args.steps + 1):
        ids, tgt, msk = next(it)
        loss, grads = step_fn(model, ids, tgt, msk)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        if step % 100 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)", flush=True)

    save(model, cfg, work, args.out)
    print(f"saved to {args.out} ({time.time() - t0:.0f}s)")


def save(model: Model, cfg: TextConfig, work: Path, out: Path) -> None:
    """HF text-only layout; written to a temporary folder, then renamed into place."""
    tensors = {}
    for key, value in tree_flatten(model.parameters()):
        tensors[key] = value.astype(mx.float32)
    mx.save_safetensors(str(work / "model.safetensors"), tensors, metadata={"format": "mlx"})
    config = cfg.to_dict()
    config["architectures"] = ["Gemma4ForCausalLM"]
    (work / "config.json").write_text(json.dumps(config, indent=1))
    (work / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # ours: the format it was trained on
    (work / "README.md").write_text(
        "Embedded demo model of gemma4-mlx: a ~1M-parameter Gemma 4 text model trained by "
        "`python -m gemma4_mlx.demo.train` on generated conversations. It only knows capitals, "
        "small sums, greetings and a get_weather tool.\n"
    )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work, tmp)
    tmp.chmod(0o755)  # the temporary folder it was copied from is private
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


if __name__ == "__main__":
    main()
