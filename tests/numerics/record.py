"""Record the numerics goldens: `python -m tests.numerics.record` from the repository root.

Trains every case of tests/numerics/cases.py (float64, one thread) and writes
tests/numerics/goldens.json and the ledger tests/numerics/versions.json:

- a case without a golden (a new head or setting) is added, under the current NUMERICS_VERSION;
- a case whose numbers are within the tolerance of its golden keeps its golden as it is, so
  recording on another machine changes nothing;
- a case whose numbers moved is refused, naming what moved, unless NUMERICS_VERSION in
  train/numerics.py was bumped past the goldens' version: then every golden is rewritten and
  the ledger gains the new version's entry;
- a mode (streamed, --jobs, resume) must compute the numbers of the case it stands for, and a
  setting's case must move some number of its head's default case, else nothing is written.

`--only TEXT` records only the cases whose name contains TEXT (the others keep their goldens).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from core import threads  # noqa: E402

threads.policy()  # before torch loads

import torch  # noqa: E402

from tests.numerics import golden  # noqa: E402
from tests.numerics.cases import CASES  # noqa: E402
from train.numerics import NUMERICS_VERSION  # noqa: E402


def record(only: list[str], log=print) -> int:
    """Record the goldens (see the module's docstring); 0 when written, 1 when refused."""
    goldens = golden.read(golden.GOLDENS, {"version": NUMERICS_VERSION, "cases": {}})
    ledger = golden.read(golden.LEDGER, {})
    if NUMERICS_VERSION < goldens["version"]:
        log(f"NUMERICS_VERSION {NUMERICS_VERSION} is older than the goldens' version {goldens['version']}")
        return 1
    bump = NUMERICS_VERSION > goldens["version"]
    if bump and only:
        log(f"NUMERICS_VERSION {NUMERICS_VERSION} is new: record every case (without --only)")
        return 1
    old, new, refused = goldens["cases"], {}, []
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="numerics-") as tmp:
        runner = golden.Runner(Path(tmp))
        for case in CASES:
            if only and not any(text in case.name for text in only):
                continue
            got = runner.run(case)
            if case.same_as:
                found = golden.differences(new.get(case.same_as) or old.get(case.same_as), got)
                refused += [golden.report(case, found, case.same_as)] if found else []
                continue
            moved = golden.differences(old[case.name], got) if case.name in old else []
            new[case.name] = old[case.name] if case.name in old and (not moved or not bump) else got
            if moved and not bump:
                refused.append(golden.report(case, moved, case.name) + f"\n  goldens moved under version "
                               f"{goldens['version']}: bump NUMERICS_VERSION in train/numerics.py if the arithmetic "
                               "changed on purpose, then record again")
            log(f"{case.name}: {'moved' if moved else 'kept' if case.name in old and not bump else 'recorded'}")
    cases = {c.name: new.get(c.name, old.get(c.name)) for c in CASES if not c.same_as and c.name in new | old}
    refused += golden.unmoved(cases)
    if refused:
        log("\n".join(refused) + "\nnothing written")
        return 1
    entry = {} if bump else ledger.get(str(NUMERICS_VERSION), {})
    ledger[str(NUMERICS_VERSION)] = {**entry, **{name: golden.digest(v) for name, v in cases.items()}}
    golden.write(golden.GOLDENS, {"version": NUMERICS_VERSION, "tolerance": golden.TOLERANCE, "record": golden.RECORD,
                                  "cases": cases})
    golden.write(golden.LEDGER, ledger)
    log(f"{len(cases)} goldens of version {NUMERICS_VERSION} in {golden.GOLDENS}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="TEXT", help="cases whose name contains TEXT")
    return record(ap.parse_args(argv).only)


if __name__ == "__main__":
    sys.exit(main())
