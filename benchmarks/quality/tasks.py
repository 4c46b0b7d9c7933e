"""The four MiniLM tasks and the fine-tuning stage shared by the merging and patching experiments.

Sizes are chosen so the whole suite runs in well under an hour on two CPU cores: sequences are
cut to 32 tokens (a sentence, a tweet, or a news headline and lead), each fine-tune sees 384
training examples once (24 AdamW steps of 16, lr 1.5e-4), the word-embedding matrix stays frozen
(11.7M of the 22.7M parameters, and the costliest to update), validation sets have 64 examples
per task and the fixed held-out test sets 200. These sizes are forced by the machine (two CPU
cores shared with other jobs); they make each number noisy (one test example = 0.5 points).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from . import cache as qcache
from . import data
from .encoder import TextBatcher, features, load_encoder, save_encoder, save_head, train_classifier

MAX_LEN = 32
N_TEST = 200
N_VAL = 64
N_TRAIN = 384
LR = 1.5e-4
SEEDS = (0, 1)
TASK_NAMES = ("movie_sentiment", "tweet_author", "reuters_r8", "bbc_topic")
FT_DIR = qcache.CACHE / "finetune"


@cache
def load_task(name: str) -> data.Task:
    if name == "movie_sentiment":
        pools, labels = data.movie_sentiment(qcache.archive("vader")), ("negative", "positive")
    elif name == "tweet_author":
        pools, labels = data.tweet_author(qcache.archive("orange")), ("clinton", "trump")
    elif name == "reuters_r8":
        pools, labels = data.reuters_r8(qcache.archive("orange")), data.R8_LABELS
    elif name == "bbc_topic":
        pools, labels = data.bbc_topic(qcache.archive("bbc")), data.BBC_LABELS
    else:
        raise KeyError(name)
    return data.make_splits(name, labels, pools, n_test=N_TEST, n_val=N_VAL)


@cache
def batcher() -> TextBatcher:
    return TextBatcher(qcache.minilm_dir(), MAX_LEN)


@dataclass(frozen=True)
class FineTuned:
    task: str
    seed: int
    encoder_dir: Path
    head_path: Path
    metrics: dict


def finetune(task_name: str, seed: int, log=print) -> FineTuned:
    """Fine-tune encoder + head for one task and seed, cached as a safetensors folder."""
    out = FT_DIR / f"{task_name}_s{seed}"
    metrics_path = out / "metrics.json"
    if not metrics_path.exists():
        task = load_task(task_name)
        base_dir = qcache.minilm_dir()
        torch.manual_seed(seed)
        model = load_encoder(base_dir).train()
        model.embeddings.word_embeddings.weight.requires_grad_(False)
        head = torch.nn.Linear(model.config.hidden_size, len(task.labels))
        t0 = time.time()
        train = data.sample_train(task, N_TRAIN, seed)
        losses = train_classifier(model, head, batcher(), train, seed=seed, lr=LR, log=log)
        seconds = time.time() - t0
        val = features(model, batcher(), [t for t, _ in task.val])
        test = features(model, batcher(), [t for t, _ in task.test])
        from .encoder import accuracy

        metrics = {
            "train_seconds": round(seconds, 1),
            "n_train": len(train),
            "first_loss": losses[0],
            "last_loss": sum(losses[-8:]) / len(losses[-8:]),
            "val_acc": accuracy(head, val, [y for _, y in task.val]),
            "test_acc": accuracy(head, test, [y for _, y in task.test]),
        }
        save_encoder(model, base_dir, out / "encoder")
        save_head(head, out / "head.safetensors", task.labels)
        metrics_path.write_text(json.dumps(metrics, indent=1))
        log(f"fine-tuned {task_name} seed {seed}: {metrics}")
    return FineTuned(task_name, seed, out / "encoder", out / "head.safetensors", json.loads(metrics_path.read_text()))


def finetune_all(log=print) -> list[FineTuned]:
    return [finetune(t, s, log) for s in SEEDS for t in TASK_NAMES]


if __name__ == "__main__":
    torch.set_num_threads(2)
    finetune_all(lambda m: print(m, flush=True))
