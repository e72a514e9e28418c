"""2-D embeddings (attnscope.embedding) and the probe's [cls] / mean-patch embedding
(attnscope.probe.clusters, plots.probe.embedding), against float64 numpy references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from attnscope.embedding import cluster_scores, embed_2d
from attnscope.errors import AttnscopeError, ConfigError
from attnscope.models.layout import TokenLayout
from attnscope.probe.clusters import evaluation_embedding, pooled_features, sample_positions
from attnscope.probe.train import TensorSource


@pytest.fixture(autouse=True)
def one_blas_thread():
    """scikit-learn's OpenMP and BLAS pools on one thread: on a busy shared CPU their default
    of every core makes a 60-point t-SNE take seconds instead of a tenth of one."""
    from attnscope.embedding import sklearn_threads

    with sklearn_threads(blas=1, openmp=1):
        yield


# ---------------------------------------------------------------- float64 references


def _pca_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal components by a plain SVD of the centred matrix, and the
    share of the total variance of each."""
    xc = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:2].T, s[:2] ** 2 / (s**2).sum()


def _cosine_distances(x: np.ndarray) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return 1.0 - xn @ xn.T


def _knn_reference(x: np.ndarray, y: np.ndarray, k: int, metric: str = "cosine") -> float:
    """Leave-one-out k-NN: each point's k nearest other points vote; a tie goes to the lowest label."""
    d = _cosine_distances(x) if metric == "cosine" else np.linalg.norm(x[:, None] - x[None], axis=2)
    np.fill_diagonal(d, np.inf)
    hits = 0
    for i in range(len(x)):
        near = np.argsort(d[i], kind="stable")[:k]
        hits += int(np.bincount(y[near], minlength=y.max() + 1).argmax() == y[i])
    return hits / len(x)


def _silhouette_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Rousseeuw's silhouette with cosine distance (0 for a point alone in its class)."""
    d = _cosine_distances(x)
    values = []
    for i in range(len(x)):
        own = (y == y[i]) & (np.arange(len(x)) != i)
        if not own.any():
            values.append(0.0)
            continue
        a = d[i, own].mean()
        b = min(d[i, y == c].mean() for c in np.unique(y) if c != y[i])
        values.append((b - a) / max(a, b))
    return float(np.mean(values))


def _two_clusters(n: int = 60, dim: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    centre = np.zeros(dim)
    centre[0] = 30.0
    return rng.normal(size=(n, dim)) + np.where(y[:, None] == 1, centre, -centre), y


# ---------------------------------------------------------------- embed_2d


def test_pca_equals_a_float64_svd_up_to_sign():
    rng = np.random.default_rng(1)
    # anisotropic so the two components are well defined; float32 input is computed in float64
    x = (rng.normal(size=(80, 12)) * np.linspace(4, 0.5, 12)).astype(np.float32)
    emb = embed_2d(x, "pca")
    ref, ratio = _pca_reference(x.astype(np.float64))
    assert emb.coords.shape == (80, 2) and emb.coords.dtype == np.float64
    for j in range(2):
        sign = np.sign(emb.coords[:, j] @ ref[:, j])
        np.testing.assert_allclose(emb.coords[:, j], sign * ref[:, j], atol=1e-6, rtol=0)
    np.testing.assert_allclose(emb.explained_variance_ratio, ratio, atol=1e-9)
    assert emb.settings()["method"] == "pca" and len(emb.settings()["explained_variance_ratio"]) == 2


def test_tsne_is_seeded_and_separates_two_far_gaussian_clusters():
    x, y = _two_clusters()
    first, again = embed_2d(x, "tsne", seed=3), embed_2d(x, "tsne", seed=3)
    np.testing.assert_array_equal(first.coords, again.coords)
    # known answer: the 2-D output keeps the two clusters apart
    assert _knn_reference(first.coords, y, 5, metric="euclidean") == 1.0
    assert first.method == "tsne" and first.perplexity == pytest.approx(min(30.0, 59 / 3))
    assert first.pca_dims is None  # 20 dims: nothing to reduce


def test_tsne_reduces_to_50_pca_dims_first_and_clips_the_perplexity_on_small_sets():
    rng = np.random.default_rng(2)
    wide = embed_2d(rng.normal(size=(70, 64)), "tsne")
    assert wide.pca_dims == 50 and wide.settings()["pca_dims_before_tsne"] == 50
    small = embed_2d(rng.normal(size=(7, 5)), "tsne")
    assert small.perplexity == pytest.approx(2.0) and small.coords.shape == (7, 2)


def test_bad_inputs_are_one_line_errors():
    x = np.ones((10, 4))
    with pytest.raises(ConfigError, match="method takes tsne, pca"):
        embed_2d(x, "umap")
    with pytest.raises(ConfigError, match="perplexity"):
        embed_2d(x, "tsne", perplexity=0)
    with pytest.raises(AttnscopeError, match="n >= 3"):
        embed_2d(np.ones((2, 4)), "pca")
    bad = np.random.default_rng(0).normal(size=(10, 4))
    bad[3, 1] = np.nan
    with pytest.raises(AttnscopeError, match="NaN"):
        embed_2d(bad, "pca")


# ---------------------------------------------------------------- cluster_scores


@pytest.mark.parametrize("seed", [0, 1])
def test_cluster_scores_equal_float64_references(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 90)
    x = rng.normal(size=(90, 16)) + rng.normal(size=(4, 16))[y] * 0.7
    for k in (1, 5, 10):
        got = cluster_scores(x, y, k=k)
        assert got.k == k and got.knn_accuracy == pytest.approx(_knn_reference(x, y, k), abs=1e-12)
    assert cluster_scores(x, y).silhouette == pytest.approx(_silhouette_reference(x, y), rel=1e-5)


def test_cluster_scores_known_answers():
    x, y = _two_clusters(dim=6)
    s = cluster_scores(x, y)
    assert s.knn_accuracy == 1.0 and s.silhouette > 0.9  # two far clusters
    rng = np.random.default_rng(5)
    noise = cluster_scores(rng.normal(size=(400, 8)), rng.integers(0, 4, 400))
    assert abs(noise.knn_accuracy - 0.25) < 0.1 and abs(noise.silhouette) < 0.05  # chance, no structure
    one = cluster_scores(x, np.zeros(len(x), dtype=int))
    assert one.knn_accuracy == 1.0 and np.isnan(one.silhouette) and one.as_dict()["silhouette"] is None
    assert cluster_scores(x[:3], y[:3], k=10).k == 2  # capped at n - 1


# ---------------------------------------------------------------- the probe's embedding


def _tokens(n: int = 40, layout: TokenLayout | None = None, seed: int = 0):
    layout = layout or TokenLayout(True, 1, 2, (2, 3), (16, 16))  # [cls], a register, 6 patches
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(n, layout.num_tokens, 8)).astype(np.float16)
    return tokens, rng.integers(0, 3, n), layout


def test_pooled_features_are_the_class_token_and_the_mean_of_the_patches_only():
    tokens, _, layout = _tokens()
    positions = np.array([5, 0, 17, 3])
    read, pooled = pooled_features(TensorSource(torch.from_numpy(tokens)), positions, layout, batch_size=3)
    t = tokens.astype(np.float64)
    np.testing.assert_array_equal(read, positions)
    np.testing.assert_allclose(pooled["cls"], t[positions, 0], rtol=0, atol=0)
    np.testing.assert_allclose(pooled["patch_mean"], t[positions, 2:].mean(axis=1), rtol=1e-12)
    no_cls = TokenLayout(False, 1, 1, (2, 3), (16, 16))
    _, pooled = pooled_features(TensorSource(torch.from_numpy(tokens[:, 1:])), positions, no_cls)
    assert list(pooled) == ["patch_mean"]
    np.testing.assert_allclose(pooled["patch_mean"], t[positions, 2:].mean(axis=1), rtol=1e-12)


def test_the_subsample_is_seeded_sorted_and_only_beyond_the_cap():
    pos = np.arange(10, 110)
    np.testing.assert_array_equal(sample_positions(pos, 100, 0), pos)
    got = sample_positions(pos, 30, 0)
    assert len(got) == 30 and np.all(np.diff(got) > 0) and set(got) <= set(pos)
    np.testing.assert_array_equal(got, sample_positions(pos, 30, 0))
    assert not np.array_equal(got, sample_positions(pos, 30, 1))


def test_evaluation_embedding_table_and_run_json_entry():
    tokens, labels, layout = _tokens(n=50)
    classes = ["ant", "bee", "cat"]
    emb = evaluation_embedding(
        TensorSource(torch.from_numpy(tokens)), np.arange(50), labels, classes, layout,
        method="pca", block=3, num_blocks=6, seed=0, cap=30,
    )  # fmt: skip
    assert emb is not None
    table = emb.table
    assert list(table.columns) == ["image", "split", "label", "class", "block", "token", "method", "x", "y"]
    assert len(table) == 60 and list(table["token"].unique()) == ["cls", "patch_mean"]
    part = table[table["token"] == "cls"]
    np.testing.assert_array_equal(part["image"], sample_positions(np.arange(50), 30, 0))
    assert (part["class"] == [classes[i] for i in labels[part["image"]]]).all()
    ref, _ = _pca_reference(tokens[part["image"], 0].astype(np.float64))
    np.testing.assert_allclose(np.abs(part[["x", "y"]].to_numpy()), np.abs(ref), atol=1e-6)
    info = emb.as_dict()
    assert info["method"] == "pca" and info["points"] == 30 and info["eval_images"] == 50
    assert "30 of 50" in info["subsample"] and set(info["tokens"]) == {"cls", "patch_mean"}
    assert info["tokens"]["cls"]["scores_on_full_features"]["knn_k"] == 10
    assert evaluation_embedding(
        TensorSource(torch.from_numpy(tokens)), [0, 1], labels, classes, layout, method="pca", block=0,
        num_blocks=1,
    ) is None  # fmt: skip


@pytest.mark.parametrize("num_classes", [3, 15, 40])
def test_embedding_figure_has_two_panels_and_a_legend_or_a_colourbar(num_classes):
    from attnscope.plots.probe import embedding

    rng = np.random.default_rng(0)
    layout = TokenLayout(True, 0, 1, (2, 2), (16, 16))
    tokens = rng.normal(size=(120, 5, 8)).astype(np.float32)
    labels = np.arange(120) % num_classes
    classes = [f"c{i}" for i in range(num_classes)]
    emb = evaluation_embedding(TensorSource(tokens), np.arange(120), labels, classes, layout, method="pca",
                               block=1, num_blocks=2)  # fmt: skip
    fig = embedding(emb, classes, label="tiny")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 and "[cls] token" in panels[0].get_title()
    assert "10-NN accuracy" in panels[1].get_title() and "PC 1" in panels[0].get_xlabel()
    assert "block 1 (last)" in fig._suptitle.get_text() and "PCA" in fig._suptitle.get_text()
    has_legend = panels[-1].get_legend() is not None
    assert has_legend == (num_classes <= 20) and (len(fig.axes) == 3) == (num_classes > 20)
    assert isinstance(emb.table, pd.DataFrame)


# ---------------------------------------------------------------- `attnscope probe --embedding`


def _probe(tmp_path, out: str, *extra: str):
    from typer.testing import CliRunner

    from attnscope.cli.app import app

    args = [
        "probe", "--model", "test_vit", "--random-init", "--img-size", "32", "--max-images-per-split", "40",
        "--epochs", "1", "--lrs", "0.1", "--wds", "0", "--aggregator", "cls,mean", "--maps", "0",
        "--no-curves", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / out),
        *extra,
    ]  # fmt: skip
    return CliRunner().invoke(app, args, catch_exceptions=False)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_probe_writes_the_embedding_table_figure_and_settings_and_none_writes_neither(tmp_path):
    import json

    result = _probe(tmp_path, "tsne", "--format", "png", "--format", "svg")
    assert result.exit_code == 0, result.output
    assert "embedding (t-SNE of block" in result.output and "10-NN" in result.output
    out = tmp_path / "tsne"
    table = pd.read_csv(out / "embedding.csv")
    assert list(table.columns) == [
        "model", "image", "split", "label", "class", "block", "token", "method", "x", "y"
    ]  # fmt: skip
    meta = json.loads((out / "run.json").read_text())
    info = meta["models"]["test_vit"]
    n_eval = info["splits"]["eval"]
    assert len(table) == 2 * n_eval and set(table["token"]) == {"cls", "patch_mean"}
    assert (table["method"] == "tsne").all() and (table["split"] == "eval").all()
    assert (table["block"] == info["num_blocks"] - 1).all()  # the last block, counted from 0
    for token, part in table.groupby("token"):
        assert sorted(part["image"]) == list(range(n_eval)), token
    classes = info["data"]["classes"]
    assert (table["class"].astype(str) == [str(classes[i]) for i in table["label"]]).all()
    assert meta["config"]["embedding"] == "tsne"
    assert info["embedding"]["method"] == "tsne" and info["embedding"]["points"] == n_eval
    assert 0 <= info["embedding"]["tokens"]["cls"]["scores_on_full_features"]["knn_accuracy"] <= 1
    assert (out / "figures" / "embedding.png").stat().st_size > 20000
    assert (out / "figures" / "embedding.svg").exists()

    result = _probe(tmp_path, "none", "--embedding", "none")
    assert result.exit_code == 0, result.output
    out = tmp_path / "none"
    assert not (out / "embedding.csv").exists() and not list((out / "figures").glob("embedding.*"))
    assert json.loads((out / "run.json").read_text())["models"]["test_vit"]["embedding"] is None


def test_probe_refuses_an_unknown_embedding_in_one_line(tmp_path):
    result = _probe(tmp_path, "bad", "--embedding", "umap")
    assert result.exit_code == 2
    assert "--embedding takes tsne, pca, none, got 'umap'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "bad").exists()
