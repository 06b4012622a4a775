"""Synthetic multi-snapshot activations from a known sparse dictionary, and a score for recovering it.

Each true feature i has, at each snapshot s, a strength ``strength[i, s]`` in [0, 1] (0 = absent) and a
unit direction ``dirs[i, s]`` [D]. A token draws one sparse non-negative code c [F_true], shared by every
snapshot, and its activation at snapshot s is

    a_s = sum_i c_i * strength[i, s] * dirs[i, s] + noise_s                                   [D]

Feature categories (the paper's story in miniature):
- ``initial``:   present at snapshot 0; peaks at some snapshot; may fade out later.
- ``emergent``:  born at a later snapshot, peaks, then persists to the last snapshot.
- ``transient``: born after snapshot 0 and gone before the last snapshot.
A feature exists on the snapshots [birth, death) (death = S means it never dies); its strength is 1 at its
peak snapshot and in [min_strength, max_off_peak] elsewhere in that window, rising before the peak and
falling after it, so the peak is unambiguous. Directions turn by ``rotation`` radians between consecutive
snapshots (each step in a random plane).

The token id written to ``tokens.npy`` is the index of the token's largest code entry (its strongest
feature), or F_true when no feature fires, so analyses can condition on it (vocabulary F_true + 1).

    python -m data.synthetic out=<dir> [key=value ...]      # keys: the fields of SyntheticConfig
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data.format import DTYPES, DatasetWriter, Manifest, Snapshot, read_manifest, write_atomic
from data.snapshots import paper_steps

CATEGORIES = ("initial", "emergent", "transient")
TRUTH_TENSORS, TRUTH_JSON = "truth.safetensors", "truth.json"
# The paper's 32 Pythia snapshots; S snapshots are picked evenly along this (log-like) schedule.
PAPER_STEPS = paper_steps()
CHUNK_SAMPLES = 64  # samples generated per vectorised step (part of the seeding: changing it changes data)


@dataclasses.dataclass
class SyntheticConfig:
    n_snapshots: int = 4  # S: snapshots, named stepN with steps spread over the paper's schedule
    d_model: int = 64  # D: activation width
    n_features: int = 256  # F_true: features in the known dictionary
    mean_active: float = 5.0  # expected number of firing features per token (sum of firing probabilities)
    zipf_exponent: float = 0.5  # firing probability of the feature of frequency rank r is proportional to r^-this
    n_tokens: int = 3_000_000  # tokens to write, rounded up to whole samples
    tokens_per_sample: int = 128  # T: tokens per context window (one sample)
    samples_per_shard: int = 512  # samples per tar shard (512 x 128 x 4 x 64 float16 = 32 MiB)
    dtype: str = "float16"  # on-disk activation dtype: float16, float32 or bfloat16
    rotation: float = 0.1  # radians each feature direction turns between consecutive snapshots
    noise_std: float = 0.15  # Gaussian noise std per coordinate, relative to the snapshot's signal std per coordinate
    min_strength: float = 0.3  # lowest strength (peak = 1) at a snapshot where a feature exists
    max_off_peak: float = 0.8  # highest strength away from the peak snapshot (keeps the peak unambiguous)
    frac_initial: float = 0.25  # fraction of features present from snapshot 0
    frac_emergent: float = 0.5  # fraction born after snapshot 0 that persist to the end
    frac_transient: float = 0.25  # fraction born after snapshot 0 that die before the end
    seed: int = 0  # seeds the dictionary and every chunk of tokens
    val_shards: int = 1  # the last N shards are the validation split, recorded in the manifest with the statistics
    # of the other shards (train_stats): every token is an independent draw, so a shard is as held out as a document

    def check(self) -> None:
        """One-line ValueError naming the first bad field."""
        positive = ("n_snapshots", "d_model", "n_features", "n_tokens", "tokens_per_sample", "samples_per_shard")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"data.synthetic: {name}={getattr(self, name)} must be >= 1")
        S = self.n_snapshots
        if S > len(PAPER_STEPS):
            raise ValueError(f"data.synthetic: n_snapshots={S} exceeds the {len(PAPER_STEPS)} steps of the schedule")
        if self.dtype not in DTYPES:
            raise ValueError(f"data.synthetic: dtype='{self.dtype}' is not one of {DTYPES}")
        if not 0 < self.mean_active < self.n_features:
            raise ValueError(f"data.synthetic: mean_active={self.mean_active} must be in (0, n_features)")
        if self.firing_probability().max() > 1:
            raise ValueError(f"data.synthetic: mean_active={self.mean_active} with zipf_exponent="
                             f"{self.zipf_exponent} gives a firing probability above 1")
        if not 0 < self.min_strength <= self.max_off_peak < 1:
            raise ValueError(f"data.synthetic: need 0 < min_strength={self.min_strength} <= "
                             f"max_off_peak={self.max_off_peak} < 1")
        if min(self.rotation, self.noise_std, self.frac_initial, self.frac_emergent, self.frac_transient) < 0:
            raise ValueError("data.synthetic: rotation, noise_std and frac_* must be >= 0")
        fracs = self.frac_initial + self.frac_emergent + self.frac_transient
        if abs(fracs - 1) > 1e-6:
            raise ValueError(f"data.synthetic: frac_initial + frac_emergent + frac_transient = {fracs:g}, not 1")
        n_init, n_emerg, n_trans = self.category_counts()
        if n_emerg and S < 2 or n_trans and S < 3:
            raise ValueError(f"data.synthetic: n_snapshots={S} is too few for emergent (>= 2) / transient (>= 3) features")

    def category_counts(self) -> tuple[int, int, int]:
        n_init, n_trans = round(self.frac_initial * self.n_features), round(self.frac_transient * self.n_features)
        return n_init, self.n_features - n_init - n_trans, n_trans

    def firing_probability(self) -> np.ndarray:
        """[F_true] by frequency rank (most frequent first): Zipf-like, summing to mean_active."""
        w = np.arange(1, self.n_features + 1, dtype=np.float64) ** -self.zipf_exponent
        return self.mean_active * w / w.sum()

    def snapshots(self) -> list[Snapshot]:
        idx = np.round(np.linspace(0, len(PAPER_STEPS) - 1, self.n_snapshots)).astype(int)
        return [Snapshot(f"step{PAPER_STEPS[i]}", PAPER_STEPS[i]) for i in idx]


@dataclasses.dataclass
class Truth:
    """The known dictionary behind a synthetic dataset. Axes: F_true features, S snapshots, D width."""

    directions: np.ndarray  # [F_true, S, D] float32 unit direction of feature i at snapshot s (defined everywhere)
    strength: np.ndarray  # [F_true, S] float32 in [0, 1]; 0 = absent, 1 at the peak snapshot
    birth: np.ndarray  # [F_true] int64 first snapshot where the feature exists
    peak: np.ndarray  # [F_true] int64 snapshot of maximal strength (unique)
    death: np.ndarray  # [F_true] int64 first snapshot after birth where it is absent again (S = never)
    category: np.ndarray  # [F_true] int64 index into CATEGORIES
    frequency: np.ndarray  # [F_true] float64 firing probability per token
    noise_std: np.ndarray  # [S] float64 absolute per-coordinate noise std at each snapshot
    fires: np.ndarray  # [F_true] int64 tokens on which the feature fired in the written data (0 before writing)
    config: SyntheticConfig

    @property
    def exists(self) -> np.ndarray:
        """[F_true, S] bool: the feature is present (strength > 0)."""
        return self.strength > 0

    def atoms(self) -> np.ndarray:
        """[F_true, S, D] float32: strength * direction, the vector a unit code entry adds."""
        return self.directions * self.strength[..., None]


def _profile(rng: np.random.Generator, cfg: SyntheticConfig, birth: int, peak: int, death: int) -> np.ndarray:
    """[S] strengths: 1 at peak, sorted draws in [min_strength, max_off_peak] rising before it and falling after."""
    s = np.zeros(cfg.n_snapshots)
    s[peak] = 1.0
    s[birth:peak] = np.sort(rng.uniform(cfg.min_strength, cfg.max_off_peak, peak - birth))
    s[peak + 1:death] = np.sort(rng.uniform(cfg.min_strength, cfg.max_off_peak, death - peak - 1))[::-1]
    return s


def make_truth(cfg: SyntheticConfig) -> Truth:
    """Draw the dictionary (profiles, rotating directions, frequencies) from ``cfg.seed``."""
    cfg.check()
    rng = np.random.default_rng([cfg.seed, 0])
    F, S, D = cfg.n_features, cfg.n_snapshots, cfg.d_model
    category = np.repeat(np.arange(3), cfg.category_counts())
    birth, peak, death = (np.zeros(F, np.int64) for _ in range(3))
    strength = np.zeros((F, S))
    for i, cat in enumerate(category):
        if cat == 0:  # initial: born at 0, peaks anywhere, dies anywhere after the peak (or never)
            b = 0
            p = rng.integers(0, S)
            d = rng.integers(p + 1, S + 1)
        elif cat == 1:  # emergent: born after 0, persists
            b = rng.integers(1, S)
            p = rng.integers(b, S)
            d = S
        else:  # transient: born after 0, dead before the end
            b = rng.integers(1, S - 1)
            d = rng.integers(b + 1, S)
            p = rng.integers(b, d)
        birth[i], peak[i], death[i] = b, p, d
        strength[i] = _profile(rng, cfg, b, p, d)
    # Random unit vectors: nearly (not exactly) orthogonal; each snapshot turns them by `rotation` in a
    # random plane: d' = cos(t) d + sin(t) w, w a unit vector orthogonal to d.
    dirs = np.zeros((F, S, D))
    dirs[:, 0] = _unit(rng.standard_normal((F, D)))
    for s in range(1, S):
        w = rng.standard_normal((F, D))
        w = _unit(w - (w * dirs[:, s - 1]).sum(-1, keepdims=True) * dirs[:, s - 1])
        dirs[:, s] = _unit(math.cos(cfg.rotation) * dirs[:, s - 1] + math.sin(cfg.rotation) * w)
    frequency = rng.permutation(cfg.firing_probability())  # so frequency is unrelated to index or category
    # Code magnitudes are Exponential(1): Var(c * fired) = 2p - p^2 per feature, features independent.
    signal_var = ((2 * frequency - frequency ** 2)[:, None] * strength ** 2).sum(0)  # [S] trace of covariance
    noise_std = cfg.noise_std * np.sqrt(signal_var / D)
    return Truth(directions=dirs.astype(np.float32), strength=strength.astype(np.float32), birth=birth,
                 peak=peak, death=death, category=category.astype(np.int64), frequency=frequency,
                 noise_std=noise_std, fires=np.zeros(F, np.int64), config=cfg)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def sample_chunk(truth: Truth, chunk: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens of chunk ``chunk`` (its own seeded stream). Returns acts [N, S, D] float32, tokens [N] int32,
    fired [N, F_true] bool."""
    cfg = truth.config
    rng = np.random.default_rng([cfg.seed, 1, chunk])
    F, S, D = truth.strength.shape[0], cfg.n_snapshots, cfg.d_model
    fired = rng.random((n_tokens, F), dtype=np.float32) < truth.frequency.astype(np.float32)
    code = rng.standard_exponential((n_tokens, F), dtype=np.float32) * fired  # [N, F_true], shared by all s
    # One matmul for every snapshot: [N, F] @ [F, S*D]; absent features have strength 0 and add nothing.
    acts = (code @ truth.atoms().reshape(F, S * D)).reshape(n_tokens, S, D)
    acts += rng.standard_normal((n_tokens, S, D), dtype=np.float32) * truth.noise_std[:, None].astype(np.float32)
    tokens = np.where(fired.any(1), code.argmax(1), F).astype(np.int32)
    return acts, tokens, fired


def normalisation(truth: Truth, chunk: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale [S], raw mean [S, D]) from chunk ``chunk`` of ``n_tokens`` tokens, in float64, as the datamodule
    normalises: scale brings each snapshot's mean activation norm to sqrt(D). For benchmarks that draw batches from
    the generator in memory instead of reading a written dataset."""
    acts = sample_chunk(truth, chunk, n_tokens)[0].astype(np.float64)
    return math.sqrt(truth.config.d_model) / np.linalg.norm(acts, axis=-1).mean(0), acts.mean(0)


def generate(cfg: SyntheticConfig, out: str | Path) -> Manifest:
    """Write a dataset (shards + manifest) and its ground truth (truth.safetensors, truth.json) to ``out``."""
    out = Path(out)
    truth = make_truth(cfg)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"data.synthetic: out={out} is not empty; choose a new folder")
    T = cfg.tokens_per_sample
    n_samples = -(-cfg.n_tokens // T)
    n_shards = -(-n_samples // cfg.samples_per_shard)
    # checked here, not in check(): in-memory uses of a config (bench.frontier) write no shards
    if cfg.val_shards < 1 or cfg.val_shards >= n_shards:
        raise ValueError(f"data.synthetic: val_shards={cfg.val_shards} needs 1 <= val_shards < shards; n_tokens="
                         f"{cfg.n_tokens} makes {n_shards} shard(s) of samples_per_shard={cfg.samples_per_shard}")
    writer = DatasetWriter(out, model="synthetic", hook_point="synthetic", snapshots=cfg.snapshots(),
                           d_model=cfg.d_model, tokens_per_sample=T, dtype=cfg.dtype,
                           samples_per_shard=cfg.samples_per_shard, extra={"generator": dataclasses.asdict(cfg)},
                           split=dict(rule="independent_samples", val_shards=cfg.val_shards))
    with writer, tqdm(total=n_samples * T, unit="tok", unit_scale=True, desc=f"synthetic -> {out}") as bar:
        for chunk, first in enumerate(range(0, n_samples, CHUNK_SAMPLES)):
            n = min(CHUNK_SAMPLES, n_samples - first)
            acts, tokens, fired = sample_chunk(truth, chunk, n * T)
            truth.fires += fired.sum(0)
            for k in range(n):
                writer.write(acts[k * T:(k + 1) * T], tokens[k * T:(k + 1) * T], doc=first + k, start=0)
            bar.update(n * T)
        save_truth(out, truth)  # before the manifest, which the writer adds last to mark the folder complete
    return read_manifest(out)  # the writer wrote it on leaving the `with`


def save_truth(folder: str | Path, truth: Truth) -> None:
    from safetensors.numpy import save
    arrays = {f.name: np.ascontiguousarray(getattr(truth, f.name)) for f in dataclasses.fields(Truth)
              if f.name != "config"}
    write_atomic(Path(folder) / TRUTH_TENSORS, save(arrays))
    meta = {"config": dataclasses.asdict(truth.config), "categories": list(CATEGORIES),
            "token_ids": "index of the token's strongest firing feature; n_features when none fires",
            "code": "c_i = Exponential(1) when feature i fires (probability frequency[i]), else 0; shared across snapshots",
            "activation": "a_s = sum_i c_i * strength[i, s] * directions[i, s] + N(0, noise_std[s]^2 I)"}
    write_atomic(Path(folder) / TRUTH_JSON, json.dumps(meta, indent=1))


def load_truth(folder: str | Path) -> Truth:
    """Read the ground truth saved next to a synthetic dataset's shards."""
    from safetensors.numpy import load_file
    folder = Path(folder)
    for name in (TRUTH_TENSORS, TRUTH_JSON):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing (not a data.synthetic dataset?)")
    arrays = load_file(str(folder / TRUTH_TENSORS))
    cfg = SyntheticConfig(**json.loads((folder / TRUTH_JSON).read_text())["config"])
    return Truth(config=cfg, **arrays)


def true_normalised_strength(truth: Truth, scale=None) -> np.ndarray:
    """[F_true, S] float64: strength[i, s] * scale[s], the feature's strength in the units the crosscoder and the
    analysis read (each snapshot's activations multiplied by scale[s], normalised = raw * scale). A learned
    latent's decoder norms are this profile times one constant (its code is shared by every snapshot), so its
    argmax is the true peak in those units. scale=None: the truth's own (raw) units."""
    s = np.ones(truth.strength.shape[1]) if scale is None else np.asarray(scale, dtype=np.float64).reshape(-1)
    return truth.strength.astype(np.float64) * s[None]


def feature_recovery(W_dec, truth: Truth, scale=None, threshold: float = 0.9,
                     emergence_fraction: float = 0.2) -> dict[str, Any]:
    """How well a crosscoder's decoder W_dec [F, S, D] (normalised units, as saved) recovers the true features.

    Score of true feature i against learned latent j: the mean, over the snapshots where i exists
    (strength > 0), of cosine(W_dec[j, s], dirs[i, s]). best_cos[i] = max over j; match[i] = that j
    (several true features may match one latent). Feature i is recovered when best_cos[i] >= threshold.
    Cosines do not depend on the unit; peaks and births do, so both sides are read in one unit:

    - peak (primary, ``peak_correct_frac``): argmax_s ||W_dec[j, s]|| against argmax_s strength[i, s] * scale[s],
      both in normalised units, the unit analyze.py's table uses;
    - peak in raw units (``peak_correct_frac_raw``): argmax_s ||W_dec[j, s]|| / scale[s] against truth.peak;
    - birth (``birth_correct_frac``): the table's emergence column (analysis.evolution.emergence_index, first
      snapshot whose norm is >= emergence_fraction x the latent's maximum) against truth.birth, the first
      snapshot where the feature exists. ``birth_definition_frac`` is what an exact decoder scores on that check: the share of
      true features whose own normalised profile meets the definition at truth.birth (a feature born weaker than
      emergence_fraction x its normalised peak is "born" later by the table's reading).

    scale [S] is the factor the crosscoder applied (crosscoder.safetensors' ``scale``); None means W_dec is in
    the truth's raw units (scale 1). Fractions are among recovered features (nan if none).

    Returns recovered_frac, peak_correct_frac, peak_correct_frac_raw, birth_correct_frac, birth_definition_frac,
    recovered_frac_<category>, and per-true-feature tensors best_cos, match, recovered, peak_learned, peak_true
    (normalised), peak_correct, birth_learned, birth_correct and n_matches (latents scoring >= threshold: above 1
    the dictionary splits the feature over duplicates, and the peak of any one of them need not be the feature's).
    """
    import torch

    # The table's emergence definition, imported so that validation and analysis cannot drift apart.
    from analysis.evolution import emergence_index
    W = W_dec.detach().float().cpu()
    dirs = torch.from_numpy(truth.directions).float()
    if W.ndim != 3 or W.shape[1:] != dirs.shape[1:]:
        raise ValueError(f"feature_recovery: W_dec has shape {tuple(W.shape)}, truth is [F, S, D] = "
                         f"[*, {dirs.shape[1]}, {dirs.shape[2]}]")
    exists = torch.from_numpy(truth.exists)
    norms = W.norm(dim=-1)  # [F, S]
    unit = W / norms.clamp_min(1e-12)[..., None]
    score = torch.zeros(dirs.shape[0], W.shape[0])  # [F_true, F]
    for s in range(W.shape[1]):
        score += (dirs[:, s] @ unit[:, s].T) * exists[:, s, None]
    score /= exists.sum(1, keepdim=True).clamp_min(1)
    best_cos, match = score.max(1)
    recovered = best_cos >= threshold
    scale_t = torch.ones(W.shape[1]) if scale is None else torch.as_tensor(scale, dtype=torch.float32).cpu().reshape(-1)
    matched = norms[match]  # [F_true, S] normalised units
    true_norm = torch.from_numpy(true_normalised_strength(truth, scale_t.numpy()))
    peak_learned, peak_true = matched.argmax(1), true_norm.argmax(1)
    peak_correct = peak_learned == peak_true
    peak_correct_raw = (matched / scale_t[None]).argmax(1) == torch.from_numpy(truth.peak)
    birth_learned = torch.from_numpy(emergence_index(matched.double().numpy(), emergence_fraction))
    birth_true = torch.from_numpy(truth.birth)
    birth_correct = birth_learned == birth_true
    birth_definition = torch.from_numpy(emergence_index(true_norm.numpy(), emergence_fraction)) == birth_true
    n_rec = int(recovered.sum())

    def among_recovered(ok: torch.Tensor) -> float:
        return float((ok & recovered).sum()) / n_rec if n_rec else float("nan")

    out = {"recovered_frac": n_rec / len(recovered), "peak_correct_frac": among_recovered(peak_correct),
           "peak_correct_frac_raw": among_recovered(peak_correct_raw),
           "birth_correct_frac": among_recovered(birth_correct),
           "birth_definition_frac": float(birth_definition.float().mean())}
    category = torch.from_numpy(truth.category)
    for k, name in enumerate(CATEGORIES):
        if (category == k).any():
            out[f"recovered_frac_{name}"] = float(recovered[category == k].float().mean())
    out.update(best_cos=best_cos, match=match, recovered=recovered, peak_learned=peak_learned,
               peak_true=peak_true, peak_correct=peak_correct, birth_learned=birth_learned,
               birth_correct=birth_correct, n_matches=(score >= threshold).sum(1))
    return out


def parse_cli(argv: list[str]) -> tuple[SyntheticConfig, Path]:
    """``out=<dir> key=value ...`` -> (config, out). One-line ValueError for an unknown key or bad value."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    try:
        cli = OmegaConf.to_container(OmegaConf.from_cli(list(argv)))
    except OmegaConfBaseException as e:
        raise ValueError(f"data.synthetic: cannot parse arguments ({str(e).splitlines()[0]})") from None
    if "out" not in cli:
        raise ValueError("data.synthetic: missing out=<dir>")
    out = Path(str(cli.pop("out")))
    known = {f.name for f in dataclasses.fields(SyntheticConfig)}
    unknown = sorted(set(cli) - known)
    if unknown:
        raise ValueError(f"data.synthetic: unknown key '{unknown[0]}' (known: out, {', '.join(sorted(known))})")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SyntheticConfig), cli))
    except OmegaConfBaseException as e:
        raise ValueError(f"data.synthetic: {e.full_key}={cli.get(e.full_key)!r}: {str(e).splitlines()[0]}") from None
    cfg.check()
    return cfg, out


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, out = parse_cli(sys.argv[1:] if argv is None else argv)
        manifest = generate(cfg, out)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    truth = load_truth(out)
    counts = dict(zip(CATEGORIES, cfg.category_counts()))
    print(f"wrote {out}: {manifest.n_tokens} tokens x {len(manifest.snapshots)} snapshots "
          f"({', '.join(manifest.snapshot_names)}) x d_model {manifest.d_model} in {len(manifest.shards)} shards; "
          f"{cfg.n_features} true features {counts}, rarest fired {truth.fires.min()} times; truth in {TRUTH_TENSORS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
