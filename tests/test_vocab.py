"""mergekit's tokenizer_source / tokenizer block: embedding rows lined up by token.

Hand-checkable models: three tokens or so, two columns, embeddings and heads whose rows can be
followed by eye. The expected values in the end-to-end tests are worked out in the docstrings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import load_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit_lite.cli.main import app
from safetensors.torch import save_file
from typer.testing import CliRunner

import mergekit_lite as mlite
from mergekit_lite.errors import CheckpointError, RecipeError
from mergekit_lite.io.tokenizer_vocab import (
    Tokenizer,
    added_entry,
    read_tokenizer,
    stripped,
    union,
    with_added,
)
from mergekit_lite.methods.vocab_align import ABSENT, Fallback, average_rows, fallbacks, permutation, realign
from mergekit_lite.synthetic import LlamaShape, make_base, save_checkpoint

runner = CliRunner()
EMBED, HEAD, NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"


# ---- fixtures --------------------------------------------------------------------------------
def tokenizer_json(words: list[str], added: list[tuple[int, str]] = ()) -> dict:
    vocab = {w: i for i, w in enumerate(words)}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for i, c in added],
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": []}}


def tiny(path: Path, words: list[str], embed: list[list[float]], *, added: list[tuple[int, str]] = (),
         head_scale: float | None = 10.0, rows: int | None = None) -> Path:
    """A model of one embedding, one head (10 × the embedding unless tied: None) and one norm."""
    path.mkdir(parents=True, exist_ok=True)
    e = torch.tensor(embed, dtype=torch.float32)
    state = {EMBED: e, NORM: torch.ones(2)}
    if head_scale is not None:
        state[HEAD] = e * head_scale
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": rows or e.shape[0],
                                                  "tie_word_embeddings": head_scale is None, "hidden_size": 2,
                                                  "num_attention_heads": 1, "num_key_value_heads": 1}))
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json(words, list(added))))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


@pytest.fixture
def trio(tmp_path: Path) -> dict[str, Path]:
    """base: a b c; ft1: a b c and the added <x>; ft2: a c d (no b, a d of its own)."""
    return {
        "base": tiny(tmp_path / "base", ["a", "b", "c"], [[1, 1], [2, 2], [3, 3]]),
        "ft1": tiny(tmp_path / "ft1", ["a", "b", "c"], [[2, 1], [2, 4], [3, 3], [8, 0]], added=[(3, "<x>")]),
        "ft2": tiny(tmp_path / "ft2", ["a", "c", "d"], [[0, 1], [5, 5], [6, 6]]),
    }


def run(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    mlite.run_recipe({**recipe, "output": {"path": str(out)}})
    return load_dir(out)


def ta(trio: dict[str, Path], **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(trio["base"]),
            "models": [{"model": str(trio["ft1"]), "parameters": {"weight": 1.0}},
                       {"model": str(trio["ft2"]), "parameters": {"weight": 1.0}}], **extra}


# ---- the maths ---------------------------------------------------------------------------------
def test_permutation_gives_each_output_id_the_models_row_for_its_token() -> None:
    out = {"a": 0, "b": 1, "c": 2, "d": 3}
    assert permutation(out, {"b": 0, "a": 1, "d": 5}, rows=4, size=4) == [1, 0, ABSENT, ABSENT]  # d's id is padding
    assert permutation(out, None, rows=3, size=4) == [0, 1, 2, ABSENT]  # no tokenizer: the output's ids


def test_fallbacks_follow_mergekits_defaults() -> None:
    """Models 0 (the base), 1, 2 over five ids: id 0 all hold (no fallback); id 1 only model 2;
    id 2 none (zeros); id 3 the base and model 1 (the base's row); id 4 models 1 and 2 (their
    average, the base lacking it)."""
    perms = [[0, ABSENT, ABSENT, 1, ABSENT],
             [0, ABSENT, ABSENT, 2, 3],
             [0, 1, ABSENT, ABSENT, 2]]
    assert fallbacks(perms, 0, {}) == {1: Fallback("model", 2), 2: Fallback("zero"), 3: Fallback("model", 0),
                                       4: Fallback("average")}
    assert fallbacks(perms, None, {})[3] == Fallback("average")  # no base: the holders' average
    forced = {0: Fallback("zero", force=True), 4: Fallback("row", 0, 0)}
    assert fallbacks(perms, 0, forced) == {0: Fallback("zero", force=True), 1: Fallback("model", 2),
                                           2: Fallback("zero"), 3: Fallback("model", 0), 4: Fallback("row", 0, 0)}
    with pytest.raises(ValueError, match="id 4: the model named as its source does not have the token"):
        fallbacks(perms, 0, {4: Fallback("model", 0)})


def test_average_rows_sums_in_the_models_dtype_then_divides() -> None:
    assert average_rows([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])], torch.float32).tolist() == [2.0, 3.5]
    # bf16: (0 + 1) + 2^-8 rounds back to 1 before the division, as mergekit's bf16 sum does
    rows = [torch.tensor([1.0]), torch.tensor([2.0**-8])]
    assert average_rows(rows, torch.bfloat16).item() == 0.5
    assert average_rows(rows, torch.float32).item() == (1 + 2.0**-8) / 2


def test_realign_takes_own_rows_then_fallbacks() -> None:
    source = torch.tensor([[10.0, 11], [20, 21], [30, 31]])
    perm = torch.tensor([2, ABSENT, 0, 1])
    forced = torch.tensor([False, False, False, True])
    defaults = torch.tensor([[7.0, 7], [9, 9]])
    index = torch.tensor([-1, 0, -1, 1])
    assert realign(source, 0, perm, forced, defaults, index).tolist() == [[30, 31], [7, 7], [10, 11], [9, 9]]
    # rows read from an offset: source holds rows 1 and 2 only
    assert realign(source[1:], 1, torch.tensor([2, 1]), torch.tensor([False, False]), defaults[:0],
                   torch.tensor([-1, -1])).tolist() == [[30, 31], [20, 21]]


# ---- tokenizers --------------------------------------------------------------------------------
def _tok(words: list[str], added: list[tuple[int, str]] = ()) -> Tokenizer:
    return Tokenizer(Path("."), tokenizer_json(words, list(added)), {"added_tokens_decoder": {}})


def test_added_tokens_get_the_ids_the_tokenizers_library_gives() -> None:
    """Past both the vocabulary and the added tokens; a vocabulary token keeps its id; an added
    token already there is skipped."""
    tok = with_added(_tok(["a", "b", "c"], [(5, "<s>")]), [added_entry("x"), added_entry("b"), added_entry("<s>"),
                                                            added_entry("y")])
    assert tok.vocab() == {"a": 0, "b": 1, "c": 2, "<s>": 5, "x": 6, "y": 7}
    assert tok.config is not None and sorted(tok.config["added_tokens_decoder"]) == ["1", "6", "7"]
    assert with_added(_tok(["a", "b"]), [added_entry("x")]).vocab()["x"] == 2
    assert not with_added(_tok(["a"]), []).edited


def test_union_adds_the_others_vocabulary_tokens_then_their_added_tokens() -> None:
    base = _tok(["a", "b", "c"])
    ft1 = _tok(["a", "b", "c"], [(3, "<x>")])
    ft2 = _tok(["a", "c", "d", "e"], [(4, "<y>")])
    out = union(base, [(base, 3), (ft1, 4), (ft2, 4)])  # ft2's rows stop at 4: <y> is padding there
    assert out.vocab() == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4, "<x>": 5}
    assert out.data["added_tokens"][-1]["special"] is True  # an added token keeps its settings
    assert out.data["added_tokens"][0] == {"id": 3, "content": "d", "single_word": False, "lstrip": False,
                                          "rstrip": False, "normalized": True, "special": False}


def test_stripping_drops_tokens_past_the_embedding_and_their_merges() -> None:
    tok = _tok(["a", "b", "ab", "c"], [(4, "<pad>")])
    tok.data["model"]["merges"] = ["a b", ["a", "c"]]
    out = stripped(tok, 3)
    assert out.vocab() == {"a": 0, "b": 1, "ab": 2} and out.data["model"]["merges"] == ["a b"]
    assert stripped(tok, 5) is tok
    tok.data["model"]["type"] = "WordPiece"
    with pytest.raises(CheckpointError, match="only BPE tokenizers can be stripped"):
        stripped(tok, 3)


# ---- merges ------------------------------------------------------------------------------------
def test_union_merge_golden(trio: dict[str, Path], tmp_path: Path) -> None:
    """Union: a b c from the base, then ft2's d (id 3), then ft1's added <x> (id 4).
    Fallbacks: b (ft2 lacks it) the base's [2, 2]; d only ft2's [6, 6]; <x> only ft1's [8, 0].
    Task arithmetic, weights 1: base + (ft1 − base) + (ft2 − base), row by row:
    a [1,1]+[1,0]+[-1,0] = [1,1]; b [2,2]+[0,2]+[0,0] = [2,4]; c [3,3]+0+[2,2] = [5,5];
    d [6,6]; <x> [8,0]. Heads are 10 × the embeddings."""
    out = run(ta(trio, tokenizer_source="union"), tmp_path / "o")
    want = torch.tensor([[1.0, 1], [2, 4], [5, 5], [6, 6], [8, 0]])
    assert torch.equal(out[EMBED], want) and torch.equal(out[HEAD], want * 10)
    assert torch.equal(out[NORM], torch.ones(2))
    tok = read_tokenizer(tmp_path / "o")
    assert tok is not None and tok.vocab() == {"a": 0, "b": 1, "c": 2, "d": 3, "<x>": 4}
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == 5
    transformers = pytest.importorskip("transformers")
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "o"))
    assert loaded.get_vocab() == tok.vocab() and loaded.encode("<x> d", add_special_tokens=False) == [4, 3]


def test_tokenizer_source_base_and_model(trio: dict[str, Path], tmp_path: Path) -> None:
    """base: a b c, so d and <x> are dropped; a model's tokenizer (ft1): a b c <x>, where ft2 and
    the base lack <x> and take ft1's [8, 0]."""
    out = run(ta(trio, tokenizer_source="base"), tmp_path / "b")
    assert out[EMBED].tolist() == [[1, 1], [2, 4], [5, 5]]
    out = run(ta(trio, tokenizer_source=str(trio["ft1"])), tmp_path / "m")
    assert out[EMBED].tolist() == [[1, 1], [2, 4], [5, 5], [8, 0]]
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (trio["ft1"] / "tokenizer.json").read_bytes()


def test_tokenizer_block_golden(trio: dict[str, Path], tmp_path: Path) -> None:
    """Linear over ft1 and ft2, no base: the union starts from ft1 (a b c <x>), adds d (id 4,
    past <x>). b: zeros for ft2 (configured), so ([2,4] + [0,0]) / 2 = [1, 2]; <x>: forced to
    ft2's row of 'a', [0, 1], on both; d only ft2's [6, 6]; a ([2,1]+[0,1])/2 = [1, 1];
    c ([3,3]+[5,5])/2 = [4, 4]. pad_to_multiple_of 4 gives 8 rows; rows 5-7 are each model's
    mean of its five lined-up rows, averaged."""
    recipe = {"merge_method": "linear",
              "models": [{"model": str(trio["ft1"]), "parameters": {"weight": 1.0}},
                         {"model": str(trio["ft2"]), "parameters": {"weight": 1.0}}],
              "tokenizer": {"source": "union", "pad_to_multiple_of": 4, "tokens": {
                  "b": {"source": {"kind": "zero"}},
                  "<x>": {"source": {"kind": "model_token", "model": str(trio["ft2"]), "token": "a"}, "force": True}}}}
    out = run(recipe, tmp_path / "o")
    e = out[EMBED]
    assert e[:5].tolist() == [[1, 1], [1, 2], [4, 4], [0, 1], [6, 6]]
    ft1 = torch.tensor([[2.0, 1], [2, 4], [3, 3], [0, 1], [6, 6]])
    ft2 = torch.tensor([[0.0, 1], [0, 0], [5, 5], [0, 1], [6, 6]])
    pad = (ft1.mean(0) + ft2.mean(0)) / 2
    assert e.shape == (8, 2) and all(torch.allclose(e[r], pad, atol=1e-6) for r in (5, 6, 7))
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == 8
    assert read_tokenizer(tmp_path / "o").vocab() == {"a": 0, "b": 1, "c": 2, "<x>": 3, "d": 4}


def test_a_token_only_named_in_the_block_is_added(trio: dict[str, Path], tmp_path: Path) -> None:
    """A token no model has is added to the output tokenizer with zero rows (mergekit 0.1.5
    fails on one without a source)."""
    out = run(ta(trio, tokenizer={"source": "base", "tokens": {"<new>": {}}}), tmp_path / "o")
    assert out[EMBED].tolist() == [[1, 1], [2, 4], [5, 5], [0, 0]]
    assert read_tokenizer(tmp_path / "o").vocab()["<new>"] == 3


def test_lined_up_merge_equals_a_by_id_merge_of_models_lined_up_by_hand(trio: dict[str, Path], tmp_path: Path,
                                                                      monkeypatch) -> None:
    """The oracle: realign each model by hand (rows in the union's order, fallbacks as worked out
    in test_union_merge_golden) and merge by id without the setting: the same bits, whole or in
    row blocks of one row, and with a tied model (its head is its embedding)."""
    tiny(trio["ft2"], ["a", "c", "d"], [[0, 1], [5, 5], [6, 6]], head_scale=None)  # tied
    by_hand = {
        "base": [[1, 1], [2, 2], [3, 3], [6, 6], [8, 0]],
        "ft1": [[2, 1], [2, 4], [3, 3], [6, 6], [8, 0]],
        "ft2": [[0, 1], [2, 2], [5, 5], [6, 6], [8, 0]],
    }
    heads = {"base": [[10, 10], [20, 20], [30, 30], [6, 6], [80, 0]],
             "ft1": [[20, 10], [20, 40], [30, 30], [6, 6], [80, 0]],
             "ft2": [[0, 1], [20, 20], [5, 5], [6, 6], [80, 0]]}
    hand = {}
    for k, rows in by_hand.items():
        hand[k] = tiny(tmp_path / f"hand_{k}", ["a"], rows)
        save_file({EMBED: torch.tensor(rows, dtype=torch.float32), HEAD: torch.tensor(heads[k], dtype=torch.float32),
                   NORM: torch.ones(2)}, str(hand[k] / "model.safetensors"))
    want = run(ta(hand), tmp_path / "want")
    got = run(ta(trio, tokenizer_source="union"), tmp_path / "got")
    assert all(torch.equal(got[k], want[k]) for k in want), {k: (got[k], want[k]) for k in want}
    from mergekit_lite.engine import stream
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 2)  # every tensor streams in blocks of one row
    blocked = run(ta(trio, tokenizer_source="union"), tmp_path / "blocked")
    assert all(torch.equal(blocked[k], want[k]) for k in want)


@settings(max_examples=12, deadline=None)
@given(order=st.permutations(list(range(5))))
def test_renumbering_a_models_tokens_changes_nothing(tmp_path_factory, order: list[int]) -> None:
    """Law: a fine-tune whose token ids (and rows) are shuffled merges to the same output."""
    tmp = tmp_path_factory.mktemp("perm")
    words = ["a", "b", "c", "d", "e"]
    base = tiny(tmp / "base", words, [[i, -i] for i in range(5)])
    ft = [[i + 0.5, i * 2.0] for i in range(5)]
    plain = tiny(tmp / "ft", words, ft)
    shuffled = tiny(tmp / "ft_shuffled", [words[j] for j in order], [ft[j] for j in order])
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "tokenizer_source": "base"}
    a = run({**recipe, "models": [{"model": str(plain), "parameters": {"weight": 0.7}}]}, tmp / "a")
    b = run({**recipe, "models": [{"model": str(shuffled), "parameters": {"weight": 0.7}}]}, tmp / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shared_tokenizers_merge_exactly_as_without_the_setting(trio: dict[str, Path], tmp_path: Path) -> None:
    """Law: when every model has the base's tokens at the base's ids, the setting moves no row."""
    for k in ("ft1", "ft2"):
        tiny(trio[k], ["a", "b", "c"], [[5, 1], [2, 7], [3, 0]])
    with_setting = run(ta(trio, tokenizer_source="union"), tmp_path / "u")
    without = run(ta(trio), tmp_path / "n")
    assert all(torch.equal(with_setting[k], without[k]) for k in without)
    assert mlite.dry_run(ta(trio, tokenizer_source="union"), out=str(tmp_path / "d"))["vocabulary"]["lined_up"] is False


# ---- errors and notes ----------------------------------------------------------------------------
def test_a_named_model_without_the_token_is_a_recipe_error(trio: dict[str, Path], tmp_path: Path) -> None:
    recipe = ta(trio, tokenizer={"source": "union", "tokens": {"d": {"source": str(trio["ft1"])}}})
    with pytest.raises(RecipeError, match="tokenizer.tokens 'd': the model named as its source does not have"):
        mlite.run_recipe({**recipe, "output": {"path": str(tmp_path / "o")}})
    recipe = ta(trio, tokenizer={"source": "union", "tokens": {"d": {"source": {
        "kind": "model_token", "model": str(trio["ft1"]), "token": "zzz"}}}})
    with pytest.raises(RecipeError, match="token 'zzz' is not in .*ft1's tokenizer"):
        mlite.run_recipe({**recipe, "output": {"path": str(tmp_path / "o")}})
    recipe = ta(trio, tokenizer={"source": "union", "tokens": {"d": {"source": {
        "kind": "model_token", "model": str(trio["ft1"]), "token_id": 9}}}})
    with pytest.raises(RecipeError, match="row 9 is past .*ft1's 4 embedding rows"):
        mlite.run_recipe({**recipe, "output": {"path": str(tmp_path / "o")}})
    assert not (tmp_path / "o").exists()


def test_without_tokenizer_json_rows_merge_by_id_with_a_warning(trio: dict[str, Path], tmp_path: Path) -> None:
    """A base with a SentencePiece tokenizer only (no tokenizer.json): there is no vocabulary to
    follow, so rows merge by id, and the run says so."""
    (trio["base"] / "tokenizer.json").unlink()
    tiny(trio["ft1"], ["a", "b", "c"], [[2, 1], [2, 4], [3, 3]])
    recipe = {**ta(trio, tokenizer_source="base"), "models": [{"model": str(trio["ft1"])}]}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    res = runner.invoke(app, ["merge", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0 and "has no tokenizer.json" in res.output and "merged by id" in res.output, res.output
    assert load_dir(tmp_path / "o")[EMBED].tolist() == [[2, 1], [2, 4], [3, 3]]


def test_chat_template_and_union_share_tokenizer_config(trio: dict[str, Path], tmp_path: Path) -> None:
    mlite.run_recipe({**ta(trio, tokenizer_source="union", chat_template="chatml"),
                      "output": {"path": str(tmp_path / "o")}})
    cfg = json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]
    assert cfg["added_tokens_decoder"]["4"]["content"] == "<x>" and cfg["added_tokens_decoder"]["3"]["content"] == "d"


def test_shipped_union_recipe_runs_on_the_demo_models(tmp_path: Path) -> None:
    """recipes/mergekit_vocab_union.yaml on the demo models: ft2's chat tokens get new ids 128
    and 129. <|im_start|> only ft2 has, so every model takes ft2's row and the merge keeps it;
    <|im_end|> is forced to ft2's row; the reserved tokens ft2 lacks take the base's row in ft2,
    so there only ft1's task vector counts."""
    import shutil

    from mergekit_lite.workflows.demo import build_demo_models

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "recipes" / "mergekit_vocab_union.yaml", tmp_path / "r.yaml")
    models = build_demo_models(tmp_path)
    out_dir = mlite.run_recipe(tmp_path / "r.yaml", out=tmp_path / "out").output
    out, base, ft1, ft2 = (load_dir(p) for p in (out_dir, models / "base", models / "ft1", models / "ft2"))
    assert read_tokenizer(out_dir).vocab()["<|im_start|>"] == 128 and read_tokenizer(out_dir).vocab()["<|im_end|>"] == 129
    for name in (EMBED, HEAD):
        assert out[name].shape[0] == 130
        assert torch.equal(out[name][128], ft2[name][126]) and torch.equal(out[name][129], ft2[name][127])
        b, f1 = base[name][126].float(), ft1[name][126].float()
        assert torch.equal(out[name][126], (b + 0.5 * (f1 - b)).to(torch.bfloat16))


def test_padding_rows_belong_to_the_caller(trio: dict[str, Path]) -> None:
    """A view's rows are the caller's to compute in: padding rows read alone are a copy, not
    the kept mean row, and the reads are counted in stored bytes."""
    recipe = ta(trio, tokenizer={"source": "union", "pad_to_multiple_of": 4})
    plan = mlite.plan_recipe({**recipe, "output": {"path": str(trio["base"].parent / "o")}})
    view = plan.checkpoints[next(k for k, ck in plan.checkpoints.items() if ck.label.endswith("ft1"))]
    first = view.load(EMBED, rows=(7, 8))
    first.mul_(0)
    again = view.load(EMBED, rows=(7, 8))
    assert torch.equal(again, view.load(EMBED)[7:8]) and not torch.equal(again, first)
    before = view.bytes_read
    view.load(NORM, dtype=torch.float64)
    assert view.bytes_read - before == 2 * 4  # two float32 entries as stored, not as float64


def test_inspect_shows_the_tokenizer_and_a_longer_embedding(trio: dict[str, Path]) -> None:
    res = runner.invoke(app, ["inspect", str(trio["ft1"])])
    assert res.exit_code == 0 and "tokenizer.json: 4 tokens, 1 added (last: <x>)" in res.output, res.output
    tiny(trio["base"], ["a", "b"], [[1, 1], [2, 2], [3, 3]])
    res = runner.invoke(app, ["inspect", str(trio["base"])])
    assert "tokenizer.json: 2 tokens; the embedding has 3 rows" in res.output
    assert mlite.vocabulary(str(trio["ft2"])) == mlite.vocabulary(mlite.inspect(str(trio["ft2"]))) == {
        "tokens": 3, "added_tokens": 0, "last_added": [], "embedding_rows": 3}
    (trio["ft2"] / "tokenizer.json").unlink()
    assert mlite.vocabulary(mlite.inspect(str(trio["ft2"]))) is None


# ---- an oracle: mergekit's PermutedVocabulary, restated loop by loop ----------------------------
POOL = ["a", "b", "c", "d", "e", "f", "g", "h"]


@st.composite
def vocab_family(draw: st.DrawFn) -> list[dict]:
    """Three models: each a vocabulary drawn from POOL in some order, maybe an added token or
    two (X, Y) after it, and a padding row past its tokens, or one row too few for them (its
    last token has no row: the base's tokenizer is stripped of it, the others' ignore it)."""
    models = []
    for _ in range(3):
        words = draw(st.lists(st.sampled_from(POOL), min_size=2, max_size=6, unique=True))
        added = draw(st.lists(st.sampled_from(["X", "Y"]), max_size=2, unique=True))
        padding = draw(st.integers(-1, 1))
        rows = len(words) + len(added) + padding
        embed = draw(st.lists(st.lists(st.integers(-9, 9), min_size=2, max_size=2), min_size=rows, max_size=rows))
        models.append({"words": words, "added": [(len(words) + i, t) for i, t in enumerate(added)],
                       "embed": embed, "rows": rows})
    return models


def oracle(models: list[dict], source: str) -> tuple[dict[str, int], list[torch.Tensor]]:
    """The output vocabulary and each model's lined-up embedding, as mergekit computes them
    (models[0] is the base; models' padding rows carry no token)."""
    def vocab(m: dict) -> dict[str, int]:
        full = {**{w: i for i, w in enumerate(m["words"])}, **{t: i for i, t in m["added"]}}
        return {t: i for t, i in full.items() if i < m["rows"]}

    if source == "base":
        out = vocab(models[0])
    else:  # union: the base, the others' vocabulary tokens, then everyone's added tokens
        out = dict(vocab(models[0]))
        added_texts = {t for m in models for i, t in m["added"] if i < m["rows"]}
        for m in models[1:]:
            for i, w in enumerate(m["words"]):
                if w not in out and w not in added_texts and i < m["rows"]:
                    out[w] = len(out)
        for m in models:
            for i, t in m["added"]:
                if i < m["rows"]:
                    out.setdefault(t, len(out))
    perms = [{i: vocab(m).get(t, -1) for t, i in out.items()} for m in models]
    rows = [torch.tensor(m["embed"], dtype=torch.float32) for m in models]
    lined = []
    for k in range(len(models)):
        new = torch.zeros(len(out), 2)
        for i in out.values():
            if perms[k][i] >= 0:
                new[i] = rows[k][perms[k][i]]
                continue
            holders = [j for j in range(len(models)) if perms[j][i] >= 0]
            if len(holders) == 1:
                new[i] = rows[holders[0]][perms[holders[0]][i]]
            elif not holders:
                new[i] = 0
            elif perms[0][i] >= 0:
                new[i] = rows[0][perms[0][i]]
            else:
                acc = torch.zeros(2)
                for j in holders:
                    acc = acc + rows[j][perms[j][i]]
                new[i] = acc / len(holders)
        lined.append(new)
    return out, lined


@settings(max_examples=25, deadline=None)
@given(family=vocab_family(), source=st.sampled_from(["union", "base"]))
def test_lined_up_rows_match_mergekits_loops(tmp_path_factory, family: list[dict], source: str) -> None:
    """Random vocabularies (shuffled, partial, with added tokens and padding rows): task
    arithmetic over the lined-up rows equals the oracle's, token by token."""
    tmp = tmp_path_factory.mktemp("oracle")
    paths = [tiny(tmp / f"m{k}", m["words"], m["embed"], added=m["added"]) for k, m in enumerate(family)]
    out_vocab, lined = oracle(family, source)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(paths[0]), "tokenizer_source": source,
              "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths[1:], (0.5, 0.25), strict=True)]}
    got = run(recipe, tmp / "out")
    want = lined[0] + 0.5 * (lined[1] - lined[0]) + 0.25 * (lined[2] - lined[0])
    assert read_tokenizer(tmp / "out").vocab() == out_vocab
    assert torch.allclose(got[EMBED], want, atol=1e-5), (got[EMBED], want)
    assert torch.allclose(got[HEAD], want * 10, atol=1e-4)


def test_a_stack_leaving_a_place_out_of_the_head_is_refused_with_a_vocabulary(tmp_path: Path) -> None:
    """The last slice has no source at the second model's place: its head would merge fewer
    models than the vocabulary was lined up over. With that source, the stack runs."""
    shape = LlamaShape(vocab_size=4, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)
    paths = []
    for k, words in enumerate((["a", "b", "c", "d"], ["a", "b", "d", "c"])):
        p = save_checkpoint(make_base(shape, seed=k), tmp_path / f"s{k}", shape=shape)
        (p / "tokenizer.json").write_text(json.dumps(tokenizer_json(words)))
        paths.append(str(p))
    recipe = {"merge_method": "linear", "tokenizer_source": "union", "slices": [
        {"sources": [{"model": paths[0], "layer_range": [0, 1]}, {"model": paths[1], "layer_range": [0, 1]}]},
        {"sources": [{"model": paths[0], "layer_range": [1, 2]}]}]}
    with pytest.raises(RecipeError, match="has no source in the slice that gives lm_head.weight"):
        mlite.plan_recipe(recipe, out=str(tmp_path / "o"))
    recipe["slices"][1]["sources"].append({"model": paths[1], "layer_range": [1, 2]})
    out = mlite.run_recipe(recipe, out=tmp_path / "o")
    assert out.output is not None


def test_an_adapter_on_moved_rows_is_refused(model_set, tmp_path: Path) -> None:
    """MODEL+LORA where the adapter saves its own lm_head: its rows are in MODEL's vocabulary,
    which the union moves; refused with what to do, before anything is written."""
    from safetensors.torch import load_file

    words = [f"t{i}" for i in range(model_set.shape.vocab_size)]
    for path, ws in ((model_set.base, words), (model_set.finetunes[0], [*words[:3], "new", *words[4:]]),
                     (model_set.finetunes[1], words)):
        (Path(path) / "tokenizer.json").write_text(json.dumps(tokenizer_json(ws)))
    adapter = Path(model_set.adapter)
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    factors["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(model_set.shape.vocab_size,
                                                                              model_set.shape.hidden_size)
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    recipe = {"merge_method": "task_arithmetic", "base_model": str(model_set.base), "tokenizer_source": "union",
              "models": [{"model": f"{model_set.finetunes[0]}+{adapter}", "parameters": {"weight": 0.5}},
                         {"model": str(model_set.finetunes[1]), "parameters": {"weight": 0.5}}]}
    with pytest.raises(RecipeError, match="the adapter changes lm_head.weight, whose rows tokenizer_source: union "
                                          "moves to the output's vocabulary; merge the adapter into its model first"):
        mlite.run_recipe({**recipe, "output": {"path": str(tmp_path / "o")}})
    assert not (tmp_path / "o").exists()


# ---- mlite's shape -----------------------------------------------------------------------------
def test_a_chain_lines_up_every_checkpoint_it_reads(trio: dict[str, Path], tmp_path: Path) -> None:
    """mlite's shape, with the `tokenizer:` block at the top: a chain of two task-arithmetic
    steps, weights 1: s1 = base + (ft1 − base) is ft1's lined-up rows, and s2 = s1 + (ft2 − s1)
    is ft2's: a [0, 1], b the reference's [2, 2] (ft2 lacks it; b0, the base the chain starts
    from, has it), c [5, 5], d [6, 6], <x> ft1's [8, 0] (only ft1 has it), over the same union as
    test_union_merge_golden (vocabulary tokens, then added ones)."""
    recipe = {"inputs": {"b0": str(trio["base"]), "one": str(trio["ft1"]), "two": str(trio["ft2"])},
              "steps": [{"id": "s1", "method": "task_arithmetic", "base": "b0", "models": ["one"],
                         "parameters": {"weight": 1.0}},
                        {"id": "s2", "method": "task_arithmetic", "base": "s1", "models": ["two"],
                         "parameters": {"weight": 1.0}}],
              "tokenizer": {"source": "union"}}
    out = run(recipe, tmp_path / "o")
    by_token = {"a": [0, 1], "b": [2, 2], "c": [5, 5], "d": [6, 6], "<x>": [8, 0]}
    vocab = read_tokenizer(tmp_path / "o").vocab()
    assert vocab == {"a": 0, "b": 1, "c": 2, "d": 3, "<x>": 4}
    assert all(out[EMBED][i].tolist() == by_token[t] for t, i in vocab.items())
    # `base` names the output's reference model (b0 here); an input's name takes its tokenizer
    recipe["tokenizer"] = {"source": "base"}
    run(recipe, tmp_path / "b")
    assert read_tokenizer(tmp_path / "b").vocab() == {"a": 0, "b": 1, "c": 2}
    recipe["tokenizer"] = {"source": "one", "tokens": {"d": {"source": "two"}}}
    run(recipe, tmp_path / "m")
    assert read_tokenizer(tmp_path / "m").vocab() == {"a": 0, "b": 1, "c": 2, "<x>": 3, "d": 4}


@pytest.mark.parametrize(("block", "wanted"), [
    ({"source": "nope"}, "tokenizer.source 'nope' is not an input: use union, base or an input's name (b0, one)"),
    ({"source": "union", "tokens": {"x": {"source": "zzz"}}}, "'zzz' is not an input"),
])
def test_mlite_shape_tokenizer_block_errors(trio: dict[str, Path], block: dict, wanted: str) -> None:
    recipe = {"inputs": {"b0": str(trio["base"]), "one": str(trio["ft1"])},
              "steps": [{"method": "task_arithmetic", "base": "b0", "models": ["one"]}], "tokenizer": block}
    with pytest.raises(RecipeError, match=re.escape(wanted)):
        mlite.plan_recipe(recipe)
