"""MiniLM sentence classifier: the shared encoder that gets merged, plus one linear head per task.

Features are the mean of the final hidden states over real tokens (how all-MiniLM-L6-v2 was
trained), then a task-specific `Linear(384, n_labels)`. Only the encoder is merged; each task
keeps its own head, as in the task-arithmetic papers.

Fine-tuned encoders are saved with exactly the base checkpoint's tensor names (no `bert.`
prefix, the int64 `embeddings.position_ids` buffer and the unused pooler copied from the base),
so mlite sees them as ordinary same-architecture checkpoints.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn
from transformers import BertConfig, BertModel

from .data import Example

SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


class TextBatcher:
    """Tokenises once with the checkpoint's own fast tokenizer and pads per batch."""

    def __init__(self, model_dir: Path, max_len: int) -> None:
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.enable_truncation(max_length=max_len)
        self.tok.no_padding()

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    @staticmethod
    def pad(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask


def new_encoder(model_dir: Path) -> BertModel:
    config = BertConfig.from_pretrained(str(model_dir))
    return BertModel(config, add_pooling_layer=False)


def load_encoder(model_dir: Path, weights: Path | Mapping[str, torch.Tensor] | None = None) -> BertModel:
    """A BertModel with weights from a checkpoint folder or an in-memory state dict.

    Tensors the model does not own (position_ids buffer, pooler) are ignored; a missing
    model tensor is an error, so a broken merge output cannot be evaluated silently.
    """
    model = new_encoder(model_dir)
    if weights is None:
        weights = model_dir
    state = dict(weights) if isinstance(weights, Mapping) else load_file(str(Path(weights) / "model.safetensors"))
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise KeyError(f"checkpoint lacks encoder tensors: {missing[:3]}")
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)
    return model.eval()


def save_encoder(model: BertModel, base_dir: Path, out_dir: Path) -> None:
    """Write the encoder with the base checkpoint's exact tensor set, plus config and tokenizer."""
    base = load_file(str(base_dir / "model.safetensors"))
    own = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state = {k: (own[k].to(v.dtype) if k in own else v) for k, v in base.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in SIDE_FILES:
        if (base_dir / name).exists():
            shutil.copyfile(base_dir / name, out_dir / name)


def mean_pool(model: BertModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def features(model: BertModel, batcher: TextBatcher, texts: Sequence[str], batch: int = 64) -> torch.Tensor:
    """Pooled features, computed in length-sorted batches to waste little time on padding."""
    model.eval()
    rows = batcher.ids(texts)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.empty(len(rows), model.config.hidden_size)
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        ids, mask = batcher.pad([rows[i] for i in idx])
        out[idx] = mean_pool(model, ids, mask)
    return out


def accuracy(head: nn.Linear, feats: torch.Tensor, labels: Sequence[int]) -> float:
    with torch.no_grad():
        pred = head(feats).argmax(-1)
    return float((pred == torch.tensor(list(labels))).float().mean())


def save_head(head: nn.Linear, path: Path, labels: Sequence[str]) -> None:
    save_file(
        {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
        str(path),
        metadata={"labels": json.dumps(list(labels))},
    )


def load_head(path: Path) -> nn.Linear:
    t = load_file(str(path))
    head = nn.Linear(t["weight"].shape[1], t["weight"].shape[0])
    head.load_state_dict(t)
    return head.eval()


def train_classifier(
    model: nn.Module,
    head: nn.Linear,
    batcher: TextBatcher,
    train: Sequence[Example],
    *,
    seed: int,
    epochs: int = 1,
    batch: int = 16,
    lr: float = 1e-4,
    head_lr: float = 2e-3,
    trainable: Sequence[nn.Parameter] | None = None,
    encode=None,
    log=None,
) -> list[float]:
    """AdamW with linear warm-up/decay; returns the per-step losses.

    `encode(ids, mask)` gives pooled features (default: mean-pooled `model`); `trainable`
    restricts which body parameters move (LoRA trains only its factors).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    rows = batcher.ids([t for t, _ in train])
    labels = [y for _, y in train]
    body = [p for p in (trainable if trainable is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head.parameters(), "lr": head_lr}], weight_decay=0.01)
    steps = epochs * math.ceil(len(rows) / batch)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    encode = encode or (lambda ids, mask: mean_pool(model, ids, mask))
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            ids, mask = batcher.pad([rows[i] for i in idx])
            logits = head(encode(ids, mask))
            loss = nn.functional.cross_entropy(logits, torch.tensor([labels[i] for i in idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(body + list(head.parameters()), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if log is not None and len(losses) % 8 == 0:
                log(f"  step {len(losses)}/{steps} loss {sum(losses[-8:]) / 8:.3f}")
    model.eval()
    return losses
