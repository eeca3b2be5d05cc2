"""``python -m ppl.inference.prepare`` (run by scripts/setup.sh): NUTS's per-machine artifacts
built ahead of a machine's first NUTS run -- the C++ loops and AOTInductor's precompiled
headers and wrapper runtime (one tiny library) -- once: a second call has nothing to do, and
a machine where they cannot be built still sets up (NUTS then runs its transitions eagerly)."""
from __future__ import annotations

import os

from ppl.inference import compiled, nuts_native, prepare


def test_prepare_builds_once_and_then_has_nothing_to_do():
    prepare.prepare_machine(verbose=False)
    assert nuts_native.built()
    if compiled.NATIVE["on"]:
        gm, example = prepare._tiny_potential()
        assert os.path.exists(compiled._native_path(gm, [*example, *compiled._tensors_held(gm)]))
    assert prepare.prepare_machine(verbose=False) == {}


def test_a_machine_where_nothing_can_be_built_still_sets_up(monkeypatch, capsys):
    def broken(verbose=True):
        raise RuntimeError("no C++ compiler\nmore")
    monkeypatch.setattr(prepare, "prepare_machine", broken)
    assert prepare.main() == 0
    err = capsys.readouterr().err
    assert "not built (RuntimeError: no C++ compiler)" in err and "eagerly" in err
