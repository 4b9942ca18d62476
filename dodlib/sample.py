"""Multi-stage sampling (paper Fig. 2a) into prior caches.

Stage 1 samples class-conditionally with no prior. Stage k >= 2 restarts from fresh noise with the
same class and the stage k-1 latent as prior (through the LEM once per batch, not per step).

Sample i of stage k is a pure function of (weights, prior_i, sample.seed, i, k): its class, noise
and SDE increments come from its own generator, so it is bit-identical whatever the batch size,
the number of processes or an interruption. Shards are written as they finish into a state
directory keyed by everything that determines them (the sampling code included); a rerun resumes from the finished shards, and
the declared output directory is filled (hard links) only when the stage is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .config import ExperimentConfig, fingerprint
from .guidance import make_guided_velocity_fn
from .io import load_json, save_json, save_npy
from .latents import LatentSet
from .pipeline import SAMPLE_CODE, code_digest
from .samplers import SamplerSpec, run_sampler
from .train import load_weights

log = logging.getLogger(__name__)

PRIOR_FILES = ("latents", "labels", "seeds")


def sample_seed(base_seed: int, index: int, stage: int) -> int:
    """Per-sample, per-stage seed: independent of batching; distinct across stages."""
    digest = hashlib.sha256(f"{base_seed}/{index}/{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class PriorCache:
    """Read side of a stage's output: latents, labels and seeds in shards (+ decoded images)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not (self.dir / "meta.json").exists():
            raise FileNotFoundError(f"{self.dir}: no meta.json - the prior cache is missing or unfinished")
        self.meta = load_json(self.dir / "meta.json")

    def __len__(self) -> int:
        return self.meta["num_samples"]

    def load(self, what: str) -> np.ndarray:
        return np.concatenate([np.load(self.dir / f"{what}-{j:05d}.npy") for j in range(self.meta["num_shards"])])

    def image_batches(self):
        for j in range(self.meta["num_shards"]):
            yield np.load(self.dir / f"images-{j:05d}.npy", mmap_mode="r")


class RealPriors:
    """Priors from real latents (rFID, paper Fig. 3 left): posterior means of real images, taken
    class-interleaved (the i-th prior is the (i // C)-th image of class i % C) so any prefix is
    class-balanced even when the split is stored sorted by class."""

    def __init__(self, latents_dir: str | Path):
        self.set = LatentSet(latents_dir)
        labels = self.set.labels.numpy()
        rank = np.empty(len(labels), np.int64)
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            rank[members] = np.arange(len(members))
        self.order = np.lexsort((labels, rank))  # by rank within class, then class
        self.meta = {"fingerprint": fingerprint(self.set.meta), "source": str(latents_dir)}

    def __len__(self) -> int:
        return len(self.set)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.order[:n]
        return self.set.means(index).numpy(), self.set.labels[torch.from_numpy(index)].numpy()


def sample_stage(
    exp: ExperimentConfig,
    stage: int,
    weights: str | Path,
    out_dir: str | Path,
    state_root: str | Path,
    tokenizer,
    *,
    prior: PriorCache | RealPriors | None = None,
    num_samples: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    stop_after_shards: int | None = None,
) -> dict:
    """Run stage `stage` of `exp`; writes out_dir/{latents,labels,seeds,images}-NNNNN.npy + meta.json."""
    if stage >= 2 and prior is None:
        raise ValueError(f"stage {stage} needs the prior cache of stage {stage - 1}")
    scfg = exp.sample
    stage_cfg = exp.stage_sampling(stage)
    n = num_samples or scfg.num_samples
    if isinstance(prior, RealPriors):
        n = min(n, len(prior))
    elif prior is not None and len(prior) < n:
        raise ValueError(f"the stage-{stage - 1} prior cache has {len(prior)} samples; stage {stage} needs {n}")
    batch_size = batch_size or scfg.batch_size
    weights = Path(weights)
    model = load_weights(weights, device)
    num_classes = model.config["num_classes"]
    if stage >= 2 and model.lem is None:
        raise ValueError(f"experiments.{exp.name}: stage {stage} needs a prior, but the model has no LEM (lem.enabled)")
    latent_shape = (model.config["in_channels"], model.config["input_size"], model.config["input_size"])

    key = fingerprint({
        "weights": _file_digest(weights),
        "prior": None if prior is None else prior.meta.get("fingerprint"),
        "stage": stage, "seed": scfg.seed, "n": n, "shard_size": scfg.shard_size, "micro": scfg.micro_batch,
        "sampling": dataclasses.asdict(stage_cfg), "code": code_digest(SAMPLE_CODE),
    })
    state_dir = Path(state_root) / key
    state_dir.mkdir(parents=True, exist_ok=True)
    spec = SamplerSpec(method=stage_cfg.sampler.method, num_steps=stage_cfg.sampler.num_steps,
                       diffusion_scale=stage_cfg.sampler.diffusion_scale,
                       last_step_size=stage_cfg.sampler.last_step_size)
    num_shards = -(-n // scfg.shard_size)
    prior_latents = prior_labels = None
    if isinstance(prior, PriorCache):
        prior_latents, prior_labels = prior.load("latents"), prior.load("labels")
    elif isinstance(prior, RealPriors):
        prior_latents, prior_labels = prior.take(n)

    timing = {"seconds": 0.0, "lem_seconds": 0.0, "decode_seconds": 0.0}
    done_before = sum(_shard_done(state_dir, j) for j in range(num_shards))
    if done_before:
        log.info("stage %d of %s: resuming, %d/%d shards already done", stage, exp.name, done_before, num_shards)
    from tqdm import tqdm

    bar = tqdm(total=n, desc=f"{exp.name} stage {stage}", unit="img", mininterval=2)
    written = 0
    for j in range(num_shards):
        lo, hi = j * scfg.shard_size, min((j + 1) * scfg.shard_size, n)
        if _shard_done(state_dir, j):
            bar.update(hi - lo)
            continue
        shard = {"latents": [], "labels": [], "seeds": [], "images": []}
        for start in range(lo, hi, batch_size):
            index = np.arange(start, min(start + batch_size, hi))
            t0 = time.perf_counter()
            seeds = [sample_seed(scfg.seed, int(i), stage) for i in index]
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            if prior_labels is not None:
                labels = torch.from_numpy(prior_labels[index]).long()
            else:
                labels = torch.from_numpy(index % num_classes).long()  # class-balanced
            x0 = torch.stack([torch.randn(latent_shape, generator=g) for g in gens]).to(device)
            with torch.inference_mode():
                prior_emb = None
                if prior_latents is not None:
                    tl = time.perf_counter()
                    prior_emb = fixed_shape(model.encode_prior, scfg.micro_batch)(
                        torch.from_numpy(prior_latents[index]).to(device))
                    timing["lem_seconds"] += time.perf_counter() - tl
                velocity_fn = _velocity_fn(fixed_shape(model, scfg.micro_batch), labels.to(device), prior_emb,
                                           stage_cfg.cfg, num_classes)
                noise_fn = lambda step: torch.stack(  # noqa: E731  per-sample SDE increments
                    [torch.randn(latent_shape, generator=g) for g in gens]).to(device)
                x, nfe = run_sampler(spec, velocity_fn, x0, noise_fn)
                td = time.perf_counter()
                images = fixed_shape(tokenizer.decode, scfg.micro_batch)(x)
                timing["decode_seconds"] += time.perf_counter() - td
            timing["seconds"] += time.perf_counter() - t0
            shard["latents"].append(x.float().cpu().numpy())
            shard["labels"].append(labels.numpy())
            shard["seeds"].append(np.asarray(seeds, dtype=np.int64))
            shard["images"].append(images.cpu().numpy())
            bar.update(len(index))
        for what, parts in shard.items():
            save_npy(state_dir / f"{what}-{j:05d}.npy", np.concatenate(parts))
        save_json(state_dir / f"shard-{j:05d}.json", {"samples": hi - lo, "nfe": nfe, **timing})
        written += 1
        if stop_after_shards is not None and written >= stop_after_shards and j + 1 < num_shards:
            bar.close()
            raise InterruptedError(f"stopped after {written} shards (state kept in {state_dir})")
    bar.close()

    meta = {
        "experiment": exp.name, "stage": stage, "num_samples": n, "num_shards": num_shards,
        "shard_size": scfg.shard_size, "seed": scfg.seed, "fingerprint": key,
        "nfe": spec.nfe, "cfg_doubles_batch": stage_cfg.cfg.scale != 1,
        "sampling": dataclasses.asdict(stage_cfg),
        "prior_source": None if prior is None else ("real" if isinstance(prior, RealPriors) else "generated"),
        "latent_shape": list(latent_shape), "num_classes": num_classes,
        "flops_per_forward": model.flops_per_forward(1),
    }
    if prior_latents is not None:
        meta.update(_copy_diagnostics(state_dir, num_shards, prior_latents[:n], prior_labels[:n]))
    _publish(state_dir, Path(out_dir), num_shards, meta)
    # Wall-clock figures vary run to run: kept apart so meta.json is reproducible byte for byte.
    save_json(Path(out_dir) / "timing.json", {**timing, "resumed_shards": done_before})
    return meta


def fixed_shape(fn, rows: int):
    """Call `fn` on chunks of exactly `rows` rows (the last one padded by repeating its final row)
    and concatenate the results: each row's numbers then do not depend on how many rows the
    caller passed, nor on the row's position (checked by tests/test_sample.py)."""

    def call(*args, **kwargs):
        tensors = [a for a in args if torch.is_tensor(a)] + [v for v in kwargs.values() if torch.is_tensor(v)]
        n = tensors[0].shape[0]
        if n == rows:
            return fn(*args, **kwargs)
        outs = []
        for lo in range(0, n, rows):
            hi = min(lo + rows, n)
            chunk = lambda v: _pad_rows(v[lo:hi], rows) if torch.is_tensor(v) else v  # noqa: E731
            outs.append(fn(*map(chunk, args), **{k: chunk(v) for k, v in kwargs.items()})[: hi - lo])
        return torch.cat(outs)

    return call


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if len(x) == rows:
        return x
    return torch.cat([x, x[-1:].expand(rows - len(x), *x.shape[1:])])


def _velocity_fn(model, labels, prior_emb, cfg, num_classes):
    b = len(labels)
    keep = torch.ones(b, dtype=torch.bool, device=labels.device)
    cond = {"y": labels, "prior_emb": prior_emb, "prior_keep": None if prior_emb is None else keep}
    uncond = {
        "y": torch.full_like(labels, num_classes),
        "prior_emb": prior_emb,
        "prior_keep": None if prior_emb is None else (keep if cfg.uncond == "class" else ~keep),
    }
    return make_guided_velocity_fn(model, cond, uncond, cfg.scale, cfg.schedule, cfg.interval, cfg.power, cfg.channels)


def _copy_diagnostics(state_dir: Path, num_shards: int, prior_latents: np.ndarray, labels: np.ndarray) -> dict:
    """Mean squared distance between a sample's stage-k and stage-(k-1) latents, against the same
    distance between two different samples of one class: the cheapest test of copying."""
    latents = np.concatenate([np.load(state_dir / f"latents-{j:05d}.npy") for j in range(num_shards)])
    to_prior = float(((latents - prior_latents) ** 2).mean())
    rng = np.random.default_rng(0)
    pairs = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) > 1:
            a = rng.choice(members, size=min(64, len(members)))
            b = rng.choice(members, size=len(a))
            keep = a != b
            pairs.append(((latents[a[keep]] - latents[b[keep]]) ** 2).mean(axis=tuple(range(1, latents.ndim))))
    within_class = float(np.concatenate(pairs).mean()) if pairs else float("nan")
    return {"msd_to_prior": to_prior, "msd_within_class": within_class}


def _shard_done(state_dir: Path, j: int) -> bool:
    return (state_dir / f"shard-{j:05d}.json").exists()


def _publish(state_dir: Path, out_dir: Path, num_shards: int, meta: dict) -> None:
    """Fill the declared output directory from the finished shards (hard links where possible)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    nfe = load_json(state_dir / "shard-00000.json")["nfe"]
    for j in range(num_shards):
        for what in PRIOR_FILES + ("images",):
            name = f"{what}-{j:05d}.npy"
            target = out_dir / name
            if target.exists():
                target.unlink()
            try:
                os.link(state_dir / name, target)
            except OSError:
                shutil.copyfile(state_dir / name, target)
    meta["nfe_used"] = nfe
    save_json(out_dir / "meta.json", meta)  # last: marks the cache complete


def _file_digest(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]
