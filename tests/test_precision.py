"""Mixed precision and low-precision accumulation: the float32 buffer, the GradScaler, clip
placement, the combinations refused, and what the `precision` experiment must show."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.testing import assert_close

from conftest import gradlab, run_json
from gradlab.config.settings import Settings
from gradlab.readers import compact, compare, plots
from gradlab.record import store, verdict
from gradlab.setup import Setup, mse_loss, split
from gradlab.train import amp, engine, optim
from test_cli import assert_clean_failure

U_BF16, U_F32 = 2.0**-8, 2.0**-24


def bf16_setup(batch: int = 256) -> Setup:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 10, generator=g)
    y = x @ torch.randn(10, 1, generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 1))
    return Setup(model.to(torch.bfloat16), (x.bfloat16(), y.bfloat16()), mse_loss)


def partial_gradients(setup: Setup, accum_steps: int) -> list[list[torch.Tensor]]:
    """Each micro-batch's own gradient (its loss over the window's examples), in bfloat16."""
    window_units = len(setup.train[0])
    partials = []
    for micro_batch in split(setup.train, accum_steps):
        setup.model.zero_grad(set_to_none=True)
        loss, _ = setup.loss(setup.model, micro_batch)
        (loss / window_units).backward()
        partials.append([p.grad.clone() for p in setup.model.parameters()])
    setup.model.zero_grad(set_to_none=True)
    return partials


@pytest.mark.parametrize("accum_steps", [16, 64])
def test_the_float32_buffer_sums_like_float64_to_float32_rounding(accum_steps):
    setup = bf16_setup()
    partials = partial_gradients(setup, accum_steps)
    exact = [sum(g[i].double() for g in partials) for i in range(len(partials[0]))]
    magnitude = [sum(g[i].double().abs() for g in partials) for i in range(len(partials[0]))]
    s = Settings(batch_size=256, accum_steps=accum_steps, dtype="bfloat16")

    def excess(policy: str) -> float:
        """Worst |.grad - float64 sum| over what float32 summing and one final rounding to
        bfloat16 allow; <= 1 means the sum was kept to float32 rounding."""
        engine.window_gradient(setup.model, setup.train, dataclasses.replace(
            s, grad_accum_dtype=policy), setup)
        worst = 0.0
        for p, want, size in zip(setup.model.parameters(), exact, magnitude, strict=True):
            allowed = U_BF16 * want.abs() + accum_steps * U_F32 * size + 1e-30
            worst = max(worst, float(((p.grad.double() - want).abs() / allowed).max()))
        setup.model.zero_grad(set_to_none=True)
        return worst

    assert excess("float32") <= 1.0
    assert excess("param") > 2.0  # summed in bfloat16, it is not: every addition rounded


def test_the_buffer_keeps_what_zero_grad_left_and_clears_with_it():
    setup = bf16_setup(batch=32)
    s = Settings(batch_size=32, accum_steps=4, dtype="bfloat16", grad_accum_dtype="float32")
    engine.window_gradient(setup.model, setup.train, s, setup)
    once = [p.grad.double().clone() for p in setup.model.parameters()]
    engine.window_gradient(setup.model, setup.train, s, setup)  # .grad held on entry: adds
    for p, g in zip(setup.model.parameters(), once, strict=True):
        assert_close(p.grad.double(), 2 * g, rtol=2 * U_BF16, atol=0)
    setup.model.zero_grad(set_to_none=True)
    last = dataclasses.replace(s, zero_grad="every-step")  # only the last micro-batch stays
    engine.window_gradient(setup.model, setup.train, last, setup)
    partial = partial_gradients(setup, 4)[-1]
    engine.window_gradient(setup.model, setup.train, last, setup)
    for p, g in zip(setup.model.parameters(), partial, strict=True):
        assert_close(p.grad, g, rtol=0, atol=0)


# ----------------------------------------------------------------------------- GradScaler

SCALED = Settings(batch_size=64, accum_steps=4, autocast="float16", grad_scaler="on", lr=0.1)


def float32_setup() -> Setup:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    return Setup(model, (x, x.sum(1, keepdim=True)), mse_loss)


class Scales:
    """A Watch that reads the scaler's scale after every micro-batch."""

    def __init__(self, scaler):
        self.scaler, self.seen = scaler, []

    def micro_batch(self, index):
        self.seen.append(self.scaler.get_scale())

    def gradient(self):
        pass


def test_a_window_has_one_scale_and_one_update():
    setup = float32_setup()
    optimizer = optim.make_optimizer(setup.model, SCALED)
    # growth every step: N updates per window would multiply the scale by 2^N
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=1)
    watch = Scales(scaler)
    stats = engine.train_step(setup.model, optimizer, setup.train, SCALED, setup, watch,
                              scaler=scaler)
    assert watch.seen == [64.0] * SCALED.accum_steps
    assert stats.grad_scale == 64.0 and not stats.skipped
    assert scaler.get_scale() == 128.0  # one update for the window


def test_the_scaler_skips_a_window_whose_gradient_overflows_and_backs_off():
    setup = float32_setup()
    optimizer = optim.make_optimizer(setup.model, SCALED)
    before = [p.detach().clone() for p in setup.model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # float16 overflows at 65504
    measured = dataclasses.replace(SCALED, update_norm=True)
    stats = engine.train_step(setup.model, optimizer, setup.train, measured, setup, None,
                              scaler=scaler)
    assert stats.skipped and not math.isfinite(stats.grad_norm) and stats.update_norm == 0
    for p, b in zip(setup.model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert scaler.get_scale() == 2.0**39
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    stats = engine.train_step(setup.model, optimizer, setup.train, measured, setup, None,
                              scaler=scaler)
    assert not stats.skipped and math.isfinite(stats.grad_norm) and stats.update_norm > 0


def test_the_probes_copy_of_a_scaler_leaves_the_arms_scaler_as_it_was():
    setup = float32_setup()
    optimizer = optim.make_optimizer(setup.model, SCALED)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    engine.train_step(setup.model, optimizer, setup.train, SCALED, setup, None, scaler=scaler)
    state = scaler.state_dict()
    copy = amp.make_scaler(SCALED, torch.device("cpu"), like=scaler)
    assert copy.get_scale() == scaler.get_scale() == 512.0
    probe_optimizer = optim.make_optimizer(setup.model, SCALED)
    engine.window_gradient(setup.model, setup.train, SCALED, setup, optimizer=probe_optimizer,
                           scaler=copy)
    assert scaler.state_dict() == state
    # the arm can still unscale its own optimizer this window: nothing was recorded for it
    engine.train_step(setup.model, optimizer, setup.train, SCALED, setup, None, scaler=scaler)


def test_clipping_before_unscale_clips_the_scaled_gradient():
    setup = float32_setup()
    right = dataclasses.replace(SCALED, clip_norm=100.0)
    wrong = dataclasses.replace(right, clip_at="before-unscale")
    norms = {}
    for s in (right, wrong):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        engine.window_gradient(setup.model, setup.train, s, setup,
                               optimizer=optim.make_optimizer(setup.model, s), scaler=scaler)
        norms[s.clip_at] = engine.global_norm(p.grad for p in setup.model.parameters())
        setup.model.zero_grad(set_to_none=True)
    unscaled = norms["after-accumulation"]
    # the gradient is under the threshold, so the right order leaves it alone; scaled it is
    # 2^12 times larger, over it: cut to 100, then divided by 2^12
    assert 1 < unscaled < 100 < 2.0**12 * unscaled
    assert norms["before-unscale"] == pytest.approx(100 / 2.0**12, rel=1e-3)


def test_skipped_steps_are_exactly_the_non_finite_ones(tmp_path):
    spec = tmp_path / "loud.toml"
    spec.write_text('''
[settings]
setup = "user_setups:loud_regression"
batch_size = 64
steps = 12
lr = 0.001
update_norm = true
[arms.float32]
baseline = true
[arms.scaled]
accum_steps = 4
autocast = "float16"
grad_scaler = "on"
''')
    doc = run_json(str(spec), "--out", tmp_path / "runs")
    steps = pd.read_csv(Path(doc["run_dir"]) / "steps.csv")
    scaled = steps[steps.arm == "scaled"].sort_values("step")
    skipped = scaled.skipped.astype(bool)
    assert skipped.any() and not skipped.all()  # the scale backs off, then steps are taken
    assert (skipped == ~scaled.grad_norm.map(math.isfinite)).all()
    assert ((scaled.update_norm == 0) == skipped).all()
    # the scale halves after exactly the skipped steps, and holds otherwise (no growth in 12)
    ratio = (scaled.grad_scale.shift(-1) / scaled.grad_scale).iloc[:-1]
    assert (ratio == skipped.iloc[:-1].map({True: 0.5, False: 1.0})).all()
    assert scaled.grad_scale.iloc[0] == 65536.0
    base = steps[steps.arm == "float32"]
    assert not base.skipped.astype(bool).any() and base.grad_scale.isna().all()
    summary = pd.read_csv(Path(doc["run_dir"]) / "summary.csv").set_index("arm")
    assert summary.loc["scaled", "skipped_steps"] == skipped.sum()
    assert math.isnan(summary.loc["scaled", "diverged_at_step"])  # a skip is not divergence


# ----------------------------------------------------------------------------- refused

# the equivalence experiment on the mlp in float32, one step: the settings below go on top
MLP = ["--set", "model=mlp", "--set", "dataset=regression", "--set", "dtype=float32",
       "--set", "steps=1"]
BAD = [
    (["autocast=bfloat16", "dtype=bfloat16"], "autocast computes in bfloat16 from float32"),
    (["autocast=float16", "dtype=float64"], "set dtype=float32"),
    (["grad_scaler=on"], "GradScaler keeps float16 gradients"),  # float32, no autocast
    (["grad_scaler=on", "autocast=bfloat16"], "use grad_scaler=off"),
    (["grad_scaler=on", "dtype=bfloat16"], "needs dtype=float32 with autocast=float16"),
    (["grad_scaler=on", "dtype=float16"], "needs dtype=float32 with autocast=float16"),
    (["grad_scaler=on", "autocast=float16", "zero_grad=never"], "use zero_grad=every-n"),
    (["grad_accum_dtype=float32", "dtype=float64"], "use grad_accum_dtype=param"),
    (["clip_at=before-unscale", "clip_norm=1"], "there is no unscale_ to clip before"),
    (["clip_norm=-1"], "give the largest gradient norm, > 0 (or 0 for no clipping)"),
    (["autocast=float8"], "choose one of: none, bfloat16, float16"),
    (["clip_at=per-micro-batch", "clip_norm=1", "grad_accum_dtype=float32", "dtype=bfloat16"],
     "clipping each partial sum is measured with the gradient summed in .grad"),
    (["world_size=2", "grad_accum_dtype=float32", "dtype=bfloat16"],
     "DDP all-reduces what .grad holds at the last backward"),
]


@pytest.mark.parametrize(("sets", "expected"), BAD, ids=[" ".join(s) for s, _ in BAD])
def test_a_bad_combination_is_one_line_and_exit_2(tmp_path, sets, expected):
    args = [a for s in sets for a in ("--set", s)]
    out = tmp_path / "results"
    result = gradlab("run", "equivalence", *MLP, "--set", "accum_steps=2", *args, "--out", out)
    assert_clean_failure(result, expected, out)


def test_what_this_torch_cannot_do_on_the_cpu_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(amp, "autocast_supported", lambda device, dtype: False)
    out = tmp_path / "results"
    result = gradlab("run", "equivalence", *MLP, "--set", "autocast=float16", "--out", out)
    assert_clean_failure(result, "autocast=float16 is not supported on cpu", out)
    monkeypatch.setattr(amp, "scaler_supported", lambda device: False)
    monkeypatch.setattr(amp, "autocast_supported", lambda device, dtype: True)
    result = gradlab("run", "equivalence", *MLP, "--set", "autocast=float16",
                     "--set", "grad_scaler=on", "--out", out)
    assert_clean_failure(result, "has no GradScaler for cpu", out)


def test_this_torch_has_float16_autocast_and_a_gradscaler_on_the_cpu():
    # what the default `precision` run needs on a machine without a GPU
    assert amp.autocast_supported("cpu", "bfloat16")
    assert amp.autocast_supported("cpu", "float16")
    assert amp.scaler_supported("cpu")


# ----------------------------------------------------------------------------- the experiment

@pytest.fixture(scope="module")
def precision_run(tmp_path_factory) -> dict:
    """The precision experiment on the mlp, N = 1, 16, 256, two steps."""
    return run_json("precision", "--set", "model=mlp", "--set", "dataset=regression",
                    "--set", "accum_steps=1,16,256", "--set", "steps=2",
                    "--out", tmp_path_factory.mktemp("precision"))


@pytest.fixture(scope="module")
def summary(precision_run) -> pd.DataFrame:
    rows = pd.read_csv(Path(precision_run["run_dir"]) / "summary.csv")
    return rows[~rows.baseline].set_index(["arm", "accum_steps"]).sort_index()


def by_n(summary: pd.DataFrame, arm: str, column: str) -> pd.Series:
    return summary.loc[arm, column]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_native_accumulation_error_rises_with_n_and_a_float32_buffer_stays_flat(summary, dtype):
    native = by_n(summary, f"{dtype}-native", "max_exact_err")
    rise = by_n(summary, f"{dtype}-native", "accum_rise")
    assert native.is_monotonic_increasing and native[256] > 2 * native[1]
    assert rise[1] == 0 and 0 < rise[16] < rise[256]
    buffered = by_n(summary, f"{dtype}-fp32-buffer", "max_exact_err")
    assert ((buffered - buffered[1]).abs() <= 0.3 * buffered[1]).all()  # flat: within noise
    assert by_n(summary, f"{dtype}-fp32-buffer", "accum_rise")[256] < 0.1 * rise[256]
    # the native rise is what summing in low precision may add: within its bound
    assert (rise <= by_n(summary, f"{dtype}-native", "accum_bound")).all()


@pytest.mark.parametrize("arm", ["autocast-bf16", "autocast-fp16-scaler"])
def test_autocast_arms_stay_within_their_bound(summary, arm):
    rows = summary.loc[arm]
    assert (rows.accum_rise <= rows.accum_bound).all()
    assert (rows.verdict == "equivalent").all()
    # parameters stay float32, but the verdict's u is the one autocast computes in
    assert set(rows.dtype) == {"float32"}
    assert set(rows.precision) == {arm.split("-")[1].replace("bf16", "bfloat16")
                                   .replace("fp16", "float16")}


def test_clipping_before_unscale_differs_while_the_right_order_is_equivalent(summary):
    wrong, right = summary.loc["clip-before-unscale"], summary.loc["autocast-fp16-scaler"]
    assert (wrong.verdict == "differs").all() and (right.verdict == "equivalent").all()
    assert (wrong.max_exact_err > 0.99).all()  # the step is 65536 times too short
    assert (right.max_exact_err < 10 * right.exact_floor).all()


def test_every_good_arm_is_equivalent_in_every_precision(summary):
    good = summary.drop(index="clip-before-unscale", level="arm")
    assert set(good.precision) == {"float32", "bfloat16", "float16"}
    assert (good.verdict == "equivalent").all()
    assert (good.max_exact_err <= good.rel_tolerance).all()
    assert (good.rel_tolerance < 1.01).all()


def test_the_floor_is_one_big_batch_in_the_arms_own_precision(summary):
    at_1 = summary.xs(1, level="accum_steps")
    # N = 1 is one big batch in the arm's precision: exactly its floor
    assert (at_1.drop(index="clip-before-unscale").accum_rise == 0).all()
    floors = summary.exact_floor.groupby("arm").agg(["min", "max"])
    assert (floors["min"] == floors["max"]).all()  # the same big batches in every trial
    assert floors.loc["float32", "max"] < 1e-6
    assert 1e-3 < floors.loc["bf16-native", "max"] < 0.05  # bfloat16 rounds at 2^-8
    assert floors.loc["bf16-native", "max"] == floors.loc["bf16-fp32-buffer", "max"]
    assert floors.loc["fp16-native", "max"] < floors.loc["bf16-native", "max"]


def test_the_bound_is_n_minus_1_u_times_the_sums_condition(summary):
    for (_, n), row in summary.iterrows():
        u = verdict.UNIT_ROUNDOFF[row.precision]
        assert row.accum_bound == pytest.approx((n - 1) * u * row.max_sum_condition)
        assert row.max_sum_condition >= 1 - 1e-12
    condition = summary.loc["float32", "max_sum_condition"]
    assert condition[1] == pytest.approx(1.0) and condition[256] > condition[16] > 1


def test_compare_checks_the_precision_run(precision_run):
    result = gradlab("compare", precision_run["run_dir"], "--check", "--table", "full")
    assert result.exit_code == 0, result.stderr
    for header in ("rise over", "bound", "floor", "skipped"):  # (headers wrap between words)
        assert header in result.stdout  # the table, for people


def test_the_precision_figure_has_a_panel_per_precision(precision_run):
    runs = store.load_runs([Path(precision_run["run_dir"])])
    figures = {p.name: p for p in plots.standard_plots(runs)}
    assert "precision" in figures and "grad-error" not in figures
    figure = figures["precision"]
    assert figure.panels[-1] == "precision" and figure.bound
    assert set(figure.data.precision) == {"float32", "bfloat16", "float16"}


def test_run_json_records_the_environment(precision_run):
    meta = json.loads((Path(precision_run["run_dir"]) / "run.json").read_text())
    (env,) = meta["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["threads"] == torch.get_num_threads() >= 1
    for key in ("device_name", "cuda", "deterministic_algorithms", "cudnn_deterministic",
                "cudnn_benchmark", "matmul_allow_tf32", "cudnn_allow_tf32"):
        assert key in env
    summary = pd.read_csv(Path(precision_run["run_dir"]) / "summary.csv")
    assert summary.cuda_peak_bytes.isna().all()  # measured on CUDA only


# ----------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_on_cuda_every_arm_records_its_peak_memory(tmp_path):
    doc = run_json("precision", "--set", "device=cuda", "--set", "model=mlp",
                   "--set", "dataset=regression", "--set", "accum_steps=1,16",
                   "--set", "steps=1", "--out", tmp_path)
    summary = pd.read_csv(Path(doc["run_dir"]) / "summary.csv").set_index(["arm", "trial"])
    assert (summary.cuda_peak_bytes > 0).all()
    meta = json.loads((Path(doc["run_dir"]) / "run.json").read_text())
    (env,) = meta["environment"]
    assert env["device"].startswith("cuda") and env["cuda"] and not env["cudnn_allow_tf32"]
    result = gradlab("compare", doc["run_dir"], "--check")
    assert result.exit_code == 0, result.stderr


@pytest.mark.gpu
@cuda
def test_on_cuda_the_float32_buffer_still_sums_to_float32_rounding():
    setup = bf16_setup()
    setup = dataclasses.replace(setup, model=setup.model.cuda(),
                                train=tuple(t.cuda() for t in setup.train))
    s = Settings(batch_size=256, accum_steps=64, dtype="bfloat16", grad_accum_dtype="float32",
                 device="cuda")
    engine.window_gradient(setup.model, setup.train, s, setup)
    assert all(p.grad.dtype == torch.bfloat16 and p.grad.is_cuda
               for p in setup.model.parameters())


def test_the_pivots_baseline_row_shows_the_floor_of_its_own_precision(precision_run, summary):
    """A trial mixes precisions: the float32 baseline's row is float32's floor, not the
    largest floor of the trial (bfloat16's)."""
    (run,) = store.load_runs([Path(precision_run["run_dir"])])
    pivot = compact.pivot(compare.compare([run]))
    (base,) = [cells for labels, cells in pivot.rows if labels[-1] == "big-batch"]
    float32 = summary.loc["float32", "exact_floor"].max()
    assert float32 < 1e-5
    assert [c.text for c in base] == [compact.short(float32)] * len(base)
