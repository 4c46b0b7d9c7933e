"""Differential check against mergekit: the same mergekit recipes, run by both tools, every tensor compared.

mlite promises that a mergekit recipe for a method it has gives mergekit's tensors (docs/recipes.md,
"The mergekit shape"). The unit tests check each formula against a re-statement of mergekit's; this
script checks the whole path against mergekit itself: recipe reading, parameter lookup (per-model
values, layer gradients, filters), base handling, and the maths. It builds tiny float32
Llama-layout checkpoints (a base and three fine-tunes), runs each case through `mlite merge` and
`mergekit-yaml` (float32 both, so that mergekit's arithmetic dtype is mlite's), and compares every
tensor.

    python benchmarks/vs_mergekit.py --mergekit-venv /work/mk-venv            # every case
    python benchmarks/vs_mergekit.py --mergekit-venv /work/mk-venv -k ties     # cases matching "ties"

Each case says what agreement to expect: `bits` (identical), `rounding` (within float32
rounding: the largest difference at most 1e-5 of the tensor's largest magnitude, a few hundred
ulps at most; for bfloat16 outputs one bfloat16 step, 2⁻⁸), or `documented` (a difference the method's docs page explains; the numbers are
reported, not judged). Random methods (DARE, DELLA) draw different masks by design, so they
appear only at density 1, where nothing is dropped. The table goes to stdout and, with `--out`,
to a markdown file. The exit status is 1 when a case misses its expectation or a tool fails.
Nothing here is a unit test: mergekit is not a dependency of mlite, and CI does not run this.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from mergekit_lite.synthetic import LlamaShape, build_model_set, save_checkpoint  # noqa: E402

Expect = Literal["bits", "rounding", "documented"]
ROUNDING_REL = 1e-5
# bf16 outputs: a float32 result a few ulps off can round to the neighbouring bf16 value, one bf16
# step (2⁻⁸ of the value) away
BF16_ROUNDING_REL = 2.0**-8
SHAPE = LlamaShape(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2)
ENV_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Case:
    """One mergekit recipe. Model references are the names base, ft1, ft2, ft3; the script puts
    the paths in. `expect` is the agreement the docs promise; `why` says where they explain it."""

    key: str
    method: str
    models: tuple[Any, ...]  # "ft1" or {"model": "ft1", "parameters": {...}}
    base: str | None = "base"
    parameters: dict[str, Any] = field(default_factory=dict)
    expect: Expect = "rounding"
    why: str = ""
    top: dict[str, Any] = field(default_factory=dict)  # other top-level keys (out_dtype, ...)
    bf16: bool = False  # read the bfloat16 copies of the models (written bf16: out_dtype bfloat16)
    # mergekit's `slices:` instead of `models:` (then `models` is empty): each slice's sources
    # name models as above, with their layer_range (the models have 3 layers)
    slices: tuple[dict[str, Any], ...] = ()
    # tokenizer_source / tokenizer: the models are the vocabulary set (vbase, v1, v2, v3), whose
    # tokenizers differ; vocabulary tensors are compared row by token, as mergekit numbers the
    # tokens it adds in an order that changes from run to run (it walks a set and a hash map)
    vocab: bool = False

    def recipe(self, paths: dict[str, Path]) -> dict[str, Any]:
        if self.bf16:
            paths = {k[: -len("-bf16")]: v for k, v in paths.items() if k.endswith("-bf16")}

        def model(m: Any) -> dict[str, Any]:
            if isinstance(m, str):
                return {"model": str(paths[m])}
            return {**m, "model": str(paths[m["model"]])}

        data: dict[str, Any] = {"merge_method": self.method, "dtype": "float32"}
        if self.slices:
            data["slices"] = [{**piece, "sources": [model(m) for m in piece["sources"]],
                               **({"base_model": str(paths[piece["base_model"]])} if "base_model" in piece else {})}
                              for piece in self.slices]
        else:
            data["models"] = [model(m) for m in self.models]
        if self.base is not None:
            data["base_model"] = str(paths[self.base])
        if self.parameters:
            data["parameters"] = self.parameters
        if self.bf16:
            data["out_dtype"] = "bfloat16"
        return {**data, **_named(self.top, paths)}


def _named(value: Any, paths: dict[str, Path]) -> Any:
    """`value` with every string that names a model replaced by its path (token sources); `base`
    and `union` are mergekit's words there."""
    if isinstance(value, str):
        return str(paths[value]) if value in paths and value not in ("base", "union") else value
    if isinstance(value, dict):
        return {k: _named(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_named(v, paths) for v in value]
    return value


def weighted(*weights: Any, **extra: Any) -> tuple[dict[str, Any], ...]:
    """ft1, ft2, ... with one weight each (and any other per-model parameters, one value each)."""
    out = []
    for i, w in enumerate(weights):
        params = {"weight": w, **{k: v[i] for k, v in extra.items()}}
        out.append({"model": f"ft{i + 1}", "parameters": params})
    return tuple(out)


def src(model: str, first: int, end: int, **params: Any) -> dict[str, Any]:
    """A slice source: layers [first, end) of a model, with its own parameters."""
    out: dict[str, Any] = {"model": model, "layer_range": [first, end]}
    return {**out, "parameters": params} if params else out


FTS = ("ft1", "ft2", "ft3")
VFTS = ("v1", "v2", "v3")
TIED_CUT = ("bf16 deltas tie at the top-k cut: mlite keeps every tied entry, mergekit exactly k "
            "(docs/methods/ties.md)")
ATTN_RULES = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.6}]

CASES: tuple[Case, ...] = (
    Case("linear", "linear", weighted(1.0, 2.0, 0.5), base=None),
    Case("linear normalize:false", "linear", weighted(0.2, 0.3, 0.1), base=None, parameters={"normalize": False}),
    Case("linear gradient", "linear", weighted([0.0, 1.0], 1.0, [1.0, 0.0]), base=None),
    Case("task_arithmetic", "task_arithmetic", weighted(0.3, 0.5, -0.2)),
    Case("task_arithmetic lambda", "task_arithmetic", weighted(0.3, 0.5, 0.2), parameters={"lambda": 0.7}),
    Case("task_arithmetic filters", "task_arithmetic", FTS, parameters={"weight": ATTN_RULES}),
    Case("task_arithmetic base listed", "task_arithmetic", ("base", *weighted(0.3, 0.5))),
    Case("task_arithmetic lambda gradient", "task_arithmetic", weighted(0.3, 0.5, 0.2),
         parameters={"lambda": [0.5, 1.5]}),
    Case("task_arithmetic out_dtype bf16", "task_arithmetic", weighted(0.3, 0.5, 0.2),
         top={"out_dtype": "bfloat16"}),
    Case("ties", "ties", weighted(0.5, 0.3, 0.2, density=[0.5, 0.7, 0.3])),
    Case("ties density gradient", "ties", weighted(0.5, -0.3, 0.2, density=[[0.2, 0.9], 0.5, [0.9, 0.2]])),
    Case("ties normalize:false lambda", "ties", weighted(1.0, 0.6, 0.4, density=[0.4, 0.4, 0.4]),
         parameters={"normalize": False, "lambda": 0.8}),
    Case("dare_linear density 1", "dare_linear", weighted(0.4, 0.3, 0.3)),
    Case("dare_ties density 1", "dare_ties", weighted(0.4, 0.3, 0.3)),
    Case("breadcrumbs", "breadcrumbs", weighted(0.5, 0.3, 0.2), parameters={"density": 0.8, "gamma": 0.05}),
    Case("breadcrumbs_ties", "breadcrumbs_ties", weighted(0.5, 0.3, 0.2),
         parameters={"density": 0.8, "gamma": 0.05}),
    Case("della density 1", "della", weighted(0.4, 0.3, 0.3), parameters={"density": 1.0, "epsilon": 0.0}),
    Case("della_linear density 1", "della_linear", weighted(0.4, 0.3, 0.3),
         parameters={"density": 1.0, "epsilon": 0.0}),
    Case("breadcrumbs gamma 0", "breadcrumbs", weighted(0.5, 0.3, 0.2), parameters={"density": 0.5, "gamma": 0.0}),
    Case("model_stock", "model_stock", FTS),
    Case("model_stock base listed", "model_stock", ("base", *FTS)),
    Case("linear base_model", "linear", ("ft1", "ft2"), parameters={"weight": 1.0}),
    Case("slerp both listed", "slerp", ("base", "ft2"), parameters={"t": 0.6}),
    Case("model_stock filter_wise", "model_stock", FTS, parameters={"filter_wise": True}),
    Case("slerp", "slerp", ("ft1",), parameters={"t": 0.3}),
    Case("slerp gradient", "slerp", ("ft1",), parameters={"t": [{"filter": "self_attn", "value": [0, 0.5, 1]},
                                                                  {"value": 0.7}]}),
    Case("sce", "sce", FTS),
    Case("sce select_topk", "sce", FTS, parameters={"select_topk": 0.5}),
    Case("nearswap", "nearswap", ("ft1",), parameters={"t": 0.0005}, expect="bits"),
    Case("nuslerp", "nuslerp", weighted(0.3, 0.7), base=None),
    Case("nuslerp base", "nuslerp", weighted(0.6, 0.4)),
    Case("nuslerp rows", "nuslerp", weighted(0.5, 0.5), base=None, parameters={"nuslerp_flatten": False}),
    Case("nuslerp columns", "nuslerp", weighted(0.5, 0.5), base=None,
         parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    Case("multislerp", "multislerp", weighted(0.5, 0.3, 0.2), base=None),
    Case("multislerp base", "multislerp", weighted(1.0, 2.0, 1.0)),
    Case("multislerp unnormalised", "multislerp", weighted(0.5, 0.25, 0.25), parameters={"normalize_weights": False}),
    Case("karcher", "karcher", FTS, base=None),
    Case("karcher max_iter", "karcher", FTS, base=None, parameters={"max_iter": 3, "tol": 1e-6}),
    Case("arcee_fusion", "arcee_fusion", ("ft1",), expect="bits"),
    Case("karcher base_model", "karcher", ("ft1", "ft2")),
    Case("passthrough scale rules", "passthrough", ({"model": "ft1", "parameters": {"scale": ATTN_RULES}},),
         base=None, expect="bits"),
    Case("passthrough scale gradient", "passthrough", ("ft2",), base=None, parameters={"scale": [0.0, 2.0]},
         expect="bits"),
    # bfloat16 models, computed in float32 by both (dtype: float32) and written in bfloat16: one
    # rounding of the float32 result, so the last-bit differences above mostly vanish
    *(Case(f"{c.key} (bf16 in and out)", c.method, c.models, c.base, c.parameters, expect=c.expect, why=c.why,
           bf16=True)
      for c in (
          Case("linear", "linear", weighted(1.0, 2.0, 0.5), base=None, expect="bits"),
          Case("task_arithmetic", "task_arithmetic", weighted(0.3, 0.5, -0.2), expect="bits"),
          Case("ties", "ties", weighted(0.5, 0.3, 0.2, density=[0.5, 0.7, 0.3]), expect="documented",
               why=TIED_CUT),
          Case("breadcrumbs", "breadcrumbs", weighted(0.5, 0.3, 0.2), parameters={"density": 0.8, "gamma": 0.05},
               expect="documented", why=TIED_CUT),
          Case("model_stock", "model_stock", FTS, expect="bits"),
          Case("slerp", "slerp", ("ft1",), parameters={"t": 0.3}, expect="bits"),
          Case("nuslerp", "nuslerp", weighted(0.3, 0.7), base=None, expect="rounding"),
          Case("multislerp", "multislerp", weighted(0.5, 0.3, 0.2), base=None, expect="rounding"),
          Case("karcher", "karcher", FTS, base=None, expect="rounding"),
          Case("nearswap", "nearswap", ("ft1",), parameters={"t": 0.0005}, expect="bits"),
          Case("arcee_fusion", "arcee_fusion", ("ft1",), expect="documented",
               why="an importance equal to the fence, where the last bit of the row's KL sum decides "
                   "(docs/methods/arcee_fusion.md)"),
          Case("ram", "ram", FTS, expect="bits"),
          Case("ramplus_tl", "ramplus_tl", FTS, parameters={"epsilon": 1e-3}, expect="bits"),
          Case("passthrough", "passthrough", ("ft1",), base=None, parameters={"scale": 0.7}, expect="bits"),
      )),
    Case("sce select_topk (bf16 in and out)", "sce", FTS, parameters={"select_topk": 0.5}, expect="documented",
         bf16=True, why="bf16 deltas tie at the variance cut: which tied entries are kept differs (docs/methods/sce.md)"),
    # layer stacks (mergekit's `slices:`): frankenmerges, depth up-scaling, pruning, per-slice settings
    Case("slices: passthrough frankenmerge", "passthrough", (), base=None, expect="bits", slices=(
        {"sources": [src("base", 0, 2)]}, {"sources": [src("ft1", 1, 3)]})),
    Case("slices: passthrough depth up-scaling, o_proj scaled", "passthrough", (), base=None, expect="bits", slices=(
        {"sources": [src("ft2", 0, 2)]},
        {"sources": [src("ft2", 1, 3)], "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                                  {"value": 1.0}]}})),
    Case("slices: passthrough pruning", "passthrough", (), base=None, expect="bits", slices=(
        {"sources": [src("ft3", 0, 1)]}, {"sources": [src("ft3", 2, 3)]})),
    Case("slices: slerp per-slice t gradients", "slerp", (), parameters={"t": 0.5}, slices=(
        {"sources": [src("base", 0, 2), src("ft1", 0, 2)], "parameters": {"t": [0.0, 0.8]}},
        {"sources": [src("base", 2, 3), src("ft1", 2, 3)],
         "parameters": {"t": [{"filter": "self_attn", "value": 0.9}]}})),
    Case("slices: slerp shifted ranges", "slerp", (), parameters={"t": [0.2, 0.7]}, slices=(
        {"sources": [src("base", 0, 2), src("ft2", 1, 3)]},)),
    Case("slices: task_arithmetic per-slice weights", "task_arithmetic", (), slices=(
        {"sources": [src("base", 0, 1), src("ft1", 0, 1, weight=0.7), src("ft2", 0, 1, weight=0.2)]},
        {"sources": [src("base", 1, 3), src("ft1", 1, 3, weight=-0.3), src("ft2", 1, 3, weight=[0.1, 0.9])],
         "parameters": {"lambda": 0.5}})),
    Case("slices: passthrough frankenmerge (bf16 in and out)", "passthrough", (), base=None, expect="bits",
         bf16=True, slices=({"sources": [src("base", 0, 2)]}, {"sources": [src("ft1", 1, 3)]})),
    Case("slices: task_arithmetic per-slice weights (bf16 in and out)", "task_arithmetic", (), expect="bits",
         bf16=True, slices=(
             {"sources": [src("base", 0, 1), src("ft1", 0, 1, weight=0.7), src("ft2", 0, 1, weight=0.2)]},
             {"sources": [src("base", 1, 3), src("ft1", 1, 3, weight=-0.3), src("ft2", 1, 3, weight=[0.1, 0.9])],
              "parameters": {"lambda": 0.5}})),
    Case("slices: linear, a slice with fewer sources", "linear", (), base=None, expect="rounding",
         parameters={"weight": 1.0}, slices=(
             {"sources": [src("ft1", 0, 2), src("ft2", 0, 2, weight=3.0)]},
             {"sources": [src("ft1", 2, 3)]})),
    Case("slices: task_arithmetic, 2 / 1 / 3 models per slice", "task_arithmetic", (), expect="documented",
         why="the final norm and head: mergekit 0.1.5 merges only as many of the last slice's sources as the "
             "first slice has (docs/recipes.md, Layer stacks); every layer is bit-identical", slices=(
        {"sources": [src("base", 0, 1), src("ft1", 0, 1, weight=0.7), src("ft2", 0, 1, weight=0.2)]},
        {"sources": [src("base", 1, 2), src("ft2", 1, 2, weight=0.5)]},
        {"sources": [src("base", 2, 3), src("ft1", 2, 3, weight=0.3), src("ft3", 2, 3, weight=0.4),
                     src("ft2", 2, 3, weight=0.1)]})),
    Case("slices: ties, a slice with fewer sources", "ties", (), parameters={"density": 0.5, "weight": 0.6},
         expect="bits",
         slices=({"sources": [src("base", 0, 2), src("ft1", 0, 2), src("ft2", 0, 2), src("ft3", 0, 2)]},
                 {"sources": [src("base", 2, 3), src("ft3", 2, 3)]})),
    Case("slices: task_arithmetic, a slice with fewer sources (bf16 in and out)", "task_arithmetic", (),
         expect="bits", bf16=True, parameters={"weight": 0.4}, slices=(
             {"sources": [src("base", 0, 1), src("ft1", 0, 1), src("ft2", 0, 1)]},
             {"sources": [src("base", 1, 3), src("ft2", 1, 3)]})),
    Case("slices: ties mixed models", "ties", (), parameters={"density": 0.6}, slices=(
        {"sources": [src("base", 0, 2), src("ft1", 0, 2, weight=0.6), src("ft2", 1, 3, weight=0.4)]},
        {"sources": [src("base", 2, 3), src("ft3", 2, 3, weight=0.5), src("ft1", 0, 1, weight=0.5)]})),
    Case("slices: task_arithmetic, a slice's own base_model", "task_arithmetic", (), slices=(
        {"sources": [src("base", 0, 2), src("ft1", 0, 2, weight=0.5)]},
        {"sources": [src("ft3", 2, 3), src("ft1", 2, 3, weight=0.5)], "base_model": "ft3"})),
    Case("slices: linear, base_model left out", "linear", (), slices=(
        {"sources": [src("ft1", 0, 3, weight=1.0), src("ft2", 0, 3, weight=3.0)]},)),
    Case("ram", "ram", FTS, expect="bits"),
    Case("ram epsilon 1e-2", "ram", FTS, parameters={"epsilon": 1e-2}, expect="bits"),
    Case("ram epsilon 0, weights ignored", "ram", weighted(0.3, 2.0, -1.0), parameters={"epsilon": 0.0},
         expect="bits"),
    Case("ram base listed", "ram", ("base", "ft1", "ft2"), expect="bits"),
    Case("ramplus_tl", "ramplus_tl", FTS, expect="bits"),
    Case("ramplus_tl r alpha", "ramplus_tl", FTS, parameters={"r": 0.3, "alpha": 0.5}, expect="bits"),
    Case("ramplus_tl epsilon 1e-3", "ramplus_tl", FTS, parameters={"epsilon": 1e-3, "r": 0.5, "alpha": 2.0},
         expect="bits"),
    Case("ramplus_tl two models", "ramplus_tl", ("ft1", "ft2"), parameters={"epsilon": 1e-2, "r": 2.0, "alpha": 5.0},
         expect="bits"),
    Case("ramplus_tl r gradient", "ramplus_tl", FTS, parameters={"r": [0.0, 1.0], "alpha": 1.0}, expect="bits"),
    Case("vocab: tokenizer_source union", "task_arithmetic", VFTS, base="vbase", expect="bits", vocab=True,
         parameters={"weight": 0.4}, top={"tokenizer_source": "union"}),
    Case("vocab: tokenizer_source base", "ties", VFTS, base="vbase", expect="bits", vocab=True,
         parameters={"weight": 0.5, "density": 0.6}, top={"tokenizer_source": "base"}),
    Case("vocab: tokenizer_source model", "linear", ("v1", "v2"), base=None, expect="bits", vocab=True,
         parameters={"weight": 1.0}, top={"tokenizer_source": "v1"}),
    Case("vocab: union, slerp", "slerp", ("vbase", "v2"), base="vbase", expect="rounding", vocab=True,
         parameters={"t": 0.3}, top={"tokenizer_source": "union"}),
    Case("vocab: tokenizer block (zero, model_token, force, padding)", "linear", ("v1", "v2", "v3"), base=None,
         expect="rounding", vocab=True, parameters={"weight": 1.0},
         why="padding rows are means over the rows, summed in each tool's token order",
         top={"tokenizer": {"source": "union", "pad_to_multiple_of": 64, "tokens": {
             "zz_a": {"source": {"kind": "zero"}},
             "<|im_start|>": {"source": {"kind": "model_token", "model": "v2", "token": "<s>"}, "force": True},
             "w5": {"source": "v3", "force": True}}}}),
    Case("vocab: tokenizer_source union (bf16 in and out)", "task_arithmetic", VFTS, base="vbase", expect="rounding",
         vocab=True, bf16=True, parameters={"weight": 0.4}, top={"tokenizer_source": "union"}),
)


@dataclass
class Outcome:
    case: Case
    status: str  # "ok", "MISSED", "mlite refused", "mergekit failed", ...
    tensors: int = 0
    differing: int = 0
    elements: int = 0
    worst_rel: float = 0.0
    worst_abs: float = 0.0
    worst_tensor: str = ""
    detail: str = ""


def read_all(out_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                tensors[name] = h.get_tensor(name)
    return tensors


def compare(case: Case, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> Outcome:
    """Every tensor mergekit wrote, against ours: largest difference relative to the tensor's
    largest magnitude (the scale float32 rounding works at), and the count of differing entries."""
    res = Outcome(case, "ok", tensors=len(theirs))
    missing = sorted(set(theirs) - set(ours))
    if missing:
        res.status, res.detail = "MISSED", f"mlite lacks {missing[0]} (+{len(missing) - 1} more)"
        return res
    for name, b in theirs.items():
        a = ours[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            res.status, res.detail = "MISSED", f"{name}: {a.dtype}{list(a.shape)} vs mergekit {b.dtype}{list(b.shape)}"
            return res
        a64, b64 = a.double(), b.double()
        diff = (a64 - b64).abs()
        res.elements += b.numel()
        # bits: −0 against +0 differs, NaN against NaN does not
        res.differing += int((((a != b) | (a.signbit() != b.signbit())) & ~(a.isnan() & b.isnan())).sum())
        if bool((a64.isnan() != b64.isnan()).any()):
            res.status, res.detail = "MISSED", f"{name}: NaN in one output only"
            return res
        worst = float(diff.nan_to_num(0.0).max()) if b.numel() else 0.0
        scale = float(b64.abs().max()) if b.numel() else 0.0
        rel = worst / scale if scale > 0 else (0.0 if worst == 0 else float("inf"))
        if rel > res.worst_rel or (rel == res.worst_rel and not res.worst_tensor):
            res.worst_rel, res.worst_abs, res.worst_tensor = rel, worst, name
    if case.expect == "bits" and res.differing:
        res.status = "MISSED"
    elif case.expect == "rounding" and res.worst_rel > (BF16_ROUNDING_REL if case.bf16 else ROUNDING_REL):
        res.status = "MISSED"
    elif case.expect == "documented":
        res.status = "documented"
    return res


def vocab_of(out_dir: Path) -> dict[str, int]:
    data = json.loads((out_dir / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    vocab.update({e["content"]: e["id"] for e in data.get("added_tokens") or []})
    return vocab


def by_token(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], our_vocab: dict[str, int],
             their_vocab: dict[str, int]) -> str | None:
    """Put mergekit's vocabulary rows in mlite's token order (padding rows stay last), or say
    why the two vocabularies cannot be compared."""
    if our_vocab.keys() != their_vocab.keys():
        return f"token sets differ: {sorted(set(our_vocab) ^ set(their_vocab))[:4]}"
    tokens = sorted(our_vocab, key=our_vocab.__getitem__)
    theirs_order = torch.tensor([their_vocab[t] for t in tokens])
    for name, b in theirs.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")) and b.shape[0] >= len(tokens):
            theirs[name] = torch.cat([b[theirs_order], b[len(tokens):]])
    return None


def run(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    with log.open("w") as fh:
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False).returncode


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error")]
    return (errors or lines or ["(no output)"])[-1][:160]


def run_case(case: Case, paths: dict[str, Path], work: Path, mergekit_yaml: Path, env: dict[str, str]) -> Outcome:
    slug = re.sub(r"[^a-z0-9]+", "-", case.key.lower()).strip("-")
    recipe = work / f"{slug}.yaml"
    recipe.write_text(yaml.safe_dump(case.recipe(paths), sort_keys=False))
    ours_dir, theirs_dir = work / f"{slug}.mlite", work / f"{slug}.mergekit"
    mk_log, ml_log = work / f"{slug}.mergekit.log", work / f"{slug}.mlite.log"
    if run([str(mergekit_yaml), str(recipe), str(theirs_dir), "--no-copy-tokenizer", "--allow-crimes"],
           mk_log, env) != 0:
        return Outcome(case, "mergekit failed", detail=last_line(mk_log))
    mlite = [sys.executable, "-m", "cli.main", "merge", str(recipe), "--out", str(ours_dir), "--force"]
    if run(mlite, ml_log, {**env, "PYTHONPATH": str(ROOT)}) != 0:
        return Outcome(case, "mlite refused", detail=last_line(ml_log))
    ours, theirs = read_all(ours_dir), read_all(theirs_dir)
    if case.vocab:
        problem = by_token(ours, theirs, vocab_of(ours_dir), vocab_of(theirs_dir))
        if problem is not None:
            return Outcome(case, "MISSED", detail=problem)
    return compare(case, ours, theirs)


SPECIAL = ["<unk>", "<s>", "</s>"]


def vocab_models(work: Path, paths: dict[str, Path]) -> dict[str, Path]:
    """The vocabulary set, from the base and fine-tunes (float32 and bf16): vbase has the base's
    96 tokens; v1 adds two chat tokens (98 rows); v2 has two tokens of its own in place of the
    last two and one of v1's chat tokens (97 rows); v3 has the base's tokens with two ids
    swapped (and their rows)."""
    words = SPECIAL + [f"w{i}" for i in range(SHAPE.vocab_size - len(SPECIAL))]
    special = [(i, t) for i, t in enumerate(SPECIAL)]
    swapped = list(words)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    plans = {"vbase": ("base", words, special, 0), "v1": ("ft1", words, special + [(96, "<|im_start|>"), (97, "<|im_end|>")], 2),
             "v2": ("ft2", words[:-2] + ["zz_a", "zz_b"], special + [(96, "<|im_end|>")], 1),
             "v3": ("ft3", swapped, special, 0)}
    out: dict[str, Path] = {}
    gen = torch.Generator().manual_seed(11)
    for suffix, dtype in (("", torch.float32), ("-bf16", torch.bfloat16)):
        for name, (source, vocab, added, extra) in plans.items():
            state = read_all(paths[source + suffix])
            for key in ("model.embed_tokens.weight", "lm_head.weight"):
                rows = state[key].float()
                if name == "v3":
                    rows[[3, 4]] = rows[[4, 3]]
                state[key] = torch.cat([rows, torch.randn(extra, rows.shape[1], generator=gen) * 0.02])
            shape = LlamaShape(**{**SHAPE.__dict__, "vocab_size": SHAPE.vocab_size + extra})
            target = work / "vocab" / (name + suffix)
            save_checkpoint(state, target, shape=shape, num_shards=2, dtype=dtype)
            write_tokenizer(target, vocab, added)
            out[name + suffix] = target
    return out


def write_tokenizer(path: Path, words: list[str], added: list[tuple[int, str]]) -> None:
    """A BPE tokenizer.json (and a tokenizer_config.json) transformers loads as a fast tokenizer."""
    entries = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for i, t in added]
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": entries, "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {w: i for i, w in enumerate(words)}, "merges": []}}
    (path / "tokenizer.json").write_text(json.dumps(data))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "added_tokens_decoder": {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in entries}}))


def mergekit_version(venv: Path) -> str:
    try:
        got = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; "
                              "print(m.version('mergekit'), m.version('torch'))"],
                             capture_output=True, text=True, check=True).stdout.split()
        return f"mergekit {got[0]} (torch {got[1]})"
    except (subprocess.CalledProcessError, IndexError, OSError):
        return "mergekit (version unknown)"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "")
    except (subprocess.CalledProcessError, OSError):
        return "unknown"


def render(outcomes: Sequence[Outcome], header: str) -> str:
    rows = ["| case | method | expect | status | worst Δ / max\\|x\\| | worst tensor | differing entries | note |",
            "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        frac = f"{o.differing}/{o.elements}" if o.elements else ""
        rel = f"{o.worst_rel:.1e}" if o.elements else ""
        rows.append(f"| {o.case.key} | {o.case.method} | {o.case.expect} | {o.status} | {rel} | "
                    f"{o.worst_tensor} | {frac} | {(o.detail or o.case.why).replace('|', '/')} |")
    return header + "\n" + "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit-venv", required=True, type=Path, help="venv with mergekit installed")
    ap.add_argument("-k", "--cases", default="*", help="only cases whose name or method matches this glob or text")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    ap.add_argument("--keep", type=Path, help="work here (kept) instead of a temporary directory")
    args = ap.parse_args(argv)

    mergekit_yaml = args.mergekit_venv / "bin" / "mergekit-yaml"
    if not mergekit_yaml.exists():
        print(f"error: {mergekit_yaml} not found (install mergekit in that venv)", file=sys.stderr)
        return 2
    pattern = args.cases if any(c in args.cases for c in "*?[") else f"*{args.cases}*"
    cases = [c for c in CASES if fnmatch.fnmatch(c.key, pattern) or fnmatch.fnmatch(c.method, pattern)]
    if not cases:
        print(f"error: no case matches {args.cases!r}", file=sys.stderr)
        return 2
    env = {**os.environ, **ENV_OFFLINE}
    with tempfile.TemporaryDirectory(prefix="mlite-vs-mergekit-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = build_model_set(work / "models", shape=SHAPE, n_finetunes=3, num_shards=2, seed=7)
        paths = {"base": models.base, **{f"ft{i + 1}": p for i, p in enumerate(models.finetunes)}}
        halves = build_model_set(work / "models-bf16", shape=SHAPE, n_finetunes=3, num_shards=2, seed=7,
                                 dtype=torch.bfloat16)
        paths.update({"base-bf16": halves.base, **{f"ft{i + 1}-bf16": p for i, p in enumerate(halves.finetunes)}})
        if any(c.vocab for c in cases):
            paths.update(vocab_models(work, paths))
        outcomes = []
        for case in cases:
            t0 = time.perf_counter()
            o = run_case(case, paths, work, mergekit_yaml, env)
            outcomes.append(o)
            rel = f"{o.worst_rel:.1e}" if o.elements else "-"
            print(f"{case.key:34s} {o.status:16s} {rel:>8s} {time.perf_counter() - t0:5.1f} s  {o.detail}",
                  file=sys.stderr)
    header = (f"# mlite against mergekit, tensor by tensor\n\n"
              f"`python benchmarks/vs_mergekit.py` on {time.strftime('%Y-%m-%d %H:%M')}, mlite {git_revision()}, "
              f"{mergekit_version(args.mergekit_venv)}, {platform.machine()} CPU. Models: a float32 Llama-layout base "
              f"and three fine-tunes ({SHAPE.num_parameters():,} parameters each; the bf16 cases read bfloat16 copies "
              f"and write bfloat16), recipes in mergekit's shape with `dtype: float32`. `rounding`: largest difference ≤ {ROUNDING_REL:g} × the tensor's largest "
              f"magnitude ({BF16_ROUNDING_REL:g} for the bf16 cases: one bf16 step).\n")
    table = render(outcomes, header)
    print(table)
    if args.out:
        args.out.write_text(table)
    bad = [o for o in outcomes if o.status not in ("ok", "documented")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
