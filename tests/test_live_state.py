"""semantics/live_state.py in one process: what the walk of a suspended run finds (its size
does not grow with the checkpoint: distributed SMC's move is O(state), not O(T)), how the
ranks' views are reconciled, and the move installed in place."""
from __future__ import annotations

import pytest
import torch

import ppl
from ppl.inference.methods import _program
from ppl.inference.smc import SMCHandler
from ppl.semantics import live_state as L
from ppl.semantics.sampling import drive
from ppl.semantics.values import Batched, Lineage, Particles, lineage_scope, materialize

SSM = """
def main(ys):
    x = 0.0
    for t in range(len(ys)):
        x ~ normal(0.8 * x, 1.0)
        observe ys[t] ~ normal(x, 0.7)
    return x
"""


def _walks(source: str, data: dict, N: int = 8, at=None) -> dict:
    """{checkpoint number: (the walk's places, its number of batched values, the columns
    it would move)} of a seeded SMC run, the trace set aside before each walk (as
    distributed SMC does; a walk is not kept: it holds the values it found)."""
    interp, entry, data = _program(ppl.model(source), data, "cpu")
    found = {}

    class Walking(SMCHandler):
        seen = 0

        def _checkpoint(self, eff):
            super()._checkpoint(eff)
            self.seen += 1
            if at is None or self.seen in at:
                self.trace.parts.clear()
                w = L.walk([("run", self.gen), ("effect", eff), ("twist", self._twist)], self.lineage, data)
                found[self.seen] = (list(w.places), len(w.batched), [c.path for c in L.agree([w.view()])])
    ctx = Particles.all(N)
    with ppl.stdlib.rng.run(0), lineage_scope(Lineage(ctx.idx)) as lineage:
        h = Walking(N, "cpu", lineage)
        h.gen = interp.run(entry, data, ctx)
        drive(h.gen, h)
    return found


def test_the_walk_of_a_state_space_model_does_not_grow_with_the_checkpoint():
    """At checkpoint 1 and 40 of the SSM the live state is the same places (the current x
    is its only batched value): moving it costs the same at every checkpoint."""
    walks = _walks(SSM, {"ys": [0.1 * t for t in range(40)]}, at=(1, 40))
    first, last = walks[1], walks[40]
    assert first[0] == last[0] and first[1] == last[1] == 1
    assert first[2] == last[2] == ["run/from/call_closure.fr.vars[x]"]


def test_views_that_differ_only_in_representation_are_mended_and_others_refused():
    """A variable unbatched on one rank and batched on another becomes batched rows on
    both (the dtype promoted); a variable one rank lacks gets a presence column; a
    batched value some particles lack keeps its place with a presence column; a value
    that differs at a place the walk cannot write is an error naming it."""
    batched = ("batched", "torch.float32", (), True)
    a = [("f.vars[x]", ("atom", "float", "0.0"), True, True, "f"), ("f.vars[u]", batched, True, True, "f"),
         ("f.vars[w]", ("batched", "torch.float32", (), False), True, True, "f")]
    b = [("f.vars[x]", ("batched", "torch.float64", (), True), True, True, "f"),
         ("f.vars[w]", batched, True, True, "f")]
    cols = {c.path: c for c in L.agree([a, b])}
    assert cols["f.vars[x]"].replace and cols["f.vars[x]"].dtype == "torch.float64" and not cols["f.vars[x]"].presence
    assert cols["f.vars[u]"].replace and cols["f.vars[u]"].presence
    assert not cols["f.vars[w]"].replace and cols["f.vars[w]"].presence
    fixed = [("run/g.k", ("atom", "int", "3"), False, False, "")]
    with pytest.raises(L.CannotMove, match="a value that differs between ranks"):
        L.agree([fixed, [("run/g.k", ("atom", "int", "4"), False, False, "")]])
    with pytest.raises(L.CannotMove, match="values of different shapes"):
        L.agree([[("f.vars[v]", ("batched", "torch.float32", (2,), True), True, True, "f")],
                 [("f.vars[v]", ("batched", "torch.float32", (3,), True), True, True, "f")]])


def test_installed_rows_replace_every_live_value_and_a_missed_value_fails_loudly():
    """``install`` gives each batched value its new rows in place (every holder sees them)
    and starts a new epoch whose ancestor array is invalid: a value that was not moved
    raises when read, rather than reading rows of other particles."""
    N = 4
    idx = torch.arange(N)
    with lineage_scope(Lineage(idx)) as lineage:
        x = Batched(torch.tensor([1.0, 2.0, 3.0, 4.0]), idx)
        missed = Batched(torch.tensor([5.0, 6.0, 7.0, 8.0]), idx)
        holder = {"x": x}
        found = L.Walk()
        found.places["f.vars[x]"] = L.Place(x, holder, "x", ("batched", "torch.float32", (), True), True, "f")
        found.batched.append(x)
        cols = L.agree([found.view()])
        new = {"f.vars[x]": torch.tensor([9.0, 9.5, 1.0, 2.0])}
        L.install(found, cols, new, lineage)
        assert holder["x"] is x and torch.equal(x.t, new["f.vars[x]"])
        with pytest.raises((IndexError, RuntimeError)):
            missed.t


def _moved_at_first_checkpoint(source: str, N: int = 8) -> tuple:
    """A seeded SMC run whose first checkpoint moves the live state as a rank would with
    the rows reversed (particle k takes particle N-1-k's state: walk, agree, columns,
    widen the Python rows, install); (the variable 's' before, after, the columns)."""
    from ppl.semantics import live_values
    interp, entry, data = _program(ppl.model(source), {}, "cpu")
    seen = {}

    class Moving(SMCHandler):
        def _checkpoint(self, eff):
            if "before" in seen:
                return super()._checkpoint(eff)
            self.trace.parts.clear()
            w = L.walk([("run", self.gen), ("effect", eff), ("twist", self._twist)], self.lineage, data)
            agreed = L.agree([w.view()])
            cols = L.columns(w, agreed, N, "cpu")
            paths = L.python_paths(agreed)
            cols = {k: live_values.pad(c, c.shape[1] + 3) if k in paths else c for k, c in cols.items()}
            frame = w.frames[next(p for p in w.frames if p.endswith("call_closure.fr"))]
            seen["before"] = materialize(frame.vars["s"], Particles.all(N))
            L.install(w, agreed, {k: c.flip(0) for k, c in cols.items()}, self.lineage)
            seen["after"] = materialize(frame.vars["s"], Particles.all(N))
            seen["columns"] = agreed
    ctx = Particles.all(N)
    with ppl.stdlib.rng.run(0), lineage_scope(Lineage(ctx.idx)) as lineage:
        h = Moving(N, "cpu", lineage)
        h.gen = interp.run(entry, data, ctx)
        drive(h.gen, h)
    return seen["before"], seen["after"], seen["columns"]


def test_a_per_particle_string_in_the_state_moves_as_python_rows():
    """A per-particle string is a column of JSON rows (``semantics.live_values``): the
    reversed rows install the reversed strings in place, tokens of the toy LM with
    their ids, tuples as tuples."""
    src = ('def main():\n    z ~ flip(0.5)\n    s = ["heads", (1, 2.5)] if z else ["tails", (None, 0.1)]\n'
           '    observe 1.0 ~ normal(3.0 if z else 0.0, 1.0)\n    return s\n')
    before, after, cols = _moved_at_first_checkpoint(src)
    assert L.PYTHON in [c.dtype for c in cols if "vars[s]" in c.path]
    assert after == before[::-1] and {x[0] for x in before} == {"heads", "tails"}
    assert all(type(x[1]) is tuple for x in after)


def test_tokens_of_the_toy_lm_move_with_their_ids():
    src = ('def main():\n    lm = toy_lm()\n    s ~ lm.next_token([])\n'
           '    observe 1.0 ~ normal(0.0, 1.0)\n    return s\n')
    before, after, _ = _moved_at_first_checkpoint(src)
    assert after == before[::-1] and [t.id for t in after] == [t.id for t in before[::-1]]
    assert all(type(t).__name__ == "Token" for t in after)


def test_a_per_particle_value_that_is_not_data_is_refused_naming_it():
    """A per-particle function cannot be written as data: refused naming the variable."""
    src = ('def main():\n    z ~ flip(0.5)\n    s = (lambda x: x) if z else (lambda x: -x)\n'
           '    observe 1.0 ~ normal(3.0 if z else 0.0, 1.0)\n    return s(1.0)\n')
    with pytest.raises(L.CannotMove, match="per-particle Python values that are not data .* the variable 's'"):
        _moved_at_first_checkpoint(src, N=16)


def test_python_rows_round_trip_as_tagged_json_and_never_run_code():
    """``live_values``: each type comes back as itself (tuples as tuples, Fractions, tokens
    with their ids, floats bit for bit, small tensors), rows widen; what is not data, a
    token of a model the rank lacks, or a malformed row is ``NotData`` (the bytes are
    JSON: a row that would be a pickle is just malformed)."""
    import pickle
    from fractions import Fraction
    from ppl.semantics import live_values as V
    from ppl.stdlib.lm.dsl import toy_lm_value
    lm = toy_lm_value()
    models = V.Models()
    models.add(lm, "toy_lm()")
    items = ["s", "", None, True, 3, 0.1 + 0.2, float("-inf"), [1, ("a", 2.5)], (), Fraction(2, 7),
             {"k": [None]}, lm.token(3), lm.completion((1, 4)), torch.tensor([[1.5, -2.0]], dtype=torch.float64)]
    back = V.decode(V.pad(V.encode(items, models), 200), models)
    for x, y in zip(items, back):
        assert type(x) is type(y)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert back[11].id == 3 and back[12].ids == (1, 4)
    with pytest.raises(V.NotData, match="function"):
        V.encode([lambda: 0], models)
    with pytest.raises(V.NotData, match="does not hold"):
        V.decode(V.encode([lm.token(2)], models), V.Models())
    evil = pickle.dumps(items[:3])
    row = torch.zeros((1, 4 + len(evil)), dtype=torch.uint8)
    row[0, :4] = torch.tensor(list(len(evil).to_bytes(4, "little")))
    row[0, 4:] = torch.tensor(list(evil))
    with pytest.raises((V.NotData, ValueError)):
        V.decode(row, models)
