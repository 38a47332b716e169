"""The per-layer schedule with the best calibration score whose MACs fit a budget.

A schedule is a removal count for every layer and, when several methods are searched, the method
of every layer that removes (run together by `compose`). The search starts from the best uniform
schedule of each method (the same `r` in every layer, or the same keep ratio), brought within the
budget window, and then climbs: each step moves a few tokens of removal from one layer to another
(or gives a layer another method), brings the result back into the window by adjusting the latest
layers, scores it on the calibration images, and keeps it when it scores better. The random moves
come from a seeded generator whose state is part of the search state, so a search is reproducible
and resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenreduce.api import apply
from tokenreduce.cost import RATIO_STEP, match_macs, reducer_macs
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.base import create_reducer, reducer_class, reducer_defaults
from tokenreduce.reducers.compose import NOT_COMPOSABLE

WINDOW = 0.01  # a schedule fits when its MAC fraction is in [budget * (1 - WINDOW), budget]
OBJECTIVES = ("accuracy", "loss", "embedding")
SET_BY_SEARCH = ("r", "ratio", "inflect", "layers")  # parameters a search sets; not allowed as fixed ones
MOVE_SIZES = (1, 1, 2, 3, 4)  # tokens shifted between two layers by one move (small moves drawn more)
DRAWS_PER_STEP = 50  # proposals tried per step before the neighbourhood counts as exhausted


def searchable_methods() -> list[str]:
    """Registered reducers whose removal can be set per layer (an `r` parameter taking a list)."""
    from tokenreduce.reducers import available

    return [name for name in available() if name != "compose" and "r" in reducer_defaults(name)]


@dataclass(frozen=True)
class Candidate:
    """Per layer: the method that removes there (None where nothing is removed) and how many tokens."""

    methods: tuple[str | None, ...]
    r: tuple[int, ...]

    @property
    def key(self) -> str:
        return json.dumps([list(self.methods), list(self.r)])

    @classmethod
    def from_key(cls, key: str) -> Candidate:
        methods, r = json.loads(key)
        return cls(tuple(methods), tuple(r))


@dataclass
class Score:
    top1: float | None  # calibration top-1 (None without labels)
    loss: float | None  # calibration cross-entropy
    cosine: float  # mean cosine similarity of the reduced and unreduced embeddings
    mac_fraction: float

    def rank(self, objective: str) -> tuple:
        if objective == "accuracy":
            return (self.top1, -self.loss, self.cosine)  # ties on top-1 go to the lower loss
        if objective == "loss":
            return (-self.loss, self.top1, self.cosine)
        return (self.cosine,)


class ScheduleSpace:
    """How candidates become reducer configurations, and which ones are allowed."""

    @staticmethod
    def check(reducer: str, methods: list[str], fixed: dict[str, dict]) -> None:
        """Refuse methods that cannot be searched (or composed) and invalid fixed parameters."""
        allowed = searchable_methods()
        for name in methods:
            if name not in allowed:
                raise ConfigError(f"search.methods: {name!r} cannot be searched per layer; allowed: "
                                  f"{', '.join(allowed)} (reducers with a per-layer removal count r)")
            if reducer == "compose" and name in NOT_COMPOSABLE:
                raise ConfigError(f"search.methods: {name!r} cannot be composed: {NOT_COMPOSABLE[name]}")
        for name, params in fixed.items():
            if name not in methods:
                raise ConfigError(f"search.fixed.{name}: {name!r} is not searched; allowed: {', '.join(methods)}")
            clash = sorted(set(params) & set(SET_BY_SEARCH))
            if clash:
                raise ConfigError(f"search.fixed.{name}.{clash[0]}: the search sets {', '.join(SET_BY_SEARCH)}; "
                                  "allowed: the method's other parameters")
            create_reducer(name, **params)  # an unknown or invalid fixed parameter fails now

    def __init__(self, reducer: str, methods: list[str], fixed: dict[str, dict], depth: int, num_patches: int,
                 layers: list[int] | None = None, compose_params: dict | None = None):
        self.check(reducer, methods, fixed)
        if layers is not None:
            bad = [layer for layer in layers if not 0 <= layer < depth]
            if bad:
                raise ConfigError(f"search.layers={layers}: {bad} beyond the model's {depth} blocks; "
                                  f"allowed: 0 .. {depth - 1}")
        self.reducer, self.methods, self.fixed = reducer, list(methods), fixed
        self.depth, self.num_patches = depth, num_patches
        self.layers = sorted(set(range(depth) if layers is None else layers))
        self.compose_params = dict(compose_params or {})

    # --- candidates -> configurations --------------------------------------------------------
    def config(self, candidate: Candidate) -> tuple[str, dict]:
        """(reducer name, parameters) that run `candidate`."""
        if self.reducer != "compose":
            return self.reducer, self._params(self.reducer, list(candidate.r))
        parts = []
        for name in self.methods:
            owned = [layer for layer, m in enumerate(candidate.methods) if m == name]
            if owned:
                r = [n if m == name else 0 for m, n in zip(candidate.methods, candidate.r, strict=True)]
                parts.append({"name": name, "layers": owned, **self._params(name, r)})
        if not parts:  # nothing removed anywhere: the first method with a zero schedule
            parts = [{"name": self.methods[0], "layers": [0], **self._params(self.methods[0], [0] * self.depth)}]
        return "compose", {"parts": parts, **self.compose_params}

    def _params(self, name: str, r: list[int]) -> dict:
        params = {**self.fixed.get(name, {}), "r": r}
        defaults = reducer_defaults(name)
        if defaults.get("ratio") is not None:  # a default keep ratio would clash with r
            params["ratio"] = None
        if defaults.get("layers") is not None:  # a default staging (e.g. PPT's 3, 6, 9) would hide the list
            params["layers"] = None
        return params

    def uniform_config(self, method: str, setting: dict) -> tuple[str, dict]:
        """(name, parameters) of a uniform schedule in its readable form: {"r": 6} or {"ratio": 0.8}."""
        if "ratio" in setting:
            return method, {**self.fixed.get(method, {}), "ratio": setting["ratio"]}
        params = self._params(method, setting["r"])
        if self.layers != list(range(self.depth)):  # only the searched layers remove
            if "layers" in params:
                params["layers"] = self.layers
            else:
                params["r"] = [setting["r"] if layer in self.layers else 0 for layer in range(self.depth)]
        return method, params

    def realised(self, candidate: Candidate) -> Candidate:
        """The candidate as it runs: the counts its reducer actually removes (caps applied)."""
        name, params = self.config(candidate)
        counts = create_reducer(name, **params).removal_counts(self.depth, self.num_patches)
        methods = tuple(m if n else None for m, n in zip(candidate.methods, counts, strict=True))
        return Candidate(methods, tuple(counts))

    def uniform(self, method: str, r: int) -> Candidate:
        return self.realised(Candidate(
            tuple(method if layer in self.layers else None for layer in range(self.depth)),
            tuple(r if layer in self.layers else 0 for layer in range(self.depth))))

    # --- moves -------------------------------------------------------------------------------
    def neighbour(self, candidate: Candidate, rng: random.Random) -> Candidate:
        """A random small change: shift removal between two searched layers, or (with several
        methods) give one removing layer another method."""
        methods, r = list(candidate.methods), list(candidate.r)
        removing = [layer for layer in self.layers if r[layer] > 0]
        if len(self.methods) > 1 and removing and rng.random() < 0.3:
            layer = rng.choice(removing)
            methods[layer] = rng.choice([m for m in self.methods if m != methods[layer]])
            return self.realised(Candidate(tuple(methods), tuple(r)))
        if not removing or len(self.layers) < 2:
            return candidate
        source = rng.choice(removing)
        target = rng.choice([layer for layer in self.layers if layer != source])
        moved = min(rng.choice(MOVE_SIZES), r[source])
        r[source] -= moved
        r[target] += moved
        if methods[target] is None:
            methods[target] = methods[source]
        if r[source] == 0:
            methods[source] = None
        return self.realised(Candidate(tuple(methods), tuple(r)))

    def change(self, candidate: Candidate, layer: int, amount: int) -> Candidate:
        """`candidate` removing `amount` more tokens (fewer, if negative) at `layer`, as it runs."""
        methods, r = list(candidate.methods), list(candidate.r)
        r[layer] = max(0, r[layer] + amount)
        if r[layer] and methods[layer] is None:  # a layer that starts removing takes the method before it
            methods[layer] = next((m for m in reversed(methods[:layer]) if m), None) or self.methods[0]
        if r[layer] == 0:
            methods[layer] = None
        return self.realised(Candidate(tuple(methods), tuple(r)))

    def step_latest(self, candidate: Candidate, more: bool, macs: Callable[[Candidate], float]
                    ) -> tuple[int, Candidate] | None:
        """(layer, `candidate` with one token more or less removed there) for the latest searched layer
        where that changes the MACs; None if no layer can."""
        before = macs(candidate)
        for layer in reversed(self.layers):
            if not more and candidate.r[layer] == 0:
                continue
            changed = self.change(candidate, layer, 1 if more else -1)
            if macs(changed) != before:
                return layer, changed
        return None


def features(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, embedding): a timm model's pre-logits features, or its output for other models."""
    if hasattr(model, "forward_head") and hasattr(model, "forward_features"):
        tokens = model.forward_features(images)
        return model.forward_head(tokens), model.forward_head(tokens, pre_logits=True)
    out = model(images)
    return out, out


class Evaluator:
    """Scores and MAC fractions of reducer configurations on fixed calibration images."""

    def __init__(self, model: nn.Module, images: Tensor, labels: Tensor | None, batch_size: int = 256,
                 adapter_options: dict | None = None):
        self.model, self.images, self.labels, self.batch_size = model, images, labels, batch_size
        self.adapter_options = adapter_options
        apply(model, "none", adapter_options=adapter_options)  # the options stay with every reducer tried
        self.base_macs = reducer_macs(model, "none")
        _, self.reference = self._run()
        self._macs: dict[str, float] = {}

    @torch.inference_mode()
    def _run(self) -> tuple[Tensor, Tensor]:
        logits, embeddings = [], []
        for start in range(0, len(self.images), self.batch_size):
            out, emb = features(self.model, self.images[start : start + self.batch_size])
            logits.append(out.float())
            embeddings.append(emb.float())
        return torch.cat(logits), torch.cat(embeddings)

    def mac_fraction(self, name: str, params: dict) -> float:
        key = json.dumps([name, params], sort_keys=True)
        if key not in self._macs:
            self._macs[key] = reducer_macs(self.model, name, **params) / self.base_macs
        return self._macs[key]

    def score(self, name: str, params: dict) -> Score:
        apply(self.model, name, **params)
        try:
            logits, embeddings = self._run()
        finally:
            apply(self.model, "none")
        cosine = float(F.cosine_similarity(embeddings, self.reference, dim=-1).mean())
        top1 = loss = None
        if self.labels is not None:
            labels = self.labels.to(logits.device)
            top1 = float((logits.argmax(-1) == labels).float().mean())
            loss = float(F.cross_entropy(logits, labels))
        return Score(top1, loss, cosine, self.mac_fraction(name, params))


@dataclass
class SearchState:
    """Everything a search needs to continue: written after every step, JSON-serialisable."""

    fingerprint: dict  # the settings that must match for a resume
    step: int = 0
    rng: list | None = None
    best: str | None = None  # Candidate.key
    start: str | None = None  # Candidate.key: the best uniform schedule brought into the window
    converged: bool = False  # every schedule near the best was scored: more steps change nothing
    uniform: dict = field(default_factory=dict)  # method -> {"r" or "ratio": value, "key": Candidate.key}
    scores: dict = field(default_factory=dict)  # Candidate.key -> asdict(Score)
    history: list = field(default_factory=list)  # per step: candidate key, score, accepted

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> SearchState:
        return cls(**json.loads(text))


def check_fingerprint(saved: dict, current: dict) -> None:
    """A resumed search must have the settings of the search it continues."""
    differing = sorted(k for k in set(saved) | set(current)
                       if json.dumps(saved.get(k), sort_keys=True) != json.dumps(current.get(k), sort_keys=True))
    if differing:
        key = differing[0]
        raise ConfigError(f"search.resume: the saved search has {key}={saved.get(key)!r}, this run "
                          f"{current.get(key)!r}; allowed: the same settings as the search resumed "
                          "(only search.steps may grow)")


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _restore_rng(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


class ScheduleSearch:
    """Hill-climbing over per-layer schedules within a MAC budget (see the module's docstring)."""

    def __init__(self, space: ScheduleSpace, evaluator: Evaluator, budget: float, objective: str, seed: int,
                 fingerprint: dict | None = None):
        if objective not in OBJECTIVES:
            raise ConfigError(f"search.objective={objective!r} is invalid; allowed: {', '.join(OBJECTIVES)}")
        if objective in ("accuracy", "loss") and evaluator.labels is None:
            raise ConfigError(f"search.objective={objective!r} needs labelled calibration images; allowed: "
                              "'embedding'")
        self.space, self.evaluator, self.budget, self.objective, self.seed = space, evaluator, budget, objective, seed
        self.fingerprint = {**(fingerprint or {}), "budget": budget, "objective": objective, "seed": seed,
                            "methods": space.methods, "reducer": space.reducer, "layers": space.layers,
                            "fixed": space.fixed, "images": len(evaluator.images)}

    # --- pieces ------------------------------------------------------------------------------
    def macs(self, candidate: Candidate) -> float:
        return self.evaluator.mac_fraction(*self.space.config(candidate))

    def fits(self, candidate: Candidate) -> bool:
        return self.budget * (1 - WINDOW) - 1e-12 <= self.macs(candidate) <= self.budget + 1e-12

    def fit(self, candidate: Candidate) -> Candidate | None:
        """`candidate` brought into the budget window by removing more (or fewer) tokens in the
        latest layers, where one token moves the MACs least; None if it cannot be."""
        target = self.budget * (1 - WINDOW / 2)
        for _ in range(4 * self.space.depth * max(self.space.num_patches.bit_length(), 1)):
            if self.fits(candidate):
                return candidate
            before = self.macs(candidate)
            stepped = self.space.step_latest(candidate, more=before > self.budget, macs=self.macs)
            if stepped is None:
                return None
            layer, candidate = stepped
            # far from the window, take as many tokens at that layer as its one-token change suggests
            per_token = abs(before - self.macs(candidate))
            extra = int(abs(target - self.macs(candidate)) / per_token) if per_token else 0
            if extra and not self.fits(candidate):
                candidate = self.space.change(candidate, layer, extra if before > self.budget else -extra)
        return candidate if self.fits(candidate) else None

    def _score(self, state: SearchState, candidate: Candidate) -> Score:
        if candidate.key not in state.scores:
            state.scores[candidate.key] = asdict(self.evaluator.score(*self.space.config(candidate)))
        return Score(**state.scores[candidate.key])

    def _better(self, a: Score, b: Score) -> bool:
        return a.rank(self.objective) > b.rank(self.objective)

    def uniform_schedules(self, state: SearchState) -> None:
        """Each method's best uniform schedule at or below the budget: the same r in every searched
        layer, and (for methods with one) the same keep ratio, whichever scores better."""
        for method in self.space.methods:
            options = []
            r = 0
            while True:
                candidate = self.space.uniform(method, r)
                if self.macs(candidate) <= self.budget + 1e-12:
                    options.append(({"r": r}, candidate))
                    break
                if r > self.space.num_patches:
                    break
                r += 1
            ratio = self._uniform_ratio(method)
            if ratio is not None:
                options.append(ratio)
            scored = [(setting, c, self._score(state, c)) for setting, c in options]
            if not scored:
                raise ConfigError(f"search: no uniform {method} schedule reaches budget {self.budget:g} of the MACs; "
                                  "allowed: a larger budget")
            setting, candidate, _ = max(scored, key=lambda item: item[2].rank(self.objective))
            state.uniform[method] = {**setting, "key": candidate.key}

    def _uniform_ratio(self, method: str) -> tuple[dict, Candidate] | None:
        if "ratio" not in {s.param for s in reducer_class(method).strength} or self.space.layers != list(
                range(self.space.depth)):
            return None
        fixed = self.space.fixed.get(method, {})
        try:
            params, reached = match_macs(self.evaluator.model, method, self.budget, tolerance=1.0, param="ratio",
                                         **fixed)
        except ConfigError:
            return None
        ratio = params["ratio"]
        while reached > self.budget + 1e-12 and ratio > RATIO_STEP:
            ratio = round(ratio - RATIO_STEP, 6)
            reached = self.evaluator.mac_fraction(method, {**fixed, "ratio": ratio})
        if reached > self.budget + 1e-12:
            return None
        counts = create_reducer(method, **{**fixed, "ratio": ratio}).removal_counts(self.space.depth,
                                                                                   self.space.num_patches)
        candidate = self.space.realised(Candidate(tuple(method if n else None for n in counts), tuple(counts)))
        return {"ratio": ratio}, candidate

    # --- the search --------------------------------------------------------------------------
    def start(self) -> SearchState:
        state = SearchState(fingerprint=self.fingerprint, rng=_rng_state(random.Random(self.seed)))
        self.uniform_schedules(state)
        best_uniform = max((Candidate.from_key(u["key"]) for u in state.uniform.values()),
                           key=lambda c: self._score(state, c).rank(self.objective))
        start = self.fit(best_uniform)
        if start is None:
            raise ConfigError(f"search: no schedule fits within {100 * WINDOW:g}% below the budget {self.budget:g}; "
                              "allowed: another budget")
        self._score(state, start)
        state.best = state.start = start.key
        return state

    def check_resume(self, state: SearchState) -> None:
        check_fingerprint(state.fingerprint, self.fingerprint)

    def run(self, steps: int, state: SearchState | None = None,
            on_step: Callable[[SearchState], None] | None = None) -> SearchState:
        """Search until `steps` steps are done, from `state` (a saved search) or from the start;
        `on_step(state)` is called after the start and after every step (to save and report)."""
        if state is None:
            state = self.start()
            if on_step:
                on_step(state)
        else:
            self.check_resume(state)
        rng = _restore_rng(state.rng)
        while state.step < steps and not state.converged:
            best = Candidate.from_key(state.best)
            candidate = None
            for _ in range(DRAWS_PER_STEP):
                proposal = self.fit(self.space.neighbour(best, rng))
                if proposal is not None and proposal.key not in state.scores:
                    candidate = proposal
                    break
            state.step += 1
            if candidate is None:  # every nearby schedule is scored: the search has converged
                state.history.append({"step": state.step, "key": None, "accepted": False})
                state.converged = True
            else:
                score = self._score(state, candidate)
                accepted = self._better(score, Score(**state.scores[state.best]))
                if accepted:
                    state.best = candidate.key
                state.history.append({"step": state.step, "key": candidate.key, "accepted": accepted})
            state.rng = _rng_state(rng)
            if on_step:
                on_step(state)
        return state
