"""evaluate.report and evaluate.profile: fakes with known answers, one real CLI run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from depthkd_core.evaluate.profile import count_macs, count_parameters, measure_latency, onnx_cost
from depthkd_core.evaluate.report import evaluate_model, to_markdown
from helpers import FASTDEPTH


def _predict(images: torch.Tensor) -> torch.Tensor:
    """Fake model: depth = 1 + 4 * red channel."""
    return 1.0 + 4.0 * images[:, :1]


def _sample(seed: int, gt_scale: float | None) -> dict:
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(seed))
    if gt_scale is None:
        depth, has = torch.zeros(1, 8, 8), False
    else:
        depth, has = _predict(image[None])[0] * gt_scale, True
    valid = depth > 0
    valid[0, 0, 0] = False  # an invalid pixel whose value must be ignored
    depth[0, 0, 0] = 7.0  # in range, so it would change the metrics if used
    return {"image": image, "depth": depth, "valid": valid, "has_depth": has,
            "intrinsics": torch.tensor([8.0, 8.0, 3.5, 3.5])}


# gt == pred (abs_rel 0), no depth (skipped), gt == pred / 2 (abs_rel 1)
FAKE = [_sample(0, 1.0), _sample(1, None), _sample(2, 0.5)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_evaluate_model_on_fakes(batch_size):
    m = evaluate_model(_predict, FAKE, batch_size=batch_size, progress=False)
    assert m["count"] == 2
    assert m["abs_rel"] == pytest.approx(0.5, rel=1e-6)
    assert m["delta1"] == pytest.approx(0.5)
    first = evaluate_model(_predict, FAKE, limit=1, progress=False)
    assert first["count"] == 1 and first["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    aligned = evaluate_model(_predict, FAKE, alignment="median", progress=False)
    assert aligned["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    inverse = evaluate_model(lambda x: 1.0 / _predict(x), FAKE, alignment="lsq", inverse=True,
                             progress=False)
    assert inverse["abs_rel"] == pytest.approx(0.0, abs=1e-5)


def test_evaluate_model_errors_and_module_mode():
    with pytest.raises(ValueError, match="no sample"):
        evaluate_model(_predict, [FAKE[1]], progress=False)
    with pytest.raises(ValueError, match="shape"):
        evaluate_model(lambda x: x[:, :1, :4], FAKE, progress=False)
    net = nn.Sequential(nn.Conv2d(3, 1, 1), nn.Softplus())
    net.train()
    m = evaluate_model(net, FAKE, progress=False)
    assert net.training and math.isfinite(m["rmse"])


def test_to_markdown_exact():
    rows = [{"model": "a", "abs_rel": 0.123456, "count": 3},
            {"model": "b|c", "abs_rel": 1.0, "latency_ms": 12345.6}]
    assert to_markdown(rows) == (
        "| model | abs_rel | count | latency_ms |\n"
        "|---|---:|---:|---:|\n"
        "| a | 0.1235 | 3 |  |\n"
        "| b\\|c | 1.0000 |  | 12346 |\n")
    assert to_markdown(rows, columns=["abs_rel"]) == "| abs_rel |\n|---:|\n| 0.1235 |\n| 1.0000 |\n"
    with pytest.raises(ValueError):
        to_markdown([])


def test_count_macs_and_parameters_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_parameters(conv) == 8 * 3 * 3 * 3 + 8
    assert count_macs(conv, (1, 3, 16, 16)) == 8 * 16 * 16 * (3 * 3 * 3)
    depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
    assert count_parameters(depthwise) == 8 * 9
    assert count_macs(depthwise, (2, 8, 16, 16)) == 2 * 8 * 8 * 8 * 9
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    assert count_macs(linear, (4, 3, 2, 2)) == 4 * 12 * 5
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(conv, (3, 16, 16))


def test_measure_latency_keys_and_mode():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5))
    net.train()
    lat = measure_latency(net, (1, 3, 16, 16), warmup=1, runs=5)
    assert set(lat) == {"mean_ms", "median_ms", "p90_ms"}
    assert 0.0 < lat["median_ms"] <= lat["p90_ms"] and net.training
    with pytest.raises(ValueError, match="runs"):
        measure_latency(net, (1, 3, 16, 16), runs=0)


@pytest.mark.needs_shared
def test_cli_evaluate_real_fastdepth(tmp_path, capsys):
    from depthkd_core.cli import main
    from depthkd_core.data import simulator

    root = simulator.write_dataset(tmp_path / "sim", "target", n=3, height=120, width=160)
    out_json, out_md = tmp_path / "r" / "row.json", tmp_path / "r" / "table.md"
    code = main(["evaluate", "--model", str(FASTDEPTH), "--data", str(root), "--reader", "sim",
                 "--height", "224", "--width", "224", "--latency-runs", "2", "--no-progress",
                 "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    row = json.loads(out_json.read_text())
    assert row["count"] == 3 and row["alignment"] in ("none", "lsq")
    assert all(math.isfinite(row[k]) for k in ("abs_rel", "rmse", "silog", "latency_ms"))
    assert 0.0 <= row["delta1"] <= row["delta2"] <= row["delta3"] <= 1.0
    # counted from the ONNX graph: FastDepth (pruned, int8) is ~1.3-1.4 M params, 0.37 GMACs
    assert 1.3 <= row["params_M"] <= 1.4 and 0.36 <= row["GMACs"] <= 0.37
    table = out_md.read_text()
    assert "abs_rel" in table and table in capsys.readouterr().out


def test_onnx_cost_equals_the_torch_count(tmp_path):
    from depthkd_core.export import onnx_export as export
    from depthkd_core.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="mobilenetv2_050", decoder_channels=(32, 16, 16, 8))).eval()
    assert export.export_onnx(model, tmp_path / "s.onnx", 64, 96).passed
    params, macs = onnx_cost(tmp_path / "s.onnx", (1, 3, 64, 96))
    assert macs == count_macs(model, (1, 3, 64, 96))
    # the export folds BatchNorm into the convolutions: its gamma/beta are gone; a few
    # float constants (resize scales) are counted as weights
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert 0 <= params - (count_parameters(model) - bn) <= 20


def test_onnx_cost_unresolved_shapes_give_no_macs(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], [0.0] * 12)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["c"]), helper.make_node("MatMul", ["c", "x"], ["depth"])],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])],
        [helper.make_tensor_value_info("depth", TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    assert onnx_cost(tmp_path / "g.onnx", (1, 3, 8, 8)) == (12, None)


def test_reference_is_the_ground_truth_and_needs_no_labels():
    def doubled(images):
        return 2.0 * _predict(images)

    # against itself: perfect; the sample without depth counts too
    same = evaluate_model(_predict, FAKE, max_depth=100.0, progress=False, reference=_predict)
    assert same["count"] == 3 and same["abs_rel"] == 0.0 and same["delta1"] == 1.0
    # half the reference everywhere: abs_rel 0.5, no pixel within 1.25
    half = evaluate_model(_predict, FAKE, max_depth=100.0, progress=False, reference=doubled)
    assert half["abs_rel"] == pytest.approx(0.5) and half["delta1"] == 0.0


def test_cli_agreement_without_ground_truth(tmp_path):
    import cv2
    from helpers import write_linear_onnx

    from depthkd_core.cli import main

    rng = __import__("numpy").random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(2):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), rng.integers(0, 255, (32, 32, 3), "uint8"))
    model = write_linear_onnx(tmp_path / "m.onnx", scale=0.0, offset=2.0)
    teacher = write_linear_onnx(tmp_path / "t.onnx", scale=0.0, offset=4.0)
    out = tmp_path / "row.json"
    assert main(["evaluate", "--model", str(model), "--data", str(tmp_path / "images"), "--reader",
                 "images", "--height", "32", "--width", "32", "--teacher", str(teacher),
                 "--latency-runs", "0", "--no-progress", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert "abs_rel" not in row and row["agree_abs_rel"] == pytest.approx(0.5)
    assert row["agree_delta1"] == 0.0
