"""The numbers themselves, not a hash of the source: every registered head, and every setting that
changes what is computed, trained briefly in float64 on a synthetic cache, each number compared
with tests/numerics/goldens.json (docs/numerics.md). Re-record: `python -m tests.numerics.record`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

import heads
from heads import registry
from core.cli_fields import option
from heads.base import HeadConfig
from heads.probe import Probe
from tests.numerics import cases, golden
from tests.numerics.cases import CASES
from train.numerics import NUMERICS_VERSION

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> golden.Runner:
    return golden.Runner(tmp_path_factory.mktemp("numerics"))


@pytest.fixture(scope="module")
def goldens() -> dict:
    return golden.read(golden.GOLDENS, {"version": None, "cases": {}})


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_computes_its_golden_numbers(case, runner, goldens):
    golden.check(case, runner.run(case), goldens)


def test_one_and_two_threads_compute_the_goldens(runner, goldens):
    case = next(c for c in CASES if c.name == "spp_scl default")
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            golden.check(case, runner.run(case), goldens)
    finally:
        torch.set_num_threads(before)


def test_every_head_and_setting_that_changes_a_number_has_a_case():
    assert cases.missing() == []


def test_a_head_without_a_case_fails_the_coverage_test(monkeypatch):
    @dataclass
    class DummyConfig(HeadConfig):
        width: int = option(3, "a field of its own")

    monkeypatch.setitem(registry._HEADS, "numerics_dummy", (Probe, DummyConfig))
    assert "numerics_dummy" in heads.available()
    assert cases.missing() == ["head numerics_dummy: no default case",
                               "head numerics_dummy: field dim has no case (or a reason in NO_NUMBERS)",
                               "head numerics_dummy: field dropout has no case (or a reason in NO_NUMBERS)",
                               "head numerics_dummy: field width has no case (or a reason in NO_NUMBERS)"]


def test_every_case_has_a_golden_and_every_golden_a_case(goldens):
    names = {c.name for c in CASES if not c.same_as}
    assert sorted(names - set(goldens["cases"])) == [], f"record them: {golden.RECORD}"
    assert sorted(set(goldens["cases"]) - names) == [], f"cases gone: record again ({golden.RECORD})"


def test_each_setting_moves_some_number_of_its_head(goldens):
    """A setting's case that computes its head's default numbers would guard nothing."""
    assert golden.unmoved(goldens["cases"]) == []


def test_the_goldens_are_those_of_the_numerics_version(goldens):
    """A golden value changes only with NUMERICS_VERSION: the ledger (versions.json) holds the
    digest of every golden as recorded under each version."""
    assert goldens["version"] == NUMERICS_VERSION, (
        f"the goldens are of version {goldens['version']}, train/numerics.py says {NUMERICS_VERSION}: "
        f"record them ({golden.RECORD})")
    ledger = golden.read(golden.LEDGER, {}).get(str(NUMERICS_VERSION), {})
    changed = [name for name, values in goldens["cases"].items() if ledger.get(name) != golden.digest(values)]
    assert changed == [], (f"goldens changed under version {NUMERICS_VERSION}: {', '.join(changed)}: bump "
                           f"NUMERICS_VERSION in train/numerics.py and record them ({golden.RECORD})")


def test_a_difference_names_the_case_seed_epoch_quantity_golden_and_got(goldens):
    case = next(c for c in CASES if c.name == "spp_scl alpha=0.5")
    got = copy.deepcopy(goldens["cases"][case.name])
    loss = got["seeds"]["1"]["epochs"][1]["losses"]
    loss["ce"] *= 1 + 2e-8
    got["seeds"]["1"]["best_epoch"] += 1
    with pytest.raises(AssertionError) as e:
        golden.check(case, got, goldens)
    message = str(e.value)
    assert message.startswith("head spp_scl, head field alpha = 0.5: 2 number(s) differ from the golden "
                              "'spp_scl alpha=0.5'"), message
    assert f"seed 1, epoch 2: losses.ce: golden {loss['ce'] / (1 + 2e-8)!r}, got {loss['ce']!r} (relative " \
           "difference 2.0e-08)" in message, message
    assert "seed 1: best_epoch: golden" in message, message
    loss["ce"] /= 1 + 2e-8 - 5e-9  # within the tolerance
    got["seeds"]["1"]["best_epoch"] -= 1
    golden.check(case, got, goldens)
