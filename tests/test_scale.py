"""serve_bench.scale: synthetic catalogs keep the real rows and the real per-dimension statistics; the scale
report has one row per size x mode with its fields, exact recall 1.0, and renders (table, plot, bench link).
Tiny sizes (2,000 and 5,000 items) on the shared tiny export: seconds. No wall-clock assertions."""
import json

import numpy as np
import pytest

from export.item_table import load_table
from serve_bench import scale as S
from serve_bench.report import load_scale_summary, scale_section

ROW_FIELDS = ("items", "mode", "p50_ms", "p90_ms", "p99_ms", "batch_p50_ms", "throughput_rps", "encoder_p50_ms",
              "search_p50_ms", "recall_at_k", "table_bytes", "index_bytes", "rss_delta_mb", "build_seconds",
              "load_seconds")


@pytest.fixture(scope="module")
def real(serving_export):
    """The tiny export's item table (40 real rows)."""
    return load_table(serving_export.onnx_dir / "items")


def _requests(serving_export, n=12, seed=0):
    """Raw-id histories of distinct real items with ratings 1..5 (the tiny model reads ratings)."""
    rng = np.random.default_rng(seed)
    ids = serving_export.item_ids
    hist = [[ids[i] for i in rng.choice(len(ids), size=serving_export.max_history, replace=False)] for _ in range(n)]
    rates = [rng.integers(1, 6, size=len(h)).astype(float).tolist() for h in hist]
    return hist, rates


def test_synthetic_arrays_keep_real_rows_first_and_the_per_dim_statistics(real):
    arrays = {k: np.asarray(real.arrays[k]) for k in S.SERVED_ARRAYS + ("popularity",)}
    syn = S.synthetic_arrays(arrays, 5000, seed=0)
    n_real = real.n_items
    for name, a in arrays.items():
        assert syn[name].shape == (5000,) + a.shape[1:] and syn[name].dtype == a.dtype
        assert np.array_equal(syn[name][:n_real], a), name  # real rows untouched, first
    assert syn["active"].all() and syn["active"].shape == (5000,)
    for name in ("vectors", "rating", "like", "bias"):
        a, s = arrays[name], syn[name]
        std_real, std_syn = a.std(axis=0), s.std(axis=0)
        np.testing.assert_allclose(std_syn, std_real, rtol=0.12, err_msg=name)  # not inflated by the noise
        assert np.all(np.abs(s.mean(axis=0) - a.mean(axis=0)) <= 0.15 * std_real + 1e-6), name
    # the copies are noisy (not the real rows repeated) and seeded
    assert not np.array_equal(syn["vectors"][n_real:n_real + 5], syn["vectors"][:5])
    assert not np.array_equal(S.synthetic_arrays(arrays, 5000, seed=1)["vectors"][n_real:], syn["vectors"][n_real:])
    with pytest.raises(ValueError, match="smaller than the real table"):
        S.synthetic_arrays(arrays, n_real - 1)
    with pytest.raises(ValueError, match="noise"):
        S.synthetic_arrays(arrays, 100, noise=1.5)


def test_synthetic_catalog_folder_is_servable(serving_export, tmp_path):
    from export.runtime import Recommender
    folder = S.write_synthetic_catalog(serving_export.onnx_dir, tmp_path / "cat", 2000, seed=0)
    t = load_table(folder / "items")
    assert t.n_items == 2000 and t.ids[:len(serving_export.item_ids)] == serving_export.item_ids
    assert t.ids[-1] == "syn1999" and "text" not in t.arrays and t.meta["trained_items"] == serving_export.n_items
    rec = Recommender(folder, mode="two_part", retrieval="exact", intra_op_threads=1)
    hist, rates = _requests(serving_export, n=1)
    got = rec.recommend(hist[0], ratings=rates[0], k=10)
    assert len(got) == 10 and not set(i for i, _ in got) & set(hist[0])  # seen items excluded


def test_scale_report_rows_fields_recall_and_files(serving_export, tmp_path):
    pytest.importorskip("faiss")
    hist, rates = _requests(serving_export)
    rep = S.run_scale_bench(tmp_path, sizes=(5000, 2000), requests=(hist, rates), onnx_dir=serving_export.onnx_dir,
                            batch=4, min_samples=5, min_seconds=0.0, ann_params=dict(index_type="hnsw", M=16,
                                                                                       ef_construction=40,
                                                                                       ef_search=64))
    rows = rep["rows"]
    assert [(r["items"], r["mode"]) for r in rows] == [(2000, "exact"), (2000, "ann"), (5000, "exact"), (5000, "ann")]
    for r in rows:
        for f in ROW_FIELDS:
            assert f in r, f
        assert r["p50_ms"] > 0 and r["throughput_rps"] > 0 and r["table_bytes"] > 0 and 0.0 <= r["recall_at_k"] <= 1.0
    assert all(r["recall_at_k"] == 1.0 for r in rows if r["mode"] == "exact")
    ann = [r for r in rows if r["mode"] == "ann"]
    assert all(r["retriever"] == "ann" and r["index_bytes"] > 0 and r["params"]["M"] == 16 for r in ann)
    assert rep["target"]["met"] is None  # no 10^6 row here
    out = tmp_path / "bench" / "scale"
    assert json.loads((out / "report.json").read_text())["rows"] == json.loads(json.dumps(rows))
    md = (out / "report.md").read_text()
    assert "| 2,000 | exact |" in md and "| 5,000 | ann |" in md and "recall@10" in md and "Load average" in md
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the bench report links it
    summary = load_scale_summary(tmp_path)
    assert summary["report_md"] == "scale/report.md" and len(summary["rows"]) == 4
    line = scale_section({"scale": summary})
    assert "[scale/report.md](scale/report.md)" in line and "not measured" in line
    assert "Not run" in scale_section({}) and load_scale_summary(tmp_path / "nowhere") is None


def test_exact_only_run_and_a_bench_report_it_cannot_render(serving_export, tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "report.json").write_text('{"an": "older report"}')
    hist, rates = _requests(serving_export, n=4)
    rep = S.run_scale_bench(tmp_path, sizes=(2000,), modes=("exact",), requests=(hist, rates),
                            onnx_dir=serving_export.onnx_dir, batch=2, min_samples=3, min_seconds=0.0)
    assert [r["mode"] for r in rep["rows"]] == ["exact"] and rep["rows"][0]["recall_at_k"] == 1.0
    assert (tmp_path / "bench" / "report.json").read_text() == '{"an": "older report"}'  # left as it was
    with pytest.raises(ValueError, match="modes"):
        S.run_scale_bench(tmp_path, sizes=(2000,), modes=("fast",), requests=(hist, rates),
                          onnx_dir=serving_export.onnx_dir)


def test_parse_sizes():
    assert S.parse_sizes("1e4, 1e5,1_000_000") == [10_000, 100_000, 1_000_000]
    for bad in ("ten", "0", "1.5"):
        with pytest.raises(ValueError):
            S.parse_sizes(bad)
