"""Tables and verdicts across runs and arms: what differs from the baseline, and by how much.

Reads only what store wrote (run.json and the CSVs), so it works on old runs and
on runs copied from other machines. The verdict rule is the run's own:

    equivalent  when  max_exact_err <= rel_tolerance(dtype, N, exact_floor)   (record/verdict.py)
                  or  max_abs_grad_err <= atol                  (only with --atol)

``--rtol`` replaces the measured tolerance by one number. An arm that
expects ``differs`` is not checked in a trial whose sweep sets N = 1: with one
micro-batch there is nothing to accumulate, so an accumulation mistake has
nothing to act on. (An arm that sets N = 1 itself, like zero_grad after-backward,
is checked.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from gradlab.errors import GradlabError
from gradlab.record import schema, verdict
from gradlab.record.schema import fmt
from gradlab.record.store import Run
from gradlab.record.verdict import Verdict, missing

FORMATS = ("table", "csv", "json", "md")

HEADERS = schema.HEADERS
# the numbers a reader looks at first; --all adds every other column
KEY_METRICS = ("max_rel_grad_err", "max_exact_err", "rel_tolerance", "min_grad_cosine",
               "max_rel_lr_diff", "final_loss",
               "loss_diff", "final_test_accuracy", *schema.COST_METRICS)
# shown as well when the arms compute in different precisions, or sum in a float32 buffer
PRECISION_METRICS = ("exact_floor", "accum_rise", "accum_bound", "skipped_steps",
                     "cuda_peak_bytes")
# key metrics shown only where some arm is not 0: most runs have no learning-rate schedule
SHOWN_WHEN_NONZERO = ("max_rel_lr_diff",)
OUTCOME = ("expect", "verdict", "check")
# columns that say which row is which rather than what was measured
IDENTITY = ("run", "trial", "arm", "micro_batch")
# columns compare keeps for itself: neither settings nor metrics
BOOKKEEPING = ("baseline", "rel_tolerance", "exact_floor", "batch_size", "run_checks",
               "failed_checks",
               "swept_accum_steps")
# metrics that the run measured along the way, and so can be read at an earlier step
STEP_METRICS = schema.METRICS


# ----------------------------------------------------------------------------- rows

def arm_rows(runs: list[Run]) -> pd.DataFrame:
    """One row per (run, trial, arm): summary.csv joined with every setting from run.json."""
    frames = []
    for run in runs:
        summary = run.table("summary")
        settings = run.arm_settings()
        extra = [c for c in settings if c not in summary or c in ("trial", "arm")]
        rows = summary.merge(settings[extra], on=["trial", "arm"], how="left")
        rows.insert(0, "run", run.name)
        # the trial's sweep point without its seed: rows alike in it and the arm are repeats
        point = {t["trial"]: ", ".join(f"{k}={v}" for k, v in t.get("swept", {}).items()
                                       if k != "seed") for t in run.meta["trials"]}
        rows["sweep_point"] = rows["trial"].map(point)
        # N where the sweep sets it: the baseline's own accum_steps is 1 in every trial
        swept_n = {t["trial"]: t.get("swept", {}).get("accum_steps") for t in run.meta["trials"]}
        rows["swept_accum_steps"] = rows["trial"].map(swept_n)
        frames.append(rows.merge(run_checks(run), on=["trial", "arm"], how="left"))
    rows = pd.concat(frames, ignore_index=True)
    rows["precision"] = [verdict.precision_of(r) for r in rows.to_dict("records")]
    rows["baseline"] = rows["baseline"].astype(bool)
    rows["expect"] = rows["expect"].astype(object).fillna("").astype(str)
    rows["run_checks"] = rows["run_checks"].fillna(0).astype(int)
    rows["failed_checks"] = rows["failed_checks"].fillna("")
    return rows


def run_checks(run: Run) -> pd.DataFrame:
    """Per (trial, arm): how many checks the run itself recorded, and the failed ones named."""
    checks = run.table("checks")
    if checks is None:
        return pd.DataFrame(columns=["trial", "arm", "run_checks", "failed_checks"])
    checks = checks.assign(failed=[
        "" if passed else f"'{name}' ({fmt(value)} > tolerance {fmt(tol)})"
        for name, value, tol, passed in zip(checks["check"], checks["value"],
                                            checks["tolerance"], checks["passed"].astype(bool),
                                            strict=True)])
    return checks.groupby(["trial", "arm"]).agg(
        run_checks=("check", "size"),
        failed_checks=("failed", lambda f: "; ".join(x for x in f if x))).reset_index()


def setting_columns(runs: list[Run], rows: pd.DataFrame) -> list[str]:
    """The settings of the arms (run.json), in the order a spec lists them."""
    names = dict.fromkeys(k for run in runs for t in run.meta["trials"]
                          for arm in t["arms"].values() for k in arm["settings"])
    return [c for c in names if c in rows]


def differing(rows: pd.DataFrame, columns) -> list[str]:
    """The columns whose value is not the same in every row."""
    return [c for c in columns if c in rows and rows[c].astype(str).nunique(dropna=False) > 1]


def metrics_at(runs: list[Run], rows: pd.DataFrame, step: int) -> pd.DataFrame:
    """Replace the end-of-run metrics by their values at ``step`` (worst probe up to it),
    computed by the same summary function the run used at its end."""
    for run in runs:
        last = int(run.table("steps")["step"].max())
        if step > last:
            raise GradlabError(f"--at-step {step} is past the end of run '{run.name}' "
                               f"({last} steps); choose a step from 1 to {last}")
    measured = []
    for run in runs:
        upto = {name: _records_by_arm(run.table(name), step)
                for name in ("steps", "probe", "eval", "buffers")}
        for key, steps in upto["steps"].items():
            metrics = schema.summarise(steps, upto["probe"].get(key, []),
                                       upto["eval"].get(key, []), upto["buffers"].get(key, []))
            measured.append({"run": run.name, "trial": key[0], "arm": key[1], **metrics})
    replaced = [c for c in STEP_METRICS if c in rows]
    return rows.drop(columns=replaced).merge(
        pd.DataFrame(measured)[["run", "trial", "arm", *replaced]],
        on=["run", "trial", "arm"], how="left")


def _records_by_arm(table: pd.DataFrame | None, step: int) -> dict[tuple, list[dict]]:
    """A table's rows up to ``step``, in step order, grouped by (trial, arm)."""
    if table is None:
        return {}
    upto = table[table["step"] <= step].sort_values("step", kind="stable")
    return {key: group.to_dict("records")
            for key, group in upto.groupby(["trial", "arm"], sort=False)}


def loss_against(runs: list[Run], rows: pd.DataFrame, reference: str,
                 step: int | None) -> pd.DataFrame:
    """|loss - reference's loss| / |reference's loss| at ``step`` (default: the last)."""
    for run in runs:
        arms = set(run.table("summary")["arm"])
        if reference not in arms:
            raise GradlabError(f"--baseline {reference}: run '{run.name}' has no arm of that "
                               f"name; its arms are {', '.join(sorted(arms))}")
    parts = []
    for run in runs:
        steps = run.table("steps")
        steps = steps[steps["step"] <= step] if step else steps
        loss = steps.sort_values("step").groupby(["trial", "arm"])["loss"].last().reset_index()
        ref = loss[loss["arm"] == reference][["trial", "loss"]].rename(columns={"loss": "ref"})
        loss = loss.merge(ref, on="trial", how="left")
        loss["loss_diff"] = (loss["loss"] - loss["ref"]).abs() / loss["ref"].abs()
        parts.append(loss[["trial", "arm", "loss_diff"]].assign(run=run.name))
    return rows.merge(pd.concat(parts), on=["run", "trial", "arm"], how="left")


# ----------------------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class Tolerance:
    rtol: float | None = None  # replaces the measured tolerance (verdict.rel_tolerance)
    atol: float | None = None  # an arm within atol on max_abs_grad_err is equivalent too


def expectation(row: pd.Series) -> str:
    """Did the arm do what its spec expects? ok, FAIL, n/a (differs at a sweep's N = 1) or ''."""
    expect = row["expect"]
    if not expect:
        return ""
    if expect == Verdict.DIFFERS and row["swept_accum_steps"] == 1:
        return "n/a"
    return "ok" if row["verdict"] == expect else "FAIL"


def check(row: pd.Series) -> str:
    """The expectation, and FAIL as well when a check the run recorded (checks.csv) failed."""
    if row["failed_checks"]:
        return "FAIL"
    return expectation(row) or ("ok" if row["run_checks"] else "")


def judge(rows: pd.DataFrame, tol: Tolerance) -> pd.DataFrame:
    """Tolerance, verdict and check of every row, by the run's own rule (verdict.judge)."""
    rows = rows.copy()
    judged = [verdict.judge(bool(row["baseline"]), row["precision"], int(row["accum_steps"]),
                            row.to_dict(), tol.rtol, tol.atol) for _, row in rows.iterrows()]
    if "max_sum_condition" in rows:  # read again at --at-step
        rows["accum_bound"] = [
            math.nan if row["baseline"] else verdict.accumulation_bound(
                row["precision"], int(row["accum_steps"]), row["max_sum_condition"])
            for _, row in rows.iterrows()]
    rows["rel_tolerance"] = [t for t, _ in judged]
    rows["verdict"] = [v for _, v in judged]
    rows["check"] = rows.apply(check, axis=1)
    return rows


def failures(rows: pd.DataFrame, settings: list[str]) -> list[str]:
    """One line per failed expectation, naming the row well enough to find it."""
    shown = [*telling(rows, settings), *differing(rows, ["seed"])]
    lines = []
    for _, row in rows[rows["check"] == "FAIL"].iterrows():
        where = " ".join(f"{k}={fmt(row[k])}" for k in shown)
        reasons = []
        if expectation(row) == "FAIL":
            lr_diff = row.get("max_rel_lr_diff", math.nan)
            lr = f", lr diff {fmt(lr_diff)}" if not missing(lr_diff) and lr_diff else ""
            reasons.append(f"expected {row['expect']}, got {row['verdict']} (vs exact "
                           f"{fmt(row.get('max_exact_err', math.nan))}, tolerance "
                           f"{fmt(row['rel_tolerance'])}{lr})")
        if row["failed_checks"]:
            reasons.append(f"the run's check failed: {row['failed_checks']}")
        lines.append(f"{row['run']} trial {row['trial']} ({where}) arm '{row['arm']}': "
                     + "; ".join(reasons))
    return lines


# ----------------------------------------------------------------------------- seeds

def seed_group_keys(identity: list[str]) -> list[str]:
    """What rows must share to be the same arm at the same sweep point, seed aside."""
    return ["sweep_point", *(c for c in identity if c not in ("run", "trial", "seed"))]


def group_over_seeds(rows: pd.DataFrame, identity: list[str],
                     metrics: list[str]) -> pd.DataFrame | None:
    """Rows that differ only by seed, as one row of mean and std; None if none do.

    A seed that several runs repeat counts once: its rows are averaged first, so n is the
    number of distinct seeds and the std is the spread between seeds, not between copies.
    """
    keys = seed_group_keys(identity)
    groups = blank_missing(rows, keys).groupby(keys, sort=False, dropna=False)
    if groups.ngroups == len(rows):
        return None
    out = []
    for _, group in groups:
        first = group.iloc[0]
        row = {k: first[k] for k in keys}
        per_seed = group.groupby("seed", sort=True)
        row["seeds"] = ",".join(str(s) for s in per_seed.groups)
        row["n"] = per_seed.ngroups
        for m in metrics:
            values = pd.to_numeric(group[m], errors="coerce").groupby(group["seed"]).mean()
            row[f"{m}_mean"] = values.mean()
            row[f"{m}_std"] = values.std() if len(values) > 1 else math.nan
        for column in ("rel_tolerance", "expect", "baseline"):  # the same for every seed
            row[column] = first[column]
        verdicts = group.drop_duplicates(["seed", "verdict"])["verdict"].value_counts()
        row["verdict"] = verdicts.index[0] if len(verdicts) == 1 else "mixed (" + ", ".join(
            f"{n} {v}" for v, n in verdicts.items()) + ")"
        checks = set(group["check"])
        row["check"] = "FAIL" if "FAIL" in checks else first["check"]
        out.append(row)
    return pd.DataFrame(out)


def blank_missing(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Missing values of the key columns as "" (a column of numbers, or of empty strings
    read back from a CSV as NaN, becomes text first: pandas will not put "" in floats)."""
    holes = {c: object for c in keys if rows[c].isna().any()}
    return rows.astype(holes).fillna({c: "" for c in keys})


def repeated_seeds(rows: pd.DataFrame, identity: list[str]) -> str | None:
    """A note naming the seeds that more than one run holds for the same arm and point."""
    keys = [*seed_group_keys(identity), "seed"]
    runs = blank_missing(rows, keys).groupby(keys, sort=False, dropna=False)["run"]
    repeats = [(name[-1], sorted(set(r))) for name, r in runs if r.nunique() > 1]
    if not repeats:
        return None
    seeds = sorted({seed for seed, _ in repeats})
    names = sorted({run for _, in_runs in repeats for run in in_runs})
    return (f"{'seed' if len(seeds) == 1 else 'seeds'} {', '.join(map(str, seeds))} "
            f"repeat{'s' if len(seeds) == 1 else ''} across runs {', '.join(names)}: each seed "
            f"is counted once in n and in mean ± std (its repeats averaged)")


# ----------------------------------------------------------------------------- the comparison

@dataclass
class Comparison:
    """What compare shows: the selected columns of every row, and how to read them."""
    title: str
    columns: list[str]            # display columns, in order
    rows: pd.DataFrame            # raw values (grouped: NAME_mean and NAME_std per metric)
    grouped: bool
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    judged: pd.DataFrame | None = None  # one row per (run, trial, arm), verdict and check
    settings: list[str] = field(default_factory=list)  # the arms' setting columns
    experiment: str = ""
    at_step: int | None = None  # --at-step: the metrics are read at this step

    def check_of(self, trial: int, arm: str) -> str:
        """ok | FAIL | n/a | '' for one arm of one trial (of a single run)."""
        rows = self.judged
        match = rows[(rows["trial"] == trial) & (rows["arm"] == arm)]
        return str(match["check"].iloc[0]) if len(match) else ""

    def cell(self, row: pd.Series, column: str) -> str:
        if self.grouped and f"{column}_mean" in row:
            mean, std = row[f"{column}_mean"], row[f"{column}_std"]
            # one digit of the spread is all a reader needs, and it keeps the column narrow
            return fmt(mean) if missing(std) else f"{fmt(mean)} ± {std:.1g}"
        return fmt(row[column])

    def header(self, column: str) -> str:
        return HEADERS.get(column, column.replace("_", " "))

    def cells(self) -> list[list[str]]:
        return [[self.cell(row, c) for c in self.columns] for _, row in self.rows.iterrows()]

    def records(self) -> list[dict[str, Any]]:
        """Raw values for CSV and JSON: grouped metrics as NAME_mean and NAME_std."""
        keys = [k for c in self.columns for k in
                ((f"{c}_mean", f"{c}_std") if self.grouped and f"{c}_mean" in self.rows else (c,))]
        return [{k: (None if missing(v) else v) for k, v in row.items()}
                for row in self.rows[keys].to_dict("records")]

    def markdown(self) -> str:
        """A GitHub table (pipes in cells escaped), then the notes as a paragraph each."""
        def line(cells):
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
        numeric = [self.numeric(c) for c in self.columns]
        lines = [line([self.header(c) for c in self.columns]),
                 line(["---:" if n else "---" for n in numeric]),
                 *map(line, self.cells())]
        return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in self.notes)

    def numeric(self, column: str) -> bool:
        values = self.rows.get(f"{column}_mean", self.rows.get(column))
        return values is not None and pd.api.types.is_numeric_dtype(values) \
            and column not in ("trial",)


def compare(runs: list[Run], *, reference: str | None = None, at_step: int | None = None,
            tol: Tolerance = Tolerance(), show_all: bool = False, sort: str | None = None,
            descending: bool = False) -> Comparison:
    rows = arm_rows(runs)
    settings = setting_columns(runs, rows)
    recorded = str(rows.loc[rows["baseline"], "arm"].iloc[0])
    reference = reference or recorded
    if at_step is not None:
        rows = metrics_at(runs, rows, at_step)
    rows = judge(loss_against(runs, rows, reference, at_step), tol)

    identity = [c for c in IDENTITY if c in rows] + [c for c in settings if c not in IDENTITY]
    measured = [c for c in rows if c not in identity and c not in OUTCOME
                and c not in BOOKKEEPING and pd.api.types.is_numeric_dtype(rows[c])]
    grouped = group_over_seeds(rows, identity, measured)

    shown_identity = identity if show_all else ["arm", *telling(rows, settings)]
    if grouped is None:
        shown_identity = (["run"] if len(runs) > 1 else []) + ["trial", *shown_identity]
        table = rows
    else:
        shown_identity = [c for c in shown_identity if c not in ("run", "trial", "seed")]
        shown_identity += ["seeds", "n"]
        table = grouped
    key_metrics = [*KEY_METRICS, *(PRECISION_METRICS if mixed_precision(rows) else ())]
    shown_metrics = [m for m in (["rel_tolerance", *measured] if show_all else key_metrics)
                     if m in rows and rows[m].notna().any()  # test acc: not for regression
                     and (m not in SHOWN_WHEN_NONZERO or show_all
                          or (rows[m].fillna(0) != 0).any())]
    outcome = OUTCOME if show_all else ("verdict", "check")  # check says if it was expected
    if not ((rows["expect"] != "") | (rows["run_checks"] > 0)).any():
        outcome = ("verdict",)
    columns = list(dict.fromkeys([*shown_identity, *shown_metrics, *outcome]))

    if sort:
        table = sort_rows(table, sort, columns, grouped is not None, descending)
    title = f"{runs[0].experiment}: each arm against the baseline '{recorded}'"
    if at_step is not None:
        title += f", at step {at_step}"
    return Comparison(title, columns, table.reset_index(drop=True), grouped is not None,
                      notes(rows, tol, recorded, reference, at_step, grouped is not None,
                            runs[0].meta.get("gradients_at"))
                      + [note for note in [repeated_seeds(rows, identity)] if note]
                      + budget_notes(rows, settings),
                      failures(rows, settings), rows, settings, runs[0].experiment, at_step)


def mixed_precision(rows: pd.DataFrame) -> bool:
    """Do the arms of a trial compute in different precisions, or some sum in a float32
    buffer? (A sweep over dtype, every arm in each, is not that.)"""
    buffered = "grad_accum_dtype" in rows and (rows["grad_accum_dtype"] == "float32").any()
    keys = [c for c in ("run", "trial") if c in rows]
    return bool(buffered) or bool((rows.groupby(keys)["precision"].nunique() > 1).any())


def telling(rows: pd.DataFrame, settings: list[str]) -> list[str]:
    """Settings that differ between rows and that the arm's name does not already say.

    loss_scale differs between the arms of the equivalence run, but always with the arm,
    so the arm column tells it; micro_batch is B/N, so it tells something only when B varies;
    dataset=digits whenever model=cnn, so the model tells the dataset.
    """
    by_arm = rows.groupby("arm")
    shown = [c for c in differing(rows, settings)
             if c == "accum_steps" or (by_arm[c].nunique(dropna=False) > 1).any()]
    if "batch_size" in shown:
        shown.append("micro_batch")
    return told_apart(rows, shown)


def told_apart(rows: pd.DataFrame, columns: list[str], known: list[str] = ()) -> list[str]:
    """Drop a column that an earlier one already determines (dataset=digits whenever model=cnn)."""
    kept: list[str] = []
    for column in columns:
        if column == "arm" or not any(
                (rows.groupby(k)[column].nunique(dropna=False) <= 1).all()
                for k in [*known, *kept]):
            kept.append(column)
    return kept


def sort_rows(table: pd.DataFrame, column: str, columns: list[str], grouped: bool,
              descending: bool) -> pd.DataFrame:
    column = {h: c for c, h in HEADERS.items()}.get(column, column)  # `--sort N` works too
    key = f"{column}_mean" if grouped and f"{column}_mean" in table else column
    if key not in table:
        raise GradlabError(f"--sort {column}: no such column; choose one of "
                           f"{', '.join(c for c in columns if c in table or f'{c}_mean' in table)}")
    return table.sort_values(key, ascending=not descending, kind="stable", na_position="last")


def notes(rows: pd.DataFrame, tol: Tolerance, recorded: str, reference: str,
          at_step: int | None, grouped: bool, where: str | None = None) -> list[str]:
    """How to read the table: which tolerance, and why.

    where: at which weights the gradients were taken, when not at the baseline's (a run
    may say so in run.json's 'gradients_at', as gradlab audit does).
    """
    where = where or f"both at {recorded}'s weights"
    out = [verdict.explain(rows.to_dict("records"), tol.rtol, tol.atol)
           + f" rel grad err: the same against '{recorded}''s own gradient, {where}."]
    if rows["run_checks"].any():
        out.append(f"check also covers the {rows['run_checks'].sum()} check(s) the run recorded "
                   f"in checks.csv: FAIL when one of them failed.")
    if (rows["check"] == "n/a").any():
        out.append("check: an arm expected to differ is not checked where the sweep sets N = 1 "
                   "(n/a: with one micro-batch there is nothing to accumulate).")
    out.append(f"loss diff: |loss - loss of '{reference}'| / |loss of '{reference}'| at "
               f"{'step ' + str(at_step) if at_step else 'the last step'}.")
    if reference != recorded:
        out.append(f"--baseline {reference} changes only loss diff: gradient errors and "
                   f"verdicts are against the run's baseline '{recorded}', at whose weights the "
                   f"run probed every arm.")
    if at_step is not None:
        out.append(f"at step {at_step}: losses and accuracies at that step, gradient errors the "
                   f"worst over the probes up to it.")
    if grouped:
        out.append("mean ± std (sample std) over rows that differ only by seed; n seeds each.")
    return out


def budget_notes(rows: pd.DataFrame, settings: list[str]) -> list[str]:
    """With budget_mb (the cost experiment): the largest micro-batch whose step fits in it,
    for each setup measured (what Composer's automatic micro-batching finds at run time)."""
    if "memory_mb" not in rows or "budget_mb" not in rows:
        return []
    budgeted = rows[(rows["budget_mb"] > 0) & rows["memory_mb"].notna()]
    if budgeted.empty:
        return []
    keys = ["budget_mb", *(c for c in telling(budgeted, settings)
                           if c not in ("accum_steps", "micro_batch", "budget_mb"))]
    lines = []
    for key, group in budgeted.groupby(keys, sort=False):
        budget, where = key[0], dict(zip(keys[1:], key[1:], strict=True))
        name = ", ".join(f"{k}={fmt(v)}" for k, v in where.items())
        fits = group[group["memory_mb"] <= budget]
        if fits.empty:
            least = group.loc[group["memory_mb"].idxmin()]
            lines.append(f"budget {fmt(budget)} MB{': ' + name if name else ''}: no micro-batch "
                         f"measured fits; the smallest step, micro-batch "
                         f"{int(least['micro_batch'])}, needs {fmt(least['memory_mb'])} MB.")
            continue
        best = fits.loc[fits["micro_batch"].idxmax()]
        lines.append(f"budget {fmt(budget)} MB{': ' + name if name else ''}: the largest "
                     f"micro-batch that fits is {int(best['micro_batch'])} (N = "
                     f"{int(best['accum_steps'])}, step MB {fmt(best['memory_mb'])}, "
                     f"{fmt(best['example_us'])} µs/example).")
    lines.append("step MB: what a step holds at its peak: on CUDA torch.cuda."
                 "max_memory_allocated; on CPU the weights, gradients and optimizer state plus "
                 "the activations one micro-batch saves for backward.")
    return lines
