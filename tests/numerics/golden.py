"""Running a numerics case through the real code, and holding its numbers to the goldens.

A case trains in float64 with `train_run` into a run folder of its own (so --jobs, resume and
robustness go through the code a command runs), and its numbers are read unrounded from what
the run hands back and writes (`SeedResult`, metrics.json, robustness.json), never from log.csv.
Discrete values (epochs, the selected epoch, the step-two rate, predictions, integer buffers)
must be equal; every other number within TOLERANCE of its golden.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from core.errors import Interrupted
from train.data import load_data, modalities
from train.runs import train_run
from tests.numerics import synth
from tests.numerics.cases import CASES, HEAD, MODE, TRAIN, Case

# float64 training of these cases: 1 and 2 threads agree to ~1e-15 in every loss and score and to
# <1e-10 in the weights (see `fingerprint`); a learning rate 0.1% off moves the losses by 6e-6 and
# more, one loss term scaled by 1.0001 moves itself by 1e-4 and the others by 8e-7 and more: a
# relative 1e-8 sits two orders of magnitude from both (docs/numerics.md)
TOLERANCE = {"rel": 1e-8, "abs": 1e-12}
EXACT = {"epoch", "best_epoch", "step_two_rate", "test_pred"}  # discrete, though some are floats
HERE = Path(__file__).resolve().parent
GOLDENS, LEDGER = HERE / "goldens.json", HERE / "versions.json"
RECORD = "python -m tests.numerics.record"
SUMMARY = ("dev", "test", "test_order_std", "leak_check", "last_epoch_test")  # of metrics.json


class Runner:
    """Trains cases on one synthetic cache under `root`, each cache view loaded once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.cache = synth.write(self.root / "data")
        self._data: dict = {}
        self._runs = 0

    def config(self, case: Case):
        c = self.cache
        self._runs += 1
        return replace(case.config(c.splits), dataset=c.dataset, cache_dir=c.cache_dir, text_encoder=c.text_encoder,
                       image_encoder=c.image_encoder, out=self.root / "runs" / f"{self._runs:03d}")

    def data(self, cfg, memory: int | None = None):
        key = (modalities(cfg), cfg.text_views, cfg.splits, memory)
        if key not in self._data:
            self._data[key] = load_data(cfg, memory)
        return self._data[key]

    def run(self, case: Case) -> dict:
        """The case's numbers, as the goldens hold them."""
        mode = case.setting if case.kind == MODE else None
        cfg = self.config(case)
        data = self.data(cfg, case.value if mode == "streamed" else None)
        seeds: dict = {}
        kw = {"dtype": torch.float64, "on_seed_end": lambda r: seeds.__setitem__(r.seed, r)}
        if mode == "jobs":
            kw.update(jobs=case.value, threads=1)
        if mode == "robustness":
            kw["robust"] = True
        if mode == "resume":
            cut(cfg, data, case.value)
        return case_values(train_run(cfg, data, **kw), seeds)


def cut(cfg, data, after: int) -> None:
    """Ctrl-C once epoch `after` is saved, as a user would press it."""
    def ctrl_c(log):
        if log.epoch == after:
            raise KeyboardInterrupt

    try:
        train_run(cfg, data, ctrl_c, dtype=torch.float64)
    except Interrupted:
        return
    raise AssertionError(f"the run was not cut after epoch {after}")


def case_values(result, seeds: dict) -> dict:
    """Every seed's numbers, the summary over seeds and, if scored, the robustness conditions."""
    metrics = result.metrics
    out = {"seeds": {str(s): seed_values(r) for s, r in sorted(seeds.items())},
           "summary": {k: metrics[k] for k in SUMMARY if k in metrics}}
    if "protocol_check" in metrics:
        out["summary"]["protocol_check"] = {k: v for k, v in metrics["protocol_check"].items()
                                            if k not in ("about", "per_seed")}
    robustness = Path(result.out) / "robustness.json"
    if robustness.is_file():
        out["robustness"] = json.loads(robustness.read_text())["per_seed"]
    return json.loads(json.dumps(out))  # plain JSON values, as the goldens read back


def seed_values(r) -> dict:
    """A seed's numbers: each epoch's learning rate, loss terms, step-two rate and dev (and test in
    file order with --protocol-check), the selected epoch and its scores, the test predictions,
    and a fingerprint of the selected weights."""
    epochs = [{"epoch": log.epoch, "lr": log.lr, "losses": log.losses, "step_two_rate": log.step_two_rate,
               "dev": log.dev, **({"test_file_order": log.test_file_order} if log.test_file_order else {})}
              for log in r.log]
    out = {"epochs": epochs, "best_epoch": r.best_epoch, "dev": r.dev, "test": r.test, "test_pred": list(r.test_pred),
           "step_two_rate": r.step_two_rate, "weights": fingerprint(r.state)}
    out.update({k: getattr(r, k) for k in ("leak_check", "last_epoch_test", "protocol_check")
                if getattr(r, k) is not None})
    return out


def fingerprint(state: dict) -> dict:
    """Per module of the weights (the first part of a weight's name): the sums of its values' positive
    parts, of their negative parts' magnitudes and of their squares, each rounded once (math.fsum, in
    no order of torch's), and the sum of its integer buffers (BatchNorm's step counts) where it has any.

    Sums of magnitudes, not the plain sum: a bias that a BatchNorm follows gets a gradient of rounding
    noise only, which AdamW's eps turns into steps of ~1e-9, so its value differs by that much between
    thread counts while no output does; against a module's magnitudes that is <1e-10, within TOLERANCE,
    where a plain sum that cancels to near zero would magnify it past any tolerance."""
    groups: dict[str, list] = {}
    for name, v in state.items():
        floats, ints = groups.setdefault(name.split(".")[0], [[], []])
        (floats if v.is_floating_point() else ints).extend(v.flatten().tolist())
    return {k: [math.fsum(max(x, 0.0) for x in f), math.fsum(max(-x, 0.0) for x in f), math.fsum(x * x for x in f)]
            + ([sum(i)] if i else []) for k, (f, i) in groups.items()}


# --- comparing --------------------------------------------------------------------------------

def differences(golden, got, where: tuple = (), quantity: tuple = (), exact: bool = False) -> list[tuple]:
    """(where, quantity, golden, got) of every number that differs beyond TOLERANCE (an exact
    one at all), and of every key or list item one side lacks; `where` names the seed and epoch."""
    if isinstance(golden, dict) and isinstance(got, dict):
        out = []
        for k in list(golden) + [k for k in got if k not in golden]:
            if k not in golden or k not in got:
                out.append((where, quantity + (k,), golden.get(k, "(none)"), got.get(k, "(none)")))
            elif quantity == () and k == "seeds":
                for s in sorted(set(golden[k]) | set(got[k])):
                    out += differences(golden[k].get(s, "(none)"), got[k].get(s, "(none)"), where + (f"seed {s}",))
            else:
                out += differences(golden[k], got[k], where, quantity + (k,), exact or k in EXACT)
        return out
    if isinstance(golden, list) and isinstance(got, list) and len(golden) == len(got):
        if quantity[-1:] == ("epochs",):
            return [d for g, x in zip(golden, got)
                    for d in differences(g, x, where + (f"epoch {g.get('epoch')}",), (), exact)]
        return [d for i, (g, x) in enumerate(zip(golden, got)) for d in differences(g, x, where, quantity + (i,), exact)]
    return [] if same(golden, got, exact) else [(where, quantity, golden, got)]


def same(golden, got, exact: bool = False) -> bool:
    if isinstance(golden, float) and isinstance(got, float) and not exact:
        return math.isclose(got, golden, rel_tol=TOLERANCE["rel"], abs_tol=TOLERANCE["abs"])
    return type(golden) is type(got) and golden == got


def describe(difference: tuple) -> str:
    """'seed 1, epoch 2: losses.clm: golden 3.1, got 3.2 (relative difference 3.2e-02)'."""
    where, quantity, golden, got = difference
    name = "".join(f"[{q}]" if isinstance(q, int) else f".{q}" for q in quantity).lstrip(".") or "the seed"
    rel = ""
    if isinstance(golden, (int, float)) and isinstance(got, (int, float)) and golden:
        rel = f" (relative difference {abs(got - golden) / abs(golden):.1e})"
    return f"{', '.join(where) or 'summary'}: {name}: golden {golden!r}, got {got!r}{rel}"


def report(case: Case, found: list[tuple], against: str, most: int = 8) -> str:
    """One message for a case's differences, the first `most` of them one a line."""
    lines = [describe(d) for d in found[:most]] + ([f"... and {len(found) - most} more"] if len(found) > most else [])
    return (f"{case}: {len(found)} number(s) differ from the golden {against!r} (tolerance relative "
            f"{TOLERANCE['rel']:g}, absolute {TOLERANCE['abs']:g}; discrete values exactly):\n  " + "\n  ".join(lines))


def check(case: Case, got: dict, goldens: dict) -> None:
    """AssertionError naming the case and every difference from its golden (or from the golden of
    the case it must equal)."""
    against = case.same_as or case.name
    if against not in goldens["cases"]:
        raise AssertionError(f"{case}: no golden {against!r} in {GOLDENS.name}: record it with `{RECORD}`")
    found = differences(goldens["cases"][against], got)
    if found:
        raise AssertionError(report(case, found, against))


def unmoved(cases: dict) -> list[str]:
    """Each case of a setting (of `cases`: name -> values) that computes its head's default numbers:
    it guards nothing; pick another value, or a head the setting acts on."""
    return [f"{c}: computes the numbers of {c.reference!r} (within tolerance): pick another value or head"
            for c in CASES if c.kind in (TRAIN, HEAD) and c.name in cases and c.reference in cases
            and not differences(cases[c.reference], cases[c.name])]


# --- the files --------------------------------------------------------------------------------

def read(path: Path, empty: dict) -> dict:
    return json.loads(path.read_text()) if path.is_file() else empty


def write(path: Path, obj: dict) -> None:
    """The goldens compact (a container on one line where it fits), the ledger one case a line."""
    path.write_text((compact(obj) if path == GOLDENS else json.dumps(obj, indent=1)) + "\n")


def compact(obj, level: int = 0, width: int = 150) -> str:
    """JSON with a container on one line where that line, indented, fits in `width` characters or it
    holds plain values only, and each member on a line of its own elsewhere; floats as json.dumps
    writes them (they read back exactly)."""
    line = json.dumps(obj)
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else []
    if len(line) + level < width or not any(isinstance(v, (dict, list)) and v for v in values):
        return line
    pad = " " * (level + 1)
    if isinstance(obj, dict):
        members = [f"{pad}{json.dumps(str(k))}: {compact(v, level + 1, width)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(members) + f"\n{' ' * level}}}"
    return "[\n" + ",\n".join(f"{pad}{compact(v, level + 1, width)}" for v in obj) + f"\n{' ' * level}]"


def digest(values: dict) -> str:
    """What the ledger (versions.json) holds of a case's golden values, exactly as recorded."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
