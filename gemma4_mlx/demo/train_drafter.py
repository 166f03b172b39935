"""Train the embedded demo drafter: python -m gemma4_mlx.demo.train_drafter [--steps N] [--out DIR].

An MTP "assistant" (model_type `gemma4_assistant`, docs/speculative.md §1-§7) for the
embedded demo model (`gemma4_mlx/demo/gemma-4-demo/`), so that speculative decoding on the
demo pair shows real acceptance.

Method: teacher forcing, all positions at once.  For a training sequence
x_0 .. x_{N-1} the frozen target runs once (no gradient) and yields its final-norm
hiddens h_t, its logits, and the K/V of its two producer layers (last non-shared
sliding and full layer, `producer_layers`).  Draft step j (j = 1..3) for
"committed length L = t + 1" is a query at RoPE position t (the "last_committed"
convention of `speculative.draft`) that attends to the target's keys <= t (full
layer) and t-W+1 .. t (sliding layer), fed with

    step 1:  x0 = [embed_t(x_{t+1}) ; h_t]          (x_{t+1} is the bonus token)
    step j:  x0 = [embed_t(x_{t+j}) ; h'_{j-1}]     (h' = the previous step's post_projection)

and trained (cross-entropy) to predict the target's greedy token at position t + j,
i.e. what greedy verification compares the draft against (the corpus token where
the target agrees with it, which is almost everywhere).  The gradient flows
through h' into the earlier steps (backpropagation through the draft chain).
Queries never attend to each other, so only the positions a real round can query
are computed: t = P - 1 .. N - 2 for a prompt of P tokens (after the prefill the
first query sits at P - 1 with the prefill's token as bonus); the loss covers the
labels inside the model's turn, as in `train.py`.  The target's part of every
batch is computed once up front and reused each epoch.

K/V dropout (`recency_dropout`): on this tiny, very regular task the target's K/V
alone predict the next tokens, and a drafter trained only on full views learns to
ignore h (zeroing it at inference cost nothing, so a broken hidden feed would go
unnoticed).  So most training queries see only `<bos>` ("blind": the drafter must
work from [embedding ; h] alone, like a plain MTP head) or lose their newest few
keys; the rest see exactly what inference shows them.

`drafter_report.measure` gives the acceptance table of its README.
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
import numpy as np
from mlx.utils import tree_flatten

from gemma4_mlx.cache import Mask, build_mask
from gemma4_mlx.checkpoint.load import load_drafter
from gemma4_mlx.config import FULL, SLIDING, AssistantConfig
from gemma4_mlx.demo import DEMO_DRAFTER, DEMO_MODEL
from gemma4_mlx.demo.corpus import corpus
from gemma4_mlx.demo.drafter_report import DEMO_CHATS, format_measure, measure
from gemma4_mlx.demo.train import turn_examples
from gemma4_mlx.models.assistant import Drafter, producer_layers

ASSISTANT_DIR = DEMO_DRAFTER
STEP_WEIGHTS = (1.0, 0.7, 0.5)

S, F = SLIDING, FULL


def drafter_config(target_cfg) -> dict:
    """config.json of the demo drafter (layout of the released assistants)."""
    prod = producer_layers(target_cfg)
    ts, tf = target_cfg.layers[prod[S]], target_cfg.layers[prod[F]]
    assert ts.kv_heads == tf.kv_heads, "the demo target has one KV head count"
    text = dict(
        model_type="gemma4_text",
        vocab_size=target_cfg.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=ts.kv_heads,
        num_global_key_value_heads=None,
        head_dim=ts.head_dim,
        global_head_dim=tf.head_dim,
        attention_k_eq_v=False,
        sliding_window=target_cfg.sliding_window,
        max_position_embeddings=131072,
        layer_types=[S, S, S, F],
        num_kv_shared_layers=4,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        enable_moe_block=False,
        use_double_wide_mlp=False,
        final_logit_softcapping=None,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        rope_parameters={k: dict(v) for k, v in target_cfg.rope_parameters.items()},
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=target_cfg.eos_token_id,
    )
    return dict(
        model_type="gemma4_assistant",
        architectures=["Gemma4AssistantForCausalLM"],
        backbone_hidden_size=target_cfg.hidden_size,
        use_ordered_embeddings=False,
        tie_word_embeddings=True,
        text_config=text,
    )


# -- data ----------------------------------------------------------------------


def make_examples(tokenizer, n_conversations: int, seed: int = 0):
    """(ids, prompt length) per model step, as `train.py` builds them."""
    out = []
    for conv in corpus(n_conversations, seed):
        for prompt, output in turn_examples(conv):
            a = tokenizer.encode(prompt, add_special_tokens=False)
            b = tokenizer.encode(output, add_special_tokens=False)
            out.append((a + b, len(a)))
    return out


def target_features(target, ids: mx.array):
    """Final-norm hiddens [B, N, D], logits [B, N, V] and producer K/V of the frozen target."""
    tm = target.model
    cfg = tm.cfg
    N = ids.shape[1]
    x = tm.embed(ids)
    ple = tm.per_layer_inputs(ids, x) if cfg.hidden_size_per_layer_input else None
    masks = {t: build_mask(0, 0, N, cfg.sliding_window if t != FULL else None, None) for t in set(cfg.layer_types)}
    shared = {}
    for i, layer in enumerate(tm.layers):
        s = layer.spec
        x, kv = layer(
            x,
            masks[s.type],
            0,
            None,
            shared.get(s.producer) if s.shared else None,
            None if ple is None else ple[:, :, i],
        )
        if not s.shared:
            shared[i] = kv
    h = tm.norm(x)
    prod = producer_layers(cfg)
    return h, target.logits(h), {t: shared[i] for t, i in prod.items()}


def query_batch(chunk, window: int, steps: int):
    """Host-side geometry of one batch: padded ids, query positions and masks.

    Row b queries positions P_b - 1 .. N_b - 2 (Q_b of them), padded to Q.
    Step j (1-based) reads token x_{t+j}, and learns the target's prediction at
    position t + j; it counts when t + j + 1 <= N_b - 1.
    """
    B = len(chunk)
    N = max(len(ids) for ids, _ in chunk)
    Q = max(len(ids) - p for ids, p in chunk)
    ids = np.zeros((B, N), np.int32)
    start = np.zeros((B,), np.int32)
    qpos = np.zeros((B, Q), np.int32)
    qvalid = np.zeros((B, Q), bool)
    for b, (x, p) in enumerate(chunk):
        ids[b, : len(x)] = x
        start[b] = p - 1
        qpos[b] = np.minimum(p - 1 + np.arange(Q), len(x) - 2)
        qvalid[b, : len(x) - p] = True
    lengths = np.array([len(x) for x, _ in chunk])[:, None]
    t = start[:, None] + np.arange(Q)[None]  # query position (unclipped)
    tok, lab_pos, lab_ok = [], [], []
    for j in range(1, steps + 1):
        tok.append(np.take_along_axis(ids, np.minimum(t + j, N - 1), axis=1))
        lab_pos.append(np.minimum(t + j, N - 1))
        lab_ok.append(qvalid & (t + j + 1 <= lengths - 1))
    return dict(
        ids=mx.array(ids),
        start=mx.array(start),
        qpos=mx.array(qpos),
        qpos_np=qpos,
        tok=[mx.array(x) for x in tok],
        lab_pos=[mx.array(x) for x in lab_pos],
        lab_ok=[mx.array(m.astype(np.float32)) for m in lab_ok],
        masks=query_masks(qpos, N, window),
    )


def query_masks(qpos: np.ndarray, N: int, window: int, hide: np.ndarray | None = None) -> dict:
    """Masks [B, 1, Q, N] for queries at qpos [B, Q]: keys <= t (full), t-W+1 .. t (sliding).

    hide [B, Q]: the newest hide[b, q] keys of that query are masked too (training
    only, `recency_dropout`); by default every query sees what inference shows it.
    """
    k = np.arange(N)[None, None, :]
    q = qpos[:, :, None]
    newest = q if hide is None else np.maximum(q - hide[:, :, None], 0)
    full = k <= newest
    sliding = full & ((q - k < window) | (k == newest))  # never an empty row
    # q_start = N: `Mask.key_range` then never cuts keys (queries sit at per-row positions).
    return {F: Mask(mx.array(full)[:, None], N, 0, None), S: Mask(mx.array(sliding)[:, None], N, 0, None)}


def recency_dropout(qpos: np.ndarray, rate: float, most: int, blind: float, rng: np.random.Generator) -> np.ndarray:
    """How many of its newest target keys each query loses [B, Q] (training only).

    With probability `rate` the newest 1..`most` keys, with probability `blind` all
    but position 0 (`<bos>`, kept so that no softmax row is empty).  The demo task is
    so regular that the target's K/V alone predict the next tokens, and a drafter
    trained without this learns to ignore the target hidden h (zeroing h at inference
    changed nothing).  Hiding keys now and then makes h the only complete summary of
    the recent context, so the drafter learns to read it.
    """
    u = rng.random(qpos.shape)
    recent = rng.integers(1, most + 1, size=qpos.shape)
    return np.where(u < blind, qpos, np.where(u < blind + rate, recent, 0))


def gather_rows(x: mx.array, pos: mx.array) -> mx.array:
    """x [B, N, ...] at positions pos [B, Q] -> [B, Q, ...]."""
    idx = pos.reshape(*pos.shape, *([1] * (x.ndim - 2)))
    return mx.take_along_axis(x, idx, axis=1)


def prepare(target, chunk, steps: int) -> dict:
    """One batch with the frozen target's part precomputed (reused every epoch):
    hiddens at the query positions, producer K/V, and the target's greedy token
    at every label position (what verification will compare the drafts against)."""
    g = query_batch(chunk, target.config.sliding_window, steps)
    h, logits, kv = target_features(target, g["ids"])
    g["h"] = gather_rows(h, g["qpos"])
    g["kv"] = kv
    g["labels"] = [mx.argmax(gather_rows(logits, p), axis=-1) for p in g["lab_pos"]]
    g["emb"] = [target.embed(t) for t in g["tok"]]
    g["N"] = g["ids"].shape[1]
    for key in ("ids", "qpos", "lab_pos", "tok"):
        del g[key]
    mx.eval(g["h"], g["kv"], g["labels"], g["emb"])
    return g


def draft_losses(drafter: Drafter, g: dict, steps: int):
    """Per-step mean cross-entropy against the target's greedy tokens, and top-1
    agreement (draft argmax == target argmax) per step."""
    hcur = g["h"]
    losses, agree = [], []
    for j in range(steps):
        e = g["emb"][j]
        x, hcur = drafter.step(mx.concatenate([e, hcur.astype(e.dtype)], axis=-1), g["kv"], g["masks"], g["start"])
        out = drafter.dense_logits(x).astype(mx.float32)
        ce = nn.losses.cross_entropy(out, g["labels"][j], reduction="none")
        m = g["lab_ok"][j]
        n = mx.maximum(m.sum(), 1.0)
        losses.append((ce * m).sum() / n)
        agree.append(((mx.argmax(out, -1) == g["labels"][j]) * m).sum() / n)
    return losses, agree


def fixed_batches(examples, batch_size: int, rng: random.Random):
    """Length-bucketed batches (similar prompt and answer lengths share a batch)."""
    order = sorted(examples, key=lambda e: (len(e[0]) // 16, len(e[0]) - e[1]))
    out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(out)
    return out


# -- training --------------------------------------------------------------------


def new_drafter(target, seed: int) -> tuple[Drafter, dict]:
    """A freshly initialised drafter for `target` and its config."""
    config = drafter_config(target.config)
    mx.random.seed(seed)
    drafter = Drafter(AssistantConfig.from_dict(json.loads(json.dumps(config))))
    for layer in drafter.model.layers:  # keep the scale-1.0 attention soft at init (as train.py)
        layer.self_attn.q_norm.weight = mx.full(layer.self_attn.q_norm.weight.shape, 0.3)
    drafter.freeze(keys=["layer_scalar"])  # a buffer in the reference; stays 1.0
    return drafter, config


def make_optimizer(args) -> optim.Optimizer:
    warm = min(50, args.steps // 10 + 1)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(1e-5, args.lr, warm),
            optim.cosine_decay(args.lr, max(1, args.steps - warm), end=args.lr * 0.05),
        ],
        [warm],
    )
    return optim.AdamW(learning_rate=schedule, weight_decay=0.01)


def log_line(step: int, hist: list, every: int, t0: float) -> str:
    k = hist[-every:]
    ml = np.mean([x[0] for x in k])
    mp = np.mean([x[1] for x in k], axis=0)
    ma = np.mean([x[2] for x in k], axis=0)
    return (
        f"step {step:5d}  loss {ml:.4f}  per-step ce "
        f"{' '.join(f'{v:.3f}' for v in mp)}  top1 {' '.join(f'{v:.3f}' for v in ma)}"
        f"  ({time.time() - t0:.0f}s)"
    )


def train(args) -> tuple[Drafter, dict, dict]:
    t0 = time.time()
    target, tokenizer = gemma4_mlx.load(DEMO_MODEL, map_ple=False)
    target.freeze()
    steps_k = len(STEP_WEIGHTS)
    rng = random.Random(args.seed)
    examples = make_examples(tokenizer, args.conversations, seed=0)
    data = [prepare(target, c, steps_k) for c in fixed_batches(examples, args.batch, rng)]
    held = [prepare(target, c, steps_k) for c in fixed_batches(make_examples(tokenizer, 200, seed=777), 32, rng)]
    print(f"{len(examples)} examples in {len(data)} batches, target features precomputed ({time.time() - t0:.0f}s)")
    drafter, config = new_drafter(target, args.seed)
    n_params = drafter.num_parameters()
    print(f"drafter: {n_params / 1e6:.3f}M parameters", flush=True)

    def loss_fn(model, g):
        losses, agree = draft_losses(model, g, steps_k)
        total = sum(w * l for w, l in zip(STEP_WEIGHTS, losses))
        return total, (mx.stack(losses), mx.stack(agree))

    opt, step_fn = make_optimizer(args), nn.value_and_grad(drafter, loss_fn)
    hist, order = [], []
    nprng = np.random.default_rng(args.seed)
    for step in range(1, args.steps + 1):
        if not order:
            order = list(range(len(data)))
            rng.shuffle(order)
        g = data[order.pop()]
        if args.hide_rate or args.blind_rate:
            hide = recency_dropout(g["qpos_np"], args.hide_rate, args.hide_max, args.blind_rate, nprng)
            g = {**g, "masks": query_masks(g["qpos_np"], g["N"], target.config.sliding_window, hide)}
        (loss, (per, agree)), grads = step_fn(drafter, g)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(drafter, grads)
        mx.eval(drafter.parameters(), opt.state, loss, per, agree)
        hist.append((loss.item(), per.tolist(), agree.tolist()))
        if step % args.log_every == 0 or step == 1:
            print(log_line(step, hist, args.log_every, t0), flush=True)
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            print(f"stopping at step {step}: time budget of {args.max_minutes} min reached")
            break
    drafter.eval()
    info = summary(args, drafter, held, hist, step, t0, n_params, len(examples))
    return drafter, config, info


def summary(args, drafter, held, hist, step: int, t0: float, n_params: int, n_examples: int) -> dict:
    """What the drafter's README records about its training."""
    steps_k = len(STEP_WEIGHTS)
    heldout = evaluate_heldout(drafter, held, steps_k)
    last = hist[-min(len(hist), args.log_every) :]
    info = dict(
        steps=step,
        seconds=round(time.time() - t0),
        final_loss=float(np.mean([x[0] for x in last])),
        final_step_ce=np.mean([x[1] for x in last], 0).tolist(),
        heldout=heldout,
        params=n_params,
        batch=args.batch,
        lr=args.lr,
        conversations=args.conversations,
        examples=n_examples,
        seed=args.seed,
        hide_rate=args.hide_rate,
        hide_max=args.hide_max,
        blind_rate=args.blind_rate,
        heldout_zero_h=evaluate_heldout(drafter, [{**g, "h": mx.zeros_like(g["h"])} for g in held], steps_k),
    )
    print(f"held-out teacher-forced: {heldout}; with the target hidden zeroed: {info['heldout_zero_h']}")
    return info


def evaluate_heldout(drafter, data, steps_k) -> dict:
    """Teacher-forced per-step cross-entropy and top-1 agreement with the target's
    greedy token, full inference view of the K/V (batch means weighted by the
    batch's step-1 label count)."""
    tot, n = np.zeros((2, steps_k)), 0
    for g in data:
        losses, agree = draft_losses(drafter, g, steps_k)
        w = g["lab_ok"][0].sum().item()
        tot += np.array([[x.item() for x in losses], [x.item() for x in agree]]) * w
        n += w
    tot /= n
    return {"ce": [round(float(v), 4) for v in tot[0]], "top1": [round(float(v), 4) for v in tot[1]]}


def save(drafter: Drafter, config: dict, info: dict, out: Path, measured: str = "") -> None:
    """HF layout: config.json + model.safetensors (float32) + README.md, renamed into place."""
    work = Path(tempfile.mkdtemp(prefix="gemma4-demo-drafter-"))
    tensors = {k: v.astype(mx.float32) for k, v in tree_flatten(drafter.parameters())}
    mx.save_safetensors(str(work / "model.safetensors"), tensors, metadata={"format": "mlx"})
    (work / "config.json").write_text(json.dumps(config, indent=1))
    (work / "README.md").write_text(readme(info, measured))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work, tmp)
    tmp.chmod(0o755)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def readme(info: dict, measured: str) -> str:
    return f"""# Demo MTP drafter

A `gemma4_assistant` drafter (docs/speculative.md §1-§7) for the embedded demo model
`gemma4_mlx/demo/gemma-4-demo/`, so that speculative decoding on the demo pair shows real
acceptance:

    target, tok = gemma4_mlx.load(gemma4_mlx.demo.DEMO_MODEL)
    drafter = gemma4_mlx.load_drafter(gemma4_mlx.demo.DEMO_DRAFTER, target=target)

Architecture: 4 query-only layers [S, S, S, F], hidden 64, 4 heads, MLP 128; K/V come
from the target's last non-shared sliding (3) and full (2) layers (1 KV head, head
dims 32 / 64), window 64; dense head tied to its own 768 x 64 table (no centroid
head); pre_projection 256 -> 64, post_projection 64 -> 128.  {info["params"] / 1e6:.3f}M parameters,
float32.

Made by `python -m gemma4_mlx.demo.train_drafter` (seed {info["seed"]}): teacher
forcing on the demo corpus ({info["conversations"]} conversations, seed 0, the
target's own training data), the frozen target run once per batch for its
final-norm hiddens, logits and producer K/V.  Draft steps 1-3 (loss weights
{", ".join(str(w) for w in STEP_WEIGHTS)}) at the "last_committed" RoPE position
(p = L - 1), cross-entropy against the target's greedy token on model-turn
positions, gradient carried through the post_projection chain.  K/V dropout: a
training query sees only `<bos>` of the target's K/V with probability
{info["blind_rate"]}, loses its newest 1-{info["hide_max"]} keys with probability
{info["hide_rate"]}, and sees the inference view otherwise; without it the drafter learned to ignore
the target hidden h entirely (the demo's K/V alone predict the next tokens).
AdamW, lr {info["lr"]}, batch {info["batch"]}, {info["steps"]} steps, {info["seconds"]} s
(target features included) on 2 shared CPU cores.

Final training loss (weighted sum of the 3 steps, on the K/V-dropout training views,
mostly blind): {info["final_loss"]:.4f}; per-step
cross-entropy {", ".join(f"{v:.3f}" for v in info["final_step_ce"])}.
Held-out teacher-forced (corpus seed 777): cross-entropy {info["heldout"]["ce"]},
top-1 agreement with the target {info["heldout"]["top1"]}; the same with h zeroed:
{info["heldout_zero_h"]["ce"]}, {info["heldout_zero_h"]["top1"]}.

{measured}
"""


# -- measuring -------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--conversations", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--hide-rate", type=float, default=0.2)
    ap.add_argument("--hide-max", type=int, default=8)
    ap.add_argument("--blind-rate", type=float, default=0.7)
    ap.add_argument("--max-minutes", type=float, default=11.0)
    ap.add_argument("--out", type=Path, default=ASSISTANT_DIR)
    args = ap.parse_args()

    drafter, config, info = train(args)
    save(drafter, config, info, args.out)
    target, tokenizer = gemma4_mlx.load(DEMO_MODEL)
    loaded = load_drafter(args.out, target=target)
    res = measure(target, loaded, tokenizer)
    table = format_measure(res)
    print(table)
    measured = (
        f"Greedy speculative decoding on the {len(DEMO_CHATS)} demo chat prompts of\n"
        "`drafter_report.DEMO_CHATS` (one ragged batch, max_tokens 64, stop at\n"
        "`<turn|>`; acceptance = conditional acceptance per draft position,\n"
        "`SpecStats.acceptance()`), measured right after training:\n\n" + table + "\n"
    )
    save(drafter, config, info, args.out, measured)
    print(f"saved to {args.out} ({info['seconds']} s of training)")


if __name__ == "__main__":
    main()
