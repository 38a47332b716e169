"""The schedule search: its budget window, its uniform start against a brute-force scan, its
reproducibility and exact resumption, the engine task's files, and `reducer=<file>`."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict

import pytest
import torch
import yaml
from conftest import images_for, make_model
from hydra.core.global_hydra import GlobalHydra

import tokenreduce
from tokenreduce.cost import reducer_macs
from tokenreduce.engine.config import command_line_arguments, compose
from tokenreduce.engine.record import (
    DIFFRATE_STATE,
    SEARCH_JSON,
    SEARCH_STATE,
    SEARCH_TABLE,
    SEARCHED_REDUCER,
)
from tokenreduce.engine.run import run
from tokenreduce.errors import ConfigError
from tokenreduce.search.schedule import (
    WINDOW,
    Candidate,
    Evaluator,
    ScheduleSearch,
    ScheduleSpace,
    SearchState,
)

DEPTH, PATCHES = 6, 100  # test_vit


@pytest.fixture(scope="module")
def calibration():
    model = make_model("test_vit")
    images = images_for(model, batch=12, seed=1)
    with torch.no_grad():  # labels the unreduced model gets partly right, so the scores can move
        labels = model(images).argmax(-1)
    labels[::3] = (labels[::3] + 1) % model.num_classes
    return model, images, labels


def searcher(calibration, budget=0.6, reducer="tome", methods=("tome",), objective="accuracy", seed=0, labels=True,
             **space_kwargs):
    model, images, y = calibration
    evaluator = Evaluator(model, images, y if labels else None, batch_size=5)
    space = ScheduleSpace(reducer, list(methods), {}, DEPTH, PATCHES, **space_kwargs)
    return ScheduleSearch(space, evaluator, budget, objective, seed)


def test_a_candidate_key_round_trips_and_configs_name_the_method(calibration):
    candidate = Candidate(("tome", None, "atc", "tome", None, None), (4, 0, 3, 2, 0, 0))
    assert Candidate.from_key(candidate.key) == candidate
    space = ScheduleSpace("compose", ["tome", "atc"], {}, DEPTH, PATCHES)
    name, params = space.config(candidate)
    assert name == "compose"
    assert params["parts"] == [{"name": "tome", "layers": [0, 3], "r": [4, 0, 0, 2, 0, 0]},
                               {"name": "atc", "layers": [2], "r": [0, 0, 3, 0, 0, 0]}]
    single = ScheduleSpace("ppt", ["ppt"], {}, DEPTH, PATCHES)  # PPT's default layers must not hide the list
    assert single.config(Candidate(("ppt",) * 6, (1, 2, 3, 4, 5, 6)))[1] == {
        "r": [1, 2, 3, 4, 5, 6], "layers": None}


def test_the_composed_config_runs_the_schedule_it_describes(calibration):
    model, images, _ = calibration
    candidate = Candidate(("tome", None, "atc", "tome", None, "atc"), (4, 0, 3, 2, 0, 5))
    name, params = ScheduleSpace("compose", ["tome", "atc"], {}, DEPTH, PATCHES).config(candidate)
    tokenreduce.apply(model, name, **params)
    with torch.no_grad():
        model(images[:2])
    assert tokenreduce.stats(model)["removed"] == list(candidate.r)
    tokenreduce.remove(model)


def test_the_uniform_start_is_the_weakest_uniform_r_within_the_budget(calibration):
    model = calibration[0]
    search = searcher(calibration, budget=0.55)
    state = SearchState(fingerprint={})
    search.uniform_schedules(state)
    base = reducer_macs(model, "none")
    brute = next(r for r in range(PATCHES) if reducer_macs(model, "tome", r=r) / base <= 0.55)
    assert state.uniform["tome"]["key"]  # the better of uniform r and uniform ratio
    r_option = search.space.uniform("tome", brute)
    assert abs(search.macs(r_option) - reducer_macs(model, "tome", r=brute) / base) < 1e-12
    assert search.macs(search.space.uniform("tome", brute - 1)) > 0.55
    chosen = Candidate.from_key(state.uniform["tome"]["key"])
    assert search.macs(chosen) <= 0.55 + 1e-12
    assert chosen.key in state.scores


@pytest.mark.parametrize("budget", [0.45, 0.8])
def test_fit_brings_any_schedule_into_the_window_below_the_budget(calibration, budget):
    search = searcher(calibration, budget=budget)
    rng = torch.Generator().manual_seed(int(budget * 100))
    for _ in range(3):
        r = tuple(int(v) for v in torch.randint(0, 25, (DEPTH,), generator=rng))
        fitted = search.fit(search.space.realised(Candidate(tuple("tome" if n else None for n in r), r)))
        assert fitted is not None
        assert budget * (1 - WINDOW) <= search.macs(fitted) <= budget
        # the window is checked against MACs measured by the model's own pass
        name, params = search.space.config(fitted)
        assert search.macs(fitted) == reducer_macs(calibration[0], name, **params) / search.evaluator.base_macs


def test_the_search_keeps_within_budget_never_gets_worse_and_is_reproducible(calibration):
    first = searcher(calibration, budget=0.6).run(6)
    again = searcher(calibration, budget=0.6).run(6)
    assert first.to_json() == again.to_json()
    other_seed = searcher(calibration, budget=0.6, seed=1).run(6)
    assert [h["key"] for h in other_seed.history] != [h["key"] for h in first.history]
    search = searcher(calibration, budget=0.6)
    best = first.scores[first.best]
    assert 0.6 * (1 - WINDOW) <= best["mac_fraction"] <= 0.6
    start_rank = None
    for entry in first.history:  # every tried schedule fits, and the best only ever improves
        if entry["key"]:
            assert 0.6 * (1 - WINDOW) <= first.scores[entry["key"]]["mac_fraction"] <= 0.6
    accepted = [first.scores[h["key"]] for h in first.history if h["accepted"]]
    for a, b in zip(accepted, accepted[1:], strict=False):
        assert (b["top1"], -b["loss"]) > (a["top1"], -a["loss"])
    del search, start_rank


def test_an_interrupted_search_resumes_to_the_same_result(calibration):
    whole = searcher(calibration).run(5)
    saved = []

    def stop_after_two(state):
        saved.append(state.to_json())
        if state.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        searcher(calibration).run(5, on_step=stop_after_two)
    resumed = searcher(calibration).run(5, SearchState.from_json(saved[-1]))
    assert resumed.to_json() == whole.to_json()
    with pytest.raises(ConfigError, match="search.resume: the saved search has budget=0.6"):
        searcher(calibration, budget=0.5).run(5, SearchState.from_json(saved[-1]))


def test_compose_search_chooses_methods_per_layer_and_the_embedding_objective_needs_no_labels(calibration):
    search = searcher(calibration, reducer="compose", methods=("tome", "atc"), objective="embedding", labels=False)
    state = search.run(8)
    assert set(state.uniform) == {"tome", "atc"}
    best = state.scores[state.best]
    assert best["top1"] is None and 0 < best["cosine"] <= 1
    tried = {m for key in state.scores for m in Candidate.from_key(key).methods if m}
    assert tried == {"tome", "atc"}
    with pytest.raises(ConfigError, match="needs labelled calibration images"):
        searcher(calibration, labels=False)


def test_unreduced_scores_are_the_reference(calibration):
    model, images, labels = calibration
    score = Evaluator(model, images, labels, batch_size=5).score("none", {})
    with torch.no_grad():
        want = (model(images).argmax(-1) == labels).float().mean().item()
    assert score.cosine == pytest.approx(1.0, abs=1e-6)
    assert score.top1 == pytest.approx(want) and score.mac_fraction == 1.0


def test_only_the_searched_layers_change(calibration):
    search = searcher(calibration, budget=0.7, layers=[1, 2, 3])
    state = search.run(4)
    for key in state.scores:
        r = Candidate.from_key(key).r
        assert r[0] == r[4] == r[5] == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(methods=["dynamicvit"]), "'dynamicvit' cannot be searched per layer; allowed: atc,"),
    (dict(reducer="compose", methods=["tome", "mctf"]), "'mctf' cannot be composed"),
    (dict(fixed={"tome": {"r": 3}}), "search.fixed.tome.r: the search sets r, ratio"),
    (dict(fixed={"atc": {}}), "search.fixed.atc: 'atc' is not searched"),
    (dict(fixed={"tome": {"mode": "max"}}), "mode='max' is invalid"),
    (dict(layers=[0, 9]), r"search.layers=\[0, 9\]: \[9\] beyond the model's 6 blocks"),
])
def test_bad_spaces_are_refused(kwargs, message):
    args = {"reducer": "tome", "methods": ["tome"], "fixed": {}, **kwargs}
    with pytest.raises(ConfigError, match=message):
        ScheduleSpace(args.pop("reducer"), args.pop("methods"), args.pop("fixed"), DEPTH, PATCHES, **args)


# --- the engine task ---------------------------------------------------------------------------
TASK = ["experiment=smoke", "reducer=none", "task=search", "budget.macs=0.6", "search.steps=3", "search.images=8",
        "search.batch_size=4", "search.test_images=8", "data.val_samples=8", "data.batch_size=4",
        "measure.warmup=0", "measure.repeats=2", "measure.batch_size=2"]


@pytest.fixture()
def fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def test_the_task_writes_a_loadable_reducer_and_resumes(tmp_path, fresh_hydra, capsys):
    run(compose(TASK), tmp_path / "a", overrides=TASK)
    for name in (SEARCH_STATE, SEARCH_JSON, SEARCH_TABLE, SEARCHED_REDUCER):
        assert (tmp_path / "a" / name).is_file()
    result = json.loads((tmp_path / "a" / SEARCH_JSON).read_text())
    searched = yaml.safe_load((tmp_path / "a" / SEARCHED_REDUCER).read_text())
    assert searched == result["searched"]["reducer"] and searched["name"] == "tome"
    assert 0.6 * (1 - WINDOW) <= result["searched"]["calibration"]["mac_fraction"] <= 0.6
    held = {row["schedule"]: row for row in result["held_out"]["rows"]}
    assert set(held) - {"uniform in the window"} == {"unreduced", "best uniform", "searched"}
    assert result["held_out"]["images"] == 8
    if "uniform in the window" in held:  # the search's start, when fitting changed the best uniform schedule
        start = result["start"]["calibration"]["mac_fraction"]
        assert 0.6 * (1 - WINDOW) <= start <= 0.6
        assert held["uniform in the window"]["mac_fraction"] == pytest.approx(start)
    assert held["searched"]["mac_fraction"] == pytest.approx(result["searched"]["calibration"]["mac_fraction"])
    out = capsys.readouterr().out
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d search: 3/3 steps, \d+ s; .*; best ", out, re.M)
    assert re.search(r"search, held-out top-1: (\d+)/\1 batches, \d+ s; setting (\d)/\2: tome", out)
    assert out.index("search: start") < out.index("search: 0/3 steps") and "reducer=" in out
    # top-1 as fractions with 4 decimals, as in search.json
    table = (tmp_path / "a" / SEARCH_TABLE).read_text().splitlines()
    assert "| MAC fraction | calibration top-1 | calibration cosine | held-out top-1 (8 val images) |" in table[2]
    searched_row = next(line.split(" | ") for line in table if line.startswith("| searched |"))
    assert searched_row[6] == f"{held['searched']['top1']:.4f}"

    # the command it prints evaluates the file as the reducer, on the search's model and data
    command = next(line for line in out.splitlines() if line.startswith("evaluate it with: "))
    args = shlex.split(command.removeprefix("evaluate it with: "))
    assert args[:3] == ["python", "-m", "tokenreduce"] and "task=evaluate" in args
    assert not any(a.startswith(("search.", "budget.", "task=search")) for a in args)
    assert result["evaluate_command"] == command.removeprefix("evaluate it with: ")
    evaluated = run(compose(args[3:]), tmp_path / "evaluated")
    assert evaluated.task == "evaluate" and evaluated.reducer == "tome"
    assert {k: evaluated.reducer_params[k] for k in searched if k != "name"} == {
        k: v for k, v in searched.items() if k != "name"}
    assert evaluated.tokens_out == held["searched"]["tokens_out"]

    # resuming the finished search with more steps continues it; other settings are refused
    run(compose([*TASK, "search.steps=5", f"search.resume={tmp_path / 'a'}"]), tmp_path / "b")
    state = json.loads((tmp_path / "b" / SEARCH_STATE).read_text())
    assert state["step"] == 5 and state["history"][:3] == json.loads((tmp_path / "a" / SEARCH_STATE).read_text())[
        "history"]
    with pytest.raises(ConfigError, match="the saved search has budget=0.6"):
        run(compose([*TASK, "budget.macs=0.7", f"search.resume={tmp_path / 'a'}"]), tmp_path / "c")


@pytest.mark.parametrize("override, message", [
    ("budget.macs=null", "allowed: exactly one of budget.macs"),
    ("budget.images_per_s=100", "allowed: exactly one of budget.macs"),
    ("budget.macs=1.5", "macs=1.5"),
    ("search.reducer=tomme", "reducer='tomme' is not registered"),
    ("search.methods=[tome,atc]", "only used with search.reducer=compose"),
    ("search.reducer=compose", "search.methods=None is invalid with search.reducer=compose"),
    ("search.objective=top5", "search.objective='top5' is invalid"),
    ("search.steps=-1", "steps=-1"),
    ("+search.rounds=3", "search.rounds is not a setting"),
    ("search.resume=/nonexistent", "no search_state.json there"),
    ("search.reducer=dynamicvit", "'dynamicvit' cannot be searched per layer"),
    ("+search.diffrate.lr=0.1", "only used with search.reducer=diffrate"),
    ("+search.fixed.tome.r=3", "search.fixed.tome.r: the search sets r"),
])
def test_bad_task_settings_fail_before_any_compute(tmp_path, fresh_hydra, override, message):
    with pytest.raises(ConfigError, match=message):
        run(compose([*TASK, override]), tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_an_images_per_second_budget_is_met_by_measurement(tmp_path, fresh_hydra):
    run(compose([*TASK, "budget.macs=null", "budget.images_per_s=1e-3"]), tmp_path / "a")
    result = json.loads((tmp_path / "a" / SEARCH_JSON).read_text())
    # any speed reaches a budget of 0.001 images/s: no reduction is needed, the budget is all MACs
    assert result["mac_budget"] == 1.0 and result["speed_calibration"][0]["r"] == 0
    with pytest.raises(ConfigError, match="budget.images_per_s=1e\\+12 is out of reach"):
        run(compose([*TASK, "budget.macs=null", "budget.images_per_s=1e12"]), tmp_path / "b")


def test_diffrate_searches_through_the_task_and_resumes_from_its_saved_state(tmp_path, fresh_hydra):
    task = [*TASK, "search.reducer=diffrate", "budget.macs=0.7", "+search.diffrate.lr=0.05"]
    run(compose([*task, "search.steps=2"]), tmp_path / "a")
    result = json.loads((tmp_path / "a" / SEARCH_JSON).read_text())
    searched = yaml.safe_load((tmp_path / "a" / SEARCHED_REDUCER).read_text())
    assert searched["name"] == "diffrate" and set(searched) == {"name", "prune", "merge"}
    assert result["searched"]["calibration"]["mac_fraction"] <= 0.7
    uniform = result["uniform"]["reducer"]
    assert uniform["prune"] == 0 and len(set(uniform["merge"][1:])) == 1 and uniform["merge"][0] == 0
    assert result["steps"] == 2 and (tmp_path / "a" / DIFFRATE_STATE).is_file()
    run(compose([*task, "search.steps=3", f"search.resume={tmp_path / 'a'}"]), tmp_path / "b")
    assert json.loads((tmp_path / "b" / SEARCH_JSON).read_text())["steps"] == 3
    with pytest.raises(ConfigError, match="DiffRate's search targets MACs"):
        run(compose([*task, "budget.macs=null", "budget.images_per_s=10"]), tmp_path / "c")
    with pytest.raises(ConfigError, match="search.reducer=diffrate searches its own"):
        run(compose([*task, "search.layers=[1,2]"]), tmp_path / "d")


def test_command_line_arguments_refuse_a_missing_file_and_leave_other_arguments(tmp_path):
    assert command_line_arguments(["reducer=tome", "reducer.r=3"]) == ["reducer=tome", "reducer.r=3"]
    with pytest.raises(ConfigError, match="no such file"):
        command_line_arguments([f"reducer={tmp_path / 'missing.yaml'}"])
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "tome", "r": 2}))
    with pytest.raises(ConfigError, match="not both"):
        command_line_arguments([f"reducer={path}", "hydra.searchpath=[file:///x]"])
    assert asdict(Candidate(("tome",), (1,)))  # a plain dataclass, serialisable


def test_sigterm_stops_the_search_after_saving_its_step_and_says_how_to_resume(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    args = [a for a in TASK if not a.startswith("search.steps")] + [
        "search.steps=100000", "search.objective=embedding", "search.test_images=0"]
    run_dir = tmp_path / "a"
    process = subprocess.Popen([sys.executable, "-m", "tokenreduce", *args, f"hydra.run.dir={run_dir}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state_file = run_dir / SEARCH_STATE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if state_file.is_file() and json.loads(state_file.read_text() or "{}").get("step", 0) >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out
    assert f"search.resume={run_dir}" in out
    saved = SearchState.from_json(state_file.read_text())
    assert saved.step >= 2 and not (run_dir / SEARCHED_REDUCER).exists()


def test_a_search_whose_neighbourhood_is_all_scored_stops_as_converged(calibration):
    state = searcher(calibration, budget=0.9, layers=[4, 5]).run(500)
    assert state.converged and state.step < 500 and state.history[-1]["key"] is None
    assert searcher(calibration, budget=0.9, layers=[4, 5]).run(600, state).step == state.step
