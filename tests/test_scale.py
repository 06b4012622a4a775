"""bench/scale.py: the memory model's numbers against hand computations and a measurement, the paper presets'
predictions, and bench/gpu_check's pipeline (CPU smoke at tiny shapes; its CUDA run needs a GPU)."""

from __future__ import annotations

import json

import pytest

from bench import scale
from tests.conftest import compose_train


def test_paper_pythia160m_fits_one_h200_with_no_activation_on_disk(tmp_path):
    cfg = compose_train(["experiment=paper_pythia160m"], tmp_path)
    assert cfg.data._target_ == "data.live.LiveActivationDataModule" and "path" not in cfg.data  # live: no cache
    shape = scale.shape_from_config(cfg)
    assert (shape.S, shape.D, shape.F, shape.batch, shape.devices) == (32, 768, 98304, 4096, 1)  # the paper's batch
    p = scale.predict(shape, "H200 141GB")
    # by hand: W_enc and W_dec 32 x 768 x 98,304 each, b_enc and log_threshold 98,304 each, b_dec 32 x 768
    n = 2 * 2_415_919_104 + 2 * 98_304 + 24_576
    assert p["crosscoder_params"] == n == 4_832_059_392
    assert p["persistent_bytes"] == 16 * n == 77_312_950_272  # fp32 weights, gradients, Adam m and v
    # 32 snapshots of embedding (50,304 x 768) + 7 blocks (12 x 768^2 + 13 x 768) + final LayerNorm, in bf16
    assert p["snapshot_model_params"] == 50_304 * 768 + 7 * (12 * 768 ** 2 + 13 * 768) + 2 * 768 == 88_250_112
    assert p["snapshot_models_bytes"] == 32 * 2 * 88_250_112
    assert p["block_bytes"] == (262_144 + 2047) * 32 * 768 * 2  # block + the carried window, bf16
    assert p["activation_disk_bytes_live"] == 0
    assert p["activation_disk_bytes_shards"] == 800_000_000 * 32 * 768 * 2
    for path in ("dense", "passed"):  # the dense path runs from initialisation, the sparse one once the code is sparse
        assert p["paths"][path]["peak_bytes"] <= 141e9 and p["paths"][path]["fits"]
    assert shape.micro_batch == 4096  # the paper's batch in one step, no accumulation
    # the dense path snapshot by snapshot: 49 bytes per [B, F] element (no [B, S, F] tensor) and the batch's bf16
    # copy; not the 26 bytes per [B, S, F] element (335 GB) of a dense step that forms them
    B, S, D, F = 4096, 32, 768, 98304
    assert p["paths"]["dense"]["step_transient"] == 49 * B * F + 10 * B * S * D + 4 * F * D
    # the whole run on the sparse path: the window pass's GEMM and kernels included, with the snapshot forwards
    assert 8 < p["hours"]["passed"] < p["hours"]["passed_eager"] < p["hours"]["dense_eager"]
    assert p["hours"]["passed"] < p["hours"]["dense"] < p["hours"]["dense_eager"]
    assert p["hours"]["passed"] == pytest.approx(
        (p["steps"] * p["paths"]["passed"]["step_seconds"] + p["forward_hours"] * 3600) / 3600)
    # d_sae 32,768 on one 80 GB GPU
    assert scale.predict(scale.shape_from_config(cfg, 32768), "H100 SXM 80GB")["paths"]["dense"]["fits"]


def test_step_time_counts_the_window_pass():
    gpu = scale.GPUS["H200 141GB"]
    S, D, F, B = 32, 768, 98304, 4096
    listed = scale.step_time(S, D, F, B, B, "listed", gpu, 40, 48)
    passed = scale.step_time(S, D, F, B, B, "passed", gpu, 40, 48)
    eager = scale.step_time(S, D, F, B, B, "passed", gpu, 40, 48, compiled=False)
    # by hand: one more GEMM of 2 B S D F FLOPs, 8 bytes per [B, S, F] element and one read of W_dec (4 S D F bytes)
    assert passed["flops"] - listed["flops"] == 2 * B * S * D * F
    assert passed["traffic_bytes"] - listed["traffic_bytes"] == 8 * B * S * F + 4 * S * D * F
    assert eager["traffic_bytes"] - passed["traffic_bytes"] == (46 - 8) * B * S * F
    dense = scale.step_time(S, D, F, B, B, "dense", gpu)
    assert dense["flops"] == 10 * B * S * D * F


def test_paper_pythia69b_is_fsdp_over_8_gpus_with_rotated_snapshots(tmp_path):
    cfg = compose_train(["experiment=paper_pythia6.9b"], tmp_path)
    assert cfg.trainer.strategy._target_.endswith("FSDPStrategy") and cfg.trainer.devices == 8
    assert cfg.data.placement == "rotate" and cfg.model.layer == 16 and cfg.crosscoder.d_sae == 32768
    assert cfg.crosscoder.resample_every == 0  # FSDP shards the rows resampling would rewrite (test_revival.py)
    shape = scale.shape_from_config(cfg)
    assert shape.batch == 4096 and shape.devices == 8
    p = scale.predict(shape, "H200 141GB")
    assert p["snapshot_model_params"] == 3_630_034_944 and p["placement"] == "rotate"
    one = scale.predict(scale.RunShape(**{**shape.__dict__, "devices": 1, "micro_batch": 256}), "H200 141GB")
    assert not one["paths"]["passed"]["fits"]  # one GPU: 137 GB of crosscoder state alone, plus everything else
    assert p["paths"]["dense"]["fits"] and p["paths"]["passed"]["fits"]  # 8 x H200, per device
    assert not scale.predict(shape, "H100 SXM 80GB")["paths"]["passed"]["fits"]  # 8 x 80 GB do not


@pytest.mark.parametrize("path", ["dense", "listed", "passed"])
def test_model_matches_a_measured_step(path):
    m = scale.measure_step(4, 32, 4096, 256, path)
    assert m["route"] == path
    assert scale.model_for(m)["peak_bytes"] == pytest.approx(m["peak_bytes"], rel=0.15)


def test_gpu_check_fails_fast_without_cuda(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from bench import gpu_check
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_check_pipeline_runs_at_tiny_shapes_on_cpu(tmp_path):
    from bench import gpu_check
    out = tmp_path / "smoke.json"
    assert gpu_check.main(["--cpu-smoke", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["S"] == 4 and r["accumulate"] == 2 and r["batches"] == 4 and r["path"] in ("dense", "listed", "passed")
    assert r["forward_tokens_per_s"] > 0 and r["step_tokens_per_s"] > 0 and r["predicted_peak_bytes"] > 0
