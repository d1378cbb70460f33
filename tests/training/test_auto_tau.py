"""``spactor.tau: auto``: with min_steps = max_steps = k it is ``tau: k`` exactly; the decision is the
same under DP = 1, DP = 2 and TP = 2; a run stopped before the switch decides as the uninterrupted one
(its measurements restored), one stopped after it stays SC only; bad fields get one line each."""


import pytest

from spactor_mega.config import ConfigError
from spactor_mega.parallel.testing import run_distributed
from spactor_mega.plan.validate import validate
from tests.training.test_training import tiny_config

# Decisions: the gradient cosine past a threshold of 1 (every cosine is): the hybrid phase ends at
# min_steps in every layout, whatever the values; measured at steps 2 and 4
AUTO = dict(spactor__tau="auto", spactor__auto_tau__signal="grad_cosine", spactor__auto_tau__threshold=1.0,
            spactor__auto_tau__patience=1, spactor__auto_tau__min_steps=4, spactor__auto_tau__max_steps=10,
            spactor__auto_tau__interval=2, train__steps=8)
# Values: a validation signal (the RTD information gain; it never ends the tiny run), measured at 2, 4, 6
GAIN = {**AUTO, "spactor__auto_tau__signal": "rtd_gain", "spactor__auto_tau__threshold": 0.5}


def _runs(rank, world_size, cfgs):
    """Trains each (name, config) in turn in this launch; {name: losses, phases, final run.json}."""
    from spactor_mega.checkpoint.store import read_record
    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training.loop import train

    out = {}
    try:
        for name, cfg in cfgs:
            result = train(cfg)
            destroy_parallel(destroy_process_group=False)
            out[name] = {"losses": [h["loss"] for h in result.history], "phases": [h["phase"] for h in result.history],
                         "steps": [h["step"] for h in result.history], "record": read_record(result.checkpoint)}
    finally:
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("auto_tau")
    one = [
        ("fixed", tiny_config(work / "fixed", train__steps=8, spactor__tau=4)),
        ("auto_min_is_max", tiny_config(work / "auto4", **{**GAIN, "spactor__auto_tau__max_steps": 4})),
        ("dp1", tiny_config(work / "dp1", **AUTO)),
        ("dp1_gain", tiny_config(work / "dp1_gain", **GAIN)),
        ("stop2", tiny_config(work / "resumed_before", **AUTO, train__exit_interval=2)),
        ("resumed_before", tiny_config(work / "resumed_before", **AUTO, train__resume="auto")),
        ("stop6", tiny_config(work / "resumed_after", **AUTO, train__exit_interval=6)),
        ("resumed_after", tiny_config(work / "resumed_after", **AUTO, train__resume="auto")),
    ]
    tp2 = {"parallel__tensor_model_parallel_size": 2}
    two = [
        ("dp2", tiny_config(work / "dp2", **AUTO)),
        ("tp2", tiny_config(work / "tp2", **AUTO, **tp2)),
        ("dp2_gain", tiny_config(work / "dp2_gain", **GAIN)),
        ("tp2_gain", tiny_config(work / "tp2_gain", **GAIN, **tp2)),
    ]
    return {**run_distributed(_runs, 1, one, timeout=900)[0], **run_distributed(_runs, 2, two, timeout=900)[0]}


def _values(run: dict) -> list[float]:
    return [value for _, value in run["record"]["auto_tau"]["history"]]


def test_auto_with_min_steps_equal_to_max_steps_is_that_fixed_tau(runs):
    fixed, auto = runs["fixed"], runs["auto_min_is_max"]
    assert auto["losses"] == fixed["losses"] and auto["phases"] == fixed["phases"] == [1.0] * 4 + [2.0] * 4
    assert auto["record"]["phase"] == fixed["record"]["phase"] == "SC_ONLY"
    assert auto["record"]["auto_tau"]["decided"] is None  # the bound ended it
    assert [step for step, _ in auto["record"]["auto_tau"]["history"]] == [2]  # measured, which changed nothing


def test_the_engine_signal_decides_and_measuring_changes_no_loss(runs):
    """The gradient cosine (two extra backward passes at steps 2 and 4) ends the phase at 4: every loss
    is that of tau 4."""
    state = runs["dp1"]["record"]["auto_tau"]
    assert state["decided"] == 4 and [step for step, _ in state["history"]] == [2, 4]
    assert all(-1 <= value <= 1 for value in _values(runs["dp1"]))
    assert runs["dp1"]["losses"] == runs["fixed"]["losses"]


def test_every_layout_measures_the_same_values_and_decides_alike(runs):
    for name in ("dp1", "dp2", "tp2"):
        assert runs[name]["record"]["auto_tau"]["decided"] == 4, name
        assert runs[name]["phases"] == [1.0] * 4 + [2.0] * 4, name
    for reference, others in (("dp1", ("dp2", "tp2")), ("dp1_gain", ("dp2_gain", "tp2_gain"))):
        assert len(_values(runs[reference])) >= 2
        for name in others:
            assert _values(runs[name]) == pytest.approx(_values(runs[reference]), rel=1e-4), name


def test_a_resumed_run_decides_as_the_uninterrupted_one(runs):
    uninterrupted = runs["dp1"]
    assert runs["stop2"]["steps"] == [1, 2] and runs["stop2"]["record"]["auto_tau"]["decided"] is None
    assert runs["stop2"]["record"]["auto_tau"]["streak"] == 1  # measured at step 2 (past, before min_steps), saved
    resumed = runs["resumed_before"]
    assert resumed["steps"] == list(range(3, 9))
    assert resumed["record"]["auto_tau"] == uninterrupted["record"]["auto_tau"]
    assert runs["stop2"]["losses"] + resumed["losses"] == uninterrupted["losses"]


def test_a_run_resumed_after_the_switch_stays_sc_only(runs):
    uninterrupted = runs["dp1"]
    assert runs["stop6"]["record"]["auto_tau"]["decided"] == 4 and runs["stop6"]["record"]["phase"] == "SC_ONLY"
    resumed = runs["resumed_after"]
    assert resumed["phases"] == [2.0, 2.0]
    assert runs["stop6"]["losses"] + resumed["losses"] == uninterrupted["losses"]
    assert resumed["record"]["auto_tau"] == uninterrupted["record"]["auto_tau"]


@pytest.mark.parametrize("overrides, message", [
    ({"spactor__auto_tau__signal": "loss"}, "spactor.auto_tau.signal must be one of rtd_gain, sc_gap, grad_cosine"),
    ({"spactor__auto_tau__signal": "sc_gap", "spactor__auto_tau__threshold": 1.5},
     "spactor.auto_tau.threshold must be in (0, 1) for signal sc_gap"),
    ({"spactor__auto_tau__threshold": -2.0}, "spactor.auto_tau.threshold must be in [-1, 1] for signal grad_cosine"),
    ({"spactor__auto_tau__patience": 0}, "spactor.auto_tau.patience must be >= 1"),
    ({"spactor__auto_tau__interval": 0}, "spactor.auto_tau.interval must be >= 1"),
    ({"spactor__auto_tau__min_steps": 0}, "spactor.auto_tau.min_steps must be in [1, max_steps=10]"),
    ({"spactor__auto_tau__min_steps": 12}, "spactor.auto_tau.min_steps must be in [1, max_steps=10], got 12"),
    ({"spactor__tau": "sometime"}, "spactor.tau must be >= 0 (0 = plain T5, inf = hybrid throughout) or auto"),
])
def test_bad_auto_tau_fields_get_one_line_each(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as refusal:
        validate(tiny_config(tmp_path / "run", **{**AUTO, **overrides}))
    assert str(refusal.value).startswith(message), str(refusal.value)
    assert "\n" not in str(refusal.value)
