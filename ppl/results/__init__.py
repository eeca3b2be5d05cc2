"""The parts of ``ppl.result``, one job each: ``values`` (values as table keys and tensors,
discreteness), ``stats`` (weighted and exact statistics, per-site views), ``text`` (the
summary table), ``export`` (JSON and HTML), ``plots`` (matplotlib). The result classes
and every public name live in ``ppl.result``; nothing here imports it."""
