"""Linear probe training: separable data is learnt, the result is deterministic, bad input fails."""

from __future__ import annotations

import pytest
import torch

from mergekit_lite.errors import CheckpointError, UsageError
from mergekit_lite.methods.probe import split_indices, train_probe


def _separable(n: int = 200, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two Gaussian blobs 6σ apart along a known direction (plus a large constant offset)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    labels = (torch.arange(n) % 2).to(torch.int64)
    x = torch.randn(n, d, generator=g) + 5.0
    x += (labels.float() * 2 - 1).unsqueeze(1) * 3.0 * direction
    return x, labels, direction


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_learns_separable_data_deterministically(optimizer: str) -> None:
    x, y, direction = _separable()
    kw = {"optimizer": optimizer, "lr": 0.05} if optimizer == "adam" else {}
    a = train_probe(x, y, seed=3, **kw)
    b = train_probe(x, y, seed=3, **kw)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.heldout_accuracy == pytest.approx(1.0)
    assert a.train_accuracy >= 0.99
    assert a.weight.shape == (2, 8) and a.bias.shape == (2,) and a.weight.dtype == torch.float32
    assert a.n_train + a.n_heldout == 200 and a.n_heldout == 20
    # The behaviour direction (row 1 − row 0) points along the true separating direction.
    w = a.weight[1] - a.weight[0]
    assert torch.nn.functional.cosine_similarity(w, direction, dim=0) > (0.9 if optimizer == "lbfgs" else 0.8)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_trains_the_same_probe_under_a_notebooks_no_grad_or_inference_mode(optimizer: str, context: str) -> None:
    """Adam under no_grad, and both under inference_mode, raised 'element 0 … does not require grad'."""
    kw = {"optimizer": optimizer, "lr": 0.05} if optimizer == "adam" else {}
    x, y, _ = _separable()
    want = train_probe(x, y, seed=3, **kw)
    with getattr(torch, context)():
        xs, ys = (x.clone(), y.clone()) if context == "inference_mode" else (x, y)  # inference tensors
        got = train_probe(xs, ys, seed=3, **kw)
    assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)


def test_probe_acts_on_raw_features() -> None:
    x, y, _ = _separable(seed=1)
    fit = train_probe(x, y, holdout=0.0)
    assert fit.heldout_accuracy is None and fit.n_heldout == 0
    pred = (x @ fit.weight.T + fit.bias).argmax(dim=1)
    assert float((pred == y).float().mean()) == pytest.approx(fit.train_accuracy)


def test_seed_changes_split_only() -> None:
    y = torch.tensor([0] * 10 + [1] * 30)
    tr, ho = split_indices(y, 0.1, seed=0)
    tr2, ho2 = split_indices(y, 0.1, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(ho, ho2)
    assert int((y[ho] == 0).sum()) == 1 and int((y[ho] == 1).sum()) == 3  # stratified
    assert sorted(torch.cat([tr, ho]).tolist()) == list(range(40))
    assert not torch.equal(ho, split_indices(y, 0.1, seed=1)[1])


@pytest.mark.parametrize(
    ("features", "labels", "match"),
    [
        (torch.ones(4), torch.tensor([0, 1, 0, 1]), "shape"),
        (torch.ones(4, 2, dtype=torch.int64), torch.tensor([0, 1, 0, 1]), "floating point"),
        (torch.ones(4, 2), torch.tensor([0, 1, 2, 1]), "0 or 1"),
        (torch.ones(4, 2), torch.tensor([0.0, 1.0, 0.5, 1.0]), "0 or 1"),
        (torch.ones(4, 2), torch.tensor([1, 1, 1, 1]), "both classes"),
        (torch.ones(4, 2), torch.tensor([0, 1, 1]), r"shape \(4,\)"),
        (torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]), "NaN"),
    ],
)
def test_bad_input(features: torch.Tensor, labels: torch.Tensor, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        train_probe(features, labels)


# ---------------------------------------------------------------------------------------------
# Files and the command line
# ---------------------------------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mergekit_lite.workflows.surgery import collect_features  # noqa: E402
from mergekit_lite.workflows.surgery import train_probe as train_probe_file  # noqa: E402


def _cli_app():
    """The `mlite` app; `cli/` is installed as `mergekit_lite.cli`, also from a plain checkout."""
    import importlib

    try:
        return importlib.import_module("mergekit_lite.cli.main").app
    except ModuleNotFoundError:
        import mergekit_lite

        mergekit_lite.__path__.append(str(Path(mergekit_lite.__file__).parents[1]))
        return importlib.import_module("mergekit_lite.cli.main").app


def test_cli_train_is_deterministic(tmp_path: Path) -> None:
    x, y, _ = _separable(n=100, d=6, seed=2)
    save_file({"features": x, "labels": y}, str(tmp_path / "feats.safetensors"))
    runner = CliRunner()
    app = _cli_app()
    outs = []
    for name in ("a.safetensors", "b.safetensors"):
        r = runner.invoke(app, ["probe", "train", "--features", str(tmp_path / "feats.safetensors"),
                                "--out", str(tmp_path / name), "--seed", "4"])
        assert r.exit_code == 0, r.output
        assert "held-out accuracy 1.0000 on 10" in r.output
        outs.append(load_file(str(tmp_path / name)))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in ("weight", "bias"))  # bit-identical probes
    probe = load_file(str(tmp_path / "a.safetensors"))
    assert probe["weight"].shape == (2, 6) and probe["bias"].shape == (2,)
    norm = float(probe["weight"][1].double().norm())
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata()["heldout_accuracy"] == "1.000000"
        assert float(f.metadata()["direction_norm"]) == pytest.approx(norm, rel=1e-5)  # α's unit
    assert f"‖w‖ = {norm:.4g}" in r.output
    r = runner.invoke(app, ["probe", "train", "--features", str(tmp_path / "feats.safetensors"),
                            "--out", str(tmp_path / "a.safetensors")])
    assert r.exit_code == 2 and "exists" in r.output
    r = runner.invoke(app, ["probe", "train", "--features", str(tmp_path / "feats.safetensors"),
                            "--out", str(tmp_path / "feats.safetensors"), "--force"])
    assert r.exit_code == 2 and "is input file" in r.output and load_file(str(tmp_path / "feats.safetensors"))["features"].shape == x.shape


def test_train_file_errors(tmp_path: Path) -> None:
    save_file({"features": torch.ones(4, 2)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(UsageError, match="missing tensor.*labels"):
        train_probe_file(tmp_path / "f.safetensors", tmp_path / "p.safetensors")
    with pytest.raises(UsageError, match="not found"):
        train_probe_file(tmp_path / "nope.safetensors", tmp_path / "p.safetensors")
    save_file({"features": torch.ones(4, 2), "labels": torch.tensor([1, 1, 1, 1])}, str(tmp_path / "g.safetensors"))
    with pytest.raises(UsageError, match=r"g\.safetensors: labels must contain both classes"):
        train_probe_file(tmp_path / "g.safetensors", tmp_path / "p.safetensors")
    (tmp_path / "adir").mkdir()  # an existing directory as the probe's path, even with force
    with pytest.raises(UsageError, match="adir: is a directory; a probe is one .safetensors file"):
        train_probe_file(tmp_path / "g.safetensors", tmp_path / "adir", force=True)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "g.safetensors").read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="cut.safetensors: unreadable safetensors file .*not fully covered"):
        train_probe_file(tmp_path / "cut.safetensors", tmp_path / "p.safetensors")


def test_collect_features_from_a_local_model(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mergekit_lite.synthetic import LlamaShape, make_base, save_checkpoint

    shape = LlamaShape()
    model = save_checkpoint(make_base(shape, seed=1), tmp_path / "lm", shape=shape)
    words = ["[PAD]", "[UNK]", "you", "are", "awful", "nice", "kind", "bad", "people", "good"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(str(model))
    (tmp_path / "pos.txt").write_text("you are awful\nbad people\n\nawful awful bad\n")
    (tmp_path / "neg.txt").write_text("you are nice\nkind good people\n")
    runner = CliRunner()
    r = runner.invoke(_cli_app(), ["probe", "collect", "--model", str(model), "--positive", str(tmp_path / "pos.txt"),
                                   "--negative", str(tmp_path / "neg.txt"), "--out", str(tmp_path / "f.safetensors"),
                                   "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    data = load_file(str(tmp_path / "f.safetensors"))
    assert data["features"].shape == (5, shape.hidden_size) and data["labels"].tolist() == [1, 1, 1, 0, 0]
    # Mean pooling ignores padding: a text's features do not depend on its batch-mates.
    alone = collect_features(model, ["bad people"], ["kind good people"], tmp_path / "g.safetensors", batch_size=1)
    assert torch.allclose(load_file(str(alone))["features"][0], data["features"][1], atol=1e-5)


def _tiny_lm_with_tokenizer(tmp_path: Path, words: list[str], pad: str | None = "[PAD]") -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mergekit_lite.synthetic import LlamaShape, make_base, save_checkpoint

    shape = LlamaShape()
    model = save_checkpoint(make_base(shape, seed=1), tmp_path / "lm", shape=shape)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[1] if pad else None))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": pad, "unk_token": words[1]} if pad else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(str(model))
    (tmp_path / "pos.txt").write_text("a b\n")
    (tmp_path / "neg.txt").write_text("b a a\n")
    return model


def _error_lines(output: str) -> int:
    """Lines of the error (transformers' own progress bar for loading weights may precede it)."""
    lines = output.replace("\r", "\n").strip().splitlines()
    assert lines[-1].startswith("error: "), output
    return sum(not line.startswith("Loading weights") for line in lines)


def _collect(tmp_path: Path, model: Path, *extra: str):
    return CliRunner().invoke(_cli_app(), ["probe", "collect", "--model", str(model), "--positive",
                                           str(tmp_path / "pos.txt"), "--negative", str(tmp_path / "neg.txt"), *extra])


def test_collect_errors_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from mergekit_lite.synthetic import LlamaShape

    # A tokenizer whose ids run past the model's vocabulary is not this model's.
    big = ["[PAD]", "[UNK]", "a", "b"] + [f"w{i}" for i in range(LlamaShape().vocab_size + 10)]
    model = _tiny_lm_with_tokenizer(tmp_path, big)
    (tmp_path / "pos.txt").write_text(f"a w{LlamaShape().vocab_size + 5}\n")
    r = _collect(tmp_path, model, "--out", str(tmp_path / "f.safetensors"))
    assert r.exit_code == 4 and "running the model on text 1 failed" in r.output and "Traceback" not in r.output
    assert _error_lines(r.output) == 1 and not (tmp_path / "f.safetensors").exists()
    # A directory transformers cannot load: one line, naming it.
    (tmp_path / "lm" / "config.json").write_text("{not json")
    r = _collect(tmp_path, model, "--out", str(tmp_path / "f.safetensors"))
    assert r.exit_code == 4 and "cannot load model or tokenizer" in r.output and _error_lines(r.output) == 1
    # An unknown device, and an output over an input, are refused before anything is loaded.
    r = _collect(tmp_path, model, "--out", str(tmp_path / "f.safetensors"), "--device", "tpu")
    assert r.exit_code == 2 and "unknown device 'tpu'" in r.output
    r = _collect(tmp_path, model, "--out", str(tmp_path / "pos.txt"), "--force")
    assert r.exit_code == 2 and "is input file" in r.output and (tmp_path / "pos.txt").read_text() == f"a w{LlamaShape().vocab_size + 5}\n"
    r = _collect(tmp_path, model, "--out", str(tmp_path / "lm" / "config.json"), "--force")
    assert r.exit_code == 2 and "is input file" in r.output
    # No tokenizer files: said so (transformers asked to install sentencepiece or tiktoken).
    (tmp_path / "lm" / "tokenizer.json").unlink()
    r = _collect(tmp_path, model, "--out", str(tmp_path / "f.safetensors"))
    assert r.exit_code == 4 and "lm: has no tokenizer files (tokenizer.json" in r.output, r.output


def test_text_files_that_are_not_utf8_are_usage_errors(tmp_path: Path) -> None:
    from mergekit_lite.workflows.surgery import read_texts

    (tmp_path / "t.txt").write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(UsageError, match=r"t\.txt: not UTF-8 text \(byte 5\)"):
        read_texts(tmp_path / "t.txt")


def test_features_of_width_zero_are_refused(tmp_path: Path) -> None:
    save_file({"features": torch.ones(6, 0), "labels": torch.tensor([0, 1, 0, 1, 0, 1])}, str(tmp_path / "f.safetensors"))
    with pytest.raises(UsageError, match=r"shape \(N, d\) with d >= 1, got \(6, 0\)"):
        train_probe_file(tmp_path / "f.safetensors", tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


def test_a_quiet_label_free_feature_does_not_take_over_the_direction() -> None:
    """The L2 penalty is on the raw-feature weights: penalising the standardised ones let a
    feature of std 1e-4 hold ~100% of ‖w‖² once the weights were mapped back to raw features."""
    g = torch.Generator().manual_seed(0)
    n, d = 2000, 64
    y = (torch.arange(n) % 2).long()
    u = torch.randn(d, generator=g)
    u[0] = 0
    u /= u.norm()
    x = torch.randn(n, d, generator=g) + 2.0 * (y.float() - 0.5).unsqueeze(1) * u
    x[:, 0] = 0.01 + 1e-4 * torch.randn(n, generator=g)  # near-constant, independent of the label
    for optimizer in ("lbfgs", "adam"):
        w = train_probe(x, y, optimizer=optimizer).weight[1]
        assert float(w[0] ** 2 / (w**2).sum()) < 0.01, optimizer  # was 0.93-1.0; an even share is 1/64
        assert float(torch.nn.functional.cosine_similarity(w, u, dim=0)) > 0.9, optimizer


def test_collect_out_of_memory_is_a_one_line_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory error (a RuntimeError) names the fix, not a tokenizer mismatch."""
    transformers = pytest.importorskip("transformers")

    model = _tiny_lm_with_tokenizer(tmp_path, ["[PAD]", "[UNK]", "a", "b"])

    def out_of_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", out_of_memory)
    r = _collect(tmp_path, model, "--out", str(tmp_path / "f.safetensors"))
    assert r.exit_code == 2 and "out of cpu memory on text 1; lower --batch-size or --max-length" in r.output
    assert _error_lines(r.output) == 1 and not (tmp_path / "f.safetensors").exists()
    monkeypatch.setattr(transformers.LlamaForCausalLM, "to", out_of_memory)  # the model itself does not fit
    r = _collect(tmp_path, model, "--out", str(tmp_path / "f.safetensors"))
    assert r.exit_code == 2 and "the model does not fit in cpu memory" in r.output and _error_lines(r.output) == 1
