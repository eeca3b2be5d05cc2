"""The guides people hold: ``ppl.guide(...)``, ``ppl.Guide`` (and guides written in the DSL).

The algorithms are in ``inference/`` (``amortized``: the guide as a proposal and its
training; ``guides``: the families; ``program_guide``: guides written in the DSL); this
module adds what is for people: the result object of ``posterior()``, the loss plot, and
the guide files (``save``/``load``, checksummed through ``stdlib.files``).

    import ppl
    m = ppl.model("examples/gaussian_mean.ppl")
    guide = ppl.guide(m, {"ys": [0.0] * 20, "sigma": 2.0}, family="normal", encoder="auto")
    guide.fit(objective="forward_kl", steps=2000, seed=0)
    m.run("importance", new_data, particles=1000, proposal=guide)   # or proposal="g.pt"
    guide.save("g.pt"); g2 = ppl.Guide.load("g.pt", m)
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from .inference import amortized, program_guide
from .inference.guides import FAMILIES
from .inference.population import Population
from .inference.program_guide import _Params
from .result import _pyplot, as_result
from .semantics.errors import PPLError
from .semantics.sampling import LikelihoodWeighting, column, drive
from .semantics.values import Particles
from .stdlib import rng
from .stdlib.files import check_fields, load_checked, save_checked

__all__ = ["Guide", "ProgramGuide", "guide", "load_proposal"]

FORMAT = "ppl.guide/1"
PROGRAM_FORMAT = "ppl.program_guide/1"


def guide(model, data: Mapping[str, Any] | None = None, *, program: Any = None, **options) -> "Guide":
    """``ppl.guide(model, data, family=..., encoder=...)``: an automatic ``Guide`` (see its
    docstring); ``ppl.guide(model, data, program=source_or_model)``: a guide written in the
    DSL with ``param`` declarations (``inference.program_guide``)."""
    if program is not None:
        if options:
            raise PPLError(f"a guide program takes no option '{next(iter(options))}'",
                           hint="family/encoder/... configure automatic guides; a guide program is its own "
                                "family")
        return ProgramGuide(model, data, program)
    return Guide(model, data, **options)


def load_proposal(proposal: Any, model, data: Mapping[str, Any] | None) -> Any:
    """A ``proposal=`` option as the methods take it: the path of a saved guide is loaded
    (for ``model``, with ``data`` as its template); anything else passes unchanged."""
    if isinstance(proposal, (str, os.PathLike)):
        return Guide.load(proposal, model, data)
    return proposal


def _plain_data(data) -> Any:
    """The data as plain Python/tensors when it can be saved, else None."""
    if isinstance(data, torch.Tensor):
        return data.detach().cpu()
    if isinstance(data, (bool, int, float, str)) or data is None:
        return data
    if isinstance(data, (list, tuple)):
        out = [_plain_data(x) for x in data]
        return None if any(x is None and y is not None for x, y in zip(out, data)) else out
    if isinstance(data, dict):
        out = {k: _plain_data(v) for k, v in data.items()}
        return None if any(out[k] is None and data[k] is not None for k in data) else out
    try:
        import numpy as np
        if isinstance(data, np.ndarray):
            return torch.from_numpy(data)
    except ImportError:  # pragma: no cover
        pass
    return None


def _read_guide_file(path) -> dict:
    """The dict saved at ``path`` by ``Guide.save`` (either kind of guide), checksum
    verified; a file saved before guides carried a checksum loads with a warning."""
    blob, checked = load_checked(path, "guide", hint="the file must come from Guide.save")
    if not checked:
        warnings.warn(f"the guide file '{os.fspath(path)}' has no checksum (saved by an older ppl), so damage to "
                      "it cannot be detected; save it again to add one", UserWarning, stacklevel=3)
    return blob


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _num_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _tensor_dict(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, torch.Tensor) for k, x in v.items())


def _signature(layout) -> dict:
    """The sites and observations of a guide's layout as plain data: a saved guide loads
    only where the model and data give the same."""
    def site(s):
        if s.kind != "continuous":
            return [s.addr, s.kind, tuple(s.shape), s.K, s.low]
        c = s.support
        bounds = [float(b) for b in (getattr(c, "lower_bound", None), getattr(c, "upper_bound", None))
                  if b is not None]
        return [s.addr, s.kind, tuple(s.shape), type(c).__name__ + (str(tuple(bounds)) if bounds else "")]
    return {"sites": [site(s) for s in layout.sites], "observed": [[a, list(sh)] for a, sh in layout.observed]}


#: the entries of a saved automatic guide and their types (``Guide.load`` checks them)
GUIDE_FIELDS = {
    "entry": str, "family": (lambda v: v in FAMILIES, f"one of {', '.join(FAMILIES)}"),
    "encoder": (lambda v: v in (None, "auto", "custom"), "None, 'auto' or 'custom'"),
    "options": dict, "sites": (lambda v: v is None or _str_list(v), "None or a list of addresses"),
    "signature": dict, "state": (_tensor_dict, "a dict of tensors"),
    "history": (_num_list, "a list of numbers"), "objectives": (_str_list, "a list of names"),
    "features_set": bool, "template": object,
}
GUIDE_OPTION_FIELDS = {
    "rank": int, "hidden": (lambda v: isinstance(v, list) and all(isinstance(h, int) for h in v), "a list of ints"),
    "flow_bins": int, "autoregressive": bool, "init_scale": (lambda v: v is None or isinstance(v, (int, float)),
                                                             "None or a number"),
}
#: the same for a guide written in the DSL (``ProgramGuide``)
PROGRAM_GUIDE_FIELDS = {
    "entry": str, "program": str, "program_entry": str, "params": (_tensor_dict, "a dict of tensors"),
    "constraints": dict, "history": (_num_list, "a list of numbers"),
    "objectives": (_str_list, "a list of names"), "sites": (_str_list, "a list of addresses"),
}


class Guide(amortized.Guide):
    __doc__ = amortized.Guide.__doc__

    def __repr__(self) -> str:
        sites = ", ".join(self.sites) if self.net is not None else "not built"
        return f"<ppl.Guide {self.family} {'amortized' if self.amortized else 'fixed'} for {self.model.entry}: {sites}>"

    def parameters(self):
        self._ready()
        return self.net.parameters()

    def to(self, device) -> "Guide":
        self._ready()
        self.net.to(device)
        return self

    def posterior(self, data: Mapping[str, Any] | None = None, particles: int = 1000, seed: int | None = None):
        """The guide's own approximation of the posterior: ``particles`` draws from q
        (the model run with every known choice from the guide, the others from their
        priors), all with equal weight: a ``WeightedResult`` with method "guide" (no
        evidence: its ``log_evidence`` is 0 by construction)."""
        data = self.template if data is None else self.model.bind((), data)
        N = int(particles)
        with rng.run(seed), torch.no_grad():
            h = amortized.guided(LikelihoodWeighting(N, "cpu"), self.proposal_run(data, N))
            ctx = Particles.all(N)
            ret = drive(self.model.interpreter().run(self.model.entry, self.model.prepare_data(data, "cpu"), ctx), h)
        return as_result(Population("guide", {"return": (column(ret, ctx), None), **h.trace.sites()},
                                    torch.zeros(N, dtype=torch.float64), {"proposal": self.describe()}))

    def log_prob(self, values: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> torch.Tensor:
        """log q(values | data) [B] for ``values``: address -> B values of each site."""
        self._ready(data)
        feats = self.features(data) if self.amortized else None
        vals, B = {}, None
        for s in self.layout.sites:
            if s.addr not in values:
                raise PPLError(f"no value for the guide's site '{s.addr}'", hint=f"the sites are: {', '.join(self.sites)}")
            v = values[s.addr]
            if s.kind != "token":
                v = torch.as_tensor(v)
                if v.dim() == len(s.shape):
                    v = v.unsqueeze(0)
                n = v.shape[0]
            else:
                v = [v] if isinstance(v, str) else list(v)
                n = len(v)
            vals[s.addr] = v
            B = n if B is None else B
        with torch.no_grad():
            return self.net.log_prob(vals, None if feats is None else feats.expand(B, -1), B)

    # --------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> None:
        """Save the trained guide (parameters, configuration, loss history, and the data
        it was built with when that is plain numbers) with ``torch.save``."""
        self._ready()
        enc = "auto" if self.encoder == "auto" else (None if self.encoder is None else "custom")
        blob = {"format": FORMAT, "entry": self.model.entry, "family": self.family, "encoder": enc,
                "options": self.options, "sites": self.site_list, "signature": _signature(self.layout),
                "state": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "history": list(self.history), "objectives": list(self.objectives),
                "features_set": self.features_set, "template": _plain_data(self.template)}
        save_checked(blob, path, "guide")

    @classmethod
    def load(cls, path: str | os.PathLike, model, data: Mapping[str, Any] | None = None,
             encoder: nn.Module | None = None) -> "Guide":
        """A guide saved by ``save``, for ``model``. ``data`` (a data set of the shape the
        guide was built for) is needed when the saved one was not plain numbers (e.g. a
        language model); ``encoder`` (a module of the same architecture) when the guide
        had a custom encoder."""
        blob = _read_guide_file(path)
        if blob.get("format") == PROGRAM_FORMAT:
            check_fields(blob, PROGRAM_GUIDE_FIELDS, path, "guide")
            return ProgramGuide._load(blob, model, data)
        if blob.get("format") != FORMAT:
            raise PPLError(f"'{path}' is not a saved ppl guide (format {blob.get('format')!r})",
                           hint="the file must come from Guide.save")
        check_fields(blob, GUIDE_FIELDS, path, "guide")
        check_fields(blob["options"], GUIDE_OPTION_FIELDS, path, "guide")
        if blob["encoder"] == "custom" and encoder is None:
            raise PPLError("this guide was trained with a custom encoder",
                           hint="pass a module of the same architecture: Guide.load(path, model, encoder=...)")
        if blob["entry"] != model.entry:
            raise PPLError(f"the guide was trained for the model '{blob['entry']}', not '{model.entry}'")
        template = data if data is not None else blob["template"]
        if template is None:
            raise PPLError("the data the guide was built with could not be saved (not plain numbers)",
                           hint="pass a data set of the same shape: Guide.load(path, model, data=...)")
        enc = {"auto": "auto", None: None}.get(blob["encoder"], encoder)
        o = blob["options"]
        g = cls(model, None, family=blob["family"], encoder=enc, rank=o["rank"], hidden=o["hidden"],
                flow_bins=o["flow_bins"], autoregressive=o["autoregressive"], sites=blob["sites"],
                init_scale=o["init_scale"])
        g._build(template)
        if _signature(g.layout) != blob["signature"]:
            raise PPLError("the model's choices or observations differ from those the guide was trained for",
                           hint=f"trained for {blob['signature'].get('sites')}; this model and data give "
                                f"{_signature(g.layout)['sites']}")
        try:
            g.net.load_state_dict(blob["state"])
        except RuntimeError as e:
            raise PPLError(f"the saved parameters do not fit this guide: {str(e).splitlines()[0]}",
                           hint="pass the encoder architecture the guide was trained with") from None
        g.history = list(blob["history"])
        g.objectives = list(blob["objectives"])
        g.features_set = bool(blob["features_set"])
        g.net.eval()
        return g

    # --------------------------------------------------------------------- plots
    def plot_loss(self, ax=None, smooth: int | None = None):
        """The training loss per step (and a moving average); returns the axes."""
        if not self.history:
            raise PPLError("the guide has no loss history yet", hint="train it with guide.fit(...)")
        plt = _pyplot()
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        h = torch.tensor(self.history, dtype=torch.float64)
        ax.plot(h.numpy(), lw=0.6, alpha=0.5, label="loss")
        w = smooth or max(1, len(h) // 50)
        if w > 1 and len(h) > w:
            ma = torch.nn.functional.avg_pool1d(h.view(1, 1, -1), w, 1).flatten()
            ax.plot(range(w - 1, len(h)), ma.numpy(), lw=1.5, label=f"moving average ({w})")
        ax.set_xlabel("step")
        ax.set_ylabel(" / ".join(dict.fromkeys(self.objectives)) or "loss")
        ax.legend()
        return ax


class ProgramGuide(program_guide.ProgramGuide, Guide):
    """A guide written in the DSL (see ``inference.program_guide``); ``program`` is source
    text, a ``.ppl`` path, or a compiled ``ppl.Model``."""

    def __init__(self, model, data, program):
        if isinstance(program, str) and hasattr(model, "compile_sibling"):
            program = model.compile_sibling(program)
        program_guide.ProgramGuide.__init__(self, model, data, program)

    def posterior(self, data=None, particles: int = 1000, seed: int | None = None):
        """q's own approximation of the posterior, as a ``WeightedResult`` (see ``Guide``)."""
        return as_result(program_guide.ProgramGuide.posterior(self, data, particles, seed))

    def save(self, path):
        self._ready()
        save_checked({"format": PROGRAM_FORMAT, "entry": self.model.entry, "program": self.program.source,
                      "program_entry": self.program.entry,
                      "params": {k: v.detach().cpu() for k, v in self.net.values.items()},
                      "constraints": dict(self.net.constraints), "history": list(self.history),
                      "objectives": list(self.objectives), "sites": list(self._sites)}, path, "guide")

    @classmethod
    def _load(cls, blob, model, data):
        if blob["entry"] != model.entry:
            raise PPLError(f"the guide was trained for the model '{blob['entry']}', not '{model.entry}'")
        g = cls(model, None, model.compile_sibling(blob["program"], entry=blob["program_entry"], filename="<guide>"))
        g.net = _Params()
        for k, v in blob["params"].items():
            g.net.values[k] = nn.Parameter(v.clone())
        g.net.constraints = dict(blob["constraints"])
        g.net.frozen = True
        g._sites = list(blob["sites"])
        g.layout = None
        g.template = dict(model.bind((), data)) if data is not None else None
        g.history = list(blob["history"])
        g.objectives = list(blob["objectives"])
        return g
