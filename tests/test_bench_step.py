"""The step benchmark on the CPU: its records, and the operation counts it exists to watch."""

import json

import bench_step


def test_step_benchmark_writes_every_record_and_counts_operations(tmp_path):
    bench_step.main(["--rounds", "1", "--steps", "1", "--no-compile", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "step.json").read_text())
    assert (tmp_path / "step.png").stat().st_size > 0
    records = {(r["model"], r["method"]): r for r in data["results"]}
    assert set(records) == {(m, k) for m in ("SmallCNN", "ResNet9") for k in bench_step.METHODS}
    for model in ("SmallCNN", "ResNet9"):
        float_ops = records[model, "none"]["ops_per_step"]
        sc = records[model, "self_compress"]
        # The fused quantizer's point: a self-compressing step dispatches at most 1.3x float's.
        assert sc["ops_per_step"] <= 1.3 * float_ops
        assert sc["step_ms"] > 0 and sc["quantizer_ms"] > 0 and sc["device"] == "cpu"
