"""Online probe of M&M tuning: does the triplet loss make patch features that generalise?

A fixed bank of labelled patches is sampled once from the train split and once from a
held-out split (`--probe_split`, default val): the first `images` crops of the training
input pipeline re-seeded with the probe's own seed (`PROBE_SEED` = 0 unless set; it is
independent of the run's --seed, so runs of any seed are probed on the same patches),
mixed by `mix.Mix` with the run's mix settings and a fixed mix seed. The crops follow the
run's crop size and scale range, so the patches look like the ones the loss sees.

At step 0 (before the first update) and every `every` steps (window ends of
`training.fit_resumable`; `every` is a multiple of --log_every) and at the last step, the
backbone embeds both banks outside the compiled step, with batch normalisation in
inference mode: flattened, L2-normalised pool5 (what the triplet loss sees). Logged as
TensorBoard `probe/<name>`:

  knn_val        val patches classified by 5-NN (Euclidean) against the train bank
  knn_val_loo    leave-one-out 5-NN accuracy within the val bank
  knn_train_loo  leave-one-out 5-NN accuracy within the train bank
  zero_fraction  share of exactly-zero feature entries (dead post-ReLU pool5 units)
  mean_cosine    mean cosine of distinct pairs of val features (1 = all alike)
  effective_rank participation ratio (sum lambda)^2 / sum lambda^2 of the val features'
                 covariance eigenvalues: about how many directions the features use
                 (1 = collapsed onto a line; at most min(N - 1, D))

(collapse measures are taken on the val bank). The history lives in
`workdir/probe_history.json` (written atomically after each probe), so a killed and
resumed run continues it: entries after the resume step belong to a trajectory the
resumed run replays with other batches and are dropped, and the resume step is probed
again if its entry is missing. With `keep_best`, the backbone of the step with the
highest knn_val (the first such step on ties) is saved atomically to
`workdir/probe_best.weights.h5` whenever a probe beats it; at the end of the stage the
last step's backbone is written to `backbone_last.weights.h5` and the best one is loaded
into the backbone, which the stage then writes to `backbone.weights.h5`, so the next
stage picks it up unchanged. Choosing the step on val is model selection: report final
numbers on a split the study never selects on. If a resume drops the best step (a kill
between a probe and the next checkpoint), the best is chosen again among the steps
probed from the resume step on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, List, Optional

import keras
import numpy as np
import tensorflow as tf

from mm_tf import common
from mm_tf import files
from mm_tf import hooks
from mm_tf import losses
from mm_tf import mix as mix_lib
from mm_tf.data import pipeline
from mm_tf.errors import ConfigError
from mm_tf.models import backbones
from mm_tf.models import weights as weights_lib

PROBE_SEED = 0
# Salts the bank's mix seed apart from the training streams' step seeds.
_BANK_SALT = 0x9B0B
# Crops per mix call of a bank: fixed, so that runs of any --batch_size share one bank.
_BANK_BATCH = 8
HISTORY_FILE = "probe_history.json"
BEST_WEIGHTS = "probe_best.weights.h5"
LAST_WEIGHTS = "backbone_last.weights.h5"
KNN_VAL = "knn_val"
METRICS = (KNN_VAL, "knn_val_loo", "knn_train_loo", "zero_fraction", "mean_cosine",
           "effective_rank")


# ----------------------------------------------------------------------------------------
# The measures: plain numpy on features [N,D].
# ----------------------------------------------------------------------------------------

def knn_predict(query, bank, bank_labels, k: int = 5, leave_one_out: bool = False):
    """Majority label int64 [Q] of the k nearest (Euclidean) rows of bank [N,D] for each
    row of query [Q,D]; ties go to the smallest class id. `leave_one_out`: query is the
    bank itself and a row is never its own neighbour."""
    query = np.asarray(query, np.float64)
    bank = np.asarray(bank, np.float64)
    bank_labels = np.asarray(bank_labels, np.int64)
    distances = (np.sum(query ** 2, axis=1)[:, None] + np.sum(bank ** 2, axis=1)[None, :]
                 - 2.0 * query @ bank.T)
    if leave_one_out:
        np.fill_diagonal(distances, np.inf)
    k = min(k, len(bank_labels) - int(leave_one_out))
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.array([np.bincount(row).argmax() for row in bank_labels[nearest]], np.int64)


def knn_accuracy(query, query_labels, bank, bank_labels, k: int = 5) -> float:
    """Share of query rows [Q,D] whose k-NN label in bank [N,D] is their label [Q]."""
    if len(query_labels) == 0 or len(bank_labels) == 0:
        return float("nan")
    predicted = knn_predict(query, bank, bank_labels, k)
    return float(np.mean(predicted == np.asarray(query_labels, np.int64)))


def knn_accuracy_loo(features, labels, k: int = 5) -> float:
    """Leave-one-out k-NN class accuracy of features [N,D] with labels [N]."""
    if len(labels) < 2:
        return float("nan")
    predicted = knn_predict(features, features, labels, k, leave_one_out=True)
    return float(np.mean(predicted == np.asarray(labels, np.int64)))


def participation_ratio(features, per_dimension: bool = False) -> float:
    """(sum lambda)^2 / sum lambda^2 of the covariance eigenvalues of features [N,D]
    (divided by D with `per_dimension`); 0 for constant features."""
    x = np.asarray(features, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    # tr C and tr C^2 from the [N,N] Gram matrix: no [D,D] matrix or eigen-solver (D is
    # 8192 for the paper's pool5). The 1/(N-1) factors cancel.
    gram = x @ x.T
    denominator = float(np.sum(gram ** 2))
    ratio = float(np.trace(gram)) ** 2 / denominator if denominator > 0 else 0.0
    return ratio / x.shape[1] if per_dimension else ratio


def zero_fraction(features) -> float:
    """Share of exactly-zero entries of features [N,D]."""
    return float(np.mean(np.asarray(features) == 0))


def mean_cosine(features) -> float:
    """Mean cosine similarity over the distinct pairs of rows of features [N,D] (a zero
    row has cosine 0 with everything)."""
    x = np.asarray(features, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    n = len(x)
    if n < 2:
        return float("nan")
    total = np.sum(unit.sum(axis=0) ** 2) - np.sum(unit ** 2)  # sum over i != j
    return float(total / (n * (n - 1)))


def probe_metrics(train_features, train_labels, val_features, val_labels,
                  k: int = 5) -> dict:
    """The probe's measures (METRICS, module docstring) of train [N,D] / val [M,D]
    features and their labels."""
    return {
        KNN_VAL: knn_accuracy(val_features, val_labels, train_features, train_labels, k),
        "knn_val_loo": knn_accuracy_loo(val_features, val_labels, k),
        "knn_train_loo": knn_accuracy_loo(train_features, train_labels, k),
        "zero_fraction": zero_fraction(val_features),
        "mean_cosine": mean_cosine(val_features),
        "effective_rank": participation_ratio(val_features),
    }


# ----------------------------------------------------------------------------------------
# The bank and the embedding.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class PatchBank:
    """Valid labelled patches of a fixed sample of one split, N of them.

    Attributes:
      patches: float32 [N,S,S,C] normalised network input (what M&M feeds the backbone).
      thumbnails: uint8 [N,S,S,3] the same crops of the RGB image (sprites, figures).
      labels: int32 [N] train id of each patch's centre pixel.
      image_index: int32 [N] position of the source crop in the sample.
      split: the split's name.
    """

    patches: np.ndarray
    thumbnails: np.ndarray
    labels: np.ndarray
    image_index: np.ndarray
    split: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def sources(self) -> List[str]:
        """One name per patch: `<split> crop <i>`."""
        return [f"{self.split} crop {int(i)}" for i in self.image_index]


def sample_bank(pairs, info, input_config: pipeline.InputConfig,
                mix_config: mix_lib.MixConfig, num_images: int, *,
                seed: int = PROBE_SEED, split: str = "") -> PatchBank:
    """The valid patches of the first min(num_images, len(pairs)) crops of
    `pipeline.train_dataset` re-seeded with `seed`, mixed by `mix.Mix` -> PatchBank.
    The same arguments give the same bank; the network input and the RGB crop are
    mixed together (stacked as channels), so thumbnails show exactly the patches."""
    count = min(int(num_images), len(pairs))
    if count < 1:
        raise ValueError(f"sample_bank: no images in split {split!r}")
    batch = min(_BANK_BATCH, count)
    config = dataclasses.replace(input_config, seed=seed, batch_size=batch, repeat=True)
    batches = math.ceil(count / batch)
    # Eager calls: the TF crop is faster than the XLA-friendly gathers there.
    mix = mix_lib.Mix(dataclasses.replace(mix_config, use_gather_resize=False))
    mix_seed = tf.constant([seed, _BANK_SALT], tf.int32)
    dataset = pipeline.train_dataset(pairs, info, config, include_raw_image=True)
    parts = []
    for j, element in enumerate(dataset.take(batches)):
        image = element[common.IMAGE]
        channels = int(image.shape[-1])
        stacked = tf.concat([image, tf.cast(element[common.RAW_IMAGE], tf.float32)], -1)
        # Image i of the sample draws row i of one mix stream, whatever the batch size.
        mixed = mix(stacked, element[common.LABEL], mix_seed, image_offset=j * batch,
                    total_images=batches * batch)
        index = mixed.image_index.numpy() + j * batch
        keep = mixed.valid.numpy() & (index < count)
        crops = mixed.patches.numpy()[keep]
        parts.append((crops[..., :channels],
                      np.clip(np.round(crops[..., channels:]), 0, 255).astype(np.uint8),
                      mixed.labels.numpy()[keep].astype(np.int32),
                      index[keep].astype(np.int32)))
    patches, thumbnails, labels, image_index = (np.concatenate(p) for p in zip(*parts))
    if not len(labels):
        raise ValueError(f"sample_bank: no valid patch in split {split!r} (all ignore?)")
    return PatchBank(patches.astype(np.float32), thumbnails, labels, image_index, split)


def embedding_fn(pool5: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    """patches float32 [N,S,S,C] -> float32 [N,D]: `pool5`'s features with batch
    normalisation in inference mode, flattened and L2-normalised (the triplet loss's
    space). One traced function, reused by every call."""
    @tf.function(reduce_retracing=True)
    def embed_batch(x):
        return losses.l2_normalize_flat(pool5(x, training=False))

    def embed(patches, batch_size: int = 64):
        rows = [embed_batch(tf.convert_to_tensor(patches[s:s + batch_size], tf.float32))
                .numpy() for s in range(0, len(patches), batch_size)]
        return np.concatenate(rows)

    return embed


def backbone_embeddings(backbone: keras.Model, patches, batch_size: int = 64):
    """Patches float32 [N,S,S,C] -> float32 [N,D] pool5 embeddings of a backbone."""
    return embedding_fn(backbones.pool5_model(backbone))(patches, batch_size)


# ----------------------------------------------------------------------------------------
# The probe during training.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """When and on what the probe runs.

    Args:
      every: steps between probes (0 = off); a multiple of --log_every.
      split: the held-out split of the val bank.
      images: crops sampled per split (each gives patches_per_image patches).
      seed: seed of both banks (independent of the run's --seed).
      k: neighbours of the k-NN accuracies.
      keep_best: make the best-knn_val step's backbone the stage's product.
      batch_size: patches per embedding call.
    """

    every: int = 0
    split: str = "val"
    images: int = 64
    seed: int = PROBE_SEED
    k: int = 5
    keep_best: bool = False
    batch_size: int = 64

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def validate(self, log_every: int) -> None:
        """Raises ConfigError naming the flag when a value cannot work."""
        if self.every < 0 or (self.every and self.every % log_every):
            raise ConfigError(f"--probe_every={self.every} must be 0 (off) or a multiple "
                              f"of --log_every={log_every}")
        if self.images < 1:
            raise ConfigError(f"--probe_images must be positive, got {self.images}")
        if self.k < 1:
            raise ConfigError(f"--probe_k must be positive, got {self.k}")
        if self.keep_best and not self.enabled:
            raise ConfigError("--keep_best_probe needs --probe_every > 0")


class Probe:
    """The two fixed banks and the measures of a backbone's features on them.

    Args:
      train_bank: PatchBank of the train split.
      val_bank: PatchBank of the held-out split.
      k: neighbours of the k-NN accuracies.
      batch_size: patches per embedding call.
    """

    def __init__(self, train_bank: PatchBank, val_bank: PatchBank, k: int = 5,
                 batch_size: int = 64):
        self.train_bank, self.val_bank = train_bank, val_bank
        self.k, self.batch_size = int(k), int(batch_size)
        self.bank_seconds = 0.0  # the one-off sampling time, set by make_probe

    def embed(self, embed) -> tuple:
        """(train features [N,D], val features [M,D]) from an `embedding_fn`."""
        return (embed(self.train_bank.patches, self.batch_size),
                embed(self.val_bank.patches, self.batch_size))

    def run(self, embed) -> dict:
        """{metric: float} of METRICS for the features of an `embedding_fn`."""
        train, val = self.embed(embed)
        return probe_metrics(train, self.train_bank.labels, val, self.val_bank.labels,
                             self.k)


class ProbeHook(hooks.StageHook):
    """Runs the probe at step 0, every `config.every` steps and at the last step; logs
    `probe/<metric>`; keeps the history (and with keep_best the best backbone) in the
    work folder; adds `probe` to summary.json.

    Args:
      probe: the `Probe` (banks and k).
      pool5: model images -> pool5 sharing the trained backbone's weights
        (`MMTuner.features`).
      backbone: the trained backbone (saved and, with keep_best, replaced at the end).
      config: the ProbeConfig.
      steps: the stage's last step.
    """

    def __init__(self, probe: Probe, pool5: keras.Model, backbone: keras.Model,
                 config: ProbeConfig, steps: int):
        super().__init__()
        self._probe = probe
        self._embed = embedding_fn(pool5)
        self._backbone = backbone
        self._config = config
        self._steps = int(steps)
        self.history: List[dict] = []
        self.best: Optional[dict] = None

    def _path(self, name: str) -> str:
        return os.path.join(self.write_dir, name)

    def _due(self, step: int) -> bool:
        return step % self._config.every == 0 or step == self._steps

    def begin(self, writer, write_dir, start_step, chief):
        super().begin(writer, write_dir, start_step, chief)
        self.history, self.best = [], None
        if os.path.isfile(self._path(HISTORY_FILE)):
            stored = files.read_json(self._path(HISTORY_FILE))
            # Later entries belong to a trajectory the resumed run replays differently.
            self.history = [e for e in stored["history"] if e["step"] <= start_step]
            best = stored.get("best")
            if best and best["step"] <= start_step:
                self.best = best
        if self._due(start_step) and start_step not in self._steps_done():
            self._run(start_step)

    def _steps_done(self) -> set:
        return {entry["step"] for entry in self.history}

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training:
            return  # A diverged window: its weights are not kept.
        step = int(self.model.optimizer.iterations.numpy())
        if self._due(step):
            self._run(step)

    def _run(self, step: int) -> None:
        started = time.time()
        metrics = self._probe.run(self._embed)
        entry = {"step": step, **metrics, "seconds": time.time() - started}
        self.history = [e for e in self.history if e["step"] != step] + [entry]
        self.history.sort(key=lambda e: e["step"])
        with self.writer.as_default(step=step):
            for name in METRICS:
                tf.summary.scalar(f"probe/{name}", metrics[name])
        if self._config.keep_best and (self.best is None
                                       or metrics[KNN_VAL] > self.best[KNN_VAL]):
            weights_lib.save_backbone_weights(self._backbone, self._path(BEST_WEIGHTS))
            self.best = {"step": step, KNN_VAL: metrics[KNN_VAL]}
        # After the weights: the history never names a best file that is not there.
        files.write_json_atomic(self._path(HISTORY_FILE),
                                {"history": self.history, "best": self.best})

    def end(self) -> dict:
        seconds = [e["seconds"] for e in self.history]
        fields = {"probe": {
            "history": self.history,
            "every": self._config.every, "split": self._config.split,
            "images_per_split": self._config.images, "seed": self._config.seed,
            "k": self._config.k,
            "patches": {"train": len(self._probe.train_bank),
                        self._config.split: len(self._probe.val_bank)},
            "seconds_per_probe": float(np.mean(seconds)) if seconds else None,
            "bank_seconds": self._probe.bank_seconds,
            "best": self.best}}
        if self._config.keep_best and self.best is not None:
            weights_lib.save_backbone_weights(self._backbone, self._path(LAST_WEIGHTS))
            weights_lib.load_backbone_weights(self._backbone, self._path(BEST_WEIGHTS))
            fields.update(backbone_last_weights=self._path(LAST_WEIGHTS),
                          probe_best_step=self.best["step"],
                          probe_best_knn_val=self.best[KNN_VAL])
        return fields


def make_probe(train_pairs, probe_pairs, info, input_config: pipeline.InputConfig,
               mix_config: mix_lib.MixConfig, config: ProbeConfig) -> Probe:
    """Samples the two banks of `config` (train split, held-out split) -> Probe."""
    started = time.time()
    bank = dict(input_config=input_config, mix_config=mix_config, num_images=config.images,
                seed=config.seed)
    probe = Probe(sample_bank(train_pairs, info, split="train", **bank),
                  sample_bank(probe_pairs, info, split=config.split, **bank),
                  k=config.k, batch_size=config.batch_size)
    probe.bank_seconds = time.time() - started
    return probe
