"""scripts/bench_paper_regime.py on tiny synthetic runs: records in the common shape, the
paper's headline beside them, and a second dataset's records kept when one is rerun."""

import importlib.util
import json

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("bench_paper_regime",
                                               ROOT / "scripts" / "bench_paper_regime.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_the_benchmark_records_both_methods_with_their_final_models(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "paper_regime.json").write_text(json.dumps(
        {"command": "x", "machine": {}, "results": [{"dataset": "cifar10", "method": "none"}]}))
    bench.main(["dataset=synthetic", "trainer.max_steps=12", "trainer.prune_every=4",
                "--runs", str(tmp_path / "runs"), "--out", str(out)])
    data = json.loads((out / "paper_regime.json").read_text())
    assert data["paper"] == {"float_bits_pct": 3.0, "weights_left_pct": 18.0}
    rows = {(r["dataset"], r["method"]): r for r in data["results"]}
    assert set(rows) == {("cifar10", "none"), ("fashion_mnist", "none"),
                         ("fashion_mnist", "self_compress")}
    sc, fl = rows["fashion_mnist", "self_compress"], rows["fashion_mnist", "none"]
    assert fl["flops_left_pct"] == 100.0 and fl["bits_per_weight"] == 32.0
    assert sc["bits_per_weight"] < 32 and 0 < sc["flops"] <= sc["flops_original"]
    assert sc["wall_time_ratio_vs_float"] == sc["wall_time_s"] / fl["wall_time_s"]
    assert (out / "paper_regime.png").stat().st_size > 0
