"""What the numerics tests train: one case per head (its defaults) and one per non-default value
of every setting that changes a number, on a head that reads it; and, in one list with a reason
each, the settings that change no number. `missing()` is the coverage check: a head, a head
config field, a TrainConfig field or a `train_run` parameter with neither a case nor a reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields

import heads
from train.config import TrainConfig
from train.data import load_data
from train.runs import train_run

# Every case's TrainConfig, but for its own setting: small and fast (3 epochs of 4 batches), the
# StepLR decay inside the run (after epoch 2), two label-blind test orders. The rest is
# TrainConfig's defaults (the synthetic data set trains with MVSA-Single's: select weighted_f1).
BASE = {"epochs": 3, "seeds": (1,), "batch_size": 12, "lr": 2e-3, "lr_step": 2, "eval_orders": 2}

TRAIN, HEAD, MODE = "train", "head", "mode"  # a TrainConfig field, a field of the head's config, a way to run
SPLITS = "moved"  # the value of the `splits` case: the synthetic cache's folder of other split files
CUT_AFTER = 2  # the resume case: Ctrl-C after this epoch, then the same run again


@dataclass(frozen=True)
class Case:
    head: str
    kind: str = "default"  # TRAIN, HEAD, MODE, or "default": the head with every default
    setting: str = ""
    value: object = None
    also: dict = field(default_factory=dict)  # further TrainConfig values the setting needs to act
    same_as: str | None = None  # a mode: must compute this case's numbers (it has no golden of its own)
    vs: str | None = None  # with `also`: the case of those values alone, whose numbers the setting must move

    @property
    def reference(self) -> str:
        """The case whose numbers this setting's must differ from: its head's defaults, or `vs`."""
        return self.vs or f"{self.head} default"

    @property
    def name(self) -> str:
        if self.kind == "default":
            return f"{self.head} default"
        if self.kind == MODE:
            return f"{self.head} {self.setting}"
        value = ",".join(map(str, self.value)) if isinstance(self.value, tuple) else self.value
        return f"{self.head} {self.setting}={value}"

    def __str__(self) -> str:
        if self.kind == "default":
            return f"head {self.head}, default settings"
        what = {TRAIN: "setting", HEAD: "head field", MODE: "run mode"}[self.kind]
        also = f" (with {', '.join(f'{k}={v!r}' for k, v in self.also.items())})" if self.also else ""
        same = f" (must equal {self.same_as!r})" if self.same_as else ""
        return f"head {self.head}, {what} {self.setting} = {self.value!r}{also}{same}"

    def config(self, splits=None) -> TrainConfig:
        """The case's TrainConfig, without cache or out (`splits`: the folder the SPLITS value stands for)."""
        train = {**BASE, **self.also}
        head_values = {}
        if self.kind == TRAIN:
            train[self.setting] = splits if self.setting == "splits" else self.value
        elif self.kind == HEAD:
            head_values[self.setting] = self.value
        return TrainConfig(head=self.head, head_config=heads.build_config(self.head, head_values), **train)


def _head(head: str, **values) -> list[Case]:
    return [Case(head, HEAD, k, v) for k, v in values.items()]


def _train(head: str, **values) -> list[Case]:
    return [Case(head, TRAIN, k, v) for k, v in values.items()]


CASES: list[Case] = [
    *(Case(h) for h in ("clip_ca_cg", "hybrid_fusion", "image_only", "late_concat", "probe", "spp_scl", "text_only")),
    # head fields, each non-default value once (a choice field: each other choice)
    *_head("spp_scl", dim=16, dropout=0.1, text_layers=2, hierarchical_attention=False, cmf=False,
           cmf_scope="sample", lambda_ce=2.0, temperature=0.2, alpha=0.5, two_step=False, clm=False, intra=False,
           supcon_official=True),
    # the official gate's rounding acts only where c == int(alpha * c_mask): on batches of 8 here
    Case("spp_scl", HEAD, "gate_floor", True, also={"batch_size": 8}, vs="spp_scl batch_size=8"),
    Case("spp_scl", HEAD, "modalities", "text"), Case("spp_scl", HEAD, "modalities", "image"),
    Case("probe", HEAD, "modalities", "text"), Case("probe", HEAD, "modalities", "image"),
    *_head("clip_ca_cg", dim=64, dropout=0.1, clip=False, ca=False, cg=False, heads=2, lam=0.3, clip_weight=0.5,
           temperature=0.2, learn_temperature=False),
    *_head("hybrid_fusion", dim=32, dropout=0.1, heads=2, self_attention=False, cross_attention=False, birau=False,
           rau_steps=1, dynamic_weights=False, decision_fusion=False, aux_weight=0.25),
    *_head("image_only", dim=16, dropout=0.1), *_head("late_concat", dim=16, dropout=0.1),
    *_head("text_only", dim=16, dropout=0.1),
    # TrainConfig fields, on a head they act on: `official` (its parts are fields of their own
    # besides; the zero-grad step and last_epoch_test are its alone), eval orders and their batch
    # size on a batch-dependent head, patience where dev stalls
    *_train("spp_scl", official=True, protocol_check=True, eval_seed=7, eval_batch_size=5, batch_size=8),
    *_train("probe", balanced=True, text_views=True, epochs=4, lr=3e-3, weight_decay=1e-2, lr_step=1, lr_gamma=0.25,
            eval_orders=3, seeds=(1, 2), splits=SPLITS),
    # macro and weighted F1 pick the same epoch of every head's seed 1; of the probe's seed 2 they do not
    Case("clip_ca_cg", TRAIN, "select", "accuracy"),
    Case("probe", TRAIN, "select", "macro_f1", also={"seeds": (1, 2)}, vs="probe seeds=1,2"),
    Case("image_only", TRAIN, "patience", 1),
    # ways to run: the cache streamed from the shards (a memory budget of 0 bytes), seeds in two
    # worker processes, a run cut by Ctrl-C and resumed, the robustness conditions scored
    Case("spp_scl", MODE, "streamed", 0, same_as="spp_scl default"),  # value: the memory budget
    Case("probe", MODE, "jobs", 2, also={"seeds": (1, 2)}, same_as="probe seeds=1,2"),  # value: worker processes
    Case("spp_scl", MODE, "resume", CUT_AFTER, same_as="spp_scl default"),  # value: the epoch Ctrl-C follows
    Case("spp_scl", MODE, "robustness", True),
]

# What each mode exercises, as a parameter of the library calls under `train`.
MODE_PARAMS = {"streamed": "load_data(memory)", "jobs": "train_run(jobs)", "robustness": "train_run(robust)"}

# Settings that change no number, each with why (one list: TrainConfig fields, head config
# fields, parameters of `train_run` and `load_data`).
NO_NUMBERS = {
    "TrainConfig.dataset": "names the data in the cache; its per-family defaults resolve into batch_size, lr, "
                           "lr_step, select and lambda_ce, each a case of its own",
    "TrainConfig.cache_dir": "where the caches are (a path)",
    "TrainConfig.text_encoder": "which text cache to read (a name); the features it holds are the data",
    "TrainConfig.image_encoder": "which image cache to read (a name); the features it holds are the data",
    "TrainConfig.out": "the run folder (a path)",
    "probe.dim": "the probe is one linear layer on pooled features: no embedding width",
    "probe.dropout": "the probe is one linear layer on pooled features: no dropout",
    "train_run(on_epoch)": "a callback that sees each epoch's log",
    "train_run(on_seed_end)": "a callback that sees each finished seed",
    "train_run(t0)": "the wall clock's start, for wall_seconds",
    "train_run(threads)": "torch threads per --jobs worker: test_threads_agree checks 1 and 2 threads against "
                          "the goldens",
    "train_run(dtype)": "the goldens are float64, the arithmetic to its precision; float32's last bits are not "
                        "guarded (docs/numerics.md)",
    "train_run(report_to)": "trackers write what the run computed (train/tracking.py); they read, never change, "
                            "a number",
    "load_data(cfg)": "the config: its fields are above",
}
STRUCTURE = {"TrainConfig.head": "every registered head has a default case",
             "TrainConfig.head_config": "every field of every head's config has a case or a reason",
             "train_run(cfg)": "its fields are TrainConfig's", "train_run(data)": "the synthetic cache"}


def _params(fn, label: str) -> list[str]:
    return [f"{label}({p})" for p in inspect.signature(fn).parameters]


def missing() -> list[str]:
    """Every head, head config field, TrainConfig field and run parameter that has neither a case
    nor a reason in NO_NUMBERS, and every NO_NUMBERS entry that names nothing (empty: covered)."""
    covered = {(c.head, c.kind, c.setting) for c in CASES}
    settings = {c.setting for c in CASES if c.kind == TRAIN}
    gaps, known = [], set(STRUCTURE)
    for head in heads.available():
        if (head, "default", "") not in covered:
            gaps.append(f"head {head}: no default case")
        for f in fields(heads.config_class(head)):
            known.add(f"{head}.{f.name}")
            if (head, HEAD, f.name) not in covered and f"{head}.{f.name}" not in NO_NUMBERS:
                gaps.append(f"head {head}: field {f.name} has no case (or a reason in NO_NUMBERS)")
    for f in fields(TrainConfig):
        known.add(f"TrainConfig.{f.name}")
        if f.name not in settings and f"TrainConfig.{f.name}" not in NO_NUMBERS | STRUCTURE:
            gaps.append(f"TrainConfig.{f.name} has no case (or a reason in NO_NUMBERS)")
    for param in _params(train_run, "train_run") + _params(load_data, "load_data"):
        known.add(param)
        if param not in MODE_PARAMS.values() and param not in NO_NUMBERS | STRUCTURE:
            gaps.append(f"{param} has no case (or a reason in NO_NUMBERS)")
    gaps += [f"NO_NUMBERS names {k}, which is no setting" for k in NO_NUMBERS if k not in known]
    gaps += [f"{c}: {c.value!r} is the default" for c in CASES if c.kind in (TRAIN, HEAD) and c.value == _default(c)]
    return gaps


def _default(case: Case) -> object:
    if case.kind == TRAIN:
        return BASE.get(case.setting, next(f.default for f in fields(TrainConfig) if f.name == case.setting))
    return getattr(heads.build_config(case.head), case.setting)
