"""Behaviour edit (Model Surgery) on SmolLM2-135M: suppress negative sentiment, keep the rest.

1. Features: mean-pooled final hidden states of the model over clearly negative (label 1, the
   behaviour to suppress) and clearly positive (label 0) movie-review snippets, with
   `mergekit_lite.workflows.surgery.collect_features` (= `mlite probe collect`).
2. Probe: `train_probe` (= `mlite probe train`).
3. Edit: `surgery(model, probe, alpha=..., fraction=...)` (= `mlite surgery`), in memory.
4. Measure, with the same sampling seed for every model: the share of negative continuations of
   neutral prompts (scored by the VADER-lexicon scorer in `lexicon.py`), and the next-token loss
   on held-out NYT editorial snippets (capability check).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import cache as qcache
from . import data, lexicon
from .smollm import smollm_dir

N_PROBE = 64  # sentences per class
CONFIGS: list[tuple[float, float]] = [  # (alpha, fraction of gate rows); 0.0465 = the reference's share
    (0.25, 0.0465), (0.5, 0.0465), (1.0, 0.0465), (2.0, 0.0465), (4.0, 0.0465), (1.0, 0.01), (4.0, 0.01),
]
SAMPLES_PER_PROMPT = 2
NEW_TOKENS = 20
N_HELDOUT = 48
OUT = qcache.CACHE / "surgery"

# Neutral sentence openings written for this benchmark: no sentiment words of their own.
PROMPTS = (
    "The movie I watched last night was",
    "My neighbour told me that the new restaurant",
    "When I opened the letter, I",
    "The weather this weekend will be",
    "Our team meeting this morning",
    "The book on the kitchen table",
    "After the concert, the audience",
    "The train to the city was",
    "My first day at the new job",
    "The phone call from my sister",
    "The hotel room we booked",
    "At the end of the year, the company",
    "The old house on the corner",
    "When the package arrived, it",
    "The teacher looked at the class and",
    "The food at the party",
    "Yesterday the city council decided",
    "The results of the test",
    "My car started making a sound and",
    "The second season of the show",
    "The flight to Chicago",
    "The new version of the app",
    "Walking home from school, I",
    "The review of the album said it",
)


def probe_texts() -> tuple[list[str], list[str]]:
    """Clearly negative (mean rating <= -1.5) and clearly positive (>= 1.5) movie snippets."""
    rows = data.vader_snippets(qcache.archive("vader"), "movieReviewSnippets")
    rng = random.Random(7)
    rng.shuffle(rows)
    neg = [t for t, s in rows if s <= -1.5 and len(t) < 200][:N_PROBE]
    pos = [t for t, s in rows if s >= 1.5 and len(t) < 200][:N_PROBE]
    return neg, pos


def heldout_texts() -> list[str]:
    rows = data.vader_snippets(qcache.archive("vader"), "nytEditorialSnippets")
    rng = random.Random(11)
    rng.shuffle(rows)
    return [t for t, _ in rows[:N_HELDOUT]]


@torch.no_grad()
def measure(lm: Any, tok: Any, lex: Mapping[str, float], seed: int = 0) -> dict[str, Any]:
    """Negative share of sampled continuations and held-out next-token loss for one model."""
    tok.padding_side = "left"
    torch.manual_seed(seed)
    prompts = [p for p in PROMPTS for _ in range(SAMPLES_PER_PROMPT)]
    conts: list[str] = []
    for s in range(0, len(prompts), 16):
        batch = tok(prompts[s : s + 16], return_tensors="pt", padding=True)
        out = lm.generate(**batch, do_sample=True, top_p=0.9, temperature=1.0, max_new_tokens=NEW_TOKENS,
                          pad_token_id=tok.pad_token_id)
        conts += tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    scores = [lexicon.compound(c, lex) for c in conts]
    nll, count = 0.0, 0
    tok.padding_side = "right"
    for text in heldout_texts():
        enc = tok(text, return_tensors="pt", truncation=True, max_length=64)
        logits = lm(**enc).logits[0, :-1].float()
        target = enc["input_ids"][0, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        count += int(target.numel())
    return {
        "negative_share": sum(s <= lexicon.NEGATIVE_AT for s in scores) / len(scores),
        "positive_share": sum(s >= -lexicon.NEGATIVE_AT for s in scores) / len(scores),
        "mean_compound": sum(scores) / len(scores),
        "heldout_loss": nll / count,
        "heldout_ppl": math.exp(nll / count),
        "examples": [p + " |" + c for p, c in list(zip(prompts, conts, strict=True))[:6]],
    }


def run(log: Callable[[str], None] = print) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mergekit_lite.workflows.surgery import collect_features, surgery, train_probe

        model_dir = smollm_dir()
        OUT.mkdir(parents=True, exist_ok=True)
        feats, probe = OUT / "features.safetensors", OUT / "probe.safetensors"
        neg, pos = probe_texts()
        if not feats.exists():
            collect_features(model_dir, neg, pos, feats, batch_size=16, max_length=64)
        # Deterministic (L-BFGS, fixed seed): retraining on a resume gives the same probe.
        fit = train_probe(feats, probe, seed=0, force=True).fit
        log(f"probe: train acc {fit.train_accuracy:.3f}, held-out {fit.heldout_accuracy}")
        lex = lexicon.parse_lexicon(data.vader_lexicon_text(qcache.archive("vader")))
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        original = {k: v.clone() for k, v in lm.state_dict().items() if "gate_proj" in k}
        done = qcache.CACHE / "surgery" / "rows.json"  # per-row cache: a killed run resumes here
        cached: dict[str, Any] = json.loads(done.read_text()) if done.exists() else {}

        def keep(key: str, row: dict[str, Any]) -> dict[str, Any]:
            cached[key] = row
            done.write_text(json.dumps(cached, indent=1))
            return row

        rows = [cached.get("baseline") or keep("baseline", {"alpha": 0.0, "fraction": 0.0, "k": 0,
                                                            **measure(lm, tok, lex)})]
        log(f"surgery baseline: {rows[-1]}")
        for alpha, fraction in CONFIGS:
            key = f"{alpha}|{fraction}"
            if key in cached:
                rows.append(cached[key])
                continue
            t0 = time.time()
            res = surgery(model_dir, probe, alpha=alpha, fraction=fraction)
            edit_s = time.time() - t0
            assert res.state_dict is not None
            lm.load_state_dict({k: v.float() for k, v in res.state_dict.items() if "gate_proj" in k}, strict=False)
            rows.append(keep(key, {"alpha": alpha, "fraction": fraction, "k": res.k, "edit_seconds": round(edit_s, 1),
                                   **measure(lm, tok, lex)}))
            log(f"surgery alpha {alpha} fraction {fraction}: {rows[-1]}")
            lm.load_state_dict(original, strict=False)
        return {"probe": {"train_acc": fit.train_accuracy, "heldout_acc": fit.heldout_accuracy,
                          "n_per_class": N_PROBE},
                "prompts": len(PROMPTS), "samples_per_prompt": SAMPLES_PER_PROMPT, "new_tokens": NEW_TOKENS,
                "rows": rows}

    return qcache.cached_json(qcache.CACHE / "results" / "surgery.json", compute)
