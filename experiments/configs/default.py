"""Defaults of every training run; experiment configs import this and change what differs.

    python -m launch.main --mode=train --config=experiments/configs/default.py --workdir=runs/x \
        --config.input.dataset=fashion_mnist_idx --config.optim.epochs=2

Sections: input, model, init, sd, optim, ckpt, eval, swa. The reference schedule and optimizer
(docs/method.md 1.4): SGD momentum 0.9, weight decay 5e-4, batch 128, lr 0.1.
"""

import ml_collections

from sd_jax.data.pipeline import DEVICE_BYTES
from sd_jax.nn.rules import SDRules


def sd_section(**changes) -> ml_collections.ConfigDict:
    """The `sd` section: every option at its dataclass default, `changes` applied; options whose default
    is None are typed placeholders, so that `--config.sd.activation_bits=8` parses."""
    placeholders = {key: ml_collections.config_dict.placeholder(kind)
                    for key, kind in SDRules.option_types().items()}
    return ml_collections.ConfigDict({**SDRules.option_defaults(), **placeholders, **changes})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.log_every = 50
    # The paper experiment this run is (experiments/configs/paper.py SETTINGS, e.g. "sd_scratch") and the
    # recipe it follows ("reference" or "tuned"); written into summary.json for the tables.
    config.setting = ""
    config.recipe = ""
    # Where a recipe cannot follow the authors, one sentence each (paper.py sets them).
    config.departures = []
    # Prepared TFDS data ("" = TFDS's default folder); `--config.data_dir` and `--config.input.data_dir`
    # are one value (a FieldReference).
    config.data_dir = ""
    config.input = ml_collections.ConfigDict(dict(
        dataset="cifar10", data_dir=config.get_ref("data_dir"), batch_size=128, eval_batch_size=500,
        # split_rule: how the adaptation/finetune parts are drawn: "sd_jax" (own seeded split, adaptation
        # labels renumbered 0..n-1) or "reference" (the authors' np.random.seed split, labels kept).
        setting="plain", part="source", split_seed=0, split_rule="sd_jax",
        # placement: "host" (numpy batches), "device" (MNIST/CIFAR held as uint8 on the devices, batches made
        # there: same order, other augmentation draws) or "auto" (device when a device's share of the split is
        # at most device_bytes); decode_threads: ImageNet-style decoding threads (0: in the prefetch thread).
        placement="auto", device_bytes=DEVICE_BYTES, decode_threads=8,
    ))
    config.model = ml_collections.ConfigDict(dict(
        name="resnet20", sd=False,
        options=ml_collections.ConfigDict(dict(dtype="float32")),  # "bfloat16": bf16 compute, fp32 variables
    ))
    # from_params: checkpoint to start from (a dense one is decomposed when model.sd); reset: regex of
    # layers to re-initialise (adaptation: "^head/").
    config.init = ml_collections.ConfigDict(dict(from_params="", reset=""))
    # Every SD option with its default from the option dataclasses (sd_jax.nn.rules.SDRules.option_defaults:
    # layer options, decomposition options such as structural pruning, max_kernel_size and per-layer
    # `rules`); this config changes only the coefficient mode: C as stored, kept powers of two by the
    # bucket switch. The same section serves every mode (train, decompose, analyze, export).
    config.sd = sd_section(mode="pow2")
    # schedule: "reference" (docs/method.md 1.4), "cosine" (after warmup_steps) or "step" (lr times step_factor
    # every step_epochs epochs, the authors' inference-only schedule). stop_epoch: stop after that many
    # epochs of the `epochs`-long schedule (0: all), e.g. the first 15 of the paper's 200 on a time budget.
    # optimizer: "sgd" (SGD with momentum, the reference) or "adam" (AdamW; the Transformer trains poorly by SGD).
    config.optim = ml_collections.ConfigDict(dict(
        optimizer="sgd", epochs=200, stop_epoch=0, lr=0.1, schedule="reference", warmup_steps=0, step_epochs=30, step_factor=0.5,
        momentum=0.9, weight_decay=5e-4,
        coeff_update="bucket_switch", switch_bar=1, update_threshold=0.0,
        # Bucket switch: restart every counter each epoch (the reference does), and where revived
        # coefficients start: "nearest" (the magnitude the threshold rounds to, 4e-3 -> 2^-8) or "ceil"
        # (the reference's smallest power of two >= threshold, 4e-3 -> 2^-7).
        reset_counters_every_epoch=False, revive_at="nearest",
        # A dense model (model.sd=False) whose kernels are projected onto SD form after every epoch: each
        # kernel the `sd` rules select replaced by C·B of its decomposition with the `sd` options, before
        # the evaluation; with SWA the average too (the authors' inference-only rule).
        project_every_epoch=False,
        # The weight of the compressibility loss of C (mean over SD layers of ||C||_1 / (sqrt(n) ||C||_2)
        # inside the mask, sd_jax.core.compressibility) added to the cross-entropy; 0 = off. SD models only.
        compressibility_weight=0.0,
    ))
    # A checkpoint every every_steps steps and at each evaluation; the keep_last newest and the keep_best
    # best by eval accuracy stay.
    config.ckpt = ml_collections.ConfigDict(dict(every_steps=1000, keep_last=2, keep_best=1))
    # The batch is split over all devices; variables are replicated, except arrays of at least
    # shard_min_size entries (0 = none), split along their last axis for models too big for one device.
    config.sharding = ml_collections.ConfigDict(dict(shard_min_size=0))
    # Evaluation on the eval split every every_steps steps (0 = once an epoch) and at the end; the
    # best checkpoint by eval accuracy is kept (ckpt.keep_best).
    config.eval = ml_collections.ConfigDict(dict(every_steps=0))
    # Stochastic weight averaging (docs/method.md 1.6): one average after each epoch from epoch start_epoch
    # on (counted from 1; 0 = off; reference: 161 of 200 at lr 0.05; the reference schedule then
    # reaches swa.lr at 90 % of start_epoch), batch-norm statistics recomputed over bn_batches
    # training batches (0 = a whole epoch, as the reference) and the average evaluated, each epoch.
    config.swa = ml_collections.ConfigDict(dict(start_epoch=0, lr=0.05, bn_batches=0))
    return config
