"""The offline mini-Pythia suite: a small GPT-NeoX pre-trained here, saved at a Pythia-like checkpoint schedule.

Pythia cannot be downloaded on a machine without network access, so the default pipeline builds its own
model suite: a byte-level BPE tokenizer trained on the offline corpus, a GPT-NeoX (transformers' own class)
trained with Lightning, and a Hugging Face model folder per checkpoint (``<suite>/step0``, ``step1``,
``step2``, ``step4``, ..., ``step512``, then evenly spaced to the end), each self-contained (weights +
tokenizer) and loadable with ``from_pretrained`` exactly like a hub revision. ``loss_curve.json`` and
``loss_curve.png`` record the training curve; ``suite.json`` the configuration and the schedule.

    python -m data.tiny_suite            # builds (or finds) the default suite and prints its folder
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from filelock import FileLock

from data.format import atomic_path, write_atomic

SUITE_FILE = "suite.json"
EOS = "<|endoftext|>"


def checkpoint_schedule(max_steps: int, log_until: int = 512, every: int = 128) -> list[int]:
    """Pythia's shape: step 0, the powers of two up to ``log_until``, then every ``every`` steps to the end."""
    steps = [0] + [2 ** i for i in range(int(math.log2(max(log_until, 1))) + 1) if 2 ** i <= min(log_until, max_steps)]
    steps += list(range(steps[-1] + every, max_steps + 1, every))
    if steps[-1] != max_steps:
        steps.append(max_steps)
    return steps


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-NeoX's kind of tokenizer) trained on the corpus, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=1 << 20)


def tokenised_windows(corpus, tokenizer, context_length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([w.tokens for w in corpus.windows(tokenizer, context_length)])).long()


def duplicate_passages(windows: torch.Tensor, fraction: float, seed: int, period: int = 0) -> torch.Tensor:
    """A copy of windows [N, T] in which ``fraction`` of them (chosen with ``seed``) are their first ``period``
    tokens repeated to the window's end (period 0: T // 2, the first half twice).

    Web corpora hold much duplicated text, and copying a passage seen earlier in the context is what induction
    heads do. On the stdlib alone a 2M-token run is far too short for them to form (measured: a repeated
    passage is predicted no better than its first copy at step 640); duplicated passages make copying pay."""
    out = windows.clone()
    n = int(round(fraction * len(windows)))
    if n == 0:
        return out
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:n]
    T = windows.shape[1]
    period = period or T // 2
    out[pick] = windows[pick, :period].repeat(1, -(-T // period))[:, :T]
    return out


class LanguageModelModule(L.LightningModule):
    """Next-token prediction for the suite's GPT-NeoX, with a linear warm-up and cosine decay."""

    def __init__(self, model, lr: float, warmup_steps: int, max_steps: int):
        super().__init__()
        self.model, self.lr, self.warmup_steps, self.max_steps = model, lr, warmup_steps, max_steps

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.01)

        def factor(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            t = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}


class SaveSchedule(L.Callback):
    """Saves a Hugging Face folder per scheduled step and records train and validation loss."""

    def __init__(self, folder: Path, steps: list[int], tokenizer, val_windows: torch.Tensor):
        self.folder, self.steps, self.tokenizer, self.val = folder, set(steps), tokenizer, val_windows
        self.curve: dict[str, list] = {"train_step": [], "train_loss": [], "val_step": [], "val_loss": []}

    @torch.no_grad()
    def _save(self, pl_module: LanguageModelModule, step: int) -> None:
        model = pl_module.model.eval()
        losses = [model(input_ids=b, labels=b).loss.item() for b in self.val.split(16)]
        model.train()
        self.curve["val_step"].append(step)
        self.curve["val_loss"].append(float(np.mean(losses)))
        out = self.folder / f"step{step}"
        model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        # one line per checkpoint: the build's progress in any log, terminal or not
        print(f"  suite: checkpoint step{step} saved ({len(self.curve['val_step'])}/{len(self.steps)}), "
              f"validation loss {self.curve['val_loss'][-1]:.3f}", flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        if 0 in self.steps:
            self._save(pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.curve["train_step"].append(trainer.global_step)
        self.curve["train_loss"].append(float(outputs["loss"]))
        if trainer.global_step in self.steps:
            self._save(pl_module, trainer.global_step)


def plot_loss_curve(curve: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = np.asarray(curve["train_step"])
    loss = np.asarray(curve["train_loss"])
    ax.plot(steps, loss, color="0.75", lw=0.8, label="train (per step)")
    if len(loss) >= 20:
        k = 20
        ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), color="C0", label="train (20-step mean)")
    ax.plot(curve["val_step"][1:], curve["val_loss"][1:], "o-", color="C3", ms=4, label="validation (checkpoints)")
    ax.set_xscale("log")
    ax.set_xlabel("training step (log)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("mini-Pythia pre-training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def build_suite(cache_dir: str | os.PathLike, d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
                context_length: int = 128, vocab_size: int = 4096, batch_size: int = 16, max_steps: int = 1024,
                lr: float = 1e-3, warmup_steps: int = 32, log_until: int = 512, every: int = 128, seed: int = 0,
                corpus_seed: int = 0, max_docs: int | None = None, duplicate_fraction: float = 0.0,
                duplicate_period: int = 0) -> Path:
    """Build the suite under ``<cache_dir>/suites/tiny-<hash of these arguments>`` (or find it built)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    from data.corpus import TextCorpus
    hf_logging.disable_progress_bar()  # one bar per saved checkpoint would bury Lightning's

    config = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, context_length=context_length,
                  vocab_size=vocab_size, batch_size=batch_size, max_steps=max_steps, lr=lr,
                  warmup_steps=warmup_steps, log_until=log_until, every=every, seed=seed, corpus_seed=corpus_seed,
                  max_docs=max_docs, **({"duplicate_fraction": duplicate_fraction} if duplicate_fraction else {}),
                  **({"duplicate_period": duplicate_period} if duplicate_fraction and duplicate_period else {}))
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / "suites" / f"tiny-{key}"
    if (folder / SUITE_FILE).is_file():
        return folder
    # One builder at a time: parallel jobs (a joblib multirun, two runs started together) wait for the first
    # instead of deleting each other's partial build.
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.with_name(folder.name + ".lock"))):
        if (folder / SUITE_FILE).is_file():
            return folder
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # an interrupted build restarts: it takes minutes
        partial.mkdir(parents=True)
        start = time.time()
        print(f"Building the mini-Pythia suite (first run only; ~4 min on 2 CPU cores): {n_layers} layers, d_model "
              f"{d_model}, {max_steps} training steps, checkpoints on Pythia's schedule -> {folder}", flush=True)
        L.seed_everything(seed, workers=True)
        hf_cache = str(Path(cache_dir) / "hf_datasets")
        train_corpus = TextCorpus("stdlib", split="train", seed=corpus_seed, max_docs=max_docs, cache_dir=hf_cache)
        val_corpus = TextCorpus("stdlib", split="validation", seed=corpus_seed, max_docs=max_docs, cache_dir=hf_cache)
        tokenizer = train_tokenizer([t for _, t in train_corpus.texts()], vocab_size)
        train_windows = duplicate_passages(tokenised_windows(train_corpus, tokenizer, context_length), duplicate_fraction,
                                           seed, duplicate_period)
        val_windows = tokenised_windows(val_corpus, tokenizer, context_length)[:64]

        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=len(tokenizer), hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
            intermediate_size=4 * d_model, max_position_embeddings=max(context_length, 2048), rotary_pct=0.25,
            use_parallel_residual=True, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id))
        steps = checkpoint_schedule(max_steps, log_until, every)
        sampler = torch.utils.data.RandomSampler(train_windows, replacement=True, num_samples=max_steps * batch_size,
                                                 generator=torch.Generator().manual_seed(seed))
        loader = torch.utils.data.DataLoader(train_windows, batch_size=batch_size, sampler=sampler)
        saver = SaveSchedule(partial, steps, tokenizer, val_windows)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_model_summary=False, callbacks=[saver], deterministic=True)
        trainer.fit(LanguageModelModule(model, lr, warmup_steps, max_steps), train_dataloaders=loader)

        # "steps"/"loss" (validation at the checkpoints) is the pair analysis tools read as the suite's curve
        curve = {"steps": saver.curve["val_step"], "loss": saver.curve["val_loss"], **saver.curve,
                 "tokens_per_step": batch_size * context_length}
        write_atomic(partial / "loss_curve.json", json.dumps(curve))
        plot_loss_curve(curve, partial / "loss_curve.png")
        summary = {"config": config, "revisions": [f"step{s}" for s in steps], "steps": steps,
                   "parameters": sum(p.numel() for p in model.parameters()), "train_tokens": int(train_windows.numel()),
                   "build_seconds": round(time.time() - start, 1),
                   "val_loss": dict(zip((f"step{s}" for s in saver.curve["val_step"]), saver.curve["val_loss"]))}
        write_atomic(partial / SUITE_FILE, json.dumps(summary, indent=1))
        os.replace(partial, folder)
        print(f"Suite built in {summary['build_seconds']:.0f} s: {len(steps)} checkpoints, validation loss "
              f"{saver.curve['val_loss'][0]:.2f} (step0) -> {saver.curve['val_loss'][-1]:.2f} (step{steps[-1]})", flush=True)
        return folder


if __name__ == "__main__":
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny"])
    print(instantiate(cfg.model.build, cache_dir=cfg.paths.cache_dir))
