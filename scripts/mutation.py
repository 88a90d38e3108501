"""Mutation testing of the core modules with mutmut (``make mutation``; not part of CI: minutes per module).

Each module runs in its own copy of the repository (``build/mutation/<module>/``), with mutmut told to
mutate only that module's files and to run only the fast tests that cover them, so a run finishes on a
small machine. Prints ``module: killed / total`` per module and writes each run's survivors (with their
diffs) to ``build/mutation/<module>/survivors.txt`` for review (docs/testing.md lists the reviewed ones).

    python scripts/mutation.py                  # every module
    python scripts/mutation.py sampling cache   # some
    MUTATION_CHILDREN=2 python scripts/mutation.py combiners
    MUTATION_SAMPLE=250 python scripts/mutation.py plan   # a seeded random sample of the module's mutants
    MUTATION_ONLY="*Batchǁselect* *Batchǁjoin*" python scripts/mutation.py batch   # only these functions

A module whose every mutant would take hours here (``plan``: ~2000 mutants, the covering tests take up to
14 s per mutant) can be measured on a uniform random sample (``MUTATION_SAMPLE=N``, seeded by
``MUTATION_SEED``, default 0): the score printed is then that sample's, with its 95% Wilson interval for
the whole module, and the sample's names are kept in ``build/mutation/<module>/sample.txt``.
``MUTATION_ONLY`` (mutant-name globs, space-separated) restricts a run (and a sample) to some functions.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# module -> (files to mutate, tests that cover them, extra pytest arguments). The tests of the tests
# (``planted``) rebuild functions from their source, which mutmut's trampolines change: left out here.
MODULES: dict[str, tuple[list[str], list[str], list[str]]] = {
    "sampling": (["clearsight/decoding/sampling.py"],
                 ["tests/test_sampling_oracle.py", "tests/test_stop_and_batching.py::"
                  "test_find_stop_earliest_position_wins_not_list_order"], ["-k", "not planted and not request_seeds"]),
    "cache": (["clearsight/evals/cache.py"], ["tests/evals/test_cache.py", "tests/evals/test_cache_records.py"], []),
    "combiners": (["clearsight/mitigations/_branch_common.py", "clearsight/mitigations/vcd.py",
                   "clearsight/mitigations/m3id.py"],
                  ["tests/mitigations/test_combiners_oracle.py",
                   "tests/mitigations/test_branch_common.py::test_plausibility_cut_keeps_exactly_the_tokens_above_beta_max",
                   "tests/mitigations/test_branch_common.py::test_contrast_and_weighted_sum_by_hand",
                   "tests/mitigations/test_vcd.py::test_schedules_by_hand",
                   "tests/mitigations/test_vcd.py::test_diffusion_is_q_sample_and_seeded",
                   "tests/mitigations/test_vcd.py::test_formula_and_cut_by_hand",
                   "tests/mitigations/test_vcd.py::test_defaults_and_cli_parsing",
                   "tests/mitigations/test_m3id.py::test_weight_and_gate_by_hand",
                   "tests/mitigations/test_m3id.py::test_defaults"], []),
    # left out: the tests that run the runner or build the shapes world (seconds each), and the one that
    # reads examples/ (not in the copy)
    "metrics": ([f"clearsight/evals/metrics/{m}.py"
                 for m in ("chair", "pope", "amber", "mme", "partner", "crosscheck")],
                ["tests/evals/test_chair.py", "tests/evals/test_pope_parsers_metrics.py", "tests/evals/test_amber.py",
                 "tests/evals/test_mme.py", "tests/evals/test_partner.py", "tests/evals/test_crosscheck.py"],
                ["-k", "not ground_truth_from_instances and not outside_jsonl and not through_the_runner "
                       "and not shapes_world and not example_job"]),
    # the plan's masks, segments and row operations, through the backends with no model (tests/kernels); CausalMM's
    # vision counterfactual: the one caller of counterfactual_weights without a precomputed grid
    "plan": (["clearsight/kernels/plan.py"],
             ["tests/kernels/test_plan_rows.py", "tests/kernels/test_plan_writers.py", "tests/kernels/test_backends.py",
              "tests/kernels/test_draws_oracle.py", "tests/mitigations/test_causalmm_oracle.py"],
             []),
    # the generation loop's row bookkeeping: no test of it runs without a (tiny) model, so each mutant's run
    # builds one; the cheapest tests that batch, join, select and compact rows
    "batch": (["clearsight/decoding/batch.py"],
              ["tests/test_stop_and_batching.py", "tests/test_mixed_batches.py::test_mixed_batch_equals_solo_runs"
               "[tiny-llava]", "tests/test_engine.py::test_every_mitigation_kind_joins_exactly"], []),
}
# modules imported by the fork server before it forks a mutant's test run (appended to the copy's
# tests/conftest.py): importing inflect takes ~4 s, which every mutant's run would otherwise pay again
PRELOAD: dict[str, list[str]] = {"metrics": ["inflect"]}


def _pyproject(files: list[str], tests: list[str], extra: list[str]) -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    text = text.replace('addopts = "-q --durations=15"', 'addopts = "-q -p no:cacheprovider"')

    def arr(xs: list[str]) -> str:
        return "[" + ", ".join(json.dumps(x) for x in xs) + "]"

    return text + (
        "\n[tool.mutmut]\n"
        'source_paths = ["clearsight"]\n'
        f"only_mutate = {arr(files)}\n"
        f"pytest_add_cli_args_test_selection = {arr(tests + extra)}\n"
        # torch in the test process: fork workers from a server that did not run the tests
        'process_isolation = "forkserver"\n'
        "use_git_change_detection = false\n"
        # a mutant's time limit is 15x its tests' time plus this: tests of milliseconds on a busy machine
        # would otherwise end by timeout (counted as killed) rather than by their assertions
        "timeout_constant = 10.0\n"
    )


def run(module: str, children: int, sample: int = 0, seed: int = 0, only: tuple[str, ...] = ()) -> dict[str, int]:
    files, tests, extra = MODULES[module]
    work = ROOT / "build" / "mutation" / module
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "clearsight", work / "clearsight", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    if PRELOAD.get(module):
        with open(work / "tests" / "conftest.py", "a", encoding="utf-8") as fh:
            fh.write("".join(f"\nimport {name}  # noqa: E402,F401  (preloaded by scripts/mutation.py)\n"
                             for name in PRELOAD[module]))
    (work / "pyproject.toml").write_text(_pyproject(files, tests, extra), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutmut puts mutants/ first itself
    mutmut = [sys.executable, "-m", "mutmut"]
    names: list[str] = []
    if sample or only:
        # a run filtered on a name no mutant has generates the mutants and collects the test stats (kept in
        # mutants/ for the next run), then stops on its "nothing matches" assertion: the names to sample from
        subprocess.run([*mutmut, "run", "--max-children", str(children), "no-such-mutant"], cwd=work, env=env,
                       capture_output=True)
        every = sorted(k for meta in (work / "mutants").rglob("*.py.meta")
                       for k in json.loads(meta.read_text())["exit_code_by_key"])
        if only:  # mutant-name globs (``*`` spans the ``ǁ`` of method names)
            every = [k for k in every if any(fnmatch.fnmatchcase(k, g) for g in only)]
            if not every:
                raise SystemExit(f"error: no mutant of {module} matches {' '.join(only)}")
        names = sorted(random.Random(seed).sample(every, min(sample, len(every)))) if sample else every
        (work / "sample.txt").write_text(
            f"# {len(names)} of {len(every)} mutants, seed {seed}, globs {' '.join(only) or '-'}\n"
            + "".join(f"{n}\n" for n in names), encoding="utf-8")
    subprocess.run([*mutmut, "run", "--max-children", str(children), *names], cwd=work, env=env, check=True)
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=work, env=env, check=True, capture_output=True)
    stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    listing = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, env=env, check=True,
                             capture_output=True, text=True)
    status = {line.split(":")[0].strip(): line.rsplit(":", 1)[1].strip() for line in listing.stdout.splitlines()
              if ":" in line}
    if names:  # the sample's own counts (the other mutants are "not checked")
        counts: dict[str, int] = {}
        for n in names:
            key = {"no tests": "no_tests"}.get(status.get(n, "?"), status.get(n, "?"))
            counts[key] = counts.get(key, 0) + 1
        known = ("killed", "survived", "timeout", "suspicious", "no_tests")
        stats = {k: counts.get(k, 0) for k in known}
        stats["other"] = sum(v for k, v in counts.items() if k not in known)  # e.g. "not checked": not killed
        stats["sample_of"] = len(every)
    survivors = [n for n, st in status.items() if st == "survived" and (not names or n in names)]
    with open(work / "survivors.txt", "w", encoding="utf-8") as fh:
        for name in survivors:
            shown = subprocess.run([*mutmut, "show", name], cwd=work, env=env, capture_output=True, text=True)
            fh.write(f"## {name}\n{shown.stdout}\n")
    return stats


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n (Wilson 1927): the module's score from a sample's."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def main(argv: list[str]) -> int:
    names = argv or list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        print(f"error: unknown module {unknown[0]!r}: choose from {', '.join(MODULES)}", file=sys.stderr)
        return 2
    children = int(os.environ.get("MUTATION_CHILDREN", "2"))
    sample, seed = int(os.environ.get("MUTATION_SAMPLE", "0")), int(os.environ.get("MUTATION_SEED", "0"))
    only = tuple(os.environ.get("MUTATION_ONLY", "").split())
    for name in names:
        s = run(name, children, sample, seed, only)
        total = s["killed"] + s["survived"] + s.get("timeout", 0) + s.get("suspicious", 0) + s.get("no_tests", 0)
        total += s.get("other", 0)
        caught = s["killed"] + s.get("timeout", 0)
        line = f"{name}: {caught} / {total} killed ({100 * caught / max(total, 1):.0f}%)"
        if "sample_of" in s:
            low, high = wilson(caught, total)
            line += f" of {total} mutants chosen from {s['sample_of']} (95% CI {low:.0%}-{high:.0%} if a random sample)"
        print(f"{line}, stats {json.dumps(s)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
