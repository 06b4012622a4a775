"""The shard format and the streaming datamodule: round trips, alignment across snapshots, bad input."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch

from data.datamodule import ActivationDataModule
from data.format import DatasetWriter, FormatError, Snapshot, iter_samples, npy_bytes, read_manifest, sha256_file
from tests.conftest import token_tags, write_toy_dataset


def all_batches(dm: ActivationDataModule, train: bool, n: int | None = None) -> torch.Tensor:
    loader = dm.train_dataloader() if train else dm.val_dataloader()
    out = []
    for i, batch in enumerate(loader):
        if n is not None and i >= n:
            break
        out.append(batch)
    return torch.cat(out)


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_shard_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    written = [(rng.standard_normal((8, 2, 4)).astype(np.float32) * 3, rng.integers(0, 50, 8)) for _ in range(5)]
    with DatasetWriter(tmp_path, model="m", hook_point="h", snapshots=[Snapshot("step0", 0), Snapshot("step8", 8)],
                       d_model=4, tokens_per_sample=8, dtype=dtype, samples_per_shard=2) as w:
        for i, (acts, tokens) in enumerate(written):
            w.write(acts, tokens, doc=i, start=3 * i)
    m = read_manifest(tmp_path)
    assert [e.samples for e in m.shards] == [2, 2, 1] and m.n_tokens == 40
    assert all(sha256_file(tmp_path / e.file) == e.sha256 for e in m.shards)
    tol = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 0}[dtype]
    got = list(iter_samples(tmp_path))
    for (acts, tokens), (stored, stored_tokens, meta), i in zip(written, got, range(5)):
        from data.format import from_storage
        np.testing.assert_allclose(from_storage(stored, dtype), acts, rtol=tol, atol=tol)
        np.testing.assert_array_equal(stored_tokens, tokens)
        assert meta == {"doc": i, "start": 3 * i}
    # statistics describe exactly what readers get back
    all_acts = np.concatenate([from_storage(s, dtype) for s, _, _ in got]).astype(np.float64)
    assert m.stats["step8"].mean_norm == pytest.approx(np.linalg.norm(all_acts[:, 1], axis=-1).mean(), rel=1e-6)
    np.testing.assert_allclose(m.stats["step0"].mean, all_acts[:, 0].mean(0), rtol=1e-6, atol=1e-9)
    assert not list(tmp_path.glob("*.tmp"))


def test_tokens_stay_aligned_across_snapshots_through_the_shuffle(tmp_path):
    # every snapshot of a token carries its own value, (token id, s): a row that mixes tokens across
    # snapshots, or permutes the snapshot axis, cannot pass (with acts[:, s] = (s + 1) * acts[:, 0] alone it could)
    data = write_toy_dataset(tmp_path / "tagged", tag_tokens=True)
    dm = ActivationDataModule(data, batch_size=64, shuffle_buffer=256, val_shards=1, num_workers=0)
    dm.setup()
    batch = all_batches(dm, train=True, n=20)  # 1280 tokens: more than one pass over the 3 train shards
    assert batch.shape == (1280, 3, 16) and batch.dtype == torch.float32
    token, snapshot = token_tags(batch, 3)
    assert (token == token[:, :1]).all(), "a batch row holds snapshots of different tokens"
    assert (snapshot == torch.arange(3)).all(), "the snapshot axis is out of order"
    assert len(token[:, 0].unique()) > 900 and token.max() < 960  # many distinct training tokens, none held out
    assert not torch.equal(token[:960, 0], token[:960, 0].sort().values)  # and they were shuffled
    for s in range(3):  # the rest of the vector: acts[:, s] == (s + 1) * acts[:, 0]
        torch.testing.assert_close(batch[:, s, 1:], (s + 1) * batch[:, 0, 1:], rtol=1e-5, atol=1e-5)
    # a snapshot subset in another order keeps the alignment and the order asked for
    dm = ActivationDataModule(data, snapshots=["step4", "step0"], batch_size=64, shuffle_buffer=256, num_workers=0)
    dm.setup()
    token, snapshot = token_tags(all_batches(dm, train=True, n=5), 3)
    assert (token[:, 0] == token[:, 1]).all() and (snapshot == torch.tensor([2, 0])).all()


def test_train_stream_shuffles_tokens_and_covers_each_epoch(toy_dataset):
    dm = ActivationDataModule(toy_dataset, batch_size=32, shuffle_buffer=128, val_shards=1, num_workers=0)
    dm.setup()
    train_tokens = 30 * 32  # 3 train shards x 10 samples x 32 tokens
    stream = all_batches(dm, train=True, n=train_tokens // 32)
    ordered = torch.cat([torch.from_numpy(a[:, :, :].astype(np.float32)) for a, _, _ in
                         iter_samples(toy_dataset, shards=dm.train_entries)])
    assert not torch.equal(stream, ordered)  # shuffled...
    # ...but the first epoch's tokens are a permutation of the training tokens (sorted by a fingerprint)
    key = lambda t: t[:, 0] @ torch.linspace(1, 2, 16)
    assert torch.allclose(key(stream).sort().values, key(ordered).sort().values, atol=1e-4)


def test_validation_is_the_held_out_shard_in_order(toy_dataset):
    dm = ActivationDataModule(toy_dataset, batch_size=32, val_shards=1, val_tokens=None, num_workers=0)
    dm.setup()
    assert [e.file for e in dm.val_entries] == ["shard-000003.tar"]
    val = all_batches(dm, train=False)
    held_out = torch.cat([torch.from_numpy(a) for a, _, _ in iter_samples(toy_dataset, shards=dm.val_entries)])
    torch.testing.assert_close(val, held_out)


def test_snapshot_subset_and_normalisation_scale(toy_dataset):
    dm = ActivationDataModule(toy_dataset, snapshots=["step4", "step0"], batch_size=32, num_workers=0)
    dm.setup()
    assert dm.snapshot_names == ["step4", "step0"] and dm.n_snapshots == 2
    batch = all_batches(dm, train=False, n=1)
    torch.testing.assert_close(batch[:, 0], 3 * batch[:, 1], rtol=1e-5, atol=1e-5)
    m = read_manifest(toy_dataset)
    expected = [math.sqrt(16) / m.stats[n].mean_norm for n in ["step4", "step0"]]
    np.testing.assert_allclose(dm.norm_scale().numpy(), expected, rtol=1e-6)
    with pytest.raises(FormatError, match=r"data.snapshots: \['step3'\] not in the cached snapshots"):
        ActivationDataModule(toy_dataset, snapshots=["step3"]).setup()


@pytest.mark.parametrize("workers", [2, 3])
def test_dataloader_workers_split_shards_without_loss(tmp_path, workers):
    """With several training workers every training token of an epoch is read exactly once, across workers."""
    data = write_toy_dataset(tmp_path / "tagged", tag_tokens=True)  # shards 0-2 train (tokens 0..959), 3 held out
    dm = ActivationDataModule(data, batch_size=32, shuffle_buffer=128, val_shards=1, val_tokens=None,
                              num_workers=workers)
    dm.setup()
    # each worker's share of an epoch is 960 / workers tokens, a whole number of batches, so the DataLoader's
    # round robin hands out epoch 0 as the first 30 batches and epoch 1 as the next 30
    token, _ = token_tags(all_batches(dm, train=True, n=60), 3)
    for epoch in (token[:960, 0], token[960:, 0]):
        torch.testing.assert_close(epoch.sort().values, torch.arange(960))  # each training token once
    assert not torch.equal(token[:960, 0], token[960:, 0])  # reshuffled between epochs
    # validation (one worker at most) yields every held-out token exactly once, in stored order
    token, _ = token_tags(all_batches(dm, train=False), 3)
    torch.testing.assert_close(token[:, 0], torch.arange(960, 1280))


def test_recorded_split_decides_validation_and_the_statistics_come_from_training_shards(tmp_path):
    data = write_toy_dataset(tmp_path / "split", split={"val_shards": 2, "rule": "test"})  # shards 0-1 train, 2-3 val
    m = read_manifest(data)
    assert m.recorded_val_shards == 2 and json.loads((data / "manifest.json").read_text())["split"]["rule"] == "test"
    dm = ActivationDataModule(data, batch_size=32, num_workers=0)  # data.val_shards=null: the recorded split
    dm.setup()
    assert [e.file for e in dm.val_entries] == ["shard-000002.tar", "shard-000003.tar"]
    train = np.concatenate([a for a, _, _ in iter_samples(data, shards=dm.train_entries)]).astype(np.float64)
    every = np.concatenate([a for a, _, _ in iter_samples(data)]).astype(np.float64)
    np.testing.assert_allclose(dm.norm_scale().numpy(), 4 / np.linalg.norm(train, axis=-1).mean(0), rtol=1e-6)
    np.testing.assert_allclose(dm.raw_mean().numpy(), train.mean(0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(dm.raw_mean().numpy(), every.mean(0), rtol=1e-3, atol=1e-4)  # validation left out
    with pytest.raises(FormatError, match=r"manifest.json: data.val_shards=1, but this dataset holds out its last 2 "
                                          r"shard\(s\) for validation"):
        ActivationDataModule(data, val_shards=1).setup()
    ActivationDataModule(data, val_shards=2).setup()  # the same number is fine


def test_manifest_without_training_statistics_falls_back_with_a_warning_naming_it(toy_dataset, caplog):
    """A manifest written before train_stats existed (or by hand) still trains, and says what that costs."""
    assert "train_stats" not in json.loads((toy_dataset / "manifest.json").read_text())
    dm = ActivationDataModule(toy_dataset, batch_size=32, num_workers=0)
    with caplog.at_level("WARNING", logger="data.datamodule"):
        dm.setup()
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and str(toy_dataset / "manifest.json") in warning[0]
    assert "include the 1 validation shard(s)" in warning[0] and "no recorded 'split'" in warning[0]
    assert len(dm.val_entries) == 1  # the last shard, data.val_shards' default
    m = read_manifest(toy_dataset)
    np.testing.assert_allclose(dm.norm_scale().numpy(), [4 / m.stats[n].mean_norm for n in m.snapshot_names])
    edit_manifest(toy_dataset, lambda d: d.update(train_stats=d["stats"]))
    with pytest.raises(FormatError, match="'train_stats' needs a 'split'"):
        read_manifest(toy_dataset)
    edit_manifest(toy_dataset, lambda d: d.update(split={"val_shards": 4}))
    with pytest.raises(FormatError, match=r"split.val_shards is 4; it must be in 1..3"):
        read_manifest(toy_dataset)


# ---- bad input: one clear line naming the file ----------------------------------------------------
def read_all(folder, **kw):
    dm = ActivationDataModule(folder, batch_size=16, num_workers=0, val_tokens=None, **kw)
    dm.setup()
    return all_batches(dm, train=False)


def edit_manifest(folder, fn):
    path = folder / "manifest.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(FormatError, match="no such dataset folder"):
        ActivationDataModule(tmp_path / "nope").setup()
    with pytest.raises(FormatError, match=r"manifest.json: missing"):
        ActivationDataModule(tmp_path).setup()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"manifest.json: not valid JSON"):
        ActivationDataModule(tmp_path).setup()


def test_manifest_with_missing_or_mistyped_key(toy_dataset):
    edit_manifest(toy_dataset, lambda d: d.pop("d_model"))
    with pytest.raises(FormatError, match=r"manifest.json: missing key 'd_model'"):
        read_manifest(toy_dataset)
    edit_manifest(toy_dataset, lambda d: d.update(d_model="16"))
    with pytest.raises(FormatError, match=r"key 'd_model' has str '16'"):
        read_manifest(toy_dataset)


def test_corrupt_shard_fails_its_sha256(toy_dataset):
    path = toy_dataset / "shard-000003.tar"
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"shard-000003.tar: sha256 differs"):
        read_all(toy_dataset)


def test_truncated_tar_is_caught_even_without_sha256(toy_dataset):
    path = toy_dataset / "shard-000003.tar"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(FormatError, match=r"shard-000003.tar: (corrupt or truncated tar|holds \d+ samples)"):
        read_all(toy_dataset, verify_sha256=False)


def test_missing_shard(toy_dataset):
    (toy_dataset / "shard-000001.tar").unlink()
    with pytest.raises(FormatError, match=r"shard-000001.tar: listed in manifest.json but missing"):
        ActivationDataModule(toy_dataset).setup()


def rewrite_first_sample(folder, acts: np.ndarray):
    """Replace the acts.npy of the first sample of the held-out shard, fixing the manifest digest."""
    path = folder / "shard-000003.tar"
    out = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for i, member in enumerate(src.getmembers()):
            payload = src.extractfile(member).read()
            if i == 0 and member.name.endswith("acts.npy"):
                payload = npy_bytes(acts)
                member.size = len(payload)
            dst.addfile(member, io.BytesIO(payload))
    path.write_bytes(out.getvalue())
    edit_manifest(folder, lambda d: d["shards"][3].update(sha256=sha256_file(path)))


def test_snapshots_with_a_different_width(toy_dataset):
    rewrite_first_sample(toy_dataset, np.zeros((32, 3, 12), np.float32))
    with pytest.raises(FormatError, match=r"shard-000003.tar: sample 00000000: acts.npy has D=12, manifest says 16"):
        read_all(toy_dataset)


def test_nan_activations(toy_dataset):
    acts = np.zeros((32, 3, 16), np.float32)
    acts[5, 1, 2] = np.nan
    rewrite_first_sample(toy_dataset, acts)
    with pytest.raises(FormatError, match=r"shard-000003.tar: sample 00000000: acts.npy holds NaN or Inf"):
        read_all(toy_dataset)


def test_writer_refuses_nan_and_float16_overflow(tmp_path):
    w = DatasetWriter(tmp_path, model="m", hook_point="h", snapshots=[Snapshot("step0", 0)], d_model=2,
                      tokens_per_sample=2, dtype="float16")
    with pytest.raises(FormatError, match="NaN/Inf"):
        w.write(np.array([[[np.nan, 0]], [[0, 0]]]), np.zeros(2), doc=0, start=0)
    with pytest.raises(FormatError, match="exceed the float16 range"):
        w.write(np.array([[[1e6, 0]], [[0, 0]]]), np.zeros(2), doc=0, start=0)


def test_too_few_shards_for_a_held_out_set(tmp_path):
    folder = write_toy_dataset(tmp_path / "one", n_samples=5, samples_per_shard=10)
    with pytest.raises(FormatError, match="1 shard\\(s\\) cannot hold out data.val_shards=1"):
        ActivationDataModule(folder).setup()


def test_hand_written_dataset_with_numpy_and_webdataset_trains_as_is(tmp_path):
    """docs/FORMAT.md promises that a folder written by hand with numpy + webdataset needs no other step."""
    import hashlib

    import webdataset as wds

    rng = np.random.default_rng(0)
    T, S, D = 16, 2, 8
    shards, all_acts = [], []
    for k in range(2):
        name = f"shard-{k:06d}.tar"
        with wds.TarWriter(str(tmp_path / name)) as sink:
            for i in range(4):
                acts = rng.standard_normal((T, S, D)).astype(np.float16)
                all_acts.append(acts.astype(np.float64))
                sink.write({"__key__": f"{k}_{i}", "acts.npy": acts, "tokens.npy": np.arange(T, dtype=np.int32),
                            "json": {"doc": i, "start": 0}})
        shards.append({"file": name, "samples": 4, "tokens": 4 * T,
                       "sha256": hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()})
    a = np.concatenate(all_acts)
    manifest = {"format_version": 1, "model": "hand", "hook_point": "x", "d_model": D, "dtype": "float16",
                "tokens_per_sample": T, "snapshots": [{"name": "step0", "step": 0}, {"name": "step1", "step": 1}],
                "shards": shards,
                "stats": {n: {"mean_norm": float(np.linalg.norm(a[:, s], axis=-1).mean()), "mean": a[:, s].mean(0).tolist()}
                          for s, n in enumerate(["step0", "step1"])}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    dm = ActivationDataModule(tmp_path, batch_size=8, num_workers=0, val_tokens=None)
    dm.setup()
    assert all_batches(dm, train=False).shape == (64, 2, 8)
    assert all_batches(dm, train=True, n=3).shape == (24, 2, 8)


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    from data.format import atomic_path, write_atomic
    target = tmp_path / "table.csv"
    write_atomic(target, "old\n")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("writer died")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent  # a rename within one folder: atomic
        tmp.write_text("new\n")
        assert target.read_text() == "old\n"  # readers see the old file until the block ends
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    with atomic_path(tmp_path / "a.npz", suffix=".npz") as tmp:  # np.savez keeps a name that ends in .npz
        np.savez_compressed(tmp, x=np.arange(3))
    assert list(np.load(tmp_path / "a.npz")["x"]) == [0, 1, 2]
